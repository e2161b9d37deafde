"""Differential runs over random CSQ models: the exactness promise, checked beyond the models the
tests were written around.

Each case draws a small network from its seed: convolutions of any kernel, stride, padding,
dilation and groups (depthwise with multipliers, one input column or row), residual and
squeeze-excitation blocks, concatenated branches, pools (ceil mode too), resizing (nearest and
linear, corners aligned or not, by whole and fractional factors) and linear heads; image-to-image
blocks (CSQ transposed convolutions, group / instance norms, pixel shuffles, U-Net skips); 1-D
convolutions over sequences (padding modes, residual blocks, 1-D pools, a global average pool:
keyword spotting); reference-style nets (the CSQ reference code's placement: an activation
quantizer after each block's activation, ReLU6 or PACT clipping, max pools and flattens after the
quantizer, residual blocks adding a quantized input); or an MLP, an LSTM /
GRU over a sequence, a Transformer encoder layer. It converts the
network with random weight and activation bits, random non-contiguous bit masks, symmetric,
zero-point or float activations and a quantized first input or not, finalizes and saves it,
compiles it for a target with dynamic or calibrated scales, and runs ``csqc verify
--per-layer`` against the artifact where the target runs here (aarch64: under qemu-user; cuda:
the compile alone). A case passes when verify is exact (a calibrated model may drift from
PyTorch's dynamic scales on top-1: counted apart), or when csqc refuses the model with a
``CsqcError`` (a stated limitation, counted by its message); anything else is a finding::

    python -m csqc.differential --cases 300 [--seed S] [--target llvm|onnx|cuda|aarch64|all]

Cases are independent and reproducible: ``--seed S --cases 1`` runs case S again.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CsqcError

__all__ = ["Case", "Outcome", "draw_case", "run_case", "main"]

TARGETS = ("llvm", "onnx", "cuda", "aarch64")


@dataclass(frozen=True)
class Case:
    """One drawn model and how it is built, compiled and checked."""

    seed: int
    kind: str  # "conv", "branches", "decoder", "sequence", "reference", "mlp", "lstm", "gru", "encoder"
    input_shape: tuple[int, ...]  # one sample's shape (no batch axis)
    batch: int
    n_bits: int
    act_bits: int | None  # None: weight-only (float activations), or a reference net's own quantizers
    symmetric: bool
    quantize_first_input: bool
    calibrated: bool
    target: str

    def describe(self) -> str:
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: str  # "exact", "drift" (see _status), "refused", "compiled" (cuda: compile only), "mismatch", "crash"
    detail: str = ""
    seconds: float = 0.0


def _torch():
    import torch

    return torch


# -- drawing networks -------------------------------------------------------------------------
def _activation(r: random.Random):
    nn = _torch().nn
    return r.choice([nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Identity, nn.Sigmoid, nn.Tanh,
                     nn.Hardsigmoid, lambda: nn.LeakyReLU(0.1)])()


@functools.lru_cache(maxsize=None)
def _modules():
    """The block classes, built once on first use (torch imports lazily)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Residual(nn.Module):
        def __init__(self, body, act):
            super().__init__()
            self.body, self.act = body, act

        def forward(self, x):
            return self.act(self.body(x) + x)

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int, gate):
            super().__init__()
            self.reduce = nn.Conv2d(channels, max(1, channels // 2), 1)
            self.expand = nn.Conv2d(max(1, channels // 2), channels, 1)
            self.gate = gate

        def forward(self, x):
            return x * self.gate(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))

    class Branches(nn.Module):
        def __init__(self, channels: int, a: int, b: int, act):
            super().__init__()
            self.a = nn.Conv2d(channels, a, 1)
            self.b = nn.Sequential(nn.Conv2d(channels, b, 3, padding=1), act)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    class Upsample(nn.Module):
        """Resizing by a whole or fractional factor; ``bilinear-aligned``: corners aligned."""

        def __init__(self, mode: str, factor: float):
            super().__init__()
            self.mode, self.factor = mode, factor

        def forward(self, x):
            aligned = {"align_corners": self.mode.endswith("-aligned")} if "linear" in self.mode else {}
            return F.interpolate(x, scale_factor=self.factor, mode=self.mode.removesuffix("-aligned"), **aligned)

    class Skip(nn.Module):
        """A U-Net's skip connection: the input beside what the block makes of it."""

        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return torch.cat([x, self.block(x)], 1)

    class Recurrent(nn.Module):
        def __init__(self, kind: str, inputs: int, hidden: int, outputs: int, **form):
            super().__init__()
            self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(inputs, hidden, batch_first=True, **form)
            width = (form.get("proj_size") or hidden) * (2 if form.get("bidirectional") else 1)
            self.head = nn.Linear(width, outputs)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    class Encoder(nn.Module):
        def __init__(self, width: int, heads: int, hidden: int, norm_first: bool, activation: str):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True,
                                                    norm_first=norm_first, activation=activation)
            self.head = nn.Linear(width, 5)

        def forward(self, x):
            return self.head(self.layer(x).mean(1))

    class QuantizedResidual(nn.Module):
        """The reference's BasicBlock: conv-bn-clip-quantize, conv-bn, plus the (quantized) input,
        clip, quantize."""

        def __init__(self, channels: int, clip1, quant1, clip2, quant2):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
            self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
            self.clip1, self.quant1, self.clip2, self.quant2 = clip1, quant1, clip2, quant2

        def forward(self, x):
            out = self.quant1(self.clip1(self.bn1(self.conv1(x))))
            return self.quant2(self.clip2(self.bn2(self.conv2(out)) + x))

    return Residual, SqueezeExcite, Branches, Upsample, Skip, Recurrent, Encoder, QuantizedResidual


def _decoder_net(r: random.Random, channels: int):
    """Image-to-image blocks over ``channels`` input channels: CSQ transposed convolutions,
    group and instance norms, pixel shuffles, U-Net skips, and CSQ convs between them."""
    nn = _torch().nn
    *_, Skip, _, _, _ = _modules()
    layers, c = [], channels
    for _ in range(r.randint(2, 5)):
        pick = r.random()
        if pick < 0.2:  # polyphase (a linear layer on a 1x1 input), or stuffed when dilated
            stride, dilation = r.choice([1, 2, 2, 3]), r.choice([1, 1, 1, 2])
            out = r.choice([2, 4, 8])
            layers.append(nn.ConvTranspose2d(c, out, r.choice([1, 2, 3, 4, 5]), stride=stride,
                                             padding=r.choice([0, 1, 2]), dilation=dilation,
                                             output_padding=r.randrange(max(stride, dilation))))
            if r.random() < 0.4:  # a generator's BatchNorm: folds through the phases' interleave
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(r))
            c = out
        elif pick < 0.35:
            groups = r.choice([g for g in (1, 2, 4) if c % g == 0])
            layers.append(nn.GroupNorm(groups, c) if r.random() < 0.6 else nn.InstanceNorm2d(c, affine=True))
        elif pick < 0.45 and c % 4 == 0:
            layers.append(nn.PixelShuffle(2))
            c //= 4
        elif pick < 0.6:
            out = r.choice([2, 4, 8])
            layers.append(Skip(nn.Sequential(nn.Conv2d(c, out, 3, padding=1), _activation(r))))
            c += out
        else:
            out = r.choice([4, 8, 12])
            layers += [nn.Conv2d(c, out, r.choice([1, 3]), padding=1, stride=r.choice([1, 1, 2])), _activation(r)]
            c = out
    return layers


def _conv_net(r: random.Random, channels: int, branches: bool):
    """Blocks over ``channels`` input channels; ``branches``: squeeze-excitation, concatenation,
    upsampling and ceil-mode pools among them."""
    nn = _torch().nn
    Residual, SqueezeExcite, Branches, Upsample, *_ = _modules()
    layers, c = [], channels
    for _ in range(r.randint(1, 5 if branches else 4)):
        pick = r.random()
        if branches and pick < 0.2:
            layers.append(SqueezeExcite(c, r.choice([nn.Sigmoid, nn.Hardsigmoid])()))
        elif branches and pick < 0.4:
            a, b = r.choice([2, 4, 8]), r.choice([2, 3, 8])
            layers.append(Branches(c, a, b, _activation(r)))
            c = a + b
        elif branches and pick < 0.5:
            layers.append(Upsample(r.choice(["nearest", "nearest-exact", "bilinear", "bilinear-aligned"]),
                                   r.choice([2, 2, 3, 1.5, 1.75])))
        elif branches and pick < 0.6:
            layers.append(r.choice([nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                                    nn.AvgPool2d(3, 2, 1, ceil_mode=r.random() < 0.5,
                                                 count_include_pad=r.random() < 0.5)]))
        elif not branches and pick < 0.25:
            body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=r.choice([1, c])), nn.BatchNorm2d(c),
                                 _activation(r), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
            layers.append(Residual(body, r.choice([nn.ReLU, nn.Identity])()))
        else:
            groups = r.choice([1, 1, c]) if c > 1 else 1
            out = c * r.choice([1, 2]) if groups > 1 else r.choice([c, 2 * c, 4, 8, 16, 24])
            layers += [nn.Conv2d(c, out, r.choice([1, 3, 5]), stride=r.choice([1, 1, 2]), padding=r.choice([0, 1, 2]),
                                 dilation=r.choice([1, 1, 2]), groups=groups, bias=r.random() < 0.5)]
            if r.random() < 0.7:
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(r))
            c = out
            if not branches and r.random() < 0.3:
                layers.append(r.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)]))
    return layers


