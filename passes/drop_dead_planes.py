"""drop_dead_planes: remove planes that contribute nothing and shift out common low zero bits.

Matches quantized layers. For plane encodings it drops all-zero planes (masked positions,
and active positions no weight uses) and, for ``offset``, folds all-one planes into the zero
point (keeping one when every plane would go: targets need a plane per nonzero layer). Then,
for every encoding, the common trailing zero bits ``k`` of the weights move into the scale: ``q = 2^k q'``, ``mult' = mult * 2^k`` (exact in float: a power of two),
``low_shift += k``. Accumulators are reported scaled back by ``low_shift``, so the pass is
exact. ``changed``: a plane was dropped or bits were shifted.
"""
from __future__ import annotations

import numpy as np

from csqc.bitplanes import trailing_zero_bits
from csqc.interpreter import decode_weight_rows
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["drop_dead_planes"]


@register()
def drop_dead_planes(g: Graph) -> PassResult:
    """Drop zero planes; shift common low zero bits into ``mult`` (see module docstring)."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.packed_word:
            continue
        spec = n.quant
        parts = n.layer
        w = g.params[parts.weight]
        new_spec, new_w = spec, w
        if spec.encoding != "int":
            keep, folded, zp = [], [], spec.zero_point
            for i, (shift, _sign) in enumerate(spec.planes):
                plane = w[i]
                if not plane.any():
                    continue
                if spec.encoding == "offset" and plane.all():
                    zp -= 1 << shift
                    folded.append(i)
                    continue
                keep.append(i)
            if not keep and folded:  # all-equal weights: kernels need one plane, keep the last
                keep.append(folded[-1])
                zp += 1 << spec.planes[folded[-1]][0]
            if len(keep) != len(spec.planes) or zp != spec.zero_point:
                new_w = w[keep]
                new_spec = spec.replace(planes=tuple(spec.planes[i] for i in keep), zero_point=zp)
        k = _common_trailing_zero_bits(g.with_params({parts.weight: new_w}), n.replace(quant=new_spec))
        if k:
            if new_spec.encoding == "int":
                new_w = (new_w.astype(np.int64) >> k).astype(new_w.dtype)
                new_spec = new_spec.replace(low_shift=new_spec.low_shift + k)
            elif all(s >= k for s, _ in new_spec.planes) and new_spec.zero_point % (1 << k) == 0:
                new_spec = new_spec.replace(
                    planes=tuple((s - k, sg) for s, sg in new_spec.planes),
                    zero_point=new_spec.zero_point >> k, low_shift=new_spec.low_shift + k,
                )
            else:
                k = 0
            if k:
                params[parts.mult] = (g.params[parts.mult] * np.float32(2**k)).astype(np.float32)
        if new_spec is not spec:
            params[parts.weight] = np.ascontiguousarray(new_w)
            updated[n.name] = n.replace(quant=new_spec)
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)


def _common_trailing_zero_bits(g: Graph, n, rows_per_block: int = 1024) -> int:
    """``trailing_zero_bits`` of the layer's whole integer weight, decoded a block of output rows
    at a time (int64 weights of a large layer would cost 8 bytes per weight at once)."""
    rows, bits = n.attr("weight_shape")[0], 0
    for start in range(0, rows, rows_per_block):
        q = decode_weight_rows(g, n, start, min(rows, start + rows_per_block))
        nonzero = np.abs(q[q != 0])
        if nonzero.size:
            bits |= int(np.bitwise_or.reduce(nonzero, axis=None))
    return trailing_zero_bits(np.array([bits], np.int64)) if bits else 0
