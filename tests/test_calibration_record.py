"""Artifacts built with ``--calibrate`` record their static scales; verify checks with exactly those.

Rules under test (csqc.calibration): the llvm and ONNX artifacts carry every calibrated scale
bit for bit; verify needs no calibration data for them; a tampered record (NaN, negative, unknown
quantizer, zero point out of range) is refused with exit code 2 and writes nothing; a scale moved
by one ulp is caught: an ONNX model disagrees with its own initializers (refused, exit 2), a TVM
artifact's kernels hold the old scale (verify reports the layer's scale mismatch, exit 1).
"""
import hashlib
import io
import json
import zipfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import csqc
from csqc import runtime
from csqc.artifact import ARTIFACT_VERSION, INTEGRITY, PLAN, WEIGHTS
from csqc.calibration import ONNX_KEY, artifact_calibration, scale_hex
from csqc.capture import capture
from csqc.cli import cli
from csqc.passes.calibrate_scales import calibrate

QUANTIZER = "2.input_quant.quant"  # tiny_mlp's one dynamic activation quantizer


def _calibration_data():
    return np.random.default_rng(3).random((16, 8), dtype=np.float32)


def _check_inputs():
    return (np.random.default_rng(5).random((8, 8), dtype=np.float32) * 1.5).astype(np.float32)  # some codes clamp


@pytest.fixture(scope="module")
def built(tiny_mlp, tmp_path_factory):
    """(model, {"llvm": .so path, "onnx": .onnx path}) compiled with --calibrate on arrays."""
    model = csqc.load(tiny_mlp)
    folder = tmp_path_factory.mktemp("calibrated")
    paths = {t: csqc.compile(model, t, folder / f"m{suffix}", calibrate=_calibration_data()).output
             for t, suffix in (("llvm", ".so"), ("onnx", ".onnx"))}
    return model, paths


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


# -- writing an edited record ------------------------------------------------------------------------


def _resealed_so(path, edit, out):
    """The TVM artifact with its plan's calibration edited and every digest recomputed (a forger's copy)."""
    with zipfile.ZipFile(path) as z:
        start = min(i.header_offset for i in z.infolist())
        members = {i.filename: z.read(i) for i in z.infolist()}
    library = open(path, "rb").read()[:start]
    plan = json.loads(members[PLAN])
    edit(plan["calibration"])
    plan_bytes = json.dumps(plan).encode()
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    integrity = {"format": "csqc-artifact", "version": ARTIFACT_VERSION, "library_bytes": len(library),
                 "sha256": {"library": sha(library), PLAN: sha(plan_bytes), WEIGHTS: sha(members[WEIGHTS])}}
    data = io.BytesIO()
    data.write(library)
    with zipfile.ZipFile(data, "a", zipfile.ZIP_STORED) as z:
        for name, member in ((PLAN, plan_bytes), (WEIGHTS, members[WEIGHTS]), (INTEGRITY, json.dumps(integrity).encode())):
            z.writestr(name, member)
    out.write_bytes(data.getvalue())
    return out


def _edited_onnx(path, edit, out):
    model = onnx.load(str(path))
    prop = next(p for p in model.metadata_props if p.key == ONNX_KEY)
    doc = json.loads(prop.value)
    edit(doc)
    prop.value = json.dumps(doc)
    onnx.save(model, str(out))
    return out


def _edited(target, path, edit, folder):
    if target == "llvm":
        return _resealed_so(path, edit, folder / "edited.so")
    return _edited_onnx(path, edit, folder / "edited.onnx")


def _set_scale(value):
    def edit(doc):
        doc["quantizers"][QUANTIZER]["scale"] = scale_hex(value)
    return edit


def _renamed(doc):
    doc["quantizers"]["no.such.quant"] = doc["quantizers"].pop(QUANTIZER)


def _zero_point_16(doc):
    doc["quantizers"][QUANTIZER]["zero_point"] = 16  # 4 bits: 0..15


def _one_ulp_up(doc):
    bits = int(doc["quantizers"][QUANTIZER]["scale"], 16) + 1
    doc["quantizers"][QUANTIZER]["scale"] = format(bits, "08x")


TAMPERED = {"nan": _set_scale(np.nan), "negative": _set_scale(-0.5), "unknown name": _renamed,
            "zero point out of range": _zero_point_16}


# -- tests -----------------------------------------------------------------------------------------------


def test_llvm_and_onnx_artifacts_carry_the_calibrated_scales_bit_exactly(built):
    model, paths = built
    expected = calibrate(capture(model), [_calibration_data()])[0].graph.node(QUANTIZER).attr("static_scale")
    stored = {"llvm": runtime.load(paths["llvm"]).calibration, "onnx": artifact_calibration(paths["onnx"])}
    for target, calibration in stored.items():
        assert list(calibration) == [QUANTIZER], target
        s = calibration[QUANTIZER]
        assert scale_hex(s.scale) == scale_hex(expected) and (s.zero_point, s.bits) == (0, 4), target
        assert calibration.samples == 16
        with pytest.raises(TypeError):  # read-only
            calibration.quantizers["x"] = s
    baked = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(paths["onnx"])).graph.initializer}
    assert scale_hex(baked[f"{QUANTIZER}.static_scale"].reshape(-1)[0]) == scale_hex(expected)  # the graph computes with it
    out = _cli("inspect", paths["llvm"])
    assert out.exit_code == 0 and QUANTIZER in out.output and scale_hex(expected) in out.output, out.output


