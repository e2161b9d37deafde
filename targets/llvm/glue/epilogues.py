"""The float epilogue of quantized layers: ``acc`` (less its offsets) times the scales, bias
and activation, optionally fused with the next quantizer's codes (static, or dynamic through the
threshold search of :mod:`.code_search`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as I

from csqc.targets.tvm.code_thresholds import FORM_FIELDS
from .common import (
    _activation, _channel_view, _check_act, _divided, F32, _f32, _flat, _for_each_channel, LANES, _less_offset,
    _levels, _levels_reciprocal, _on_divisor_range, prim_func, _prod, _QUOTIENT_MIN_ELEMENTS, _rounded,
    _vector_span)
from .quantizers import (
    _Divisor, _divisor_of, _emit_channel_abs_max, _emit_channel_abs_max_of_monotone, _on_split_form, _signed_code,
    _split_form_pays, _store_codes)
from .code_search import (
    _check_code_search, dynamic_search_fits, DYNAMIC_SEARCH_MIN_ROW, _emit_code_search, _emit_dynamic_code_search,
    SEARCH_LANES)


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
    # (an integer layer's value is finite: its scale was checked)
    return _activation(value, act, clip_lo, clip_hi, keep_nan=levels is None)


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
             code_form: bool = False, dynamic_search: bool = False, skip_when_done: bool = False,
             saturated_codes: tuple[float, float, int] | None = None) -> tirx.PrimFunc:
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

    ``saturated_codes`` ``(in_bound, out_bound, steps)`` (a dynamic output scale whose layer sits
    between two clips from 0: its input codes' scale is at most ``in_bound``, ``S' = max|y| <=
    out_bound``): the parameters of ``code_search`` (``steps`` > 0) or ``code_form`` (0) follow
    ``add``, built for the static scales ``(in_bound, out_bound)``; where this call's input scale
    and the ``S'`` its first pass found are both the bounds, the codes pass runs them instead of
    the dynamic one. The same codes: at ``S' = out_bound`` the dynamic quantizer's codes are the
    static scale's (no value exceeds it, so none is clamped).

    ``skip_when_done``: a last parameter ``done: int32[1]``; the kernel does nothing where it is
    not 0 (the conv before it wrote the layer's codes and scale:
    ``kernels.bitparallel_depthwise_saturated_codes``).
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
    if saturated_codes is not None:
        if code_search or code_form or out_scale != 0:
            raise ValueError("saturated_codes is a dynamic output scale's alternative codes pass")
        _check_code_search(shape, channel_axis, levels, out_bits, saturated_codes[1], storage, has_neg, has_zero_point,
                           has_residual, keep_y, saturated_codes[2] or 1)
        if out_signed or out_offset or not min(saturated_codes[:2]) > 0:
            raise ValueError("saturated_codes takes unsigned codes between clips from 0 (positive bounds)")
    search_steps = code_search or (saturated_codes[2] if saturated_codes is not None else 0)
    if search_steps:
        entries = 2**search_steps - 1
        params += [("code_thresholds", (channels * entries + SEARCH_LANES - entries,), "int16"),
                   ("code_base", (channels,), "int8"), ("acc_flip", (channels,), "int8")]
    elif code_form or saturated_codes is not None:
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

    if skip_when_done:
        params.append(("done", (1,), "int32"))

    def body(*buffers):
        if not skip_when_done:
            emit(*buffers)
            return
        with I.If(buffers[-1][0] == 0):
            with I.Then():
                emit(*buffers[:-1])

    def emit(*buffers):
        named = dict(zip([p[0] for p in params], buffers))
        acc_flat = _flat(named["acc"])
        y_flat = _flat(named["y"]) if "y" in named else None
        residual_flat = _flat(named["residual"]) if has_residual else None
        neg_flat = _flat(named["acc_neg"]) if has_neg else None
        acc_offset = named.get("acc_offset")

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

        def dynamic_codes():
            """The dynamic scale's codes pass (the scale found above)."""
            if dynamic_search:
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

        if code_search or code_form:
            _emit_code_search(shape, channel_axis, acc_flat, acc_offset, named, code_parts, out_levels, out_offset,
                              code_search)
        elif saturated_codes is not None:
            in_bound, out_bound, steps = saturated_codes
            with I.If(tirx.And(named["scale"][0] == _f32(in_bound), out_scale_buf[0] == _f32(out_bound))):
                with I.Then():
                    _emit_code_search(shape, channel_axis, acc_flat, acc_offset, named, code_parts, out_levels,
                                      out_offset, steps)
                with I.Else():
                    dynamic_codes()
        else:
            dynamic_codes()

    return prim_func(params, body)
