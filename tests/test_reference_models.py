"""Every reference architecture: csqc's mirrors and the reference's own model code as factories.

The reference forward is ``csq_reference_style`` (an independent implementation of the
reference math) in ticket mode with saturated gates (temperature 200, logits +-1). Widths are
scaled down and inputs are 32x32 to keep the suite fast; module names do not change.
"""
import json

import pytest
import torch
from click.testing import CliRunner

import csq_reference_style as R
import csqc
from csqc.cli import cli
from csqc.models import reference as mirrors
from csqc.reference import load_reference_state

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

# (reference-style class, mirror factory, constructor arguments)
ARCHITECTURES = {
    "resnet20-a4": (R.ResNet, mirrors.resnet20, dict(act_bit=4, width=4)),
    "resnet20-a2": (R.ResNet, mirrors.resnet20, dict(act_bit=2, width=4)),
    "vgg19bn-a4": (R.VGG19bn, mirrors.vgg19bn, dict(act_bit=4, width=4)),
    "vgg-a2": (R.VGGImageNet, mirrors.vgg, dict(act_bit=2, width=4, image_size=32, hidden=16, num_classes=10)),
    "resnet18-a4": (R.ResNet18, mirrors.resnet18, dict(act_bit=4, width=4, num_classes=10)),
    "resnet50-a2": (R.ResNet50, mirrors.resnet50, dict(act_bit=2, width=4, num_classes=10)),
}


def _trained(cls, kwargs, seed=0):
    net = cls(**kwargs)
    R.randomize_trained(net, seed=seed)
    return net


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_mirror_equals_the_reference_forward(arch):
    cls, mirror, kwargs = ARCHITECTURES[arch]
    net = _trained(cls, kwargs)
    model = load_reference_state(mirror(**kwargs), net.state_dict())
    with torch.no_grad():
        expected, out = net(X), model(X)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), arch


def test_resnet18_last_stage_runs_on_float_activations_like_the_reference():
    model = mirrors.resnet18(act_bit=4, width=4)
    assert isinstance(model.layer3.block2.quant2, csqc.ActQuant)
    assert isinstance(model.layer4.block2.quant2, torch.nn.Identity)  # built with act_bit=0 by the reference


def _verify_exactly(model, tmp_path):
    onnx_path, so_path = tmp_path / "m.onnx", tmp_path / "m.so"
    csqc.compile(model, "onnx", onnx_path)
    csqc.compile(model, "llvm", so_path)
    for artifact in (onnx_path, so_path):
        report = csqc.verify(model, samples=2, artifact=str(artifact))
        data = report.to_json()
        assert report.ok and report.accumulators_exact, json.dumps({k: v for k, v in data.items() if k != "layers"})
        assert f"artifact:{artifact.name}" in report.runtimes


@pytest.mark.parametrize("arch,factory", [
    ("resnet20-a4", "csqc.models.reference:resnet20(act_bit=4, width=4)"),
    ("resnet18-a4", "csqc.models.reference:resnet18(act_bit=4, width=4, num_classes=10)"),
])
def test_imported_mirror_compiles_and_verifies_exactly(tmp_path, arch, factory):
    cls, _, kwargs = ARCHITECTURES[arch]
    torch.save({"model": _trained(cls, kwargs, seed=4).state_dict()}, tmp_path / "ckpt.pth")
    model = csqc.load(tmp_path / "ckpt.pth", model_factory=factory, input_shape=(2, 3, 32, 32))
    _verify_exactly(model, tmp_path)


@pytest.mark.parametrize("act_bit", [4, 2])
def test_reference_style_code_imports_with_model_factory_and_verifies(tmp_path, act_bit):
    """The reference's own style as the factory: its bit layers are swapped by structure, its
    blocks call conv(x, temp, ticket), and its function-level quantizer (with ``if s == 0``)
    is replaced by csqc's act_quant, checked on a sample input."""
    net = _trained(R.ResNet, dict(act_bit=act_bit, width=4), seed=5)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "ckpt.pth")
    factory = f"csq_reference_style:ResNet(act_bit={act_bit}, width=4)"  # act_bit 2: PACT's x.min(alpha)
    model = csqc.load(tmp_path / "ckpt.pth", model_factory=factory, input_shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert torch.allclose(model(X), net(X), rtol=1e-5, atol=1e-5)
    (record,) = model.manifest["metadata"]["replaced_quantizers"]
    assert record["function"] == "csq_reference_style.QuantizeAct" and record["calls"] == 18
    assert R.QuantizeAct.__name__ == "QuantizeAct"  # the user's module is left as it was
    import csq_reference_style

    assert csq_reference_style.QuantizeAct is R.QuantizeAct
    quantize = [n for n in csqc.capture(model).nodes if n.op == "quantize"]
    assert len(quantize) == 18  # integer activation codes, not float

    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "ckpt.pth"), "--model-factory", factory,
                                      "--input-shape", "2,3,32,32", "--samples", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True


class _FloorQuant(torch.autograd.Function):
    """Looks like a quantizer (x, bit) but truncates: must not be replaced."""

    @staticmethod
    def forward(ctx, x, bit):
        s = x.abs().max()
        if s == 0:
            return x * 0
        return torch.floor(x.abs() * (2**bit - 1) / s) * torch.sign(x) * s / (2**bit - 1)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _FloorBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = R.BitLinear(8, 4)

    def forward(self, x):
        return self.fc(_FloorQuant.apply(x, 4), 200, True)


def test_an_unrecognised_quantizer_is_named_when_capture_fails(tmp_path):
    net = _FloorBlock()
    R.randomize_trained(net)
    torch.save(net.state_dict(), tmp_path / "ckpt.pth")
    import sys

    sys.modules[__name__]._FloorBlock = _FloorBlock  # importable for --model-factory
    with pytest.raises(csqc.CsqcError, match="_FloorQuant was not recognised as a quantizer"):
        csqc.load(tmp_path / "ckpt.pth", model_factory=f"{__name__}:_FloorBlock", input_shape=(2, 8))


@pytest.mark.parametrize("arch,factory", [
    ("vgg19bn-a4", "csqc.models.reference:vgg19bn(act_bit=4, width=4)"),
    ("vgg-a2", "csqc.models.reference:vgg(act_bit=2, width=4, image_size=32, hidden=16, num_classes=10)"),
])
def test_vgg_convs_after_a_pool_read_codes_and_verify_exactly(tmp_path, arch, factory):
    """The reference VGGs quantize, then max-pool (and flatten): the conv after each pool and the
    first classifier layer read codes (sink_quantize), so every conv but the first (a float image)
    is an integer layer."""
    from csqc.passes import run_passes

    cls, _, kwargs = ARCHITECTURES[arch]
    torch.save({"model": _trained(cls, kwargs, seed=6).state_dict()}, tmp_path / "ckpt.pth")
    model = csqc.load(tmp_path / "ckpt.pth", model_factory=factory, input_shape=(2, 3, 32, 32))
    graph, _ = run_passes(csqc.capture(model))
    convs = [n for n in graph.nodes if n.op == "qconv2d"]
    assert len(convs) == 16 and convs[0].quant.act_bits is None
    assert all(n.quant.act_bits == kwargs["act_bit"] for n in convs[1:]), [n.name for n in convs if not n.quant.act_bits]
    classifier = next(n for n in graph.nodes if n.op == "qlinear")
    assert classifier.name in ("fc", "fc1") and classifier.quant.act_bits == kwargs["act_bit"]
    _verify_exactly(model, tmp_path)
