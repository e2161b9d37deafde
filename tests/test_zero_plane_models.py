"""Models with a zero-plane layer (mask keeps no bit) or all-equal integer weights compile for
every target, run, and verify exactly (issue 12). The models are built from fixed weights, so
the verdict does not depend on how training went on this machine."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import csqc
from csqc import runtime
from csqc.cli_onnx import compile_onnx
from csqc.errors import BadInput
from csqc.models.digits import digits_cnn, digits_mlp
from csqc.targets.aarch64 import emulation
from csqc.targets.aarch64.target import CROSS_COMPILER
from csqc.verify import verify

BATCH = 4


def _emulator_missing() -> bool:
    try:
        emulation.check_emulator()
    except BadInput:
        return True
    return False


def _build(path, factory, layer: str, case: str, shape):
    """A finalized digits model whose ``layer`` has no active bit (``mask0``) or q == 4 everywhere."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(factory().eval(), n_bits=4, act_bits=4)).eval()
    m = getattr(model, layer)
    if case == "mask0":
        m.active_mask = 0
        m.q.zero_()
    else:
        m.q.fill_(4)
    csqc.save(model, path, torch.zeros(shape))
    return csqc.load(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero-plane")
    # fc2 reads 4-bit codes, so its kernels run (fc1, the first layer, reads floats)
    return {case: _build(folder / f"mlp-{case}.pt", digits_mlp, "fc2", case, (BATCH, 64)) for case in ("mask0", "equal")}


def _assert_verifies_exactly(model, artifact):
    report = verify(model, artifact=str(artifact), samples=2 * BATCH, per_layer=True)
    summary = json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    assert report.ok and report.accumulators_exact and report.first_divergence is None, summary
    return report


@pytest.mark.parametrize("case", ["mask0", "equal"])
@pytest.mark.parametrize("kernel", [None, "bitserial", "bitparallel"])
def test_llvm_compiles_runs_and_verifies(models, tmp_path, case, kernel):
    model = models[case]
    out = tmp_path / f"{case}.so"
    result = csqc.compile(model, "llvm", out, force_kernel=kernel)
    art = runtime.load(out)
    x = np.random.default_rng(0).random((BATCH, 64), dtype=np.float32)
    expected = csqc.interpreter.run(result.graph, [x])[0]
    np.testing.assert_allclose(art(x), expected, rtol=1e-5, atol=1e-6)
    report = _assert_verifies_exactly(model, out)
    if case == "mask0":
        assert report.folded_layers == ["fc2"] and any(n.startswith("fc2: no nonzero weights") for n in report.notes)
        assert "fc2" not in art.layers  # nothing to run: the constant is in the graph
        rows = [s for s in report.layers if s["layer"] == "fc2"]
        assert rows and all(s["folded_to_constant"] and not s["checked"] for s in rows)
    else:
        assert report.folded_layers == [] and art.layers["fc2"]["planes"] >= 1
        if kernel:
            assert art.layers["fc2"]["kernel"] == kernel


@pytest.mark.parametrize("case", ["mask0", "equal"])
def test_onnx_reference_verifies_and_deploy_compiles(models, tmp_path, case):
    model = models[case]
    ref = tmp_path / f"{case}.onnx"
    compile_onnx(model, str(ref), echo=False)
    _assert_verifies_exactly(model, ref)
    summary = compile_onnx(model, str(tmp_path / f"{case}-deploy.onnx"), deploy=True, calibration="digits", echo=False)
    assert summary["accuracy"] == pytest.approx(summary["reference_accuracy"], abs=0.02)


@pytest.mark.parametrize("case", ["mask0", "equal"])
def test_aarch64_compiles_and_verifies_under_emulation(models, tmp_path, case):
    if shutil.which(CROSS_COMPILER) is None and os.environ.get("CSQC_REQUIRE_AARCH64") != "1":
        pytest.skip(f"no {CROSS_COMPILER} (.ci/setup-aarch64 installs it)")
    out = tmp_path / f"{case}-arm64.so"
    csqc.compile(models[case], "aarch64", out)
    assert out.read_bytes()[:4] == b"\x7fELF"
    # mask0 leaves no kernel (the folded layer's constant is the output): the artifact must
    # still load and run; equal runs the one-plane kernels
    if _emulator_missing() and os.environ.get("CSQC_REQUIRE_AARCH64") != "1":  # CI requires it
        pytest.skip("no qemu-user or aarch64 sysroot (.ci/setup-aarch64) to run the artifact")
    _assert_verifies_exactly(models[case], out)


@pytest.mark.parametrize("case", ["mask0", "equal"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_compiles(models, tmp_path, case, arch):
    out = tmp_path / f"{case}-{arch}.so"
    result = csqc.compile(models[case], "cuda", out, arch=arch)
    assert out.is_file() and result.report


def test_cnn_with_a_dead_conv_compiles_runs_and_verifies(tmp_path):
    """The issue's model: conv3 keeps no bit, so the network's output no longer depends on its input."""
    model = _build(tmp_path / "cnn.pt", digits_cnn, "conv3", "mask0", (BATCH, 1, 8, 8))
    out = tmp_path / "cnn.so"
    csqc.compile(model, "llvm", out, force_kernel="bitserial")
    _assert_verifies_exactly(model, out)
    report = csqc.inspect(model)
    rows = {r.name: (r.kernel, r.planes, r.active_bits) for r in report.layers}
    assert rows["conv3"] == ("constant", 0, [])
    assert rows["conv1"][0] == rows["conv2"][0] == "removed"
    summary = compile_onnx(model, str(tmp_path / "cnn-deploy.onnx"), deploy=True, calibration="digits", echo=False)
    assert summary["accuracy"] == summary["reference_accuracy"]
