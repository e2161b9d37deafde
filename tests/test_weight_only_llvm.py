"""Weight-only models (float activations, low-bit weights) on the llvm target: the cost model
picks the table-lookup kernel (one row, few planes) or the dequantizing one (more rows or planes;
on AVX2 the only one, 8 lanes wide) for large linear layers, and csqc verify passes as for fp32."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from cpus import AVX2_CPU, needs_avx512
from csqc.ir import Node, QuantSpec, TensorType
from csqc.targets.llvm.backend import choose_kernel
from csqc.targets.llvm.isa import AVX2, GENERIC
from csqc.verify import verify


def _weight_only_mlp(tmp_path, batch):
    torch.manual_seed(0)
    # 512 x 512 = 2^18 weights: the smallest layer the cost model gives the lookup kernel
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model = csqc.finalize(csqc.convert(net.eval(), n_bits=2)).eval()  # act_bits None: weight-only
    csqc.save(model, tmp_path / "wo.pt", torch.rand(batch, 512))
    return csqc.load(tmp_path / "wo.pt")


@pytest.mark.parametrize("batch, kernel, reason", [(1, "lut", "table lookups"), (8, "dequant", "dequantized")])
@needs_avx512
def test_weight_only_mlp_picks_its_kernel_and_verifies(tmp_path, batch, kernel, reason):
    model = _weight_only_mlp(tmp_path, batch)
    out = tmp_path / "wo.so"
    result = csqc.compile(model, "llvm", out)
    layers = result.report["layers"]
    kernels = sorted(info["kernel"] for info in layers.values())
    assert kernels == sorted(["float", kernel]), layers  # the 512x512 layer, and the 10x512 head in fp32
    chosen = next(info for info in layers.values() if info["kernel"] == kernel)
    assert reason in chosen["reason"]
    report = verify(model, samples=2 * batch, artifact=str(out), per_layer=True)
    assert report.ok, json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    stats = [s for s in report.layers if s["runtime"] == f"artifact:{out.name}"]
    assert stats and all(sum(s["mismatched"].values()) == 0 for s in stats)


def _float_input_layer(out_features, in_features, planes):
    """A float-input CSQ linear layer with ``planes`` offset planes (the IR after split_planes)."""
    spec = QuantSpec(n_bits=planes - 1, active_bits=tuple(reversed(range(planes - 1))), encoding="offset",
                     planes=tuple((shift, 1) for shift in reversed(range(planes))), zero_point=(1 << (planes - 1)) - 1)
    return Node("fc", "qlinear", ("x", "fc.weight", "fc.mult"), TensorType((1, out_features)),
                {"weight_shape": (out_features, in_features)}, quant=spec)


@pytest.mark.parametrize("rows, planes, kernel", [
    (1, 3, "lut"),  # one row, 3 planes: 3/4 lookups per 16 weights against one
    (1, 5, "dequant"), (8, 3, "dequant"), (64, 5, "dequant"),  # one lookup shared by up to 4 rows
    (128, 3, "float"),  # beyond the measured range: fp32
])
def test_choose_kernel_for_float_input_linear_layers(rows, planes, kernel):
    layer = _float_input_layer(4096, 4096, planes)
    choice = choose_kernel(layer, rows, np.zeros((4096, 4096), np.int64))
    assert choice.kernel == kernel and f"{rows} row(s) x {planes} planes" in choice.reason


def _signed_planes_layer(bits):
    """Positive and negative planes per bit (no unsigned code: the level table holds the signs)."""
    planes = tuple(plane for bit in reversed(range(bits)) for plane in ((bit, 1), (bit, -1)))
    spec = QuantSpec(n_bits=bits, active_bits=tuple(reversed(range(bits))), encoding="posneg", planes=planes)
    return Node("fc", "qlinear", ("x", "fc.weight", "fc.mult"), TensorType((1, 4096)),
                {"weight_shape": (4096, 4096)}, quant=spec)


@pytest.mark.parametrize("bits, rows, kernel", [
    (2, 8, "dequant"), (3, 32, "dequant"),  # 4 and 6 signed planes: 16 and 64 levels, one code
    (4, 8, "lut"), (4, 16, "float"),  # 8 planes: no code; lookups up to 80 row-planes
])
def test_choose_kernel_for_signed_planes(bits, rows, kernel):
    layer = _signed_planes_layer(bits)
    assert choose_kernel(layer, rows, np.zeros((4096, 4096), np.int64)).kernel == kernel


@pytest.mark.parametrize("rows, planes, kernel", [
    (1, 3, "dequant"), (1, 6, "dequant"), (8, 3, "dequant"), (64, 4, "dequant"),  # 8-lane permutes, 64 levels at most
    (1, 7, "float"), (128, 3, "float"),  # wider codes, more rows than measured
])
def test_choose_kernel_for_float_input_linear_layers_on_avx2(rows, planes, kernel):
    layer = _float_input_layer(4096, 4096, planes)
    choice = choose_kernel(layer, rows, np.zeros((4096, 4096), np.int64), tier=AVX2)
    assert choice.kernel == kernel and f"{rows} row(s) x {planes} planes" in choice.reason
    assert choose_kernel(layer, rows, np.zeros((4096, 4096), np.int64), tier=GENERIC).kernel == "float"
    small = choose_kernel(_float_input_layer(256, 784, planes), rows, np.zeros((256, 784), np.int64), tier=AVX2)
    assert small.kernel == "float" and "stay in cache" in small.reason


@pytest.mark.parametrize("batch", [1, 8])
def test_weight_only_mlp_built_for_avx2_dequantizes_and_verifies(tmp_path, batch):
    model = _weight_only_mlp(tmp_path, batch)
    out = tmp_path / "wo-avx2.so"
    layers = csqc.compile(model, "llvm", out, mcpu=AVX2_CPU).report["layers"]
    assert sorted(info["kernel"] for info in layers.values()) == ["dequant", "float"], layers
    assert "AVX2" in next(info for info in layers.values() if info["kernel"] == "dequant")["reason"]
    report = verify(model, samples=2 * batch, artifact=str(out), per_layer=True)
    assert report.ok, json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    stats = [s for s in report.layers if s["runtime"] == f"artifact:{out.name}"]
    assert stats and all(sum(s["mismatched"].values()) == 0 for s in stats)


def test_choose_kernel_keeps_small_float_input_layers_in_fp32():
    choice = choose_kernel(_float_input_layer(256, 784, 3), 1, np.zeros((256, 784), np.int64))
    assert choice.kernel == "float" and "stay in cache" in choice.reason