def _activation_quantizer(r: random.Random):
    """An activation, then (mostly) csqc's activation quantizer, as the CSQ reference places them."""
    from .layers import ActQuant

    nn = _torch().nn
    act = r.choice([nn.ReLU, nn.ReLU6, nn.Identity, lambda: nn.Hardtanh(-1.0, 1.0)])()
    if r.random() < 0.15:
        return act, nn.Identity()
    clip = r.choice([None, None, "relu6", "pact"])
    return act, ActQuant(r.randint(2, 8), clip=clip, symmetric=r.random() < 0.7,
                         pact_alpha=r.choice([1.0, 3.0, 10.0]))


def _reference_net(r: random.Random, channels: int):
    """Reference-style blocks: convolutions whose output is clipped and quantized by the model
    itself (csqc's ``ActQuant``; the layers read those floats), max pools of every geometry
    after the quantizer, residual blocks adding a quantized input."""
    nn = _torch().nn
    *_, QuantizedResidual = _modules()
    layers, c = [], channels
    for _ in range(r.randint(2, 5)):
        if r.random() < 0.25:
            layers.append(QuantizedResidual(c, *_activation_quantizer(r), *_activation_quantizer(r)))
        else:
            out = r.choice([c, 2 * c, 4, 8, 16])
            kernel = r.choice([1, 3])
            layers += [nn.Conv2d(c, out, kernel, stride=r.choice([1, 1, 2]), padding=kernel // 2,
                                 bias=r.random() < 0.5), nn.BatchNorm2d(out), *_activation_quantizer(r)]
            c = out
        if r.random() < 0.5:
            kernel, dilation = r.choice([2, 2, 3]), r.choice([1, 1, 2])
            padding = r.choice([0, kernel // 2]) if dilation == 1 else 0  # (no window of padding only)
            layers.append(nn.MaxPool2d(kernel, r.choice([1, 2, 2, 3]), padding, dilation=dilation,
                                       ceil_mode=r.random() < 0.3))
    return layers


def _sequence_net(r: random.Random, channels: int):
    """1-D blocks (audio, time series) over ``channels`` input channels: convolutions of any
    kernel, stride, padding (mode included), dilation and groups, batch norms, residual blocks,
    max / average pools, transposed convolutions (a vocoder's upsampling)."""
    nn = _torch().nn
    Residual, *_ = _modules()
    layers, c = [], channels
    for _ in range(r.randint(1, 5)):
        pick = r.random()
        if pick < 0.2:
            body = nn.Sequential(nn.Conv1d(c, c, 3, padding=1, groups=r.choice([1, c])), nn.BatchNorm1d(c),
                                 _activation(r), nn.Conv1d(c, c, 1), nn.BatchNorm1d(c))
            layers.append(Residual(body, r.choice([nn.ReLU, nn.Identity])()))
        elif pick < 0.3:
            layers.append(r.choice([nn.MaxPool1d(r.choice([2, 3]), ceil_mode=r.random() < 0.5),
                                    nn.AvgPool1d(r.choice([2, 3]), padding=1, count_include_pad=r.random() < 0.5)]))
        elif pick < 0.4:  # a vocoder's upsampling
            stride = r.choice([1, 2, 4])
            out = r.choice([4, 8])
            layers += [nn.ConvTranspose1d(c, out, r.choice([1, 3, 2 * stride]), stride=stride, padding=r.choice([0, 1]),
                                          output_padding=r.choice([0, 1]) if stride > 1 else 0), _activation(r)]
            c = out
        else:
            groups = r.choice([1, 1, c]) if c > 1 else 1
            out = c * r.choice([1, 2]) if groups > 1 else r.choice([c, 2 * c, 4, 8, 16])
            kernel, dilation = r.choice([1, 3, 5, 8]), r.choice([1, 1, 2])
            stride, mode = r.choice([1, 1, 2]), r.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
            padding = "same" if stride == 1 and kernel % 2 and r.random() < 0.3 else r.choice([0, 1, 2])
            layers += [nn.Conv1d(c, out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                 bias=r.random() < 0.5, padding_mode=mode)]
            if r.random() < 0.7:
                layers.append(nn.BatchNorm1d(out))
            layers.append(_activation(r))
            c = out
    return layers


def _randomize(model, r: random.Random) -> None:
    """Batch norm statistics away from the identity, and each CSQ layer's bit mask drawn (60% of
    positions kept, at least one): non-contiguous masks such as {7, 1, 0}."""
    torch = _torch()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-1, 1)
            mask = getattr(m, "mask_weight", None)
            if mask is not None:
                keep = [r.random() < 0.6 for _ in range(mask.numel())]
                if not any(keep):
                    keep[r.randrange(len(keep))] = True
                mask.copy_(torch.tensor([5.0 if k else -5.0 for k in keep]))


def _network(r: random.Random, kind: str):
    """``(float network, one sample's input shape)``, or None where the drawn convolutions leave
    no output for any input of up to 24 x 24."""
    torch = _torch()
    nn = torch.nn
    *_, Recurrent, Encoder, _ = _modules()
    if kind == "mlp":
        dims = [r.randint(1, 300)] + [r.randint(1, 600) for _ in range(r.randint(1, 3))] + [r.randint(1, 20)]
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b, bias=r.random() < 0.7), _activation(r)]
        return nn.Sequential(*layers[:-1]).eval(), (dims[0],)
    if kind in ("lstm", "gru"):
        inputs = r.randint(1, 40)
        hidden, outputs, steps = r.randint(1, 64), r.randint(2, 10), r.randint(1, 6)
        # stacks, both directions, projections: drawn after the sizes (earlier seeds keep theirs)
        form = {"bidirectional": r.random() < 0.3, "num_layers": r.choice([1, 1, 2])}
        if kind == "lstm" and hidden > 1 and r.random() < 0.25:
            form["proj_size"] = r.randint(1, hidden - 1)
        return Recurrent(kind, inputs, hidden, outputs, **form).eval(), (steps, inputs)
    if kind == "encoder":
        heads = r.choice([1, 2, 4])
        width = heads * r.randint(2, 12)
        net = Encoder(width, heads, r.randint(4, 64), r.random() < 0.5, r.choice(["relu", "gelu"]))
        return net.eval(), (r.randint(1, 7), width)
    channels = r.choice([1, 2, 3, 4, 8])
    if kind == "sequence":
        return _sequence_head(r, nn.Sequential(*_sequence_net(r, channels)).eval(), channels)
    if kind == "reference":
        layers = _reference_net(r, channels)
    else:
        layers = _decoder_net(r, channels) if kind == "decoder" else _conv_net(r, channels, kind == "branches")
    body = nn.Sequential(*layers).eval()
    first = r.randint(5, 24), r.randint(5, 24)
    latent = kind == "decoder" and r.random() < 0.25  # a generator's 1x1 latent input first
    for h in [1] * latent + [*range(first[0], 25), *range(5, first[0])]:
        for w in [1] * (latent and h == 1) + [*range(first[1], 25), *range(5, first[1])]:
            try:
                with torch.no_grad():
                    features = body(torch.zeros(1, channels, h, w))
            except (RuntimeError, ValueError):  # an empty output, an instance norm of one element: a larger input
                continue
            if features.numel() == 0:
                continue
            head = [nn.Flatten(), nn.Linear(features.numel(), r.choice([3, 7, 10, 17]))]
            if r.random() < 0.4:  # a global average pool first
                head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features.shape[1], r.choice([3, 10]))]
            return nn.Sequential(body, *head).eval(), (channels, h, w)
    return None


