"""The interpreter's convolution (csqc.numerics.conv2d_nchw).

Rule under test: integer operands held in float64 (the interpreter's integer accumulators) give
every output exactly, whatever the grouping: the one-einsum path of grouped convs equals a direct
sum over the taps; float32 grouped convs keep their per-group products (their rounding order).
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.numerics import conv2d_nchw


def _direct(x, w, stride, padding, groups):
    """Each output as an explicit sum over its channel group's taps (int64)."""
    b, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((b, o, oh, ow), np.int64)
    for oc in range(o):
        g = oc // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                y[:, oc, i, j] = (patch * w[oc].astype(np.int64)).sum(axis=(1, 2, 3))
    return y


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 3, 6]), per_in=st.integers(1, 2), per_out=st.integers(1, 3),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 2), size=st.integers(3, 7), seed=st.integers(0, 2**16))
def test_grouped_integer_convs_are_exact(groups, per_in, per_out, k, stride, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-15, 16, (2, groups * per_in, size, size))
    w = rng.integers(-7, 8, (groups * per_out, per_in, k, k))
    padding = k // 2
    got = conv2d_nchw(x.astype(np.float64), w.astype(np.float64), (stride, stride), (padding, padding), (1, 1),
                      groups)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _direct(x, w, stride, padding, groups))


def test_float32_grouped_convs_keep_their_per_group_products():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    got = conv2d_nchw(x, w, (1, 1), (1, 1), (1, 1), 8)
    assert got.dtype == np.float32
    for g in range(8):
        one = conv2d_nchw(x[:, g:g + 1], w[g:g + 1], (1, 1), (1, 1), (1, 1), 1)
        np.testing.assert_array_equal(got[:, g:g + 1], one)
