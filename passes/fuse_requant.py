"""fuse_requant: a quantized layer quantizes its own output when a static quantize is its only user.

Matches ``quantize(layer)`` where ``layer`` is a quantized layer (its ReLU or clip already fused
by ``fuse_activation``) without output quantization, read by nothing else and no graph output,
and the ``quantize`` has a static scale. The layer takes the quantizer's bits, scale and
signedness (``QuantSpec.out_*``), its type becomes the quantized type, the ``quantize`` goes and
its readers read the layer. Targets then write codes from the layer's epilogue: no float tensor
and no separate quantize kernel. Exact: the codes are those ``quantize`` computed from the same
float32 ``y`` (see ``csqc.ir``). A dynamic quantize needs the whole tensor's max first, so it
stays, and so does an asymmetric one (``QuantSpec.out_*`` has no zero point). ``changed``: a
quantize was fused.
"""
from __future__ import annotations

from csqc.ir import Graph, QUANT_LAYER_OPS

from .registry import PassResult, register
from .rewrite import replace_nodes, single_user

__all__ = ["fuse_requant"]


@register()
def fuse_requant(g: Graph) -> PassResult:
    """Fuse static-scale output quantization into the producing quantized layer."""
    producers = g.producers()
    updated, removed, rename = {}, [], {}
    for n in g.nodes:
        static = n.attr("static_scale", 0.0) if n.op == "quantize" else 0.0
        if not static > 0 or n.attr("asymmetric", False):
            continue
        layer = producers.get(n.inputs[0])
        if layer is None or layer.op not in QUANT_LAYER_OPS or layer.quant.out_bits is not None:
            continue
        if single_user(g, layer.name) is not n:
            continue
        spec = layer.quant.replace(out_bits=n.attr("bits"), out_scale=float(static), out_signed=bool(n.type.qsigned))
        updated[layer.name] = layer.replace(type=n.type, quant=spec)
        removed.append(n.name)
        rename[n.name] = layer.name
    if not removed:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, removed, rename), True)
