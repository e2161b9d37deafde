"""csqc verify: every runtime agrees on the same batches; a one-LSB weight error is caught and located."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import csqc
from csqc.capture import capture
from csqc.cli_onnx import compile_onnx, verify_command
from csqc.ir import save_graph, load_graph
from csqc.passes import run_passes
from csqc.targets.onnx import emit_reference, layer_table, save_onnx
from csqc.verify import ARTIFACT_RUNNERS, DEFAULT_RUNTIMES, Runtime, RunResult, interpreter_tensors, verify

DIGITS_BATCH = 50  # the 450 test digits in 9 identical batches for every runtime


def _converted(factory, path, shape, seed=0):
    torch.manual_seed(seed)
    model = csqc.finalize(csqc.convert(factory().eval(), n_bits=4, act_bits=4)).eval()
    csqc.save(model, path, torch.zeros(shape))
    return csqc.load(path)


def _assert_ok(report):
    data = report.to_json()
    assert data["ok"], json.dumps({k: v for k, v in data.items() if k != "layers"}, indent=1)
    assert {"ok", "runtimes", "max_abs_error", "top1_agreement", "accumulators_exact"} <= set(data)
    assert report.accumulators_exact and report.first_divergence is None
    assert set(DEFAULT_RUNTIMES) <= set(report.runtimes)
    exact_pairs = [p for p in report.pairs if p.kind == "exact"]
    assert exact_pairs
    for p in exact_pairs:
        # a float op upstream may round a value onto the other side of a tie (numpy and ONNX
        # Runtime sum floats in different orders); verify then says so and judges the pair coarsely
        resynced = any(note.startswith(f"{p.b}: activation codes first left the golden run") for note in report.notes)
        assert p.max_rel_error < 1e-5 or resynced, (p, report.notes)


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_verify_digits_dataset(trained, recipe):
    _, result, _, path = trained(recipe)
    report = verify(csqc.load(path), dataset="digits", batch=DIGITS_BATCH, per_layer=True)
    _assert_ok(report)
    assert report.samples == 450
    accuracy = report.accuracy
    assert set(accuracy) == set(report.runtimes)
    # dynamic activation scales depend on the batch, so this is close to, not equal to, training's figure
    assert abs(accuracy["pytorch"] - result.test_accuracy) < 0.02
    assert accuracy["onnxruntime"] == accuracy["interpreter:integer"] == accuracy["interpreter:default"]
    checked = [s for s in report.layers if s["runtime"] == "onnxruntime" and "acc" in s["checked"]]
    assert checked and all(s["mismatched"]["acc"] == 0 and s["checked"]["acc"] > 0 for s in checked)


def test_verify_resnet20_random_inputs_and_plane_check(tmp_path):
    from csqc.models.vision import resnet20

    model = _converted(resnet20, tmp_path / "r20.pt", (2, 3, 32, 32))
    report = verify(model, samples=2, runtimes=DEFAULT_RUNTIMES + ("onnxruntime:planes",))
    _assert_ok(report)
    assert report.batch == 2 and report.samples == 2 and "onnxruntime:planes" in report.runtimes


def test_verify_reference_checkpoint_import(tmp_path):
    spec = importlib.util.spec_from_file_location("_csqc_test_reference", Path(__file__).with_name("test_reference.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers._reference_checkpoint(tmp_path / "ckpt.pth")
    model = csqc.load(tmp_path / "ckpt.pth", model_factory="csqc.models.reference:resnet20_4bit",
                      input_shape=(2, 3, 32, 32))
    _assert_ok(verify(model, samples=2))


@pytest.fixture(scope="module")
def cnn_with_artifacts(trained, tmp_path_factory):
    """The digits CNN, its reference ONNX at batch 50, and a copy with one weight off by one LSB."""
    _, _, _, path = trained("digits-cnn")
    model = csqc.load(path)
    reference = emit_reference(run_passes(capture(model, batch=DIGITS_BATCH), "integer")[0])
    folder = tmp_path_factory.mktemp("artifacts")
    good, bad = folder / "good.onnx", folder / "bad.onnx"
    save_onnx(reference, good)
    broken = onnx.ModelProto()
    broken.CopyFrom(reference)
    # conv2's first weight term: int8 q, or the uint8 positive digits of q when |q| > 127
    (init,) = [t for t in broken.graph.initializer if t.name == "conv2.w0"]
    w = numpy_helper.to_array(init).copy()
    assert w.dtype in (np.int8, np.uint8)
    index = np.unravel_index(np.argmax(np.abs(w.astype(np.int64)) < 100), w.shape)  # room for +1
    w[index] += 1  # q of one weight moves by one LSB
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    save_onnx(broken, bad)
    return model, good, bad


def test_onnx_artifact_verifies(cnn_with_artifacts):
    model, good, _ = cnn_with_artifacts
    report = verify(model, dataset="digits", artifact=str(good), per_layer=True)
    _assert_ok(report)
    assert report.batch == DIGITS_BATCH  # taken from the artifact
    assert "artifact:good.onnx" in report.runtimes
    pair = next(p for p in report.pairs if p.b == "artifact:good.onnx")
    assert pair.a == "interpreter:default" and pair.max_abs_error == 0.0
    assert verify_command(model, dataset="digits", artifact=str(good), echo=False) == 0


def test_one_lsb_weight_error_fails_and_is_located(cnn_with_artifacts, capsys):
    model, _, bad = cnn_with_artifacts
    report = verify(model, dataset="digits", artifact=str(bad), per_layer=True)
    assert not report.ok and not report.accumulators_exact
    div = report.first_divergence
    assert div["layer"] == "conv2" and div["tensor"] == "conv2.acc" and div["runtime"] == "artifact:bad.onnx"
    assert div["kind"] == "exact" and div["mismatched"] > 0
    # the CLI-level function reports it and exits with 1
    assert verify_command(model, dataset="digits", artifact=str(bad), per_layer=True, as_json=True) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["first_divergence"]["layer"] == "conv2"


def test_inputs_from_npz(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    model = csqc.load(path)
    x = np.random.default_rng(1).random((6, 64), dtype=np.float32)
    np.savez(tmp_path / "by_name.npz", other=np.zeros(3), input0=x)
    np.savez(tmp_path / "first.npz", x)
    for name in ("by_name.npz", "first.npz"):
        assert verify_command(model, inputs=str(tmp_path / name), echo=False) == 0
    report = verify(model, inputs=[x], batch=4)  # 6 samples: a batch of 4 and one of 2
    _assert_ok(report)
    assert report.samples == 6


def test_bad_options_are_bad_input(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    model = csqc.load(path)
    np.savez(tmp_path / "wrong.npz", np.zeros((2, 3), np.float32))
    (tmp_path / "x.bin").write_bytes(b"??")
    cases = [
        dict(dataset="cifar"),
        dict(inputs=str(tmp_path / "wrong.npz")),
        dict(inputs=str(tmp_path / "missing.npz")),
        dict(artifact=str(tmp_path / "x.bin")),
        dict(artifact=str(tmp_path / "missing.onnx")),
        dict(samples=0),
        dict(batch=-1),
    ]
    for kw in cases:
        with pytest.raises(csqc.BadInput):
            verify_command(model, echo=False, **kw)


def test_artifact_runner_registry(trained, tmp_path, monkeypatch):
    """A target registers a runner for its artifact suffix; here: a saved IR run by the interpreter."""
    from csqc import interpreter

    def open_ir(path):
        graph = load_graph(path)

        def run(inputs):
            record = {}
            outputs = interpreter.run(graph, inputs, record=record)
            return RunResult(outputs, interpreter_tensors(graph, record, {graph.inputs[0].name: inputs[0]}))

        return Runtime(f"ir:{Path(path).name}", run, batch=graph.inputs[0].type.shape[0])

    monkeypatch.setitem(ARTIFACT_RUNNERS, ".csqcir", open_ir)
    _, _, _, path = trained("digits-cnn")
    model = csqc.load(path)
    save_graph(run_passes(capture(model, batch=8), "default")[0], tmp_path / "m.csqcir")
    report = verify(model, samples=16, artifact=str(tmp_path / "m.csqcir"))
    _assert_ok(report)
    assert "ir:m.csqcir" in report.runtimes and report.batch == 8


def test_compile_onnx_reference_and_deploy(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    model = csqc.load(path)
    ref = compile_onnx(model, str(tmp_path / "ref.onnx"), batch=DIGITS_BATCH, echo=False)
    assert ref["kind"] == "reference" and (tmp_path / "ref.onnx").exists()
    assert layer_table(onnx.load(str(tmp_path / "ref.onnx")))
    _assert_ok(verify(model, dataset="digits", artifact=str(tmp_path / "ref.onnx")))
    dep = compile_onnx(model, str(tmp_path / "dep.onnx"), deploy=True, calibration="digits", echo=False)
    assert dep["size_bytes"] < dep["fp32_size_bytes"] and abs(dep["accuracy_drop"]) <= 0.005


def test_top1_counts_a_row_tied_within_the_exact_tolerance_as_agreeing():
    """Random weights give logits all near 0: a 1e-10 rounding difference picks another class.
    Such a row agrees (its scores are equal at the tolerance exact runtimes must meet); a flip
    between scores that differ past it does not."""
    from csqc.verify import _compare_pairs

    tied = np.array([[1e-10, 1.2e-10, -3e-11], [0.5, 0.1, 0.2]])
    flipped = tied.copy()
    flipped[0, 0] += 4e-11  # top-1 0 instead of 1, both within 1e-4 of the other runtime's
    pair, = _compare_pairs(["pytorch", "interpreter:integer"], {"pytorch": [[tied]], "interpreter:integer": [[flipped]]},
                           1e-4, 1e-4, None)
    assert pair.top1_agreement == 1.0
    far = tied.copy()
    far[1] = [0.1, 0.5, 0.2]  # a real disagreement: the scores differ by 0.4
    pair, = _compare_pairs(["pytorch", "interpreter:integer"], {"pytorch": [[tied]], "interpreter:integer": [[far]]},
                           1e-4, 1e-4, None)
    assert pair.top1_agreement == 0.5


class _ScalesItsInputInPlace(torch.nn.Module):
    """``x /= 255`` style preprocessing: the model writes the array it was given."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc2(torch.relu(self.fc1(x)))


def test_every_runtime_gets_the_batch_as_it_was_given(tmp_path):
    """PyTorch (and the forced-code pass) run on the batch's own memory: a model that writes its
    input must not hand the runtimes after it another input than the golden run had."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_ScalesItsInputInPlace().eval(), n_bits=3, act_bits=4))
    path = csqc.save(model, tmp_path / "m.pt", torch.rand(1, 16))
    artifact = csqc.compile(csqc.load(path), "llvm", tmp_path / "m.so").output
    inputs = np.random.default_rng(0).random((6, 16), dtype=np.float32)
    given = inputs.copy()
    report = verify(csqc.load(path), inputs=[inputs], artifact=str(artifact), per_layer=True)
    assert report.ok and report.accumulators_exact and not report.notes
    same_order = next(p for p in report.pairs if p.b == "interpreter:default")  # the golden run's float order
    assert same_order.max_abs_error == 0
    np.testing.assert_array_equal(inputs, given)
