"""Signed activations of linear and bit-parallel conv layers as offset codes (code + L) on the
llvm target.

A signed-input layer multiplies its codes once (instead of once per sign) and the epilogue
subtracts ``L * sum_k q[c, k]`` (a padded conv pads with L, the offset code of zero); the artifact must stay exact against the interpreter,
also with weight planes dropped at run time, and 8-bit activations (2L does not fit uint8)
keep the two sign parts.
"""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import interpreter, runtime
from csqc.errors import BadInput
from csqc.targets.aarch64 import emulation
from csqc.targets.aarch64.target import CROSS_COMPILER
from csqc.verify import verify

F32 = np.float32


def _linear_model(tmp_path, k, n, rows, n_bits, act_bits, seed=0):
    torch.manual_seed(seed)
    float_model = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 7)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=n_bits, act_bits=act_bits, quantize_first_input=True))
    return csqc.load(csqc.save(model, tmp_path / "m.pt", torch.randn(rows, k)))


def _signed_layers(m):
    """Layers whose codes come from a signed quantizer (the first linear here)."""
    return [name for name, info in m.layers.items() if "tensors" in info and
            (info["tensors"].get("xq_offset") or info["tensors"].get("xq_neg"))]


def _layer_calls(m, layer):
    return [s for s in m.plan["steps"] if s.get("layer") == layer]


@pytest.mark.parametrize("kernel", ["bitserial", "bitparallel"])
@pytest.mark.parametrize("act_bits", [2, 4, 7, 8])
def test_signed_linear_verifies_exactly_with_one_product(tmp_path, kernel, act_bits):
    model = _linear_model(tmp_path, k=37, n=21, rows=3, n_bits=4, act_bits=act_bits)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, force_kernel=kernel)
    m = runtime.load(art)
    (signed,) = _signed_layers(m)
    info = m.layers[signed]
    assert info["kernel"] == kernel
    kernel_calls = [s for s in _layer_calls(m, signed) if "epilogue" not in s["func"]]
    if act_bits <= 7:
        assert info["tensors"]["xq_offset"] == 2**act_bits - 1 and info["tensors"]["xq_neg"] is None
        assert len(kernel_calls) == 1, kernel_calls  # one product, not one per sign
    else:  # 2L = 510 does not fit uint8: positive and negative parts, two products (one call of the
        # small bit-parallel kernel, which loads each weight vector once for both)
        assert "xq_offset" not in info["tensors"] and info["tensors"]["xq_neg"]
        assert len(kernel_calls) == (1 if kernel == "bitparallel" else 2), kernel_calls
    report = verify(model, samples=6, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    rows = [r for r in report.layers if r["runtime"].startswith("artifact:") and r["layer"] == signed]
    assert rows and all(r["checked"]["acc"] > 0 and r["mismatched"]["acc"] == 0 and r["mismatched"]["xq"] == 0
                        for r in rows)



class _ChannelsLastMlp(nn.Module):
    """ConvNeXt's block shape: a conv, then linear layers over channels last (a 4-D input), the
    second reading signed (GELU) activations as offset codes."""

    def __init__(self):
        super().__init__()
        self.conv, self.up, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        return self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)


