"""Numbers and verdicts (issue 13, sections 4-6): bounded verify, non-finite weights, inputs
that overflow float32, deploy-form ONNX verification, and one JSON document under --json."""
import json
import subprocess
import sys
import zipfile
from io import BytesIO

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from csqc import runtime
from csqc.cli import cli
from csqc.cli_onnx import compile_onnx
from csqc.passes import run_passes
from csqc.verify import MAX_RANDOM_SAMPLES, verify
from irbuild import Builder

DIGITS_BATCH = 50


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _json(out) -> dict:
    return json.loads(out.stdout)  # stdout alone must be exactly one JSON document


# -- verify --samples: bounded, with progress -------------------------------------------------------


def test_samples_are_bounded_with_a_hint(trained):
    _, _, _, path = trained("digits-mlp")
    import csqc.cli as cli_module

    assert cli_module.MAX_RANDOM_SAMPLES == MAX_RANDOM_SAMPLES
    for n in (0, -3, MAX_RANDOM_SAMPLES + 1, 100_000):
        out = invoke("verify", path, "--samples", n, "--json")
        assert out.exit_code == 2, out.output
        data = _json(out)
        assert not data["ok"] and "--samples must be 1..10,000" in data["error"]
        assert n < 1 or "--inputs" in data["error"]
    with pytest.raises(csqc.BadInput, match="--inputs"):
        verify(csqc.load(path), samples=MAX_RANDOM_SAMPLES + 1)


def test_verify_reports_progress_per_batch(trained):
    _, _, _, path = trained("digits-mlp")
    seen = []
    report = verify(csqc.load(path), samples=10, batch=4, on_batch=lambda done, total: seen.append((done, total)))
    assert report.ok and seen == [(4, 10), (8, 10), (10, 10)]


# -- NaN / Inf in weights: refused at capture, for every entry point --------------------------------


@pytest.mark.parametrize("recipe, tensor, value, named", [
    ("digits-mlp", "fc1.scale", float("inf"), "fc1.scale"),
    ("digits-mlp", "fc2.bias", float("nan"), "fc2.bias"),
    ("digits-cnn", "bn1.running_var", float("nan"), "bn1.running_var"),
    ("digits-cnn", "bn1.weight", 3e38, "bn1.mul"),  # finite, but folding it overflows float32
    ("digits-cnn", "bn1.running_var", -1.0, "bn1"),  # 1 / sqrt(var + eps) is NaN
])
def test_non_finite_weights_are_refused_in_memory(trained, tmp_path, recipe, tensor, value, named):
    _, _, _, path = trained(recipe)
    model = csqc.load(path)
    model.program.state_dict[tensor].view(-1)[0] = value  # the in-memory model, after load's checks
    for call in (lambda: csqc.compile(model, "onnx", tmp_path / "m.onnx"), lambda: csqc.inspect(model),
                 lambda: verify(model, samples=1)):
        with pytest.raises(csqc.BadInput, match=named) as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_ir_verifier_refuses_non_finite_parameters():
    b = Builder()
    x = b.input("x", (1, 4))
    y = b.qlinear("fc", b.quantize(x, bits=4), np.ones((2, 4), np.int16), n_bits=2, active_bits=(0,),
                  mult=[0.5, np.nan])
    with pytest.raises(csqc.ir.IRError, match="param %fc.mult contains NaN"):
        csqc.ir.verify(b.build(y))


# -- inputs that overflow float32 inside the model ---------------------------------------------------


def _one_weight_graph(mult: float = 1.0):
    """x[1, 4] -> quantize (4 bits, dynamic) -> qlinear with q = e_0: the output is the code of
    x[0] * S / 15, times ``mult``."""
    b = Builder()
    x = b.input("x", (1, 4))
    q = np.zeros((1, 4), np.int16)
    q[0, 0] = 1
    return b.build(b.qlinear("fc", b.quantize(x, bits=4, signed=False), q, n_bits=1, active_bits=(0,), mult=[mult]))


