"""The csqc command line: help, version, JSON output, exit codes for bad input."""
import functools
import json
import subprocess
import sys

import pytest
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
