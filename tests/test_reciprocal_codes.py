"""Static activation scales: codes by one multiply (or a multiply and an FMA) where
reciprocal.code_form proves them equal to the divide's, through the real quantize kernel."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tvm

from csqc.targets.llvm import glue, reciprocal
from csqc.targets.llvm.kernels import build

F32 = np.float32
RNG = np.random.default_rng(11)


def divided_codes(x, scale, levels):
    return np.minimum(np.rint((np.abs(x) * F32(levels)) / F32(scale)), levels)


def around_every_tie(scale, levels, ulps: int):
    """``|x| L / S`` at and around each half-integer up to ``L + 1``: ``ulps`` floats either side."""
    centre = (np.arange(1, 2 * levels + 4) / 2 * np.float64(scale) / levels).astype(F32)
    steps = [centre]
    for direction in (np.inf, 0.0):
        x = centre
        for _ in range(ulps):
            x = np.nextafter(x, F32(direction))
            steps.append(x)
    return np.concatenate(steps).astype(F32)


def quantize_codes(x, scale, levels):
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in
            [((1,), "float32"), (x.shape, "uint8")]]
    kernel = build(glue.quantize(x.shape, int(np.log2(levels + 1)), float(scale), False))
    kernel.executable(tvm.runtime.tensor(x, dev), *outs)
    return outs[1].numpy()


@pytest.mark.parametrize("levels", [3, 15, 255])
def test_static_codes_by_the_proved_form_equal_the_divide_around_every_tie(levels):
    forms = set()
    for scale in (F32(v) for v in np.exp(RNG.uniform(-12, 8, 12))):
        forms.add(reciprocal.code_form(float(scale), levels))
        x = np.abs(around_every_tie(scale, levels, 40))
        np.testing.assert_array_equal(quantize_codes(x, scale, levels), divided_codes(x, scale, levels),
                                      err_msg=f"scale {scale!r}, form {reciprocal.code_form(float(scale), levels)}")
    assert forms <= {"single", "split"}
    if levels < 255:  # one multiply suffices for some scales, not for most
        assert forms == {"single", "split"}


@pytest.mark.parametrize("levels,zero_point", [(15, 0), (15, 9), (255, 128), (3, 3)])
def test_static_asymmetric_codes_equal_the_divide_around_every_tie_of_both_signs(levels, zero_point):
    """u = clip(rint(x L / S) + zp, 0, L): the forms are odd in x, so one proof (up to 2L + 1)
    covers both signs."""
    dev = tvm.cpu()
    forms = set()
    for scale in (F32(v) for v in np.exp(RNG.uniform(-10, 6, 8))):
        forms.add(reciprocal.code_form(float(scale), 2 * levels + 1))
        x = around_every_tie(scale, 2 * levels + 1, 12) / F32(2)  # ties of x L / S up to 2L + 2
        x = np.concatenate([x, -x, np.array([3e38, -3e38], F32)]).astype(F32)
        outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev)
                for shape, dtype in [((1,), "float32"), ((1,), "int32"), (x.shape, "uint8")]]
        bits = int(np.log2(levels + 1))
        build(glue.quantize_asymmetric(x.shape, bits, float(scale), zero_point)).executable(
            tvm.runtime.tensor(x, dev), *outs)
        with np.errstate(over="ignore"):
            expected = np.clip(np.rint((x * F32(levels)) / scale) + F32(zero_point), 0, levels)
        np.testing.assert_array_equal(outs[2].numpy(), expected.astype(np.uint8), err_msg=f"scale {scale!r}")
    assert forms <= {"single", "split"}


def test_the_proof_rejects_a_single_multiply_where_a_code_differs():
    """Where the form is split, some numerator near a tie gets another code from one multiply:
    the bisection found a real difference, not a rounding artefact of the check."""
    found = 0
    for scale in (F32(v) for v in np.exp(np.random.default_rng(3).uniform(-6, 6, 40))):
        if reciprocal.code_form(float(scale), 15) != "split":
            continue
        ties = (np.arange(1, 33) / 2 * np.float64(scale)).astype(F32)  # n / S at each half-integer
        n = [ties]
        for direction in (np.inf, 0.0):  # and every numerator within 64 ulps of one
            step = ties
            for _ in range(64):
                step = np.nextafter(step, F32(direction))
                n.append(step)
        n = np.minimum(np.concatenate(n), F32(16) * scale)
        single = np.minimum(np.rint(n * (F32(1) / scale)), 15)
        assert not np.array_equal(single, np.minimum(np.rint(n / scale), 15)), scale
        found += 1
    assert found >= 10


def hardware_split_quotients(n, zh, zl):
    """``RN(n zh + RN(n zl))`` by the FMA of a real kernel."""
    from tvm.script.ir_builder import tirx as I

    def body(x, y):
        glue.common._for_each(1, n.size, lambda _row, i: I.buffer_store(
            y, glue.common._fma(x[i], glue.common._f32(zh), glue.common._rounded(x[i] * glue.common._f32(zl))), [i]))

    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(n.size, F32), dev)
    build(glue.common.prim_func([("x", (n.size,), "float32"), ("y", (n.size,), "float32")], body)).executable(
        tvm.runtime.tensor(n, dev), out)
    return out.numpy()


def test_split_quotients_are_the_fma_of_the_hardware():
    """The proof's model of RN(n zh + RN(n zl)) (exact TwoSum, midpoints decided by the tail)
    against the real FMA in a kernel, on numerators around ties and at random."""
    scale = F32(0.0371)
    zh, zl = (F32(v) for v in reciprocal.reciprocal_parts(float(scale)))
    n = np.concatenate([around_every_tie(scale, 255, 200) * F32(255),
                        RNG.uniform(0, 300, 100_000).astype(F32),
                        np.array([0.0, 1e-45, 1e-40, 2.0**-126], F32)]).astype(F32)
    expected = reciprocal._split_quotients(n, zh, zl)
    assert np.array_equal(hardware_split_quotients(n, zh, zl).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("zh_ulps,tail", [(1, -1), (1, 1), (3, 1), (3, -1)])
def test_split_quotients_decide_a_float32_midpoint_by_the_tail(zh_ulps, tail):
    """1.5 x (1 + k 2^-23) is a float32 midpoint (odd k); a tail of 2^-80 leaves the float64 sum
    on it, and only its sign says which neighbour the FMA rounds to (ties to even would pick
    the upper one for k = 1, the lower one for k = 3)."""
    n = np.array([1.5], F32)
    zh, zl = F32(1 + zh_ulps * 2.0**-23), F32(tail * 2.0**-81)
    expected = reciprocal._split_quotients(n, zh, zl)
    assert np.array_equal(hardware_split_quotients(n, zh, zl).view(np.uint32), expected.view(np.uint32))
    tie = np.float64(1.5) * np.float64(zh)
    assert (expected[0] > tie) == (tail > 0)


def test_scales_without_a_bound_keep_the_quotient():
    assert reciprocal.code_form(0.0, 15) == "quotient"
    assert reciprocal.code_form(float("inf"), 15) == "quotient"
    assert reciprocal.code_form(3.0e38, 15) == "quotient"  # (L + 1) S overflows float32


# -- dynamic scales: the split form, proved in the kernel on each run's scale ---------------------


def _split_proof_kernel(levels: int):
    """The kernel's proof alone: ``(proven, low)`` for the scale it is given."""
    from tvm.script.ir_builder import tirx as I

    def body(scale, out, low_out):
        parts = glue.common._local((2,))
        I.buffer_store(parts, glue.common._f32(1.0) / scale[0], [0])
        I.buffer_store(parts, glue.common._f32(levels + 1) * scale[0], [1])
        proven, low = glue.quantizers._emit_split_form_proof(glue.quantizers._Divisor(scale[0], parts[0], parts[1]), levels)
        I.buffer_store(out, proven[0], [0])
        I.buffer_store(low_out, low, [0])

    return build(glue.common.prim_func([("scale", (1,), "float32"), ("proven", (1,), "int32"), ("low", (1,), "float32")],
                                 body))


