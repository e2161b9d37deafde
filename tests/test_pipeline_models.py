"""Acceptance: real models through capture and the default pipeline.

For every model: the interpreter on the captured IR matches PyTorch (float tolerance; each
segment between activation quantizers fed PyTorch's own input there, see ``modelcheck``), every
quantizer produces PyTorch's codes exactly, and after the full default pipeline every layer's
integer accumulator is identical bit for bit to the captured graph with only
``fuse_act_quant`` applied, and to the ``integer`` pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import csqc
from csqc.capture import capture
from csqc.ir import Graph
from csqc.layers import ActQuant
from csqc.models import reference, vision
from csqc.passes import run_passes
from csqc.reference import load_reference_state
from irbuild import assert_same_accumulators, run
from modelcheck import quantizer_inputs, randomize_masks, recalibrate_batch_norm, teacher_forced, torch_codes


@dataclass
class Case:
    model: torch.nn.Module  # the finalized PyTorch model the file was saved from
    graph: Graph  # captured IR
    x: np.ndarray
    expected: list[np.ndarray]  # PyTorch's output, then the value at each cut (see ``forced``)
    forced: Graph  # captured IR cut at every quantizer, cut values as extra outputs
    forced_inputs: dict[str, np.ndarray]
    quantizers: dict[str, tuple[ActQuant, torch.Tensor]]  # forced input -> (module, PyTorch's input)


def _case(model, cm, x: torch.Tensor) -> Case:
    assert torch.equal(cm(x), model(x))  # the file computes what the model does
    g = capture(cm, batch=x.shape[0])
    out, seen = quantizer_inputs(model, x)
    forced, cuts = teacher_forced(g)
    modules = dict(model.named_modules())
    quantizers = {name: (modules[src], seen[src]) for name, (src, _) in cuts.items()}
    expected = [out] + [None] * (len(forced.outputs) - 1)
    for name, (src, index) in cuts.items():
        expected[index] = seen[src].numpy()
    inputs = {g.inputs[0].name: x.numpy(), **{name: t.numpy() for name, (_, t) in quantizers.items()}}
    return Case(model, g, x.numpy(), expected, forced, inputs, quantizers)


def _vision(factory, shape, n_bits, act_bits, tmp, seed):
    torch.manual_seed(seed)
    model = factory()
    recalibrate_batch_norm(model, torch.rand(2, *shape[1:]))
    csqc.convert(model, n_bits=n_bits, act_bits=act_bits)
    randomize_masks(model, seed)
    csqc.finalize(model)
    path = csqc.save(model, tmp / "model.pt", torch.rand(*shape))
    return _case(model, csqc.load(path), torch.rand(*shape))


def _reference_checkpoint(path, factory, seed=0):
    """A checkpoint in the CSQ reference layout (MSB-first bits, {'model': state_dict})."""
    g = torch.Generator().manual_seed(seed)
    model = factory()
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or (k.endswith(".bias") and "bn" in k):
            v = torch.randn(v.shape, generator=g) * 0.1
        sd[k] = v
    for name, m in model.named_modules():
        if hasattr(m, "pweight"):
            n = m.n_bits
            sd[f"{name}.pweight"] = torch.randn(m.pweight.shape, generator=g)
            sd[f"{name}.nweight"] = torch.randn(m.nweight.shape, generator=g)
            sd[f"{name}.mask_weight"] = torch.randn(n, generator=g)
            sd[f"{name}.scale"] = torch.rand(1, generator=g) + 0.1
            sd[f"{name}.exps"] = torch.tensor([2.0 ** (n - 1 - i) / (2**n - 1) for i in range(n)])
            if m.bias is not None:
                del sd[f"{name}.bias"]
                sd[f"{name}.pbias"] = torch.rand(m.bias.shape[0], n, generator=g).round()
                sd[f"{name}.nbias"] = torch.rand(m.bias.shape[0], n, generator=g).round()
                sd[f"{name}.biasscale"] = torch.rand(1, generator=g)
    torch.save({"model": sd, "epoch": 7, "valid_acc": 0.9}, path)
    return sd


def _reference(factory_name, tmp):
    path = tmp / "ckpt.pth"
    factory = getattr(reference, factory_name)
    sd = _reference_checkpoint(path, factory)
    cm = csqc.load(path, model_factory=f"csqc.models.reference:{factory_name}", input_shape=(2, 3, 32, 32))
    model = load_reference_state(factory(), sd)
    torch.manual_seed(5)
    return _case(model, cm, torch.rand(2, 3, 32, 32))


def _digits(recipe, trained):
    model, _, example, path = trained(recipe)
    torch.manual_seed(6)
    x = torch.cat([example, example + 0.1 * torch.randn_like(example)])
    return _case(model, csqc.load(path), x)


class _Residual(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
                                  nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


def image_generator() -> torch.nn.Module:
    """An image-to-image generator in the style of CycleGAN's and fast style transfer's:
    reflection-padded 7x7 convs, a strided conv padding by replication, residual blocks,
    nearest upsampling and a tanh output."""
    nn = torch.nn
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 8, 7), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="replicate"), nn.BatchNorm2d(16),
                         nn.ReLU(), _Residual(16), _Residual(16), nn.Upsample(scale_factor=2),
                         nn.Conv2d(16, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(), nn.ReflectionPad2d(3),
                         nn.Conv2d(8, 3, 7), nn.Tanh())


class Segmenter(torch.nn.Module):
    """A segmentation net in miniature (FCN / LRASPP style): a stride-8 backbone, a 1x1 head
    upsampled 4x (bilinear) and added to a stride-2 branch, then bilinear to the input's size."""

    def __init__(self, classes: int = 5):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head, self.skip = nn.Conv2d(32, classes, 1), nn.Conv2d(16, classes, 1)

    def forward(self, x):
        shallow = self.stem(x)
        y = torch.nn.functional.interpolate(self.head(self.body(shallow)), scale_factor=4, mode="bilinear")
        return torch.nn.functional.interpolate(y + self.skip(shallow), size=x.shape[-2:], mode="bilinear")


