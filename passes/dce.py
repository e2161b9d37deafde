"""dce: dead-code elimination of nodes and parameters nothing reads.

A node is live if a graph output depends on it; parameters are kept only while a live node
reads them. Exact. ``changed``: something was removed.
"""
from __future__ import annotations

from csqc.ir import Graph

from .registry import PassResult, register

__all__ = ["dce"]


@register()
def dce(g: Graph) -> PassResult:
    """Remove nodes and parameters that no output depends on."""
    live = set(g.outputs)
    kept = []
    for n in reversed(g.nodes):
        if n.name in live:
            kept.append(n)
            live.update(n.inputs)
    kept.reverse()
    params = {k: v for k, v in g.params.items() if k in live}
    if len(kept) == len(g.nodes) and len(params) == len(g.params):
        return PassResult(g, False)
    return PassResult(g.replace(nodes=tuple(kept), params=params), True)
