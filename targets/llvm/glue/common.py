"""Helpers every glue kernel shares: float32 constants and rounding fences, the exact
reciprocal quotients, activations, and the loop builders (parallel chunks, vector spans)."""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as I


F32 = "float32"


LANES = 16  # float32 lanes of one AVX-512 register


# Elementwise work is split into parallel chunks of this many elements; smaller tensors run on
# one thread (a parallel launch costs a few microseconds, more than the work below this size).
_CHUNK = 4096


_MIN_PARALLEL = 32768


# Register-sized scratch stays an LLVM alloca (see kernels._ON_STACK): without it TVM turns
# local buffers inside parallel loops into per-task workspace allocations.
_ON_STACK = {"disable_lower_builtin": True}


_ACTS = ("none", "relu", "clip")


def _prod(values) -> int:
    return int(math.prod(int(v) for v in values))


def _f32(value: float) -> tirx.PrimExpr:
    """A float32 constant rounded exactly as ``np.float32(value)``."""
    return tirx.const(float(np.float32(value)), F32)


def _rounded(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``value`` rounded before it is used: stops FMA contraction of ``a*b + c``."""
    return I.call_llvm_pure_intrin(F32, "llvm.arithmetic.fence", value)


def _round_to_int(value) -> tirx.PrimExpr:
    """int32 ``roundeven(value)`` for a float32 ``value`` within int32's range, in one conversion
    (``llvm.lrint``: x86 ``vcvtps2dq``, in place of ``vrndscaleps`` (two micro-ops) and a
    truncating conversion). It rounds in the current rounding mode, to nearest even, which every
    float32 multiply and add of these kernels assumes as well."""
    return I.call_llvm_pure_intrin("int32", "llvm.lrint", value)


def _fma(a, b, c) -> tirx.PrimExpr:
    """``a * b + c`` with one rounding (an FMA instruction)."""
    return I.call_llvm_pure_intrin(F32, "llvm.fma", a, b, c)


# Divisors for which :func:`_quotient` is exact for every float32 dividend the kernels pass it
# (see its domain there: no remainder underflows, no quotient overflows); outside, a real divide.
_QUOTIENT_DIVISORS = (2.0**-60, 2.0**60)


_QUOTIENT_MIN_ELEMENTS = 256  # below, one divide loop is as fast and half the code


def _quotient(num, den, recip) -> tirx.PrimExpr:
    """``num / den`` rounded to nearest even, as a divide would give it, without a divide.

    ``recip`` must be ``RN(1 / den)`` (one scalar divide, or a constant) and ``den`` in
    ``_QUOTIENT_DIVISORS``; exact for ``num`` zero or ``2^-100 <= |num|`` with ``|num / den| <
    2^100`` (the remainders stay representable). A smaller ``num`` gives a quotient below
    2^-40 within a few ulps, which no caller tells apart: a code rounds it to 0; the
    dividends by ``L`` are at least the smallest scale. ``q0 = num * recip`` is within 2 ulps of the
    quotient; one correction with the exact remainder ``num - q0 * den`` (an FMA) makes it
    faithful (within 1 ulp), and by Markstein's theorem (IBM J. Res. Dev. 34(1), 1990: ``recip``
    within half an ulp of ``1/den`` and a faithful ``q``) a second one, ``RN(q + (num - q * den)
    * recip)``, is the correctly rounded quotient. 1 multiply + 4 FMAs against ~10 cycles per
    AVX-512 divide; tests/test_exact_division.py checks every float32 significand.
    """
    q = num * recip
    q = _fma(_fma(-q, den, num), recip, q)
    return _fma(_fma(-q, den, num), recip, q)


# Constant divisors d for which :func:`_split_quotient` is the correctly rounded quotient of every
# float32 dividend in its domain: L = 2^b - 1 of every activation width above one bit (one bit
# divides by 1). Checked for every float32 significand through the real kernels
# (tests/test_exact_division.py); a divisor added here must be added there.
_SPLIT_DIVISORS = frozenset(2**bits - 1 for bits in range(2, 9))


@functools.lru_cache(maxsize=None)
def _reciprocal_split(divisor: float) -> tuple[float, float]:
    """``(zh, zl)``: ``zh = RN(1 / d)`` and ``zl = RN(1 / d - zh)`` as float32 values."""
    d = np.float32(divisor)
    zh = np.float32(1.0) / d
    zl = np.float32(np.float64(1.0) / np.float64(d) - np.float64(zh))
    # num * zl stays normal for every dividend of _split_quotient's domain (|num| >= 2^-90)
    assert zl == 0 or abs(zl) >= 2.0**-36, (divisor, zl)
    return float(zh), float(zl)


def _split_quotient(num, divisor: float) -> tirx.PrimExpr:
    """``num / d`` for a constant ``d`` of ``_SPLIT_DIVISORS`` in one multiply and one FMA:
    ``RN(num * zh + RN(num * zl))`` with ``zh + zl`` the reciprocal to twice float32's precision
    (Brisebarre, Muller and Raina, IEEE Trans. Computers 53(8), 2004: for most divisors this is
    the correctly rounded quotient of every dividend; which ones is checked, not assumed).
    Domain: ``num`` zero or ``|num| >= 2^-90`` (``num * zl`` normal; products below ``num``):
    the callers divide an integer times a scale ``S >= 2^-60`` (their divisor-range branch).
    ``num`` must be rounded already; against :func:`_quotient` it saves three FMAs a value."""
    zh, zl = _reciprocal_split(divisor)
    return _fma(num, _f32(zh), _rounded(num * _f32(zl)))


def _divided(num, den, recip=None) -> tirx.PrimExpr:
    """``num / den``: :func:`_quotient` with ``recip`` (the caller branched on the divisor's
    range; :func:`_split_quotient` where ``den`` is a constant it is exact for), a divide
    without it. ``num`` is rounded first (no FMA contraction into it)."""
    if recip is None:
        return num / den
    if isinstance(den, tirx.FloatImm) and den.value in _SPLIT_DIVISORS:
        # the levels L; a static quantizer scale equal to one takes it too (its dividends below
        # 2^-90 give quotients below 2^-91, code 0 either way)
        return _split_quotient(_rounded(num), den.value)
    return _quotient(_rounded(num), den, recip)


def _levels_reciprocal(levels: int) -> tirx.PrimExpr:
    """``RN(1 / L)`` as float32 (numpy's float32 divide is correctly rounded)."""
    return _f32(np.float32(1.0) / np.float32(levels))


def _on_divisor_range(divisor, emit: Callable[[bool], None], enabled: bool = True) -> None:
    """``emit(True)`` where the run-time ``divisor`` lets :func:`_quotient` replace a divide,
    ``emit(False)`` otherwise (both branches are code; one runs)."""
    if not enabled:
        emit(False)
        return
    lo, hi = _QUOTIENT_DIVISORS
    with I.If(tirx.all(divisor >= _f32(lo), divisor <= _f32(hi))):
        with I.Then():
            emit(True)
        with I.Else():
            emit(False)


def _activation(value, act: str, clip_lo, clip_hi, keep_nan: bool = True):
    """The interpreter's ``_activation``: relu = max(y, 0); clip = min(max(y, lo), hi).

    ``keep_nan``: a NaN stays NaN, as in numpy and PyTorch (LLVM's max of a NaN and 0 is 0, so a
    float layer whose sums overflowed to inf - inf would pass finite values on and the call's
    overflow checks would not see it); False where ``value`` cannot be NaN (an integer layer's)."""
    if act == "relu":
        result = tirx.Max(value, _f32(0.0))
    elif act == "clip":
        result = tirx.Min(tirx.Max(value, _f32(clip_lo)), _f32(clip_hi))
    else:
        return value
    return _keeping_nan(value, result) if keep_nan else result


def _keeping_nan(value, result):
    """``result``, or ``value`` where it is NaN."""
    return tirx.Select(tirx.isnan(value), value, result)


def _nan_sticky_max(a, b):
    """``max(a, b)`` of two floats >= 0 (or NaN), compared as int32 bit patterns: non-negative
    floats order as their bits do and a NaN's lie above infinity's, so a NaN anywhere makes a
    max-abs reduction NaN (a dynamic scale the runtime then refuses: the overflow it is) where
    LLVM's float max would drop it. One integer max, as cheap as the float one."""
    as_int = tirx.Max(tirx.reinterpret("int32", a), tirx.reinterpret("int32", b))
    return tirx.reinterpret(F32, as_int)


def _check_act(act: str):
    if act not in _ACTS:
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}")


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _flat(buffer) -> tirx.Buffer:
    """A 1-D view of a parameter buffer (same data)."""
    return I.decl_buffer((_prod(buffer.shape),), buffer.dtype, data=buffer.data)


