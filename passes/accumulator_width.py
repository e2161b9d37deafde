"""accumulator_width: prove each quantized layer's accumulator cannot overflow, pick its width.

For a layer with activation codes of magnitude at most ``L = 2^a - 1`` the accumulator of
output ``o`` is bounded by ``L * sum_k |q[o, k]|``; bit-serial kernels also hold the partial
sums of every plane (``L * sum_planes 2^shift * popcount``) and the offset correction
``z * L * K`` (their sum where ``z < 0``), for any prefix of the planes (the run-time plane
knob) with its zero point. The largest bound decides ``int32`` (below 2^31) or ``int64``.
Float-input layers keep ``int32`` (they have no integer accumulator). ``changed``: a width changed.
"""
from __future__ import annotations

import numpy as np

from csqc.bitplanes import kept_zero_point, plane_popcounts
from csqc.interpreter import decode_weight_rows
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["accumulator_width", "accumulator_bound"]

INT32_LIMIT = 2**31 - 1


def accumulator_bound(g: Graph, n) -> int:
    """Worst-case magnitude of any partial sum the layer's kernels can form."""
    spec = n.quant
    levels = 2**spec.act_bits - 1 if spec.act_bits else 0
    shape = n.attr("weight_shape")
    k = int(np.prod(shape[1:]))
    bound = _largest_abs_row_sum(g, n) * levels
    if spec.encoding != "int":
        w = g.params[n.layer.weight]
        if spec.packed_word:
            counts = plane_popcounts(w)  # [planes, rows] set bits, read from the words
        else:
            counts = w.reshape(len(spec.planes), shape[0], k).sum(axis=2, dtype=np.int64)  # no -1: P may be 0
        plane_sum = sum((1 << s) * counts[i] for i, (s, _) in enumerate(spec.planes)) if spec.planes else 0
        # any prefix of the planes (the run-time knob) with its zero point z': per pass the codes
        # are >= 0, so the planes' sum and z' * sum(codes) are both >= 0 and a zero point >= 0
        # subtracts (the larger of the two bounds it); a negative one (all weights > 0) adds
        shifts = [s for s, _ in spec.planes]
        kept_points = [kept_zero_point(spec.zero_point, shifts, kept) for kept in range(1, len(shifts) + 1)]
        largest_plane_sum = int(np.max(plane_sum, initial=0))
        zero_point = max(map(abs, kept_points), default=abs(spec.zero_point))
        joined = largest_plane_sum + zero_point * k if min(kept_points, default=spec.zero_point) < 0 else 0
        bound = max(bound, largest_plane_sum * levels, zero_point * k * levels, joined * levels)
    return bound


def _largest_abs_row_sum(g: Graph, n, rows_per_block: int = 256) -> int:
    """``max_row sum|q|``, decoding a block of output rows at a time (int64 weights of the whole
    layer would cost 8 bytes per weight)."""
    out = n.attr("weight_shape")[0]
    largest = 0
    for start in range(0, out, rows_per_block):
        q = decode_weight_rows(g, n, start, min(out, start + rows_per_block))
        largest = max(largest, int(np.abs(q.reshape(q.shape[0], -1)).sum(axis=1).max(initial=0)))
    return largest


@register()
def accumulator_width(g: Graph) -> PassResult:
    """Choose int32 or int64 accumulators from a worst-case bound (see module docstring)."""
    updated = {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS:
            continue
        width = "int64" if n.quant.act_bits and accumulator_bound(g, n) > INT32_LIMIT else "int32"
        if width != n.quant.acc_dtype:
            updated[n.name] = n.replace(quant=n.quant.replace(acc_dtype=width))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated), True)
