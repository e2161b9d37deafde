"""sink_quantize: move an activation quantizer below the max pools and reshapes between it and
the quantized layer that reads them, so that layer reads codes.

A model that quantizes an activation and then max-pools or flattens it (``quantize ->
dequantize -> max_pool2d / reshape / permute -> layer``: the CSQ reference VGGs' blocks and
classifiers, any conv-BN-ReLU-quantize-pool net) hands the next layer *floats*:
``fuse_act_quant`` sees no quantizer in front of it, and the layer runs on floats (VGG-19-BN's
four convs after a pool were half its time). This pass rewrites
``chain(dequantize(quantize(y)))`` as ``dequantize(quantize'(chain(y)))``, ``quantize'`` with
the same attributes, so the layer can take the codes.

Exact, not approximately: every quantizer's code is a nondecreasing function of its value and
every code's value a nondecreasing function of its code (the scale is positive), so the
largest dequantized value of a window is the dequantized code of its largest value, given the
same scale; a reshape or permute moves values without changing any. A static scale (and zero
point) is the same by construction. A dynamic scale is ``max|x|`` over the tensor: the pooled
tensor has the same one when ``y >= 0`` (unsigned codes, or capture's sign rule over the graph)
and every element of ``y`` lies in some window; so has an asymmetric quantizer's range
``max(y, 0) - min(y, 0)`` (its zero point is then 0). Where ``y`` may be negative a dynamic
quantizer stays before a pool (``max|y|`` may be a negative value no window keeps; the range
reads the minimum). Every window must hold at least one element of ``y`` (padding and dilation
can leave a window all padding, ``-inf``, which no quantizer takes).

The chain's inner nodes must have no other reader (their values change: they carry ``y``'s
floats now); every reader of its last node reads the new dequantizer. The old quantizer and
dequantizer stay while other nodes read them. Only chains that end at a quantized layer reading
floats are rewritten (elsewhere it would only move work). ``changed``: a chain was rewritten.
"""
from __future__ import annotations

from csqc.ir import QUANT_LAYER_OPS, Graph, Node, TensorType
from csqc.numerics import pool_output_size
from csqc.optable import output_nonneg

from .registry import PassResult, register

__all__ = ["sink_quantize", "window_reach"]

_CHAIN_OPS = frozenset({"max_pool2d", "reshape", "permute"})


def window_reach(size: int, kernel: int, stride: int, padding: int, dilation: int,
                 ceil_mode: bool) -> tuple[bool, bool]:
    """For one axis of a pool: (every window holds an input element, every input element lies
    in a window)."""
    covered = set()
    every_window = True
    for j in range(pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)):
        taps = {j * stride - padding + t * dilation for t in range(kernel)} & set(range(size))
        every_window &= bool(taps)
        covered |= taps
    return every_window, len(covered) == size


def _nonnegative(g: Graph) -> set[str]:
    """The values capture's sign rule knows to be >= 0 (``csqc.optable.output_nonneg``)."""
    known: set[str] = set()
    for n in g.nodes:
        if output_nonneg(n.op, [i in known for i in n.inputs], n.attrs):
            known.add(n.name)
    return known


def _pool_reach(g: Graph, pool: Node) -> tuple[bool, bool]:
    """(every window holds an element, every element lies in a window) over both axes."""
    shape = g.type_of(pool.inputs[0]).shape
    reach = [window_reach(shape[2 + i], pool.attr("kernel")[i], pool.attr("stride")[i], pool.attr("padding")[i],
                          pool.attr("dilation")[i], pool.attr("ceil_mode")) for i in range(2)]
    return all(w for w, _ in reach), all(c for _, c in reach)


def _movable(g: Graph, chain: list[Node], quant: Node, y_nonnegative: bool) -> bool:
    """Whether ``quantize`` commutes with every node of ``chain`` exactly (module docstring)."""
    reach = [_pool_reach(g, n) for n in chain if n.op == "max_pool2d"]
    if not all(every_window for every_window, _ in reach):
        return False
    if quant.attr("static_scale", 0.0) > 0 or not reach:
        return True
    unsigned = not quant.attr("signed", False) and not quant.attr("asymmetric", False)
    return (y_nonnegative or unsigned) and all(covers for _, covers in reach)


def _chain_to(g: Graph, value: str, producers: dict[str, Node], readers: dict[str, list[Node]]):
    """``(dequantize, chain)`` where ``value`` is ``chain(dequantize(quantize(y)))`` with a
    nonempty chain whose inner nodes feed only the next one, else None."""
    chain: list[Node] = []
    node = producers.get(value)
    while node is not None and node.op in _CHAIN_OPS:
        if chain and (len(readers.get(node.name, [])) != 1 or node.name in g.outputs):
            return None
        chain.insert(0, node)
        node = producers.get(node.inputs[0])
    if not chain or node is None or node.op != "dequantize":
        return None
    quant = producers.get(node.inputs[0])
    return (node, chain) if quant is not None and quant.op == "quantize" else None


@register()
def sink_quantize(g: Graph) -> PassResult:
    """Move activation quantizers below the pools and reshapes before a layer (see module docstring)."""
    producers, readers = g.producers(), g.users()
    nonnegative = None  # computed once, where a dynamic quantizer asks
    taken = {n.name for n in g.nodes} | set(g.params) | {v.name for v in g.inputs}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    rewired: dict[str, str] = {}  # a chain's first node -> y, the value it reads now
    appended: dict[str, tuple[Node, Node]] = {}  # a chain's last node -> (its quantize, its dequantize)
    replaced: set[str] = set()  # the quantizers and dequantizers the chains read
    for layer in g.nodes:
        if layer.op not in QUANT_LAYER_OPS or layer.quant.act_bits is not None or layer.inputs[0] in appended:
            continue
        found = _chain_to(g, layer.inputs[0], producers, readers)
        if found is None:
            continue
        deq, chain = found
        quant = producers[deq.inputs[0]]
        y = quant.inputs[0]
        if nonnegative is None:
            nonnegative = _nonnegative(g)
        if not _movable(g, chain, quant, y in nonnegative):
            continue
        last, q_type = chain[-1], quant.type
        new_quant = Node(fresh(f"{last.name}.quant"), "quantize", (last.name,),
                         TensorType(last.type.shape, q_type.dtype, q_type.qbits, q_type.qsigned, q_type.qzero),
                         dict(quant.attrs), None, quant.source)
        new_deq = Node(fresh(f"{last.name}.dequant"), "dequantize", (new_quant.name,), last.type, {}, None, deq.source)
        rewired[chain[0].name] = y
        appended[last.name] = (new_quant, new_deq)
        replaced |= {quant.name, deq.name}
    if not appended:
        return PassResult(g, False)

    reads = {last: new_deq.name for last, (_, new_deq) in appended.items()}
    nodes = []
    for n in g.nodes:
        if n.name in rewired:
            n = n.replace(inputs=(rewired[n.name],) + n.inputs[1:])
        else:
            n = n.replace(inputs=tuple(reads.get(i, i) for i in n.inputs))
        nodes.append(n)
        nodes.extend(appended.get(n.name, ()))
    outputs = tuple(reads.get(o, o) for o in g.outputs)
    # the old dequantizer, then its quantizer, go where nothing reads them any more
    for _ in range(2):
        read = {i for n in nodes for i in n.inputs} | set(outputs)
        nodes = [n for n in nodes if n.name in read or n.name not in replaced]
    return PassResult(g.replace(nodes=tuple(nodes), outputs=outputs), True)
