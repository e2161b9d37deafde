"""The csqc command line: help, version, JSON output, exit codes for bad input."""
import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from csqc.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_commands():
    out = run("--help")
    assert out.exit_code == 0
    for cmd in ("train", "inspect", "compile", "verify", "run", "bench", "demo"):
        assert cmd in out.output


def test_version():
    out = run("--version")
    assert out.exit_code == 0 and "csqc, version" in out.output


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "csqc", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "csqc" in proc.stdout


def test_train_json(tmp_path):
    out = run("train", "digits-mlp", "-o", str(tmp_path / "m.pt"), "--epochs", "5", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert {"test_accuracy", "avg_bits", "layers"} <= set(data)
    assert all({"name", "active_bits"} <= set(l) for l in data["layers"])
    assert (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("args", [
    ("train", "nope", "-o", "x.pt"),
    ("train", "digits-mlp"),
    ("train", "digits-mlp", "-o", "/no/such/folder/m.pt"),
    ("train", "digits-mlp", "-o", "m.pt", "--epochs", "0"),
    ("train", "digits-mlp", "-o", "m.pt", "--target-bits", "-1"),
])
def test_bad_input_exits_2_with_one_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, list(args))
    assert out.exit_code == 2
    assert "Traceback" not in out.output
    assert not (tmp_path / "m.pt").exists()


def test_every_command_takes_json():
    for cmd in ("train", "inspect", "compile", "verify", "run", "bench", "demo"):
        out = run(cmd, "--help")
        assert out.exit_code == 0 and "--json" in out.output, cmd


@pytest.mark.parametrize("args", [
    ("compile", "{model}", "--target", "tpu"),
    ("compile", "{model}", "--target", "cuda", "--arch", "sm_10"),
    ("compile", "{model}", "--target", "onnx", "--onnx-form", "deploy", "--dataset", "digits", "--calibration", "c.npz"),
    ("compile", "missing.pt"),
    ("verify", "{model}", "--samples", "0"),
    ("verify", "{model}", "--artifact", "missing.so"),
    ("verify", "{model}", "--inputs", "x.npz", "--dataset", "digits"),
    ("run", "missing.so", "--input", "x.npy"),
    ("inspect", "{model}", "--batch", "0"),
    ("bench", "{model}", "--rounds", "0"),
    ("bench", "{model}", "--threads", "0"),
])
def test_model_commands_bad_input_exit_2(args, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, _, path = trained("digits-mlp")
    out = CliRunner().invoke(cli, [a.format(model=path) for a in args])
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and "error:" in out.output
    assert not any(p.suffix in (".so", ".onnx") for p in tmp_path.iterdir())


def test_cuda_compile_from_the_command_line(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    out = run("compile", str(path), "--target", "cuda", "--arch", "sm_90", "-o", str(tmp_path / "m-cuda.so"),
              "--emit-source", str(tmp_path / "src"), "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["target"] == "cuda" and data["arch"] == "sm_90" and (tmp_path / "m-cuda.so").is_file()
    assert "__popc" in (tmp_path / "src" / "kernels.cu").read_text()
    assert any("sm_90" in "".join(entry) for entry in data["device_code"]["entries"])


def test_bench_on_cuda_without_a_gpu_says_where_to_run_it(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    out = run("bench", str(path), "--device", "cuda", "--json")
    assert out.exit_code == 2, out.output  # cannot run here: bad input, like every wrong-machine artifact
    data = json.loads(out.stdout)
    assert not data["ok"] and "no CUDA GPU" in data["error"] and "--target cuda" in data["error"]
    # a CUDA artifact is refused by the CPU bench with the same advice, not run on the wrong device
    art = tmp_path / "m-cuda.so"
    assert run("compile", str(path), "--target", "cuda", "-o", str(art)).exit_code == 0
    out = run("bench", str(path), "--artifact", str(art))
    assert out.exit_code == 2 and "CUDA" in out.output and "Traceback" not in out.output
    out = run("verify", str(path), "--artifact", str(art))  # the same rule in verify: exit 2, not "disagree"
    assert out.exit_code == 2 and "no CUDA device" in out.output and "Traceback" not in out.output


def test_bench_cpu_artifact_with_device_cuda_is_bad_input(trained, tmp_path, monkeypatch):
    """On a GPU machine an llvm artifact given with --device cuda is refused before timing."""
    import csqc.bench

    _, _, _, path = trained("digits-mlp")
    art = tmp_path / "m.so"
    assert run("compile", str(path), "-o", str(art)).exit_code == 0
    monkeypatch.setattr(csqc.bench, "_gpu_arch", lambda: "sm_90")  # pretend a GPU is present
    out = run("bench", str(path), "--artifact", str(art), "--device", "cuda", "--json")
    assert out.exit_code == 2, out.output
    assert "is a llvm artifact: bench it with --device cpu" in json.loads(out.stdout)["error"]


@pytest.fixture
def collapsing_mlp(monkeypatch):
    """A short digits-mlp recipe that may prune whole layers, trained to 0.5 bits: ``enforce``
    must then prune fc1 (8192 of 9472 weights) entirely, a real collapse on every CPU."""
    from dataclasses import replace

    from csqc import train

    short = replace(train.RECIPES["digits-mlp"], float_epochs=3, csq_epochs=2, allow_layer_pruning=True)
    monkeypatch.setitem(train.RECIPES, "digits-mlp", short)
    # `csqc train` takes --target-bits; `csqc demo` always asks for the default budget
    monkeypatch.setattr(train, "train_recipe", functools.partial(train.train_recipe, target_bits=0.5))


def test_train_of_a_collapsed_model_fails_and_writes_nothing(collapsing_mlp, tmp_path):
    model = tmp_path / "m.pt"
    out = run("train", "digits-mlp", "-o", str(model), "--target-bits", "0.5", "--json")
    assert out.exit_code == 1, out.output
    data = json.loads(out.stdout)
    assert data["ok"] is False and data["error"].startswith("training collapsed: test accuracy")
    assert data["test_accuracy"] < data["float_accuracy"] - 0.10
    assert not data["layers"][0]["active_bits"]  # fc1 pruned away
    assert not model.exists()  # `csqc train ... && csqc compile` stops here
    out = run("train", "digits-mlp", "-o", str(model), "--target-bits", "0.5")
    assert out.exit_code == 1 and not model.exists()
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: training collapsed")


def test_demo_stops_at_a_collapsed_model(collapsing_mlp, tmp_path):
    out = run("demo", "--recipe", "digits-mlp", "--out", str(tmp_path / "demo"), "--json")
    assert out.exit_code == 1, out.output
    data = json.loads(out.stdout)
    assert data["ok"] is False and "training collapsed" in data["error"]
    assert data["train"]["problem"] == data["error"]
    assert list((tmp_path / "demo").iterdir()) == []  # no model, no artifact compiled


# -- rough edges: inputs and outputs by name, options that would do nothing ------------------------


def run_quiet(*args):
    """The CLI as a user meets it: errors handled by csqc, not raised into the test."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(out, code=2):
    assert out.exit_code == code, out.output
    assert "Traceback" not in out.output
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    return out.stderr


def test_run_feeds_npz_arrays_by_input_name(two_io_artifact, tiny_mlp_artifact, tmp_path):
    from csqc import runtime

    art = two_io_artifact
    rng = np.random.default_rng(0)
    x, h = rng.random((1, 16), dtype=np.float32), rng.random((1, 12), dtype=np.float32)
    np.savez(tmp_path / "xh.npz", input1=h, input0=x)  # by name, not by position
    out = run("run", str(art), "-i", str(tmp_path / "xh.npz"), "-o", str(tmp_path / "y.npz"))
    assert out.exit_code == 0, out.output
    want = runtime.load(art)(x, h)
    with np.load(tmp_path / "y.npz") as y:
        for name, expected in zip([o["name"] for o in runtime.load(art).outputs], want):
            np.testing.assert_array_equal(y[name], expected)
    # names that do not match: refused, naming the ones expected, not the first arrays taken
    np.savez(tmp_path / "bad.npz", extra=x, input0=x)
    assert "takes arrays named input0, input1" in _one_line_error(run_quiet("run", art, "-i", tmp_path / "bad.npz"))
    np.save(tmp_path / "x.npy", x)
    assert "one unnamed array" in _one_line_error(run_quiet("run", art, "-i", tmp_path / "x.npy"))
    # one input: the array named after it wins over an earlier one; one array of any name still works
    x2 = rng.random((2, 8), dtype=np.float32)
    np.savez(tmp_path / "one.npz", extra=np.zeros_like(x2), input0=x2)
    np.savez(tmp_path / "any.npz", samples=x2)
    expected = runtime.load(tiny_mlp_artifact)(x2)
    for name in ("one.npz", "any.npz"):
        assert run("run", str(tiny_mlp_artifact), "-i", str(tmp_path / name), "-o", str(tmp_path / "y.npy")).exit_code == 0
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_run_prints_and_writes_every_output_of_a_multi_output_artifact(two_io_artifact, tmp_path):
    from csqc import runtime

    art = two_io_artifact
    names = [o["name"] for o in runtime.load(art).outputs]
    np.savez(tmp_path / "xh.npz", input0=np.ones((1, 16), np.float32), input1=np.ones((1, 12), np.float32))
    out = run("run", str(art), "-i", str(tmp_path / "xh.npz"))
    assert out.exit_code == 0, out.output
    assert all(f"output {name} [1, 8]:" in out.stdout for name in names) and len(names) == 2
    data = json.loads(run("run", str(art), "-i", str(tmp_path / "xh.npz"), "--json").stdout)
    assert [o["name"] for o in data["outputs"]] == names
    # an .npy holds one array: refused before running, nothing written
    error = _one_line_error(run_quiet("run", art, "-i", tmp_path / "xh.npz", "-o", tmp_path / "y.npy"))
    assert f"2 outputs ({', '.join(names)})" in error and ".npz" in error
    assert not (tmp_path / "y.npy").exists()


class _NamedOutputs(torch.nn.Module):
    """Outputs named like np.savez's own arguments."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return {"allow_pickle": y, "file": torch.relu(y)}


def test_run_writes_outputs_of_any_name_to_npz(tmp_path):
    """np.savez(f, **outputs) wrote an empty .npz for an output named allow_pickle (exit 0) and
    crashed on one named file."""
    import csqc

    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_NamedOutputs(), n_bits=4, act_bits=4))
    path = csqc.save(model, tmp_path / "named.pt", torch.zeros(1, 8))
    art = csqc.compile(csqc.load(path), "llvm", tmp_path / "named.so").output
    x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = run("run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz"))
    assert out.exit_code == 0, out.output
    with np.load(tmp_path / "y.npz", allow_pickle=False) as y:
        written = {k: y[k] for k in y.files}
    names = [o["name"] for o in csqc.runtime.load(art).outputs]
    assert sorted(written) == sorted(names) and len(names) == 2
    for name, expected in zip(names, csqc.runtime.load(art)(x)):
        assert np.array_equal(written[name], expected)


def test_verify_converts_numeric_inputs_and_takes_torch_tensors(tiny_mlp, tmp_path):
    import csqc

    np.savez(tmp_path / "ints.npz", input0=np.arange(24, dtype=np.int64).reshape(3, 8) % 3)
    out = run("verify", str(tiny_mlp), "--inputs", str(tmp_path / "ints.npz"), "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["samples"] == 3
    model = csqc.load(tiny_mlp)
    assert csqc.verify(model, inputs=np.ones((3, 8), np.int32)).ok
    report = csqc.verify(model, inputs=torch.rand(3, 8))  # one tensor is one input, not 3 rows of inputs
    assert report.ok and report.samples == 3
    assert csqc.verify(model, inputs=torch.rand(4, 8), calibrate=torch.rand(16, 8)).ok
    with pytest.raises(csqc.BadInput, match="input input0: holds <U1 values"):
        csqc.verify(model, inputs=np.full((2, 8), "a"))


def test_internal_error_says_where_debug_goes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "csqc_cli_failing_factory.py").write_text("def make():\n    raise ZeroDivisionError('boom')\n")
    error = _one_line_error(run_quiet("train", "--data", "csqc_cli_failing_factory:make", "-o", "m.pt"), 1)
    assert "internal error: ZeroDivisionError: boom" in error and "`csqc --debug train ...`" in error


def test_one_sample_without_a_batch_axis_asks_for_one(tiny_mlp, tmp_path):
    np.savez(tmp_path / "x.npz", input0=np.ones(8, np.float32))
    error = _one_line_error(run_quiet("verify", tiny_mlp, "--inputs", tmp_path / "x.npz"))
    assert "has shape [8]; the model takes arrays of shape [N, 8] (a batch axis first" in error


def test_output_names_ending_in_a_slash_are_refused(tiny_mlp, tiny_mlp_artifact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.ones((2, 8), np.float32))
    for args in (("compile", tiny_mlp, "-t", "onnx", "-o", "x.onnx/"), ("compile", tiny_mlp, "-o", "build/"),
                 ("run", tiny_mlp_artifact, "-i", "x.npy", "-o", "y.npy/"), ("train", "digits-mlp", "-o", "m.pt/"),
                 ("train", "digits-mlp", "-o", "m.pt", "--checkpoint", "c/")):
        assert "ends with a slash" in _one_line_error(run_quiet(*args)), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_batch_is_refused_where_it_would_be_ignored(tiny_mlp, tiny_mlp_artifact):
    import csqc

    error = _one_line_error(run_quiet("bench", tiny_mlp, "--artifact", tiny_mlp_artifact, "--batch", "3"))
    assert "the artifact runs batches of 2; bench with batch 2" in error
    assert "batch must be at least 1, got 0" in _one_line_error(run_quiet("verify", tiny_mlp, "--batch", "0"))
    with pytest.raises(csqc.BadInput, match="batch must be at least 1, got 0"):
        csqc.verify(csqc.load(tiny_mlp), batch=0)


@pytest.mark.parametrize("args, message", [
    (("-t", "llvm", "--onnx-form", "deploy"), "--onnx-form is for --target onnx; it does nothing with --target llvm"),
    (("-t", "llvm", "--arch", "sm_90"), "--arch is for --target cuda"),
    (("-t", "llvm", "--dataset", "digits"), "--dataset is for --target onnx --onnx-form deploy"),
    (("-t", "llvm", "--calibration", "c.npz"), "--calibration is for --target onnx --onnx-form deploy"),
    (("-t", "llvm", "--check-planes"), "--check-planes is for --target onnx --onnx-form reference"),
    (("-t", "llvm", "--emit-source", "src"), "--emit-source is for --target cuda"),
    (("-t", "onnx", "--kernel", "bitserial"), "--kernel is for --target llvm, aarch64 or cuda"),
    (("-t", "onnx", "--mcpu", "znver4"), "--mcpu is for --target llvm or aarch64"),
    (("-t", "onnx", "--tune"), "it is for --target llvm, not onnx"),
    (("-t", "onnx", "--dataset", "digits"), "it does nothing with --target onnx --onnx-form reference"),
    (("--input-shape", "2,8"), "--input-shape is the input shape for --model-factory"),
])
def test_compile_refuses_options_that_would_do_nothing(tiny_mlp, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in _one_line_error(run_quiet("compile", tiny_mlp, *args))
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_checkpoint_options_that_would_misfire(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _one_line_error(run_quiet("train", "digits-mlp", "-o", "m.pt", "--checkpoint-every", "2"))
    assert "give --checkpoint FILE too" in error
    error = _one_line_error(run_quiet("train", "digits-mlp", "-o", "m.pt", "--checkpoint", "./m.pt"))
    assert "--checkpoint and -o are both m.pt" in error
    assert list(tmp_path.iterdir()) == []


def test_onnx_deploy_refuses_empty_calibration_and_names_random_calibration(tiny_mlp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("empty.npz", input0=np.zeros((0, 8), np.float32))
    deploy = ("compile", tiny_mlp, "-t", "onnx", "--onnx-form", "deploy")
    assert "holds 0 samples" in _one_line_error(run_quiet(*deploy, "--calibration", "empty.npz", "-o", "c.onnx"))
    assert not (tmp_path / "c.onnx").exists()
    out = run_quiet(*deploy, "-o", "r.onnx")
    assert out.exit_code == 0, out.output
    assert "note: calibrated on 256 random [0, 1) inputs, not real data" in out.stdout