class ResizingSegmenter(Segmenter):
    """The segmenter resizing to its maps' sizes as HRNet and DeepLab v1 do: corners aligned,
    between sizes no factor joins (a 26-pixel input: maps of 13, 7 and 4), then a nearest resize
    by 1.5 (26 -> 39)."""

    def forward(self, x):
        F = torch.nn.functional
        shallow = self.stem(x)
        y = F.interpolate(self.head(self.body(shallow)), size=shallow.shape[-2:], mode="bilinear", align_corners=True)
        y = F.interpolate(y + self.skip(shallow), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return F.interpolate(y, scale_factor=1.5, mode="nearest")


class SuperResolver(torch.nn.Module):
    """A super-resolution net in the VDSR / ESPCN style: convs, a 2x pixel shuffle, and the
    bicubic-upsampled image added as the residual's base."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x) + torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic")


BUILDERS = {
    "digits-mlp": lambda tmp, trained: _digits("digits-mlp", trained),
    "digits-cnn": lambda tmp, trained: _digits("digits-cnn", trained),
    "resnet20-cifar": lambda tmp, trained: _vision(vision.resnet20, (2, 3, 32, 32), 6, 4, tmp, 1),
    "reference-resnet20-relu6": lambda tmp, trained: _reference("resnet20_4bit", tmp),
    "reference-resnet20-pact": lambda tmp, trained: _reference("resnet20_2bit", tmp),
    "resnet18-224": lambda tmp, trained: _vision(vision.resnet18, (1, 3, 224, 224), 8, 4, tmp, 2),
    "mobilenet_v2-224": lambda tmp, trained: _vision(vision.mobilenet_v2, (1, 3, 224, 224), 5, 4, tmp, 3),
    "image-generator": lambda tmp, trained: _vision(image_generator, (2, 3, 24, 24), 4, 4, tmp, 4),
    "segmenter": lambda tmp, trained: _vision(Segmenter, (2, 3, 32, 32), 4, 4, tmp, 5),
}
# ResNet-18 and MobileNetV2 take about 40 s each on 2 cores (mostly convert + save): not marked slow.


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request, tmp_path_factory, trained):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param), trained)


def _close(actual, expected, rtol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.abs(e).max()), err_msg=f"output {i}")


def test_every_quantizer_produces_pytorchs_codes(case):
    assert case.quantizers, "the model quantizes activations"
    _, rec = run(case.forced, case.forced_inputs)
    for name, (module, x) in case.quantizers.items():
        codes, scale = torch_codes(module, x)
        node = name.removesuffix(".in")
        assert rec[f"{node}.scale"] == scale, node
        assert np.array_equal(rec[f"{node}.codes"], codes), node


def test_captured_ir_matches_pytorch_at_the_output_and_at_every_quantizer(case):
    out, _ = run(case.forced, case.forced_inputs)
    _close(out, case.expected, 1e-4)


def test_default_pipeline_accumulators_match_the_captured_graph_with_fused_quantizers(case):
    fused, _ = run_passes(case.forced, ["fuse_act_quant"])
    final, _ = run_passes(case.forced, "default")
    a, rec_fused = run(fused, case.forced_inputs)
    b, rec_final = run(final, case.forced_inputs)
    assert_same_accumulators(rec_fused, rec_final)
    _close(b, a, 1e-5)
    _close(b, case.expected, 1e-4)


def test_default_and_integer_pipelines_agree_bit_for_bit(case):
    (a,), rec_default = run(run_passes(case.graph, "default")[0], [case.x])
    (b,), rec_integer = run(run_passes(case.graph, "integer")[0], [case.x])
    assert_same_accumulators(rec_default, rec_integer)
    assert np.array_equal(a, b)


def test_default_pipeline_leaves_packed_plane_layers_reading_codes_and_no_batch_norm(case):
    final, _ = run_passes(case.graph, "default")
    layers = final.quant_layers()
    coded = [n for n in layers if n.quant.act_bits is not None]
    assert coded and all(n.quant.packed_word == 32 and n.quant.encoding in ("posneg", "offset") for n in layers)
    assert not any(n.op == "batch_norm" for n in final.nodes)
    producers = final.producers()
    assert not any(n.inputs[0] in producers and producers[n.inputs[0]].op == "dequantize" for n in layers)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("factory, size", [(image_generator, 24), (Segmenter, 24), (ResizingSegmenter, 26),
                                           (SuperResolver, 15)],
                         ids=["generator", "segmenter", "resizing-segmenter", "super-resolver"])
def test_image_to_image_models_compile_and_verify_exactly(factory, size, seed, tmp_path):
    # every padding mode, nearest, linear and bicubic resizing (by factors, to sizes, corners
    # aligned) through the llvm and onnx targets
    torch.manual_seed(seed)
    model = factory()
    recalibrate_batch_norm(model, torch.rand(2, 3, size, size))
    csqc.finalize(csqc.convert(model, n_bits=4, act_bits=4))
    path = csqc.save(model, tmp_path / "model.pt", torch.rand(1, 3, size, size))
    for target, artifact in (("llvm", "model.so"), ("onnx", "model.onnx")):
        csqc.compile(path, target, tmp_path / artifact)
        report = csqc.verify(path, samples=2, artifact=str(tmp_path / artifact), per_layer=True)
        assert report.ok and report.accumulators_exact, (target, report.notes)


def normalized_net() -> torch.nn.Module:
    """Group and instance norms, leaky and parametric ReLUs, pixel (un)shuffles, a transposed conv
    (float) and an adaptive max pool around CSQ convs: layers capture composes of IR ops."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.LeakyReLU(0.1), nn.PixelShuffle(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.PReLU(8),
                         nn.PixelUnshuffle(2), nn.Conv2d(32, 8, 1), nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def sequence_net() -> torch.nn.Module:
    """Float 1-D convolutions and pools (conv2d and pools over a height of one) feeding a CSQ head."""
    nn = torch.nn
    return nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.MaxPool1d(2), nn.LeakyReLU(0.2),
                         nn.Conv1d(8, 8, 3, dilation=2), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(48, 5))


