"""fold_bn: fold an inference BatchNorm into the layer that produces its input.

Matches ``batch_norm(layer(x))`` where ``layer`` (qconv2d, qlinear, conv2d, linear) has no fused
activation and the BatchNorm is its only user. Quantized layers absorb ``y * alpha + beta``
into their per-channel ``mult`` and ``add`` (``mult' = mult * alpha``,
``add' = add * alpha + beta``): the integer weights are not re-quantized and accumulators stay
exact; float outputs change by float rounding only. Float convolutions and linear layers
(a generator's first transposed convolution, captured as one) fold into their weights and bias. ``changed``: at least one BatchNorm was removed.
"""
from __future__ import annotations

import numpy as np

from csqc.ir import Graph

from .registry import PassResult, register
from .rewrite import replace_nodes, single_user

__all__ = ["fold_bn"]

_F32 = np.float32


def _check(g: Graph, bn) -> tuple[object, str] | tuple[None, str]:
    producer = g.producers().get(bn.inputs[0])
    if producer is None or producer.op not in ("qconv2d", "qlinear", "conv2d", "linear"):
        return None, "input is not produced by a convolution or linear layer"
    if producer.attr("act", "none") != "none":
        return None, "the layer already has a fused activation"
    if single_user(g, producer.name) is not bn:
        return None, "the layer's output has other users"
    return producer, ""


@register(exact=False)
def fold_bn(g: Graph) -> PassResult:
    """Fold inference BatchNorms into producing layers (see module docstring)."""
    updated, removed, rename, params = {}, [], {}, {}
    for bn in g.nodes:
        if bn.op != "batch_norm":
            continue
        layer, _why = _check(g, bn)
        if layer is None or layer.name in updated:
            continue
        _, mul, add = bn.inputs
        alpha, beta = g.params[mul].astype(_F32), g.params[add].astype(_F32)
        parts = layer.layer
        if layer.op in ("conv2d", "linear"):
            w = g.params[parts.weight]
            b = g.params[parts.add] if parts.add else np.zeros(w.shape[0], _F32)
            bname = parts.add or g.fresh_name(f"{layer.name}.bias")
            params[parts.weight] = (w * alpha.reshape((-1,) + (1,) * (w.ndim - 1))).astype(_F32)
            params[bname] = (b * alpha + beta).astype(_F32)
        else:
            mult = g.params[parts.mult]
            old_add = g.params[parts.add] if parts.add else np.zeros_like(mult)
            bname = parts.add or g.fresh_name(f"{layer.name}.add")
            params[parts.mult] = (mult * alpha).astype(_F32)
            params[bname] = (old_add * alpha + beta).astype(_F32)
        updated[layer.name] = layer.replace(inputs=parts.with_add(bname), type=bn.type)
        removed.append(bn.name)
        rename[bn.name] = layer.name
    if not removed:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated, removed, rename, params), True)
