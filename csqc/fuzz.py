"""Fuzzing csqc's loaders and command line: bad input must end in a ``CsqcError``, never a crash.

Targets (plain functions: give them a file or an argument list):

``ir``        ``csqc.ir.load_graph`` on damaged IR files, then the graph's text form
``model``     ``csqc.load`` on damaged model files, then capture, the default passes and a
              PyTorch run, as ``csqc inspect`` / ``compile`` / ``verify`` would
``program``   ``csqc.load`` on model files whose program JSON was edited where torch evaluates it
              (guards_code, expr_str, range constraints, op targets, arguments, metadata,
              treespecs) or whose tensor archive lies about sizes (grown headers, duplicate
              members, bombs, long double); only "loaded" or ``BadInput`` may come back, and a
              payload that would create the marker file must never run
``artifact``  ``csqc.runtime.load`` on artifacts whose appended zip is damaged, then one run
``cli``       ``csqc`` commands with fuzzed argument lists naming damaged and foreign files

Inputs are drawn by hypothesis from valid seed files built once per session (``Env``): zip
members replaced or dropped, JSON fields deleted, retyped or set to huge numbers, NaN or
negative shapes, npz arrays with wrong dtypes or shapes, object arrays, pickles, and files of
the wrong kind (ONNX, text, torch checkpoints). A case passes when the target succeeds or
raises a ``CsqcError``; anything else is a finding, kept with the input that caused it::

    python -m csqc.fuzz --cases 10000 [--target ir|model|artifact|cli|all] [--seed S]
    python -m csqc.fuzz --replay csqc-fuzz-findings/model-1

Every pickle and every Python payload in the inputs would create a marker file when unpickled
or evaluated; its appearance is a finding too (a loader ran code from a file).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import pathlib
import pickle
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UNREADABLE_ARCHIVE, CsqcError

__all__ = [
    "Case", "Env", "Finding", "TargetReport", "TARGETS", "MarkerPayload", "marker_pickle", "build_env", "fuzz_ir",
    "fuzz_model", "fuzz_program", "fuzz_artifact", "fuzz_cli", "run_target", "save_case", "replay", "main",
]

_MISSING_HYPOTHESIS = ("csqc.fuzz needs hypothesis: install the test extra (pip install 'csqc[test]') "
                       "or pip install hypothesis")


def _require_hypothesis():
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise SystemExit(_MISSING_HYPOTHESIS) from None


# -- the pickle that must never run ------------------------------------------------------------

class MarkerPayload:
    """Pickles to a call of ``Path.touch(marker)``: unpickling it leaves the marker file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def marker_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(MarkerPayload(marker), protocol=protocol)


