"""The aarch64 target: cross-compiled NEON bit-serial artifacts, run under qemu-user emulation.

Compile tests need Debian's cross compiler (``apt-get install gcc-aarch64-linux-gnu
libc6-dev-arm64-cross``); emulation tests also need ``qemu-user`` and the sysroot built by
``python -m csqc.targets.aarch64.sysroot`` (CI installs all of it). The artifact's integer
accumulators must equal the interpreter's and ONNX Runtime's bit for bit.
"""
import json
import os
import re
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from csqc import runtime
from csqc.cli import cli
from csqc.errors import BadInput
from csqc.targets.aarch64 import emulation
from csqc.targets.aarch64.target import CROSS_COMPILER, DEFAULT_MCPU
from csqc.verify import _open_tvm_artifact, onnx_model_runtime, verify

DIGITS_BATCH = 50
ELF_MACHINE_AARCH64 = 183  # e_machine of an ARM64 ELF file

# CI sets this after installing the toolchain: there a missing piece fails the tests instead of skipping them
REQUIRED = os.environ.get("CSQC_REQUIRE_AARCH64") == "1"

needs_cross_compiler = pytest.mark.skipif(
    not REQUIRED and shutil.which(CROSS_COMPILER) is None,
    reason=f"no {CROSS_COMPILER}: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross")


def _emulator_missing() -> str | None:
    try:
        emulation.check_emulator()
    except BadInput as e:
        return str(e)
    return None


needs_emulator = pytest.mark.skipif(not REQUIRED and _emulator_missing() is not None, reason=_emulator_missing() or "")


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    """``compiled(name)`` -> (loaded model, aarch64 artifact path, CompileResult), built once."""
    cache = {}

    def build(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp("aarch64")
            if name == "resnet20":
                from csqc.models.vision import resnet20

                torch.manual_seed(0)
                net = csqc.finalize(csqc.convert(resnet20().eval(), n_bits=4, act_bits=4)).eval()
                csqc.save(net, folder / "r20.pt", torch.zeros(2, 3, 32, 32))
                model, batch = csqc.load(folder / "r20.pt"), None
            else:
                model, batch = csqc.load(trained(name)[3]), DIGITS_BATCH
            out = folder / f"{name}-arm64.so"
            result = csqc.compile(model, "aarch64", out, batch=batch)
            assert result.output == out and out.is_file()
            cache[name] = (model, out, result)
        return cache[name]

    return build


def _assert_exact_under_emulation(report, name):
    summary = json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    assert report.ok and report.accumulators_exact, summary
    for runtime_name in (f"artifact:{name}", "onnxruntime"):
        assert runtime_name in report.runtimes
        stats = [s for s in report.layers if s["runtime"] == runtime_name]
        assert any(s["checked"].get("acc", 0) > 0 for s in stats), f"{runtime_name} exposed no accumulators"
        assert all(sum(s["mismatched"].values()) == 0 for s in stats), summary


def _assert_accumulators_equal_onnxruntime(model, artifact, inputs):
    """The artifact's and ONNX Runtime's per-layer codes and accumulators, compared directly."""
    from csqc.targets.onnx.reference import emit_reference

    batch = len(inputs[0])
    ort = onnx_model_runtime("onnxruntime", emit_reference(csqc.optimize(model, "integer", batch=batch)), batch=batch)
    arm = _open_tvm_artifact(str(artifact))
    expected, got = ort.run(inputs).tensors, arm.run(inputs).tensors
    accumulators = {k for k in got if k.endswith(".acc")}
    assert accumulators and accumulators <= set(expected)
    compared = [k for k in got if k.endswith((".acc", ".xq")) and k in expected]
    for key in compared:
        np.testing.assert_array_equal(np.asarray(got[key], np.int64), np.asarray(expected[key], np.int64), err_msg=key)


# -- compile (cross compiler only) -------------------------------------------------------------


@needs_cross_compiler
def test_artifact_is_arm64_with_neon_popcount_and_no_x86_kernels(compiled):
    _, path, result = compiled("digits-cnn")
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == ELF_MACHINE_AARCH64
    with zipfile.ZipFile(path) as z:
        plan = json.loads(z.read("plan.json"))
    assert plan["target"]["kind"] == "aarch64" and plan["target"]["mcpu"] == DEFAULT_MCPU
    kernels = set(result.report["kernels"].values())
    assert "bitserial" in kernels and kernels <= {"bitserial", "float"}  # float: layers on float inputs
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"\bcnt\s+v\d+\.(16b|8b)", asm), "no NEON popcount (cnt) in the library"