def test_verify_uses_the_artifacts_scales_without_the_data(built, tmp_path):
    model, paths = built
    np.savez(tmp_path / "x.npz", x=_check_inputs())
    for target, path in paths.items():
        out = _cli("verify", model.source, "--artifact", path, "--inputs", tmp_path / "x.npz")
        assert out.exit_code == 0 and "calibration: from the artifact (1 scales)" in out.output, (target, out.output)
    report = csqc.verify(model, inputs=[_check_inputs()], artifact=str(paths["llvm"]))
    assert report.ok and report.accumulators_exact and report.calibration["source"] == "artifact"


def test_verify_calibrate_with_a_calibrated_artifact_compares_and_keeps_the_artifacts_scales(built):
    model, paths = built
    same = csqc.verify(model, inputs=[_check_inputs()], artifact=str(paths["onnx"]), calibrate=_calibration_data())
    assert same.ok and same.calibration["differences"] == [] and "bit for bit" in same.notes[-1]
    other = csqc.verify(model, inputs=[_check_inputs()], artifact=str(paths["onnx"]),
                        calibrate=_calibration_data() * np.float32(0.5))
    assert other.ok and other.accumulators_exact, other.to_json()  # checked against the artifact's scales
    assert len(other.calibration["differences"]) == 1 and QUANTIZER in other.calibration["differences"][0]
    assert "differ from the artifact's for 1 quantizer" in other.notes[-1]


@pytest.mark.parametrize("target", ["llvm", "onnx"])
@pytest.mark.parametrize("tamper", list(TAMPERED))
def test_a_tampered_calibration_is_refused(built, tmp_path, target, tamper):
    model, paths = built
    edited = _edited(target, paths[target], TAMPERED[tamper], tmp_path)
    line = _one_line_error(_cli("verify", model.source, "--artifact", edited, "--samples", 2))
    assert "calibration" in line
    if target == "llvm" and tamper != "unknown name":  # names are checked against the model, which run lacks
        np.save(tmp_path / "x.npy", _check_inputs()[:2])
        _one_line_error(_cli("run", edited, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy"))
        assert not (tmp_path / "y.npy").exists()


def test_a_scale_moved_by_one_ulp_is_caught(built, tmp_path):
    """TVM: the kernels hold the old scale, verify reports that layer's scale mismatch (exit 1);
    ONNX: the record disagrees with the initializer the graph computes with (refused, exit 2)."""
    model, paths = built
    so = _edited("llvm", paths["llvm"], _one_ulp_up, tmp_path)
    report = csqc.verify(model, inputs=[_check_inputs()], artifact=str(so))
    assert not report.ok and not report.accumulators_exact
    assert report.first_divergence["tensor"] == "2.xq", report.first_divergence
    out = _cli("verify", model.source, "--artifact", so, "--samples", 2)
    assert out.exit_code == 1 and "FAILED" in out.output
    onnx_path = _edited("onnx", paths["onnx"], _one_ulp_up, tmp_path)
    assert "the graph computes with" in _one_line_error(_cli("verify", model.source, "--artifact", onnx_path))


def test_a_moved_zero_point_is_caught_in_an_onnx_artifact(tmp_path):
    """Asymmetric quantizers of values >= 0 calibrate to zero point 0, the value of constants the
    graph shares: each still has its own initializer, which the record is checked against."""
    import torch
    from torch import nn

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    model = csqc.finalize(csqc.convert(model, n_bits=4, act_bits=6, quantize_first_input=True, act_symmetric=False))
    source = tmp_path / "asym.pt"
    model = csqc.load(csqc.save(model, source, torch.rand(3, 12)))
    onnx_path = csqc.compile(model, "onnx", tmp_path / "asym.onnx",
                             calibrate=np.random.default_rng(1).random((16, 12), dtype=np.float32)).output
    record = artifact_calibration(onnx_path)
    assert len(record) == 2 and {s.zero_point for s in record.values()} == {0}
    baked = {i.name for i in onnx.load(str(onnx_path)).graph.initializer}
    assert all(f"{name}.static_zero_point" in baked and f"{name}.static_scale" in baked for name in record)
    for name in record:
        def moved(doc, name=name):
            doc["quantizers"][name]["zero_point"] = 1  # in range, another model
        edited = _edited_onnx(onnx_path, moved, tmp_path / "edited.onnx")
        line = _one_line_error(_cli("verify", source, "--artifact", edited, "--samples", 3))
        assert name in line and "zero point 1" in line, line


def test_an_uncalibrated_artifact_records_nothing(tiny_mlp_artifact):
    assert runtime.load(tiny_mlp_artifact).calibration is None
    out = _cli("inspect", tiny_mlp_artifact)
    assert out.exit_code == 0 and "calibration: none" in out.output, out.output
    # its kernels are all serial: no thread cap to record (test_llvm_target has one that is capped)
    assert "threads:" not in out.output
    assert "threads" not in json.loads(_cli("inspect", tiny_mlp_artifact, "--json").output)
