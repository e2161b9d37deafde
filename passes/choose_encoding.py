"""choose_encoding: per layer, posneg planes or offset-binary planes, whichever are fewer.

Matches unpacked ``posneg`` layers. The offset encoding stores the bits of ``q + z`` and
pays a correction ``z * sum(x)`` once per output; posneg pays two planes per used position.
Bit-serial work scales with the plane count, so the layer keeps the encoding with fewer
planes (posneg on a tie: it needs no correction). Exact. ``changed``: a layer switched.
"""
from __future__ import annotations

import numpy as np

from csqc.bitplanes import offset_planes
from csqc.interpreter import decode_weight
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["choose_encoding"]


@register()
def choose_encoding(g: Graph) -> PassResult:
    """Switch a layer to offset-binary planes when that needs fewer planes."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.encoding != "posneg" or n.quant.packed_word:
            continue
        q = decode_weight(g, n).reshape(n.attr("weight_shape")[0], -1)
        planes, spec_planes, z = offset_planes(q)
        if len(spec_planes) < len(n.quant.planes):
            params[n.layer.weight] = np.ascontiguousarray(planes)
            updated[n.name] = n.replace(quant=n.quant.replace(encoding="offset", planes=tuple(spec_planes), zero_point=z))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)