def _sequence_head(r: random.Random, body, channels: int):
    """``(body with a classifier head, one sample's input shape)`` for the shortest length from
    a drawn one up to 64 that leaves the 1-D body an output, or None."""
    torch = _torch()
    nn = torch.nn
    first = r.randint(4, 40)
    for length in [*range(first, 65), *range(4, first)]:
        try:
            with torch.no_grad():
                features = body(torch.zeros(1, channels, length))
        except RuntimeError:  # an empty output somewhere (or reflect padding wider than the input)
            continue
        if features.numel() == 0:
            continue
        head = [nn.Flatten(), nn.Linear(features.numel(), r.choice([3, 10, 12]))]
        if r.random() < 0.5:  # keyword spotting's global average pool
            head = [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(features.shape[1], r.choice([3, 12]))]
        return nn.Sequential(body, *head).eval(), (channels, length)
    return None


def draw_case(seed: int, target: str | None = None) -> tuple[Case, object] | None:
    """Case ``seed`` and its float network (None: no input size gives the drawn convolutions an
    output). ``target`` overrides the drawn one."""
    torch = _torch()
    r = random.Random(seed)
    torch.manual_seed(seed)
    kind = r.choice(["conv", "conv", "branches", "branches", "mlp", "lstm", "gru", "encoder", "decoder", "sequence",
                     "reference"])
    drawn = _network(r, kind)
    if drawn is None:
        return None
    net, shape = drawn
    case = Case(seed=seed, kind=kind, input_shape=tuple(shape), batch=r.choice([1, 1, 2, 3]),
                n_bits=r.randint(1, 8) if r.random() < 0.9 else r.randint(9, 12),
                act_bits=r.randint(2, 8) if r.random() < 0.85 else None, symmetric=r.random() < 0.7,
                quantize_first_input=r.random() < 0.3, calibrated=r.random() < 0.5,
                target=target or r.choice(["llvm", "llvm", "onnx"]))
    if kind == "reference":  # its activation quantizers are the model's own: convert adds none
        case = dataclasses.replace(case, act_bits=None, quantize_first_input=False)
    return case, net


