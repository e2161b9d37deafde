"""Scheduled TensorIR "glue" kernels of the csqc LLVM (CPU) target: everything but the integer layers.

The integer (bit-serial / bit-parallel) layers live in :mod:`csqc.targets.llvm.kernels`; this
module provides the rest of a CPU artifact: activation quantize / dequantize, the float epilogue
of quantized layers, float convolution and linear layers, elementwise ops with broadcasting,
pooling, reductions, softmax and layout ops.

Semantics and float32 operation order follow the golden model, :mod:`csqc.interpreter`:

* quantize: ``S = static_scale`` if > 0 else ``max|x|``; ``codes = round_half_even((|x| * L) / S)``
  (clamped to ``L`` when static), as uint8 magnitudes (pos / neg planes when signed), or for
  signed activations as one offset code ``sign(x) * code + L`` (``offset=True``).
* quantize_asymmetric: the interpreter's asymmetric quantizer (range ``R`` as the scale, an
  int32 zero point, unsigned codes ``u``); ``centered=True`` stores the sign parts of ``u - zp``
  instead, which every reader of symmetric signed codes takes as they are.
* epilogue: ``y = ((f32(acc - acc_neg) * S) / L) * mult[c] + add[c]``, then the activation; with
  offset codes ``acc - acc_offset[c]`` replaces ``acc - acc_neg``; with asymmetric codes
  ``acc - zp * acc_offset[c]`` (``acc_offset`` then holds the weight sums ``sum_k q[c, k]``).
* pooling / mean: sum, then one division; max pooling pads with -inf.

Exactness: LLVM is allowed to contract ``a * b + c`` into an FMA under TVM's default target
options, which changes the rounding.  Where the interpreter multiplies and then adds, the product
goes through ``llvm.arithmetic.fence`` (:func:`_rounded`) so the add sees the rounded product.
The quantizer and epilogue divisions by a scale or by ``L`` are hot (a vector divide costs about
ten multiplies), so where nothing can underflow or overflow they run as :func:`_quotient`, a
reciprocal multiply with two FMA corrections that gives the correctly rounded quotient (the
same float32 as the divide), or for the constant ``L`` as :func:`_split_quotient` (one multiply
and one FMA, checked exact for every significand); elsewhere divisions stay divisions.  Float
conv / linear sums use FMAs and a different summation order (within 1e-5 relative, not
bit-identical to numpy).

Every builder is a pure function of static shapes and attributes and returns a scheduled
``tvm.tirx.PrimFunc`` (loops already carry their parallel / vectorized / unrolled kinds: TVM
0.27's default pipeline schedules nothing).  Buffers are row-major (NCHW for images); the last
parameter is the output (``quantize`` has two or three outputs: ``scale`` and the codes).
Compile them with :func:`csqc.targets.llvm.kernels.build`, which disables StorageRewrite so the
register-sized scratch buffers stay on the stack.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as I

from csqc.numerics import pool_output_size
from csqc.targets.tvm.code_thresholds import FORM_FIELDS, NO_STEP, TABLE_ENTRIES

from .reciprocal import code_form, reciprocal_parts

__all__ = [
    "ConvKnobs",
    "default_conv_knobs",
    "FloatTail",
    "conv_output_hw",
    "LinearKnobs",
    "quantize",
    "quantize_asymmetric",
    "dequantize",
    "epilogue",
    "TileEpilogue",
    "conv2d_f32",
    "linear_f32",
    "binary",
    "broadcast",
    "unary",
    "channel_affine",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "mean",
    "amax",
    "softmax",
    "concat",
    "slice_axis",
    "transpose",
    "copy",
    "matmul",
    "layer_norm",
    "gelu",
    "embedding",
    "CHAIN_OPS",
    "ChainOp",
    "ChainQuantize",
    "elementwise_chain",
]

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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
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


def _activation(value, act: str, clip_lo, clip_hi):
    """The interpreter's ``_activation``: relu = max(y, 0); clip = min(max(y, lo), hi)."""
    if act == "relu":
        return tirx.Max(value, _f32(0.0))
    if act == "clip":
        return tirx.Min(tirx.Max(value, _f32(clip_lo)), _f32(clip_hi))
    return value


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


def _prim_func(params: Sequence[tuple[str, tuple, str]], body: Callable) -> tirx.PrimFunc:
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