def test_offset_codes_of_a_linear_layer_over_channels_last_verify(tmp_path):
    """The accumulator offset lies on the last axis of a 4-D accumulator (not NCHW's 1)."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_ChannelsLastMlp().eval(), n_bits=4, act_bits=4, quantize_first_input=True))
    model = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.randn(1, 3, 6, 5)))
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, force_kernel="bitparallel")
    m = runtime.load(art)
    info = m.layers["down"]["tensors"]
    assert info["xq_offset"] == 15 and info["acc_axis"] == 3
    report = verify(model, samples=3, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    rows = [r for r in report.layers if r["runtime"].startswith("artifact:") and r["layer"] == "down"]
    assert rows and rows[0]["checked"]["acc"] == 3 * 6 * 5 * 8 and rows[0]["mismatched"]["acc"] == 0


def _artifact_acc(record, tensors):
    acc = record[tensors["acc"]].astype(np.int64)
    if tensors.get("acc_neg"):
        acc = acc - record[tensors["acc_neg"]]
    if tensors.get("acc_offset"):
        acc = acc - record[tensors["acc_offset"]].astype(np.int64)
    return acc << int(tensors.get("acc_shift", 0))


@pytest.mark.parametrize("kernel", ["bitserial", "bitparallel"])
def test_skip_planes_with_offset_codes_matches_interpreter(tmp_path, kernel):
    model = _linear_model(tmp_path, k=45, n=19, rows=4, n_bits=4, act_bits=4, seed=3)
    art = tmp_path / "m.so"
    result = csqc.compile(model, "llvm", art, force_kernel=kernel)
    m = runtime.load(art)
    (signed,) = _signed_layers(m)
    assert m.layers[signed]["tensors"].get("xq_offset") == 15
    x = np.random.default_rng(5).standard_normal(m.inputs[0]["shape"]).astype(F32)
    for skip in (0, 1, 2, 0):  # and back: the offsets follow the plane setting
        kept = {name: m._kept_planes(name, skip) for name in m.layers}
        if skip:
            assert kept[signed] < m.layers[signed]["planes"]
        record: dict = {}
        y = m(x, skip_planes=skip, record=record)
        golden: dict = {}
        (expected,) = interpreter.run(result.graph, [x], record=golden, planes_used=kept if skip else None)
        for name, info in m.layers.items():
            if "acc" in info.get("tensors", {}):
                assert np.array_equal(_artifact_acc(record, info["tensors"]), golden[f"{name}.acc"]), (skip, name)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_offset_codes_quantize_and_dequantize_glue():
    from csqc.ir import Node, TensorType
    from csqc.targets.llvm import glue, kernels

    shape = (3, 29)
    x = np.random.default_rng(1).standard_normal(shape).astype(F32)
    x[0, :4] = [0.0, -0.0, 1e-9, -1e-9]
    for bits in (1, 3, 7):
        levels = 2**bits - 1
        node = Node("q", "quantize", ("x",), TensorType(shape, "int32", bits, True),
                    {"bits": bits, "static_scale": 0.0, "signed": True})
        ref = interpreter.HANDLERS["quantize"](None, node, [x])
        q = kernels.build(glue.quantize(shape, bits, 0.0, True, True))
        scale = np.zeros(1, F32)
        codes = q(x, scale)  # the codes (last parameter) come back; the kernel computes S itself
        assert np.array_equal(codes.astype(np.int64) - levels, ref.codes)
        d = kernels.build(glue.dequantize(shape, bits, True, True))
        np.testing.assert_array_equal(d(codes, np.array([ref.scale], F32)), ref.dequantize())
    with pytest.raises(ValueError, match="7 bits"):
        glue.quantize(shape, 8, 0.0, True, True)


@pytest.mark.parametrize("act_bits", [4, 8])
def test_signed_depthwise_convs_pad_with_the_offset_code_of_zero(tmp_path, act_bits):
    """Padded depthwise convs (the fused kernel at stride 1 and 2, the direct one at stride 3)
    read offset codes up to 7 bits, their padding staged as L; 8-bit codes (2L past a byte) keep
    the two sign parts. Exact either way."""
    torch.manual_seed(2)
    float_model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.SiLU(),
                                nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), nn.Hardswish(),
                                nn.Conv2d(6, 6, 3, stride=3, padding=2, groups=6), nn.Flatten()).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=act_bits, quantize_first_input=True))
    model = csqc.load(csqc.save(model, tmp_path / "c.pt", torch.randn(2, 3, 13, 13)))
    art = tmp_path / "c.so"
    csqc.compile(model, "llvm", art)
    m = runtime.load(art)
    signed = _signed_layers(m)
    assert len(signed) == 3 and all(m.layers[name].get("pack") == "depthwise" for name in signed)
    for name in signed:
        tensors = m.layers[name]["tensors"]
        if act_bits < 8:
            assert tensors["xq_offset"] == 2**act_bits - 1 and tensors["xq_neg"] is None
        else:
            assert tensors["xq_neg"] and "xq_offset" not in tensors
    report = verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()


@pytest.mark.parametrize("padding", [0, 1])
def test_signed_bitparallel_convs_use_offset_codes(tmp_path, padding):
    """Every tap reads a code plus L: unpadded, or padded with L (the offset code of zero).
    Bit-parallel convs (1x1 as in MobileNetV2's expand convs, a strided grouped 3x3, a stride-3
    conv on the channels-on-lanes kernel) multiply offset codes once, exactly, also with weight
    planes dropped at run time."""
    torch.manual_seed(4)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, stride=2, groups=2, padding=padding),
                                nn.Conv2d(6, 6, 3, stride=3, padding=padding), nn.ReLU(), nn.Flatten()).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=True))
    model = csqc.load(csqc.save(model, tmp_path / "c.pt", torch.randn(2, 3, 11, 11)))
    art = tmp_path / "c.so"
    result = csqc.compile(model, "llvm", art)
    m = runtime.load(art)
    signed = _signed_layers(m)
    convs = [name for name in signed if m.layers[name].get("pack") == "conv"]
    assert len(convs) == 3, m.layers
    for name in convs:
        assert m.layers[name]["kernel"] == "bitparallel" and m.layers[name]["tensors"]["xq_offset"] == 15
        assert m.layers[name]["tensors"]["xq_neg"] is None
        assert len([s for s in _layer_calls(m, name) if "epilogue" not in s["func"]]) == 1
    report = verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    x = np.random.default_rng(6).standard_normal(m.inputs[0]["shape"]).astype(F32)
    for skip in (1, 0):
        kept = {name: m._kept_planes(name, skip) for name in m.layers}
        record, golden = {}, {}
        m(x, skip_planes=skip, record=record)
        interpreter.run(result.graph, [x], record=golden, planes_used=kept if skip else None)
        for name in convs:
            tensors = m.layers[name]["tensors"]
            acc = record[tensors["acc"]].astype(np.int64) - record[tensors["acc_offset"]].astype(np.int64)[:, None, None]
            assert np.array_equal(acc << int(tensors.get("acc_shift", 0)), golden[f"{name}.acc"]), (skip, name)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_point_codes_feed_bitparallel_convs_padded_with_a_static_zero_point(tmp_path, bits):
    """Asymmetric codes ``u`` go to a conv as they are (``acc - zp * sum_k q[c, k]``) where every
    tap reads a code: unpadded, or padded with a static zero point (calibrated). A dynamic zero
    point into a padded conv gives offset codes ``u - zp + L`` up to 7 bits (padded with L), the
    centered sign parts at 8. Exact every way."""
    torch.manual_seed(4)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, groups=2, padding=1),
                                nn.Tanh(), nn.Conv2d(6, 6, 3, stride=3, padding=1), nn.Conv2d(6, 6, 1),
                                nn.Hardswish(), nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.Flatten()).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=bits, act_symmetric=False,
                                       quantize_first_input=True))
    model = csqc.load(csqc.save(model, tmp_path / "z.pt", torch.randn(2, 3, 11, 11)))
    xs = np.random.default_rng(1).standard_normal((8, 3, 11, 11)).astype(F32)
    for calibrate in (None, xs):
        csqc.compile(model, "llvm", tmp_path / "z.so", calibrate=calibrate)
        m = runtime.load(tmp_path / "z.so")
        tensors = {name: info["tensors"] for name, info in m.layers.items() if "tensors" in info}
        by_zero_point = sorted(name for name, t in tensors.items() if t.get("xq_zero_point"))
        offset = sorted(name for name, t in tensors.items() if t.get("xq_offset") and not t.get("xq_zero_point"))
        centered = sorted(name for name, t in tensors.items() if t.get("xq_neg"))
        if calibrate is None:  # only the 1x1 conv is unpadded
            padded = ["0", "1", "3", "6"]
            assert by_zero_point == ["4"] and (offset, centered) == ((padded, []) if bits < 8 else ([], padded))
        else:
            assert by_zero_point == ["0", "1", "3", "4", "6"] and not centered and not offset
        report = verify(model, inputs=[xs], artifact=str(tmp_path / "z.so"), per_layer=True, calibrate=calibrate)
        assert report.ok and report.accumulators_exact, report.to_json()


def test_aarch64_signed_linear_uses_offset_codes_and_verifies(tmp_path):
    if os.environ.get("CSQC_REQUIRE_AARCH64") != "1":  # CI requires the toolchain (see test_aarch64_target)
        try:
            emulation.check_emulator()
        except BadInput as e:
            pytest.skip(str(e))
        if shutil.which(CROSS_COMPILER) is None:
            pytest.skip(f"no {CROSS_COMPILER}")
    model = _linear_model(tmp_path, k=33, n=18, rows=2, n_bits=2, act_bits=4, seed=4)
    art = tmp_path / "a.so"
    csqc.compile(model, "aarch64", art)
    report = verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    rows = [r for r in report.layers if r["runtime"].startswith("artifact:") and "acc" in r["checked"]]
    assert rows and all(r["mismatched"]["acc"] == 0 for r in rows)
    with zipfile.ZipFile(art) as z:
        layers = json.loads(z.read("plan.json"))["layers"]
    assert any(info.get("tensors", {}).get("xq_offset") == 15 for info in layers.values())
