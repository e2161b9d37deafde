"""fuse_requant: a quantized layer whose only reader is a static quantize writes the codes itself."""
import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import runtime
from csqc.passes import get_pass
from irbuild import Builder, assert_unchanged, random_q, run, snapshot

fuse_requant = get_pass("fuse_requant").run


def _chain(rng, *, signed: bool, static: float, act: str = "relu", extra_user: bool = False):
    """x -> quantize -> qlinear fc1 (act) -> quantize (static or not) -> qlinear fc2, as after fuse_act_quant."""
    b = Builder()
    x = b.input("x", (4, 16))
    xq = b.quantize(x, 4, signed=True)
    h = b.qlinear("fc1", xq, random_q(rng, (8, 16), 4, (3, 1, 0)), n_bits=4, active_bits=(3, 1, 0),
                  mult=np.full(8, 0.05, np.float32), add=rng.standard_normal(8).astype(np.float32), act=act)
    hq = b.quantize(h, 3, signed=signed, static=static)
    y = b.qlinear("fc2", hq, random_q(rng, (5, 8), 4, (2, 0)), n_bits=4, active_bits=(2, 0),
                  act_mode="static" if static else "dynamic", act_scale=static)
    outs = [y] + ([b.node("side", "relu", [h])] if extra_user else [])
    return b.build(*outs), [rng.standard_normal((4, 16)).astype(np.float32)]


@pytest.mark.parametrize("signed,act", [(False, "relu"), (True, "none")])
def test_layer_writes_the_same_codes_as_layer_then_quantize(signed, act):
    g, x = _chain(np.random.default_rng(0), signed=signed, static=0.75, act=act)  # small S': some codes clamp
    (before,), rec_before = run(g, x)
    out = fuse_requant(g)
    assert out.changed
    fused = out.graph
    assert [n.op for n in fused.nodes] == ["quantize", "qlinear", "qlinear"]
    fc1 = fused.node("fc1")
    assert (fc1.quant.out_bits, fc1.quant.out_scale, fc1.quant.out_signed) == (3, 0.75, signed)
    assert fc1.type.qbits == 3 and fc1.type.qsigned == signed and fused.node("fc2").inputs[0] == "fc1"
    assert f"out={'s' if signed else 'u'}3/static@0.75" in fc1.text()
    (after,), rec_after = run(fused, x)
    codes = rec_before["fc1.quant.codes"]
    assert np.abs(codes).max() == 7 and (codes < 0).any() == signed  # clamped codes are in the test
    assert np.array_equal(rec_after["fc1.codes"], codes)
    assert np.float32(rec_after["fc1.scale"]) == np.float32(0.75)
    assert np.array_equal(rec_after["fc2.acc"], rec_before["fc2.acc"])
    assert np.array_equal(after, before)  # bit for bit: the same codes and the same epilogue


def test_second_run_changes_nothing_and_the_input_graph_is_untouched():
    g, _ = _chain(np.random.default_rng(1), signed=False, static=2.0)
    snap = snapshot(g)
    once = fuse_requant(g).graph
    assert_unchanged(g, snap)
    again = fuse_requant(once)
    assert not again.changed and again.graph is once


@pytest.mark.parametrize("static,extra_user", [(0.0, False), (2.0, True)])
def test_dynamic_scales_and_shared_outputs_stay_unfused(static, extra_user):
    g, _ = _chain(np.random.default_rng(2), signed=False, static=static, extra_user=extra_user)
    assert not fuse_requant(g).changed


def test_fused_spec_round_trips_through_the_ir_file(tmp_path):
    from csqc.ir import load_graph, save_graph

    fused = fuse_requant(_chain(np.random.default_rng(3), signed=True, static=1.5, act="none")[0]).graph
    save_graph(fused, tmp_path / "g.csqc")
    assert load_graph(tmp_path / "g.csqc") == fused


@pytest.mark.parametrize("signed,act", [(False, "relu"), (True, "none")])
def test_onnx_reference_writes_the_fused_codes_exactly(signed, act):
    from csqc.targets.onnx.reference import emit_reference
    from csqc.targets.onnx.runner import run_with_intermediates

    g, x = _chain(np.random.default_rng(4), signed=signed, static=0.75, act=act)
    fused = fuse_requant(g).graph
    (expect,), rec = run(fused, x)
    (y,), inner = run_with_intermediates(emit_reference(fused), x, ["fc1.codes", "fc2.acc"])
    assert np.array_equal(inner["fc1.codes"], rec["fc1.codes"]) and np.array_equal(inner["fc2.acc"], rec["fc2.acc"])
    assert np.array_equal(y, expect)


@pytest.mark.parametrize("act_bits", [4, 8])  # 4: offset codes written by the epilogue; 8: two sign parts
def test_llvm_epilogue_writes_exact_codes_and_drops_the_quantize_kernel(tmp_path, act_bits):
    """Linear -> Linear (signed codes between them) -> ReLU -> Linear, calibrated: fused layers on llvm."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 9), nn.Linear(9, 10), nn.ReLU(), nn.Linear(10, 7)).eval()
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=act_bits, quantize_first_input=True))
    model = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.randn(3, 12)))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((12, 12)).astype(np.float32)
    result = csqc.compile(model, "llvm", tmp_path / "m.so", calibrate=calib)
    fused = [n for n in result.graph.quant_layers() if n.quant.out_bits is not None]
    assert len(fused) == 2 and {n.quant.out_signed for n in fused} == {True, False}
    assert not any(n.op == "quantize" and n.inputs[0] in {f.name for f in fused} for n in result.graph.nodes)
    m = runtime.load(result.output)
    for layer in fused:
        funcs = [s["func"] for s in m.plan["steps"] if s.get("layer") == layer.name]
        assert not any("quantize" in f for f in funcs) and layer.name not in m.plan["buffers"], funcs
    signed_reader = next(n for n in result.graph.quant_layers() if n.quant.act_signed and n.inputs[0] != "x.quant"
                         and not n.inputs[0].endswith(".quant"))
    tensors = m.layers[signed_reader.name]["tensors"]
    assert bool(tensors.get("xq_offset")) == (act_bits <= 7)
    check = (rng.standard_normal((6, 12)) * 2).astype(np.float32)  # beyond the calibration data: codes clamp
    report = csqc.verify(model, inputs=[check], artifact=str(result.output), calibrate=calib, batch=3)
    assert report.ok and report.accumulators_exact, report.to_json()


def test_cuda_lowers_a_fused_layer_as_float_epilogue_then_quantize_kernel():
    """The GPU glue has no code-writing epilogue: the plan keeps the quantize step, same buffers."""
    from csqc.targets.cuda.target import CudaBackend
    from csqc.targets.tvm.lower import lower_graph

    fused = fuse_requant(_chain(np.random.default_rng(5), signed=True, static=0.75, act="none")[0]).graph
    plan = lower_graph(fused, backend=CudaBackend())
    fc1 = [s for s in plan.steps if s.get("layer") == "fc1"]
    assert "quantize" in fc1[-1]["func"] and fc1[-1]["args"] == ["fc1.y", "fc1.scale", "fc1.codes", "fc1.codes_neg"]
    assert [s["args"][0] for s in plan.steps if s.get("layer") == "fc2"][:2] == ["fc1.codes", "fc1.codes_neg"]
