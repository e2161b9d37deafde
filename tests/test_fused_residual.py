"""Residual blocks fused into the epilogue of the integer layer that feeds their add (llvm target).

``relu(conv2(.) + shortcut)`` and the quantizer of the next block run in conv2's epilogue: no
float conv2 output, no add, relu or quantize kernel. Where both operands of the add are integer
layers (a downsample shortcut), the first one in the plan takes the add and the other writes its
float output. The artifact must stay exact against the interpreter, with dynamic and with
calibrated (static) activation scales.
"""
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import runtime
from csqc.verify import verify


class Block(nn.Module):
    def __init__(self, channels: int, downsample: bool, relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = nn.Conv2d(channels, channels, 1) if downsample else nn.Identity()
        self.relu = relu

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x)
        return torch.relu(y) if self.relu else y


def _model(tmp_path):
    torch.manual_seed(3)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                Block(8, downsample=False), Block(8, downsample=True),
                                Block(8, downsample=False, relu=False),  # MobileNetV2-like: add, no relu
                                nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=False))
    return csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(1, 3, 6, 6)))


def _kinds(art) -> list[str]:
    return [runtime._kernel_kind(s["func"]) for s in runtime.load(art).plan["steps"]]


@pytest.mark.parametrize("calibrated", [False, True])
def test_residual_adds_run_in_epilogues_and_verify_exactly(tmp_path, calibrated):
    model = _model(tmp_path)
    calib = [np.random.default_rng(0).random((8, 3, 6, 6), dtype=np.float32)] if calibrated else None
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, calibrate=calib)
    kinds = _kinds(art)
    assert "binary" not in kinds and "unary" not in kinds, kinds
    # quantize kernels left: the stem's float output, the downsample shortcut's own quantizer (one
    # quantizer per epilogue: block 3's conv1 takes the fused codes) and the linear layer's input
    # (after Flatten); every other block input's codes come from the epilogue before it
    assert kinds.count("quantize") == 3, kinds
    assert kinds.count("epilogue") == 7 + 1, kinds  # 7 integer convs, linear (the stem's runs in its conv)
    assert kinds[0] == "conv2d_f32" and kinds[1] == "quantize", kinds
    check = [np.random.default_rng(1).random((3, 3, 6, 6), dtype=np.float32)]
    report = verify(model, inputs=check, artifact=str(art), per_layer=True, calibrate=calib)
    assert report.ok and report.accumulators_exact, report.to_json()


def _identity_blocks(tmp_path, seed: int):
    """A float stem (its output differs from the interpreter's in the last bits, as any float
    conv may) and two identity residual blocks: the stem's float noise reaches the fused
    residual epilogues through the shortcut, so their dynamic scales may differ by an ulp."""
    torch.manual_seed(seed)
    float_model = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1), nn.ReLU(),
                                Block(16, downsample=False), Block(16, downsample=False),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=4, act_bits=4, quantize_first_input=False))
    return csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(2, 64, 8, 8)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_codes_of_a_fused_residual_verify_on_the_float_they_quantize(tmp_path, seed):
    """The float a fused residual epilogue writes for later readers (the next block's shortcut)
    is the input verify requantizes its codes from: exact on the runtime's own values, where
    the golden run's scale may differ by an ulp after the float stem (batch 2, dynamic scales)."""
    model = _identity_blocks(tmp_path, seed)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)
    layers = runtime.load(art).layers
    assert layers["3.conv1"]["tensors"]["in"] == "2_1"  # block 1's y, written with its codes
    check = [np.random.default_rng(seed).random((4, 64, 8, 8), dtype=np.float32)]
    report = verify(model, inputs=check, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]


def _block_then_conv(tmp_path, seed: int, float_stem: bool = True):
    """A residual block without relu whose sum only the next conv's quantizer reads: the fused
    epilogue writes that quantizer's codes and no float tensor (MobileNetV2's last block of a
    stage); a float stem's noise reaches the sum through the shortcut."""
    torch.manual_seed(seed)
    float_model = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1), nn.ReLU(), Block(16, downsample=False, relu=False),
                                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=4, act_bits=4, quantize_first_input=not float_stem))
    return csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(2, 64, 8, 8)))


@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_codes_of_a_fused_residual_without_float_output_verify_exactly(tmp_path, seed):
    """No float sum to requantize: verify computes it as the interpreter does from the runtime's
    own tensors (the layer's output from its codes, the float residual it recorded) and checks
    the codes and the dynamic scale exactly, where the golden run's scale may differ by an ulp."""
    model = _block_then_conv(tmp_path, seed)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)
    tensors = runtime.load(art).layers["3"]["tensors"]
    assert tensors["in"] is None and tensors["xq"] == "3.input_quant.quant.codes"  # the sum stays in registers
    check = [np.random.default_rng(seed).random((4, 64, 8, 8), dtype=np.float32)]
    report = verify(model, inputs=check, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]


def _one_code_off(monkeypatch, tensor: str):
    """Make verify's TVM runtime report ``tensor``'s first code one step off."""
    verify_module = importlib.import_module("csqc.verify")
    artifact_runtime = verify_module.tvm_artifact_runtime

    def one_code_off(name, model, *args, **kwargs):
        rt = artifact_runtime(name, model, *args, **kwargs)
        run = rt.run

        def run_one_code_off(inputs):
            result = run(inputs)
            codes = result.tensors[tensor].astype(np.int64)
            codes.flat[0] += 1 if codes.flat[0] <= 0 else -1
            result.tensors[tensor] = codes
            return result

        rt.run = run_one_code_off
        return rt

    monkeypatch.setattr(verify_module, "tvm_artifact_runtime", one_code_off)


