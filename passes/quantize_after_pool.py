"""quantize_after_pool: quantize a max pool's output instead of its input, so the layer after
the pool reads codes.

A model that quantizes an activation and then max-pools it (``quantize -> dequantize ->
max_pool2d -> layer``: the CSQ reference VGG's blocks, any conv-BN-ReLU-quantize-pool net)
hands the next layer the pooled *floats*: ``fuse_act_quant`` sees no quantizer in front of it,
and the layer runs on floats (VGG-19-BN's four convs after a pool were half its time). This
pass rewrites ``max_pool2d(dequantize(quantize(y)))`` as ``dequantize(quantize'(max_pool2d(y)))``,
``quantize'`` with the same attributes, so the layer can take the pooled codes.

Exact, not approximately: every quantizer's code is a nondecreasing function of its value and
every code's value a nondecreasing function of its code (the scale is positive), so the
largest dequantized value of a window is the dequantized code of its largest value, given the
same scale. A static scale (and zero point) is the same by construction. A dynamic scale is
``max|x|`` over the tensor: the pooled tensor has the same one when ``y >= 0`` (unsigned codes,
or capture's sign rule over the graph) and every element of ``y`` lies in some window; so has
an asymmetric quantizer's range ``max(y, 0) - min(y, 0)`` (its zero point is then 0). Where
``y`` may be negative a dynamic quantizer stays (``max|y|`` may be a negative value no window
keeps; the range reads the minimum). Every window must hold at least one element of ``y`` (padding
and dilation can leave a window all padding, ``-inf``, which no quantizer takes).

Only pools read by a quantized layer that reads floats are rewritten (elsewhere it would only
move work). The old quantizer and dequantizer stay while other nodes read them. ``changed``: a
pool was rewritten.
"""
from __future__ import annotations

from csqc.ir import QUANT_LAYER_OPS, Graph, Node, TensorType
from csqc.numerics import pool_output_size
from csqc.optable import output_nonneg

from .registry import PassResult, register

__all__ = ["quantize_after_pool", "window_reach"]


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


def _movable(pool: Node, quant: Node, y_shape, y_nonnegative: bool) -> bool:
    """Whether ``quantize`` commutes with ``pool`` exactly (module docstring)."""
    reach = [window_reach(y_shape[2 + i], pool.attr("kernel")[i], pool.attr("stride")[i], pool.attr("padding")[i],
                          pool.attr("dilation")[i], pool.attr("ceil_mode")) for i in range(2)]
    if not all(every_window for every_window, _ in reach):
        return False
    if quant.attr("static_scale", 0.0) > 0:
        return True
    unsigned = not quant.attr("signed", False) and not quant.attr("asymmetric", False)
    return (y_nonnegative or unsigned) and all(covers for _, covers in reach)


def _feeds_float_layer(g: Graph, value: str) -> bool:
    return any(n.op in QUANT_LAYER_OPS and n.quant.act_bits is None and n.inputs[0] == value for n in g.nodes)


@register()
def quantize_after_pool(g: Graph) -> PassResult:
    """Move activation quantizers below the max pools that read them (see module docstring)."""
    producers = g.producers()
    nonnegative = None  # computed once, where a dynamic quantizer asks
    taken = {n.name for n in g.nodes} | set(g.params) | {v.name for v in g.inputs}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    moved: dict[str, tuple[Node, Node, Node]] = {}  # pool name -> (pool on y, its quantize, its dequantize)
    replaced: set[str] = set()  # the quantizers and dequantizers the moved pools read
    for pool in g.nodes:
        if pool.op != "max_pool2d" or not _feeds_float_layer(g, pool.name):
            continue
        deq = producers.get(pool.inputs[0])
        quant = producers.get(deq.inputs[0]) if deq is not None and deq.op == "dequantize" else None
        if quant is None or quant.op != "quantize":
            continue
        y = quant.inputs[0]
        if nonnegative is None:
            nonnegative = _nonnegative(g)
        if not _movable(pool, quant, g.type_of(y).shape, y in nonnegative):
            continue
        q_type = quant.type
        new_quant = Node(fresh(f"{pool.name}.quant"), "quantize", (pool.name,),
                         TensorType(pool.type.shape, q_type.dtype, q_type.qbits, q_type.qsigned, q_type.qzero),
                         dict(quant.attrs), None, quant.source)
        new_deq = Node(fresh(f"{pool.name}.dequant"), "dequantize", (new_quant.name,), pool.type, {}, None, deq.source)
        moved[pool.name] = (pool.replace(inputs=(y,)), new_quant, new_deq)
        replaced |= {quant.name, deq.name}
    if not moved:
        return PassResult(g, False)

    readers_of = {name: new_deq.name for name, (_, _, new_deq) in moved.items()}
    nodes = []
    for n in g.nodes:
        if n.name in moved:
            nodes.extend(moved[n.name])
            continue
        nodes.append(n.replace(inputs=tuple(readers_of.get(i, i) for i in n.inputs)))
    outputs = tuple(readers_of.get(o, o) for o in g.outputs)
    # the old dequantizer, then its quantizer, go where nothing reads them any more
    for _ in range(2):
        read = {i for n in nodes for i in n.inputs} | set(outputs)
        nodes = [n for n in nodes if n.name in read or n.name not in replaced]
    return PassResult(g.replace(nodes=tuple(nodes), outputs=outputs), True)
