"""Small graph-rewriting helpers shared by the passes (all return new graphs)."""
from __future__ import annotations

from typing import Iterable, Mapping

from csqc.ir import Graph, Node

__all__ = ["single_user", "replace_nodes", "uses_of"]


def uses_of(g: Graph, value: str) -> int:
    """How many node inputs and graph outputs read ``value``."""
    return sum(i == value for n in g.nodes for i in n.inputs) + sum(o == value for o in g.outputs)


def single_user(g: Graph, value: str) -> Node | None:
    """The only node reading ``value`` if exactly one node does and it is no graph output."""
    if value in g.outputs:
        return None
    users = [n for n in g.nodes if value in n.inputs]
    return users[0] if len(users) == 1 and users[0].inputs.count(value) == 1 else None


def replace_nodes(g: Graph, updated: Mapping[str, Node] = (), removed: Iterable[str] = (),
                  rename: Mapping[str, str] = (), params: Mapping | None = None,
                  drop_params: Iterable[str] = ()) -> Graph:
    """Swap nodes by name, drop nodes, redirect reads of ``old`` to ``new``, update params."""
    updated, removed, rename = dict(updated), set(removed), dict(rename)

    def target(v: str) -> str:
        seen = set()
        while v in rename and v not in seen:
            seen.add(v)
            v = rename[v]
        return v

    nodes = []
    for n in g.nodes:
        if n.name in removed:
            continue
        n = updated.get(n.name, n)
        if any(i in rename for i in n.inputs):
            n = n.replace(inputs=tuple(target(i) for i in n.inputs))
        nodes.append(n)
    outputs = tuple(target(o) for o in g.outputs)
    new_params = {k: v for k, v in g.params.items() if k not in set(drop_params)}
    new_params.update(params or {})
    return g.replace(nodes=tuple(nodes), outputs=outputs, params=new_params)
