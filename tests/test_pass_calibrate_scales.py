"""calibrate_scales: dynamic quantizers get the max |x| the interpreter saw on calibration data."""
import numpy as np
import pytest

from csqc.errors import BadInput
from csqc.passes import run_passes
from csqc.passes.calibrate_scales import apply_scales, calibrate, measure_scales
from irbuild import Builder, assert_unchanged, random_q, run, snapshot


def _two_layers(rng):
    """x -> quantize -> dequantize -> qlinear(relu) -> quantize -> dequantize -> qlinear (as captured)."""
    b = Builder()
    x = b.input("x", (3, 16))
    d1 = b.dequantize(b.quantize(x, 4, signed=True))
    h = b.qlinear("fc1", d1, random_q(rng, (8, 16), 4, (3, 1, 0)), n_bits=4, active_bits=(3, 1, 0),
                  mult=np.full(8, 0.05, np.float32), add=rng.standard_normal(8).astype(np.float32), act="relu")
    d2 = b.dequantize(b.quantize(h, 4, signed=False))
    y = b.qlinear("fc2", d2, random_q(rng, (5, 8), 4, (2, 0)), n_bits=4, active_bits=(2, 0))
    return b.build(y)


@pytest.fixture
def graph_and_data():
    rng = np.random.default_rng(0)
    return _two_layers(rng), rng.standard_normal((7, 16)).astype(np.float32)  # 7: the last batch of 3 is filled up


def test_every_dynamic_quantizer_gets_the_largest_scale_seen(graph_and_data):
    g, data = graph_and_data
    result, report = calibrate(g, [data])
    assert result.changed
    seen = {"x.quant": 0.0, "fc1.quant": 0.0}
    for start in range(0, 7, 3):
        rows = np.arange(start, start + 3) % 7
        _, rec = run(g, [data[rows]])
        for name in seen:
            seen[name] = max(seen[name], float(rec[f"{name}.scale"]))
    assert seen["x.quant"] == float(np.abs(data).max())
    static = {n.name: n.attr("static_scale") for n in result.graph.nodes if n.op == "quantize"}
    assert static == seen and all(s > 0 for s in static.values())
    assert [(q.name, q.old_mode, q.scale) for q in report] == [(k, "dynamic", v) for k, v in seen.items()]
    # structure: only the quantizers' scales changed
    assert [n.op for n in result.graph.nodes] == [n.op for n in g.nodes]


def test_layers_read_the_static_scale_after_the_pipeline(graph_and_data):
    g, data = graph_and_data
    calibrated = calibrate(g, [data])[0].graph
    fused, _ = run_passes(calibrated, "integer")
    specs = [n.quant for n in fused.quant_layers()]
    assert [s.act_mode for s in specs] == ["static", "static"]
    assert specs[0].act_scale == calibrated.node("x.quant").attr("static_scale")


def test_codes_clamp_to_L_beyond_the_calibration_data(graph_and_data):
    g, data = graph_and_data
    calibrated = calibrate(g, [data])[0].graph
    scale = calibrated.node("x.quant").attr("static_scale")
    big = (data[:3] * 3).astype(np.float32)
    _, rec = run(calibrated, [big])
    codes = rec["x.quant.codes"]
    beyond = np.abs(big) > scale
    assert beyond.any() and np.array_equal(np.abs(codes[beyond]), np.full(beyond.sum(), 15))
    assert np.array_equal(codes[~beyond], (np.sign(big) * np.round(np.abs(big) * np.float32(15) / np.float32(scale)))[~beyond])
    assert np.float32(rec["x.quant.scale"]) == np.float32(scale)


def test_second_run_changes_nothing_and_input_is_untouched(graph_and_data):
    g, data = graph_and_data
    snap = snapshot(g)
    first = calibrate(g, [data])[0].graph
    assert_unchanged(g, snap)
    again = apply_scales(first, measure_scales(g, [data]))
    assert not again.changed and again.graph is first
    assert measure_scales(first, [data]) == {}  # no dynamic quantizer left


def test_a_quantizer_that_saw_only_zeros_stays_dynamic():
    b = Builder()
    x = b.input("x", (2, 4))
    y = b.qlinear("fc", b.dequantize(b.quantize(x, 4)), np.ones((3, 4), np.int16), n_bits=2, active_bits=(0,))
    result, report = calibrate(b.build(y), [np.zeros((2, 4), np.float32)])
    assert not result.changed and report[0].scale is None


def test_calibration_data_must_match_the_inputs(graph_and_data):
    g, data = graph_and_data
    with pytest.raises(BadInput, match="model takes 1 input"):
        calibrate(g, [data, data])
    with pytest.raises(BadInput, match="at least one"):
        calibrate(g, [data[:0]])


def test_calibrated_model_is_exact_across_interpreter_onnx_and_llvm(tiny_mlp, tmp_path):
    """The calibrated artifacts against the calibrated interpreter, on inputs beyond the calibration range."""
    import csqc

    model = csqc.load(tiny_mlp)
    rng = np.random.default_rng(3)
    calib = rng.random((16, 8), dtype=np.float32)
    check = (rng.random((8, 8), dtype=np.float32) * 1.5).astype(np.float32)  # some codes clamp
    art = csqc.compile(model, "llvm", tmp_path / "m.so", calibrate=calib)
    assert art.report["calibration"]["calibrated"] and art.report["calibration"]["samples"] == 16
    onnx = csqc.compile(model, "onnx", tmp_path / "m.onnx", calibrate=calib)
    for artifact in (art.output, onnx.output):
        report = csqc.verify(model, inputs=[check], artifact=str(artifact), calibrate=calib)
        assert report.ok and report.accumulators_exact, report.to_json()
        assert any("calibrated" in note for note in report.notes)
    # the artifacts record their scales: verify needs no calibration data to check them
    for artifact in (art.output, onnx.output):
        plain = csqc.verify(model, inputs=[check], artifact=str(artifact))
        assert plain.ok and plain.accumulators_exact and plain.calibration["scales"] == 1


