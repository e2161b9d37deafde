"""fold_scales: fold constant per-channel scales and shifts into the layer's one multiplier.

Matches ``mul(layer, c)`` and ``add(layer, c)`` where ``c`` is a constant that is a scalar or
varies only along the channel axis, and the layer (qconv2d, qlinear) has no fused activation
and no other user. The weight scale, BatchNorm scale (after ``fold_bn``) and such scales end
up in the single per-channel ``mult``, offsets in ``add``. Float rounding may change; integer
accumulators do not. ``changed``: at least one node was folded.
"""
from __future__ import annotations

import numpy as np

from csqc.ir import Graph

from .registry import PassResult, register
from .rewrite import replace_nodes, single_user

__all__ = ["fold_scales"]


def _per_channel(c: np.ndarray, ndim: int, channels: int, axis: int) -> np.ndarray | None:
    if c.size == 1:
        return np.full(channels, c.reshape(()), np.float32)
    shape = [1] * ndim
    shape[axis] = channels
    if c.ndim <= ndim and c.size == channels:
        padded = (1,) * (ndim - c.ndim) + c.shape
        if all(s == 1 for i, s in enumerate(padded) if i != axis % ndim) and padded[axis % ndim] == channels:
            return c.reshape(channels).astype(np.float32)
    return None


@register(requires=(), exact=False)
def fold_scales(g: Graph) -> PassResult:
    """Fold constant channel-wise mul/add after quantized layers into ``mult``/``add``."""
    changed = False
    while True:
        producers = g.producers()
        for n in g.nodes:
            if n.op not in ("mul", "add"):
                continue
            layer_name = next((i for i in n.inputs if i in producers and producers[i].op in ("qconv2d", "qlinear")), None)
            const_name = next((i for i in n.inputs if i in g.params), None)
            if layer_name is None or const_name is None:
                continue
            layer = producers[layer_name]
            if layer.attr("act", "none") != "none" or single_user(g, layer_name) is not n:
                continue
            parts = layer.layer
            axis = parts.channel_axis
            channels = layer.type.shape[axis]
            c = _per_channel(g.params[const_name], len(layer.type.shape), channels, axis)
            if c is None or n.type.shape != layer.type.shape:
                continue
            mult = g.params[parts.mult]
            add = g.params[parts.add] if parts.add else np.zeros_like(mult)
            add_name = parts.add or g.fresh_name(f"{layer.name}.add")
            if n.op == "mul":
                params = {parts.mult: (mult * c).astype(np.float32), add_name: (add * c).astype(np.float32)}
            else:
                params = {add_name: (add + c).astype(np.float32)}
            new_layer = layer.replace(inputs=parts.with_add(add_name))
            g = replace_nodes(g, {layer.name: new_layer}, [n.name], {n.name: layer.name}, params)
            changed = True
            break
        else:
            return PassResult(g, changed)