def _object_npy(marker: Path) -> bytes:
    """An ``.npy`` holding an object array whose pickle carries the marker payload."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([MarkerPayload(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


# -- seeds: valid files every mutation starts from ---------------------------------------------

@dataclass
class Env:
    """Seed files and folders one fuzzing session works in."""

    folder: Path
    model: bytes  # a valid csqc model file
    irs: list[bytes]  # valid IR files (as captured, and after the default pipeline)
    artifact: bytes | None  # a valid llvm artifact (None without TVM)
    library_size: int  # bytes of the shared library in front of the artifact's zip
    foreign: dict[str, bytes]  # files of the wrong kind, by what they are
    marker: Path  # appears only if some loader unpickled a payload
    scratch: Path  # where cases are written (the CLI target's working folder)
    counter: int = 0

    def next_id(self) -> int:
        self.counter += 1
        return self.counter


def build_env(folder: str | os.PathLike | None = None, *, artifact: bool = True) -> Env:
    """Build the seed files in ``folder`` (a new temporary folder when None): a few seconds."""
    import torch

    import csqc
    from .capture import capture
    from .ir import save_graph
    from .passes import run_passes

    folder = Path(folder or tempfile.mkdtemp(prefix="csqc-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    seeds, scratch = folder / "seeds", folder / "scratch"
    seeds.mkdir(exist_ok=True)
    scratch.mkdir(exist_ok=True)
    marker = folder / "PICKLE-RAN-CODE"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model_path = csqc.save(csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4)), seeds / "model.pt", torch.zeros(1, 8))
    loaded = csqc.load(model_path)
    captured = capture(loaded)
    irs = []
    for i, graph in enumerate((captured, run_passes(captured, "default")[0])):
        save_graph(graph, seeds / f"graph{i}.ir")
        irs.append((seeds / f"graph{i}.ir").read_bytes())
    foreign = _foreign_files(seeds, marker, loaded)
    artifact_bytes, library_size = None, 0
    if artifact:
        out = csqc.compile(loaded, "llvm", seeds / "model.so").output
        artifact_bytes = out.read_bytes()
        with zipfile.ZipFile(out) as z:
            library_size = min(info.header_offset for info in z.infolist())
        foreign["elf"] = artifact_bytes[:library_size]
    return Env(folder, model_path.read_bytes(), irs, artifact_bytes, library_size, foreign, marker, scratch)


def _foreign_files(seeds: Path, marker: Path, model) -> dict[str, bytes]:
    """Files of the wrong kind: each is passed where a model, IR file or artifact belongs."""
    import torch

    files = {
        "empty": b"",
        "text": b"this is a text file, not a model\n" * 3,
        "json": json.dumps({"format": "csqc-model", "version": 1}).encode(),
        "random": np.random.default_rng(0).bytes(700),
        "gzip": gzip.compress(b"not a model\n" * 10),
        "pickle": marker_pickle(marker),
        "object-npy": _object_npy(marker),
        "npz": _npz_bytes({"x": np.ones((1, 8), np.float32)}),
        "zip-empty": _zip_bytes([]),
        "torch-zip-pickle": _zip_bytes([("archive/data.pkl", marker_pickle(marker)), ("archive/version", b"3\n")]),
    }
    buf = io.BytesIO()
    torch.save({"model": {"0.pweight": MarkerPayload(marker)}}, buf)  # weights_only must refuse it
    files["torch-checkpoint-pickle"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"model": {"0.pweight": torch.ones(4, 8, 4), "0.nweight": torch.zeros(4, 8, 4)}}, buf)
    files["torch-checkpoint"] = buf.getvalue()
    try:
        from .compiler import compile as compile_model

        files["onnx"] = compile_model(model, "onnx", seeds / "model.onnx").output.read_bytes()
    except (ImportError, CsqcError):  # onnx missing: a protobuf-looking header is still the wrong kind of file
        files["onnx"] = b"\x08\x08\x12\x04csqc\x3a\x02\x0a\x00"
    return files


# -- containers: zip members, npz and npy bytes --------------------------------------------------

def _zip_bytes(members: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate member names are one of the mutations
        with zipfile.ZipFile(buf, "w", compress) as z:
            for name, data in members:
                z.writestr(zipfile.ZipInfo(name or "_", (1980, 1, 1, 0, 0, 0)), data, compress_type=compress)
    return buf.getvalue()


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=True)
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    # np.savez takes names as keyword arguments, so "file" or "allow_pickle" would collide
    return _zip_bytes([(f"{name}.npy", _npy_bytes(a)) for name, a in arrays.items()])


def _npy_header(header: str, version: tuple[int, int] = (1, 0)) -> bytes:
    header = header + " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY" + bytes(version) + len(header).to_bytes(2, "little") + header.encode("latin1")


# -- drawing choices from hypothesis -------------------------------------------------------------

class Draws:
    """Choices drawn from hypothesis's ``st.data()``, so a seed reproduces every case."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self._data, self._st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self._data.draw(self._st.integers(lo, hi))

    def choice(self, options):
        return self._data.draw(self._st.sampled_from(list(options)))

    def chance(self, numerator: int, denominator: int) -> bool:
        return self.integer(1, denominator) <= numerator

    def binary(self, max_size: int) -> bytes:
        return self._data.draw(self._st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        return self._data.draw(self._st.text(max_size=max_size))

    def number(self):
        return self._data.draw(self._st.one_of(self._st.integers(), self._st.floats()))

    def permutation(self, items: list) -> list:
        return self._data.draw(self._st.permutations(items)) if len(items) > 1 else list(items)


# -- mutations -----------------------------------------------------------------------------------

# Shape-like numbers stay tiny or astronomically large: a mid-size number (2**31 elements) in a
# shape is a real request for gigabytes that a loader may rightly try to honour.
_NASTY_JSON = [
    None, True, False, 0, -1, 1, 2, 255, -2**31 - 1, 2**40, 2**63, -2**63, 2**64 + 1, 10**30,
    1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, -0.0,
    "", "x", "float32", "int64", "object", "../../x", "\x00", "\u00e9\u00e9", "1,8",
    [], [-1], [0], [0, -1], [1, 8], [2**40, 2**40], [None], [[]], ["x"], [1.5], {}, {"": None}, {"shape": [-1]},
]


def _nasty_value(d: Draws, doc):
    kind = d.integer(0, 9)
    if kind <= 5:
        return json.loads(json.dumps(d.choice(_NASTY_JSON)))
    if kind == 6:
        return d.number()
    if kind == 7:
        return d.text(12)
    return _random_subtree(d, doc)  # right-looking, wrong place


def _random_subtree(d: Draws, doc):
    node = doc
    while isinstance(node, (dict, list)) and node and d.chance(3, 4):
        node = node[d.choice(list(node))] if isinstance(node, dict) else node[d.integer(0, len(node) - 1)]
    return json.loads(json.dumps(node))


def _nudged(d: Draws, value):
    """A value of the same kind, just wrong: off by one, negated, emptied, retyped."""
    if isinstance(value, bool):
        return d.choice([not value, int(value), str(value).lower(), None])
    if isinstance(value, int):
        return d.choice([value + 1, value - 1, -value, -1, 0, value * 1000, float(value), str(value), 2**40])
    if isinstance(value, float):
        return d.choice([float("nan"), float("inf"), -value, 0.0, 1e308, int(value) if np.isfinite(value) else 0, str(value)])
    if isinstance(value, str):
        from .ir import OPS  # an op name in place of another string turns a node into an op it is not

        return d.choice(["", value + "x", value[:-1], value.upper(), value * 3, [value], 0, d.choice(sorted(OPS))])
    if isinstance(value, list):
        return d.choice([[], value[:-1], value + value[:1], value[::-1], [value], {"0": value}, len(value)])
    if isinstance(value, dict):
        keys = sorted(value)
        if keys and d.chance(2, 3):
            gone = d.choice(keys)
            return {k: v for k, v in value.items() if k != gone}
        return d.choice([{}, [value], list(value.values())])
    return d.choice([0, "", [], {}])


def mutate_json_doc(d: Draws, doc, steps: list[str]):
    """One edit at a random place in ``doc``: replace, delete, add, or nudge a value."""
    holder = [doc]
    parent, key, path = holder, 0, "$"
    while True:
        node = parent[key]
        if not isinstance(node, (dict, list)) or not node or d.chance(1, 5):
            break
        k = d.choice(list(node)) if isinstance(node, dict) else d.integer(0, len(node) - 1)
        parent, key, path = node, k, f"{path}[{k!r}]"
    op = d.choice(["replace", "delete", "add", "nudge", "nudge"])
    node = parent[key]
    if op == "delete" and parent is not holder:
        parent.pop(key)
    elif op == "add" and isinstance(node, dict):
        name = d.choice(["extra", "", "shape", "dtype", "kind", "alias", "format", "version"] + list(node))
        node[name] = _nasty_value(d, doc)
        path = f"{path}[{name!r}]"
    elif op == "add" and isinstance(node, list):
        node.append(_random_subtree(d, node) if node and d.chance(1, 2) else _nasty_value(d, doc))
    elif op == "nudge":
        parent[key] = _nudged(d, node)
    else:
        op = "replace"
        parent[key] = _nasty_value(d, doc)
    steps.append(f"json {op} {path}")
    return holder[0]


def mutate_json(d: Draws, raw: bytes, steps: list[str]) -> bytes:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # an earlier mutation already broke it
        return _flip_bytes(d, raw, 0, steps)
    mode = d.integer(0, 9)
    if mode <= 6:
        for _ in range(d.integer(1, 3)):
            doc = mutate_json_doc(d, doc, steps)
        return json.dumps(doc).encode()  # NaN and Infinity stay NaN and Infinity
    if mode == 7:
        cut = d.integer(0, max(0, len(raw) - 1))
        steps.append(f"json truncated at {cut}")
        return raw[:cut]
    if mode == 8:
        name = d.choice(sorted(_BROKEN_JSON))
        text = _BROKEN_JSON[name]
        steps.append(f"json replaced by {name}")
        return text(raw) if callable(text) else text
    return _flip_bytes(d, raw, 0, steps)


_BROKEN_JSON = {
    "not utf-8": b"\xff\xfe\x00{",
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "an int of 5000 digits": b'{"version": ' + b"9" * 5000 + b"}",
    "a list": b"[]",
    "null": b"null",
    "a string": b'"csqc-model"',
    "a number": b"1e999",
    "a byte-order mark in front": lambda raw: b"\xef\xbb\xbf" + raw,
    "single quotes": lambda raw: raw.replace(b'"', b"'"),
    "duplicated keys": lambda raw: raw[:-1] + b', "format": 7}' if raw.endswith(b"}") else raw,
}


def _flip_bytes(d: Draws, data: bytes, start: int, steps: list[str]) -> bytes:
    if len(data) <= start:
        return data
    data = bytearray(data)
    for _ in range(d.integer(1, 4)):
        at = d.integer(start, len(data) - 1)
        data[at] ^= d.integer(1, 255)
        steps.append(f"byte {at} flipped")
    return bytes(data)


_ODD_ARRAY_NAMES = ["", "x", "../x", "/abs", "state_dict/", "constants/x", "example_inputs/x", "example_inputs/-1",
                    "example_inputs/7", "example_inputs/00", "a/b/c", "file", "allow_pickle", "weights.npz"]


def _retyped(d: Draws, a: np.ndarray, marker: Path) -> tuple[np.ndarray, str]:
    target = d.choice(["float64", "float16", "int8", "int16", "int64", "uint8", "uint64", "bool", "complex64",
                       "U3", "S2", "V4", "datetime64[s]", "struct", "object"])
    if target == "object":
        return np.array([MarkerPayload(marker)] * max(1, min(a.size, 2)), dtype=object), "object array (pickle)"
    if target == "V4":
        return np.zeros(a.shape, "V4"), target
    if target == "struct":
        return np.zeros(a.shape, [("a", "<f4"), ("b", "u1")]), target
    if target == "datetime64[s]":
        return np.zeros(a.shape, "datetime64[s]"), target
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return a.astype(target), target
        except (TypeError, ValueError):  # e.g. a structured array from an earlier edit
            return np.zeros(a.shape, target), target


def _reshaped(d: Draws, a: np.ndarray) -> tuple[np.ndarray, str]:
    how = d.choice(["flat", "leading 1", "empty", "scalar", "doubled", "transposed", "fortran"])
    if how == "flat":
        return a.reshape(-1), how
    if how == "leading 1":
        return a[None], how
    if how == "empty":
        return (a[:0] if a.ndim else np.zeros((0,), a.dtype)), how
    if how == "scalar":
        return (a.reshape(-1)[:1].reshape(()) if a.size else np.zeros((), a.dtype)), how
    if how == "doubled":
        return (np.concatenate([a, a]) if a.ndim else a.reshape(1).repeat(2)), how
    if how == "transposed":
        return np.ascontiguousarray(a.T), how
    return np.asfortranarray(a.reshape(a.shape + (1,)) if a.ndim < 2 else a), how


def _revalued(d: Draws, a: np.ndarray) -> tuple[np.ndarray, str]:
    a = a.copy()
    if a.dtype.kind == "f":
        fill = d.choice([float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.0])
    elif a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        fill = d.choice([info.max, info.min, 0, 1, -1 if a.dtype.kind == "i" else info.max - 1])
    else:
        return a, "values kept"
    if a.size:
        a.reshape(-1)[d.integer(0, a.size - 1)] = fill
        if d.chance(1, 2):
            a[...] = fill
    return a, f"values set to {fill}"


_BROKEN_NPY = {
    "a shape of 2**40 elements": _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }") + b"\0" * 16,
    "a negative shape": _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-5,), }") + b"\0" * 16,
    "an unknown dtype": _npy_header("{'descr': 'garbage', 'fortran_order': False, 'shape': (2,), }") + b"\0" * 8,
    "a header that is code": _npy_header("__import__('os').getcwd()") + b"\0" * 8,
    "a header that is not a dict": _npy_header("[1, 2, 3]"),
    "a wrong magic": b"\x93NUMPX\x01\x00" + b"\0" * 64,
    "version 9": _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", (9, 0)) + b"\0" * 8,
    "a truncated body": _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (64,), }") + b"\0" * 7,
    "a huge header length": b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{",
    "nothing": b"",
}


