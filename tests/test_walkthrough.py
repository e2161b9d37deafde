"""Acceptance: the README flow as a new user runs it, through the installed command line.

In a fresh folder: a trained digits model (the session's, not trained again), inspect at 80
columns, compile to every target under its default name, verify, run, bench, the deploy
example. Each command runs as its own process (as from a shell), so stdout is exactly what a
user or a script would read: under ``--json`` one JSON document and nothing else.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from csqc import runtime
from csqc.targets.aarch64.target import CROSS_COMPILER

REPO = Path(__file__).resolve().parents[1]
# CI installs the cross compiler: there a missing one fails instead of skipping the aarch64 step
AARCH64 = os.environ.get("CSQC_REQUIRE_AARCH64") == "1" or shutil.which(CROSS_COMPILER) is not None

# default artifact names: target and form in the name, so no target overwrites another's file
DEFAULT_NAMES = {("llvm",): "m.llvm.so", ("onnx",): "m.onnx", ("onnx", "--onnx-form", "deploy"): "m.deploy.onnx",
                 ("cuda", "--arch", "sm_80"): "m.cuda-sm_80.so", ("aarch64",): "m.arm64.so"}


def csqc(folder: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "csqc", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


def one_json(proc: subprocess.CompletedProcess) -> dict:
    """stdout parses as exactly one JSON document (json.loads refuses trailing text)."""
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"stdout is not one JSON document ({e}):\n{proc.stdout[:2000]}\nstderr:\n{proc.stderr[-2000:]}")


def ok_json(folder: Path, *args: str) -> dict:
    proc = csqc(folder, *args, "--json")
    doc = one_json(proc)
    assert proc.returncode == 0 and doc["ok"] is True, (args, proc.stderr[-2000:])
    return doc


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    """A fresh folder holding m.pt, the model `csqc train digits-mlp -o m.pt` writes."""
    folder = tmp_path_factory.mktemp("walkthrough")
    shutil.copy(trained("digits-mlp")[3], folder / "m.pt")
    return folder


def test_the_readme_flow(folder, trained):
    layer_names = [l["name"] for l in trained("digits-mlp")[1].layers]

    # inspect: readable at 80 columns, every layer named in full; --json is one document
    text = csqc(folder, "inspect", "m.pt")
    assert text.returncode == 0, text.stderr
    assert max(map(len, text.stdout.splitlines())) <= 80, text.stdout
    table = [line for line in text.stdout.splitlines() if line.startswith("│")]
    assert [next(n for n in layer_names if f"│ {n} " in line) for line in table] == layer_names
    assert [l["name"] for l in ok_json(folder, "inspect", "m.pt")["layers"]] == layer_names

    # compile to every target with the default names: one file each, none overwritten
    targets = [t for t in DEFAULT_NAMES if t[0] != "aarch64" or AARCH64]
    for target in targets:
        extra = ("--dataset", "digits") if "deploy" in target else ()
        doc = ok_json(folder, "compile", "m.pt", "--target", *target, *extra)
        assert Path(doc["output"]).name == DEFAULT_NAMES[target], doc["output"]
    files = {name: (folder / name).read_bytes() for name in (DEFAULT_NAMES[t] for t in targets)}
    assert len(set(files.values())) == len(files), "two targets wrote the same file"

    # verify: every runtime against the llvm artifact, bit for bit
    doc = ok_json(folder, "verify", "m.pt", "--artifact", "m.llvm.so", "--samples", "4")
    assert doc["accumulators_exact"] is True and doc["batch"] >= 1

    # run: the artifact on an input of its compiled shape, output written
    shape = tuple(runtime.load(folder / "m.llvm.so").inputs[0]["shape"])
    np.save(folder / "x.npy", np.random.default_rng(0).random(shape, dtype=np.float32))
    doc = ok_json(folder, "run", "m.llvm.so", "-i", "x.npy", "-o", "y.npy")
    assert np.load(folder / "y.npy").shape == tuple(doc["shape"]) == (shape[0], 10)
    assert np.array_equal(np.load(folder / "y.npy"), runtime.load(folder / "m.llvm.so")(np.load(folder / "x.npy")))

    # bench: csqc against the baselines, smallest run
    doc = ok_json(folder, "bench", "m.pt", "--artifact", "m.llvm.so", "--rounds", "1")
    assert {r["runtime"] for r in doc["results"]} >= {"csqc", "pytorch-fp32"}

    # the deploy example needs neither torch nor the compiler, and says so
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "deploy.py"), "m.llvm.so", "x.npy"], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "blocked; loaded anyway: none" in proc.stdout and "TVM's compiler library: not loaded" in proc.stdout

    # bad input: exit 2, one JSON document saying why, no file left behind
    proc = csqc(folder, "compile", "m.pt", "--target", "nope", "-o", "never.so", "--json")
    assert proc.returncode == 2 and one_json(proc)["ok"] is False and not (folder / "never.so").exists()
    proc = csqc(folder, "run", "m.llvm.so", "-i", "m.pt", "--json")
    assert proc.returncode == 2 and one_json(proc)["exit_code"] == 2
