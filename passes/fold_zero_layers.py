"""fold_zero_layers: replace a quantized layer with no nonzero weights by its constant output.

Matches ``qconv2d``/``qlinear`` layers whose integer weight ``q`` is zero everywhere: a mask
that keeps no bit position (``active_bits == ()``) or bits that all cancel. Such a layer's
accumulator is 0 for every input, so it computes ``act((0 * S / L) * mult[c] + add[c])`` per
output channel: its bias through the folded per-channel multiplier and add (run it after
``fold_bn``/``fold_scales``/``fuse_activation`` so those are inside), or zeros. The input and
its activation quantization no longer matter.

The layer becomes ``expand(constant)`` under the same name, the constant a ``float32`` parameter
shaped ``[1, C, 1, 1]`` (conv) or ``[1, ..., C]`` (linear) and computed with the interpreter's
float order, so the pass is exact. The node's attributes keep what the layer was
(``folded_layer``: its op, ``weight_shape``, ``n_bits``) for reports. Targets then never see a
layer without planes. Preconditions: none (a layer with a quantized output type is left alone).
``changed``: at least one layer was folded.
"""
from __future__ import annotations

import numpy as np

from csqc.interpreter import decode_weight
from csqc.ir import Graph, Node, TensorType
from csqc.numerics import activation

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["fold_zero_layers", "folded_layers"]

_F32 = np.float32


def _check(g: Graph, n: Node) -> str:
    """Why ``n`` cannot be folded ("" when it can)."""
    if n.type.quantized:
        return "the layer's output is quantized"
    if decode_weight(g, n).any():
        return "the layer has nonzero weights"
    return ""


def _constant(g: Graph, n: Node) -> np.ndarray:
    """The layer's output for a zero accumulator, per channel, in the interpreter's float order."""
    parts = n.layer
    mult = g.params[parts.mult]
    # a zero accumulator gives +0 before the multiplier: (float32(0) * S) / L with S >= 0,
    # or the float product of zero weights; the sign of zero then follows mult as there
    y = np.zeros(mult.shape, _F32) * mult
    if parts.add:
        y = y + g.params[parts.add]
    y = activation(n.attr("act", "none"), y.astype(_F32), n.attr("clip_lo"), n.attr("clip_hi")).astype(_F32)
    shape = [1] * len(n.type.shape)
    shape[parts.channel_axis] = -1
    return np.ascontiguousarray(y.reshape(shape))


@register()
def fold_zero_layers(g: Graph) -> PassResult:
    """Replace layers whose weights are all zero by ``expand(constant)`` (see module docstring)."""
    updated, params = {}, {}
    for n in g.quant_layers():
        if _check(g, n):
            continue
        const = g.fresh_name(f"{n.name}.constant")
        params[const] = _constant(g, n)
        attrs = {"folded_layer": n.op, "weight_shape": tuple(n.attr("weight_shape")), "n_bits": n.quant.n_bits}
        updated[n.name] = Node(n.name, "expand", (const,), TensorType(n.type.shape), attrs, None, n.source)
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, params=params), True)


def folded_layers(g: Graph) -> list[Node]:
    """The nodes of ``g`` that this pass made out of quantized layers."""
    return [n for n in g.nodes if n.op == "expand" and n.attr("folded_layer")]
