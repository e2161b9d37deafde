"""pack_planes: pack 0/1 planes into 32-bit words along the reduction axis.

Matches unpacked plane-encoded layers. Plane ``[O, K]`` becomes ``uint32[O, ceil(K/32)]``,
bit ``k % 32`` of word ``k // 32``, zero-padded: padding bits are 0 in every weight plane, so
they add nothing to any popcount. Exact. ``changed``: a layer was packed.
"""
from __future__ import annotations

from csqc.bitplanes import pack_planes as pack
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PLANES_SPLIT, PassResult, register
from .rewrite import replace_nodes

__all__ = ["pack_planes", "WORD_BITS"]

WORD_BITS = 32  # AVX-512 VPOPCNTD and CUDA __popc both work on 32-bit lanes


@register(requires=(PLANES_SPLIT,))
def pack_planes(g: Graph) -> PassResult:
    """Pack plane-encoded weights into 32-bit words."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.encoding == "int" or n.quant.packed_word:
            continue
        weight = n.layer.weight
        params[weight] = pack(g.params[weight], WORD_BITS)
        updated[n.name] = n.replace(quant=n.quant.replace(packed_word=WORD_BITS))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)
