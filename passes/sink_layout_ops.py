"""sink_layout_ops: move reshapes, permutes and crops below elementwise and per-channel ops;
merge reshape chains.

A 1-D convolution runs as a 2-D one over a height of one, so capture wraps each in reshapes:
``[N, C, L] -> [N, C, 1, L]`` before it, back after it; a transposed convolution runs as one
convolution of its stacked phases, then a reshape, a permute and a reshape interleave them and
slices crop the result. The BatchNorm, the activation and the next layer's quantizer then read a
layout op's output, and ``fold_bn``, ``fuse_activation`` and ``fuse_act_quant`` (which look for
the layer itself) miss them. This pass rewrites ``op(layout(x))`` as ``layout(op(x))`` where that
computes the same values:

* unary elementwise ops (relu, clip, sigmoid, ...), for any reshape, permute or slice;
* ``batch_norm``, where its channel axis survives: a permute that keeps axes 0 and 1, a slice of
  another axis, a reshape that keeps axis 0 and keeps axis 1 or splits it (``[N, C * P, ...] ->
  [N, C, ...]``: each parameter then repeats for the P channels of the source it spans);
* binary elementwise ops (add, sub, mul, div, minimum), where every operand is either the same
  layout op of a value of the same shape or a one-element parameter (a residual add).

A permute or slice read by another op too stays where it is (it would be computed twice; a
reshape moves no data). Then ``reshape(reshape(x))`` becomes ``reshape(x)``, and a reshape to
``x``'s own shape becomes ``x``: the reshapes around the layers meet and cancel. Only where
shapes move; no value changes (exact). ``changed``: a node was moved, merged or removed.
"""
from __future__ import annotations

import re

import numpy as np

from csqc.ir import Graph, Node, TensorType

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["sink_layout_ops"]

_UNARY = frozenset({"relu", "clip", "sigmoid", "tanh", "gelu", "hardsigmoid", "hardswish", "silu", "sqrt", "exp",
                    "log", "erf", "sin", "cos"})
_BINARY = frozenset({"add", "sub", "mul", "div", "minimum"})
_MOVED = re.compile(r"\.moved(_\d+)?$")
_MAX_ROUNDS = 1000  # each round moves an op above one layout op or merges two reshapes: cheap


def _float(t: TensorType) -> bool:
    return t.qbits is None and t.dtype == "float32"


def _types(g: Graph) -> dict[str, TensorType]:
    """Every value's type (one lookup each: ``Graph.type_of`` scans the nodes)."""
    types = {name: TensorType(p.shape, str(p.dtype)) for name, p in g.params.items()}
    types.update((v.name, v.type) for v in g.inputs)
    types.update((n.name, n.type) for n in g.nodes)
    return types


_LAYOUT = frozenset({"reshape", "permute", "slice"})


def _channel_repeat(layout: Node, source: TensorType) -> int | None:
    """How many channels of ``source`` each channel of a batch_norm reading ``layout`` spans once
    it runs on ``source``, or None where its channel axis does not survive."""
    if len(source.shape) < 2:
        return None
    if layout.op == "reshape":  # axis 0 kept, axis 1 kept or split: source channel ch is channel ch // P
        shape = layout.type.shape
        if len(shape) < 2 or shape[0] != source.shape[0] or shape[1] == 0 or source.shape[1] % shape[1]:
            return None
        return source.shape[1] // shape[1]
    if layout.op == "permute":
        return 1 if tuple(layout.attrs["dims"][:2]) == (0, 1) else None
    return 1 if layout.attrs["axis"] != 1 else None


def _sunk_source(g: Graph, producers: dict[str, Node], types: dict[str, TensorType], readers: dict[str, int],
                 node: Node) -> tuple[TensorType, Node, int] | None:
    """``(shape node runs on, the layout op feeding it, batch_norm's channel repeat)`` once the
    layout ops feeding it move below it, or None when they cannot (see the module docstring)."""
    if not _float(node.type):
        return None

    def layout_of(v: str) -> Node | None:
        r = producers.get(v)
        if r is None or r.op not in _LAYOUT or not _float(types[r.inputs[0]]):
            return None
        # a copying layout op read elsewhere too would run twice: once for them, once below the op
        return r if r.op == "reshape" or readers.get(v, 0) == 1 else None

    if node.op in _UNARY or node.op == "batch_norm":
        r = layout_of(node.inputs[0])
        if r is None:
            return None
        source = types[r.inputs[0]]
        repeat = _channel_repeat(r, source) if node.op == "batch_norm" else 1
        return None if repeat is None else (source, r, repeat)
    if node.op in _BINARY:
        layouts, scalars = [], []
        for v in node.inputs:
            if v in g.params:
                if np.asarray(g.params[v]).size != 1:
                    return None
                scalars.append(np.ndim(g.params[v]))
                continue
            r = layout_of(v)
            if r is None or r.type.shape != node.type.shape:
                return None
            layouts.append(r)
        sources = {types[r.inputs[0]] for r in layouts}
        if len(sources) != 1 or len({(r.op, tuple(sorted(r.attrs.items()))) for r in layouts}) != 1:
            return None
        source = sources.pop()
        # a one-element parameter broadcasts to the source's shape only if it has no more axes
        return (source, layouts[0], 1) if all(d <= len(source.shape) for d in scalars) else None
    return None


def _sink_one(g: Graph) -> Graph | None:
    """``g`` with one op moved above the layout ops that feed it, or None when none can move."""
    producers, types = g.producers(), _types(g)
    readers: dict[str, int] = {}
    for n in g.nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    for v in g.outputs:
        readers[v] = readers.get(v, 0) + 1
    for node in g.nodes:
        found = _sunk_source(g, producers, types, readers, node)
        if found is None:
            continue
        source, layout, repeat = found
        inputs = tuple(producers[v].inputs[0] if v in producers and producers[v].op in _LAYOUT else v
                       for v in node.inputs)
        params = {}
        if repeat > 1:  # batch_norm over channels split by the reshape: each parameter once per part
            inputs = inputs[:1] + tuple(g.fresh_name(f"{v}.per_part") for v in inputs[1:])
            params = {new: np.repeat(np.asarray(g.params[old]), repeat) for old, new in zip(node.inputs[1:], inputs[1:])}
        # named once for what it was, not once per layout op it moved above
        moved = node.replace(name=g.fresh_name(f"{_MOVED.sub('', node.name)}.moved"), inputs=inputs,
                             type=TensorType(source.shape, node.type.dtype))
        back = Node(node.name, layout.op, (moved.name,), node.type, layout.attrs, source=node.source)
        nodes = []
        for n in g.nodes:
            nodes.extend((moved, back) if n.name == node.name else (n,))
        return g.replace(nodes=tuple(nodes), params={**g.params, **params})
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


def _drop_unused_layout_ops(g: Graph) -> Graph:
    """Layout ops nothing reads any more (what they fed moved below them)."""
    while True:
        read = {i for n in g.nodes for i in n.inputs} | set(g.outputs)
        dead = [n.name for n in g.nodes if n.op in _LAYOUT and n.name not in read]
        if not dead:
            return g
        g = replace_nodes(g, removed=dead)


@register()
def sink_layout_ops(g: Graph) -> PassResult:
    """Move layout ops below elementwise and per-channel ops and merge reshapes (see module docstring)."""
    changed = False
    for _ in range(_MAX_ROUNDS):
        step = _sink_one(g) or _merge_one(g)
        if step is None:
            break
        g, changed = _drop_unused_layout_ops(step), True
    return PassResult(g, changed)
