"""Issue 17, the rough edges of the first hour: output names, messages that point the right way,
outputs checked before the work, quiet library logs, options that are not silently ignored."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import csqc
from csqc import runtime
from csqc.cli import cli
from csqc.compiler import default_output
from csqc.errors import BadInput, CsqcError
from csqc.logs import quiet_ort_quantizer

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A tiny CSQ MLP saved as ``m.pt`` (batch 2) and its llvm artifact."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4))
    folder = tmp_path_factory.mktemp("mlp")
    path = csqc.save(model, folder / "m.pt", torch.zeros(2, 8))
    return path, csqc.compile(csqc.load(path), "llvm", folder / "m.llvm.so").output


# -- default output names say target and form ---------------------------------------------------

def test_default_names_say_target_and_form():
    names = {(t, form): default_output("dir/m.pt", t, arch="sm_90", onnx_form=form).name
             for t in ("llvm", "aarch64", "cuda") for form in ("reference",)}
    names |= {("onnx", form): default_output("m.pt", "onnx", onnx_form=form).name for form in ("reference", "deploy")}
    assert names == {("llvm", "reference"): "m.llvm.so", ("aarch64", "reference"): "m.arm64.so",
                     ("cuda", "reference"): "m.cuda-sm_90.so", ("onnx", "reference"): "m.onnx",
                     ("onnx", "deploy"): "m.deploy.onnx"}
    assert len(set(names.values())) == len(names)  # no target overwrites another
    with pytest.raises(BadInput, match="unknown target"):
        default_output("m.pt", "tpu")


def test_compile_writes_default_names_side_by_side_and_reports_them(mlp, tmp_path, monkeypatch):
    path, _ = mlp
    monkeypatch.chdir(tmp_path)
    out = _cli("compile", path)
    assert out.exit_code == 0, out.output
    assert "-> m.llvm.so" in out.output
    out = _cli("compile", path, "-t", "onnx", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["output"] == "m.onnx"
    np.savez(tmp_path / "calib.npz", np.random.default_rng(0).random((8, 8), dtype=np.float32))
    out = _cli("compile", path, "-t", "onnx", "--onnx-form", "deploy", "--calibration", tmp_path / "calib.npz")
    assert out.exit_code == 0, out.output
    assert "m.deploy.onnx" in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.deploy.onnx", "m.llvm.so", "m.onnx"]


def test_deploy_form_with_dynamic_batch_runs_any_batch(mlp, tmp_path):
    from csqc.targets.onnx.runner import load_onnx, make_session

    path, _ = mlp
    calibration = [np.random.default_rng(0).random((8, 8), dtype=np.float32)]
    result = csqc.compile(csqc.load(path), "onnx", tmp_path / "d.onnx", onnx_form="deploy", calibration=calibration,
                          batch="dynamic")
    model = load_onnx(result.output)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session = make_session(model, exact=False)
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).random((batch, 8), dtype=np.float32)
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (batch, 4)


# -- examples check their outputs before the work -------------------------------------------------

@pytest.mark.parametrize("example", ["char_lm", "convert_your_model"])
def test_examples_refuse_an_unusable_output_before_training(tmp_path, example):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if example == "char_lm":
        args, cwd = ["--quick", "--out", str(blocker / "out")], tmp_path
    else:  # writes my-mlp.pt into the current folder: make that name a folder
        (tmp_path / "my-mlp.pt").mkdir()
        args, cwd = [], tmp_path
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "accuracy" not in proc.stdout and "perplexity" not in proc.stdout  # nothing was trained


def test_char_lm_creates_its_output_folder_first(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import char_lm
    finally:
        sys.path.remove(str(ROOT / "examples"))
    model_file, artifact = char_lm._outputs(str(tmp_path / "new" / "folder"))
    assert (tmp_path / "new" / "folder").is_dir()
    assert Path(artifact).name == "char_lm_step.llvm.so" and Path(model_file).parent == Path(artifact).parent


# -- messages that point the right way --------------------------------------------------------------

def _resealed_with_plan(artifact: Path, edit) -> bytes:
    """The artifact with its plan edited and the digests recomputed: what a csqc bug would write."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split
    finally:
        sys.path.remove(str(ROOT / "tests"))
    library, members = _split(artifact)
    plan = json.loads(members[PLAN])
    edit(plan)
    return _resealed(library, json.dumps(plan).encode(), members[WEIGHTS])