def test_overflow_bound_is_exact_in_the_interpreter_and_the_artifact(tmp_path):
    from csqc.interpreter import run as interpret
    from csqc.targets.llvm.target import emit_llvm

    with np.errstate(over="ignore"):  # the largest S with S * 15 finite in float32
        largest = np.float32(np.finfo(np.float32).max / 15)
        while not np.isfinite(largest * np.float32(15)):
            largest = np.nextafter(largest, np.float32(0))
        while np.isfinite(np.nextafter(largest, np.float32(np.inf)) * np.float32(15)):
            largest = np.nextafter(largest, np.float32(np.inf))
    too_big = np.nextafter(largest, np.float32(np.inf))
    g = run_passes(_one_weight_graph(), "default")[0]
    emit_llvm(g, tmp_path / "one.so")
    artifact = runtime.load(tmp_path / "one.so")
    ok = np.array([[largest, 0, 0, 0]], np.float32)
    (expected,) = interpret(g, [ok])
    assert np.isfinite(expected).all() and expected[0, 0] == largest
    np.testing.assert_array_equal(artifact(ok), expected)
    bad = np.array([[too_big, 0, 0, 0]], np.float32)
    for run in (lambda: interpret(g, [bad]), lambda: artifact(bad)):
        with pytest.raises(csqc.BadInput, match="overflows float32 inside the model"):
            run()


@pytest.mark.parametrize("activation, symmetric", [(torch.nn.ReLU, True), (torch.nn.ReLU6, True),
                                                    (torch.nn.Identity, True), (torch.nn.ReLU, False)])
def test_a_nan_from_an_overflowing_float_layer_is_refused_not_dropped(tmp_path, activation, symmetric):
    """Inputs near float32's limit make a float-input layer's sums inf - inf = NaN. relu / clip
    keep a NaN (LLVM's max of NaN and 0 is 0), and the dynamic scale's max-abs (or min / max)
    keeps it too, so the call is refused as in the interpreter, not answered with the next
    layer's bias."""
    from csqc.capture import capture
    from csqc.interpreter import run as interpret

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), activation(), torch.nn.Linear(32, 10))
    q = csqc.finalize(csqc.convert(model, n_bits=4, act_bits=4, act_symmetric=symmetric))
    x = torch.rand(1, 64)
    path = csqc.save(q, tmp_path / "m.pt", x)
    artifact = runtime.load(csqc.compile(csqc.load(path), "llvm", tmp_path / "m.so").output)
    g = capture(csqc.load(path))
    fine = x.numpy() * 1e3
    np.testing.assert_allclose(artifact(fine), interpret(g, [fine])[0], rtol=1e-5, atol=1e-5)
    huge = np.full((1, 64), 3e38, np.float32)
    record = {}
    with pytest.raises(csqc.BadInput):
        interpret(g, [huge], record=record)
    assert np.isnan(record["0.accf" if "0.accf" in record else "0"]).any()  # (integer weights: the sums overflow)
    for run in (lambda: interpret(g, [huge]), lambda: artifact(huge)):
        with pytest.raises(csqc.BadInput, match="overflows float32 inside the model"):
            run()


def test_an_output_its_input_scale_bounds_is_scanned_only_near_overflow(tmp_path, monkeypatch):
    """The compiler bounds a layer's float output by its input scale (``finite_below``: |y| <=
    15 * S * 1e30 / 15 here); the runtime skips the NaN/infinity scan of such an output while the
    run's scale keeps it far below overflow, and scans (and refuses) it otherwise."""
    from csqc.interpreter import run as interpret
    from csqc.targets.llvm.target import emit_llvm

    g = run_passes(_one_weight_graph(mult=1e30), "default")[0]
    emit_llvm(g, tmp_path / "one.so")
    artifact = runtime.load(tmp_path / "one.so")
    bound = artifact.outputs[0]["finite_below"]
    assert bound["per_scale"] >= 1e30 and bound["plus"] == 0
    scanned, scan, flat_scan = [], runtime._all_finite, runtime._flat_finite
    monkeypatch.setattr(runtime, "_all_finite", lambda y: scanned.append(y.size) or scan(y))
    monkeypatch.setattr(runtime, "_flat_finite", lambda y: scanned.append(y.size) or flat_scan(y))
    small = np.array([[2.0, 0, 0, 0]], np.float32)  # y = 2e30
    np.testing.assert_array_equal(artifact(small), interpret(g, [small])[0])
    assert scanned == [4]  # the input only
    large = np.array([[1e10, 0, 0, 0]], np.float32)  # y = 1e40: infinite in float32, S * L finite
    for run in (lambda: interpret(g, [large]), lambda: artifact(large)):
        with pytest.raises(csqc.BadInput, match="overflows float32 inside the model"):
            run()
    assert scanned[-1] == 1  # the output, scanned: its bound said nothing at this scale


