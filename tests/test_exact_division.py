"""The quantizer and epilogue kernels divide without a divide instruction (glue.common._quotient):
the results must stay the float32 quotients numpy's divide gives, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script.ir_builder import tirx as I

from csqc.targets.llvm import glue
from csqc.targets.llvm.kernels import build

F32 = np.float32
RNG = np.random.default_rng(7)
LEVELS = [3, 7, 15, 31, 63, 127, 255]


def run(func, *arrays, outputs):
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in outputs]
    build(func).executable(*[tvm.runtime.tensor(a, dev) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def quotient_kernel(n: int):
    """``y[i] = x[i] / den[0]`` through glue.common._quotient where den's range allows (else a divide)."""
    def body(x, den, y):
        divisor = glue.quantizers._divisor_of(den, 0.0, 1)
        glue.common._on_divisor_range(den[0], lambda fast: glue.common._for_each(1, n, lambda _row, i: I.buffer_store(
            y, glue.common._divided(x[i], den[0], divisor.recip if fast else None), [i])))

    return glue.common.prim_func([("x", (n,), "float32"), ("den", (1,), "float32"), ("y", (n,), "float32")], body)


@pytest.mark.parametrize("levels", LEVELS)
def test_epilogue_divides_every_significand_by_levels_exactly(levels):
    # acc = 2^23 + j times S = 2^-23 is 1 + j 2^-23: every float32 significand once; the quotient's
    # significand (and so its rounding) depends on nothing else while it stays normal
    n = 1 << 23
    acc = (np.arange(n, dtype=np.int64) + n).astype(np.int32).reshape(1, 1, 2048, 4096)
    scale, mult, add = np.array([2.0**-23], F32), np.ones(1, F32), np.zeros(1, F32)
    kernel = glue.epilogue(acc.shape, 1, levels, "none", 0.0, 0.0, True)
    (got,) = run(kernel, acc, scale, mult, add, outputs=[(acc.shape, "float32")])
    expected = (acc.astype(F32) * scale[0]) / F32(levels)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_every_split_divisor_is_checked_on_every_significand():
    # glue.common._split_quotient is exact only for the constant divisors checked by the test above
    assert glue.common._SPLIT_DIVISORS <= set(LEVELS)


