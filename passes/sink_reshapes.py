"""sink_reshapes: move reshapes below elementwise and per-channel ops; merge reshape chains.

A 1-D convolution runs as a 2-D one over a height of one, so capture wraps each in reshapes:
``[N, C, L] -> [N, C, 1, L]`` before it, back after it. Between two such layers the BatchNorm,
the activation and the next layer's quantizer then read a reshape's output, and ``fold_bn``,
``fuse_activation`` and ``fuse_act_quant`` (which look for the layer itself) miss them. This pass
rewrites ``op(reshape(x))`` as ``reshape(op(x))`` where that computes the same values:

* unary elementwise ops (relu, clip, sigmoid, ...), for any reshape;
* ``batch_norm``, where the reshape keeps axes 0 and 1 (its channel axis stays axis 1);
* binary elementwise ops (add, sub, mul, div, minimum), where every operand is either such a
  reshape of a value of the same shape or a one-element parameter (a residual add).

Then ``reshape(reshape(x))`` becomes ``reshape(x)``, and a reshape to ``x``'s own shape
becomes ``x``: the reshapes around the layers meet and cancel. Only where shapes move; no value
changes (exact). ``changed``: a node was moved, merged or removed.
"""
from __future__ import annotations

import numpy as np

from csqc.ir import Graph, Node, TensorType

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["sink_reshapes"]

_UNARY = frozenset({"relu", "clip", "sigmoid", "tanh", "gelu", "hardsigmoid", "hardswish", "silu", "sqrt", "exp",
                    "log", "erf", "sin", "cos"})
_BINARY = frozenset({"add", "sub", "mul", "div", "minimum"})
_MAX_ROUNDS = 1000  # each round moves a reshape one op down or merges two: a long chain is cheap


def _float(t: TensorType) -> bool:
    return t.qbits is None and t.dtype == "float32"


def _types(g: Graph) -> dict[str, TensorType]:
    """Every value's type (one lookup each: ``Graph.type_of`` scans the nodes)."""
    types = {name: TensorType(p.shape, str(p.dtype)) for name, p in g.params.items()}
    types.update((v.name, v.type) for v in g.inputs)
    types.update((n.name, n.type) for n in g.nodes)
    return types


def _sunk_source(g: Graph, producers: dict[str, Node], types: dict[str, TensorType], node: Node) -> TensorType | None:
    """The shape ``node`` runs on once the reshapes feeding it move below it, or None when
    they cannot (see the module docstring)."""
    if not _float(node.type):
        return None
    if node.op in _UNARY or node.op == "batch_norm":
        r = producers.get(node.inputs[0])
        if r is None or r.op != "reshape":
            return None
        source = types[r.inputs[0]]
        if not _float(source):
            return None
        if node.op == "batch_norm" and (len(source.shape) < 2 or source.shape[:2] != r.type.shape[:2]):
            return None
        return source
    if node.op in _BINARY:
        sources, scalars = set(), []
        for v in node.inputs:
            if v in g.params:
                if np.asarray(g.params[v]).size != 1:
                    return None
                scalars.append(np.ndim(g.params[v]))
                continue
            r = producers.get(v)
            if r is None or r.op != "reshape" or r.type.shape != node.type.shape:
                return None
            sources.add(types[r.inputs[0]])
        if len(sources) != 1:
            return None
        source = sources.pop()
        # a one-element parameter broadcasts to the source's shape only if it has no more axes
        return source if _float(source) and all(d <= len(source.shape) for d in scalars) else None
    return None


def _sink_one(g: Graph) -> Graph | None:
    """``g`` with one op moved above the reshapes that feed it, or None when none can move."""
    producers, types = g.producers(), _types(g)
    for node in g.nodes:
        source = _sunk_source(g, producers, types, node)
        if source is None:
            continue
        inputs = tuple(producers[v].inputs[0] if v in producers and producers[v].op == "reshape" else v
                       for v in node.inputs)
        moved = node.replace(name=g.fresh_name(f"{node.name}.unreshaped"), inputs=inputs,
                             type=TensorType(source.shape, node.type.dtype))
        back = Node(node.name, "reshape", (moved.name,), node.type, source=node.source)
        nodes = []
        for n in g.nodes:
            nodes.extend((moved, back) if n.name == node.name else (n,))
        return g.replace(nodes=tuple(nodes))
    return None


def _merge_one(g: Graph) -> Graph | None:
    """``g`` with one reshape of a reshape read straight from the first's input (or removed,
    where it restores that input's shape), or None when there is none."""
    producers, types = g.producers(), _types(g)
    input_names = {v.name for v in g.inputs}
    for node in g.nodes:
        if node.op != "reshape":
            continue
        first = producers.get(node.inputs[0])
        if first is None or first.op != "reshape":
            continue
        source = first.inputs[0]
        # removed, its readers read the source; a graph output must stay a distinct node's value
        if types[source] == node.type and not (node.name in g.outputs and (source in input_names
                                                                           or source in g.outputs)):
            return replace_nodes(g, removed=[node.name], rename={node.name: source})
        return replace_nodes(g, updated={node.name: node.replace(inputs=(source,))})
    return None


def _drop_unused_reshapes(g: Graph) -> Graph:
    """Reshapes nothing reads any more (what they fed moved below them)."""
    read = {i for n in g.nodes for i in n.inputs} | set(g.outputs)
    dead = [n.name for n in g.nodes if n.op == "reshape" and n.name not in read]
    return replace_nodes(g, removed=dead) if dead else g


@register()
def sink_reshapes(g: Graph) -> PassResult:
    """Move reshapes below elementwise and per-channel ops and merge them (see module docstring)."""
    changed = False
    for _ in range(_MAX_ROUNDS):
        step = _sink_one(g) or _merge_one(g)
        if step is None:
            break
        g, changed = _drop_unused_reshapes(step), True
    return PassResult(g, changed)
