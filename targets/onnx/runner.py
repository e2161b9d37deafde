"""ONNX Runtime helpers: exact sessions, intermediate outputs, atomic saving.

Exact runs use ``ORT_DISABLE_ALL``: at higher levels ORT folds constant ``Mul`` into ``Conv``
(1 ulp) and fuses ``DequantizeLinear -> MatMul`` into a lower-accuracy ``MatMulNBits``
(shared/notes/onnx-ort.md). Intermediates are exposed by adding them to the graph outputs,
which also keeps ORT from fusing across them.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from csqc.errors import BadInput
from csqc.outputs import atomic_write

__all__ = ["make_session", "run", "run_with_intermediates", "with_outputs", "save_onnx", "load_onnx", "input_names"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(model: onnx.ModelProto | str | os.PathLike, *, exact: bool = True,
                 intra_op_num_threads: int | None = None, optimization: str | None = None) -> ort.InferenceSession:
    """A CPU ``InferenceSession``; ``exact`` turns every graph optimization off.

    ``optimization`` (disable/basic/extended/all) overrides ``exact``; ``intra_op_num_threads``
    defaults to ORT's own choice.
    """
    so = ort.SessionOptions()
    level = optimization or ("disable" if exact else "all")
    if level not in _LEVELS:
        raise BadInput(f"unknown ORT optimization level {level!r}; choose one of {', '.join(_LEVELS)}")
    so.graph_optimization_level = _LEVELS[level]
    if level != "disable":
        # never let ORT swap a QDQ MatMul for MatMulNBits at accuracy level 4 (about 1% error)
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if intra_op_num_threads:
        so.intra_op_num_threads = int(intra_op_num_threads)
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def input_names(model: onnx.ModelProto) -> list[str]:
    init = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in init]


_ORT_INTEGER_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}  # token ids


def _feeds(session: ort.InferenceSession, feeds) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    dtypes = {i.name: _ORT_INTEGER_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
    if isinstance(feeds, Mapping):
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, np.float32)) for k, v in feeds.items()}
    feeds = list(feeds)
    if len(feeds) != len(names):
        raise BadInput(f"ONNX model takes {len(names)} input(s), got {len(feeds)}")
    return {n: np.ascontiguousarray(x, dtype=dtypes[n]) for n, x in zip(names, feeds)}


def run(model: onnx.ModelProto | ort.InferenceSession, feeds, **session_kw) -> list[np.ndarray]:
    """Run ``model`` (or a ready session) on ``feeds`` (a list or a dict by input name)."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model, **session_kw)
    return session.run(None, _feeds(session, feeds))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names`` (typed by inference)."""
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    produced = {o for node in model.graph.node for o in node.output} | {t.name for t in model.graph.initializer}
    missing = [n for n in wanted if n not in produced]
    if missing:
        raise BadInput(f"the ONNX model has no tensor(s) {', '.join(missing[:5])}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in wanted:
        if n in types:
            out.graph.output.append(types[n])
        else:
            out.graph.output.append(onnx.ValueInfoProto(name=n))
    return out


def run_with_intermediates(model: onnx.ModelProto, feeds, names: Sequence[str], *,
                           session: ort.InferenceSession | None = None, **session_kw):
    """Run ``model`` and return ``(outputs, {name: array})`` for the intermediate ``names``.

    Pass ``session`` (made from ``with_outputs(model, names)``) to reuse one across calls.
    """
    n_out = len(model.graph.output)
    extra = with_outputs(model, names)
    session = session or make_session(extra, **session_kw)
    values = session.run(None, _feeds(session, feeds))
    out_names = [o.name for o in session.get_outputs()]
    by_name = dict(zip(out_names, values))
    return values[:n_out], {n: by_name[n] for n in names}


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file renamed over the target)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())

    atomic_write(path, write)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file; anything unreadable is ``BadInput``. An ONNX file is data: csqc writes
    self-contained ones, so tensors kept in other files (``external_data``, which onnx would read
    from the file's folder) are refused, not followed."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except Exception as e:  # protobuf raises DecodeError and friends
        raise BadInput(f"{path}: not an ONNX model ({type(e).__name__})") from None
    from onnx.external_data_helper import uses_external_data

    try:
        from onnx.external_data_helper import _get_all_tensors as all_tensors
    except ImportError:  # (a private helper; without it, the main graph's tensors)
        def all_tensors(m):
            return list(m.graph.initializer)
    external = [t.name for t in all_tensors(model) if uses_external_data(t)]
    if external:
        raise BadInput(f"{path}: tensor {external[0]!r} is stored in another file (ONNX external data); csqc "
                       "reads only self-contained ONNX files, as it writes them")
    return model