def mutate_npz(d: Draws, raw: bytes, marker: Path, steps: list[str]) -> bytes:
    """Damage an ``.npz``: arrays retyped, reshaped, renamed, dropped, added; members broken."""
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception:  # an earlier mutation already broke it
        return _flip_bytes(d, raw, 0, steps)
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):  # members other than .npy
        return _flip_bytes(d, raw, 0, steps)
    mode = d.integer(0, 9)
    if mode <= 6 and arrays:
        for _ in range(d.integer(1, 2)):
            key = d.choice(sorted(arrays))
            op = d.choice(["dtype", "dtype", "shape", "shape", "values", "delete", "rename", "add"])
            if op == "dtype":
                arrays[key], how = _retyped(d, arrays[key], marker)
            elif op == "shape":
                arrays[key], how = _reshaped(d, arrays[key])
            elif op == "values":
                arrays[key], how = _revalued(d, arrays[key])
            elif op == "delete":
                arrays.pop(key)
                how = "deleted"
            elif op == "rename":
                new = d.choice(_ODD_ARRAY_NAMES + [key + "_", key.upper()])
                arrays[new] = arrays.pop(key)
                how = f"renamed to {new!r}"
            else:
                new = d.choice(_ODD_ARRAY_NAMES)
                arrays[new] = np.zeros(d.choice([(), (3,), (1, 8), (0,)]), d.choice(["float32", "int64", "uint8"]))
                key, how = new, "added"
            steps.append(f"npz array {key!r}: {how}")
            if not arrays:
                break
        return _npz_bytes(arrays)
    if mode <= 8:
        members = [(f"{k}.npy", _npy_bytes(a)) for k, a in arrays.items()]
        name = d.choice(sorted(_BROKEN_NPY) + ["an object array (pickle)"])
        broken = _BROKEN_NPY.get(name) or _object_npy(marker)
        at = d.integer(0, len(members)) if members else 0
        if at < len(members):
            steps.append(f"npz member {members[at][0]!r} replaced by an npy with {name}")
            members[at] = (members[at][0], broken)
        else:
            steps.append(f"npz gained a member with {name}")
            members.append(("extra.npy", broken))
        return _zip_bytes(members)
    return _flip_bytes(d, raw, 0, steps)


# The central directory fields a damaged zip can lie about: (offset in the record, size, values)
_CENTRAL_FIELDS = {
    "flags (encrypted)": (8, 2, [1, 0x41, 0xFFFF]),
    "compression method": (10, 2, [1, 12, 14, 99, 0xFFFF]),
    "crc": (16, 4, [0, 0xDEADBEEF]),
    "compressed size": (20, 4, [0, 1, 0x7FFFFFFF, 0xFFFFFFFF]),
    "uncompressed size": (24, 4, [0, 1, 0x7FFFFFFF, 0xFFFFFFFF]),
    "local header offset": (42, 4, [0, 7, 0x7FFFFFFF, 0xFFFFFFFF]),
}


def _damage_zip(d: Draws, data: bytes, start: int, steps: list[str]) -> bytes:
    """Damage the zip in ``data[start:]`` (bytes before ``start`` are a library left intact)."""
    how = d.choice(["flip", "truncate", "append", "header", "header"])
    if how == "flip":
        return _flip_bytes(d, data, start, steps)
    if how == "truncate":
        cut = d.integer(0, max(0, len(data) - 1))
        steps.append(f"file truncated at {cut} of {len(data)} bytes")
        return data[:cut]
    if how == "append":
        steps.append("junk appended")
        return data + d.binary(64) + b"PK\x05\x06"
    records = [i for i in range(start, len(data) - 46) if data[i:i + 4] == b"PK\x01\x02"]
    if not records:
        return data
    at = d.choice(records)
    name, (offset, size, values) = d.choice(list(_CENTRAL_FIELDS.items()))
    value = d.choice(values)
    steps.append(f"zip central record at {at}: {name} set to {value:#x}")
    patched = bytearray(data)
    patched[at + offset: at + offset + size] = value.to_bytes(size, "little")
    return bytes(patched)


def mutate_container(d: Draws, env: Env, data: bytes, steps: list[str], library_size: int = 0) -> bytes:
    """Mutate the members of a csqc zip file (JSON and npz inside), then maybe the zip itself."""
    prefix, members = data[:library_size], _zip_members(data[library_size:])
    for _ in range(d.integer(0, 3)):
        op = d.choice(["json", "json", "json", "npz", "npz", "replace", "delete", "add", "rename"])
        jsons = [i for i, (n, _) in enumerate(members) if n.endswith(".json")]
        npzs = [i for i, (n, _) in enumerate(members) if n.endswith(".npz")]
        if op == "json" and jsons:
            i = d.choice(jsons)
            members[i] = (members[i][0], mutate_json(d, members[i][1], steps))
        elif op == "npz" and npzs:
            i = d.choice(npzs)
            members[i] = (members[i][0], mutate_npz(d, members[i][1], env.marker, steps))
        elif op == "replace" and members:
            i = d.integer(0, len(members) - 1)
            kind = d.choice(sorted(env.foreign))
            steps.append(f"member {members[i][0]!r} replaced by {kind}")
            members[i] = (members[i][0], env.foreign[kind])
        elif op == "delete" and members:
            i = d.integer(0, len(members) - 1)
            steps.append(f"member {members[i][0]!r} deleted")
            members.pop(i)
        elif op == "add":
            name = d.choice([n for n, _ in members] + ["data.pkl", "archive/data.pkl", "../evil", "/abs", "x.json", ""])
            kind = d.choice(sorted(env.foreign))
            steps.append(f"member {name!r} added holding {kind}")
            members.insert(d.integer(0, len(members)), (name, env.foreign[kind]))
        elif op == "rename" and members:
            i = d.integer(0, len(members) - 1)
            name = d.choice(["", "x", members[i][0].upper(), members[i][0] + ".bak", "data.pkl"])
            steps.append(f"member {members[i][0]!r} renamed {name!r}")
            members[i] = (name, members[i][1])
    compress = d.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    out = prefix + _zip_bytes(members, compress)
    if not steps or d.chance(1, 4):
        out = _damage_zip(d, out, len(prefix), steps)
    return out


