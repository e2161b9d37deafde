"""split_planes: split integer weights into +/- bitplanes, one pair per candidate position.

Matches quantized layers with ``int`` encoding. Every weight is written in signed digits over
the layer's active positions (``q = sum d_b 2^b``, ``d_b`` in {-1,0,1}, exactly CSQ's
``p_b - n_b``); the layer gets a +plane and a -plane for **each of its N candidate positions**,
masked ones all-zero, so ``drop_dead_planes`` can see and remove them. Exact.
``changed``: at least one layer was split.
"""
from __future__ import annotations

import numpy as np

from csqc.bitplanes import posneg_planes
from csqc.interpreter import decode_weight
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["split_planes"]


@register()
def split_planes(g: Graph) -> PassResult:
    """Split ``int`` weights into posneg bitplanes over all N positions."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.encoding != "int":
            continue
        spec = n.quant
        q = decode_weight(g, n).reshape(n.attr("weight_shape")[0], -1) >> 0
        if spec.low_shift:
            # positions refer to the unshifted weight
            q = q << spec.low_shift
        positions = list(reversed(range(spec.n_bits)))
        planes, plane_spec = posneg_planes(q, spec.active_bits, positions)
        if spec.low_shift:
            plane_spec = [(s - spec.low_shift, g_) for s, g_ in plane_spec]
            keep = [i for i, (s, _) in enumerate(plane_spec) if s >= 0]
            planes, plane_spec = planes[keep], [plane_spec[i] for i in keep]
        params[n.layer.weight] = np.ascontiguousarray(planes, dtype=np.uint8)
        updated[n.name] = n.replace(quant=spec.replace(encoding="posneg", planes=tuple(plane_spec), zero_point=0))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)
