"""A dynamic quantizer fused into its producer's epilogue on the llvm target.

Where an integer layer's float output is read only by a dynamic-scale quantize, the layer's
epilogue computes ``S = max|y|`` and the codes from its accumulators (two passes), so the float
tensor is never written nor read back. The artifact must stay exact against the interpreter
(codes and scales bit for bit), and the runtime must still watch those scales for overflow.
"""
import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import runtime
from csqc.verify import verify


def _model(tmp_path):
    torch.manual_seed(5)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),  # float input: keeps its float y
                                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # unsigned codes for the next conv
                                nn.Conv2d(8, 6, 1),  # signed y: offset codes for the 1x1 conv after it
                                nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 7 * 7, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=3, act_bits=4, quantize_first_input=False))
    return csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(2, 3, 7, 7)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fused")
    model = _model(tmp_path)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)
    return model, art


def test_dynamic_quantizers_fuse_into_integer_epilogues_and_verify_exactly(compiled):
    model, art = compiled
    m = runtime.load(art)
    fused = [s for s in m.plan["steps"] if "scale_arg" in s]
    # the first two integer convs; the last one's y goes through Flatten before the linear's quantizer
    assert len(fused) == 2, [s["func"] for s in m.plan["steps"]]
    assert all("epilogue" in s["func"] and s["levels"] == 15 for s in fused)
    quantize_inputs = {s["args"][0] for s in m.plan["steps"] if "quantize" in s["func"]}
    assert not quantize_inputs & {s["layer"] for s in fused}  # no float y of a fused layer is requantized
    readers = [info["tensors"] for info in m.layers.values() if info.get("tensors", {}).get("in", "") is None]
    assert len(readers) == 2 and any(t["xq_offset"] for t in readers if "xq_offset" in t)
    assert len(m._scales) == 4  # two quantize steps and the two fused scales are checked after each run
    report = verify(model, samples=6, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    rows = [r for r in report.layers if r["runtime"].startswith("artifact:") and r["checked"].get("xq")]
    assert len(rows) == 4 and all(r["mismatched"]["xq"] == 0 for r in rows), rows


def test_fused_dynamic_scale_overflow_is_refused(compiled):
    m = runtime.load(compiled[1])
    # large enough that the first fused scale (layer 2's y, quantized for layer 4) overflows
    x = np.full(m.inputs[0]["shape"], 1e36, np.float32)
    with pytest.raises(csqc.BadInput, match=r"overflows float32 .*\(4\.input_quant\.quant quantizes"):
        m(x)


def test_profile_steps_times_every_kernel_call(compiled):
    m = runtime.load(compiled[1])
    x = np.random.default_rng(0).random(m.inputs[0]["shape"], dtype=np.float32)
    steps = runtime.profile_steps(m, x, repeat=3)
    assert [s.index for s in steps] == list(range(len(m.plan["steps"])))
    assert [s.node for s in steps] == [s.get("layer", "") for s in m.plan["steps"]]
    assert {"conv2d_f32", "quantize", "bpconv", "epilogue"} <= {s.kind for s in steps}
    assert all(s.median_us > 0 for s in steps)