def _numpy_split_proof(scale, levels: int, zl) -> bool:
    """The same proof in numpy with low part ``zl``, unclamped codes 1..L+1 (reciprocal's
    first-reach bisection)."""
    s = F32(scale)
    zh = F32(reciprocal.reciprocal_parts(scale)[0])
    bound_bits = int(np.asarray(F32(levels + 1) * s, F32).view(np.int32))
    exact = reciprocal._first_numerators(lambda n: np.rint(n / s), bound_bits, levels + 1)
    split = reciprocal._first_numerators(lambda n: np.rint(reciprocal._split_quotients(n, zh, zl)), bound_bits,
                                         levels + 1)
    return bool(np.array_equal(exact, split))


@pytest.mark.parametrize("levels", [1, 3, 15, 255])
def test_the_kernels_proof_of_the_split_form_agrees_with_numpy(levels):
    """On random scales, powers of two and the ends of the divide-free range: the kernel's low
    part (``RN(RN(1 - zh S) / S)``, the residual exact) is ``1/S - zh`` correctly rounded (closer
    than reciprocal_parts', which rounds ``1/S`` to float64 first) and its verdict the numpy proof's
    with that low part (which no scale tried here fails: where one did, the kernel would keep the
    correctly rounded quotient)."""
    import tvm as _tvm

    kernel = _split_proof_kernel(levels)
    scales = np.concatenate([np.exp(RNG.uniform(-40, 40, 40)), [2.0**-60, 2.0**60, 1.0, 0.5, 3.0, 1 / 3, 7e-5]])
    for scale in scales.astype(F32):
        dev = _tvm.cpu()
        outs = [_tvm.runtime.tensor(np.zeros(1, dtype), dev) for dtype in ("int32", "float32")]
        kernel.executable(_tvm.runtime.tensor(np.array([scale], F32), dev), *outs)
        low = outs[1].numpy()[0]
        zh = F32(reciprocal.reciprocal_parts(scale)[0])
        exact = Fraction(1) / Fraction(float(scale)) - Fraction(float(zh))  # 1/S - zh: low is its rounding
        ulp = Fraction(float(np.spacing(np.abs(low))))
        assert abs(Fraction(float(low)) - exact) <= ulp / 2, (scale, low)
        assert bool(outs[0].numpy()[0]) == _numpy_split_proof(scale, levels, low), scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dynamic_codes_of_large_tensors_equal_the_divide(bits):
    """A dynamic quantizer of 2^17 elements takes the proved split form: its codes are the
    interpreter's (round half even of |x| L / S, S = max|x|), ties of every code included."""
    levels = 2**bits - 1
    x = (RNG.standard_normal(1 << 17) * 3).astype(F32)
    x[: 4 * levels] = around_every_tie(F32(np.abs(x).max()), levels, 1)[: 4 * levels] * np.sign(RNG.standard_normal(4 * levels))
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in
            [((1,), "float32"), (x.shape, "uint8"), (x.shape, "uint8")]]
    build(glue.quantize(x.shape, bits, 0.0, True)).executable(tvm.runtime.tensor(x, dev), *outs)
    scale = F32(np.abs(x).max())
    assert outs[0].numpy()[0] == scale
    magnitude = np.rint((np.abs(x) * F32(levels)) / scale)
    np.testing.assert_array_equal(outs[1].numpy(), np.where(x > 0, magnitude, 0))
    np.testing.assert_array_equal(outs[2].numpy(), np.where(x < 0, magnitude, 0))