@needs_cross_compiler
def test_mcpu_without_dotprod_still_gets_neon_popcount(trained, tmp_path):
    model = csqc.load(trained("digits-cnn")[3])
    out = tmp_path / "a72.so"
    result = csqc.compile(model, "aarch64", out, batch=4, mcpu="cortex-a72")
    assert result.report["mcpu"] == "cortex-a72"
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(out)], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"\bcnt\s+v\d+\.(16b|8b)", asm) and not re.search(r"\budot\b", asm)


def test_missing_cross_compiler_exits_2_naming_the_package(trained, monkeypatch, tmp_path):
    _, _, _, path = trained("digits-cnn")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no cross compiler on PATH
    res = CliRunner().invoke(cli, ["compile", str(path), "--target", "aarch64", "-o", str(tmp_path / "m.so")])
    assert res.exit_code == 2, res.output
    assert "gcc-aarch64-linux-gnu" in res.output and not (tmp_path / "m.so").exists()


@pytest.mark.parametrize("args, message", [(["--mcpu", "skylake"], "not an ARM64 CPU"),
                                           (["--kernel", "bitparallel"], "x86-only")])
def test_impossible_requests_exit_2(trained, tmp_path, args, message):
    _, _, _, path = trained("digits-cnn")
    res = CliRunner().invoke(cli, ["compile", str(path), "--target", "aarch64", "-o", str(tmp_path / "m.so"), *args])
    assert res.exit_code == 2 and message in res.output, res.output


@needs_cross_compiler
def test_native_runtime_refuses_an_arm64_artifact_clearly(compiled):
    _, path, _ = compiled("digits-cnn")
    with pytest.raises(BadInput, match="aarch64 artifact.*qemu-user emulation"):
        runtime.load(path)


@needs_cross_compiler
def test_verify_without_sysroot_names_the_setup_command(compiled, monkeypatch, tmp_path):
    model, path, _ = compiled("digits-cnn")
    monkeypatch.setenv(emulation.SYSROOT_ENV, str(tmp_path / "none"))
    with pytest.raises(BadInput, match="python -m csqc.targets.aarch64.sysroot"):
        verify(model, samples=DIGITS_BATCH, artifact=str(path))


# -- run under emulation -----------------------------------------------------------------------


@needs_cross_compiler
@needs_emulator
def test_digits_cnn_verifies_exactly_under_emulation(compiled):
    model, path, _ = compiled("digits-cnn")
    report = verify(model, dataset="digits", artifact=str(path), per_layer=True)
    _assert_exact_under_emulation(report, path.name)
    assert report.batch == DIGITS_BATCH and report.samples == 450
    assert report.accuracy[f"artifact:{path.name}"] == report.accuracy["onnxruntime"] > 0.9
    from csqc.data import load_digits_split

    x = load_digits_split(image=True).x_test[:DIGITS_BATCH].astype(np.float32)
    _assert_accumulators_equal_onnxruntime(model, path, [x])


@needs_cross_compiler
@needs_emulator
def test_resnet20_verifies_exactly_under_emulation(compiled):
    model, path, _ = compiled("resnet20")
    report = verify(model, samples=2, artifact=str(path), per_layer=True)
    _assert_exact_under_emulation(report, path.name)
    x = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
    _assert_accumulators_equal_onnxruntime(model, path, [x])


@needs_cross_compiler
@needs_emulator
def test_one_input_channel_convs_verify_exactly_under_emulation(tmp_path):
    from modelcheck import one_channel_convs

    model = csqc.load(one_channel_convs(tmp_path))
    out = tmp_path / "one-channel-arm64.so"
    result = csqc.compile(model, "aarch64", out)
    assert result.report["kernels"]["0"] == result.report["kernels"]["2"] == "bitserial"
    _assert_exact_under_emulation(verify(model, samples=2, artifact=str(out), per_layer=True), out.name)


@needs_cross_compiler
@needs_emulator
def test_cli_verify_runs_the_arm64_artifact(compiled, tmp_path):
    model, path, _ = compiled("resnet20")
    res = CliRunner().invoke(cli, ["verify", str(model.source), "--artifact", str(path), "--samples", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] and doc["accumulators_exact"] and f"artifact:{path.name}" in doc["runtimes"]


@needs_cross_compiler
@needs_emulator
def test_emulated_model_reports_runtime_errors(compiled):
    _, path, _ = compiled("resnet20")
    with emulation.load_emulated(path) as model:
        with pytest.raises(BadInput, match="under emulation"):
            model(np.zeros((3, 3, 32, 32), np.float32))  # wrong batch: the runtime's own check
        y = model(np.zeros((2, 3, 32, 32), np.float32))  # the process survives the error
    assert y.shape == (2, 10) and np.isfinite(y).all()
