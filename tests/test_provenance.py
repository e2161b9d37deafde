"""An artifact records which model it was compiled from (``csqc.provenance``): ``verify`` and
``bench`` given another model's artifact refuse it (exit 2) instead of reporting runtimes that
disagree, and the digest survives what keeps the model the same (re-saving, batch size,
calibration)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import csqc
from csqc.bench import bench
from csqc.compiler import inspect_artifact
from csqc.errors import BadInput
from csqc.provenance import ONNX_KEY, artifact_digest, model_digest


def _mlp(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    return csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two saved MLPs of one architecture but other weights, and artifacts of the first."""
    folder = tmp_path_factory.mktemp("provenance")
    a = csqc.save(_mlp(0), folder / "a.pt", torch.zeros(2, 8))
    b = csqc.save(_mlp(1), folder / "b.pt", torch.zeros(2, 8))
    so = csqc.compile(csqc.load(a), "llvm", folder / "a.so").output
    ref = csqc.compile(csqc.load(a), "onnx", folder / "a.onnx").output
    return folder, a, b, so, ref


def test_the_digest_names_the_weights_not_the_file(two_models, tmp_path):
    folder, a, b, so, ref = two_models
    own = model_digest(csqc.load(a))
    assert artifact_digest(so) == artifact_digest(ref) == own != model_digest(csqc.load(b))
    resaved = csqc.load(a)
    again = csqc.save(resaved, tmp_path / "again.pt", torch.zeros(2, 8))
    assert model_digest(csqc.load(again)) == own
    # another batch size and static calibrated scales: the same model, so the same digest
    calibrated = csqc.compile(csqc.load(a), "llvm", tmp_path / "cal.so", batch=4,
                              calibrate=[np.random.default_rng(0).random((16, 8), dtype=np.float32)]).output
    assert artifact_digest(calibrated) == own
    assert inspect_artifact(calibrated)["model_digest"] == own
    # one weight changed by one ulp is another model
    model = _mlp(0)
    first = next(p for p in model.parameters() if p.dtype == torch.float32)
    with torch.no_grad():
        first.view(-1)[0] = torch.nextafter(first.view(-1)[0], torch.tensor(np.inf))
    nudged = csqc.save(model, tmp_path / "nudged.pt", torch.zeros(2, 8))
    assert model_digest(csqc.load(nudged)) != own


@pytest.mark.parametrize("which", ["so", "onnx"])
def test_verify_and_bench_refuse_another_models_artifact(two_models, which):
    folder, a, b, so, ref = two_models
    artifact = so if which == "so" else ref
    with pytest.raises(BadInput, match="compiled from another model"):
        csqc.verify(csqc.load(b), artifact=str(artifact))
    assert csqc.verify(csqc.load(a), artifact=str(artifact)).ok
    if which == "so":
        with pytest.raises(BadInput, match="compiled from another model"):
            bench(csqc.load(b), artifact=str(artifact), rounds=1, baselines=False, limits=False)


def test_the_cli_says_so_with_exit_code_2(two_models):
    folder, a, b, so, ref = two_models
    run = subprocess.run([sys.executable, "-m", "csqc", "verify", str(b), "--artifact", str(so)],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "compiled from another model" in run.stderr and "Traceback" not in run.stderr
    shown = subprocess.run([sys.executable, "-m", "csqc", "inspect", str(so)], capture_output=True, text=True)
    assert shown.returncode == 0 and f"model weights sha256 {model_digest(csqc.load(a))[:16]}" in shown.stdout


def test_a_recorded_digest_csqc_does_not_write_is_refused(two_models, tmp_path):
    folder, a, b, so, ref = two_models
    model = onnx.load(str(ref))
    for prop in model.metadata_props:
        if prop.key == ONNX_KEY:
            prop.value = "../" + prop.value[3:]
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    with pytest.raises(BadInput, match="model digest is not one csqc writes"):
        csqc.verify(csqc.load(a), artifact=str(edited))
    doubled = onnx.load(str(ref))
    doubled.metadata_props.add(key=ONNX_KEY, value="0" * 64)
    onnx.save(doubled, str(tmp_path / "doubled.onnx"))
    with pytest.raises(BadInput, match="2 model digests"):
        artifact_digest(tmp_path / "doubled.onnx")


def test_an_artifact_without_a_digest_is_not_checked(two_models, tmp_path):
    """Artifacts from the target emitters directly (or an older csqc) record none: verify runs as before."""
    folder, a, b, so, ref = two_models
    model = onnx.load(str(ref))
    kept = [p for p in model.metadata_props if p.key != ONNX_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    assert artifact_digest(bare) is None
    assert csqc.verify(csqc.load(a), artifact=str(bare)).ok
    shutil.copy(bare, tmp_path / "copy.onnx")
    assert json.dumps(inspect_artifact(tmp_path / "copy.onnx")["model_digest"]) == "null"