@pytest.mark.parametrize("bound", [{"scale": ["x"], "per_scale": 1.0, "plus": 0.0}, {"scale": "fc", "per_scale": 1.0, "plus": 0.0},
                                   {"scale": None, "per_scale": float("inf"), "plus": 0.0}, "large"])
def test_a_malformed_output_bound_is_refused(tmp_path, bound):
    """An edited artifact whose output bound names no float32 scale buffer, or is not two finite
    numbers, is bad input when it loads (it would let the runtime skip the NaN scan)."""
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    from csqc.targets.llvm.target import emit_llvm

    emit_llvm(run_passes(_one_weight_graph(), "default")[0], tmp_path / "one.so")
    library, members = _split(tmp_path / "one.so")
    plan = json.loads(members[PLAN])
    if isinstance(bound, dict) and bound["scale"] is None:
        bound = {**bound, "scale": plan["outputs"][0]["finite_below"]["scale"]}
    plan["outputs"][0]["finite_below"] = bound
    (tmp_path / "edited.so").write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(csqc.BadInput, match="has a bound"):
        runtime.load(tmp_path / "edited.so")


@pytest.fixture(scope="module")
def llvm_artifacts(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llvm")
    out = {}
    for recipe in ("digits-mlp", "digits-cnn"):
        _, _, example, path = trained(recipe)
        csqc.compile(csqc.load(path), "llvm", folder / f"{recipe}.so")
        out[recipe] = (path, folder / f"{recipe}.so", tuple(example.shape))
    return out


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_input_of_3e38_is_refused_everywhere(llvm_artifacts, tmp_path, recipe):
    path, so, shape = llvm_artifacts[recipe]
    x = np.full(shape, 3e38, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", input0=x)
    out = invoke("run", so, "-i", tmp_path / "x.npy", "--json")
    assert out.exit_code == 2 and "overflows float32" in _json(out)["error"], out.output
    out = invoke("verify", path, "--inputs", tmp_path / "x.npz", "--artifact", so, "--json")
    assert out.exit_code == 2 and "overflows float32" in _json(out)["error"], out.output
    with pytest.raises(csqc.BadInput, match="overflows float32"):
        runtime.load(so)(x)
    assert runtime.load(so)(np.ones(shape, np.float32)).shape[0] == shape[0]  # ordinary inputs still run


# -- deploy-form ONNX: judged the way its form promises ----------------------------------------------


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_deploy_onnx_verifies_against_pytorch(trained, tmp_path, recipe):
    _, _, _, path = trained(recipe)
    model = csqc.load(path)
    compile_onnx(model, str(tmp_path / "m.deploy.onnx"), deploy=True, calibration="digits", echo=False)
    out = invoke("verify", path, "--artifact", tmp_path / "m.deploy.onnx", "--dataset", "digits",
                 "--batch", DIGITS_BATCH, "--json")
    assert out.exit_code == 0, out.output
    data = _json(out)
    pair = next(p for p in data["pairs"] if p["b"] == "artifact:m.deploy.onnx")
    assert pair["kind"] == "deploy" and pair["a"] == "pytorch" and pair["ok"] and pair["top1_agreement"] >= 0.95
    assert any("deploy-form ONNX model" in n and "not its bits" in n for n in data["notes"])
    assert data["accumulators_exact"]
    # random inputs say nothing about a model calibrated on digits: refused with a hint
    out = invoke("verify", path, "--artifact", tmp_path / "m.deploy.onnx", "--json")
    assert out.exit_code == 2 and "--dataset digits" in _json(out)["error"]


def test_wrong_deploy_onnx_fails(trained, tmp_path):
    """A deploy model of another (untrained) network with the same shapes must not pass."""
    from csqc.train import RECIPES

    _, _, example, path = trained("digits-mlp")
    torch.manual_seed(1)
    other = csqc.finalize(csqc.convert(RECIPES["digits-mlp"].build().eval(), n_bits=8, act_bits=4)).eval()
    csqc.save(other, tmp_path / "other.pt", example)
    compile_onnx(csqc.load(tmp_path / "other.pt"), str(tmp_path / "other.onnx"), deploy=True, calibration="digits",
                 echo=False)
    out = invoke("verify", path, "--artifact", tmp_path / "other.onnx", "--dataset", "digits",
                 "--batch", DIGITS_BATCH, "--json")
    assert out.exit_code == 2 and "compiled from another model" in _json(out)["error"]  # its recorded digest
    # without the digest (an older csqc, or edited away), the comparison itself must fail it
    import onnx

    from csqc.provenance import ONNX_KEY

    model = onnx.load(str(tmp_path / "other.onnx"))
    kept = [prop for prop in model.metadata_props if prop.key != ONNX_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "other.onnx"))
    out = invoke("verify", path, "--artifact", tmp_path / "other.onnx", "--dataset", "digits",
                 "--batch", DIGITS_BATCH, "--json")
    assert out.exit_code == 1, out.output
    pair = next(p for p in _json(out)["pairs"] if p["kind"] == "deploy")
    assert not pair["ok"] and pair["top1_agreement"] < 0.95


# -- one JSON document under --json, one-line errors --------------------------------------------------


def test_inspect_dump_ir_json_is_one_document(trained):
    _, _, _, path = trained("digits-mlp")
    out = invoke("inspect", path, "--dump-ir", "--json")
    assert out.exit_code == 0, out.output
    data = _json(out)
    assert data["ok"] and data["ir"].startswith("graph ") and "qlinear" in data["ir"]


@pytest.mark.parametrize("args", [
    ("verify", "{model}", "--bogus", "--json"),
    ("verify", "{model}", "--samples", "many", "--json"),
    ("run", "--json"),  # a missing argument
    ("nosuchcommand", "--json"),
    ("--bogus", "inspect", "--json"),
])
def test_usage_errors_under_json_print_json(trained, args):
    _, _, _, path = trained("digits-mlp")
    out = invoke(*[a.format(model=path) for a in args])
    assert out.exit_code == 2
    data = _json(out)
    assert data == {"ok": False, "error": data["error"], "exit_code": 2} and data["error"]
    assert "Error:" in out.stderr


def test_json_to_a_full_stdout_is_a_one_line_error(trained):
    _, _, _, path = trained("digits-mlp")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "csqc", "inspect", str(path), "--json"], stdout=full,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot write the JSON result" in proc.stderr
    assert "Traceback" not in proc.stderr