def test_split_quotient_at_the_edge_of_its_domain():
    # dividends of the smallest in-range scale (2^-60) times small integers, and the largest
    n = 1 << 16
    ints = np.concatenate([np.arange(1, n // 2), RNG.integers(1 << 20, 1 << 31, n // 2 + 1)]).astype(np.int32)
    acc = (ints * np.where(RNG.random(n) < 0.5, -1, 1)).astype(np.int32).reshape(1, 1, 1, n)
    for scale in (F32(2.0**-60), F32(2.0**-60 * 1.75), F32(2.0**60)):
        for levels in sorted(glue.common._SPLIT_DIVISORS):
            kernel = glue.epilogue(acc.shape, 1, levels, "none", 0.0, 0.0, True)
            args = (acc, np.array([scale], F32), np.ones(1, F32), np.zeros(1, F32))
            (got,) = run(kernel, *args, outputs=[(acc.shape, "float32")])
            expected = (acc.astype(F32) * scale) / F32(levels)
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (scale, levels)


def test_quotient_by_run_time_divisors_matches_division():
    n = 1 << 20
    exponents = RNG.uniform(-60, 60, size=n // 1024)
    for den_exp in exponents[:24]:
        den = F32(2.0**den_exp * RNG.uniform(1, 2))
        # quotients from 2^-60 to 2^60, numerators normal and finite (_quotient's domain)
        x = RNG.uniform(1, 2, n) * 2.0 ** RNG.integers(-60, 60, n) * np.float64(den)
        x = np.clip(x, 2.0**-100, 2.0**127).astype(F32) * np.where(RNG.random(n) < 0.5, -1, 1).astype(F32)
        x[:64] = 0.0
        (got,) = run(quotient_kernel(n), x, np.array([den], F32), outputs=[((n,), "float32")])
        assert np.array_equal(got.view(np.uint32), (x / den).view(np.uint32)), f"divisor {den!r}"


def test_quotient_at_ties_and_their_neighbours():
    # numerators m * den for half-integers m (exact ties after rounding to codes) and the floats
    # around them: where a reciprocal multiply alone would round the wrong way
    n = 255 * 2 * 9
    for den in [F32(0.1), F32(3.0), F32(1 / 3), F32(2.0**-59), F32(2.0**59 * 1.7), F32(7.0e-5)]:
        m = (np.arange(1, 511) / 2).astype(F32)
        exact = (m.astype(np.float64) * np.float64(den)).astype(F32)
        around = [exact]
        up, down = exact.copy(), exact.copy()
        for _ in range(4):
            up, down = np.nextafter(up, F32(np.inf)), np.nextafter(down, F32(0))
            around += [up, down]
        x = np.concatenate(around).astype(F32)[:n]
        (got,) = run(quotient_kernel(x.size), x, np.array([den], F32), outputs=[((x.size,), "float32")])
        assert np.array_equal(got.view(np.uint32), (x / den).view(np.uint32)), f"divisor {den!r}"


@pytest.mark.parametrize("den", [F32(2.0**-60), F32(2.0**60), np.nextafter(F32(2.0**-60), F32(0)),
                                 np.nextafter(F32(2.0**60), F32(np.inf)), F32(1e-40), F32(3e38)])
def test_quotient_at_and_outside_the_fast_range(den):
    x = np.array([0.0, 1.0, -1.0, 3.0e38, 1.0e-38, 1.4e-45, 2.5, 7.0, 2.0**-100, 1.5e-30] * 64, F32)
    (got,) = run(quotient_kernel(x.size), x, np.array([den], F32), outputs=[((x.size,), "float32")])
    with np.errstate(over="ignore", under="ignore"):
        expected = x / den
    # _quotient's domain: 2^-100 <= |x| (or 0) and |x / den| < 2^100, else a divide
    fast = (den >= F32(2.0**-60)) & (den <= F32(2.0**60))
    inside = ~fast | (x == 0) | ((np.abs(x) >= 2.0**-100) & (np.abs(expected) < 2.0**100))
    assert np.array_equal(got[inside].view(np.uint32), expected[inside].view(np.uint32))
    if fast:
        assert np.all(np.abs(got[np.abs(x) < 2.0**-100]) < 2.0**-40)


def reference_codes(x, scale, levels, clamp):
    with np.errstate(over="ignore"):
        q = np.rint((np.abs(x) * F32(levels)) / F32(scale))
    return np.minimum(q, levels) if clamp else q


@pytest.mark.parametrize("levels", [15, 255])
@pytest.mark.parametrize("scale", [F32(0.1), F32(6.0), F32(1 / 3), F32(2.0**-50), F32(3.0e9)])
def test_static_quantize_codes_at_every_tie(levels, scale):
    # |x| L / S lands on each half-integer up to L + 1 and the floats around it
    m = (np.arange(1, 2 * levels + 4) / 2).astype(np.float64)
    centre = (m * np.float64(scale) / levels).astype(F32)
    x = np.concatenate([centre] + [np.nextafter(centre, F32(direction)) for direction in (np.inf, 0)]
                       + [F32(1e30) * np.ones(4, F32)]).astype(F32)
    x = np.concatenate([x, -x])
    outputs = [((1,), "float32"), (x.shape, "uint8"), (x.shape, "uint8")]
    bits = int(np.log2(levels + 1))
    _, pos, neg = run(glue.quantize(x.shape, bits, float(scale), True), x, outputs=outputs)
    expected = reference_codes(x, scale, levels, clamp=True)
    assert np.array_equal(pos, np.where(x > 0, expected, 0)) and np.array_equal(neg, np.where(x < 0, expected, 0))


def test_asymmetric_quantize_matches_division_with_huge_values():
    x = np.concatenate([RNG.standard_normal(4096).astype(F32), np.array([3e38, -3e38, 1e20, -1e20], F32)])
    outputs = [((1,), "float32"), ((1,), "int32"), (x.shape, "uint8")]
    scale, zero_point = 0.25, 9
    _, _, codes = run(glue.quantize_asymmetric(x.shape, 4, scale, zero_point), x, outputs=outputs)
    with np.errstate(over="ignore"):
        u = np.rint((x * F32(15)) / F32(scale)) + F32(zero_point)
    assert np.array_equal(codes, np.clip(u, 0, 15).astype(np.uint8))