def test_a_code_one_step_off_after_a_fused_residual_is_caught(tmp_path, monkeypatch):
    """The exact check of those codes is not the one-step tolerance of codes verify cannot
    recompute: one code moved by one step fails (an integer stem: no float noise upstream)."""
    model = _block_then_conv(tmp_path, 0, float_stem=False)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)
    check = [np.random.default_rng(0).random((2, 64, 8, 8), dtype=np.float32)]
    assert verify(model, inputs=check, artifact=str(art), per_layer=True).ok
    _one_code_off(monkeypatch, "3.xq")
    report = verify(model, inputs=check, artifact=str(art), per_layer=True)
    assert not report.ok
    assert report.to_json()["first_divergence"]["tensor"] == "3.xq"


@pytest.fixture(scope="module")
def reference_resnet18(tmp_path_factory):
    """The CSQ reference's ResNet-18 (mirror, tiny width): its residuals are dequantized codes
    (identity shortcuts) and float 1x1 convs (downsample shortcuts)."""
    import csq_reference_style as R

    tmp = tmp_path_factory.mktemp("r18")
    net = R.ResNet18(act_bit=4, width=4, num_classes=10)
    R.randomize_trained(net, seed=4)
    torch.save({"model": net.state_dict()}, tmp / "ckpt.pth")
    model = csqc.load(tmp / "ckpt.pth", model_factory="csqc.models.reference:resnet18(act_bit=4, width=4, num_classes=10)",
                      input_shape=(2, 3, 32, 32))
    csqc.compile(model, "llvm", tmp / "m.so")
    return model, tmp / "m.so"


@pytest.mark.parametrize("layer", ["layer2.block1.conv1",   # reads relu(conv + dequantize(codes))
                                   "layer2.block2.conv1"])  # reads relu(conv + float downsample conv)
def test_fused_codes_after_a_quantized_or_float_residual_are_checked_exactly(reference_resnet18, monkeypatch, layer):
    """verify recomputes those codes from the runtime's own residual (its codes of the shortcut,
    or the float tensor the epilogue read), so a float shortcut's ulp noise that moves a dynamic
    scale passes (it did not on an Intel Xeon: the golden scale was required) and a code one
    step off fails (it passed: no exact recomputation, a step of slack)."""
    model, art = reference_resnet18
    assert runtime.load(art).layers["layer2.block1.conv2"]["tensors"]["residual"]
    assert verify(model, samples=2, artifact=str(art)).ok
    _one_code_off(monkeypatch, f"{layer}.xq")
    report = verify(model, samples=2, artifact=str(art))
    assert not report.ok and report.to_json()["first_divergence"]["tensor"] == f"{layer}.xq"


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand, depthwise, project (no activation), plus the input when the
    shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = 4 * cin
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.ReLU6(), nn.Conv2d(mid, mid, 3, stride, 1, groups=mid),
                                  nn.ReLU6(), nn.Conv2d(mid, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_projection_read_by_an_add_and_a_quantizer_writes_both_in_its_epilogue(tmp_path, calibrated):
    """A block without a residual feeds the next block twice: its float output to that block's
    add, its codes to that block's first conv. Its epilogue writes both (``keep_y``), so no
    quantize kernel reads the output back; exact with dynamic and with calibrated scales."""
    torch.manual_seed(4)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
                                InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=False))
    model = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(2, 3, 16, 16)))
    calib = [np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)] if calibrated else None
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, calibrate=calib)
    plan = runtime.load(art).plan
    projection = "2.body.4"  # the first block's projection: read by block 3's add and its first conv
    quantized = [s["layer"] for s in plan["steps"] if runtime._kernel_kind(s["func"]) == "quantize"]
    assert not any(layer.startswith("3.") for layer in quantized), quantized
    step = next(s for s in plan["steps"] if s.get("layer") == projection and "epilogue" in s["func"])
    assert plan["layers"][projection]["tensors"]["out"] == projection  # y is written for the add
    if not calibrated:  # the dynamic scale is checked after each run, like a quantize step's
        assert step["levels"] == 15 and plan["buffers"][step["args"][step["scale_arg"]]]["shape"] == [1]
    check = [np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)]
    report = verify(model, inputs=check, artifact=str(art), per_layer=True, calibrate=calib)
    assert report.ok and report.accumulators_exact, report.to_json()


class _PositionsPlusProjection(nn.Module):
    """A learned position table plus a linear's output: the fused residual is a constant."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 16))
        self.l0, self.l1 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.pos + self.l1(torch.relu(self.l0(x)))


def test_a_constant_residual_verifies_per_layer(tmp_path):
    """The residual a fused epilogue reads is a weight here, which the runtime does not record:
    verify checks the layer against the constant itself (a KeyError before; Speech2Text's decoder)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16)
    model = csqc.finalize(csqc.convert(_PositionsPlusProjection().eval(), n_bits=3, act_bits=4, example_inputs=x))
    path = csqc.save(model, tmp_path / "m.pt", x)
    csqc.compile(path, "llvm", tmp_path / "m.so")
    report = verify(path, artifact=str(tmp_path / "m.so"), samples=2, batch=1, per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