# -- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    """One fuzz input and how it was made (the steps, in words, for the report)."""

    steps: list[str]
    data: bytes | None = None  # the file to load; None with kind "dir" or "missing"
    kind: str = "file"  # file | dir | missing
    name: str = ""  # the file name to write it under
    options: dict = field(default_factory=dict)  # model: model_factory and input_shape
    args: list[str] | None = None  # cli: the argument list
    files: dict[str, bytes] = field(default_factory=dict)  # cli: files the arguments name

    def write(self, folder: Path) -> Path:
        path = folder / self.name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if self.kind == "dir":
            path.mkdir()
        elif self.kind == "file":
            path.write_bytes(self.data or b"")
        return path


def _file_case(d: Draws, env: Env, target: str, seeds: list[bytes], library_size: int = 0) -> Case:
    steps: list[str] = []
    how = d.integer(0, 19)
    if how == 0:
        return Case([f"a folder passed as the {target} file"], kind="dir")
    if how == 1:
        return Case([f"a missing {target} file"], kind="missing")
    if how <= 4:
        kind = d.choice(sorted(env.foreign) + ["model", "ir", "artifact"])
        data = {"model": env.model, "ir": env.irs[-1], "artifact": env.artifact}.get(kind) or env.foreign.get(kind, b"")
        return Case([f"{kind} file passed as the {target} file"], data)
    seed = d.integer(0, len(seeds) - 1)
    data = mutate_container(d, env, seeds[seed], steps, library_size)
    return Case([f"seed {seed}"] + steps if len(seeds) > 1 else steps, data)


# -- targets -------------------------------------------------------------------------------------

def fuzz_ir(path: Path) -> str:
    """Load an IR file: success or ``CsqcError``; a loaded graph must print."""
    from .ir import load_graph

    try:
        graph = load_graph(path)
    except CsqcError:
        return "refused"
    graph.text()
    return "loaded"


def fuzz_model(path: Path, model_factory: str | None = None, input_shape=None) -> str:
    """Load a model file and use it the way inspect, compile and verify do."""
    import torch

    from .capture import capture
    from .modelfile import load
    from .passes import run_passes

    try:
        model = load(path, model_factory=model_factory, input_shape=input_shape)
    except CsqcError:
        return "refused"
    try:
        graph = capture(model)
        run_passes(graph, "default")
        inputs = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in model.input_specs]
        model(*inputs)
    except CsqcError:
        return "loaded, then refused"
    return "loaded"


def fuzz_artifact(path: Path) -> str:
    """Load an artifact and run it once, at full and at reduced precision."""
    from . import runtime

    try:
        model = runtime.load(path)
    except CsqcError:
        return "refused"
    inputs = [np.zeros(s["shape"], s["dtype"]) for s in model.inputs]
    try:
        model(*inputs)
        model(*inputs, skip_planes=1)
    except CsqcError:
        return "loaded, then refused"
    return "loaded"


class CliCrash(AssertionError):
    """The CLI answered with something other than a csqc error."""


