"""fuse_act_quant: let a quantized layer read activation codes instead of dequantized floats.

Matches ``qlayer(dequantize(quantize(x)))`` on a layer without input quantization. The layer
then takes the ``quantize`` output directly (codes plus scale) and computes its exact integer
accumulator; its spec records the activation bits, scale mode and signedness (an asymmetric
quantizer: its zero point too, static mode). The
``dequantize`` stays while other nodes read it (``dce`` removes it otherwise). Exact: the
layer computes ``((acc * S) / L) * mult + add`` where it computed the same products in float.
``changed``: at least one layer was rewired.
"""
from __future__ import annotations

from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes

__all__ = ["fuse_act_quant"]


@register(exact=False)
def fuse_act_quant(g: Graph) -> PassResult:
    """Rewire quantized layers to consume activation codes (see module docstring)."""
    producers = g.producers()
    updated = {}
    for n in g.nodes:
        if n.op not in QUANT_LAYER_OPS or n.quant.act_bits is not None:
            continue
        deq = producers.get(n.inputs[0])
        if deq is None or deq.op != "dequantize":
            continue
        quant = producers.get(deq.inputs[0])
        if quant is None or quant.op != "quantize":
            continue
        static = quant.attr("static_scale", 0.0)
        spec = n.quant.replace(
            act_bits=quant.attr("bits"), act_mode="static" if static > 0 else "dynamic",
            act_scale=float(static), act_signed=bool(quant.attr("signed")),
            act_asymmetric=bool(quant.attr("asymmetric", False)), act_zero_point=int(quant.attr("zero_point", 0)),
        )
        updated[n.name] = n.replace(inputs=(quant.name,) + n.inputs[1:], quant=spec)
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated), True)
