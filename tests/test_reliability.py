"""Reliability: no partial outputs, reproducible builds, overflow-proof accumulators end to end,
and one-line errors with the right exit code for bad inputs at run time."""
import hashlib
import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

import csqc
from csqc import runtime
from csqc.cli import cli
from csqc.errors import BadInput
from csqc.passes import run_passes

DETERMINISM_BATCH = 2


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def mlp(trained):
    return csqc.load(trained("digits-mlp")[3])


# -- no partial outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["llvm", "onnx", "cuda"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_compile_leaves_nothing_behind(mlp, tmp_path, monkeypatch, target, interrupt):
    """Ctrl-C (or a crash) while the artifact is being written: no file, no temporary."""
    def boom(*args, **kwargs):
        raise interrupt("stopped while writing")

    if target == "onnx":
        monkeypatch.setattr("onnx.ModelProto.SerializeToString", boom)
    else:  # both TVM targets write through csqc.artifact's zip writer, after building the library
        monkeypatch.setattr("csqc.artifact.write_member", boom)
    out = tmp_path / f"m.{'onnx' if target == 'onnx' else 'so'}"
    with pytest.raises(interrupt):
        csqc.compile(mlp, target, out)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_cli_compile_exits_130_and_leaves_nothing(mlp, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("csqc.artifact.write_member", interrupt)
    out = _cli("compile", mlp.source, "-o", tmp_path / "m.so")
    assert out.exit_code == 130 and "interrupted" in out.output
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_compile(mlp, tmp_path, monkeypatch):
    out = tmp_path / "m.so"
    out.write_bytes(b"the previous build")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("csqc.artifact.write_member", fail)
    with pytest.raises(RuntimeError):
        csqc.compile(mlp, "llvm", out)
    assert out.read_bytes() == b"the previous build" and len(list(tmp_path.iterdir())) == 1


def test_ir_dumps_are_written_whole(mlp, tmp_path):
    from csqc.capture import capture

    run_passes(capture(mlp), "default", dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "00-captured.ir" and not [n for n in names if n.endswith(".tmp") or n.startswith(".")]


# -- determinism ---------------------------------------------------------------------------------


def test_onnx_is_byte_identical_across_compiles(mlp, tmp_path):
    for form in ("reference", "deploy"):
        calib = [np.random.default_rng(0).random((8, 64), dtype=np.float32)] if form == "deploy" else None
        a, b = tmp_path / f"a-{form}.onnx", tmp_path / f"b-{form}.onnx"
        csqc.compile(mlp, "onnx", a, onnx_form=form, calibration=calib)
        csqc.compile(mlp, "onnx", b, onnx_form=form, calibration=calib)
        assert _sha(a) == _sha(b), form


@pytest.mark.parametrize("target", ["llvm", "cuda"])
def test_tvm_artifacts_are_byte_identical_across_compiles(mlp, tmp_path, target):
    a, b = tmp_path / "a.so", tmp_path / "b.so"
    csqc.compile(mlp, target, a, batch=DETERMINISM_BATCH)
    csqc.compile(mlp, target, b, batch=DETERMINISM_BATCH)
    assert _sha(a) == _sha(b)
    with zipfile.ZipFile(a) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}  # no build timestamps
    if target == "llvm":
        x = np.random.default_rng(0).random((DETERMINISM_BATCH, 64), dtype=np.float32)
        assert np.array_equal(runtime.load(a)(x), runtime.load(b)(x))


# -- overflow proof, end to end ----------------------------------------------------------------------


def test_layer_that_overflows_int32_runs_exactly_in_int64_on_every_target(tmp_path):
    """15-bit weights at full scale, 8-bit codes at 255, K = 512: 512 * 32767 * 255 > 2^31."""
    from irbuild import quant_layer_graph, run
    from csqc.targets.llvm.target import emit_llvm
    from csqc.targets.onnx import emit_reference, make_session
    from csqc.targets.onnx import run as run_onnx

    k = 512
    q = np.full((2, k), 2**15 - 1, np.int32)
    q[1, ::2] *= -1
    g, _ = quant_layer_graph(np.random.default_rng(0), n_bits=15, active_bits=tuple(range(14, -1, -1)), k=k,
                             out_ch=2, act_bits=8, q=q)
    x = np.ones((2, k), np.float32)  # every code at its maximum: the first output reaches the bound
    optimized = run_passes(g, "default")[0]
    (layer,) = optimized.quant_layers()
    assert layer.quant.acc_dtype == "int64"
    expected, record = run(optimized, [x])
    assert record[f"{layer.name}.acc"].max() > 2**31 - 1
    emit_llvm(optimized, tmp_path / "wide.so")
    got = runtime.load(tmp_path / "wide.so")(x)
    np.testing.assert_allclose(got, expected[0], rtol=1e-6)
    integer = run_passes(g, "integer")[0]
    onnx_out = run_onnx(make_session(emit_reference(integer)), [x])[0]
    np.testing.assert_allclose(onnx_out, expected[0], rtol=1e-6)


# -- bad inputs at run time ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(mlp, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "mlp.so"
    csqc.compile(mlp, "llvm", out, batch=2)
    return out


@pytest.mark.parametrize("case, message", [
    ("wrong-shape", "expected shape"),
    ("wrong-rank", "expected shape"),
    ("strings", "expected float32"),
    ("nan", "NaN"),
    ("inf", "infinity"),
    ("not-npy", "cannot read"),
    ("empty-npz", "no arrays"),
    ("missing", "no such"),
    ("pickled-objects", "cannot read"),
])
def test_run_rejects_bad_inputs_with_one_line(artifact, tmp_path, case, message):
    path = tmp_path / "x.npy"
    good = np.zeros((2, 64), np.float32)
    if case == "wrong-shape":
        np.save(path, np.zeros((3, 64), np.float32))
    elif case == "wrong-rank":
        np.save(path, np.zeros((2, 8, 8), np.float32))
    elif case == "strings":
        np.save(path, np.full((2, 64), "a"))
    elif case in ("nan", "inf"):
        good[1, 3] = np.nan if case == "nan" else np.inf
        np.save(path, good)
    elif case == "not-npy":
        path.write_text("1,2,3\n")
    elif case == "empty-npz":
        path = tmp_path / "x.npz"
        np.savez(path)
    elif case == "missing":
        path = tmp_path / "nope.npy"
    elif case == "pickled-objects":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = _cli("run", artifact, "--input", path, "-o", tmp_path / "y.npy")
    assert out.exit_code == 2, out.output
    lines = [l for l in out.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.output
    assert not (tmp_path / "y.npy").exists()


def test_run_json_error_is_machine_readable(artifact, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    out = _cli("run", artifact, "--input", tmp_path / "x.npy", "--json")
    assert out.exit_code == 2
    data = json.loads(out.output.split("\nerror:")[0])  # the JSON document, then the one-line message
    assert data["ok"] is False and data["exit_code"] == 2


def test_runtime_rejects_bad_plane_settings(artifact):
    m = runtime.load(artifact)
    x = np.zeros((2, 64), np.float32)
    for bad in (-1, {"nope": 1}):
        with pytest.raises(BadInput):
            m(x, skip_planes=bad)
