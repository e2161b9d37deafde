"""fuse_activation: fuse ReLU / clip (ReLU6, PACT's lower clip) into the producing layer.

Matches ``relu(layer)`` and ``clip(layer)`` where the layer (qconv2d, qlinear, conv2d, linear)
has no fused activation and no other user; the layer's ``act`` attribute takes the
activation, so its kernel applies it in the epilogue. Exact. ``changed``: a node was fused.
"""
from __future__ import annotations

from csqc.ir import Graph

from .registry import PassResult, register
from .rewrite import replace_nodes, single_user

__all__ = ["fuse_activation"]

_LAYERS = ("qconv2d", "qlinear", "conv2d", "linear")


@register()
def fuse_activation(g: Graph) -> PassResult:
    """Fuse elementwise activations into layer epilogues (see module docstring)."""
    producers = g.producers()
    updated, removed, rename = {}, [], {}
    for n in g.nodes:
        if n.op not in ("relu", "clip"):
            continue
        layer = producers.get(n.inputs[0])
        if layer is None or layer.op not in _LAYERS or layer.name in updated:
            continue
        if layer.attr("act", "none") != "none" or single_user(g, layer.name) is not n:
            continue
        attrs = dict(layer.attrs)
        if n.op == "relu":
            attrs["act"] = "relu"
        else:
            attrs.update(act="clip", clip_lo=n.attr("lo"), clip_hi=n.attr("hi"))
        updated[layer.name] = layer.replace(attrs=attrs)
        removed.append(n.name)
        rename[n.name] = layer.name
    if not removed:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, removed, rename), True)