def fuzz_cli(args: list[str], folder: Path) -> str:
    """Run ``csqc ARGS`` in ``folder``: exit code 0, 1 or 2, no traceback, no internal error."""
    from click.testing import CliRunner

    from .cli import cli

    with _working_folder(folder), _thread_settings_kept():
        result = CliRunner().invoke(cli, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception.with_traceback(result.exc_info[2])
    output = result.output
    if result.exit_code not in (0, 1, 2):
        raise CliCrash(f"exit code {result.exit_code}: {output[-500:]}")
    if "internal error" in output:
        raise CliCrash(output.strip().splitlines()[-1][:2000])
    if "Traceback" in output and "--debug" not in args:
        raise CliCrash(f"traceback printed: {output[-2000:]}")
    return f"exit {result.exit_code}"


@contextlib.contextmanager
def _thread_settings_kept():
    """bench sets torch's and TVM's thread counts for the process; later cases must not inherit them."""
    import torch

    threads, tvm_threads = torch.get_num_threads(), os.environ.get("TVM_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if tvm_threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = tvm_threads


@contextlib.contextmanager
def _working_folder(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


# -- the CLI's arguments -------------------------------------------------------------------------

# Files in the CLI's working folder. The fixed ones are written once; "damaged.*" anew per case.
_CLI_MODELS_BAD = ["graph.ir", "model.so", "notes.txt", "empty.bin", "folder", "missing.pt", "payload.pkl",
                   "checkpoint.pt", "evil-checkpoint.pt", "model.onnx", "evil.npy", "damaged.pt", "damaged.pt",
                   "damaged.pt", "", "-", "no-such-dir/model.pt"]
_CLI_ARTIFACTS_BAD = ["model.pt", "notes.txt", "folder", "missing.so", "damaged.so", "damaged.so", "damaged.so",
                      "model.onnx", "payload.pkl", "empty.bin", "graph.ir"]
_CLI_INPUTS = ["input.npy", "input.npz", "input-wide.npy", "input-text.npy", "input-nan.npy", "input-int.npy",
               "input-empty.npz", "input-3d.npy", "evil.npy", "evil.npz", "notes.txt", "folder", "missing.npy", "damaged.npz"]
_CLI_OUTPUTS = ["out.so", "out.onnx", "out.npy", "out.png", "out.pt", "folder", "no-such-dir/out", "notes.txt.d/x", ""]
_CLI_FOLDERS = ["dumps", "folder", "notes.txt", "no-such-dir/deeper", ""]
# numbers click accepts come three times as often as ones it refuses, so commands get past parsing
_INTS = ["0", "1", "-1", "2", "3", "64", "4096", "2147483648", "99999999999999999999", " 4"] * 3 + ["1e3", "abc", "", "0x10"]
_FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "3", "0.5"] * 3 + ["abc", ""]


def _int_at_least(text: str, low: int) -> bool:
    try:
        return int(text) >= low
    except ValueError:
        return False


def _float_in(text: str, low: float, high: float) -> bool:
    try:
        return low < float(text) <= high
    except ValueError:
        return False


# --model-factory imports and calls what it names: only these harmless names are ever tried
_FACTORIES = ["collections:OrderedDict", "torch.nn:Identity", "os.path:join", "math:pi", "nope", "no_such_module_x:f",
              "csqc:nope", ":", "torch.nn:Linear", "builtins:object", "csqc.fuzz:nope.deeper"]
_SHAPES = ["1,8", "1x8", "0,8", "-1,8", "a,b", "", "1,,8", "99999999999,8", "1,8,8,8", "2,8"]


def _write_cli_files(env: Env) -> None:
    """The fixed files the CLI target's arguments name."""
    folder = env.scratch
    fixed = {
        "model.pt": env.model, "graph.ir": env.irs[-1], "notes.txt": env.foreign["text"], "empty.bin": b"",
        "payload.pkl": env.foreign["pickle"], "checkpoint.pt": env.foreign["torch-checkpoint"],
        "evil-checkpoint.pt": env.foreign["torch-checkpoint-pickle"], "model.onnx": env.foreign["onnx"],
        "evil.npy": env.foreign["object-npy"],
        "evil.npz": _zip_bytes([("input0.npy", env.foreign["object-npy"])]),
        "input.npy": _npy_bytes(np.ones((1, 8), np.float32)),
        "input.npz": _npz_bytes({"input0": np.ones((4, 8), np.float32)}),
        "input-wide.npy": _npy_bytes(np.ones((1, 9), np.float32)),
        "input-text.npy": _npy_bytes(np.array([["a"] * 8])),
        "input-nan.npy": _npy_bytes(np.full((1, 8), np.nan, np.float32)),
        "input-int.npy": _npy_bytes(np.ones((1, 8), np.int64)),
        "input-empty.npz": _zip_bytes([]),
        "input-3d.npy": _npy_bytes(np.ones((1, 8, 1), np.float32)),
    }
    if env.artifact is not None:
        fixed["model.so"] = env.artifact
    for name, data in fixed.items():
        _replace_file(folder / name, data)
    (folder / "folder").mkdir(exist_ok=True)


def _damaged_file(d: Draws, env: Env, name: str, steps: list[str]) -> bytes:
    if name == "damaged.npz":
        inner: list[str] = []
        data = mutate_npz(d, _npz_bytes({"input0": np.ones((4, 8), np.float32)}), env.marker, inner)
    elif name == "damaged.so" and env.artifact is not None:
        case = _file_case(d, env, "artifact", [env.artifact], env.library_size)
        data, inner = case.data, case.steps
    else:
        case = _file_case(d, env, "model", [env.model])
        data, inner = case.data, case.steps
    steps.append(f"{name}: {'; '.join(inner) or 'unchanged'}")
    return data or b""


def _cli_case(d: Draws, env: Env) -> Case:
    steps: list[str] = []
    files: dict[str, bytes] = {}

    def model_arg() -> tuple[str, bool]:
        if d.chance(1, 2):
            return "model.pt", True
        return d.choice(_CLI_MODELS_BAD), False

    def opt(flag: str, values: list[str], valid: set[str] = frozenset()) -> tuple[list[str], bool]:
        value = d.choice(values)
        return [flag, value], value in valid

    command = d.choice(["inspect", "inspect", "compile", "compile", "verify", "verify", "run", "run", "bench", "train",
                        "demo", "garbage", "--version", "--help"])
    args: list[str] = [] if command in ("garbage", "--version", "--help") else [command]
    if command == "garbage":
        args = [d.choice(["nope", "", "-x", "--json", "compile2", "INSPECT"])] + [d.text(8) for _ in range(d.integer(0, 2))]
    elif command in ("--version", "--help"):
        args = [command]
    options: list[list[str]] = []
    positional: list[str] = []
    expensive = False
    if command in ("inspect", "compile", "verify", "bench"):
        model, model_ok = model_arg()
        positional.append(model)
        if d.chance(1, 8):
            factory_args = ["--model-factory", d.choice(_FACTORIES)]
            if d.chance(3, 4):
                factory_args += ["--input-shape", d.choice(_SHAPES)]
            options.append(factory_args)
            model_ok = False  # a factory model is imported (cheap), never valid enough to compile
        if command == "inspect":
            for flag, values in (("--batch", _INTS), ("--plot", _CLI_OUTPUTS)):
                if d.chance(1, 3):
                    options.append(opt(flag, values)[0])
            if d.chance(1, 3):
                options.append(["--dump-ir"])
        elif command == "compile":
            target = ["--target", d.choice(["llvm", "cuda", "onnx", "onnx", "tpu", ""])]
            options.append(target)
            compiles_slowly = target[1] in ("llvm", "cuda")
            for flag, values in (("-o", _CLI_OUTPUTS), ("--batch", _INTS), ("--mcpu", ["garbage", "", "generic", "native", " znver4", "-x"]),
                                 ("--arch", ["sm_80", "sm_0", "garbage", ""]), ("--emit-source", _CLI_FOLDERS),
                                 ("--kernel", ["auto", "bitserial", "bitparallel", "fast"]),
                                 ("--onnx-form", ["reference", "deploy", "x"]), ("--dataset", ["digits", "mnist"]),
                                 ("--calibration", _CLI_INPUTS), ("--dump-ir", _CLI_FOLDERS)):
                if d.chance(1, 5):
                    options.append(opt(flag, values)[0])
            if d.chance(1, 5):
                options.append(["--check-planes"])
            expensive = compiles_slowly and model_ok
        elif command == "verify":
            for flag, values in (("--artifact", ["model.so"] + _CLI_ARTIFACTS_BAD), ("--inputs", _CLI_INPUTS),
                                 ("--samples", _INTS), ("--dataset", ["digits", "x"]), ("--batch", _INTS),
                                 ("--atol", _FLOATS), ("--rtol", _FLOATS)):
                if d.chance(1, 4):
                    options.append(opt(flag, values)[0])
            if d.chance(1, 4):
                options.append(["--per-layer"])
        else:  # bench: only refusals are cheap
            artifact, _ = opt("--artifact", ["model.so"] + _CLI_ARTIFACTS_BAD)
            threads, _ = opt("--threads", _INTS)
            threads_ok = _int_at_least(threads[1], 1)
            options += [o for o in (artifact if d.chance(1, 2) else None, threads if d.chance(1, 2) else None) if o]
            for flag, values in (("--batch", _INTS), ("--rounds", _INTS), ("--dataset", ["digits", "x"])):
                if d.chance(1, 4):
                    options.append(opt(flag, values)[0])
            threads_given = any(o[0] == "--threads" for o in options)
            artifact_given = [o[1] for o in options if o[0] == "--artifact"]
            expensive = model_ok and (threads_ok or not threads_given) and (not artifact_given or artifact_given[-1] == "model.so")
        if expensive:  # every case must stay cheap: no real compiling or timing
            positional[0] = d.choice([m for m in _CLI_MODELS_BAD if m != "damaged.pt"])
            steps.append("valid model swapped for a bad one (the command would do minutes of work)")
    elif command == "run":
        positional.append("model.so" if d.chance(1, 2) else d.choice(_CLI_ARTIFACTS_BAD))
        if d.chance(7, 8):
            options.append([d.choice(["--input", "-i"]), d.choice(["input.npy", "input.npz"]) if d.chance(1, 2) else d.choice(_CLI_INPUTS)])
        for flag, values in (("-o", _CLI_OUTPUTS), ("--skip-planes", _INTS)):
            if d.chance(1, 3):
                options.append(opt(flag, values)[0])
    elif command == "train":
        recipe = d.choice(["digits-mlp", "digits-cnn", "digits", ""])
        positional.append(recipe)
        output, output_ok = opt(d.choice(["-o", "--output"]), _CLI_OUTPUTS, {"out.so", "out.onnx", "out.npy", "out.png", "out.pt"})
        epochs, _ = opt("--epochs", _INTS)
        bits, _ = opt("--target-bits", _FLOATS)
        epochs_ok, bits_ok = _int_at_least(epochs[1], 1), _float_in(bits[1], 0, 8)  # what train_recipe accepts
        options += [output] + [o for o, ok in ((epochs, epochs_ok), (bits, bits_ok)) if not ok or d.chance(1, 2)]
        if recipe.startswith("digits-") and output_ok and epochs_ok and bits_ok:
            output[1] = "folder"
            steps.append("output made a folder (training would take minutes)")
    elif command == "demo":
        recipe = opt("--recipe", ["digits-mlp", "digits-cnn", "x", ""])[0]
        out = ["--out", d.choice(["notes.txt", "model.pt/x", "empty.bin"])]  # never a usable folder: demo trains
        options += [recipe, out] if d.chance(1, 2) else [out, recipe]
    if command not in ("garbage", "--version", "--help"):
        if d.chance(1, 3):
            options.append(["--json"])
        if d.chance(1, 10):
            options.append([d.choice(["--nope", "--batch", "-o", "--json=1", "--", "-h"])])  # junk, or a flag missing its value
    options = d.permutation(options)
    middle = [token for o in options for token in o]
    cut = d.integer(0, len(middle))  # positional arguments anywhere among the options
    if args and args[0] == command:
        args = [command] + middle[:cut] + positional + middle[cut:]
    if d.chance(1, 12):
        args = ["--debug"] + args
    for name in sorted({"damaged.pt", "damaged.so", "damaged.npz"} & set(args)):
        files[name] = _damaged_file(d, env, name, steps)
    steps.append("csqc " + " ".join(repr(a) if not a or " " in a else a for a in args))
    return Case(steps, args=args, files=files)


# -- running -------------------------------------------------------------------------------------

@dataclass
class Finding:
    """A case that crashed: what was raised where, and a reproducer."""

    target: str
    error: str  # "ValueError: ..." (first line)
    where: str  # the innermost csqc frame, file:line
    trace: str
    case: Case
    count: int = 1
    saved: Path | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        # a CLI crash is raised by the fuzzer itself: what tells two apart is the CLI's message
        kind = self.error[:120] if self.error.startswith(CliCrash.__name__) else self.error.split(":")[0]
        return self.target, kind, self.where


@dataclass
class TargetReport:
    target: str
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    findings: dict[tuple, Finding] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Target:
    make: Callable[[Draws, Env], Case]
    check: Callable[[Case, Env], str]


def _check_ir(case: Case, env: Env) -> str:
    return fuzz_ir(case.write(env.scratch))


def _check_model(case: Case, env: Env) -> str:
    return fuzz_model(case.write(env.scratch), **case.options)


def _check_artifact(case: Case, env: Env) -> str:
    path = case.write(env.scratch)
    try:
        return fuzz_artifact(path)
    finally:
        if path.name != "fuzz.so" and path.is_file():  # a one-off name for a replaced library
            path.unlink()


def _replace_file(path: Path, data: bytes) -> None:
    # A new inode each time: a library that an earlier case loaded stays mapped, and rewriting
    # its bytes in place would crash the fuzzer itself, not csqc.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_cli(case: Case, env: Env) -> str:
    for name, data in case.files.items():
        _replace_file(env.scratch / name, data)
    return fuzz_cli(case.args or [], env.scratch)


def _make_ir(d: Draws, env: Env) -> Case:
    case = _file_case(d, env, "IR", env.irs)
    case.name = "fuzz.ir"
    return case


def _odd_weights(d: Draws, env: Env) -> Case:
    """A well-formed model file whose stored numbers are extreme: it loads, then capture and
    the passes meet NaN scales, out-of-range integer weights, infinite biases."""
    steps: list[str] = []
    members = _zip_members(env.model)
    for i, (name, data) in enumerate(members):
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            for _ in range(d.integer(1, 3)):
                key = d.choice(sorted(arrays))
                arrays[key], how = _revalued(d, arrays[key])
                steps.append(f"tensor {key!r}: {how}")
            members[i] = (name, _npz_bytes(arrays))
    return Case(steps, _zip_bytes(members, zipfile.ZIP_DEFLATED))


def _make_model(d: Draws, env: Env) -> Case:
    case = _odd_weights(d, env) if d.chance(1, 4) else _file_case(d, env, "model", [env.model])
    case.name = "fuzz.pt"
    if d.chance(1, 10):  # the reference-checkpoint path: torch.load(weights_only=True), then a factory
        case.options = {"model_factory": d.choice(["torch.nn:Identity", "collections:OrderedDict"]),
                        "input_shape": (1, 8)}
        if d.chance(1, 2):
            case.data = env.foreign[d.choice(["torch-checkpoint", "torch-checkpoint-pickle", "pickle", "torch-zip-pickle"])]
            case.kind = "file"
        case.steps.append(f"loaded with model_factory={case.options['model_factory']!r}")
    return case


def _make_artifact(d: Draws, env: Env) -> Case:
    case = _file_case(d, env, "artifact", [env.artifact], env.library_size)
    # The dynamic loader caches a library by path: a case keeps the seed's name unless its
    # library part differs, so replaced libraries are really loaded (and refused).
    same_library = case.data is not None and case.data[:env.library_size] == env.artifact[:env.library_size]
    if case.kind == "file" and case.data is not None and d.chance(1, 12):
        junk = d.choice([b"", b"#!/bin/sh\necho hi\n", b"\x7fELF"])
        case.data = junk + case.data[env.library_size:]
        case.steps.append(f"library part replaced by {junk[:10]!r}")
        same_library = False
    if case.kind == "file" and case.data is not None and d.chance(1, 2):
        case.data = _resealed(case.data, env.library_size, case.steps)
    case.name = "fuzz.so" if same_library or case.kind != "file" else f"fuzz-{env.next_id()}.so"
    return case


def _resealed(data: bytes, library_size: int, steps: list[str]) -> bytes:
    """``data`` with its digests recomputed, as an editor who knows the format would: the case then
    reaches the checks behind the digests (plan, weight sizes, buffers) instead of stopping at them."""
    from .artifact import INTEGRITY, PLAN, WEIGHTS

    try:
        members = [(n, b) for n, b in _zip_members(data[library_size:]) if n != INTEGRITY]
    except UNREADABLE_ARCHIVE:
        return data
    found = dict(members)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    integrity = {"format": "csqc-artifact", "version": 2, "library_bytes": library_size,
                 "sha256": {"library": sha(data[:library_size]), PLAN: sha(found.get(PLAN, b"")),
                            WEIGHTS: sha(found.get(WEIGHTS, b""))}}
    steps.append("digests recomputed")
    return data[:library_size] + _zip_bytes(members + [(INTEGRITY, json.dumps(integrity).encode())])


# -- the program torch evaluates: guards, symbolic sizes, op targets, treespecs ------------------

def _code(marker: Path) -> str:
    """Python that leaves the marker file behind if anything evaluates it."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _walk_dicts(doc, key: str):
    """Every dict in ``doc`` that holds ``key`` (depth first, in order)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _size_exprs(d: Draws, marker: Path) -> str:
    symbol = f"Symbol('s{d.integer(0, 99)}', positive=True, integer=True)"
    return d.choice([
        _code(marker), f"{_code(marker)} or 2", f"Symbol({_code(marker)!r}, positive=True, integer=True)",
        symbol, f"Mul(Integer({d.integer(-3, 64)}), {symbol})", f"Max(Integer(2), {symbol})",
        f"Add({symbol}, Integer(1))", f"  {symbol}  ", symbol.replace("positive=True, ", ""),
        f"{symbol}.func", "Mul(" * 50 + symbol + ")" * 50, f"Lambda(x, {_code(marker)})", "s1 + 1",
        f"Symbol('s1', positive=True, integer=True, commutative={_code(marker)})", "Integer(1e3)", "", "Integer(",
    ])


def _mutate_guards(d: Draws, doc: dict, marker: Path) -> str:
    value = d.choice([[f"{_code(marker)} is None"], [_code(marker)], ["L['x'].size()[0] == 2"], [""], "x", None, [1]])
    doc["guards_code"] = value
    return f"guards_code set to {str(value)[:60]!r}"


def _mutate_expr(d: Draws, doc: dict, marker: Path) -> str:
    holders = list(_walk_dicts(doc, "expr_str"))
    if not holders:
        return "no expr_str to mutate"
    holder = d.choice(holders) if d.chance(1, 2) else None
    text = _size_exprs(d, marker)
    for h in [holder] if holder else holders:
        h["expr_str"] = text
    return f"{'one' if holder else 'every'} expr_str set to {text[:60]!r}"


def _mutate_range(d: Draws, doc: dict, marker: Path) -> str:
    key = d.choice([_code(marker), "s1", "u0", "f0", "s77", "", "x y"])
    value = d.choice([{"min_val": 2, "max_val": None}, {"min_val": "x", "max_val": 1}, {"min_val": _code(marker)},
                      {"min_val": 10**30}, {"evil": 1}, None, [], {"min_val": 1.5}])
    doc["range_constraints"] = {key: value} if d.chance(1, 2) else {**doc.get("range_constraints", {}), key: value}
    return f"range constraint {key[:40]!r}: {str(value)[:40]}"


_TARGETS = ["torch.os.system", "torch.load", "torch.save", "builtins.eval", "math.sqrt", "_operator.getitem",
            "torch.ops.aten.from_file.default", "torch.ops.aten.sin.default", "torch.ops.aten.relu",
            "#evil:op", "", "torch.ops.csqc.act_quant.default", "torch.ops.csqc.quant_linear.default",
            "torch.ops.aten.relu.default", "torch._C._get_tracing_state", "_operator.mul", "torch.ops.higher_order.cond"]


def _mutate_target(d: Draws, doc: dict, marker: Path) -> str:
    nodes = doc["graph_module"]["graph"]["nodes"]
    node = d.choice(nodes)
    node["target"] = d.choice(_TARGETS)
    return f"node {node.get('name')!r} target set to {node['target']!r}"


def _odd_argument(d: Draws, marker: Path):
    return d.choice([
        {"as_operator": "torch.os.system"}, {"as_graph": {"name": "g", "graph": {}}}, {"as_custom_obj": {"name": "x"}},
        {"as_string": _code(marker)}, {"as_sym_float": {"as_name": "x"}}, {"as_complex": {"real": 1, "imag": 0}},
        {"as_sym_int": {"as_expr": _code(marker)}}, {"as_int": 2**70}, {"as_none": True}, {"as_tensor": {"name": "nope"}},
        {"as_tensor": {"name": "\u00e9"}}, {"as_int": 1, "as_float": 1.0}, {}, {"as_float": "NaN"}, {"as_scalar_type": 99},
    ])


def _mutate_node(d: Draws, doc: dict, marker: Path) -> str:
    node = d.choice(doc["graph_module"]["graph"]["nodes"])
    what = d.choice(["argument", "kind", "metadata", "field"])
    if what == "argument" and node.get("inputs"):
        slot = d.choice(node["inputs"])
        slot["arg"] = _odd_argument(d, marker)
        return f"node {node.get('name')!r} argument {slot.get('name')!r} set to {str(slot['arg'])[:50]}"
    if what == "kind" and node.get("inputs"):
        slot = d.choice(node["inputs"])
        slot["kind"] = d.choice([0, 3, "x", None, 2])
        return f"node {node.get('name')!r} argument kind set to {slot['kind']!r}"
    if what == "metadata":
        key = d.choice(["source_fn_stack", "custom", "from_node", "nn_module_stack", "torch_fn", "stack_trace", "evil"])
        value = d.choice([f"x,{'torch.os.system'}", json.dumps({"a": 1}), json.dumps([{"pass_name": "x"}]),
                          "L__self__,,collections.defaultdict", "a;b;c", _code(marker), "\u00e9,\u00e9,x"])
        node.setdefault("metadata", {})[key] = value
        return f"node {node.get('name')!r} metadata {key!r} set to {value[:40]!r}"
    node[d.choice(["evil", "op", "is_hop_single_tensor_return"])] = d.choice([1, True, "call_module"])
    return f"node {node.get('name')!r} gained a field"


def _treespec(d: Draws, marker: Path) -> str:
    node = d.choice([
        {"type": "collections.defaultdict", "context": json.dumps({"default_factory_module": "antigravity",
                                                                   "default_factory_name": "x", "dict_context": []}),
         "children_spec": []},
        {"type": "builtins.dict", "context": json.dumps([{"__enum__": True, "fqn": "antigravity:x", "name": "y"}]),
         "children_spec": []},
        {"type": "collections.namedtuple", "context": "x", "children_spec": []},
        {"type": "builtins.tuple", "context": "null", "children_spec": []},
        {"type": "builtins.dict", "context": json.dumps(["\u00e9"]), "children_spec": []},
        {"type": None, "context": None, "children_spec": []},
    ])
    return d.choice([json.dumps([1, node]), "not json", json.dumps([2, node]), json.dumps(node), "[" * 5000])


def _mutate_signature(d: Draws, doc: dict, marker: Path) -> str:
    entries = [e for e in doc["graph_module"]["module_call_graph"] if e.get("signature")]
    if not entries:
        return "no signature"
    field_name = d.choice(["in_spec", "out_spec"])
    entries[0]["signature"][field_name] = _treespec(d, marker)
    return f"{field_name} set to {entries[0]['signature'][field_name][:60]!r}"


def _mutate_top(d: Draws, doc: dict, marker: Path) -> str:
    gm = doc["graph_module"]
    choice = d.integer(0, 7)
    if choice == 0:
        doc["verifiers"] = d.choice([["EVIL"], [_code(marker)], "TRAINING", ["ATEN"]])
    elif choice == 1:
        gm["graph"]["custom_obj_values"] = {"x": {"class_fqn": "torch.os"}}
    elif choice == 2:
        gm["treespec_namedtuple_fields"] = {"x": {"field_names": ["a"]}}
    elif choice == 3:
        gm["metadata"] = {"custom": json.dumps({"a": 1})}
    elif choice == 4:
        next(iter(gm["graph"]["tensor_values"].values()))["device"] = d.choice([{"type": "cuda", "index": 0}, {"type": "meta"}])
    elif choice == 5:
        doc[d.choice(["evil", "graph_module"])] = d.choice([1, None, {}])
    elif choice == 6:
        doc["schema_version"] = d.choice([{"major": 99, "minor": 0}, {"major": "8"}, None])
    else:
        spec = d.choice(gm["signature"]["input_specs"])
        spec.clear()
        spec.update(d.choice([{"custom_obj": {"arg": {"name": "x"}, "custom_obj_name": "y"}},
                              {"constant_input": {"name": "x", "value": {"as_int": 1}}}, {"token": {"arg": {"name": "t"}}}]))
    return f"top-level mutation {choice}"


_PROGRAM_MUTATORS = [_mutate_guards, _mutate_expr, _mutate_expr, _mutate_range, _mutate_target, _mutate_node,
                     _mutate_node, _mutate_signature, _mutate_top]


def _mutate_npz_sizes(d: Draws, raw: bytes, marker: Path, steps: list[str]) -> bytes:
    """Lie about sizes and names: grown .npy headers, duplicate members, bombs, long double."""
    members = _zip_members(raw)
    how = d.integer(0, 5)
    i = d.integer(0, len(members) - 1)
    name, data = members[i]
    if how == 0:
        members.append(members[i])
        steps.append(f"npz member {name!r} duplicated")
    elif how == 1:
        grown = data.replace(b"'shape': (", b"'shape': (1000000, ", 1)
        members[i] = (name, grown)
        steps.append(f"npz member {name!r} header claims a million times more")
    elif how == 2:
        members.append((d.choice(["state_dict/junk.npy", name]), bytes(d.choice([100, 4 << 20]))))
        steps.append("npz gained a member of zeros")
        return _zip_bytes(members, zipfile.ZIP_DEFLATED)
    elif how == 3:
        members[i] = (name, _npy_bytes(np.zeros(3, np.longdouble)))
        steps.append(f"npz member {name!r} is long double")
    elif how == 4:
        members[i] = (name.replace(".npy", "\u00e9.npy"), data)
        steps.append(f"npz member {name!r} renamed with a non-ASCII letter")
    else:
        members[i] = (name, data[:-1])
        steps.append(f"npz member {name!r} one byte short")
    return _zip_bytes(members)


def _make_program(d: Draws, env: Env) -> Case:
    """A model file whose program JSON or tensor archive was edited where torch evaluates or allocates."""
    steps: list[str] = []
    members = _zip_members(env.model)
    for _ in range(d.integer(1, 3)):
        if d.chance(3, 4):
            i = next(i for i, (n, _) in enumerate(members) if n == "program.json")
            doc = json.loads(members[i][1])
            mutate = d.choice(_PROGRAM_MUTATORS)
            try:
                steps.append(mutate(d, doc, env.marker))
            except (TypeError, KeyError, AttributeError, IndexError, StopIteration):  # an earlier step broke the layout
                steps.append(f"{mutate.__name__} skipped: the program's layout is already broken")
            members[i] = (members[i][0], json.dumps(doc).encode())
        else:
            i = next(i for i, (n, _) in enumerate(members) if n == "tensors.npz")
            members[i] = (members[i][0], _mutate_npz_sizes(d, members[i][1], env.marker, steps))
    if d.chance(1, 10):
        members.append(d.choice(members))
        steps.append(f"model member {members[-1][0]!r} duplicated")
    if d.chance(1, 20):
        members = [(n, bytes(16 << 20) if n == "tensors.npz" else b) for n, b in members]
        steps.append("tensors.npz replaced by 16 MiB of zeros")
    return Case(steps, _zip_bytes(members, zipfile.ZIP_DEFLATED), name="fuzz.pt")


def fuzz_program(path: Path) -> str:
    """Load a model file (success or ``BadInput``, nothing else), then run it once in PyTorch."""
    from .errors import BadInput
    from .modelfile import load

    try:
        model = load(path)
    except BadInput:
        return "refused"
    model(*model.example_inputs)
    return "loaded"


def _check_program(case: Case, env: Env) -> str:
    return fuzz_program(case.write(env.scratch))


TARGETS: dict[str, _Target] = {
    "ir": _Target(_make_ir, _check_ir),
    "model": _Target(_make_model, _check_model),
    "program": _Target(_make_program, _check_program),
    "artifact": _Target(_make_artifact, _check_artifact),
    "cli": _Target(_cli_case, _check_cli),
}


def _innermost_csqc_frame(tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if "csqc" in f.filename or "/passes/" in f.filename or "/targets/" in f.filename]
    frames = [f for f in frames if not f.filename.endswith("fuzz.py")] or traceback.extract_tb(tb)[-1:]
    f = frames[-1] if frames else None
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})" if f else "?"