def _claiming_header(shape) -> bytes:
    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 256


def test_array_headers_claiming_terabytes_are_refused_before_allocation(llvm_artifacts, tmp_path):
    path, so, shape = llvm_artifacts["digits-mlp"]
    (tmp_path / "huge.npy").write_bytes(_claiming_header((10**6, 10**6)))
    out = invoke("run", so, "-i", tmp_path / "huge.npy", "--json")
    assert out.exit_code == 2
    error = _json(out)["error"]
    assert "[1000000, 1000000]" in error and f"expected shape {list(shape)}" in error and "--batch" in error
    # the right shape, but more data claimed than the file holds
    (tmp_path / "short.npy").write_bytes(_claiming_header(shape)[:-250])
    out = invoke("run", so, "-i", tmp_path / "short.npy", "--json")
    assert out.exit_code == 2 and "more than the file holds" in _json(out)["error"]
    for name, claim in (("wrong.npz", (10**12, 3)), ("bomb.npz", (10**10, 64))):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("input0.npy", _claiming_header(claim))
        out = invoke("verify", path, "--inputs", tmp_path / name, "--json")
        assert out.exit_code == 2, out.output
        assert str(list(claim)) in _json(out)["error"]


@pytest.mark.parametrize("levels", [1, 3, 7, 15, 127, 255])
def test_largest_safe_scale_is_the_exact_overflow_bound(levels):
    """The runtime's one-comparison check agrees with the interpreter's overflow test everywhere."""
    from csqc.interpreter import largest_safe_scale, quantization_overflows

    safe = np.float32(largest_safe_scale(levels))
    with np.errstate(over="ignore"):
        above = np.nextafter(safe, np.float32(np.inf))
    assert not quantization_overflows(safe, levels) and quantization_overflows(above, levels)
    for s in map(np.float32, (0.0, 1.0, 1e30, 3e38, np.nan, np.inf, safe, above)):
        assert quantization_overflows(s, levels) == (not float(s) <= largest_safe_scale(levels))