def test_a_plan_the_kernels_refuse_is_reported_as_a_csqc_bug_with_the_whole_reason(mlp, tmp_path):
    _, artifact = mlp

    def wrong_output_buffer(plan):  # the bit-parallel kernel's int32 output gets the uint8 codes buffer
        step = next(s for s in plan["steps"] if s["func"].endswith("bpdense") or "dense" in s["func"])
        step["args"][-1] = step["args"][0]
        del plan["entry"]  # the kernels called one by one (the whole-model function's calls are compiled in)

    bad = tmp_path / "bug.llvm.so"
    bad.write_bytes(_resealed_with_plan(artifact, wrong_output_buffer))
    with pytest.raises(CsqcError) as info:
        runtime.load(bad)(np.zeros((2, 8), np.float32))
    message = str(info.value)
    assert type(info.value) is CsqcError  # exit code 1: not the user's input
    assert "csqc bug, please report it" in message and "damaged" in message and "compile the model again" not in message
    assert "when calling:" in message and not message.rstrip(")").endswith("when calling:")
    assert "expected" in message and "\n" not in message  # TVM's reason after "when calling:", on one line
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float32))
    out = _cli("run", bad, "--input", tmp_path / "x.npy")
    assert out.exit_code == 1 and "please report it" in out.output


def test_run_on_an_onnx_file_says_how_to_run_it(mlp, tmp_path):
    path, _ = mlp
    model = tmp_path / "m.onnx"
    assert _cli("compile", path, "-t", "onnx", "-o", model).exit_code == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float32))
    out = _cli("run", model, "--input", tmp_path / "x.npy")
    assert out.exit_code == 2
    assert "BadZipFile" not in out.output and "onnxruntime" in out.output and "csqc verify" in out.output
    assert "--target llvm" in out.output


def test_model_factory_finds_a_module_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "rough_edges_own_models", raising=False)
    (tmp_path / "rough_edges_own_models.py").write_text(
        "import pathlib, torch\n"
        "def Net():\n"
        "    pathlib.Path('factory-ran').touch()\n"
        "    return torch.nn.Linear(4, 2)\n")
    torch.save({"model": {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}}, tmp_path / "ckpt.pth")
    out = _cli("inspect", "ckpt.pth", "--model-factory", "rough_edges_own_models:Net", "--input-shape", "1,4")
    assert "cannot import" not in out.output, out.output
    assert (tmp_path / "factory-ran").exists()
    assert "current folder" in _cli("inspect", "--help").output


# -- terminal and JSON ------------------------------------------------------------------------------

def _tiny_matmul_onnx(path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("debug", [False, True])
def test_ort_quantizer_advice_is_silenced_unless_debugging(tmp_path, caplog, debug):
    from onnxruntime.quantization import quantize_dynamic

    _tiny_matmul_onnx(tmp_path / "f.onnx")
    caplog.set_level(logging.DEBUG if debug else logging.WARNING)
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "loud.onnx"))
    assert any("pre-processing" in r.getMessage() for r in caplog.records)  # ORT does say it
    caplog.clear()
    with quiet_ort_quantizer():
        quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "quiet.onnx"))
    assert any("pre-processing" in r.getMessage() for r in caplog.records) == debug
    assert (tmp_path / "quiet.onnx").is_file()


def test_debug_does_not_flood_with_matplotlib_font_lines(mlp, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = mlp
    proc = subprocess.run([sys.executable, "-m", "csqc", "--debug", "inspect", str(path), "--plot",
                           str(tmp_path / "bits.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "bits.png").is_file()
    noisy = [line for line in proc.stderr.splitlines() if " matplotlib" in line or " PIL" in line]
    assert noisy == [], noisy[:5]


def test_samples_with_dataset_or_inputs_is_refused(mlp, tmp_path):
    path, _ = mlp
    np.savez(tmp_path / "x.npz", np.zeros((2, 8), np.float32))
    for extra in (["--dataset", "digits"], ["--inputs", tmp_path / "x.npz"]):
        out = _cli("verify", path, "--samples", 8, *extra, "--json")
        assert out.exit_code == 2, out.output
        assert "--samples" in json.loads(out.stdout)["error"]


def test_per_layer_says_when_every_layer_is_exact(mlp):
    path, artifact = mlp
    out = _cli("verify", path, "--artifact", artifact, "--per-layer", "--samples", 4)
    assert out.exit_code == 0, out.output
    assert "all 2 layers exact" in out.output
