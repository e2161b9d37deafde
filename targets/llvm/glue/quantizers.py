"""Activation quantizers (symmetric and asymmetric, dynamic or static scales) and dequantize:
the max-abs reductions, the proved reciprocal forms of the divide, and the code stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as I

from ..reciprocal import code_form, reciprocal_parts
from .common import (
    _channel_view, _divided, F32, _f32, _flat, _fma, _for_each, _keeping_nan, LANES, _levels, _levels_reciprocal, _local,
    _nan_sticky_max, _on_divisor_range, _parallel_or_serial, prim_func, _prod, _QUOTIENT_MIN_ELEMENTS, _round_to_int,
    _rounded)


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
                    I.buffer_store(running, _nan_sticky_max(running[lane], value), [lane])
            with I.vectorized(0, unit) as lane:
                I.buffer_store(partial, running[lane], [task * unit + lane])
        with I.serial(0, tasks * unit) as i:
            I.buffer_store(scale, _nan_sticky_max(scale[0], partial[i]), [0])
    if remainder:
        with I.serial(0, remainder) as i:
            I.buffer_store(scale, _nan_sticky_max(scale[0], tirx.abs(x_flat[units * unit + i])), [0])


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
                    I.buffer_store(running, _nan_sticky_max(running[lane], value), [lane])
        if tail:
            with I.vectorized(0, tail) as lane:
                value = tirx.abs(value_at(*index(row, full * LANES + lane)))
                I.buffer_store(running, _nan_sticky_max(running[lane], value), [lane])
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(partial, running[lane], [row * LANES + lane])
    # the rows' partial maxima a vector at a time, then the 16 lanes (a scalar max per partial
    # was a 4-cycle chain of rows * 16 links: ~3 us at 160 channels)
    folded = _local((LANES,))
    with I.vectorized(0, LANES) as lane:
        I.buffer_store(folded, _f32(0.0), [lane])
    with I.serial(0, rows) as r:
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(folded, _nan_sticky_max(folded[lane], partial[r * LANES + lane]), [lane])
    I.buffer_store(scale, _f32(0.0), [0])
    with I.serial(0, LANES) as lane:
        I.buffer_store(scale, _nan_sticky_max(scale[0], folded[lane]), [0])


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
        I.buffer_store(running, _nan_sticky_max(running[lane], _nan_sticky_max(tirx.abs(value_of(acc_of(low, c), c)),
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
        I.buffer_store(scale, _nan_sticky_max(scale[0], running[lane]), [0])


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

    return prim_func(params, body)


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


def _nan_sticky(combine):
    """``combine`` (float min or max) returning a NaN operand, so that a NaN in the tensor makes
    the dynamic range NaN, which the runtime refuses (LLVM's float min / max may drop it)."""
    return lambda a, b: _keeping_nan(a, _keeping_nan(b, combine(a, b)))


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

    return prim_func(params, body)


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
        _emit_fold(x_flat, n, lo, _nan_sticky(tirx.Min))
        _emit_fold(x_flat, n, hi, _nan_sticky(tirx.Max))
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

    return prim_func(params, body)