def smooth_activation_net() -> torch.nn.Module:
    """ELU, SELU, CELU, Mish, GLU, Softshrink, LogSigmoid and Threshold (exp and log on every
    runtime, exact branch indicators) between CSQ convs, and a softplus head (beta 2, threshold
    10: both of torch's branches in use)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Mish(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SELU(), nn.Conv2d(8, 8, 1),
                         nn.CELU(0.5), nn.Conv2d(8, 16, 1), nn.GLU(dim=1), nn.Softshrink(0.05), nn.Conv2d(8, 8, 1),
                         nn.LogSigmoid(), nn.Threshold(-0.5, 0.0), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
                         nn.Softplus(beta=2.0, threshold=10.0))


class MaxPooledClassifier(torch.nn.Module):
    """A global max pool (``amax`` over the plane) and a log_softmax head, as MNIST-style nets end."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return torch.nn.functional.log_softmax(self.head(self.features(x).amax(dim=(2, 3))), dim=1)


class PrototypeClassifier(torch.nn.Module):
    """A metric-learning head: BERT's hand-written erf GELU, a signed square root (``sign(e) *
    sqrt(|e|)``, power normalization) and cosine similarity to learned prototypes (broadcast)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.embed = nn.Linear(8 * 6 * 6, 16)
        self.prototypes = nn.Parameter(torch.randn(5, 16))

    def forward(self, x):
        h = self.features(x).flatten(1)
        h = h * 0.5 * (1.0 + torch.erf(h / 1.4142135623730951))
        e = self.embed(h)
        e = torch.sign(e) * torch.sqrt(torch.abs(e))
        return torch.nn.functional.cosine_similarity(e.unsqueeze(1), self.prototypes.unsqueeze(0), dim=2)


class TimestepDenoiser(torch.nn.Module):
    """A diffusion model's conditioning: the timestep (the input's first column, times 1000) as
    a sinusoidal embedding (sin and cos of the computed angles), an MLP on it and the features."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.register_buffer("freqs", torch.exp(torch.arange(8.0) * -(9.2 / 8)))
        self.time = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32))
        self.body = nn.Sequential(nn.Linear(8, 32), nn.SiLU())
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        angles = x[:, :1] * 1000.0 * self.freqs
        t = self.time(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))
        return self.head(self.body(x[:, 1:]) + t)