# -- running one case -------------------------------------------------------------------------
def _quantized(case: Case, net, r: random.Random):
    import csqc

    torch = _torch()
    example = torch.randn(case.batch, *case.input_shape)
    model = csqc.convert(net, n_bits=case.n_bits, act_bits=case.act_bits, act_symmetric=case.symmetric,
                         quantize_first_input=case.quantize_first_input, example_inputs=(example,))
    _randomize(model, r)
    return csqc.finalize(model), example


def _status(case: Case, report) -> str:
    """``exact``; ``drift`` where only PyTorch's pair of a calibrated case missed its top-1 bound
    (PyTorch runs the trained model's dynamic scales: a calibrated model is another model, and at
    2 or 3 activation bits it may change a few of a handful of predictions); else ``mismatch``."""
    if not report.accumulators_exact:
        return "mismatch"
    failed = [p for p in report.pairs if not p.ok]
    if not failed:
        return "exact"
    if case.calibrated and all("pytorch" in (p.a, p.b) for p in failed):
        return "drift"
    return "mismatch"


def run_case(seed: int, folder: Path, target: str | None = None) -> Outcome | None:
    """Build, compile and check case ``seed`` in ``folder`` (its files removed after)."""
    import csqc
    from .targets.registry import get_target

    drawn = draw_case(seed, target)
    if drawn is None:
        return None
    case, net = drawn
    start = time.perf_counter()
    r = random.Random(seed ^ 0x5EED)
    files = []
    try:
        model, example = _quantized(case, net, r)
        path = csqc.save(model, folder / f"case{seed}.pt", example)
        files.append(path)
        calibrate = (np.random.default_rng(seed).standard_normal((8, *case.input_shape)).astype(np.float32)
                     if case.calibrated else None)
        artifact = folder / f"case{seed}{get_target(case.target).suffix}"
        files.append(artifact)
        csqc.compile(path, case.target, artifact, calibrate=calibrate)
        spec = get_target(case.target)
        if not (spec.runs_here or spec.emulated):  # (aarch64 artifacts run under qemu-user)
            return Outcome(case, "compiled", seconds=time.perf_counter() - start)
        report = csqc.verify(csqc.load(path), samples=2 * case.batch, artifact=str(artifact), per_layer=True,
                             calibrate=calibrate)
        return Outcome(case, _status(case, report), "; ".join(report.notes)[:2000], time.perf_counter() - start)
    except CsqcError as e:
        return Outcome(case, "refused", f"{type(e).__name__}: {e}"[:300], time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - a finding: anything but a CsqcError
        return Outcome(case, "crash", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}",
                       time.perf_counter() - start)
    finally:
        for f in files:
            Path(f).unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csqc.differential", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed (cases run seed, seed + 1, ...)")
    parser.add_argument("--target", choices=[*TARGETS, "all", "drawn"], default="drawn",
                        help="the target of every case (all: each case on every target; drawn: llvm or onnx)")
    opts = parser.parse_args(argv)
    if opts.cases < 1:
        parser.error("--cases must be at least 1")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    targets = list(TARGETS) if opts.target == "all" else [None if opts.target == "drawn" else opts.target]
    counts, refusals, findings = Counter(), Counter(), []
    with tempfile.TemporaryDirectory(prefix="csqc-differential-") as folder:
        for seed in range(opts.seed, opts.seed + opts.cases):
            for target in targets:
                outcome = run_case(seed, Path(folder), target)
                if outcome is None:
                    counts["no network"] += 1
                    continue
                counts[outcome.status] += 1
                line = f"{seed} {outcome.case.target} {outcome.status} {outcome.seconds:.1f}s"
                if outcome.status == "refused":
                    refusals[outcome.detail.split(" (at ")[0][:120]] += 1
                if outcome.status in ("mismatch", "crash"):
                    findings.append(outcome)
                    line += f" {outcome.case.describe()}\n{outcome.detail}"
                print(line, flush=True)
    print("outcomes:", dict(counts), file=sys.stderr)
    for message, n in refusals.most_common():
        print(f"  refused {n}x: {message}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