# --------------------------------------------------------------------------------------------
# Quantize / dequantize / epilogue
# --------------------------------------------------------------------------------------------
def _levels(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8 (uint8 codes), got {bits}")
    return 2**bits - 1


def _emit_abs_max(x_flat, n: int, scale):
    """``scale[0] = max(|x|)`` (0 for an all-zero tensor).

    Two stages: parallel tasks each keep 64 running maxima in registers (4 independent zmm
    chains) over a contiguous range, then a short serial pass folds the partials and the
    elements that do not fill a 64-wide unit.  Max is exact in any order.
    """
    unit = 4 * LANES
    units, remainder = divmod(n, unit)
    I.buffer_store(scale, _f32(0.0), [0])
    if units:
        tasks = min(units, max(1, -(-n // 65536)))
        per_task = -(-units // tasks)
        tasks = -(-units // per_task)
        partial = I.alloc_buffer((tasks * unit,), F32, scope="global")
        with _parallel_or_serial(tasks, n) as task:
            running = _local((unit,))
            with I.vectorized(0, unit) as lane:
                I.buffer_store(running, _f32(0.0), [lane])
            with I.serial(0, tirx.min(per_task, units - task * per_task)) as u:
                with I.vectorized(0, unit) as lane:
                    value = tirx.abs(x_flat[(task * per_task + u) * unit + lane])
                    I.buffer_store(running, tirx.Max(running[lane], value), [lane])
            with I.vectorized(0, unit) as lane:
                I.buffer_store(partial, running[lane], [task * unit + lane])
        with I.serial(0, tasks * unit) as i:
            I.buffer_store(scale, tirx.Max(scale[0], partial[i]), [0])
    if remainder:
        with I.serial(0, remainder) as i:
            I.buffer_store(scale, tirx.Max(scale[0], tirx.abs(x_flat[units * unit + i])), [0])


def _emit_channel_abs_max(shape, axis: int, value_at: Callable, scale) -> None:
    """``scale[0] = max |value_at(i, c)|`` over a tensor (flat index, channel), 0 when empty of
    nonzeros: the rows of :func:`_for_each_channel` are parallel tasks, each keeping 16
    running maxima, then a short serial fold of the partials (max is exact in any order)."""
    _, outer, channels, inner = _channel_view(shape, axis)
    if inner >= LANES:
        rows, row_len = outer * channels, inner

        def index(row, col):
            return row * inner + col, row % channels
    else:
        rows, row_len = outer, channels * inner

        def index(row, col):
            return row * row_len + col, col // inner if inner > 1 else col
    full, tail = divmod(row_len, LANES)
    partial = I.alloc_buffer((rows * LANES,), F32, scope="global")
    with _parallel_or_serial(rows, rows * row_len) as row:
        running = _local((LANES,))
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(running, _f32(0.0), [lane])
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    value = tirx.abs(value_at(*index(row, v * LANES + lane)))
                    I.buffer_store(running, tirx.Max(running[lane], value), [lane])
        if tail:
            with I.vectorized(0, tail) as lane:
                value = tirx.abs(value_at(*index(row, full * LANES + lane)))
                I.buffer_store(running, tirx.Max(running[lane], value), [lane])
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(partial, running[lane], [row * LANES + lane])
    # the rows' partial maxima a vector at a time, then the 16 lanes (a scalar max per partial
    # was a 4-cycle chain of rows * 16 links: ~3 us at 160 channels)
    folded = _local((LANES,))
    with I.vectorized(0, LANES) as lane:
        I.buffer_store(folded, _f32(0.0), [lane])
    with I.serial(0, rows) as r:
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(folded, tirx.Max(folded[lane], partial[r * LANES + lane]), [lane])
    I.buffer_store(scale, _f32(0.0), [0])
    with I.serial(0, LANES) as lane:
        I.buffer_store(scale, tirx.Max(scale[0], folded[lane]), [0])


def _emit_channel_abs_max_of_monotone(shape, axis: int, scan_dtype: str, scan_at: Callable, acc_of: Callable,
                                      value_of: Callable, scale, extremes=None) -> None:
    """``scale[0] = max |value_of(acc_of(scan_at(i, c), c), c)|`` where ``acc_of(., c)`` and
    ``value_of(., c)`` are monotone for each channel c (NCHW rows of one channel, at least a
    vector wide): the extremes of |value| are at the row's smallest and largest scanned values,
    so the pass over the tensor is an integer min / max (two instructions a vector), and
    ``acc_of`` and ``value_of`` run on each row's two extremes, 16 rows a vector after the scan
    (in the scan, as scalars with their divides, they were half of a 7x7 layer's pass). Exact:
    the max is over values the elementwise pass computes, and every other element's lies
    between them.

    ``scan_at`` may read the stored accumulator as it is (int16 storage: 32 lanes a vector, no
    widening) when ``acc_of`` turns it into the accumulator by an increasing map (widening,
    less a per-channel constant). ``extremes`` (int32 ``[2 * rows]``, optional): where the rows'
    smallest, then largest, scanned values are kept, for a codes pass that searches between them."""
    _, outer, channels, inner = _channel_view(shape, axis)
    lanes = max(LANES, 64 // np.dtype(scan_dtype).itemsize)  # a zmm register of narrow integers
    rows, (full, tail) = outer * channels, divmod(inner, lanes)
    info = np.iinfo(scan_dtype)
    if extremes is None:
        extremes = I.alloc_buffer((rows * 2,), "int32", scope="global")
    with _parallel_or_serial(rows, rows * inner) as row:
        low, high = _local((lanes,), scan_dtype), _local((lanes,), scan_dtype)
        with I.vectorized(0, lanes) as lane:
            I.buffer_store(low, tirx.const(int(info.max), scan_dtype), [lane])
            I.buffer_store(high, tirx.const(int(info.min), scan_dtype), [lane])
        for count, start in ((full, None), (tail, full * lanes)):
            if not count:
                continue
            with (I.serial(0, count) if start is None else I.serial(0, 1)) as v:
                with I.vectorized(0, lanes if start is None else count) as lane:
                    col = v * lanes + lane if start is None else start + lane
                    scanned = scan_at(row * inner + col, row % channels)
                    I.buffer_store(low, tirx.Min(low[lane], scanned), [lane])
                    I.buffer_store(high, tirx.Max(high[lane], scanned), [lane])
        width = lanes // 2  # fold the lanes in halves (a lane at a time: ~4 instructions and a branch each)
        while width:
            with I.vectorized(0, width) as lane:
                I.buffer_store(low, tirx.Min(low[lane], low[lane + width]), [lane])
                I.buffer_store(high, tirx.Max(high[lane], high[lane + width]), [lane])
            width //= 2
        I.buffer_store(extremes, tirx.Cast("int32", low[0]), [row])
        I.buffer_store(extremes, tirx.Cast("int32", high[0]), [rows + row])
    running = _local((LANES,))
    with I.vectorized(0, LANES) as lane:
        I.buffer_store(running, _f32(0.0), [lane])

    def fold(r, lane):
        c = r % channels if outer > 1 else r
        low, high = (tirx.Cast(scan_dtype, extremes[k * rows + r]) for k in (0, 1))
        I.buffer_store(running, tirx.Max(running[lane], tirx.Max(tirx.abs(value_of(acc_of(low, c), c)),
                                                                 tirx.abs(value_of(acc_of(high, c), c)))), [lane])

    full_rows, tail_rows = divmod(rows, LANES)
    if full_rows:
        with I.serial(0, full_rows) as v:
            with I.vectorized(0, LANES) as lane:
                fold(v * LANES + lane, lane)
    if tail_rows:
        with I.vectorized(0, tail_rows) as lane:
            fold(full_rows * LANES + lane, lane)
    I.buffer_store(scale, _f32(0.0), [0])
    with I.serial(0, LANES) as lane:
        I.buffer_store(scale, tirx.Max(scale[0], running[lane]), [0])


def quantize(shape: Sequence[int], bits: int, static_scale: float, signed: bool,
             offset: bool = False) -> tirx.PrimFunc:
    """The interpreter's ``_quantize`` as a kernel.

    Parameters: ``x: float32[shape], scale: float32[1], codes_pos: uint8[shape]`` and, when
    ``signed``, ``codes_neg: uint8[shape]``.  ``scale`` is written with ``S``; codes are the
    magnitudes ``round_half_even((|x| * L) / S)`` where ``x > 0`` (pos) / ``x < 0`` (neg), 0
    elsewhere, clamped to ``L`` when the scale is static.  Unsigned activations (``x >= 0`` by
    the IR) have only ``codes_pos``.

    ``offset`` (signed only, ``bits <= 7``): a single ``codes`` output holding the signed code
    plus ``L``, in ``[0, 2L]``, so a layer multiplies once instead of once per sign.
    """
    shape = tuple(int(s) for s in shape)
    levels = _levels(bits)
    if offset and not (signed and bits <= 7):
        raise ValueError(f"offset codes need signed activations of at most 7 bits (2L must fit uint8), got {bits}")
    n = _prod(shape)
    params = [("x", shape, F32), ("scale", (1,), F32), ("codes_pos", shape, "uint8")]
    if signed and not offset:
        params.append(("codes_neg", shape, "uint8"))

    def body(x, scale, codes_pos, codes_neg=None):
        _emit_quantize(_flat(x), n, levels, static_scale, offset, scale, codes_pos, codes_neg)

    return _prim_func(params, body)


def _emit_quantize(x_flat, n: int, levels: int, static_scale: float, offset: bool, scale, codes_pos,
                   codes_neg=None) -> None:
    """:func:`quantize`'s statements on the flat ``x_flat`` (``n`` elements)."""
    is_static = static_scale > 0
    pos_flat = _flat(codes_pos)
    neg_flat = _flat(codes_neg) if codes_neg is not None else None
    if is_static:
        I.buffer_store(scale, _f32(static_scale), [0])
    else:
        _emit_abs_max(x_flat, n, scale)
    divisor = _divisor_of(scale, static_scale, levels + 1, levels)

    def codes_by(fast: _Divisor | None):
        _for_each(1, n, lambda _row, i: _store_codes(x_flat[i], i, scale, levels, is_static, offset, pos_flat,
                                                     neg_flat, fast))

    def codes(fast: bool):
        if fast and not is_static and _split_form_pays(n, levels):
            _on_split_form(divisor, levels, codes_by)
        else:
            codes_by(divisor if fast else None)

    _on_divisor_range(scale[0], codes, n >= _QUOTIENT_MIN_ELEMENTS)


def _emit_fold(x_flat, n: int, out, combine) -> None:
    """``out[0] = combine(0, x[0], x[1], ...)`` (min or max, exact in any order), serial but
    vectorized: 64 running values in registers, folded at the end."""
    unit = 4 * LANES
    units, remainder = divmod(n, unit)
    I.buffer_store(out, _f32(0.0), [0])
    if units:
        running = _local((unit,))
        with I.vectorized(0, unit) as lane:
            I.buffer_store(running, _f32(0.0), [lane])
        with I.serial(0, units) as u:
            with I.vectorized(0, unit) as lane:
                I.buffer_store(running, combine(running[lane], x_flat[u * unit + lane]), [lane])
        with I.serial(0, unit) as lane:
            I.buffer_store(out, combine(out[0], running[lane]), [0])
    if remainder:
        with I.serial(0, remainder) as i:
            I.buffer_store(out, combine(out[0], x_flat[units * unit + i]), [0])


def quantize_asymmetric(shape: Sequence[int], bits: int, static_scale: float, zero_point: int,
                        centered: bool = False, offset: bool = False) -> tirx.PrimFunc:
    """The interpreter's ``_quantize_asymmetric`` as a kernel.

    Parameters: ``x: float32[shape], scale: float32[1], zero_point: int32[1], codes_pos:
    uint8[shape]`` and, when ``centered``, ``codes_neg: uint8[shape]``.  ``scale`` is written
    with ``R`` (static, or ``max(x, 0) - min(x, 0)``), ``zero_point`` with ``zp`` (static, or
    ``round((-lo * L) / R)``), the codes with ``u = clamp(round((x * L) / R) + zp, 0, L)``
    (0 where ``R == 0``), or, ``centered``, with the magnitudes of ``u - zp`` where it is
    positive (pos) / negative (neg), the layout of signed symmetric codes, or, ``offset`` (up to
    7 bits), with ``u - zp + L``: signed offset codes in one buffer.
    """
    if offset and (centered or bits > 7):
        raise ValueError("offset codes u - zp + L are one buffer of up to 7 bits")
    shape = tuple(int(s) for s in shape)
    levels = _levels(bits)
    static_zero_point = int(zero_point)  # the PrimFunc has a buffer parameter of the same name
    n = _prod(shape)
    params = [("x", shape, F32), ("scale", (1,), F32), ("zero_point", (1,), "int32"), ("codes_pos", shape, "uint8")]
    if centered:
        params.append(("codes_neg", shape, "uint8"))

    def body(x, scale, zero_point, codes_pos, codes_neg=None):
        _emit_quantize_asymmetric(_flat(x), n, levels, static_scale, static_zero_point, scale, zero_point,
                                  codes_pos, codes_neg, offset)

    return _prim_func(params, body)


def _emit_quantize_asymmetric(x_flat, n: int, levels: int, static_scale: float, static_zero_point: int, scale,
                              zero_point, codes_pos, codes_neg=None, offset: bool = False) -> None:
    """:func:`quantize_asymmetric`'s statements on the flat ``x_flat`` (``n`` elements)."""
    is_static = static_scale > 0
    pos_flat = _flat(codes_pos)
    neg_flat = _flat(codes_neg) if codes_neg is not None else None
    zp = _local((1,))
    if is_static:
        I.buffer_store(scale, _f32(static_scale), [0])
        I.buffer_store(zp, _f32(static_zero_point), [0])
    else:
        lo, hi = _local((1,)), _local((1,))
        _emit_fold(x_flat, n, lo, tirx.Min)
        _emit_fold(x_flat, n, hi, tirx.Max)
        I.buffer_store(scale, hi[0] - lo[0], [0])
        # exactly the interpreter's (-lo * L) / R, rounded half to even; R read back from its buffer
        zp_value = tirx.round((-lo[0] * _f32(levels)) / scale[0])
        I.buffer_store(zp, tirx.Select(scale[0] > _f32(0.0), zp_value, _f32(0.0)), [0])
    I.buffer_store(zero_point, tirx.Cast("int32", zp[0]), [0])
    # a static scale's codes need rint(x L / S) exactly up to |2L + 1| (beyond, any zero point
    # clamps them alike), on both signs: the forms are odd functions of the numerator
    divisor = _divisor_of(scale, static_scale, 2 * levels + 2, 2 * levels + 1)

    def emit(_row, i, fast: bool):
        numerator = x_flat[i] * _f32(levels)
        if fast:  # |x L / R| beyond 2L + 2 clamps to the same code: keep the quotient in range
            numerator = tirx.Min(tirx.Max(_rounded(numerator), -divisor.bound), divisor.bound)
            u = tirx.round(_code_quotient(numerator, divisor)) + zp[0]
        else:
            u = tirx.round(numerator / scale[0]) + zp[0]
        u = tirx.Select(scale[0] > _f32(0.0), tirx.Min(tirx.Max(u, _f32(0.0)), _f32(levels)), _f32(0.0))
        if offset:  # u - zp + L, in [0, 2L]
            I.buffer_store(pos_flat, tirx.Cast("uint8", u - zp[0] + _f32(levels)), [i])
            return
        if neg_flat is None:
            I.buffer_store(pos_flat, tirx.Cast("uint8", u), [i])
            return
        v = u - zp[0]  # integers below 2^24: exact in float32
        I.buffer_store(pos_flat, tirx.Cast("uint8", tirx.Max(v, _f32(0.0))), [i])
        I.buffer_store(neg_flat, tirx.Cast("uint8", tirx.Max(-v, _f32(0.0))), [i])

    _on_divisor_range(scale[0], lambda fast: _for_each(1, n, lambda row, i: emit(row, i, fast)),
                      n >= _QUOTIENT_MIN_ELEMENTS)


@dataclass(frozen=True)
class _Divisor:
    """A scale ``S`` as :func:`_store_codes` divides by it without a divide: ``S``, ``RN(1 / S)``
    and ``RN(k * S)`` (the clamp bound, ``k = L + 1`` or ``2L + 2``), as expressions; for a
    static scale, ``form``: how its codes are computed (``reciprocal.code_form``, proved per
    scale) and ``low``, the reciprocal's low part for the ``split`` form (a constant; for a
    run-time scale proved in the kernel, :func:`_on_split_form`, an expression)."""

    value: tirx.PrimExpr
    recip: tirx.PrimExpr
    bound: tirx.PrimExpr
    form: str = "quotient"
    low: float | tirx.PrimExpr = 0.0


def _divisor_of(scale, static_scale: float, bound_factor: int, levels: int | None = None) -> _Divisor:
    """``scale[0]``'s :class:`_Divisor`: constants for a static scale (``scale`` holds it too),
    else computed once into a local (inf for a zero scale, unused then). ``levels``: the
    largest code magnitude whose rounding must be exact, where the bound is ``(levels + 1) S``:
    a static scale then gets the cheapest exact form (:func:`_code_quotient`)."""
    if static_scale > 0:
        s = np.float32(static_scale)
        form = code_form(float(s), levels) if levels is not None and bound_factor == levels + 1 else "quotient"
        low = reciprocal_parts(float(s))[1] if form == "split" else 0.0
        return _Divisor(_f32(s), _f32(np.float32(1.0) / s), _f32(np.float32(bound_factor) * s), form, low)
    parts = _local((2,))
    I.buffer_store(parts, _f32(1.0) / scale[0], [0])
    I.buffer_store(parts, _f32(bound_factor) * scale[0], [1])
    return _Divisor(scale[0], parts[0], parts[1])


# A dynamic scale's codes in the split form (a multiply and an FMA, against a multiply and four
# FMAs for the correctly rounded quotient), where the run proves it first: from this many elements
# per code (the proof bisects 32 steps per code; 4-bit codes of 4096 elements and more)
_SPLIT_FORM_ELEMENTS_PER_CODE = 256


def _split_form_pays(n: int, levels: int) -> bool:
    return n >= _SPLIT_FORM_ELEMENTS_PER_CODE * (levels + 1)


def _emit_split_form_proof(divisor: _Divisor, levels: int) -> tuple[tirx.Buffer, tirx.PrimExpr]:
    """``(proven, low)`` for a run-time scale ``S`` (``divisor``, with ``RN(1 / S)`` and
    ``RN((L + 1) S)``): ``low = RN(1 / S - RN(1 / S))`` (the FMA's residual ``1 - RN(1/S) S`` is
    exact, divided by ``S``), and a local ``int32[1]`` that is 1 where the split form's codes
    (``reciprocal``: ``roundeven(RN(n * zh + RN(n * low)))``) equal the divide's for every float32
    ``n`` in ``[0, RN((L + 1) S)]``, else 0: ``reciprocal.code_form``'s proof, run on this call's
    scale. Both are non-decreasing step functions of ``n``, so they are equal exactly where each
    code ``k = 1..L+1`` is first reached at the same ``n``, found per ``k`` (16 lanes at a time) by
    bisection over the float32 bit patterns, 32 steps, for each form. Random scales pass it
    (numpy, 300 per width from 1 to 8 bits); one multiply alone passes for 13% at 4 bits."""
    parts = _local((2,))
    I.buffer_store(parts, _fma(-divisor.recip, divisor.value, _f32(1.0)), [0])
    I.buffer_store(parts, parts[0] / divisor.value, [1])
    low = parts[1]
    split = dataclasses.replace(divisor, form="split", low=low)
    proven = _local((1,), "int32")
    I.buffer_store(proven, tirx.const(1, "int32"), [0])
    codes = levels + 1
    bound_bits = tirx.reinterpret("int32", divisor.bound)
    for block in range(-(-codes // LANES)):
        first = {form: _local((LANES,), "int32") for form in ("divide", "split")}
        after = {form: _local((LANES,), "int32") for form in ("divide", "split")}  # lo, hi of the bisection
        with I.vectorized(0, LANES) as lane:
            for form in first:
                I.buffer_store(first[form], tirx.const(0, "int32"), [lane])
                I.buffer_store(after[form], bound_bits + 1, [lane])
        with I.serial(0, 32):
            with I.vectorized(0, LANES) as lane:
                k = tirx.min(block * LANES + lane + 1, codes)
                for form in first:
                    lo, hi = first[form][lane], after[form][lane]
                    mid = lo + tirx.shift_right(hi - lo, 1)
                    n = tirx.reinterpret(F32, tirx.min(mid, bound_bits))
                    quotient = n / divisor.value if form == "divide" else _code_quotient(n, split)
                    reached = tirx.all(_round_to_int(quotient) >= k, mid <= bound_bits)
                    I.buffer_store(after[form], tirx.Select(tirx.all(lo < hi, reached), mid, hi), [lane])
                    I.buffer_store(first[form], tirx.Select(tirx.all(lo < hi, tirx.Not(reached)), mid + 1, lo), [lane])
        with I.serial(0, LANES) as lane:
            with I.If(first["divide"][lane] != first["split"][lane]):
                with I.Then():
                    I.buffer_store(proven, tirx.const(0, "int32"), [0])
    return proven, low


def _on_split_form(divisor: _Divisor, levels: int, emit: Callable[[_Divisor], None]) -> None:
    """``emit`` with ``divisor`` in its split form where this run's scale passes
    :func:`_emit_split_form_proof`, with ``divisor`` itself otherwise (both are code; one runs)."""
    proven, low = _emit_split_form_proof(divisor, levels)
    with I.If(proven[0] != 0):
        with I.Then():
            emit(dataclasses.replace(divisor, form="split", low=low))
        with I.Else():
            emit(divisor)


def _code_quotient(numerator, divisor: _Divisor) -> tirx.PrimExpr:
    """``numerator / S`` as far as its rounded code goes: the divide's quotient (``_divided``),
    or for a static ``S`` the cheaper form ``reciprocal.code_form`` proved to give the same
    codes for every numerator the caller clamps to ``[-bound, bound]``."""
    if divisor.form == "single":
        return numerator * divisor.recip
    if divisor.form == "split":
        low = _f32(divisor.low) if isinstance(divisor.low, float) else divisor.low
        return _fma(numerator, divisor.recip, _rounded(numerator * low))
    return _divided(numerator, divisor.value, divisor.recip)


def _code_magnitude(value, scale, levels: int, clamp: bool, fast: _Divisor | None) -> tirx.PrimExpr:
    """int32 ``roundeven(min(|value| * L / S, L))`` (``min`` where ``clamp``), as :func:`_store_codes`
    stores it: exactly the interpreter's float32 ops, ``(|x| * L) / S``, then round half to even."""
    numerator = tirx.abs(value) * _f32(levels)
    if fast is None:
        quotient = numerator / scale[0]
    else:
        if clamp:  # beyond (L + 1) S the code is L either way: no overflow in _quotient
            numerator = tirx.Min(_rounded(numerator), fast.bound)
        quotient = _code_quotient(numerator, fast)
    if clamp:  # min(roundeven(q), L) is roundeven(min(q, L)) for an integer L, and in int32's range
        quotient = tirx.Min(quotient, _f32(levels))
    return _round_to_int(quotient)  # at most L + 1 (a dynamic S is at least |x|)


def _signed_code(value, scale, levels: int, clamp: bool, fast: _Divisor | None, signed: bool) -> tirx.PrimExpr:
    """The code :func:`_store_codes` stores for ``value`` as one int32: ``pos - neg`` (offset codes
    less ``L``), or ``pos`` alone for unsigned codes (a negative value's code is 0)."""
    magnitude = _code_magnitude(value, scale, levels, clamp, fast)
    zero = tirx.const(0, "int32")
    positive = tirx.Select(value > _f32(0.0), magnitude, zero)
    return tirx.Select(value < _f32(0.0), zero - magnitude, positive) if signed else positive


def _store_codes(value, i, scale, levels: int, clamp: bool, offset: bool, pos_flat, neg_flat,
                 fast: _Divisor | None = None, nonnegative: bool = False) -> None:
    """Store the codes of ``value`` at flat index ``i`` (``quantize``'s layout: see there);
    ``fast`` (S's :class:`_Divisor` with ``k = L + 1``, where the caller checked S's range)
    divides without a divide. ``nonnegative``: ``value >= 0`` by construction (after a relu or
    a clip from 0 up), so where ``fast`` holds (``S > 0``: a zero value's code is 0 already)
    the sign tests are left out."""
    # Exactly the interpreter's float32 ops: (|x| * L) / S, then round half to even
    # (_round_to_int).  S is read back from the buffer so no constant folding can
    # turn the division into a reciprocal multiply.  With a dynamic S == 0 every x is
    # +-0, so the x > 0 / x < 0 selects below already give 0 (the NaN is never used).
    magnitude = _code_magnitude(value, scale, levels, clamp, fast)
    zero = tirx.const(0, "int32")
    if nonnegative and fast is not None:
        code = tirx.const(levels, "int32") + magnitude if offset else magnitude
        I.buffer_store(pos_flat, tirx.Cast("uint8", code), [i])
        if neg_flat is not None:
            I.buffer_store(neg_flat, tirx.Cast("uint8", zero), [i])
        return
    if offset:
        center = tirx.const(levels, "int32")
        code = tirx.Select(value > _f32(0.0), center + magnitude,
                           tirx.Select(value < _f32(0.0), center - magnitude, center))
        I.buffer_store(pos_flat, tirx.Cast("uint8", code), [i])
        return
    I.buffer_store(pos_flat, tirx.Cast("uint8", tirx.Select(value > _f32(0.0), magnitude, zero)), [i])
    if neg_flat is not None:
        I.buffer_store(neg_flat, tirx.Cast("uint8", tirx.Select(value < _f32(0.0), magnitude, zero)), [i])


def dequantize(shape: Sequence[int], bits: int, signed: bool = False, offset: bool = False) -> tirx.PrimFunc:
    """``QValue.dequantize``: ``y = (float32(code) * S) / L``.

    Parameters: ``codes: uint8[shape], scale: float32[1], y: float32[shape]``, or when
    ``signed``: ``codes_pos, codes_neg, scale, y`` (``code = pos - neg``); with ``offset``
    (offset codes from ``quantize(..., offset=True)``) one ``codes`` buffer, ``code = codes - L``.
    """
    shape = tuple(int(s) for s in shape)
    levels = _levels(bits)
    two_parts = signed and not offset
    code_params = [("codes_pos", shape, "uint8"), ("codes_neg", shape, "uint8")] if two_parts else [("codes", shape, "uint8")]
    params = code_params + [("scale", (1,), F32), ("y", shape, F32)]

    def body(*buffers):
        *codes, scale, y = buffers
        code_flats = [_flat(c) for c in codes]
        y_flat = _flat(y)

        def emit(_row, i, fast: bool):
            code = tirx.Cast("int32", code_flats[0][i])
            if two_parts:
                code = code - tirx.Cast("int32", code_flats[1][i])
            elif offset:
                code = code - tirx.const(levels, "int32")
            value = _divided(tirx.Cast(F32, code) * scale[0], _f32(levels), _levels_reciprocal(levels) if fast else None)
            I.buffer_store(y_flat, value, [i])

        n = _prod(shape)
        _on_divisor_range(scale[0], lambda fast: _for_each(1, n, lambda row, i: emit(row, i, fast)),
                          n >= _QUOTIENT_MIN_ELEMENTS and levels > 1)

    return _prim_func(params, body)


def _less_offset(acc, c, named: dict, acc_dtype: str) -> tirx.PrimExpr:
    """Accumulator ``acc`` of channel ``c`` from the (widened) product: less the per-channel offset
    term of offset codes (``acc_offset``), or the zero point times the weight sums."""
    if "zero_point" in named:
        return acc - tirx.Cast(acc_dtype, named["zero_point"][0]) * named["acc_offset"][c]
    if "acc_offset" in named:
        return acc - named["acc_offset"][c]
    return acc


def _layer_value(acc, c, named: dict, levels: int | None, act: str, clip_lo: float, clip_hi: float,
                 fast: bool) -> tirx.PrimExpr:
    """A quantized layer's float y (before any residual) from accumulator ``acc`` of channel ``c``
    (``named``: the epilogue's ``scale``, ``mult`` and ``add`` buffers): monotone in ``acc`` for a
    fixed channel (every step rounds monotonically, mult[c]'s sign fixes the direction, relu / clip
    are monotone). ``fast``: the scale lies where :func:`_quotient` may replace the divide by L."""
    if levels is None:
        value = acc
    else:
        value = _divided(tirx.Cast(F32, acc) * named["scale"][0], _f32(levels),
                         _levels_reciprocal(levels) if fast else None)
    value = value * named["mult"][c]
    if named.get("add") is not None:
        value = _rounded(value) + named["add"][c]
    return _activation(value, act, clip_lo, clip_hi)


@dataclass(frozen=True)
class TileEpilogue:
    """:func:`epilogue`'s float chain for a kernel that applies it to accumulators still in the
    core (``amx.amx_dense`` with an epilogue): int32 accumulators, a float ``y`` out, no split
    signs, fused output codes or residual. The kernel takes :meth:`params` (the epilogue's, less
    ``acc`` and ``y``) and computes each ``y`` with :meth:`value`: the same expression, so the
    same bits."""

    levels: int
    act: str = "none"
    clip_lo: float = 0.0
    clip_hi: float = 0.0
    has_add: bool = False
    has_offset: bool = False
    has_zero_point: bool = False

    def __post_init__(self):
        _check_act(self.act)
        if self.levels not in {2**bits - 1 for bits in range(1, 9)}:
            raise ValueError(f"levels must be 2^bits - 1 for 1..8 bits, got {self.levels}")
        if self.has_zero_point and not self.has_offset:
            raise ValueError("a zero point needs the weight sums (has_offset)")

    def params(self, channels: int) -> list[tuple[str, tuple, str]]:
        """``(name, shape, dtype)`` in :func:`epilogue`'s order: acc_offset, scale, zero_point, mult, add."""
        params = [("acc_offset", (channels,), "int32")] if self.has_offset else []
        params.append(("scale", (1,), F32))
        if self.has_zero_point:
            params.append(("zero_point", (1,), "int32"))
        params.append(("mult", (channels,), F32))
        if self.has_add:
            params.append(("add", (channels,), F32))
        return params

    def value(self, acc, c, named: dict, fast: bool) -> tirx.PrimExpr:
        """Float ``y`` of int32 accumulator ``acc`` (the raw product) of channel ``c``."""
        return _layer_value(_less_offset(acc, c, named, "int32"), c, named, self.levels, self.act, self.clip_lo,
                            self.clip_hi, fast)

    def on_scale_range(self, named: dict, emit: Callable[[bool], None]) -> None:
        """``emit(fast)`` where the run-time scale allows the divide-free quotient (see :func:`epilogue`)."""
        _on_divisor_range(named["scale"][0], emit, enabled=self.levels > 1)


def epilogue(shape: Sequence[int], channel_axis: int, levels: int | None, act: str, clip_lo: float,
             clip_hi: float, has_add: bool, acc_dtype: str = "int32", has_neg: bool = False,
             has_offset: bool = False, out_bits: int | None = None, out_scale: float = 0.0,
             out_signed: bool = False, out_offset: bool = False, has_zero_point: bool = False,
             has_residual: bool = False, post_act: str = "none", post_lo: float = 0.0, post_hi: float = 0.0,
             keep_y: bool = False, acc_storage: str | None = None, code_search: int = 0,
             code_form: bool = False, dynamic_search: bool = False) -> tirx.PrimFunc:
    """Float epilogue of a quantized layer (the tail of the interpreter's ``_quant_layer``).

    Parameters, in order: ``acc: acc_dtype[shape]``, ``acc_neg`` (same, when ``has_neg``),
    ``acc_offset: acc_dtype[C]`` (when ``has_offset``: the product of offset activation codes
    carries ``L * sum_k q[c, k]`` per output channel, subtracted here in integers),
    ``scale: float32[1]`` (when ``levels`` is not None), ``zero_point: int32[1]`` (when
    ``has_zero_point``: asymmetric activation codes; ``acc_offset`` then holds the weight sums
    and ``acc - zero_point * acc_offset[c]`` is the accumulator), ``mult: float32[C]``,
    ``add: float32[C]`` (when ``has_add``), ``y: float32[shape]``; ``C = shape[channel_axis]``.

    ``acc_storage`` ``int16``: ``acc`` (and ``acc_neg``) are stored narrowed from int32 (the
    producer's outputs fit; see ``csqc.targets.tvm.lower``) and widened as they are read.

    ``levels`` is ``L = 2^bits - 1`` of the input activation:
    ``y = ((float32(acc - acc_neg) * S) / L) * mult[c] + add[c]``, then ``act``.
    ``levels=None`` is a float-input layer: ``acc`` is float32 and ``y = acc * mult[c] + add[c]``.

    ``out_bits`` (fused output quantization, ``csqc.ir``): instead of ``y`` the kernel writes
    ``out_scale: float32[1]`` (the static ``S'``) and ``y``'s codes exactly as
    ``quantize(shape, out_bits, out_scale, out_signed, out_offset)`` lays them out
    (``codes_pos`` and, signed without ``out_offset``, ``codes_neg``), from the same float32 ``y``.
    ``out_scale=0`` is a dynamic scale: a first pass computes ``S' = max|y|``, a second the
    codes, both from the accumulators, so the float ``y`` is never written nor read back;
    except with ``keep_y`` or ``has_residual``, where the first pass stores every ``y`` (into
    ``y``, or a scratch buffer) and the second reads it instead of computing it again.

    ``has_residual`` (a residual block's ``add``, then ``post_act``, fused into the layer that
    feeds it): a ``residual: float32[shape]`` parameter follows ``add``, and
    ``y = post_act(y_layer + residual)`` in the interpreter's float32 order (``y_layer`` rounded
    first, as the separate ``add`` kernel would read it). ``keep_y`` with ``out_bits``: the
    kernel writes the float ``y`` (before ``out_scale``) as well as its codes, for readers of
    the float tensor (the next block's residual).

    ``code_search`` (> 0: static input and output scales; one int32 accumulator per element,
    stored as int16 or int32; no residual, no kept ``y``; channels on rows of at least 32
    elements): the codes come from a binary search of ``code_search`` steps over per-channel
    integer thresholds instead of the float chain (``csqc.targets.tvm.code_thresholds``;
    parameters ``code_thresholds: int16[C * E + 32 - E]`` (``E = 2**code_search - 1`` per
    channel, then padding), ``code_base: int8[C]``, ``acc_flip: int8[C]`` follow ``add``; int32
    storage needs tables built ``wide``). 32 int16 lanes a vector and one ``vpermw`` a step. The
    same codes, bit for bit: the thresholds are the float chain's own steps.

    ``code_form`` (the same conditions): each channel's staircase as proved fixed-point int16
    arithmetic instead of the search (``code_thresholds.code_form``: clamp, lower, shift,
    ``vpmulhw``, add, shift, then ``+ code_base``); parameters ``code_form: int16[C * FORM_FIELDS]``,
    ``code_base: int8[C]`` and ``acc_flip: int8[C]`` follow ``add``. The same codes, bit for bit.

    ``dynamic_search`` (a dynamic output scale; :func:`dynamic_search_fits` says where): the codes
    pass finds each row's thresholds itself once the scale is known, and searches them as
    ``code_search`` does (:func:`_emit_dynamic_code_search`). No parameters change.
    """
    _check_act(act)
    _check_act(post_act)
    if post_act != "none" and not has_residual:
        raise ValueError("post_act applies after a residual add (has_residual)")
    shape = tuple(int(s) for s in shape)
    _, _, channels, _ = _channel_view(shape, channel_axis)
    if levels is None:
        acc_dtype, has_neg, has_offset = F32, False, False
    elif acc_dtype not in ("int32", "int64"):
        raise ValueError(f"acc_dtype must be int32 or int64, got {acc_dtype}")
    if has_neg and has_offset:
        raise ValueError("an accumulator is split by sign or offset, not both")
    if has_zero_point and not has_offset:
        raise ValueError("a zero point needs the weight sums (has_offset)")
    storage = acc_storage or acc_dtype
    if storage != acc_dtype and (storage, acc_dtype) != ("int16", "int32"):
        raise ValueError(f"accumulators computed in {acc_dtype} can be stored as int16 (from int32) only, "
                         f"not {storage}")
    params = [("acc", shape, storage)]
    if has_neg:
        params.append(("acc_neg", shape, storage))
    if has_offset:
        params.append(("acc_offset", (channels,), acc_dtype))
    if levels is not None:
        params.append(("scale", (1,), F32))
    if has_zero_point:
        params.append(("zero_point", (1,), "int32"))
    params.append(("mult", (channels,), F32))
    if has_add:
        params.append(("add", (channels,), F32))
    if code_search and code_form:
        raise ValueError("a layer's codes come from its search or its fixed-point form, not both")
    if code_search or code_form:
        _check_code_search(shape, channel_axis, levels, out_bits, out_scale, storage, has_neg, has_zero_point,
                           has_residual, keep_y, code_search or 1)
    if dynamic_search and not dynamic_search_fits(shape, channel_axis, levels, out_bits, out_scale, out_signed,
                                                  storage, has_neg, has_residual, keep_y):
        raise ValueError("dynamic_search needs a dynamic output scale of at most 5 search steps, one int16 or "
                         "int32 accumulator per element (no negative part, residual or kept y) and rows of "
                         f"at least {DYNAMIC_SEARCH_MIN_ROW} elements of one channel")
    if code_search:
        entries = 2**code_search - 1
        params += [("code_thresholds", (channels * entries + SEARCH_LANES - entries,), "int16"),
                   ("code_base", (channels,), "int8"), ("acc_flip", (channels,), "int8")]
    elif code_form:
        params += [("code_form", (channels * FORM_FIELDS,), "int16"), ("code_base", (channels,), "int8"),
                   ("acc_flip", (channels,), "int8")]
    if has_residual:
        params.append(("residual", shape, F32))
    if out_bits is None or keep_y:
        params.append(("y", shape, F32))
    if out_bits is not None:
        out_levels = _levels(out_bits)
        if not out_scale >= 0 or (out_offset and not (out_signed and out_bits <= 7)):
            raise ValueError("fused output quantization needs a static scale > 0 or 0 for a dynamic one "
                             "(and offset codes signed, <= 7 bits)")
        params += [("out_scale", (1,), F32), ("codes_pos", shape, "uint8")]
        if out_signed and not out_offset:
            params.append(("codes_neg", shape, "uint8"))

    def body(*buffers):
        named = dict(zip([p[0] for p in params], buffers))
        acc_flat = _flat(named["acc"])
        y_flat = _flat(named["y"]) if "y" in named else None
        residual_flat = _flat(named["residual"]) if has_residual else None
        neg_flat = _flat(named["acc_neg"]) if has_neg else None
        acc_offset = named.get("acc_offset")
        mult, add = named["mult"], named.get("add")

        def widened(stored):
            return stored if storage == acc_dtype else tirx.Cast(acc_dtype, stored)

        def less_offset(acc, c):
            return _less_offset(acc, c, named, acc_dtype)

        def acc_at(i, c):
            """The accumulator of element i (channel c): an integer, or float32 (levels None)."""
            if levels is None:
                return acc_flat[i]
            acc = widened(acc_flat[i])
            if has_neg:
                acc = acc - widened(neg_flat[i])
            return less_offset(acc, c)

        def layer_value(acc, c, fast: bool):
            return _layer_value(acc, c, named, levels, act, clip_lo, clip_hi, fast)

        def value_at(i, c, fast: bool):
            value = layer_value(acc_at(i, c), c, fast)
            if has_residual:
                value = _activation(_rounded(value) + residual_flat[i], post_act, post_lo, post_hi)
            return value

        n = _prod(shape)
        # the two divisions (by L, by the output scale) each run as _quotient where their divisors allow
        on_levels_divisor = functools.partial(_on_divisor_range, named["scale"][0],
                                              enabled=n >= _QUOTIENT_MIN_ELEMENTS and levels > 1) \
            if levels is not None else (lambda emit: emit(False))

        if out_bits is None:
            on_levels_divisor(lambda fast: _for_each_channel(
                shape, channel_axis, lambda i, c: I.buffer_store(y_flat, value_at(i, c, fast), [i])))
            return
        # the float y stays in registers: round it like a store would, then its codes
        out_scale_buf = named["out_scale"]
        stored_y = None  # where the first pass left every float y (None: the codes pass recomputes it)
        # each row's least and greatest stored accumulator, for the dynamic search
        extremes = I.alloc_buffer((_prod(shape) // _channel_view(shape, channel_axis)[3] * 2,), "int32",
                                  scope="global") if dynamic_search else None
        if out_scale > 0:
            I.buffer_store(out_scale_buf, _f32(out_scale), [0])
        elif levels is not None and not has_residual and _channel_view(shape, channel_axis)[3] >= LANES:
            # y is monotone in the accumulator per channel: max|y| is at a channel's extreme accumulators
            def value_of(acc, c):
                return _rounded(layer_value(acc, c, False))

            if has_neg:  # the difference of two stored values: scan the accumulators themselves
                _emit_channel_abs_max_of_monotone(shape, channel_axis, acc_dtype, acc_at, lambda acc, c: acc,
                                                  value_of, out_scale_buf)
            else:  # scan what is stored (widening and the offset keep the order)
                _emit_channel_abs_max_of_monotone(shape, channel_axis, storage, lambda i, c: acc_flat[i],
                                                  lambda stored, c: less_offset(widened(stored), c),
                                                  value_of, out_scale_buf, extremes)
        elif keep_y or has_residual:
            # max|y| needs every y: the first pass stores each one (in y itself when it is kept)
            # and the codes pass reads it back instead of computing it again (a residual block's
            # y: ~15 vector operations an element against one load; ResNet-20's 16x32x32 block
            # epilogue 13-18 -> 10-13 us). A small y without them is cheaper to compute twice
            # than to give a scratch buffer (an LSTM step's gates).
            stored_y = y_flat if keep_y else I.alloc_buffer((n,), F32, scope="global")

            def stored_value(i, c, fast: bool):
                I.buffer_store(stored_y, _rounded(value_at(i, c, fast)), [i])
                return stored_y[i]

            on_levels_divisor(lambda fast: _emit_channel_abs_max(
                shape, channel_axis, lambda i, c: stored_value(i, c, fast), out_scale_buf))
        else:
            on_levels_divisor(lambda fast: _emit_channel_abs_max(
                shape, channel_axis, lambda i, c: _rounded(value_at(i, c, fast)), out_scale_buf))
        code_parts = (_flat(named["codes_pos"]), _flat(named["codes_neg"]) if "codes_neg" in named else None)
        # the coded value's last activation keeps it at or above zero (max(y, 0) may be -0: code 0)
        last_act, last_lo, last_hi = (post_act, post_lo, post_hi) if has_residual else (act, clip_lo, clip_hi)
        nonnegative = last_act == "relu" or (last_act == "clip" and min(last_lo, last_hi) >= 0)
        divisor = _divisor_of(out_scale_buf, out_scale, out_levels + 1, out_levels)

        def store(i, c, fast_levels: bool, fast_codes: _Divisor | None):
            if stored_y is not None:
                value = stored_y[i]
            else:
                value = _rounded(value_at(i, c, fast_levels))
                if keep_y:
                    I.buffer_store(y_flat, value, [i])
            _store_codes(value, i, out_scale_buf, out_levels, out_scale > 0, out_offset, *code_parts,
                         fast=fast_codes, nonnegative=nonnegative)

        def codes_pass(fast_levels: bool):
            def codes_by(fast_codes: _Divisor | None):
                _for_each_channel(shape, channel_axis, lambda i, c: store(i, c, fast_levels, fast_codes))

            def codes(fast_codes: bool):
                if fast_codes and out_scale == 0 and _split_form_pays(n, out_levels):
                    _on_split_form(divisor, out_levels, codes_by)
                else:
                    codes_by(divisor if fast_codes else None)

            _on_divisor_range(out_scale_buf[0], codes, n >= _QUOTIENT_MIN_ELEMENTS)

        if code_search or code_form:
            _emit_code_search(shape, channel_axis, acc_flat, acc_offset, named, code_parts, out_levels, out_offset,
                              code_search)
        elif dynamic_search:
            signed = out_signed or out_offset
            negative_codes = signed and not nonnegative  # levels below zero (a relu's have none)

            def search_pass(fast_levels: bool, fast_codes: _Divisor | None):
                def code_of(s, c):
                    """The code of search value ``s`` (int32) of channel ``c``, as ``store`` stores it."""
                    stored = s ^ tirx.Select(named["mult"][c] < _f32(0.0), tirx.const(-1, "int32"),
                                             tirx.const(0, "int32"))
                    value = _rounded(layer_value(less_offset(tirx.Cast(acc_dtype, stored), c), c, fast_levels))
                    return _signed_code(value, out_scale_buf, out_levels, False, fast_codes, signed)

                def float_row(row, c):
                    _vector_span(lambda r, col: store(r * _channel_view(shape, channel_axis)[3] + col, c,
                                                      fast_levels, fast_codes), row, 0,
                                 _channel_view(shape, channel_axis)[3])

                _emit_dynamic_code_search(shape, channel_axis, acc_flat, extremes, named, code_of, float_row,
                                          code_parts, out_levels, out_offset, negative_codes, levels)

            on_levels_divisor(lambda fast_levels: _on_divisor_range(
                out_scale_buf[0], lambda fast: search_pass(fast_levels, divisor if fast else None),
                n >= _QUOTIENT_MIN_ELEMENTS))
        elif stored_y is not None:
            codes_pass(False)  # y is read back: the levels' divisor plays no part
        else:
            on_levels_divisor(codes_pass)

    return _prim_func(params, body)


SEARCH_LANES = TABLE_ENTRIES  # int16 lanes of one AVX-512 register: one vpermw table of thresholds
_VPERMW = "llvm.x86.avx512.permvar.hi.512"


def _check_code_search(shape, channel_axis, levels, out_bits, out_scale, storage, has_neg, has_zero_point,
                       has_residual, keep_y, steps) -> None:
    inner = _channel_view(shape, channel_axis)[3]
    if not 1 <= steps <= 5:  # 2**steps - 1 entries, within one 32-lane table
        raise ValueError(f"code_search takes 1..5 steps, got {steps}")
    if (levels is None or out_bits is None or not out_scale > 0 or storage not in ("int16", "int32") or has_neg
            or has_zero_point or has_residual or keep_y or inner < SEARCH_LANES):
        raise ValueError("code_search needs static output codes of one int16 or int32 accumulator per element (no "
                         "negative part, zero point, residual or kept y) on rows of at least "
                         f"{SEARCH_LANES} elements of one channel")


def _emit_code_search(shape, channel_axis, acc_flat, acc_offset, named, code_parts, out_levels: int,
                      out_offset: bool, steps: int) -> None:
    """The codes of int16 or int32 accumulators, 32 lanes a vector: by binary search over their
    channel's thresholds (``steps`` > 0; see :func:`epilogue`'s ``code_search``), or by the
    channel's fixed-point form (``steps`` 0: ``code_form``).

    int16 accumulators, per row (one channel): the thresholds move by the run-time offset
    (``acc - off > t`` is ``acc > t + off``; on the flipped side ``~acc > t - off``) and narrow
    to int16 with saturation, which is exact because the stored accumulators stay within
    +-32766 (the int16 storage rule) and their complement within -32767..32765: a threshold
    saturated at -32768 is below every one of them, as it was before, and one at 32767 above.
    The form takes the search value itself instead, ``(acc ^ flip) - shift`` saturated to int16.

    int32 accumulators: ``acc - off`` (or its complement) saturates to int16 instead, exact
    where every threshold is within -32767..32766 and the staircase flat beyond
    (``code_tables(wide=True)``): a saturated value compares with each threshold as it did."""
    _, outer, channels, inner = _channel_view(shape, channel_axis)
    vectors = -(-inner // SEARCH_LANES)
    rows = outer * channels
    flip = named["acc_flip"]
    pos_flat, neg_flat = code_parts
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"
    wide = acc_flat.dtype == "int32"

    with _parallel_or_serial(rows, rows * inner) as row:
        c = row % channels
        off = acc_offset[c] if acc_offset is not None else tirx.const(0, "int32")
        flipped = tirx.Cast("int32", flip[c])
        shift = tirx.Select(flipped != 0, -off, off)  # what the search value loses: (acc ^ flip) - shift
        if steps:
            table, base = _search_row(named, c, steps, None if wide else shift)
        else:
            constants, base = form_row(named["code_form"], c), _local((1,), i16)
            I.buffer_store(base, tirx.Broadcast(tirx.Cast("int16", named["code_base"][c]), lanes), [0])
        # per-row constants in registers (loaded once: LLVM does not hoist them past the stores)
        flip_lanes = _local((2,), i16)
        I.buffer_store(flip_lanes, tirx.Broadcast(tirx.Cast("int16", flip[c]), lanes), [0])
        if wide:
            wide_constants = _local((2,), f"int32x{lanes}")
            I.buffer_store(wide_constants, tirx.Broadcast(off, lanes), [0])
            I.buffer_store(wide_constants, tirx.Broadcast(flipped, lanes), [1])

        def codes_of_row(value_of):
            with I.serial(0, vectors) as v:
                # the last vector of a row ends at the row's end, overlapping the one before it
                # (its common codes are written twice, equal): no partial vectors, no reads past the row
                first = row * inner + tirx.min(v * lanes, inner - lanes)
                value = value_of(acc_flat[tirx.Ramp(first, 1, lanes)])
                code = searched_codes(value, table[0], base[0], steps) if steps else \
                    form_codes(value, constants) + base[0]
                store_searched_codes(code, first, pos_flat, neg_flat, out_levels, out_offset)

        if wide:
            codes_of_row(lambda stored: saturated_search_value(stored, wide_constants[0], wide_constants[1]))
        elif steps or acc_offset is None:  # the search moved its thresholds instead
            codes_of_row(lambda stored: stored ^ flip_lanes[0])
        else:
            # the form reads the search value itself, saturated to int16 (as int32 accumulators'
            # is): (acc ^ flip) - shift saturates exactly so where the shift fits int16 (the int16
            # storage rule keeps it within +-2**13); otherwise widen to int32 first
            I.buffer_store(flip_lanes, tirx.Broadcast(tirx.Cast("int16", shift), lanes), [1])
            with I.If(tirx.all(shift >= -32767, shift <= 32767)):
                with I.Then():
                    codes_of_row(lambda stored: I.call_llvm_pure_intrin(
                        i16, "llvm.ssub.sat", stored ^ flip_lanes[0], flip_lanes[1]))
                with I.Else():
                    codes_of_row(lambda stored: saturated_search_value(
                        tirx.Cast(f"int32x{lanes}", stored), tirx.Broadcast(off, lanes),
                        tirx.Broadcast(flipped, lanes)))


# Rows shorter than this keep the float chain under a dynamic scale: finding a row's thresholds
# costs about as much as running the chain over this many elements (measured: see
# _emit_dynamic_code_search)
DYNAMIC_SEARCH_MIN_ROW = 512


def dynamic_search_steps(out_levels: int, signed: bool) -> int:
    """Search steps for codes of ``out_levels`` levels under a dynamic scale, which bounds every
    code of the tensor by ``L``: ``2 L`` thresholds for signed codes, ``L`` for unsigned ones."""
    return max(1, math.ceil(math.log2((2 * out_levels if signed else out_levels) + 1)))


def dynamic_search_fits(shape, channel_axis: int, levels: int | None, out_bits: int | None, out_scale: float,
                        signed: bool, storage: str, has_neg: bool, has_residual: bool, keep_y: bool) -> bool:
    """Whether :func:`epilogue` can take ``dynamic_search`` for these options."""
    if levels is None or out_bits is None or out_scale != 0 or has_neg or has_residual or keep_y:
        return False
    if storage not in ("int16", "int32") or _channel_view(tuple(shape), channel_axis)[3] < DYNAMIC_SEARCH_MIN_ROW:
        return False
    return dynamic_search_steps(_levels(out_bits), signed) <= 5


def _emit_dynamic_code_search(shape, channel_axis, acc_flat, extremes, named, code_of: Callable,
                              float_row: Callable, code_parts, out_levels: int, out_offset: bool,
                              negative_codes: bool, levels: int) -> None:
    """A dynamic scale's codes pass by a threshold search: per row (one channel), once ``S'`` is
    known, find the staircase's thresholds over the row's values (``extremes``, from the scale's
    pass), prove them, and search them 32 lanes a vector as :func:`_emit_code_search` does; a
    row whose thresholds are not proved runs ``float_row`` (the float chain) instead.

    Search values are ``s = stored ^ flip`` (``flip`` -1 where ``mult[c] < 0``), in which the code
    (``code_of(s, c)``: the codes pass's own float chain, so the same bits) never decreases. A
    dynamic scale bounds every code of the tensor: they lie in ``[b, L']`` (``b = -L'`` where
    ``negative_codes``: signed codes of values that may be negative; else 0), so over the row's ``[s_min, s_max]`` the code is ``b + #{l : s > t_l}`` for
    the levels ``l = b + 1 .. L'``, where ``t_l`` is the greatest ``s`` in ``[s_min - 1, s_max]``
    whose code is below ``l`` (``s_min - 1``: reached by the whole row; ``s_max``: by none of it).
    Each ``t_l`` is estimated from the affine part of the chain, ``s ~ ((l - 1/2) S' / L' - add) /
    mult * L / S + offset``, rounded and kept in the row, and proved by three exact codes: with
    codes below ``s_min`` taken as below every level and above ``s_max`` as above,
    ``code(t0 - 1) < l <= code(t0 + 1)`` puts ``t_l`` at ``t0 - 1`` or ``t0`` (``code(t0)``
    says which). No level needs the row's own codes first, so every lane is independent: three
    chain vectors a row for codes of one sign (six for both signs) against the chain's ``inner /
    16``; from :data:`DYNAMIC_SEARCH_MIN_ROW` elements the search is the faster. Rows whose
    estimate misses run the chain: a staircase flattened inside the row by a clip below zero, or
    a channel whose ``mult`` is zero (constant codes, a NaN estimate) where a level is not reached.
    int32 storage is searched narrowed to int16, so a row whose values leave -32767..32767 runs the
    chain (``s_min - 1``, a threshold below the whole row, must be an int16 too)."""
    _, outer, channels, inner = _channel_view(shape, channel_axis)
    rows = outer * channels
    steps = dynamic_search_steps(out_levels, negative_codes)
    entries = (2 if negative_codes else 1) * out_levels  # levels b + 1 .. L'
    lowest = -out_levels if negative_codes else 0  # b: the code below every threshold
    blocks = -(-entries // LANES)
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"
    vectors = -(-inner // lanes)
    wide = acc_flat.dtype == "int32"
    mult, add = named["mult"], named.get("add")
    pos_flat, neg_flat = code_parts
    zero = tirx.const(0, "int32")
    beyond = tirx.const(1 << 20, "int32")  # a code no level reaches, and its negation

    # each channel's estimate s ~ (l - 1/2) * slope + intercept (float32, any accuracy: it is
    # proved), 16 channels a vector before the rows (three divides a row, in the rows, were
    # a fifth of a 14x14 layer's pass)
    lines = I.alloc_buffer((2 * channels,), F32, scope="global")  # slopes, then intercepts

    def line_of(_row, c):
        to_acc = _f32(levels) / named["scale"][0] / mult[c]
        I.buffer_store(lines, named["out_scale"][0] / _f32(out_levels) * to_acc, [c])
        offset = _less_offset(zero, c, named, "int32")  # acc = stored + offset
        intercept = tirx.Cast(F32, zero - offset) - (add[c] * to_acc if add is not None else _f32(0.0))
        I.buffer_store(lines, intercept, [channels + c])

    _vector_span(line_of, 0, 0, channels)

    with _parallel_or_serial(rows, rows * inner) as row:
        c = row % channels
        flip = tirx.Select(mult[c] < _f32(0.0), tirx.const(-1, "int32"), zero)
        low, high = extremes[row], extremes[rows + row]
        ends = _local((2,), "int32")  # s_min, s_max
        I.buffer_store(ends, tirx.Select(flip != 0, ~high, low), [0])
        I.buffer_store(ends, tirx.Select(flip != 0, ~low, high), [1])
        s_min, s_max = ends[0], ends[1]
        thresholds = _local((lanes,), "int32")  # the table: entries past the levels are never crossed
        proved = _local((blocks * LANES,), "int32")
        with I.vectorized(entries, lanes) as k:
            I.buffer_store(thresholds, tirx.const(NO_STEP, "int32"), [k])
        for block in range(blocks):
            with I.vectorized(0, LANES) as lane:
                k = block * LANES + lane
                level = lowest + 1 + k
                estimate = _fma(tirx.Cast(F32, level) - _f32(0.5), lines[c], lines[channels + c])
                estimate = tirx.Select(flip != 0, _f32(-1.0) - estimate, estimate)
                # kept in the row (a NaN or an overflow converts to some int32: still proved or refused)
                t0 = tirx.max(tirx.min(_round_to_int(estimate), s_max), s_min)

                def code(s):
                    """The code at s, taken as below every level left of the row and above right of it."""
                    inside = code_of(tirx.max(tirx.min(s, s_max), s_min), c)
                    return tirx.Select(s < s_min, zero - beyond, tirx.Select(s > s_max, beyond, inside))

                below, middle, above = code(t0 - 1), code(t0), code(t0 + 1)
                in_use = k < entries
                I.buffer_store(thresholds, tirx.Select(
                    in_use, t0 - 1 + tirx.Cast("int32", middle < level), tirx.const(NO_STEP, "int32")), [k])
                I.buffer_store(proved, tirx.Cast("int32", tirx.Or(tirx.Not(in_use),
                                                                   tirx.And(below < level, above >= level))), [k])
        ok = _local((1,), "int32")
        # every table entry must be an int16, s_min - 1 included (int16 storage keeps |stored| <=
        # 32766, so only a row of int32 storage or at -32768 fails that), and the values searched
        # (int32 narrowed to int16) must be the values themselves
        I.buffer_store(ok, tirx.Cast("int32", tirx.all(s_min > -(2**15), s_max < 2**15)), [0])
        with I.serial(0, blocks * LANES) as k:
            I.buffer_store(ok, ok[0] & proved[k], [0])
        with I.If(ok[0] != 0):
            with I.Then():
                table = _local((1,), i16)
                I.buffer_store(table, tirx.Cast(i16, thresholds[tirx.Ramp(0, 1, lanes)]), [0])
                code_base = _local((1,), i16)
                I.buffer_store(code_base, tirx.Broadcast(tirx.const(lowest, "int16"), lanes), [0])
                flip_type = "int32" if wide else "int16"
                flips = _local((1,), f"{flip_type}x{lanes}")
                I.buffer_store(flips, tirx.Broadcast(tirx.Cast(flip_type, flip), lanes), [0])
                with I.serial(0, vectors) as v:
                    # the last vector of a row ends at the row's end, overlapping the one before it
                    first = row * inner + tirx.min(v * lanes, inner - lanes)
                    stored = acc_flat[tirx.Ramp(first, 1, lanes)]
                    value = tirx.Cast(i16, stored ^ flips[0]) if wide else stored ^ flips[0]
                    code = searched_codes(value, table[0], code_base[0], steps)
                    store_searched_codes(code, first, pos_flat, neg_flat, out_levels, out_offset)
            with I.Else():
                float_row(row, c)


def _search_row(named, c, steps: int, shift) -> tuple:
    """Row ``c``'s search table (moved by ``shift``, an int32 scalar, unless None) and its code
    base, in local registers."""
    lanes, i16 = SEARCH_LANES, f"int16x{SEARCH_LANES}"
    entries = 2**steps - 1
    table = _local((1,), i16)
    # lanes past the channel's entries (the next channel's) are never probed
    raw = named["code_thresholds"][tirx.Ramp(c * entries, 1, lanes)]
    if shift is None:
        I.buffer_store(table, raw, [0])
    else:  # NO_STEP entries stay uncrossable whatever the offset
        moved = tirx.Cast(i16, tirx.Max(tirx.Min(tirx.Cast(f"int32x{lanes}", raw) + tirx.Broadcast(shift, lanes),
                                                 tirx.Broadcast(tirx.const(32767, "int32"), lanes)),
                                        tirx.Broadcast(tirx.const(-32768, "int32"), lanes)))
        I.buffer_store(table, tirx.Select(raw == tirx.Broadcast(tirx.const(NO_STEP, "int16"), lanes), raw, moved), [0])
    base = _local((1,), i16)
    I.buffer_store(base, tirx.Broadcast(tirx.Cast("int16", named["code_base"][c]), lanes), [0])
    return table, base


_VPMULHW = "llvm.x86.avx512.pmulh.w.512"


def form_row(form, c) -> tirx.Buffer:
    """Channel ``c``'s fixed-point form (``code_thresholds.code_form``: ``lo, hi, q, M, B, r``),
    each field broadcast to 32 int16 lanes of a local buffer (in registers for the row's loop)."""
    lanes = SEARCH_LANES
    constants = _local((6,), f"int16x{lanes}")
    lo, hi = form[c * FORM_FIELDS], form[c * FORM_FIELDS + 1]
    # lo in the biased order of form_codes, and the clamp's width
    I.buffer_store(constants, tirx.Broadcast(lo ^ tirx.const(_SIGN_BIT, "int16"), lanes), [0])
    I.buffer_store(constants, tirx.Broadcast(hi - lo, lanes), [1])
    for k in range(2, 6):
        I.buffer_store(constants, tirx.Broadcast(form[c * FORM_FIELDS + k], lanes), [k])
    return constants


_SIGN_BIT = -(2**15)  # int16 0x8000: x ^ it orders int16 values as uint16 ones


def form_codes(value, constants) -> tirx.PrimExpr:
    """The codes less the channel's base of ``value`` (32 int16 lanes of one channel, as
    :func:`searched_codes` takes them) by its fixed-point form in ``constants`` (:func:`form_row`):
    ``((((clamp(value, lo, hi) - lo) << q) * M >> 16) + B) >> r``. No step overflows int16:
    ``(hi - lo) << q`` and ``|B|`` stay below 2**15 and 2**14 (``code_thresholds.code_form``).

    ``clamp(value, lo, hi) - lo`` is ``min(sat(v - lo'), hi - lo)`` in uint16 lanes, ``v``
    and ``lo'`` biased by the sign bit (``vpsubusw``, ``vpminuw``): two operations instead of
    three, and the bias folds into the caller's ``^ flip``."""
    i16, u16 = f"int16x{SEARCH_LANES}", f"uint16x{SEARCH_LANES}"
    lo_biased, width, q, m, b, r = (constants[k] for k in range(6))
    biased = tirx.reinterpret(u16, value ^ tirx.Broadcast(tirx.const(_SIGN_BIT, "int16"), SEARCH_LANES))
    lowered = tirx.Min(I.call_llvm_pure_intrin(u16, "llvm.usub.sat", biased, tirx.reinterpret(u16, lo_biased)),
                       tirx.reinterpret(u16, width))
    high = I.call_llvm_pure_intrin(i16, _VPMULHW, tirx.shift_left(tirx.reinterpret(i16, lowered), q), m)
    return tirx.shift_right(high + b, r)


def saturated_search_value(acc, offset, flip) -> tirx.PrimExpr:
    """What a search compares with ``code_tables(wide=True)``'s thresholds, from 32 int32
    accumulators of one channel: ``(acc - offset) ^ flip`` (``flip`` -1 where the channel's
    multiplier is negative: the complement reverses the order) saturated to int16. Exact because
    wide tables put every step within -32767..32766 and are flat beyond: a saturated value
    compares with each threshold as the int32 one did."""
    lanes = SEARCH_LANES
    value = (acc - offset) ^ flip
    return tirx.Cast(f"int16x{lanes}", tirx.Max(tirx.Min(value, tirx.Broadcast(tirx.const(32767, "int32"), lanes)),
                                                tirx.Broadcast(tirx.const(-32768, "int32"), lanes)))


def searched_codes(value, table, code_base, steps: int) -> tirx.PrimExpr:
    """The codes of ``value`` (32 int16 lanes of one channel, :func:`saturated_search_value` or
    the int16 form) by a binary search of ``steps`` ``vpermw`` lookups in ``table`` (that
    channel's ``2**steps - 1`` thresholds), plus ``code_base`` (int16 lanes)."""
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"

    def splat(v):
        return tirx.Broadcast(tirx.const(v, "int16"), lanes)

    searched, index = _local((1,), i16), _local((1,), i16)
    I.buffer_store(searched, value, [0])
    I.buffer_store(index, splat(0), [0])
    # the table moved up one lane (loop-invariant: LLVM hoists it): a step probes at its candidate
    # itself, not at the candidate less one (an OR a step less: 20 -> 17 vector ops per 32 codes)
    lanes_before = tirx.Max(tirx.Ramp(tirx.const(-1, "int16"), tirx.const(1, "int16"), lanes), splat(0))
    moved = I.call_llvm_pure_intrin(i16, _VPERMW, table, lanes_before)
    for step in (2**k for k in reversed(range(steps))):
        candidate = index[0] + splat(step)
        probe = I.call_llvm_pure_intrin(i16, _VPERMW, moved, candidate)
        I.buffer_store(index, tirx.Select(searched[0] > probe, candidate, index[0]), [0])
    return index[0] + code_base


def store_searched_codes(code, first, pos_flat, neg_flat, out_levels: int, out_offset: bool) -> None:
    """Store 32 int16 ``code`` lanes at ``first`` of the code buffers in ``quantize``'s layout:
    offset codes (``code + L``), or the positive part and, where there is one, the negative part."""
    lanes = SEARCH_LANES
    zero, at = tirx.Broadcast(tirx.const(0, "int16"), lanes), [tirx.Ramp(first, 1, lanes)]
    if out_offset:
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", code + tirx.Broadcast(tirx.const(out_levels, "int16"),
                                                                                    lanes)), at)
    elif neg_flat is None:  # unsigned codes: the staircase is max(code, 0)'s, its base >= 0 (code_tables)
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", code), at)
    else:
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", tirx.Max(code, zero)), at)
        I.buffer_store(neg_flat, tirx.Cast(f"uint8x{lanes}", tirx.Max(zero - code, zero)), at)


# --------------------------------------------------------------------------------------------
# Float convolution and linear layers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvKnobs:
    """Register tile of :func:`conv2d_f32`: ``oc_block`` output channels (weights broadcast)
    x ``segment`` output pixels along a row (vector lanes); ``oc_block * segment / 16`` zmm
    accumulators (keep <= ~24)."""

    oc_block: int = 8
    segment: int = 32


@dataclass(frozen=True)
class LinearKnobs:
    """Register tile of :func:`linear_f32`: ``m_block`` rows x ``n_block`` outputs, each a
    16-lane partial dot product along K."""

    m_block: int = 4
    n_block: int = 4


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    a, b = value
    return int(a), int(b)


def conv_output_hw(input_hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a convolution (the interpreter's ``_im2col`` arithmetic)."""
    (h, w), (kh, kw) = input_hw, kernel_hw
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"convolution output would be empty ({oh}x{ow})")
    return oh, ow


@dataclass(frozen=True)
class FloatTail:
    """:func:`epilogue`'s float chain of a float-input quantized layer (``levels`` None: ``y =
    act(acc * mult[c] + add[c])``), for a float kernel to apply while its sums are still in
    registers (:func:`conv2d_f32` with ``tail``): the same expression, so the same bits, and no
    float accumulator buffer written and read back. Writes ``y``, or with ``out_bits`` and a
    static ``out_scale`` its codes as :func:`epilogue` lays them out."""

    act: str = "none"
    clip_lo: float = 0.0
    clip_hi: float = 0.0
    has_add: bool = False
    out_bits: int | None = None
    out_scale: float = 0.0
    out_signed: bool = False
    out_offset: bool = False

    def __post_init__(self):
        _check_act(self.act)
        if self.out_bits is not None and not (self.out_scale > 0 and (not self.out_offset or self.out_signed)):
            raise ValueError("a float tail writes codes of a static scale only (offset codes signed)")

    def params(self, channels: int, out_shape) -> list[tuple[str, tuple, str]]:
        """``mult``, ``add``, then ``y``, or ``out_scale`` and the code buffers (epilogue's order)."""
        params = [("mult", (channels,), F32)] + ([("add", (channels,), F32)] if self.has_add else [])
        if self.out_bits is None:
            return params + [("y", tuple(out_shape), F32)]
        params += [("out_scale", (1,), F32), ("codes_pos", tuple(out_shape), "uint8")]
        if self.out_signed and not self.out_offset:
            params.append(("codes_neg", tuple(out_shape), "uint8"))
        return params

    def emit_prologue(self, named: dict) -> None:
        if self.out_bits is not None:
            I.buffer_store(named["out_scale"], _f32(self.out_scale), [0])

    def store(self, acc, c, i, named: dict) -> None:
        """Element ``i`` (flat output index, channel ``c``) from float sum ``acc``."""
        value = _layer_value(acc, c, named, None, self.act, self.clip_lo, self.clip_hi, False)
        if self.out_bits is None:
            I.buffer_store(_flat(named["y"]), value, [i])
            return
        levels = _levels(self.out_bits)
        divisor = _divisor_of(named["out_scale"], self.out_scale, levels + 1, levels)
        lo, hi = _QUOTIENT_DIVISORS
        fast = divisor if lo <= float(np.float32(self.out_scale)) <= hi else None  # epilogue's branch, decided here
        nonnegative = self.act == "relu" or (self.act == "clip" and min(self.clip_lo, self.clip_hi) >= 0)
        neg = _flat(named["codes_neg"]) if "codes_neg" in named else None
        _store_codes(_rounded(value), i, named["out_scale"], levels, True, self.out_offset, _flat(named["codes_pos"]),
                     neg, fast=fast, nonnegative=nonnegative)


def conv2d_f32(input_shape, weight_shape, stride, padding, dilation, groups: int, has_bias: bool,
               act: str = "none", clip_lo: float = 0.0, clip_hi: float = 0.0,
               knobs: ConvKnobs | None = None, tail: FloatTail | None = None) -> tirx.PrimFunc:
    """Float32 grouped conv2d (NCHW), ``y = act(conv(x, w) + b)``.

    Parameters: ``x: f32[N,C,H,W], w: f32[O,C/groups,KH,KW], b: f32[O]`` (when ``has_bias``),
    ``y: f32[N,O,OH,OW]``; with ``tail`` (no bias, no act: a float-input quantized layer's
    product), ``tail.params`` in place of ``y``, and each sum goes through ``tail.store``.

    Schedule: when the conv pads or strides, a prologue writes the zero-padded input split into
    stride phases (``xph[n, c, rh, rw, i, j] = xpad[n, c, i*sh + rh, j*sw + rw]``), so every tap
    reads a contiguous run of pixels.  The main loop is a register tile of ``oc_block`` output
    channels x ``segment`` pixels of one output row (vectorized along the row; 1x1 convs use
    the flattened ``OH*OW`` row instead): per tap, ``segment/16`` vector loads, one broadcast
    weight per channel, ``oc_block * segment/16`` FMAs.  Tiles (batch, channel block, row,
    segment) are the parallel tasks; the last segment of a row is a narrower vector.
    """
    _check_act(act)
    n, c, h, w = (int(s) for s in input_shape)
    o, cg, kh, kw = (int(s) for s in weight_shape)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if c != cg * groups or o % groups:
        raise ValueError(f"channels {c} -> {o} do not split into {groups} groups of {cg} inputs")
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    og = o // groups
    knobs = knobs or default_conv_knobs(o, cg * kh * kw, (sh, sw), groups)
    phased = (sh, sw, ph, pw) != (1, 1, 0, 0)
    # Source planes: the phased padded input, or x itself.
    src_h = -(-(h + 2 * ph) // sh) if phased else h
    src_w = -(-(w + 2 * pw) // sw) if phased else w
    pointwise = kh == 1 and kw == 1  # the phase (0,0) plane is exactly OH x OW: flatten it
    rows, row_len = (1, oh * ow) if pointwise else (oh, ow)
    oc_block = _largest_divisor(o, knobs.oc_block)
    oc_blocks = o // oc_block
    tiles = _row_tiles(row_len, knobs.segment)

    if tail is not None and (has_bias or act != "none"):
        raise ValueError("a conv with a float tail has no bias or activation of its own")
    params = [("x", (n, c, h, w), F32), ("w", (o, cg, kh, kw), F32)]
    if has_bias:
        params.append(("b", (o,), F32))
    params += tail.params(o, (n, o, oh, ow)) if tail is not None else [("y", (n, o, oh, ow), F32)]

    def body(x, weight, *rest):
        named = dict(zip([name for name, _, _ in params[2:]], rest))
        bias = named.get("b")
        x_flat = _flat(x)
        y_flat = _flat(named["y"]) if tail is None else None
        if tail is not None:
            tail.emit_prologue(named)
        if phased:
            src = I.alloc_buffer((n * c * sh * sw * src_h * src_w,), F32, scope="global")
            _emit_phase_split(x_flat, src, (n, c, h, w), (sh, sw), (ph, pw), (src_h, src_w), 0.0)
        else:
            src = x_flat

        def tile(batch, oc0, row, col0, width):
            acc = _local((oc_block * width,))
            with I.unroll(0, oc_block) as oi:
                with I.vectorized(0, width) as lane:
                    I.buffer_store(acc, _f32(0.0), [oi * width + lane])
            with I.serial(0, cg) as ic:
                with I.serial(0, kh) as ki:
                    with I.unroll(0, kw) as kj:
                        with I.unroll(0, oc_block) as oi:
                            with I.vectorized(0, width) as lane:
                                channel = ((oc0 + oi) // og) * cg + ic
                                plane = ((batch * c + channel) * sh + (ki * dh) % sh) * sw + (kj * dw) % sw
                                pixel = (row + (ki * dh) // sh) * src_w + col0 + lane + (kj * dw) // sw
                                tap = src[plane * (src_h * src_w) + pixel] * weight[oc0 + oi, ic, ki, kj]
                                I.buffer_store(acc, acc[oi * width + lane] + tap, [oi * width + lane])
            with I.unroll(0, oc_block) as oi:
                with I.vectorized(0, width) as lane:
                    value = acc[oi * width + lane]
                    out = ((batch * o + oc0 + oi) * rows + row) * row_len + col0 + lane
                    if tail is not None:
                        tail.store(value, oc0 + oi, out, named)
                    else:
                        if bias is not None:
                            value = value + bias[oc0 + oi]
                        I.buffer_store(y_flat, _activation(value, act, clip_lo, clip_hi), [out])

        segments = sum(count for count, _ in tiles)
        with I.parallel(0, n * oc_blocks * rows * segments) as task:
            seg = task % segments
            row = task // segments % rows
            oc0 = task // (segments * rows) % oc_blocks * oc_block
            batch = task // (segments * rows * oc_blocks)
            _dispatch_tiles(tiles, seg, lambda col0, width: tile(batch, oc0, row, col0, width))

    return _prim_func(params, body)


def default_conv_knobs(out_channels: int, taps: int, stride: tuple[int, int], groups: int) -> ConvKnobs:
    """:func:`conv2d_f32`'s register tile unless one is given: a strided conv of few taps per
    output (an image stem: 3 channels x 3x3) and at most 32 outputs takes them all in one tile of
    16 pixels, so every input vector it loads feeds one FMA per output channel. Measured, 3 -> O
    3x3 stride 2 at 224x224 (2 threads), against 8 channels x 32 pixels: O = 32 173 -> 97 us
    (MobileNetV2's stem), 16 113 -> 54, 24 110 -> 78; 64 outputs in two tiles of 32 lose (219 ->
    270), and so do unstrided stems (3 -> 64 at 224x224: 497 against 602 us). At most 24
    channels a tile (conv2d_f32 takes the largest divisor of O up to that): 32 accumulators are
    all of AVX-512's registers, and around a calibrated stem's codes tail they spilled
    (MobileNetV2 calibrated, Zen 5, alternating runs: 911 -> 884 us with tiles of 16)."""
    if groups == 1 and max(stride) > 1 and taps <= 32 and out_channels <= 32:
        return ConvKnobs(oc_block=min(out_channels, 24), segment=LANES)
    return ConvKnobs()


def _row_tiles(row_len: int, segment: int) -> list[tuple[int, int]]:
    """Cover a row with ``(count, width)`` runs of tiles: full segments, then the remainder as
    whole vectors, then one narrow vector (odd widths such as 17 or 24 make LLVM emit poor code)."""
    segment = max(LANES, segment // LANES * LANES)
    full, rest = divmod(row_len, segment)
    tiles = [(full, segment)] if full else []
    if rest >= LANES:
        tiles.append((1, rest // LANES * LANES))
    if rest % LANES:
        tiles.append((1, rest % LANES))
    return tiles


def _dispatch_tiles(tiles, index, emit_tile):
    """``emit_tile(col0, width)`` for tile ``index`` of the runs in ``tiles`` (uniform branches)."""
    (count, width), rest = tiles[0], tiles[1:]
    if not rest:
        emit_tile(index * width, width)
        return
    with I.If(index < count):
        with I.Then():
            emit_tile(index * width, width)
        with I.Else():
            _dispatch_tiles([(c, w) for c, w in rest], index - count, lambda col0, w: emit_tile(count * width + col0, w))


def _emit_phase_split(x_flat, dst, shape, stride, padding, dst_hw, fill: float):
    """``dst[n, c, rh, rw, i, j] = xpad[n, c, i*sh + rh, j*sw + rw]`` (``fill`` outside ``x``).

    Parallel over destination rows; the row test is uniform, the column test is a per-lane
    select on a clamped (always in-bounds) load. With column stride 2 a vector of 16 columns
    whose 32 source columns lie inside the row is two contiguous loads and one shuffle of their
    even (or odd) lanes instead: per-lane loads of every other column (16 scalar loads and
    inserts a vector) took a third of MobileNetV2's stem.
    """
    n, c, h, w = shape
    (sh, sw), (ph, pw), (dst_h, dst_w) = stride, padding, dst_hw
    rows = n * c * sh * sw * dst_h

    def source_row(row):
        """``(plane, ih, rw)``: destination row ``row``'s input plane (n * C + c), input row and
        column phase."""
        i = row % dst_h
        rw = row // dst_h % sw
        rh = row // (dst_h * sw) % sh
        return row // (dst_h * sw * sh), i * sh + rh - ph, rw

    def emit(row, j):
        plane, ih, rw = source_row(row)
        iw = j * sw + rw - pw
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        load = x_flat[plane * (h * w) + tirx.min(tirx.max(ih, 0), h - 1) * w + tirx.min(tirx.max(iw, 0), w - 1)]
        I.buffer_store(dst, tirx.Select(inside, load, _f32(fill)), [row * dst_w + j])

    if sw != 2 or dst_w < LANES:
        _for_each(rows, dst_w, emit)
        return
    full = dst_w // LANES
    even_lanes = [tirx.const(2 * lane, "int32") for lane in range(LANES)]
    with _parallel_or_serial(rows, rows * dst_w) as row:
        plane, ih, rw = source_row(row)
        with I.serial(0, full) as v:
            first = v * (LANES * sw) + rw - pw  # the vector's first source column
            with I.If(tirx.all(ih >= 0, ih < h, first >= 0, first + 2 * LANES <= w)):
                with I.Then():
                    source = plane * (h * w) + ih * w + first
                    pair = [x_flat[tirx.Ramp(source, 1, LANES)], x_flat[tirx.Ramp(source + LANES, 1, LANES)]]
                    I.buffer_store(dst, tirx.Shuffle(pair, even_lanes), [tirx.Ramp(row * dst_w + v * LANES, 1, LANES)])
                with I.Else():
                    with I.vectorized(0, LANES) as lane:
                        emit(row, v * LANES + lane)
        if dst_w % LANES:
            with I.vectorized(0, dst_w % LANES) as lane:
                emit(row, full * LANES + lane)


def linear_f32(M: int, K: int, N: int, has_bias: bool, act: str = "none", clip_lo: float = 0.0,
               clip_hi: float = 0.0, knobs: LinearKnobs = LinearKnobs()) -> tirx.PrimFunc:
    """Float32 linear layer ``y = act(x @ w.T + b)``.

    Parameters: ``x: f32[M,K], w: f32[N,K], b: f32[N]`` (when ``has_bias``), ``y: f32[M,N]``.

    Schedule: dot products along K (both operands contiguous, so the weights stream once,
    which is what batch-1 layers need): a register tile of ``m_block x n_block`` 16-lane partial
    sums, parallel over tiles, the K remainder and the lane sums folded at the end.
    """
    _check_act(act)
    m_block = _largest_divisor(M, knobs.m_block)
    n_block = _largest_divisor(N, knobs.n_block if M > 1 else 2 * knobs.n_block)
    k_vectors, k_tail = divmod(K, LANES)
    n_tiles = N // n_block
    params = [("x", (M, K), F32), ("w", (N, K), F32)]
    if has_bias:
        params.append(("b", (N,), F32))
    params.append(("y", (M, N), F32))

    def body(x, weight, *rest):
        bias, y = (rest[0], rest[1]) if has_bias else (None, rest[0])
        with _parallel_or_serial((M // m_block) * n_tiles, M * N * K) as task:
            m0 = task // n_tiles * m_block
            n0 = task % n_tiles * n_block
            acc = _local((m_block * n_block * LANES,))
            total = _local((m_block * n_block,))
            with I.unroll(0, m_block * n_block) as ij:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(acc, _f32(0.0), [ij * LANES + lane])
            if k_vectors:
                with I.serial(0, k_vectors) as kv:
                    with I.unroll(0, m_block) as i:
                        with I.unroll(0, n_block) as j:
                            with I.vectorized(0, LANES) as lane:
                                slot = (i * n_block + j) * LANES + lane
                                product = x[m0 + i, kv * LANES + lane] * weight[n0 + j, kv * LANES + lane]
                                I.buffer_store(acc, acc[slot] + product, [slot])
            with I.unroll(0, m_block) as i:
                with I.unroll(0, n_block) as j:
                    I.buffer_store(total, _f32(0.0), [i * n_block + j])
                    with I.unroll(0, LANES) as lane:
                        I.buffer_store(total, total[i * n_block + j] + acc[(i * n_block + j) * LANES + lane], [i * n_block + j])
                    if k_tail:
                        with I.serial(0, k_tail) as kt:
                            k = k_vectors * LANES + kt
                            I.buffer_store(total, total[i * n_block + j] + x[m0 + i, k] * weight[n0 + j, k], [i * n_block + j])
                    value = total[i * n_block + j]
                    if bias is not None:
                        value = value + bias[n0 + j]
                    I.buffer_store(y, _activation(value, act, clip_lo, clip_hi), [m0 + i, n0 + j])

    return _prim_func(params, body)


# --------------------------------------------------------------------------------------------
# Elementwise
# --------------------------------------------------------------------------------------------
def _broadcast_strides(shape, out_shape) -> list[int]:
    """Element strides of a row-major ``shape`` aligned to ``out_shape`` (0 where broadcast)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > len(out_shape):
        raise ValueError(f"cannot broadcast {shape} to {tuple(out_shape)}")
    padded = (1,) * (len(out_shape) - len(shape)) + shape
    strides, step = [0] * len(out_shape), 1
    for d in reversed(range(len(out_shape))):
        if padded[d] == out_shape[d]:
            strides[d] = step if out_shape[d] > 1 else 0
        elif padded[d] != 1:
            raise ValueError(f"cannot broadcast {shape} to {tuple(out_shape)}")
        step *= padded[d]
    return strides


def _coalesce(out_shape, operand_strides) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dimensions that every operand walks contiguously (or all broadcast)."""
    dims, strides = [], [[] for _ in operand_strides]
    for d, size in enumerate(out_shape):
        if size == 1:
            continue
        if dims and all(st[-1] == s[d] * size for s, st in zip(operand_strides, strides)):
            dims[-1] *= size
            for s, st in zip(operand_strides, strides):
                st[-1] = s[d]
            continue
        dims.append(int(size))
        for s, st in zip(operand_strides, strides):
            st.append(s[d])
    if not dims:
        return [1], [[0] for _ in operand_strides]
    return dims, strides


def _strided_index(row, col, dims, strides):
    """Offset of element ``(row, col)`` of the coalesced space in an operand with ``strides``."""
    index = col * strides[-1] if strides[-1] else tirx.const(0, "int32")
    rest = row
    for size, stride in zip(reversed(dims[:-1]), reversed(strides[:-1])):
        if stride:
            index = index + (rest % size) * stride
        rest = rest // size
    return index


_BINARY = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "minimum": tirx.Min,
    "sub": lambda a, b: a - b,
    "div": lambda a, b: a / b,
}


def binary(op: str, a_shape, b_shape, out_shape) -> tirx.PrimFunc:
    """``y = op(a, b)`` with numpy broadcasting (``op`` in add / mul / minimum).

    Parameters: ``a: f32[a_shape], b: f32[b_shape], y: f32[out_shape]``.  Dimensions are
    coalesced first, so a full tensor, a per-channel ``[1,C,1,1]`` constant and a scalar all
    become a 2-D loop that is parallel over rows and vectorized along the contiguous one.
    """
    if op not in _BINARY:
        raise ValueError(f"binary op must be one of {sorted(_BINARY)}, got {op!r}")
    out_shape = tuple(int(s) for s in out_shape)
    strides = [_broadcast_strides(a_shape, out_shape), _broadcast_strides(b_shape, out_shape)]
    dims, (a_strides, b_strides) = _coalesce(out_shape, strides)
    rows, row_len = _prod(dims[:-1]), dims[-1]
    params = [("a", tuple(a_shape), F32), ("b", tuple(b_shape), F32), ("y", out_shape, F32)]

    def body(a, b, y):
        a_flat, b_flat, y_flat = _flat(a), _flat(b), _flat(y)

        def emit(row, col):
            value = _BINARY[op](a_flat[_strided_index(row, col, dims, a_strides)],
                                b_flat[_strided_index(row, col, dims, b_strides)])
            I.buffer_store(y_flat, value, [row * row_len + col])

        _for_each(rows, row_len, emit)

    return _prim_func(params, body)


def broadcast(in_shape, out_shape) -> tirx.PrimFunc:
    """``y = x`` broadcast (numpy rules) to ``out_shape``, e.g. a folded layer's per-channel
    constant ``[1,C,1,1]`` to its output shape.  Parameters: ``x: f32[in_shape], y: f32[out_shape]``
    (coalesced like :func:`binary`)."""
    out_shape = tuple(int(s) for s in out_shape)
    dims, (x_strides,) = _coalesce(out_shape, [_broadcast_strides(in_shape, out_shape)])
    rows, row_len = _prod(dims[:-1]), dims[-1]

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(rows, row_len, lambda row, col: I.buffer_store(
            y_flat, x_flat[_strided_index(row, col, dims, x_strides)], [row * row_len + col]))

    return _prim_func([("x", tuple(in_shape), F32), ("y", out_shape, F32)], body)


def embedding(rows: int, dim: int, ids_shape, ids_dtype: str) -> tirx.PrimFunc:
    """``y[..., d] = table[ids[...], d]``: one table row per id, copied in vectors of 16.

    Parameters: ``table: f32[rows, dim], ids: <ids_dtype>[ids_shape], y: f32[ids_shape + (dim,)]``.
    Ids are clamped into the table (memory safety); the runtime refuses ids outside it first.
    """
    ids_shape = tuple(int(s) for s in ids_shape)
    count, rows, dim = _prod(ids_shape), int(rows), int(dim)

    def body(table, ids, y):
        table_flat, ids_flat, y_flat = _flat(table), _flat(ids), _flat(y)

        def emit(i, d):
            row = tirx.Min(tirx.Max(ids_flat[i], tirx.const(0, ids_dtype)), tirx.const(rows - 1, ids_dtype))
            I.buffer_store(y_flat, table_flat[row.astype("int64") * dim + d], [i * dim + d])

        _for_each(count, dim, emit)

    return _prim_func([("table", (rows, dim), F32), ("ids", ids_shape, ids_dtype),
                       ("y", ids_shape + (dim,), F32)], body)


# exp on the vector units: LLVM has no vector exp for x86 and calls libm's expf once per lane
# (16 calls a vector; an LSTM step's gates took 7.7 of its ~20 us). Cody-Waite reduction
# x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial of r in FMA steps, then 2^n in two
# exponent-field products (subnormal results round once). Within 1 ulp of the true exp (the
# coefficients of SLEEF's xexpf, a public minimax fit; tests/test_glue_llvm.py checks every
# result against float64's exp rounded to float32). numpy's float32 exp is itself up to 3 ulps
# off in places: float outputs are compared within tolerances, as with libm's.
_EXP_COEFFICIENTS = (0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
                     0.0416664853692054748535156, 0.166666671633720397949219, 0.5)
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187045e-06  # ln 2 = hi + lo, hi with 12 zero low bits


def _exp(value):
    """float32 ``exp(value)`` without calls. ``value`` is clamped to [-104.5, 89], where 2^n
    itself gives 0 below exp's least subnormal and inf above its largest float; the clamp is two
    selects, which keep a NaN (``Min``/``Max`` would not; an ``isnan`` test stops TVM vectorizing
    the expression), and a NaN makes every step after it NaN. The expression repeats ``value``
    (and its reduction) a few dozen times for LLVM to share: give it a load or a variable (TVM
    inlines ``Let`` bindings, and nested ones grow exponentially): ``elementwise_chain`` computes
    an exp-based op inside another's operand into a buffer first."""
    x = tirx.Select(value > _f32(89.0), _f32(89.0), value)
    x = tirx.Select(x < _f32(-104.5), _f32(-104.5), x)
    n = _round_to_int(x * _f32(1.4426950408889634))
    nf = tirx.Cast(F32, n)
    r = _fma(nf, _f32(-_LN2_LO), _fma(nf, _f32(-_LN2_HI), x))
    poly = _f32(_EXP_COEFFICIENTS[0])
    for c in _EXP_COEFFICIENTS[1:]:
        poly = _fma(poly, r, _f32(c))
    u = _fma(poly, r * r, r) + _f32(1.0)
    half = n >> 1  # 2^n = 2^half * 2^(n - half): each factor a normal float32 for n in [-151, 129]

    def power_of_two(k):
        return tirx.reinterpret(F32, (k + 127) << 23)

    return (u * power_of_two(half)) * power_of_two(n - half)


# log on the vector units, for the same reason as exp (libm's logf once per lane otherwise):
# x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(x) = e ln2 + log(m), log(1 + f) by Cephes logf's
# public polynomial (f^3 times a degree-8 polynomial of f, plus f - f^2 / 2), ln 2 split in two.
# Within 1-2 ulps of the true log (tests/test_glue_llvm.py checks against float64's).
_LOG_COEFFICIENTS = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                     -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_LOG_LN2_HI, _LOG_LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo
_FLT_MIN = 1.1754943508222875e-38  # the least normal float32: subnormals are scaled by 2^23 first


def _log(value):
    """float32 ``log(value)`` without calls: -inf at +-0, NaN below 0 and at NaN, inf at inf.
    Like :func:`_exp`, give it a load or a variable (the expression repeats ``value``)."""
    i32 = "int32"
    small = tirx.abs(value) < _f32(_FLT_MIN)
    x = tirx.Select(small, value * _f32(8388608.0), value)  # 2^23
    bits = tirx.reinterpret(i32, x)
    exponent = ((bits >> 23) & tirx.const(0xFF, i32)) - tirx.const(126, i32) \
        - tirx.Select(small, tirx.const(23, i32), tirx.const(0, i32))
    m = tirx.reinterpret(F32, (bits & tirx.const(0x007FFFFF, i32)) | tirx.const(0x3F000000, i32))  # [0.5, 1)
    low = m < _f32(0.70710678118654752440)
    exponent = exponent - tirx.Select(low, tirx.const(1, i32), tirx.const(0, i32))
    f = tirx.Select(low, m + m, m) - _f32(1.0)
    z = f * f
    poly = _f32(_LOG_COEFFICIENTS[0])
    for c in _LOG_COEFFICIENTS[1:]:
        poly = _fma(poly, f, _f32(c))
    e = tirx.Cast(F32, exponent)
    y = _fma(e, _f32(_LOG_LN2_LO), poly * f * z)
    y = _fma(z, _f32(-0.5), y)
    y = _fma(e, _f32(_LOG_LN2_HI), f + y)
    # the special inputs by their bits (TVM's simplifier takes float compares to be NaN-free)
    raw = tirx.reinterpret(i32, value)
    magnitude = raw & tirx.const(0x7FFFFFFF, i32)
    y = tirx.Select(tirx.Or(magnitude > tirx.const(0x7F800000, i32), raw < tirx.const(0, i32)),
                    _f32(float("nan")), y)  # NaN, and below zero
    y = tirx.Select(raw == tirx.const(0x7F800000, i32), _f32(float("inf")), y)
    return tirx.Select(magnitude == tirx.const(0, i32), _f32(float("-inf")), y)  # +-0


def _sigmoid(value):
    """The interpreter's ``1 / (1 + exp(-x))`` (float32; :func:`_exp` may differ from numpy's by an ulp)."""
    return _f32(1.0) / (_f32(1.0) + _exp(-value))


def _tanh(value):
    """TVM's llvm tanh formula with one ``exp`` instead of two: TVM evaluates both
    ``(1 - exp(-2x)) / (1 + exp(-2x))`` (taken for ``x >= 0``) and ``(exp(2x) - 1) / (exp(2x) + 1)``
    in every lane; the second is exactly the negated first at ``-x`` (IEEE negation and rounding
    are symmetric), so ``exp(-2|x|)`` serves both: tanh is odd (``tests/test_step_fusion.py``
    checks). The exp is :func:`_exp`, not libm's, so values may differ from TVM's by an ulp."""
    e = _exp(_f32(-2.0) * tirx.abs(value))
    magnitude = (_f32(1.0) - e) / (_f32(1.0) + e)
    # 0 - m, not -m: where exp(2x) rounds to 1 (tiny negative x) TVM's form gives +0
    return tirx.Select(value >= _f32(0.0), magnitude, _f32(0.0) - magnitude)


def _relu6(value):
    return tirx.Min(tirx.Max(value, _f32(0.0)), _f32(6.0))


_UNARY = {
    "relu": lambda v, lo, hi: _activation(v, "relu", lo, hi),
    "clip": lambda v, lo, hi: _activation(v, "clip", lo, hi),
    "sigmoid": lambda v, lo, hi: _sigmoid(v),
    "tanh": lambda v, lo, hi: _tanh(v),  # TVM's exp-based tanh: within ~1e-7 of numpy's
    # vision activations, in csqc.numerics' float32 order (no multiply-add to contract)
    "hardsigmoid": lambda v, lo, hi: _relu6(v + _f32(3.0)) / _f32(6.0),
    "hardswish": lambda v, lo, hi: (v * _relu6(v + _f32(3.0))) / _f32(6.0),
    "silu": lambda v, lo, hi: v * _sigmoid(v),
    "sqrt": lambda v, lo, hi: tirx.sqrt(v),  # llvm.sqrt: vsqrtps, correctly rounded
    "exp": lambda v, lo, hi: _exp(v),
    "log": lambda v, lo, hi: _log(v),
    "erf": lambda v, lo, hi: _erf(v),  # gelu's rational form: within a few ulps of the true erf
    # libm's sinf / cosf, a call a lane: within an ulp at any argument (their full range
    # reduction); these ops run on embeddings of a few hundred values, where calls cost nothing
    "sin": lambda v, lo, hi: tirx.sin(v),
    "cos": lambda v, lo, hi: tirx.cos(v),
}


# the unary ops built on _exp (and _log, _erf: as long, their operand repeated)
_EXP_OPS = ("sigmoid", "tanh", "silu", "exp", "log", "erf")


def unary(op: str, shape, lo: float = 0.0, hi: float = 0.0) -> tirx.PrimFunc:
    """``y = op(x)``: relu, clip (to ``[lo, hi]``), sigmoid, tanh, hardsigmoid, hardswish or silu.
    Parameters: ``x: f32[shape], y: f32[shape]`` (parallel chunks, 16-lane vectors)."""
    if op not in _UNARY:
        raise ValueError(f"unary op must be one of {sorted(_UNARY)}, got {op!r}")
    shape = tuple(int(s) for s in shape)
    fn = _UNARY[op]

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, fn(x_flat[i], lo, hi), [i]))

    return _prim_func([("x", shape, F32), ("y", shape, F32)], body)


@dataclass(frozen=True)
class ChainOp:
    """One elementwise node of :func:`elementwise_chain`: ``op`` (a :func:`unary` or :func:`binary`
    op, or ``slice``) of ``args`` (names of chain inputs or earlier ops) with output ``shape``;
    ``attrs`` are ``(lo, hi)`` of clip, ``(axis, start)`` of a slice, else empty."""

    name: str
    op: str
    shape: tuple
    args: tuple
    attrs: tuple = ()


@dataclass(frozen=True)
class ChainQuantize:
    """A quantizer at the end of :func:`elementwise_chain`, reading chain input or output ``source``:
    :func:`quantize`'s (``asymmetric`` False) or :func:`quantize_asymmetric`'s options."""

    source: str
    bits: int
    static_scale: float
    signed: bool = False
    offset: bool = False
    asymmetric: bool = False
    zero_point: int = 0
    centered: bool = False

    def params(self, shape) -> list[tuple[str, tuple, str]]:
        """Its output buffers, in :func:`quantize` / :func:`quantize_asymmetric`'s order."""
        out = [("scale", (1,), F32)] + ([("zero_point", (1,), "int32")] if self.asymmetric else [])
        out.append(("codes_pos", shape, "uint8"))
        if (self.centered if self.asymmetric else self.signed and not self.offset):
            out.append(("codes_neg", shape, "uint8"))
        return out


# the ops elementwise_chain fuses (quantizers apart)
CHAIN_OPS = frozenset(_UNARY) | frozenset(_BINARY) | {"slice"}


def elementwise_chain(inputs: Sequence[tuple[str, Sequence[int]]], ops: Sequence[ChainOp],
                      outputs: Sequence[str], quantizers: Sequence[ChainQuantize] = ()) -> tirx.PrimFunc:
    """Many elementwise ops in one kernel: the values nothing outside reads stay in registers.

    Parameters: the float32 ``inputs`` (name, shape), then ``y: float32`` for each op named in
    ``outputs``, then each quantizer's outputs (scale[, zero_point], codes_pos[, codes_neg]).
    Every element of an output is computed from the inputs by composing the ops' expressions
    (a slice shifts the index, a broadcast operand drops or zeroes it): the float32 operations
    of the unfused kernels in the same order, each op's result rounded (``_rounded``: no FMA
    across ops), so the outputs are bit for bit those of :func:`unary` / :func:`binary` /
    :func:`slice_axis` kernels run one by one. An op read by several outputs of one shape is
    one expression for LLVM to share. Outputs of one shape share a loop; the quantizers run
    last, on their (materialized) source buffers, as :func:`quantize` / :func:`quantize_asymmetric`.
    """
    shapes = {name: tuple(int(d) for d in shape) for name, shape in inputs}
    by_name = {}
    for op in ops:
        if op.op not in _UNARY and op.op not in _BINARY and op.op != "slice":
            raise ValueError(f"elementwise_chain cannot fuse op {op.op!r}")
        if any(a not in shapes for a in op.args) or op.name in shapes:
            raise ValueError(f"chain op {op.name} reads an unknown value or repeats a name")
        shapes[op.name] = tuple(int(d) for d in op.shape)
        by_name[op.name] = op
    if any(o not in by_name for o in outputs) or any(q.source not in shapes for q in quantizers):
        raise ValueError("chain outputs must be ops and quantizer sources inputs or outputs of the chain")
    if any(q.source in by_name and q.source not in outputs for q in quantizers):
        raise ValueError("a quantizer reads an op of the chain that is not an output")
    params = [(name, shapes[name], F32) for name, _ in inputs] + [(o, shapes[o], F32) for o in outputs]
    for q in quantizers:
        params += q.params(shapes[q.source])

    def exp_ops_under(name: str, stop: set) -> set:
        """The exp-based ops (``_EXP_OPS``) value ``name``'s expression contains, not looking
        past them or past the values in ``stop``."""
        if name not in by_name or name in stop:
            return set()
        op = by_name[name]
        if op.op in _EXP_OPS:
            return {name}
        return set().union(*(exp_ops_under(a, stop) for a in op.args))

    # An exp-based op inside another's operand is computed first into a buffer of its own: _exp
    # repeats its operand dozens of times for LLVM to share, and TVM's passes walk those
    # repeats as a tree, so nesting them grows exponentially (an LSTM cell's tanh of the three
    # gates' sigmoid and tanh: minutes to build). In operand order, inner ones first.
    staged: list[str] = []
    for op in ops:
        if op.op in _EXP_OPS:
            for inner in sorted(exp_ops_under(op.args[0], set(staged)), key=[o.name for o in ops].index):
                staged.append(inner)

    def body(*buffers):
        flats = {name: _flat(b) for (name, _, _), b in zip(params, buffers[:len(inputs) + len(outputs)])}
        input_names = {name for name, _ in inputs}
        for name in staged:
            if name not in flats:
                flats[name] = I.alloc_buffer((_prod(shapes[name]),), F32, scope="global")
        ready: set[str] = set()  # staged values already in their buffers

        def value(name: str, index: list):
            """Element ``index`` (one expression per dimension of its shape) of value ``name``."""
            if name in input_names or name in ready:
                return flats[name][_row_major(index, shapes[name])]
            op = by_name[name]
            if op.op == "slice":
                axis, start = op.attrs
                shifted = list(index)
                shifted[axis] = shifted[axis] + start
                return value(op.args[0], shifted)
            operands = [value(a, _broadcast_index(index, shapes[a])) for a in op.args]
            if op.op in _UNARY:
                lo, hi = op.attrs or (0.0, 0.0)
                result = _UNARY[op.op](operands[0], lo, hi)
            else:
                result = _BINARY[op.op](*operands)
            return _rounded(result)

        def compute(group, shape):
            rows, row_len = _prod(shape[:-1]), int(shape[-1]) if shape else 1

            def emit(row, col):
                index = _unravel(row, shape[:-1]) + ([col] if shape else [])
                for o in group:
                    I.buffer_store(flats[o], value(o, index), [row * row_len + col])

            _for_each(rows, row_len, emit)

        for name in staged:
            compute([name], shapes[name])
            ready.add(name)
        rest_outputs = [o for o in outputs if o not in ready]
        for shape in dict.fromkeys(shapes[o] for o in rest_outputs):
            compute([o for o in rest_outputs if shapes[o] == shape], shape)
        rest = list(buffers[len(inputs) + len(outputs):])
        for q in quantizers:
            outs = [rest.pop(0) for _ in q.params(shapes[q.source])]
            source, n = flats[q.source], _prod(shapes[q.source])
            if q.asymmetric:
                _emit_quantize_asymmetric(source, n, _levels(q.bits), q.static_scale, q.zero_point, *outs,
                                          offset=q.offset)
            else:
                _emit_quantize(source, n, _levels(q.bits), q.static_scale, q.offset, *outs)

    return _prim_func(params, body)


def _unravel(flat, shape) -> list:
    """Row-major indices of ``flat`` in ``shape`` (one expression per dimension)."""
    index = []
    for size in reversed(shape):
        index.append(flat % size if size > 1 else tirx.const(0, "int32"))
        flat = flat // size
    return index[::-1]


def _row_major(index, shape):
    """Flat offset of ``index`` in a row-major ``shape`` (size-1 dimensions add nothing)."""
    offset, stride = tirx.const(0, "int32"), 1
    for i, size in zip(reversed(index), reversed(shape)):
        if size > 1:
            offset = offset + i * stride
        stride *= size
    return offset


def _broadcast_index(index, shape) -> list:
    """``index`` of a broadcast result, read in an operand of ``shape`` (numpy rules)."""
    aligned = index[len(index) - len(shape):] if shape else []
    return [i if size > 1 else tirx.const(0, "int32") for i, size in zip(aligned, shape)]


def channel_affine(shape, axis: int = 1) -> tirx.PrimFunc:
    """Unfused batch norm: ``y = x * mul[c] + add[c]`` (product rounded before the add).

    Parameters: ``x: f32[shape], mul: f32[C], add: f32[C], y: f32[shape]``.
    """
    shape = tuple(int(s) for s in shape)
    _, _, channels, _ = _channel_view(shape, axis)

    def body(x, mul, add, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each_channel(shape, axis, lambda i, c: I.buffer_store(y_flat, _rounded(x_flat[i] * mul[c]) + add[c], [i]))

    return _prim_func([("x", shape, F32), ("mul", (channels,), F32), ("add", (channels,), F32), ("y", shape, F32)], body)


def copy(shape) -> tirx.PrimFunc:
    """``y = x`` (also a reshape: the planner gives ``y`` the new shape of the same data).

    Parameters: ``x: f32[shape], y: f32[shape]``."""
    shape = tuple(int(s) for s in shape)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, x_flat[i], [i]))

    return _prim_func([("x", shape, F32), ("y", shape, F32)], body)


def slice_axis(shape, axis: int, start: int, end: int) -> tirx.PrimFunc:
    """``y = x[..., start:end, ...]`` along ``axis`` (step 1).  Parameters: ``x: f32[shape], y``.

    Viewed as ``[outer, A, inner]``: each of the ``outer`` rows copies one contiguous run of
    ``(end - start) * inner`` elements (parallel over rows, vectorized along the run).
    """
    shape = tuple(int(s) for s in shape)
    axis, outer, size, inner = _channel_view(shape, axis)
    if not 0 <= start < end <= size:
        raise ValueError(f"slice [{start}:{end}] outside axis {axis} of {shape}")
    out_shape = shape[:axis] + (end - start,) + shape[axis + 1 :]
    run = (end - start) * inner

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(outer, run, lambda row, col: I.buffer_store(
            y_flat, x_flat[row * (size * inner) + start * inner + col], [row * run + col]))

    return _prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


def concat(shapes: Sequence[Sequence[int]], axis: int) -> tirx.PrimFunc:
    """``y = concatenate(xs, axis)``.  Parameters: ``x0, x1, ..., y`` (float32)."""
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    axis = axis % len(shapes[0])
    out_shape = list(shapes[0])
    out_shape[axis] = sum(shape[axis] for shape in shapes)
    out_shape = tuple(out_shape)
    outer, inner = _prod(out_shape[:axis]), _prod(out_shape[axis + 1 :])
    out_row = out_shape[axis] * inner
    params = [(f"x{i}", shape, F32) for i, shape in enumerate(shapes)] + [("y", out_shape, F32)]

    def body(*buffers):
        *inputs, y = buffers
        y_flat = _flat(y)
        offset = 0
        for x, shape in zip(inputs, shapes):
            x_flat, in_row = _flat(x), shape[axis] * inner

            def emit(row, col, x_flat=x_flat, in_row=in_row, offset=offset):
                I.buffer_store(y_flat, x_flat[row * in_row + col], [row * out_row + offset + col])

            _for_each(outer, in_row, emit)
            offset += in_row

    return _prim_func(params, body)


def transpose(shape, dims: Sequence[int]) -> tirx.PrimFunc:
    """``y = x.transpose(dims)`` (contiguous result).  Parameters: ``x: f32[shape], y``.

    Vectorized along the output's last dimension (a strided gather when that dimension is not
    the input's last one)."""
    shape = tuple(int(s) for s in shape)
    dims = tuple(int(d) % len(shape) for d in dims)
    if sorted(dims) != list(range(len(shape))):
        raise ValueError(f"{dims} is not a permutation of {len(shape)} dimensions")
    out_shape = tuple(shape[d] for d in dims)
    in_strides = [_prod(shape[d + 1 :]) for d in range(len(shape))]
    strides = [in_strides[d] for d in dims]
    row_len = out_shape[-1] if out_shape else 1
    rows = _prod(out_shape[:-1])
    out_dims = list(out_shape) or [1]
    if len(dims) >= 2 and dims[-2] == len(shape) - 1 and 2 <= row_len <= _MAX_INTERLEAVED and out_shape[-2] >= 4:
        return _interleave(shape, out_shape, strides)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)

        def emit(row, col):
            source = _strided_index(row, col, out_dims, strides or [0])
            I.buffer_store(y_flat, x_flat[source], [row * row_len + col])

        _for_each(rows, row_len, emit)

    return _prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


_MAX_INTERLEAVED = 8  # vectors one shuffle interleaves (a stride-8 transposed conv's phases)


def _interleave(shape, out_shape, strides) -> tirx.PrimFunc:
    """A transpose whose output's last axis is short (``r`` <= 8) and whose next-to-last is the
    input's contiguous one: each output row interleaves ``r`` contiguous input runs, as a
    transposed convolution's stacked phases become its output rows (``[.., sw, .., qw] -> [..,
    qw, sw]``). The generic kernel would vectorize along rows of ``r`` elements, gathering; here
    ``r`` vector loads of 16 (or of a shorter row's length) are shuffled into ``16 r``
    consecutive outputs."""
    r, length = out_shape[-1], out_shape[-2]
    rows, row_len = _prod(out_shape[:-2]), length * r
    lead_dims, lead_strides, phase_stride = list(out_shape[:-2]) or [1], list(strides[:-2]) or [0], strides[-1]
    width = min(LANES, length)
    interleaved = [tirx.const((j % r) * width + j // r, "int32") for j in range(width * r)]
    full = length // width

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        with _parallel_or_serial(rows, rows * row_len) as row:
            base = _strided_index(row, tirx.const(0, "int32"), lead_dims + [1], lead_strides + [0])
            if full:
                with I.serial(0, full) as v:
                    runs = [x_flat[tirx.Ramp(base + k * phase_stride + v * width, 1, width)] for k in range(r)]
                    I.buffer_store(y_flat, tirx.Shuffle(runs, interleaved),
                                   [tirx.Ramp(row * row_len + v * (width * r), 1, width * r)])
            if length % width:
                with I.vectorized(0, (length % width) * r) as j:
                    column = full * width + j // r
                    I.buffer_store(y_flat, x_flat[base + (j % r) * phase_stride + column],
                                   [row * row_len + full * width * r + j])

    return _prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


# --------------------------------------------------------------------------------------------
# Pooling and reductions
# --------------------------------------------------------------------------------------------
def _pool_geometry(input_shape, kernel, stride, padding, dilation, ceil_mode: bool = False):
    n, c, h, w = (int(s) for s in input_shape)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel, stride, padding, dilation))
    # PyTorch's rule (csqc.numerics): ceil_mode adds a last window that starts inside the input
    # or its left padding; its taps past the input are skipped like padding taps
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"pooling output would be empty ({oh}x{ow})")
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow)


def _pool2d(kind: str, input_shape, kernel, stride, padding, dilation, finish: Callable,
            ceil_mode: bool = False) -> tirx.PrimFunc:
    """Window reduction (``kind`` max or sum) over NCHW, then ``finish(total, oh, ow)``.

    One parallel task per output row.  Out-of-range input rows are skipped (uniform test;
    -inf / 0 padding never changes a max / sum).  Output columns whose windows lie inside the
    row are computed 16 at a time: for stride ``s`` a contiguous ``16*s``-wide load is
    de-interleaved with a shuffle (a strided load would be 16 scalar loads).  The few border
    columns run scalar with per-tap tests.
    """
    (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _pool_geometry(
        input_shape, kernel, stride, padding, dilation, ceil_mode)
    combine = tirx.Max if kind == "max" else (lambda a, b: a + b)
    init = _f32(-np.inf) if kind == "max" else _f32(0.0)
    # Columns whose every tap, and the (s - 1) extra lanes the wide load reads, are in the row.
    first = -(-pw // sw)
    last = (w - sw + pw - (kw - 1) * dw) // sw
    interior = max(0, min(last, ow - 1) - first + 1)
    if interior == 0:
        first = ow  # everything is border

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)

        def tap_rows(out_row, emit_row):
            for ki in range(kh):
                ih = out_row * sh - ph + ki * dh
                with I.If(tirx.all(ih >= 0, ih < h)):
                    with I.Then():
                        emit_row(ih, ki)

        def vector_segment(plane, out_row, col0, width):
            acc = _local((width,))
            I.buffer_store(acc, tirx.Broadcast(init, width) if width > 1 else init,
                           [tirx.Ramp(0, 1, width)] if width > 1 else [0])

            def emit_row(ih, _ki):
                for kj in range(kw):
                    start = plane * (h * w) + ih * w + col0 * sw - pw + kj * dw
                    if sw == 1 or width == 1:
                        window = x_flat[tirx.Ramp(start, 1, width)] if width > 1 else x_flat[start]
                    else:
                        wide = x_flat[tirx.Ramp(start, 1, width * sw)]
                        window = tirx.Shuffle([wide], [tirx.IntImm("int32", lane * sw) for lane in range(width)])
                    index = [tirx.Ramp(0, 1, width)] if width > 1 else [0]
                    I.buffer_store(acc, combine(tirx.BufferLoad(acc, index), window), index)

            tap_rows(out_row, emit_row)
            with I.vectorized(0, width) as lane:
                out = (plane * oh + out_row) * ow + col0 + lane
                I.buffer_store(y_flat, finish(acc[lane], out_row, col0 + lane), [out])

        def scalar_column(plane, out_row, col):
            acc = _local((1,))
            I.buffer_store(acc, init, [0])

            def emit_row(ih, _ki):
                for kj in range(kw):
                    iw = col * sw - pw + kj * dw
                    with I.If(tirx.all(iw >= 0, iw < w)):
                        with I.Then():
                            I.buffer_store(acc, combine(acc[0], x_flat[plane * (h * w) + ih * w + iw]), [0])

            tap_rows(out_row, emit_row)
            I.buffer_store(y_flat, finish(acc[0], out_row, col), [(plane * oh + out_row) * ow + col])

        with _parallel_or_serial(n * c * oh, n * c * oh * ow * kh * kw) as task:
            plane, out_row = task // oh, task % oh
            if first > 0:
                with I.serial(0, first) as col:
                    scalar_column(plane, out_row, col)
            if interior:
                full, rest = divmod(interior, LANES)
                if full:
                    with I.serial(0, full) as v:
                        vector_segment(plane, out_row, first + v * LANES, LANES)
                if rest:
                    vector_segment(plane, out_row, first + full * LANES, rest)
            done = first + interior
            if done < ow:
                with I.serial(0, ow - done) as col:
                    scalar_column(plane, out_row, done + col)

    params = [("x", (n, c, h, w), F32), ("y", (n, c, oh, ow), F32)]
    return _prim_func(params, body)


def max_pool2d(input_shape, kernel, stride, padding=(0, 0), dilation=(1, 1), ceil_mode: bool = False) -> tirx.PrimFunc:
    """Max pooling, padding with -inf (exact).  Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    return _pool2d("max", input_shape, kernel, stride, padding, dilation, lambda total, _r, _c: total, ceil_mode)


def avg_pool2d(input_shape, kernel, stride, padding=(0, 0), count_include_pad: bool = True,
               divisor: int = 0, ceil_mode: bool = False) -> tirx.PrimFunc:
    """Average pooling as the interpreter computes it: the window sum, then one division by
    ``divisor`` (or ``KH*KW``), or by the window's size clipped to the padded input (a
    ceil_mode window running past it) or, when padding is excluded, to the input.
    Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), _, _ = _pool_geometry(input_shape, kernel, stride, padding, (1, 1))
    if not divisor and (ceil_mode or (not count_include_pad and (ph or pw))):
        # the window's cells inside [lo, hi) of each axis (csqc.numerics._window_counts)
        pad_h, pad_w = (ph, pw) if count_include_pad else (0, 0)

        def finish(total, out_row, col):
            top, left = out_row * sh - ph, col * sw - pw
            rows = tirx.min(top + kh, h + pad_h) - tirx.max(top, -pad_h)
            cols = tirx.min(left + kw, w + pad_w) - tirx.max(left, -pad_w)
            return total / tirx.Cast(F32, rows * cols)
    else:
        def finish(total, _r, _c):
            return total / _f32(divisor or kh * kw)
    return _pool2d("sum", input_shape, kernel, stride, padding, (1, 1), finish, ceil_mode)


def _emit_row_mean(x_flat, y_flat, rows: int, row_len: int, count: int):
    """``y[r] = sum(x[r, :]) / count`` over contiguous rows: 16-lane partial sums, then a fold."""
    _emit_row_reduce(x_flat, y_flat, rows, row_len, *_REDUCTIONS["mean"](count))


# kind -> count -> (start, combine, finish) of a reduction
_REDUCTIONS = {
    "mean": lambda count: (_f32(0.0), lambda a, b: a + b, lambda total: total / _f32(count)),
    "max": lambda count: (_f32(float("-inf")), tirx.Max, lambda total: total),
}


def _emit_row_reduce(x_flat, y_flat, rows: int, row_len: int, start, combine: Callable, finish: Callable):
    """``y[r] = finish(combine(...combine(start, x[r, 0])..., x[r, -1]))`` over contiguous rows:
    16-lane partials, then a fold of the lanes and the row's tail, in that order."""
    full, tail = divmod(row_len, LANES)
    with _parallel_or_serial(rows, rows * row_len) as row:
        partial = _local((LANES,))
        total = _local((1,))
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(partial, start, [lane])
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(partial, combine(partial[lane], x_flat[row * row_len + v * LANES + lane]), [lane])
        I.buffer_store(total, start, [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(total, combine(total[0], partial[lane]), [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(total, combine(total[0], x_flat[row * row_len + full * LANES + t]), [0])
        I.buffer_store(y_flat, finish(total[0]), [row])


def _uneven_adaptive_avg_pool2d(n: int, c: int, h: int, w: int, oh: int, ow: int) -> tirx.PrimFunc:
    """Windows ``[floor(i*H/OH), ceil((i+1)*H/OH))`` of varying size: one task per output row,
    a scalar window sum (row by row), then one division by the window's size."""

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        with _parallel_or_serial(n * c * oh, n * c * h * w) as task:
            plane, i = task // oh, task % oh
            h0, h1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            with I.serial(0, ow) as j:
                w0, w1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                acc = _local((1,))
                I.buffer_store(acc, _f32(0.0), [0])
                with I.serial(0, h1 - h0) as r:
                    with I.serial(0, w1 - w0) as s:
                        I.buffer_store(acc, acc[0] + x_flat[plane * (h * w) + (h0 + r) * w + w0 + s], [0])
                I.buffer_store(y_flat, acc[0] / tirx.Cast(F32, (h1 - h0) * (w1 - w0)), [(plane * oh + i) * ow + j])

    return _prim_func([("x", (n, c, h, w), F32), ("y", (n, c, oh, ow), F32)], body)


def adaptive_avg_pool2d(input_shape, output_size) -> tirx.PrimFunc:
    """Adaptive average pooling (float32 window sum / window size), PyTorch's windows.
    Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    n, c, h, w = (int(s) for s in input_shape)
    oh, ow = _pair(output_size)
    if h % oh or w % ow:
        return _uneven_adaptive_avg_pool2d(n, c, h, w, oh, ow)
    if (oh, ow) != (1, 1):
        return avg_pool2d(input_shape, (h // oh, w // ow), (h // oh, w // ow), (0, 0), True, 0)

    def body(x, y):
        _emit_row_mean(_flat(x), _flat(y), n * c, h * w, h * w)

    return _prim_func([("x", (n, c, h, w), F32), ("y", (n, c, 1, 1), F32)], body)


def mean(shape, dims: Sequence[int], keepdim: bool) -> tirx.PrimFunc:
    """``y = x.mean(dims, keepdims=keepdim)`` in float32 (sum, then divide by the count).
    Parameters: ``x: f32[shape], y: f32[out_shape]``.

    Trailing reduced dimensions (the usual ``mean((2, 3))``) are contiguous rows: vectorized
    partial sums.  Other layouts reduce with scalar loops per output element.
    """
    return _reduction(shape, dims, keepdim, "mean")


def amax(shape, dims: Sequence[int], keepdim: bool) -> tirx.PrimFunc:
    """``y = x.amax(dims, keepdims=keepdim)`` (max is exact in any order: every runtime's bits
    agree). Parameters and layouts as :func:`mean`'s."""
    return _reduction(shape, dims, keepdim, "max")


def _reduction(shape, dims: Sequence[int], keepdim: bool, kind: str) -> tirx.PrimFunc:
    """:func:`mean` (``kind`` "mean") or :func:`amax` ("max")."""
    shape = tuple(int(s) for s in shape)
    reduced = sorted({int(d) % len(shape) for d in dims})
    kept = [d for d in range(len(shape)) if d not in reduced]
    out_shape = tuple(1 if d in reduced else shape[d] for d in range(len(shape))) if keepdim else tuple(shape[d] for d in kept)
    count = _prod(shape[d] for d in reduced)
    n_out = _prod(shape[d] for d in kept)
    trailing = reduced == list(range(len(shape) - len(reduced), len(shape)))

    start, combine, finish = _REDUCTIONS[kind](count)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        if trailing:
            _emit_row_reduce(x_flat, y_flat, n_out, count, start, combine, finish)
            return
        in_strides = [_prod(shape[d + 1 :]) for d in range(len(shape))]
        with _parallel_or_serial(n_out, n_out * count) as out:
            base, rest = tirx.const(0, "int32"), out
            for d in reversed(kept):
                base = base + (rest % shape[d]) * in_strides[d]
                rest = rest // shape[d]
            total = _local((1,))
            I.buffer_store(total, start, [0])
            with I.serial(0, count) as r:
                offset, rest = base, r
                for d in reversed(reduced):
                    offset = offset + (rest % shape[d]) * in_strides[d]
                    rest = rest // shape[d]
                I.buffer_store(total, combine(total[0], x_flat[offset]), [0])
            I.buffer_store(y_flat, finish(total[0]), [out])

    return _prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


def softmax(shape, axis: int) -> tirx.PrimFunc:
    """``e = exp(x - max(x, axis)); y = e / sum(e, axis)`` (the interpreter's order).
    Parameters: ``x: f32[shape], y: f32[shape]``.

    The tensor is viewed as ``[outer, A, inner]``.  With ``inner == 1`` (softmax over the last
    axis) each row is reduced with 16-lane vectors; otherwise 16 columns of ``inner`` are
    processed side by side, each lane its own softmax.  ``exp`` is LLVM's (libm) exp, so
    results can differ from numpy's in the last ulp.
    """
    shape = tuple(int(s) for s in shape)
    axis, outer, length, inner = _channel_view(shape, axis)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        if inner == 1:
            _emit_row_softmax(x_flat, y_flat, outer, length)
            return
        blocks = -(-inner // LANES)
        with _parallel_or_serial(outer * blocks, outer * length * inner) as task:
            row, block = task // blocks, task % blocks
            full, tail = divmod(inner, LANES)

            def columns(width):
                col0 = block * LANES
                peak, total = _local((width,)), _local((width,))
                with I.vectorized(0, width) as lane:
                    I.buffer_store(peak, _f32(-np.inf), [lane])
                    I.buffer_store(total, _f32(0.0), [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(peak, tirx.Max(peak[lane], x_flat[(row * length + a) * inner + col0 + lane]), [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        at = (row * length + a) * inner + col0 + lane
                        I.buffer_store(y_flat, _exp(x_flat[at] - peak[lane]), [at])
                        I.buffer_store(total, total[lane] + y_flat[at], [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        at = (row * length + a) * inner + col0 + lane
                        I.buffer_store(y_flat, y_flat[at] / total[lane], [at])

            if not tail:
                columns(LANES)
            elif not full:
                columns(tail)
            else:
                with I.If(block < full):
                    with I.Then():
                        columns(LANES)
                    with I.Else():
                        columns(tail)

    return _prim_func([("x", shape, F32), ("y", shape, F32)], body)


def _emit_row_softmax(x_flat, y_flat, rows: int, length: int):
    full, tail = divmod(length, LANES)
    with _parallel_or_serial(rows, rows * length * 8) as row:
        peak, total = _local((LANES,)), _local((LANES,))
        row_max, row_sum = _local((1,)), _local((1,))
        base = row * length
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(peak, _f32(-np.inf), [lane])
            I.buffer_store(total, _f32(0.0), [lane])
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(peak, tirx.Max(peak[lane], x_flat[base + v * LANES + lane]), [lane])
        I.buffer_store(row_max, _f32(-np.inf), [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(row_max, tirx.Max(row_max[0], peak[lane]), [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(row_max, tirx.Max(row_max[0], x_flat[base + full * LANES + t]), [0])

        def exp_and_sum(_row, col):
            I.buffer_store(y_flat, _exp(x_flat[base + col] - row_max[0]), [base + col])

        _vector_span(exp_and_sum, row, 0, length)
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(total, total[lane] + y_flat[base + v * LANES + lane], [lane])
        I.buffer_store(row_sum, _f32(0.0), [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(row_sum, row_sum[0] + total[lane], [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(row_sum, row_sum[0] + y_flat[base + full * LANES + t], [0])
        _vector_span(lambda _r, col: I.buffer_store(y_flat, y_flat[base + col] / row_sum[0], [base + col]), row, 0, length)


# --------------------------------------------------------------------------------------------
# Transformer blocks: batched matmul, layer norm, gelu
# --------------------------------------------------------------------------------------------
def matmul(a_shape, b_shape) -> tirx.PrimFunc:
    """``y = a @ b`` (numpy ``matmul`` of two float tensors of rank >= 2, batch dims broadcast).

    Parameters: ``a: f32[..., M, K], b: f32[..., K, N], y: f32[..., M, N]``.

    Schedule: one task per output row (parallel when the product is large enough), the row
    cut into column tiles of up to 64 (4 vectors); per tile, a register accumulator takes
    ``a[m, k] * b[k, tile]`` (one broadcast, contiguous vector loads of ``b``) for every ``k``.
    """
    a_shape, b_shape = tuple(int(s) for s in a_shape), tuple(int(s) for s in b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[-1] != b_shape[-2]:
        raise ValueError(f"cannot matmul {a_shape} @ {b_shape}")
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = tuple(int(s) for s in np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    out_shape = batch + (m, n)
    a_strides = [s * m * k for s in _broadcast_strides(a_shape[:-2], batch)] if batch else []
    b_strides = [s * k * n for s in _broadcast_strides(b_shape[:-2], batch)] if batch else []
    batches = _prod(batch)
    tiles = _row_tiles(n, 4 * LANES)

    def batch_offset(index, strides):
        offset, rest = tirx.const(0, "int32"), index
        for size, stride in zip(reversed(batch), reversed(strides)):
            if stride:
                offset = offset + (rest % size) * stride
            rest = rest // size
        return offset

    def body(a, b, y):
        a_flat, b_flat, y_flat = _flat(a), _flat(b), _flat(y)
        with _parallel_or_serial(batches * m, batches * m * n * k) as task:
            bi, row = task // m, task % m
            a_row = batch_offset(bi, a_strides) + row * k
            b_base = batch_offset(bi, b_strides)
            start = 0
            for count, width in tiles:
                acc = _local((width,))
                with I.serial(0, count) as t:
                    col0 = start + t * width
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(acc, _f32(0.0), [lane])
                    with I.serial(0, k) as kk:
                        with I.vectorized(0, width) as lane:
                            product = a_flat[a_row + kk] * b_flat[b_base + kk * n + col0 + lane]
                            I.buffer_store(acc, acc[lane] + product, [lane])
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(y_flat, acc[lane], [task * n + col0 + lane])
                start += count * width

    return _prim_func([("a", a_shape, F32), ("b", b_shape, F32), ("y", out_shape, F32)], body)


def _emit_row_sum(value: Callable, length: int, total):
    """``total[0] = sum(value(i) for i in range(length))``: 16-lane partial sums, then a fold."""
    full, tail = divmod(length, LANES)
    partial = _local((LANES,))
    with I.vectorized(0, LANES) as lane:
        I.buffer_store(partial, _f32(0.0), [lane])
    if full:
        with I.serial(0, full) as v:
            with I.vectorized(0, LANES) as lane:
                I.buffer_store(partial, partial[lane] + value(v * LANES + lane), [lane])
    I.buffer_store(total, _f32(0.0), [0])
    with I.unroll(0, LANES) as lane:
        I.buffer_store(total, total[0] + partial[lane], [0])
    if tail:
        with I.serial(0, tail) as t:
            I.buffer_store(total, total[0] + value(full * LANES + t), [0])


def layer_norm(shape, axis: int, eps: float) -> tirx.PrimFunc:
    """Layer norm over the trailing axes from ``axis`` (the interpreter's order, float32):
    ``mean = sum(x) / D; d = x - mean; var = sum(d * d) / D; y = (d / sqrt(var + eps)) * w + b``.

    Parameters: ``x: f32[shape], w: f32[shape[axis:]], b: f32[shape[axis:]], y: f32[shape]``.
    One task per row of ``D`` elements (parallel when large): two vectorized reductions, then
    a vectorized normalize (the product by ``w`` rounded before ``+ b``: no FMA).
    """
    shape = tuple(int(s) for s in shape)
    axis = axis % len(shape)
    rows, length = _prod(shape[:axis]), _prod(shape[axis:])
    normalized = shape[axis:]

    def body(x, w, b, y):
        x_flat, y_flat, w_flat, b_flat = _flat(x), _flat(y), _flat(w), _flat(b)
        with _parallel_or_serial(rows, rows * length * 4) as row:
            base = row * length
            total, mean, denom = _local((1,)), _local((1,)), _local((1,))
            _emit_row_sum(lambda i: x_flat[base + i], length, total)
            I.buffer_store(mean, total[0] / _f32(length), [0])
            _emit_row_sum(lambda i: (x_flat[base + i] - mean[0]) * (x_flat[base + i] - mean[0]), length, total)
            I.buffer_store(denom, tirx.sqrt(total[0] / _f32(length) + _f32(eps)), [0])

            def emit(_row, col):
                scaled = _rounded(((x_flat[base + col] - mean[0]) / denom[0]) * w_flat[col])
                I.buffer_store(y_flat, scaled + b_flat[col], [base + col])

            _vector_span(emit, row, 0, length)

    return _prim_func([("x", shape, F32), ("w", normalized, F32), ("b", normalized, F32), ("y", shape, F32)], body)


# Rational approximation of erf on [-4, 4] (Eigen's / TVM's fast_erf; |error| < 1e-6 there, and
# erf(x) rounds to +-1 in float32 beyond): vectorizes, where LLVM would call libm's scalar erff.
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)


def _erf(value):
    """float32 ``erf(value)``, within 4e-7 of the true one: clamps by selects, as :func:`_exp`'s,
    so a NaN stays NaN, and the rational form's result kept in [-1, 1] (near 4 it rose above 1 by
    an ulp)."""
    x = tirx.Select(value > _f32(4.0), _f32(4.0), value)
    x = tirx.Select(x < _f32(-4.0), _f32(-4.0), x)
    x2 = x * x
    p = _f32(_ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = p * x2 + _f32(c)
    q = _f32(_ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = q * x2 + _f32(c)
    y = (x * p) / q
    y = tirx.Select(y > _f32(1.0), _f32(1.0), y)
    return tirx.Select(y < _f32(-1.0), _f32(-1.0), y)


def _gelu(value, approximate: str):
    """The interpreter's ``(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`` or its tanh form."""
    if approximate == "tanh":
        inner = _f32(0.7978845608028654) * (value + _f32(0.044715) * ((value * value) * value))
        t = tirx.tanh(inner)
    else:
        t = _erf(value * _f32(0.7071067811865476))
    return (value * _f32(0.5)) * (_f32(1.0) + t)


def gelu(shape, approximate: str = "none") -> tirx.PrimFunc:
    """``y = gelu(x)`` (``approximate``: ``none``, the erf form, or ``tanh``).
    Parameters: ``x: f32[shape], y: f32[shape]`` (parallel chunks, 16-lane vectors)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    shape = tuple(int(s) for s in shape)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, _gelu(x_flat[i], approximate), [i]))

    return _prim_func([("x", shape, F32), ("y", shape, F32)], body)
