"""Artifacts are native code: csqc checks every byte before the library reaches the loader.

Rule under test: anything wrong with an artifact file (damaged or edited bytes, an older
format, a file of another kind, sizes that disagree with the plan) is refused by
``csqc.runtime.load`` with ``BadInput``, i.e. a one-line error and exit code 2 from ``csqc run``
and ``csqc verify --artifact``, before TVM sees the file.
"""
import hashlib
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from csqc import runtime
from csqc.archive import npz_bytes
from csqc.artifact import ARTIFACT_VERSION, INTEGRITY, PLAN, WEIGHTS, read_artifact
from csqc.cli import cli
from csqc.errors import BadInput

BATCH = 2


@pytest.fixture
def model_path(tiny_mlp):
    return tiny_mlp


@pytest.fixture
def artifact(tiny_mlp_artifact):
    return tiny_mlp_artifact


def _x():
    return np.random.default_rng(0).random((BATCH, 8), dtype=np.float32)


def _split(path) -> tuple[bytes, dict[str, bytes]]:
    """(library bytes, members by name) of an artifact."""
    with zipfile.ZipFile(path) as z:
        start = min(i.header_offset for i in z.infolist())
        members = {i.filename: z.read(i) for i in z.infolist()}
    return open(path, "rb").read()[:start], members


def _resealed(library: bytes, plan: bytes, weights: bytes, *, compress=zipfile.ZIP_STORED, extra=()) -> bytes:
    """An artifact with digests recomputed over edited members: only csqc's other checks stand."""
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    integrity = {"format": "csqc-artifact", "version": ARTIFACT_VERSION, "library_bytes": len(library),
                 "sha256": {"library": sha(library), PLAN: sha(plan), WEIGHTS: sha(weights)}}
    members = [(PLAN, plan), (WEIGHTS, weights), (INTEGRITY, json.dumps(integrity).encode()), *extra]
    out = io.BytesIO()
    out.write(library)
    with zipfile.ZipFile(out, "a", compress) as z:
        for name, data in members:
            z.writestr(name, data)
    return out.getvalue()


def _weights(members) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(members[WEIGHTS])) as npz:
        return {k: npz[k] for k in npz.files}


def _edited(artifact, part: str) -> bytes:
    """The artifact with one part changed the way an editor would (a valid zip, stale digests)."""
    library, members = _split(artifact)
    if part == "library":
        at = len(library) // 2
        library = library[:at] + bytes([library[at] ^ 0x01]) + library[at + 1:]
    elif part == "plan":
        plan = json.loads(members[PLAN])
        plan["layers"]["2"]["zero_point"] += 1  # still a valid plan: wrong numbers, no crash
        members[PLAN] = json.dumps(plan).encode()
    else:
        weights = _weights(members)
        weights["2.add"] = weights["2.add"] + np.float32(1)
        members[WEIGHTS] = npz_bytes(weights)
    out = io.BytesIO()
    out.write(library)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as z:
        for name in (PLAN, WEIGHTS, INTEGRITY):
            z.writestr(name, members[name])
    return out.getvalue()


def _flipped(artifact, part: str) -> bytes:
    """The artifact with one raw byte flipped inside ``part`` (zip CRCs are not updated)."""
    library, members = _split(artifact)
    data = bytearray(open(artifact, "rb").read())
    if part == "library":
        at = len(library) // 2
    else:
        name = PLAN if part == "plan" else WEIGHTS
        at = bytes(data).index(members[name]) + len(members[name]) // 2
    data[at] ^= 0x01
    return bytes(data)


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_an_intact_artifact_loads_and_runs(artifact):
    contents = read_artifact(artifact)
    assert contents.library.startswith(b"\x7fELF") and contents.plan["version"] == ARTIFACT_VERSION
    assert runtime.load(artifact)(_x()).shape == (BATCH, 4)


@pytest.mark.parametrize("part", ["library", "plan", "weights"])
def test_an_edited_artifact_is_refused_everywhere(artifact, model_path, tmp_path, part):
    bad = tmp_path / "edited.so"
    bad.write_bytes(_edited(artifact, part))
    expect = {"library": "library does not match its SHA-256", "plan": "plan.json does not match its SHA-256",
              "weights": "weights.npz does not match its SHA-256"}[part]
    with pytest.raises(BadInput, match=expect):
        runtime.load(bad)
    np.save(tmp_path / "x.npy", _x())
    assert expect in _one_line_error(_cli("run", bad, "-i", tmp_path / "x.npy"))
    assert expect in _one_line_error(_cli("verify", model_path, "--artifact", bad, "--samples", "1"))


@pytest.mark.parametrize("part", ["library", "plan", "weights"])
def test_one_flipped_byte_is_refused(artifact, tmp_path, part):
    bad = tmp_path / "flipped.so"
    bad.write_bytes(_flipped(artifact, part))
    with pytest.raises(BadInput, match="damaged|not a csqc artifact"):
        runtime.load(bad)
    np.save(tmp_path / "x.npy", _x())
    _one_line_error(_cli("run", bad, "-i", tmp_path / "x.npy"))