class ExportedOpsNet(torch.nn.Module):
    """Ops torch.export keeps as their own between CSQ linears: ``x.mT``, ``triu`` of computed
    scores, ``movedim``, ``tensor_split``, ``diff``, ``min(dim)``, ``logsumexp``, ``var_mean``,
    ``lerp`` and ``addcmul``; RMSNorm, ``baddbmm``, ``where`` over a causal mask, an adaptive max
    pool of overlapping windows, ``max`` against a constant, ``exp2``, ``expm1``, ``log1p``; a
    ``torch.gather`` at constant positions and a long reversal (``take``); comparisons of
    computed values selecting by ``where`` and ``masked_fill``; ``Tensor.unfold``, ``F.unfold``
    and ``F.fold``."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.proj, self.mix, self.head = nn.Linear(8, 8), nn.Linear(6, 6), nn.Linear(24, 5)
        self.norm = nn.RMSNorm(8)
        self.register_buffer("bias", torch.randn(1, 6, 6))
        self.register_buffer("causal", torch.tril(torch.ones(6, 6)).bool())
        self.register_buffer("floor", torch.linspace(-1, 1, 6))
        self.register_buffer("order", torch.randint(0, 3, (1, 6, 3), generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        h = self.norm(self.proj(x))
        scores = torch.baddbmm(self.bias, h, h.mT, beta=0.5, alpha=0.125)
        attention = torch.where(self.causal, scores, float("-inf")).softmax(-1)
        h = self.mix((attention + (h @ h.mT).triu() / 8).movedim(1, 2))
        h = torch.where(h > 0, h, 0.1 * h).masked_fill((h.abs() < 0.05) & (h != 0), 0.0)
        functional = torch.nn.functional
        h = h + functional.fold(functional.unfold(h[:, None], 2, stride=2) * 0.5, (6, 6), 2, stride=2)[:, 0]
        a, b = h.tensor_split(2, 2)
        a = a + h.unfold(2, 3, 1).amax(-1)[..., 1:]
        a = a + torch.nn.functional.adaptive_max_pool1d(h, 4)[..., 1:]
        a = torch.gather(a, 2, self.order.expand(a.shape[0], -1, -1)) + a.flatten(1).flip(1).view_as(a)
        v, mu = torch.var_mean(h, 2)
        mixed = torch.lerp(b.min(dim=1).values, torch.logsumexp(a, 1), 0.3)
        shaped = torch.expm1(torch.max(v, self.floor)) + torch.log1p(torch.exp2(-mu.abs()))
        return self.head(torch.cat([torch.diff(a, dim=1).flatten(1), mixed,
                                    torch.addcmul(v, mu, mu, value=0.5) + shaped], 1))


@pytest.mark.parametrize("factory, shape", [(normalized_net, (1, 3, 16, 16)), (sequence_net, (1, 4, 32)),
                                            (smooth_activation_net, (1, 3, 16, 16)),
                                            (MaxPooledClassifier, (1, 3, 12, 12)),
                                            (PrototypeClassifier, (1, 3, 12, 12)), (TimestepDenoiser, (1, 9)),
                                            (ExportedOpsNet, (1, 6, 8))],
                         ids=["normalized", "sequence", "smooth", "max_pooled", "prototypes", "timesteps",
                              "exported_ops"])
def test_composed_layers_compile_and_verify_exactly(factory, shape, tmp_path):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(factory().eval(), n_bits=4, act_bits=4))
    path = csqc.save(model, tmp_path / "model.pt", torch.rand(*shape))
    for target, artifact in (("llvm", "model.so"), ("onnx", "model.onnx")):
        csqc.compile(path, target, tmp_path / artifact)
        report = csqc.verify(path, samples=2, artifact=str(tmp_path / artifact), per_layer=True)
        assert report.ok and report.accumulators_exact, (target, report.notes)
