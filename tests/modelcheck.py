"""Helpers for end-to-end model tests: compare the interpreter with PyTorch without cascades.

Dynamic activation quantization makes whole-network comparisons fragile: PyTorch and the
interpreter sum in different orders, a value within an ulp of a rounding boundary gets a
different code, and the difference grows through every later layer. ``teacher_forced`` cuts
the graph at every ``quantize`` node and feeds it the float tensor PyTorch quantized there, so
each segment between quantization points is compared on identical inputs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from csqc import ops
from csqc.ir import Graph, Value
from csqc.layers import ActQuant, csq_layers

__all__ = ["quantizer_inputs", "teacher_forced", "randomize_masks", "recalibrate_batch_norm", "torch_codes",
           "one_channel_convs"]


def _clipped(m: ActQuant, x: torch.Tensor) -> torch.Tensor:
    if m.clip == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    if m.clip == "pact":
        return torch.minimum(torch.clamp(x, min=0.0), m.alpha)
    return x


@torch.no_grad()
def quantizer_inputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """PyTorch's output and, per ActQuant module name, the float tensor it quantized."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, _clipped(mod, args[0]).clone()))
        for name, m in model.named_modules() if isinstance(m, ActQuant)
    ]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out.numpy(), seen


def torch_codes(m: ActQuant, x: torch.Tensor) -> tuple[np.ndarray, np.float32]:
    codes, s = ops.act_codes(x, m.bits, m.static_scale if m.mode == "static" else 0.0)
    return codes.numpy().astype(np.int32), np.float32(s)


def teacher_forced(g: Graph) -> tuple[Graph, dict[str, tuple[str, int]]]:
    """``g`` with every quantize node reading a new graph input ``<node>.in``.

    The values the quantize nodes read become extra graph outputs (after ``g``'s own), so every
    segment stays live through the passes and its end can be compared with PyTorch. Returns the
    graph and ``{input name: (module path of the quantizer, index of the output it cuts)}``.
    """
    inputs, nodes, outputs, cuts = list(g.inputs), [], list(g.outputs), {}
    for n in g.nodes:
        if n.op == "quantize":
            name = f"{n.name}.in"
            inputs.append(Value(name, g.type_of(n.inputs[0])))
            if n.inputs[0] not in outputs:
                outputs.append(n.inputs[0])
            cuts[name] = (n.source, outputs.index(n.inputs[0]))
            n = n.replace(inputs=(name,))
        nodes.append(n)
    return g.replace(inputs=tuple(inputs), nodes=tuple(nodes), outputs=tuple(outputs)), cuts


@torch.no_grad()
def randomize_masks(model: torch.nn.Module, seed: int) -> None:
    """Random (often non-contiguous) bit masks on every CSQ layer, at least one bit each."""
    g = torch.Generator().manual_seed(seed)
    for _, m in csq_layers(model):
        mask = torch.rand(m.n_bits, generator=g) < 0.6
        mask[torch.randint(m.n_bits, (1,), generator=g)] = True
        m.mask_weight.copy_(torch.where(mask, 1.0, -1.0))


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics from ``x`` so random-init activations keep their scale."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    model(x)
    model.eval()


def one_channel_convs(folder, n_bits: int = 4):
    """Save (and return the path of) a model whose first conv reads 1 channel (groups=1) with a
    quantized input, followed by a depthwise conv (groups == in_channels): both have one input
    channel per group, so both run on the depthwise kernels (issue 15: the planner packed the
    first one for the grouped kernel, and the artifact failed at run time)."""
    import csqc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
    csqc.finalize(csqc.convert(net.eval(), n_bits=n_bits, act_bits=8, quantize_first_input=True))
    path = folder / "one-channel.pt"
    csqc.save(net, path, torch.randn(2, 1, 8, 8))
    return path