def _check_case(name: str, case: Case, env: Env) -> tuple[str, Finding | None]:
    target = TARGETS[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = target.check(case, env)
    except Exception as e:  # noqa: BLE001 - every other exception is what fuzzing looks for
        first = (str(e).strip().splitlines() or [""])[0][:300]
        finding = Finding(name, f"{type(e).__name__}: {first}", _innermost_csqc_frame(e.__traceback__),
                          "".join(traceback.format_exception(type(e), e, e.__traceback__)), case)
        return "crashed", finding
    if env.marker.exists():
        env.marker.unlink()
        return "crashed", Finding(name, "RanCode: a loader unpickled or evaluated the marker payload", "?", "", case)
    return outcome, None


def run_target(name: str, cases: int, env: Env, *, seed: int = 0, findings_dir: Path | None = None,
               on_case: Callable[[str, Case], None] | None = None) -> TargetReport:
    """Run ``cases`` hypothesis-drawn cases against target ``name``; findings never stop the run."""
    _require_hypothesis()
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hypothesis_seed

    if name == "artifact" and env.artifact is None:
        raise ValueError("this Env was built with artifact=False: it has no artifact to fuzz")
    if name == "cli":
        _write_cli_files(env)
        logging.getLogger().addHandler(logging.NullHandler())  # the CLI's basicConfig would bind a runner's stderr
    report = TargetReport(name)
    target = TARGETS[name]
    start = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.data())
    def one_case(data):
        case = target.make(Draws(data), env)
        if on_case:
            on_case(name, case)
        outcome, finding = _check_case(name, case, env)
        report.cases += 1
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
        if finding is not None:
            known = report.findings.get(finding.key)
            if known is not None:
                known.count += 1
            else:
                report.findings[finding.key] = finding
                if findings_dir is not None:
                    finding.saved = save_case(finding, findings_dir / f"{name}-{len(report.findings)}", env)

    one_case()
    report.seconds = time.perf_counter() - start
    return report


