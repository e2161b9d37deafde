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
from csqc.interpreter import decode_weight_rows
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["split_planes"]


_BLOCK_BYTES = 1 << 26  # int64 weights decoded per block of rows (64 MiB): temporaries stay bounded


@register()
def split_planes(g: Graph) -> PassResult:
    """Split ``int`` weights into posneg bitplanes over all N positions."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.encoding != "int":
            continue
        spec = n.quant
        planes, plane_spec = _split(g, n)
        params[n.layer.weight] = planes
        updated[n.name] = n.replace(quant=spec.replace(encoding="posneg", planes=tuple(plane_spec), zero_point=0))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)


def _split(g: Graph, n) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The layer's posneg planes ``uint8[P, O, K]`` and their ``(shift, sign)``, a block of output
    rows at a time (the whole layer's int64 weights would cost 8 bytes per weight)."""
    spec = n.quant
    shape = n.attr("weight_shape")
    rows, k = shape[0], int(np.prod(shape[1:]))
    positions = list(reversed(range(spec.n_bits)))
    # positions refer to the unshifted weight; planes below the common shift hold nothing
    plane_spec = [(b - spec.low_shift, sign) for b in positions for sign in (1, -1)]
    keep = [i for i, (s, _) in enumerate(plane_spec) if s >= 0]
    planes = np.empty((len(keep), rows, k), np.uint8)
    block = max(1, _BLOCK_BYTES // max(1, 8 * k))
    for start in range(0, rows, block):
        end = min(rows, start + block)
        q = decode_weight_rows(g, n, start, end).reshape(end - start, k) << spec.low_shift
        planes[:, start:end] = posneg_planes(q, spec.active_bits, positions)[0][keep]
    return planes, [plane_spec[i] for i in keep]
