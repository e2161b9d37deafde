"""Weight-only models (float activations, low-bit weights) on the llvm target: the cost model
picks the table-lookup kernel for large linear layers, and csqc verify passes as for fp32."""
import json

import pytest
import torch
from torch import nn

import csqc
from csqc.verify import verify


def _weight_only_mlp(tmp_path, batch):
    torch.manual_seed(0)
    # 512 x 512 = 2^18 weights: the smallest layer the cost model gives the lookup kernel
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model = csqc.finalize(csqc.convert(net.eval(), n_bits=2)).eval()  # act_bits None: weight-only
    csqc.save(model, tmp_path / "wo.pt", torch.rand(batch, 512))
    return csqc.load(tmp_path / "wo.pt")


@pytest.mark.parametrize("batch", [1, 8])
def test_weight_only_mlp_picks_lut_and_verifies(tmp_path, batch):
    model = _weight_only_mlp(tmp_path, batch)
    out = tmp_path / "wo.so"
    result = csqc.compile(model, "llvm", out)
    layers = result.report["layers"]
    kernels = sorted(info["kernel"] for info in layers.values())
    assert kernels == ["float", "lut"], layers  # the 512x512 layer looks up, the 10x512 head stays fp32
    lut = next(info for info in layers.values() if info["kernel"] == "lut")
    assert "table lookups" in lut["reason"]
    report = verify(model, samples=2 * batch, artifact=str(out), per_layer=True)
    assert report.ok, json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    stats = [s for s in report.layers if s["runtime"] == f"artifact:{out.name}"]
    assert stats and all(sum(s["mismatched"].values()) == 0 for s in stats)