def save_case(finding: Finding, folder: Path, env: Env, with_scratch: bool = True) -> Path:
    """Write a finding's input so ``python -m csqc.fuzz --replay FOLDER`` runs it again."""
    folder.mkdir(parents=True, exist_ok=True)
    case = finding.case
    meta = {"target": finding.target, "steps": case.steps, "kind": case.kind, "name": case.name,
            "options": case.options, "args": case.args, "error": finding.error, "where": finding.where}
    if case.data is not None:
        (folder / "input.bin").write_bytes(case.data)
    if case.args is not None:  # the CLI's working folder, as the case saw it
        files = folder / "files"
        if with_scratch:
            shutil.copytree(env.scratch, files, dirs_exist_ok=True)
        files.mkdir(exist_ok=True)
        for name, data in case.files.items():
            (files / name).write_bytes(data)
    (folder / "case.json").write_text(json.dumps(meta, indent=1, default=str))
    (folder / "traceback.txt").write_text(finding.trace)
    return folder


def replay(folder: str | os.PathLike) -> int:
    """Run a saved case again and print what it raises (0: no crash now, 1: still crashes)."""
    folder = Path(folder)
    meta = json.loads((folder / "case.json").read_text())
    data = (folder / "input.bin").read_bytes() if (folder / "input.bin").exists() else None
    options = meta.get("options") or {}
    if "input_shape" in options:
        options["input_shape"] = tuple(options["input_shape"])
    case = Case(meta["steps"], data, meta["kind"], meta["name"] or "fuzz.bin", options, meta.get("args"))
    with tempfile.TemporaryDirectory(prefix="csqc-replay-") as tmp:
        scratch = Path(tmp)
        if case.args is not None:
            shutil.copytree(folder / "files", scratch, dirs_exist_ok=True)
        env = Env(scratch, b"", [], None, 0, {}, scratch / "PICKLE-RAN-CODE", scratch)
        print("\n".join(case.steps))
        outcome, finding = _check_case(meta["target"], case, env)
    if finding is None:
        print(f"no crash: {outcome}")
        return 0
    print(finding.trace or finding.error)
    return 1


