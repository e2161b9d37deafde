"""choose_encoding: per layer, posneg planes or offset-binary planes, whichever are fewer.

Matches unpacked ``posneg`` layers. The offset encoding stores the bits of ``q + z`` and
pays a correction ``z * sum(x)`` once per output; posneg pays two planes per used position.
Bit-serial work scales with the plane count, so the layer keeps the encoding with fewer
planes (posneg on a tie: it needs no correction). Exact. ``changed``: a layer switched.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from csqc.bitplanes import offset_base
from csqc.interpreter import decode_weight_rows
from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["choose_encoding", "offset_plane_spec", "offset_planes_from_spec"]


@register()
def choose_encoding(g: Graph) -> PassResult:
    """Switch a layer to offset-binary planes when that needs fewer planes."""
    updated, params = {}, {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.encoding != "posneg" or n.quant.packed_word:
            continue
        shape = n.attr("weight_shape")
        rows = lambda start, end, n=n: decode_weight_rows(g, n, start, end).reshape(end - start, -1)  # noqa: E731
        spec_planes, z, base = offset_plane_spec(rows, shape[0])
        if len(spec_planes) < len(n.quant.planes):
            params[n.layer.weight] = offset_planes_from_spec(rows, shape[0], int(np.prod(shape[1:])), spec_planes, base)
            updated[n.name] = n.replace(quant=n.quant.replace(encoding="offset", planes=tuple(spec_planes), zero_point=z))
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)


_BLOCK_ROWS = 1024  # output rows decoded at a time: int64 weights of a whole large layer are 8 B each


def offset_plane_spec(rows: Callable[[int, int], np.ndarray], n_rows: int, block: int = _BLOCK_ROWS
                      ) -> tuple[list[tuple[int, int]], int, int]:
    """``offset_planes``' plane spec and zero point, from statistics of row blocks of ``q``
    (``rows(start, end)`` gives int64 ``[end - start, K]``); also the offset ``base``
    (``bitplanes.offset_base``) the planes hold the bits of (``q + base``)."""
    blocks = [(s, min(n_rows, s + block)) for s in range(0, n_rows, block)]
    lo = min((int(rows(s, e).min()) for s, e in blocks), default=0)
    hi = max((int(rows(s, e).max()) for s, e in blocks), default=0)
    base = offset_base(lo, hi)
    top = (hi + base).bit_length()
    ones = {b: False for b in range(top)}
    zeros = {b: False for b in range(top)}  # a 0 bit seen somewhere
    nonzero = False
    for s, e in blocks:
        q = rows(s, e)
        nonzero |= bool(q.any())
        u = q + base
        for b in range(top):
            bit = (u >> b) & 1
            ones[b] |= bool(bit.any())
            zeros[b] |= not bool(bit.all())
    z, spec = base, []
    for b in reversed(range(top)):
        if not ones[b]:
            continue
        if not zeros[b]:  # a constant plane is a constant term: fold it into the zero point
            z -= 1 << b
            continue
        spec.append((b, 1))
    if not spec and nonzero:  # all weights equal: kernels need a plane, so write q = 1 - (1 - q)
        spec.append((0, 1))
        z += 1
        base = None  # the plane is all ones
    return spec, z, base


def offset_planes_from_spec(rows: Callable[[int, int], np.ndarray], n_rows: int, k: int,
                            spec: list[tuple[int, int]], base: int | None, block: int = _BLOCK_ROWS) -> np.ndarray:
    """The planes ``offset_plane_spec`` describes, ``uint8[P, n_rows, k]``, a row block at a time."""
    planes = np.empty((len(spec), n_rows, k), np.uint8)
    if base is None:
        planes.fill(1)
        return planes
    for s in range(0, n_rows, block):
        e = min(n_rows, s + block)
        u = rows(s, e) + base
        for i, (b, _) in enumerate(spec):
            planes[i, s:e] = (u >> b) & 1
    return planes