def _local(shape, dtype=F32):
    return I.alloc_buffer(shape, dtype, scope="local", annotations=_ON_STACK)


def _zeroed_accumulators(vectors: int):
    """``vectors`` float32 vectors of register-tile sums (a local buffer), set to zero."""
    acc = _local((vectors * LANES,))
    with I.unroll(0, vectors) as k:
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(acc, _f32(0.0), [k * LANES + lane])
    return acc


def prim_func(params: Sequence[tuple[str, tuple, str]], body: Callable) -> tirx.PrimFunc:
    """Build a PrimFunc whose parameters are buffers ``(name, shape, dtype)``; ``body(*buffers)``
    emits the statements through the IRBuilder."""
    with IRBuilder() as builder:
        with I.prim_func():
            I.func_name("main")
            I.func_attr({"tir.noalias": True})
            buffers = [I.arg(name, I.Buffer(tuple(int(s) for s in shape), dtype)) for name, shape, dtype in params]
            body(*buffers)
    return builder.get()


def _parallel_or_serial(extent: int, work: int):
    return I.parallel(0, extent) if extent > 1 and work >= _MIN_PARALLEL else I.serial(0, extent)


def _vector_span(emit: Callable, row, start, length: int):
    """``emit(row, col)`` for ``col`` in ``[start, start + length)``: vectors of 16, then one
    narrower vector for the remainder (no per-lane predicates)."""
    full, tail = divmod(length, LANES)
    if full:
        with I.serial(0, full) as v:
            with I.vectorized(0, LANES) as lane:
                emit(row, start + v * LANES + lane)
    if tail:
        with I.vectorized(0, tail) as lane:
            emit(row, start + full * LANES + lane)