def _summary(reports: list[TargetReport], seconds: float, seed: int) -> str:
    lines = [f"csqc fuzz: seed {seed}, {sum(r.cases for r in reports)} cases in {seconds:.1f} s"]
    for r in reports:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()))
        lines.append(f"  {r.target:9s} {r.cases:6d} cases  {len(r.findings):3d} findings  {r.seconds:7.1f} s  ({outcomes})")
    findings = [f for r in reports for f in r.findings.values()]
    if findings:
        lines.append(f"{len(findings)} distinct finding(s):")
    for f in findings:
        lines.append(f"  [{f.target}] {f.error}  at {f.where}  ({f.count} case(s))")
        lines.append(f"      made by: {'; '.join(f.case.steps)[:400]}")
        if f.saved:
            lines.append(f"      replay:  python -m csqc.fuzz --replay {f.saved}")
    if not findings:
        lines.append("no findings: every case succeeded or raised a CsqcError")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csqc.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases in all, split evenly between the targets")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--findings", default="csqc-fuzz-findings", help="folder for reproducers of findings")
    parser.add_argument("--work", help="folder for seeds and scratch files (default: a temporary one, removed)")
    parser.add_argument("--replay", metavar="FOLDER", help="run one saved finding again")
    opts = parser.parse_args(argv)
    _require_hypothesis()
    if opts.replay:
        return replay(opts.replay)
    if opts.cases < 1:
        parser.error("--cases must be at least 1")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.ERROR)
    names = list(TARGETS) if opts.target == "all" else [opts.target]
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="csqc-fuzz-"))
    findings_dir = Path(opts.findings).resolve()
    # the case in flight is written here first: if the process dies (a native crash), it is the culprit
    in_flight = findings_dir / "in-flight"

    def remember(name: str, case: Case) -> None:
        save_case(Finding(name, "in flight", "", "", case), in_flight, env, with_scratch=False)

    start = time.perf_counter()
    try:
        print(f"building seed files in {work} ...", file=sys.stderr)
        env = build_env(work, artifact="artifact" in names or "cli" in names)
        reports = []
        for i, name in enumerate(names):
            share = opts.cases // len(names) + (1 if i < opts.cases % len(names) else 0)
            print(f"fuzzing {name}: {share} cases", file=sys.stderr)
            reports.append(run_target(name, share, env, seed=opts.seed, findings_dir=findings_dir,
                                      on_case=remember if name in ("artifact", "cli") else None))
        shutil.rmtree(in_flight, ignore_errors=True)
        if findings_dir.is_dir() and not any(findings_dir.iterdir()):
            findings_dir.rmdir()
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    print(_summary(reports, time.perf_counter() - start, opts.seed))
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