def test_an_older_artifact_version_asks_for_a_recompile(artifact, tmp_path):
    library, members = _split(artifact)
    plan = json.loads(members[PLAN])
    plan["version"] = 1
    old = io.BytesIO()
    old.write(library)
    with zipfile.ZipFile(old, "a") as z:  # version 1: plan and weights, no digests
        z.writestr(PLAN, json.dumps(plan))
        z.writestr(WEIGHTS, members[WEIGHTS])
    path = tmp_path / "old.so"
    path.write_bytes(old.getvalue())
    with pytest.raises(BadInput, match="older csqc.*compile the model again"):
        runtime.load(path)


def _fake_compilers(folder, marker):
    """``cc``/``gcc``/``g++`` that only leave ``marker``: TVM's ``.o`` loader would call one."""
    folder.mkdir()
    for name in ("cc", "gcc", "g++", "c++", "clang", "clang++"):
        tool = folder / name
        tool.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        tool.chmod(0o755)


@pytest.mark.parametrize("suffix", [".o", ".tar", ".dylib", ""])
def test_no_file_name_makes_tvm_compile_or_unpack(artifact, tmp_path, monkeypatch, suffix):
    marker = tmp_path / "COMPILER-RAN"
    _fake_compilers(tmp_path / "bin", marker)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for var in ("CC", "CXX"):
        monkeypatch.setenv(var, str(tmp_path / "bin" / "g++"))
    folder = tmp_path / "in"
    folder.mkdir()
    renamed = folder / f"model{suffix}"
    renamed.write_bytes(artifact.read_bytes())
    assert np.array_equal(runtime.load(renamed)(_x()), runtime.load(artifact)(_x()))
    if suffix == ".tar":  # a real tar under the artifact's name: refused, not unpacked
        with tarfile.open(renamed, "w") as t:
            t.add(artifact, arcname="lib.o")
        with pytest.raises(BadInput, match="damaged|not a csqc artifact"):
            runtime.load(renamed)
    assert sorted(p.name for p in folder.iterdir()) == [renamed.name]
    assert not marker.exists()


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.so"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):
        runtime.load(fifo)


# -- bounded resources: sizes are checked against the plan before anything is allocated ---------------


def test_an_unused_huge_buffer_is_refused(artifact, tmp_path):
    library, members = _split(artifact)
    plan = json.loads(members[PLAN])
    plan["buffers"]["ballast"] = {"shape": [1 << 29], "dtype": "float32", "kind": "temp"}  # 2 GiB
    path = tmp_path / "ballast.so"
    path.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(BadInput, match="no step.*uses.*ballast"):
        runtime.load(path)


@pytest.mark.parametrize("threads", [0, -1, 2000, "1", 1.0, True])
def test_a_thread_count_csqc_would_not_write_is_refused(artifact, tmp_path, threads):
    library, members = _split(artifact)
    plan = json.loads(members[PLAN])
    plan["threads"] = threads
    path = tmp_path / "threads.so"
    path.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(BadInput, match="'threads' must be a thread count"):
        runtime.load(path)


def test_a_weight_claiming_more_than_it_holds_is_refused(artifact, tmp_path):
    library, members = _split(artifact)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 29,)})
    with zipfile.ZipFile(io.BytesIO(members[WEIGHTS])) as z:
        arrays = [(i.filename, z.read(i)) for i in z.infolist()]
    arrays[0] = (arrays[0][0], header.getvalue() + b"\0" * 16)  # 2 GiB declared, 16 bytes held
    weights = io.BytesIO()
    with zipfile.ZipFile(weights, "w") as z:
        for name, data in arrays:
            z.writestr(name, data)
    path = tmp_path / "claims.so"
    path.write_bytes(_resealed(library, members[PLAN], weights.getvalue()))
    with pytest.raises(BadInput, match="declares float32"):
        runtime.load(path)


@pytest.mark.parametrize("where", ["artifact", "weights"])
def test_compressed_members_are_refused(artifact, tmp_path, where):
    """A deflated member can inflate a thousandfold: csqc writes stored members and reads only those."""
    library, members = _split(artifact)
    plan, weights = members[PLAN], members[WEIGHTS]
    if where == "weights":
        deflated = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(weights)) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info))
        weights = deflated.getvalue()
    path = tmp_path / "deflated.so"
    path.write_bytes(_resealed(library, plan, weights,
                               compress=zipfile.ZIP_DEFLATED if where == "artifact" else zipfile.ZIP_STORED))
    with pytest.raises(BadInput, match="compressed"):
        runtime.load(path)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("extra", ["stray-weight", "duplicate-member", "extra-member"])
def test_anything_beyond_what_csqc_writes_is_refused(artifact, tmp_path, extra):
    library, members = _split(artifact)
    weights, more = members[WEIGHTS], ()
    if extra == "stray-weight":
        weights = npz_bytes({**_weights(members), "unused": np.zeros(4, np.float32)})
    elif extra == "duplicate-member":
        more = ((PLAN, members[PLAN]),)
    else:
        more = (("notes.txt", b"hello"),)
    path = tmp_path / "extra.so"
    path.write_bytes(_resealed(library, members[PLAN], weights, extra=more))
    with pytest.raises(BadInput, match="no weight buffer|not a csqc artifact"):
        runtime.load(path)
