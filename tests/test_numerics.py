"""The interpreter's convolution (csqc.numerics.conv2d_nchw) and erf.

Rule under test: integer operands held in float64 (the interpreter's integer accumulators) give
every output exactly, whatever the grouping and path: small depthwise planes as whole-tensor
taps, the rest as a product per group, both equal a direct sum over the taps; float32 grouped
convs keep each group's own product (their rounding order). Also gelu's erf: math.erf rounded
once to float32, whichever way it is computed.
"""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc import numerics
from csqc.numerics import conv2d_nchw


def _direct(x, w, stride, padding, groups, dilation=1):
    """Each output as an explicit sum over its channel group's taps (int64)."""
    b, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    span_h, span_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    oh, ow = (h + 2 * padding - span_h) // stride + 1, (wd + 2 * padding - span_w) // stride + 1
    y = np.zeros((b, o, oh, ow), np.int64)
    for oc in range(o):
        g = oc // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + span_h:dilation,
                           j * stride:j * stride + span_w:dilation]
                y[:, oc, i, j] = (patch * w[oc].astype(np.int64)).sum(axis=(1, 2, 3))
    return y


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 3, 6]), per_in=st.integers(1, 2), per_out=st.integers(1, 3),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(5, 8),
       small_planes=st.sampled_from([0, numerics._SMALL_PLANES]), seed=st.integers(0, 2**16))
def test_grouped_integer_convs_are_exact(groups, per_in, per_out, k, stride, dilation, size, small_planes, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-15, 16, (2, groups * per_in, size, size))
    w = rng.integers(-7, 8, (groups * per_out, per_in, k, k))
    padding = k // 2
    saved, numerics._SMALL_PLANES = numerics._SMALL_PLANES, small_planes  # 0: every plane per group
    try:
        got = conv2d_nchw(x.astype(np.float64), w.astype(np.float64), (stride, stride), (padding, padding),
                          (dilation, dilation), groups)
    finally:
        numerics._SMALL_PLANES = saved
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _direct(x, w, stride, padding, groups, dilation))


def test_float32_grouped_convs_keep_their_per_group_products():
    """Float32 sums round in their order: each group's output is that group's own product."""
    rng = np.random.default_rng(0)
    for groups, per_in, per_out, k, batch in [(8, 1, 1, 3, 1), (2, 2, 1, 1, 1), (4, 3, 2, 3, 2)]:
        x = rng.standard_normal((batch, groups * per_in, 6, 6)).astype(np.float32)
        w = rng.standard_normal((groups * per_out, per_in, k, k)).astype(np.float32)
        padding = (k // 2, k // 2)
        got = conv2d_nchw(x, w, (1, 1), padding, (1, 1), groups)
        assert got.dtype == np.float32
        for g in range(groups):
            one = conv2d_nchw(x[:, g * per_in:(g + 1) * per_in], w[g * per_out:(g + 1) * per_out], (1, 1), padding,
                              (1, 1), 1)
            np.testing.assert_array_equal(got[:, g * per_out:(g + 1) * per_out], one)


_MATH_ERF = np.vectorize(math.erf, otypes=[np.float64])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=400))
def test_erf_is_math_erf_rounded_once_on_any_float32(bits):
    """The vectorized erf (SciPy's, with math.erf where the two could round apart) gives
    exactly math.erf rounded to float32, NaN and infinities included."""
    x = np.array(bits, np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):
        expected = _MATH_ERF(x.astype(np.float64)).astype(np.float32)
    assert np.array_equal(numerics.erf(x).view(np.uint32), expected.view(np.uint32))


def test_erf_agrees_with_math_erf_across_its_curved_range():
    x = np.linspace(-6, 6, 2_000_001, dtype=np.float32)
    x = np.concatenate([x, np.float32(1e-30) * x, np.nextafter(x, np.float32(np.inf))])
    assert np.array_equal(numerics.erf(x), _MATH_ERF(x.astype(np.float64)).astype(np.float32))
    assert numerics.erf(np.zeros((0, 3), np.float32)).shape == (0, 3)
    for scalar in (np.nan, 0.5, -np.inf):  # 0-d, NaN taking the one-by-one path
        np.testing.assert_array_equal(numerics.erf(np.array(scalar, np.float32)), np.float32(math.erf(scalar)))
