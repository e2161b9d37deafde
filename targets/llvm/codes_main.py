"""The signature of the kernels that write a calibrated conv's codes themselves, their
accumulators never stored (``kernels.bitparallel_conv2d_codes``, ``amx.amx_pointwise_codes``):
what the codes are (:class:`ConvCodes`) and the PrimFunc around a kernel's task loop
(:func:`codes_main`), so both kernels take the same parameters in the same order."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["ConvCodes", "codes_main"]


@dataclass(frozen=True)
class ConvCodes:
    """A calibrated conv's output codes, written by its kernel itself:
    ``steps`` of the threshold search (``code_thresholds.code_tables(wide=True)``), 0 for each
    channel's fixed-point form (``code_form``); the codes' levels, static scale and layout
    (``glue.store_searched_codes``: offset codes, or a positive and a negative part); whether
    the accumulators carry a per-channel offset (``acc_offset``, offset input codes)."""

    steps: int
    out_levels: int
    out_scale: float
    out_offset: bool = False
    two_parts: bool = False
    has_offset: bool = False


def codes_main(input_shape, out_shape, w_t, codes: ConvCodes, tasks) -> tirx.PrimFunc:
    """The PrimFunc of a codes-writing conv whose body is the macro
    ``tasks(x, w, acc_offset, thresholds, base, flip, pos, neg)`` (``acc_offset`` and ``neg`` None
    where absent; ``pos``, ``neg`` the flat code buffers)::

        main(x: uint8[B, C, H, W], w: w_t, acc_offset: int32[O] (has_offset),
             code_thresholds: int16[O*E + 32 - E] | code_form: int16[O * FORM_FIELDS],
             code_base: int8[O], acc_flip: int8[O], out_scale: float32[1],
             codes_pos: uint8[out_shape], codes_neg: uint8[out_shape] (two_parts))

    ``E = 2**steps - 1``. It stores the static output scale. (TVMScript has no optional
    parameters: one signature per variant.)"""
    from csqc.targets.tvm.code_thresholds import FORM_FIELDS

    from .glue import SEARCH_LANES

    B, C, H, W = (int(v) for v in input_shape)
    out_shape = tuple(int(v) for v in out_shape)
    O, P, lanes = out_shape[1], math.prod(out_shape[2:]), SEARCH_LANES
    entries = 2**codes.steps - 1
    x_t = T.Buffer((B, C, H, W), "uint8")
    table_t = T.Buffer((O * entries + lanes - entries if codes.steps else O * FORM_FIELDS,), "int16")
    offset_t, base_t, flip_t, scale_t = (T.Buffer((O,), "int32"), T.Buffer((O,), "int8"), T.Buffer((O,), "int8"),
                                         T.Buffer((1,), "float32"))
    pos_t, neg_t = T.Buffer(out_shape, "uint8"), T.Buffer(out_shape, "uint8")
    out_scale = codes.out_scale

    def flat(buffer):
        return T.decl_buffer((B * O * P,), "uint8", data=buffer.data)

    if codes.has_offset and codes.two_parts:
        @T.prim_func
        def main(x: x_t, w: w_t, acc_offset: offset_t, thresholds: table_t, base: base_t, flip: flip_t,
                 scale: scale_t, codes_pos: pos_t, codes_neg: neg_t):
            T.func_attr({"tir.noalias": True})
            scale[0] = T.float32(out_scale)
            tasks(x, w, acc_offset, thresholds, base, flip, flat(codes_pos), flat(codes_neg))
    elif codes.has_offset:
        @T.prim_func
        def main(x: x_t, w: w_t, acc_offset: offset_t, thresholds: table_t, base: base_t, flip: flip_t,
                 scale: scale_t, codes_pos: pos_t):
            T.func_attr({"tir.noalias": True})
            scale[0] = T.float32(out_scale)
            tasks(x, w, acc_offset, thresholds, base, flip, flat(codes_pos), None)
    elif codes.two_parts:
        @T.prim_func
        def main(x: x_t, w: w_t, thresholds: table_t, base: base_t, flip: flip_t, scale: scale_t,
                 codes_pos: pos_t, codes_neg: neg_t):
            T.func_attr({"tir.noalias": True})
            scale[0] = T.float32(out_scale)
            tasks(x, w, None, thresholds, base, flip, flat(codes_pos), flat(codes_neg))
    else:
        @T.prim_func
        def main(x: x_t, w: w_t, thresholds: table_t, base: base_t, flip: flip_t, scale: scale_t,
                 codes_pos: pos_t):
            T.func_attr({"tir.noalias": True})
            scale[0] = T.float32(out_scale)
            tasks(x, w, None, thresholds, base, flip, flat(codes_pos), None)

    return main