def test_cli_compile_and_verify_calibrated_digits_cnn_exactly(trained, tmp_path):
    """``compile --calibrate digits`` then ``verify --calibrate digits``: every runtime exact."""
    import json

    from click.testing import CliRunner

    from csqc.cli import cli

    _, _, _, path = trained("digits-cnn")
    art = tmp_path / "cnn.so"
    out = CliRunner().invoke(cli, ["compile", str(path), "-o", str(art), "--calibrate", "digits", "--json"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    calibration = json.loads(out.output)["calibration"]
    assert calibration["source"] == "digits" and calibration["quantizers"]
    assert all(q["old_mode"] == "dynamic" and q["scale"] > 0 for q in calibration["quantizers"])
    from csqc.data import load_digits_split

    x_test = load_digits_split(image=True).x_test  # 2x larger than the data: codes clamp
    np.savez(tmp_path / "x.npz", x=np.concatenate([x_test[:8], 2 * x_test[8:16]]))
    out = CliRunner().invoke(cli, ["verify", str(path), "--artifact", str(art), "--inputs", str(tmp_path / "x.npz"),
                                   "--calibrate", "digits", "--json"], catch_exceptions=False)
    report = json.loads(out.output)
    assert out.exit_code == 0 and report["ok"] and report["accumulators_exact"], out.output
    out = CliRunner().invoke(cli, ["inspect", str(path), "--calibrate", "digits"], catch_exceptions=False)
    assert out.exit_code == 0 and "calibrated on digits" in out.output and "/static" in out.output


def test_asymmetric_quantizers_get_the_range_and_zero_point_of_the_calibration_data(tmp_path):
    """Range R = max(max x, 0) - min(min x, 0) over all batches and zp = round((-lo * L) / R); the
    calibrated model is exact across the interpreter, ONNX Runtime and llvm."""
    import torch
    from torch import nn

    import csqc
    from csqc.capture import capture
    from csqc.interpreter import asymmetric_zero_point

    torch.manual_seed(2)
    model = csqc.convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).eval(), n_bits=4, act_bits=8,
                         act_symmetric=False, quantize_first_input=True)
    loaded = csqc.load(csqc.save(csqc.finalize(model), tmp_path / "m.pt", torch.randn(2, 12)))
    rng = np.random.default_rng(4)
    calib = (rng.standard_normal((6, 12)) + 0.5).astype(np.float32)
    result, report = calibrate(capture(loaded), [calib])
    first = result.graph.nodes[0]
    lo, hi = np.float32(min(calib.min(), 0)), np.float32(max(calib.max(), 0))
    r = np.float32(hi - lo)
    assert first.op == "quantize" and first.attr("asymmetric")
    assert first.attr("static_scale") == float(r) and first.attr("zero_point") == asymmetric_zero_point(lo, r, 255) > 0
    assert all(q.scale and q.zero_point is not None for q in report)
    check = (calib[:4] * np.float32(1.2)).astype(np.float32)  # a few codes clamp at 0 and L
    for target, suffix in (("llvm", ".so"), ("onnx", ".onnx")):
        art = csqc.compile(loaded, target, tmp_path / f"m{suffix}", calibrate=calib)
        verdict = csqc.verify(loaded, inputs=[check], batch=2, artifact=str(art.output), calibrate=calib)
        assert verdict.ok and verdict.accumulators_exact, (target, verdict.to_json()["pairs"])


def test_an_asymmetric_quantizer_of_a_constant_is_measured_from_the_constant(tmp_path):
    """A GRU's first step quantizes its zero initial state, a constant of the graph that the
    interpreter's record does not hold: measured from the constant (all zeros: it stays
    dynamic), and the calibrated model compiles and verifies exactly (a random-model run found
    calibration failing with a KeyError)."""
    import torch
    from torch import nn

    import csqc
    from csqc.capture import capture

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = csqc.convert(Recurrent().eval(), n_bits=4, act_bits=8, act_symmetric=False)
    loaded = csqc.load(csqc.save(csqc.finalize(model), tmp_path / "m.pt", torch.randn(2, 3, 6)))
    g = capture(loaded)
    constant = [n for n in g.nodes if n.op == "quantize" and n.attr("asymmetric") and n.inputs[0] in g.params]
    assert constant and not np.any(g.params[constant[0].inputs[0]])
    calib = np.random.default_rng(1).standard_normal((4, 3, 6)).astype(np.float32)
    result, report = calibrate(g, [calib])
    by_name = {q.name: q for q in report}
    assert all(by_name[n.name].scale is None for n in constant)  # zeros: still dynamic
    assert sum(q.scale is not None for q in report) > 0
    art = csqc.compile(loaded, "llvm", tmp_path / "m.so", calibrate=calib)
    verdict = csqc.verify(loaded, samples=4, artifact=str(art.output), per_layer=True, calibrate=calib)
    assert verdict.ok and verdict.accumulators_exact, verdict.notes