def _for_each(rows: int, row_len: int, emit: Callable):
    """Run ``emit(row, col)`` over a ``rows x row_len`` index space.

    Parallel over rows (long rows are cut into chunks of ``_CHUNK``), vectorized along the row.
    """
    n_chunks = max(1, -(-row_len // _CHUNK)) if row_len > _CHUNK else 1
    chunk = row_len if n_chunks == 1 else _CHUNK
    last = row_len - (n_chunks - 1) * chunk
    with _parallel_or_serial(rows * n_chunks, rows * row_len) as task:
        if n_chunks == 1:
            _vector_span(emit, task, 0, row_len)
            return
        row, index = task // n_chunks, task % n_chunks
        if last == chunk:
            _vector_span(emit, row, index * chunk, chunk)
            return
        with I.If(index < n_chunks - 1):
            with I.Then():
                _vector_span(emit, row, index * chunk, chunk)
            with I.Else():
                _vector_span(emit, row, index * chunk, last)


def _channel_view(shape, axis: int) -> tuple[int, int, int, int]:
    """``(axis, outer, channels, inner)`` of ``shape`` around ``axis``."""
    axis = axis % len(shape)
    return axis, _prod(shape[:axis]), int(shape[axis]), _prod(shape[axis + 1 :])


def _for_each_channel(shape, axis: int, emit: Callable):
    """``emit(flat_index, channel)`` over a tensor, vectorized along the contiguous dimension.

    Rows are ``outer x channels`` when the inner block is at least one vector wide (channel
    uniform per row, NCHW); otherwise rows are ``outer`` and the channel varies along the row
    (``[M, C]`` outputs of linear layers).
    """
    _, outer, channels, inner = _channel_view(shape, axis)
    if inner >= LANES:
        _for_each(outer * channels, inner, lambda row, col: emit(row * inner + col, row % channels))
    else:
        row_len = channels * inner
        _for_each(outer, row_len, lambda row, col: emit(row * row_len + col, col // inner if inner > 1 else col))


def _levels(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8 (uint8 codes), got {bits}")
    return 2**bits - 1


def _less_offset(acc, c, named: dict, acc_dtype: str) -> tirx.PrimExpr:
    """Accumulator ``acc`` of channel ``c`` from the (widened) product: less the per-channel offset
    term of offset codes (``acc_offset``), or the zero point times the weight sums."""
    if "zero_point" in named:
        return acc - tirx.Cast(acc_dtype, named["zero_point"][0]) * named["acc_offset"][c]
    if "acc_offset" in named:
        return acc - named["acc_offset"][c]
    return acc


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)
