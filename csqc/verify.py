"""``csqc verify``: run one model in every runtime on identical batches and compare them.

Runtimes (``RUNTIMES``, extensible): the PyTorch reference (``model(x)``), the IR interpreter
on the ``integer`` and on the fully optimized ``default`` pipeline, ONNX Runtime on the
reference ONNX model, and an artifact (``ARTIFACT_RUNNERS``, keyed by file suffix; ``.onnx``
files run in ONNX Runtime; a ``.so`` built for aarch64, as its plan records, runs under
qemu-user on other machines). Dynamic activation scales depend on the whole batch, so every
runtime sees the same batches.

Two kinds of checks:

* **outputs**, pair by pair along the compilation chain (PyTorch -> interpreter(integer) ->
  interpreter(default) / ONNX Runtime -> artifact): max abs / rel error, ``atol``/``rtol``,
  top-1 agreement, accuracy on a labelled data set;
* **integer tensors**, layer by layer, exactly. A runtime that exposes a layer's tensors
  (``<layer>.in``, ``.xq``, ``.scale``, ``.acc``, ``.out``) is checked against the golden model
  fed with *its own* inputs: its codes must equal the interpreter's quantization of its float
  input, its accumulator the interpreter's integer product of its codes, its output the
  interpreter's epilogue. This stays exact even where float differences upstream (a
  convolution summed in another order) flip one activation code across a rounding tie; where
  the runtime's codes equal the golden run's, the accumulators are therefore equal to the
  interpreter's bit for bit. A layer with fused output quantization (``fuse_requant``) keeps
  no float output, so the codes its readers get are compared with the golden run's: exactly
  where the layer's own codes and accumulator matched, else to within one step (its float
  output, from a float-input layer, may round differently). ``first_divergence`` names the
  first layer (graph order) and tensor where a runtime departs from the golden model.

An output pair that both follow the IR's float order must agree within the tolerance, with one
exception, stated in the report's notes: when a runtime's codes left the golden run (a float
layer upstream rounded differently and a code flipped on a tie) while every one of its layers
stayed exact on its own inputs, the dynamic scales carry the flip to the outputs. The pair is
then judged on the golden graph run with that runtime's codes (``csqc.forced_codes``): every
code a tie's neighbour of the interpreter's own value, the outputs within the tolerance (where
the codes cannot be paired up, on top-1 agreement and a coarse error). The PyTorch pair that
misses its bounds is judged the same way, PyTorch run with the golden run's codes.
"""
from __future__ import annotations

import logging
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .calibration import Calibration, apply_calibration, artifact_calibration, scale_differences
from .errors import BadInput, CsqcError
from .forced_codes import ForcedInterpreter, ForcedRun
from .interpreter import HANDLERS, QValue, run as interpret
from .ir import Graph
from .modelfile import CsqcModel
from .provenance import check_artifact_model

__all__ = [
    "verify", "VerifyReport", "PairReport", "Runtime", "RunResult", "RUNTIMES", "DEFAULT_RUNTIMES",
    "ARTIFACT_RUNNERS", "register_artifact_runner", "tvm_artifact_runtime", "load_inputs", "LAYER_TENSORS", "MAX_RANDOM_SAMPLES",
    "random_inputs", "load_artifact_inputs",
]

log = logging.getLogger(__name__)

LAYER_TENSORS = ("in", "xq", "scale", "acc", "out")  # stable per-layer names: <layer>.<tensor>
ZERO_POINT = "zero_point"  # <layer>.zero_point: an asymmetric quantizer's, where a runtime exposes it
GOLDEN = "interpreter:integer"
# random inputs past this add minutes, not evidence (a batch of 1 runs every runtime per sample)
MAX_RANDOM_SAMPLES = 10_000


# -- runtimes ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    outputs: list[np.ndarray]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # '<layer>.acc' etc., acc scaled back
    record: Mapping | None = None  # an interpreter's every value by name (interpreter.run's record)


@dataclass
class Runtime:
    """A way to run the model on one batch. ``batch`` None: any batch size.

    ``exact`` promises the IR's float operation order in quantized-layer epilogues, so their
    ``.out`` tensors are compared bit for bit (otherwise within the float tolerance).
    ``deploy`` promises only what a deploy-form ONNX model promises: PyTorch's top-1 and accuracy.
    """

    name: str
    run: Callable[[list[np.ndarray]], RunResult]
    batch: int | None = None
    exact: bool = True
    deploy: bool = False  # a deploy-form model (static scales): judged against PyTorch, see verify
    device: dict | None = None  # where it runs, when not in this process (csqc.remote.describe_device)
    close: Callable[[], None] | None = None  # releases what it holds (a remote session)


class _Context:
    """The model plus graphs captured per batch size and pipeline (built once, on demand)."""

    def __init__(self, model: CsqcModel, intra_op_num_threads: int | None, calibration: list | None = None,
                 stored: Calibration | None = None, where: str = ""):
        self.model = model
        self.threads = intra_op_num_threads
        self.calibration = calibration  # arrays: every graph gets the static scales measured on them
        self.scales: dict[str, float] | None = None
        # the artifact's recorded calibration (at ``where``): every graph gets exactly these scales;
        # with ``calibration`` too, the scales measured there are only compared with them
        self.stored, self.where = stored, where
        self.differences: list[str] | None = None
        self._captured: dict[int, Graph] = {}
        self._graphs: dict[tuple[str, int], Graph] = {}

    def _capture(self, batch: int) -> Graph:
        """The captured graph; calibrated, the scales measured once (at the first batch size
        asked for, the compiled artifact's) serve every batch size."""
        from .capture import capture
        from .passes.calibrate_scales import apply_scales, measure_scales

        g = capture(self.model, batch=batch)
        if self.stored is not None:
            if self.calibration is not None and self.differences is None:
                self.differences = scale_differences(self.stored, measure_scales(g, self.calibration))
            return apply_calibration(g, self.stored, self.where)
        if self.calibration is None:
            return g
        if self.scales is None:
            self.scales = measure_scales(g, self.calibration)
        return apply_scales(g, self.scales).graph

    def graph(self, pipeline: str, batch: int) -> Graph:
        from .passes import run_passes

        if (pipeline, batch) not in self._graphs:
            if batch not in self._captured:
                self._captured[batch] = self._capture(batch)
            self._graphs[(pipeline, batch)] = run_passes(self._captured[batch], pipeline)[0]
        return self._graphs[(pipeline, batch)]


def _layer_inputs(g: Graph) -> dict[str, tuple[str | None, str | None]]:
    """Layer -> (float value it quantizes or reads, node whose codes it reads or None); a layer
    reading a fused layer's codes (``QuantSpec.out_bits``) has no float input."""
    producers = g.producers()
    out = {}
    for n in g.quant_layers():
        src = producers.get(n.inputs[0])
        if src is not None and src.op == "quantize":
            out[n.name] = (src.inputs[0], src.name)
        elif src is not None and src.type.quantized:
            out[n.name] = (None, src.name)
        else:
            out[n.name] = (n.inputs[0], None)
    return out


def interpreter_tensors(g: Graph, record: Mapping, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stable per-layer tensors of an interpreter run (``record`` from ``interpreter.run``)."""
    values = {**g.params, **record, **inputs}  # (a quantizer may read a constant: an RNN's zero state)
    tensors = {}
    for layer, (src, quant) in _layer_inputs(g).items():
        if src is not None:
            tensors[f"{layer}.in"] = values[src]
        if not isinstance(values[layer], QValue):  # a fused layer's codes are its readers' xq
            tensors[f"{layer}.out"] = values[layer]
        if quant is not None:
            tensors[f"{layer}.xq"] = values[quant].centered()  # asymmetric: u - zp, what the layer multiplies
            tensors[f"{layer}.scale"] = np.float32(values[f"{quant}.scale"])
            tensors[f"{layer}.acc"] = values[f"{layer}.acc"]
            if values[quant].asymmetric:  # (csqc.forced_codes: the codes u = xq + zero_point)
                tensors[f"{layer}.{ZERO_POINT}"] = np.int32(values[quant].zero_point)
    return tensors


def _interpreter_runtime(pipeline: str):
    def factory(ctx: _Context, batch: int) -> Runtime:
        g = ctx.graph(pipeline, batch)

        def run(inputs):
            record: dict = {}
            outputs = interpret(g, inputs, record=record)
            named = {v.name: np.asarray(x, np.float32) for v, x in zip(g.inputs, inputs)}
            return RunResult(outputs, interpreter_tensors(g, record, named), record)

        return Runtime(f"interpreter:{pipeline}", run, batch)

    return factory


def _pytorch_runtime(ctx: _Context, batch: int) -> Runtime:
    import torch

    def run(inputs):
        out = ctx.model(*[torch.from_numpy(_as_input(x)) for x in inputs])
        outs = out if isinstance(out, (list, tuple)) else [out]
        return RunResult([o.detach().numpy() for o in outs])

    return Runtime("pytorch", run, None, exact=False)


def onnx_model_runtime(name: str, model, *, threads: int | None = None, batch: int | None = None) -> Runtime:
    """A runtime for an ONNX model; csqc models expose their per-layer tensors (metadata)."""
    from csqc.targets.onnx.reference import layer_table
    from csqc.targets.onnx.runner import make_session, with_outputs

    table = layer_table(model)
    graph_inputs = {i.name for i in model.graph.input}
    wanted: list[tuple[str, str, int]] = []  # (ONNX tensor, stable key, acc shift)
    for row in table:
        for key in LAYER_TENSORS:
            tensor = row.get("input" if key == "in" else key)
            if tensor:
                wanted.append((tensor, f"{row['name']}.{key}", row.get("acc_shift", 0) if key == "acc" else 0))
    produced = {o for node in model.graph.node for o in node.output} | {t.name for t in model.graph.initializer}
    for row in table:  # an asymmetric quantizer's zero point (emit_reference names it so)
        if row.get("quant_node") and f"{row['quant_node']}.zero_point_f" in produced and row.get("xq"):
            wanted.append((f"{row['quant_node']}.zero_point_f", f"{row['name']}.{ZERO_POINT}", 0))
    fetch = list(dict.fromkeys(t for t, _, _ in wanted if t not in graph_inputs))
    session = make_session(with_outputs(model, fetch), exact=True, intra_op_num_threads=threads)
    input_names = [i.name for i in session.get_inputs()]
    n_outputs = len(model.graph.output)
    out_names = [o.name for o in session.get_outputs()]

    def run(inputs):
        feeds = {k: _as_input(x) for k, x in zip(input_names, inputs)}
        values = dict(zip(out_names, session.run(None, feeds)))
        values.update(feeds)
        tensors = {}
        for tensor, key, shift in wanted:
            v = values[tensor]
            if key.endswith(f".{ZERO_POINT}"):
                v = np.int32(np.asarray(v).reshape(-1)[0])
            tensors[key] = (v.astype(np.int64) << shift) if key.endswith(".acc") else v
        return RunResult([values[n] for n in out_names[:n_outputs]], tensors)

    if batch is None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return Runtime(name, run, batch)


def _onnxruntime_factory(check_planes: bool):
    def factory(ctx: _Context, batch: int) -> Runtime:
        from csqc.targets.onnx.reference import emit_reference

        model = emit_reference(ctx.graph("integer", batch), check_planes=check_planes)
        name = "onnxruntime:planes" if check_planes else "onnxruntime"
        return onnx_model_runtime(name, model, threads=ctx.threads, batch=batch)

    return factory


RUNTIMES: dict[str, Callable[[_Context, int], Runtime]] = {
    "pytorch": _pytorch_runtime,
    "interpreter:integer": _interpreter_runtime("integer"),
    "interpreter:default": _interpreter_runtime("default"),
    "onnxruntime": _onnxruntime_factory(False),
    "onnxruntime:planes": _onnxruntime_factory(True),
}
DEFAULT_RUNTIMES = ("pytorch", "interpreter:integer", "interpreter:default", "onnxruntime")

# which runtime each one is compared with: one stage of the compilation chain per pair
_PARENT = {
    "interpreter:integer": "pytorch",
    "interpreter:default": "interpreter:integer",
    "onnxruntime": "interpreter:integer",
    "onnxruntime:planes": "interpreter:integer",
    "artifact": "interpreter:default",
}


def _open_onnx_artifact(path: str, ctx_threads: int | None = None) -> Runtime:
    from csqc.targets.onnx.runner import load_onnx

    model = load_onnx(path)
    name = f"artifact:{Path(path).name}"
    try:
        if {p.key: p.value for p in model.metadata_props}.get("csqc.kind") == "deploy":
            return _deploy_runtime(name, model, ctx_threads)
        return onnx_model_runtime(name, model, threads=ctx_threads)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except Exception as e:  # ONNX Runtime refuses the graph (its own exception types): the file is at fault
        if type(e).__module__.startswith("onnxruntime"):
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BadInput(f"{path}: ONNX Runtime cannot load it ({reason})") from None
        raise


def _deploy_runtime(name: str, model, threads: int | None) -> Runtime:
    """A deploy-form ONNX model, run as it ships (ORT's optimizations on); outputs only."""
    from csqc.targets.onnx.runner import make_session

    session = make_session(model, exact=False, intra_op_num_threads=threads)
    input_names = [i.name for i in session.get_inputs()]

    def run(inputs):
        feeds = {k: _as_input(x) for k, x in zip(input_names, inputs)}
        return RunResult(list(session.run(None, feeds)))

    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return Runtime(name, run, batch, exact=False, deploy=True)


def _open_tvm_artifact(path: str) -> Runtime:
    """A compiled TVM artifact (``csqc compile --target llvm|cuda|aarch64``) and its per-layer buffers.

    An aarch64 artifact on another machine runs under qemu-user (``csqc.targets.aarch64.emulation``).
    """
    from . import runtime
    from .targets.aarch64.emulation import load_emulated, needs_emulation

    model = load_emulated(path) if needs_emulation(path) else runtime.load(path)
    return tvm_artifact_runtime(f"artifact:{Path(path).name}", model)


def _per_channel(offset: np.ndarray, acc: np.ndarray, names: Mapping) -> np.ndarray:
    """A layer's per-channel accumulator offset, shaped to subtract from its ``acc``. Channels lie
    on ``acc_axis`` (conv: 1; linear: the last, whatever the rank; artifacts from before it was
    recorded: 1 for a 4-D acc with as many channels there, else the last)."""
    axis = names.get("acc_axis")
    if axis is None:
        axis = 1 if acc.ndim == 4 and acc.shape[1] == offset.size else acc.ndim - 1
    axis = int(axis)
    return offset.reshape([-1 if i == axis else 1 for i in range(acc.ndim)])


def tvm_artifact_runtime(name: str, model, device: dict | None = None, close: Callable[[], None] | None = None
                         ) -> Runtime:
    """The runtime of a loaded TVM artifact (``csqc.runtime.CompiledModel`` or anything with its call
    API, ``record_names`` included, and ``layers``: the emulated and the remote ones): outputs and
    the per-layer tensors."""
    layers = {name: info["tensors"] for name, info in model.layers.items() if "tensors" in info}
    # the buffers read below, and no others (all of them: 655 MB of copies on MaxViT-T)
    wanted = {v for names in layers.values() for v in names.values() if isinstance(v, str)}

    def run(inputs):
        record: dict = {}
        out = model(*[_as_input(x) for x in inputs], record=record, record_names=wanted)
        tensors = {}
        for layer, names in layers.items():
            for key in LAYER_TENSORS:
                buf = names.get(key)
                if buf is None or (key == "in" and buf not in record):  # (older artifacts name a constant input)
                    continue
                if key == "acc" and names.get("acc_unless") and record[names["acc_unless"]].reshape(-1)[0] != 0:
                    continue  # the layer's codes came from a kernel whose accumulators never left its stack
                v = record[buf]
                if key == "xq":
                    v = v.astype(np.int64) - record[names["xq_neg"]] if names.get("xq_neg") else v
                    if names.get("xq_offset"):  # offset codes: code + L in one buffer
                        v = v.astype(np.int64) - int(names["xq_offset"])
                    if names.get("xq_zero_point"):  # asymmetric codes: u, less the run's zero point
                        v = v.astype(np.int64) - int(record[names["xq_zero_point"]].reshape(-1)[0])
                elif key == "acc":
                    v = v.astype(np.int64) - record[names["acc_neg"]] if names.get("acc_neg") else v.astype(np.int64)
                    if names.get("acc_offset"):  # the product of offset codes, less L * sum_k q[c, k]
                        offset = record[names["acc_offset"]].astype(np.int64)
                        if names.get("acc_zero_point"):  # asymmetric codes: less zp * sum_k q[c, k]
                            offset = offset * int(record[names["acc_zero_point"]].reshape(-1)[0])
                        v = v - _per_channel(offset, v, names)
                    v = v << int(names.get("acc_shift", 0))
                elif key == "scale":
                    v = np.float32(v.reshape(-1)[0])
                tensors[f"{layer}.{key}"] = v
            if names.get("residual") in record:  # the float residual a fused residual epilogue read (a
                tensors[f"{layer}.residual"] = record[names["residual"]]  # constant one is not recorded)
            if names.get("xq_zero_point") and names.get("xq"):
                tensors[f"{layer}.{ZERO_POINT}"] = np.int32(record[names["xq_zero_point"]].reshape(-1)[0])
        return RunResult(out if isinstance(out, list) else [out], tensors)

    # the epilogue's float order matches the interpreter's but LLVM may vectorize it
    # differently: outputs are compared within the tolerance, accumulators exactly
    return Runtime(name, run, int(model.inputs[0]["shape"][0]), exact=False, device=device, close=close)


def _open_remote_artifact(path: str, rpc: str, key: str | None) -> Runtime:
    """A TVM artifact run on a remote device through TVM RPC (``csqc.remote``), named like a local one."""
    from . import remote

    if not Path(path).name.endswith(".so"):
        raise BadInput(f"{path}: --rpc runs the .so artifacts of --target llvm, cuda or aarch64 on a remote device; "
                       "verify an .onnx artifact here, without --rpc")
    model = remote.load(path, rpc, key=key)
    return tvm_artifact_runtime(f"artifact:{Path(path).name}", model, device=model.device, close=model.close)


# suffix -> opener(path) -> Runtime; other targets register themselves here
ARTIFACT_RUNNERS: dict[str, Callable[[str], Runtime]] = {".onnx": _open_onnx_artifact, ".so": _open_tvm_artifact}


def register_artifact_runner(suffix: str, opener: Callable[[str], Runtime]) -> None:
    """Let ``verify(artifact=...)`` run files ending in ``suffix`` through ``opener(path)``."""
    ARTIFACT_RUNNERS[suffix if suffix.startswith(".") else "." + suffix] = opener


def _open_artifact(path: str, rpc: str | None = None, key: str | None = None) -> Runtime:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{path}: no such artifact")
    if rpc is not None:
        return _open_remote_artifact(str(p), rpc, key)
    if key is not None:
        raise BadInput("--key names a device of an RPC tracker: give the tracker with --rpc HOST:PORT")
    for suffix in sorted(ARTIFACT_RUNNERS, key=len, reverse=True):  # longest match: .tar.gz before .gz
        if p.name.endswith(suffix):
            return ARTIFACT_RUNNERS[suffix](str(p))
    raise BadInput(f"{path}: no runner for this artifact type; known: {', '.join(sorted(ARTIFACT_RUNNERS))}")


# -- inputs ------------------------------------------------------------------------------------


def load_inputs(path: str, model: CsqcModel, max_samples: int | None = None) -> list[np.ndarray]:
    """Arrays from an ``.npz`` (by model input name, else the first arrays in order); with
    ``max_samples``, at most that many samples of each (the rest is not read).

    The headers are checked first: each array the model will read must hold samples of the
    model's input shape, and no header may claim more data than the file holds.
    """
    from .arrayfile import array_headers

    headers = {h.name: h for h in array_headers(path)}  # before np.load allocates what a header claims
    names = [s["name"] for s in model.input_specs]
    if list(headers) == [""]:  # an .npy file's one array has no name
        raise BadInput(f"{path}: holds a single array; give an .npz of arrays named after the inputs (np.savez)")
    if len(headers) < len(names):
        raise BadInput(f"{path}: holds {len(headers)} array(s), the model takes {len(names)} input(s)")
    chosen = names if all(n in headers for n in names) else list(headers)[: len(names)]
    for name, spec, takes in zip(chosen, model.input_specs, sample_inputs(model)):
        shape = headers[name].shape
        if not takes and shape != tuple(spec["shape"]):
            raise BadInput(f"{path}: array {name!r} has shape {list(shape)}; the model's input {spec['name']} has "
                           f"a fixed shape {spec['shape']} (every batch reads that one value)")
        if takes and shape[1:] != tuple(spec["shape"][1:]):
            raise BadInput(f"{path}: array {name!r} has shape {list(shape)}; the model takes arrays of shape "
                           f"{_batched(spec['shape'])}{_batch_axis_hint(shape, spec['shape'])}")
    return _read_arrays(path, chosen, max_samples)


def load_artifact_inputs(path: str, specs: Sequence[dict], artifact: str) -> list[np.ndarray]:
    """``csqc run``'s arrays for the inputs ``specs`` (a compiled artifact's: name, shape) from ``path``.

    An ``.npz`` holds one array per input, named after it (as ``load_inputs`` reads them, by
    name); a single-input artifact also takes an ``.npy`` or a one-array ``.npz``. Each array
    must have exactly the shape the artifact was compiled for, checked from its header first.
    """
    from .arrayfile import array_headers

    names = [s["name"] for s in specs]
    named = {s["name"]: s for s in specs} | ({"": specs[0]} if len(specs) == 1 else {})  # "": an .npy's array

    def check(header, index: int) -> None:  # the shape first: before the header's claim is compared with the file
        if header.name in named:
            _check_artifact_shape(path, header, named[header.name], artifact)

    headers = {h.name: h for h in array_headers(path, check)}  # before np.load allocates what a header claims
    if not headers:
        raise BadInput(f"{path}: the .npz holds no arrays")
    if all(n in headers for n in names):
        chosen = names
    elif len(names) == 1 and len(headers) == 1:  # nothing to confuse it with
        chosen = list(headers)
    else:  # taking the first arrays would run the wrong data without a word
        held = "one unnamed array (.npy)" if list(headers) == [""] else "arrays " + ", ".join(map(repr, headers))
        raise BadInput(f"{path}: {artifact} takes arrays named {', '.join(names)} (write them with np.savez(path, "
                       f"{'=..., '.join(names)}=...)); the file holds {held}")
    for name, spec in zip(chosen, specs):  # the one array of another name was not checked yet
        _check_artifact_shape(path, headers[name], spec, artifact)
    return _read_arrays(path, chosen)


def _check_artifact_shape(path: str, header, spec: dict, artifact: str) -> None:
    if list(header.shape) != list(spec["shape"]):
        what = f"array {header.name!r}" if header.name else "the file"
        raise BadInput(f"{path}: expected shape {list(spec['shape'])} for input {spec['name']}, the shape {artifact} "
                       f"was compiled for (compile with --batch N for another batch); {what} has shape "
                       f"{list(header.shape)}")


def _batched(shape) -> str:
    """An input's shape with its batch axis as N: ``[N, 64]``."""
    return "[" + ", ".join(["N", *map(str, shape[1:])]) + "]"


def _batch_axis_hint(shape, spec_shape) -> str:
    if tuple(shape) == tuple(spec_shape[1:]):  # one sample without its batch axis
        return " (a batch axis first: N samples; for one sample, x[None])"
    return " (write [samples, ...] arrays with np.savez)"


def _read_arrays(path: str, names: Sequence[str], rows: int | None = None) -> list[np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file (``[""]``: an ``.npy`` file's one array), headers
    checked; with ``rows``, the first ``rows`` samples of each."""
    from .arrayfile import read_arrays

    try:
        arrays = read_arrays(path, list(names), rows)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
        raise BadInput(f"cannot read {path}: not a numeric .npy/.npz array file ({type(e).__name__}); csqc never "
                       "unpickles, write inputs with numpy.save or numpy.savez") from None
    if not all(isinstance(a, np.ndarray) for a in arrays):  # members that are not .npy come back as bytes
        raise BadInput(f"{path}: holds files other than arrays; write it with np.savez")
    return arrays


def _is_array(x) -> bool:
    """One array (a torch tensor too), not a sequence of them: ``list(tensor)`` would be its rows."""
    import torch

    return isinstance(x, (np.ndarray, torch.Tensor))


def _as_model_input(a, spec: dict) -> np.ndarray:
    """``a`` (an array or a torch tensor) as input ``spec`` takes it: numbers become a float
    input's float32, as the runtimes convert them (an int64 batch would reach PyTorch as int64)."""
    import torch

    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise BadInput(f"input {spec['name']}: holds {a.dtype} values; give numbers")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 past float32: refused as infinite by the caller
        return a.astype(np.float32, copy=False) if np.dtype(spec["dtype"]).kind == "f" else a


def _as_input(x) -> np.ndarray:
    """A batch as the runtimes take it: token ids stay integers, everything else is float32."""
    x = np.asarray(x)
    return np.ascontiguousarray(x, x.dtype if x.dtype.kind in "iu" else np.float32)


def _id_range(ctx: "_Context", index: int) -> tuple[int, int]:
    """Valid values ``[low, high)`` of integer input ``index``: declared at ``csqc.save(...,
    input_ranges=...)``, else the rows of the embedding tables it indexes, else the example's."""
    spec = ctx.model.input_specs[index]
    if "range" in spec:
        return int(spec["range"][0]), int(spec["range"][1])
    g = ctx.graph("integer", int(spec["shape"][0]) or 1)
    name = g.inputs[index].name
    rows = [g.params[n.inputs[0]].shape[0] for n in g.nodes if n.op == "embedding" and n.inputs[1] == name]
    if rows:
        return 0, int(min(rows))
    example = ctx.model.example_inputs[index]
    return int(example.min()), int(example.max()) + 1


def _random_input(rng: np.random.Generator, ctx: "_Context", index: int, samples: int | None) -> np.ndarray:
    """``samples`` along the first axis, or (None) one value of the input's fixed shape."""
    spec = ctx.model.input_specs[index]
    shape = tuple(spec["shape"]) if samples is None else (samples, *spec["shape"][1:])
    if np.dtype(spec["dtype"]).kind in "iu":  # token ids: valid ones, not float noise
        low, high = _id_range(ctx, index)
        return rng.integers(low, high, shape, dtype=np.dtype(spec["dtype"]))
    return rng.random(shape, dtype=np.float32)


def random_inputs(model: CsqcModel, batch: int, seed: int = 0) -> list[np.ndarray]:
    """One seeded random batch per model input, as ``verify`` draws them: uniform [0, 1) floats,
    valid token ids for integer inputs."""
    rng = np.random.default_rng(seed)
    ctx = _Context(model, None)
    return [_as_input(_random_input(rng, ctx, i, batch if takes else None))
            for i, takes in enumerate(sample_inputs(model))]


def sample_inputs(model: CsqcModel) -> list[bool]:
    """Per input of ``model``: whether its first axis takes the samples (the batch), along which
    verify and bench cut them; the others have a fixed shape (an RNN's [layers, N, H] state, a
    table) and take one value of it a batch. An input takes samples if the program takes any
    size there; in a program torch.export fixed whole, if its first axis is the first input's."""
    batched, specs = model.batched_inputs, model.input_specs
    if any(batched):
        return list(batched)
    leading = [s["shape"][0] if s["shape"] else None for s in specs]
    return [n is not None and n == leading[0] for n in leading]


def _fixed_batch(model: CsqcModel) -> int | None:
    """The only batch a program torch.export fixed whole runs (its sample inputs' first axis); None
    where it takes any."""
    if any(model.batched_inputs):
        return None
    return int(model.input_specs[sample_inputs(model).index(True)]["shape"][0])


def _samples(model: CsqcModel, inputs, samples: int, dataset: str | None, seed: int, ctx: "_Context"):
    """``(arrays per input, labels or None)``: the samples of each input that takes them (the
    sample axis first), the value of an input of fixed shape that the caller gave, or None (each
    batch draws its own: :func:`_batch_of`)."""
    specs = model.input_specs
    if sum(x is not None for x in (inputs, dataset)) > 1:
        raise BadInput("give either inputs or a dataset, not both")
    labels = None
    if dataset is not None:
        if dataset != "digits":
            raise BadInput(f"unknown dataset {dataset!r}; known: digits")
        from .data import load_digits_split

        shape = tuple(specs[0]["shape"][1:])
        split = load_digits_split(image=len(shape) == 3)
        if split.x_test.shape[1:] != shape or len(specs) != 1:
            raise BadInput(f"the digits data set has samples of shape {list(split.x_test.shape[1:])}, the model takes {list(shape)}")
        arrays, labels = [split.x_test], split.y_test
    elif inputs is not None:
        arrays = [inputs] if _is_array(inputs) else list(inputs)
        if len(arrays) != len(specs):
            raise BadInput(f"the model takes {len(specs)} input(s), got {len(arrays)}")
        arrays = [_as_model_input(a, s) for a, s in zip(arrays, specs)]
        for a, s, takes in zip(arrays, specs, sample_inputs(model)):
            if not takes and tuple(a.shape) != tuple(s["shape"]):
                raise BadInput(f"input {s['name']} has a fixed shape {s['shape']} (every batch reads this one "
                               f"value), got {list(a.shape)}")
            if takes and tuple(a.shape[1:]) != tuple(s["shape"][1:]):
                raise BadInput(f"input {s['name']}: samples must have shape {s['shape'][1:]}, got {list(a.shape[1:])}")
            if not np.isfinite(a).all():
                raise BadInput(f"input {s['name']} contains NaN or infinity")
        counts = {s["name"]: len(a) for a, s, takes in zip(arrays, specs, sample_inputs(model)) if takes}
        if len(set(counts.values())) > 1:
            raise BadInput("the inputs that take samples must hold as many each: "
                           + ", ".join(f"{name} {count}" for name, count in counts.items()))
    else:
        if not 1 <= samples <= MAX_RANDOM_SAMPLES:
            raise BadInput(f"samples must be 1..{MAX_RANDOM_SAMPLES:,} random inputs, got {samples:,}; to check on "
                           "more, give your own inputs (csqc verify --inputs x.npz)")
        rng = np.random.default_rng(seed)
        # (inputs of fixed shape: a value of their own each batch, drawn there)
        arrays = [_random_input(rng, ctx, i, samples) if takes else None
                  for i, takes in enumerate(sample_inputs(model))]
    return [None if a is None else _as_input(a) for a in arrays], labels


def _batch_of(arrays: list, takes_samples: list[bool], start: int, batch: int, index: int, ctx: "_Context",
              seed: int) -> list[np.ndarray]:
    """Batch ``index`` (samples ``start`` on) of every input: the samples of those that take them;
    of an input of fixed shape, the value given, else a random one of its own."""
    chunk = []
    for i, (a, takes) in enumerate(zip(arrays, takes_samples)):
        if takes:
            chunk.append(a[start : start + batch])
        elif a is not None:
            chunk.append(a)
        else:
            chunk.append(_as_input(_random_input(np.random.default_rng((seed, index, i)), ctx, i, None)))
    return chunk


# -- report --------------------------------------------------------------------------------------


@dataclass
class PairReport:
    """Outputs of ``b`` against ``a`` (the earlier stage of the chain) over all batches."""

    a: str
    b: str
    kind: str = "exact"  # exact: both follow the IR's float order; float: one is PyTorch; deploy: see verify
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0  # max |b - a| / max |a|, per output tensor
    top1_agreement: float | None = None
    within_tolerance: bool = True  # every element within atol/rtol
    ok: bool = True  # the pair passes (see verify's docstring)
    _agree: int = 0
    _rows: int = 0

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "kind": self.kind, "ok": self.ok, "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "top1_agreement": self.top1_agreement,
                "within_tolerance": self.within_tolerance}


@dataclass
class VerifyReport:
    ok: bool
    runtimes: list[str]
    pairs: list[PairReport]
    accumulators_exact: bool
    first_divergence: dict | None
    samples: int
    batch: int
    atol: float
    rtol: float
    accuracy: dict[str, float] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)  # per layer and runtime (per_layer=True)
    notes: list[str] = field(default_factory=list)
    folded_layers: list[str] = field(default_factory=list)  # layers with no nonzero weights, now constants
    devices: dict[str, dict] = field(default_factory=dict)  # runtime -> the remote device it ran on
    # the artifact's recorded scales, when it has them: {"source": "artifact", "scales": N,
    # "recomputed_on": what --calibrate named (or None), "differences": one line per scale that differs}
    calibration: dict | None = None

    @property
    def max_abs_error(self) -> float:
        return max((p.max_abs_error for p in self.pairs), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        values = [p.top1_agreement for p in self.pairs if p.top1_agreement is not None]
        return min(values) if values else None

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "runtimes": self.runtimes, "samples": self.samples, "batch": self.batch,
            "max_abs_error": self.max_abs_error, "top1_agreement": self.top1_agreement,
            "accumulators_exact": self.accumulators_exact, "first_divergence": self.first_divergence,
            "pairs": [p.to_json() for p in self.pairs], "accuracy": self.accuracy,
            "tolerance": {"atol": self.atol, "rtol": self.rtol}, "layers": self.layers, "notes": self.notes,
            "folded_layers": self.folded_layers, **({"devices": self.devices} if self.devices else {}),
            **({"calibration": self.calibration} if self.calibration else {}),
        }


# -- layer-by-layer checks ------------------------------------------------------------------------


@dataclass
class _LayerStats:
    layer: str
    runtime: str
    checked: dict[str, int] = field(default_factory=dict)  # tensor -> elements compared
    mismatched: dict[str, int] = field(default_factory=dict)  # tensor -> elements that differ
    kinds: dict[str, str] = field(default_factory=dict)  # tensor -> exact | float
    codes_equal_golden_run: bool = True
    folded: bool = False  # no nonzero weights: the passes replaced the layer by its constant output

    def add(self, tensor: str, kind: str, compared: int, bad: int) -> None:
        self.checked[tensor] = self.checked.get(tensor, 0) + compared
        self.mismatched[tensor] = self.mismatched.get(tensor, 0) + bad
        self.kinds[tensor] = kind

    def to_json(self) -> dict:
        return {"layer": self.layer, "runtime": self.runtime, "checked": self.checked,
                "mismatched": self.mismatched, "codes_equal_golden_run": self.codes_equal_golden_run,
                "folded_to_constant": self.folded}


def _close(a, b, atol, rtol, scale_ref) -> np.ndarray:
    """Elementwise closeness with ``atol`` relative to the reference's magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) <= atol * max(scale_ref, 1.0) + rtol * np.abs(a)


def _golden_layer(g: Graph, layer, x) -> tuple[np.ndarray, np.ndarray | None]:
    """The interpreter's layer on input ``x`` (a QValue or floats): ``(output, accumulator)``."""
    from . import interpreter

    record: dict = {}
    # the interpreter's own layer function: its order of float operations is the contract
    out = interpreter._quant_layer(g, layer, x, record, None)
    return out, record.get(f"{layer.name}.acc")


# float ops a fused residual epilogue computes after its layer (the add, the activation after it)
_EPILOGUE_TAIL_OPS = ("add", "relu", "clip")


def _float_from_runtime(g: Graph, producers: Mapping, value: str | None, known: Mapping[str, np.ndarray],
                        codes: Mapping[str, QValue] = {}) -> np.ndarray | None:  # noqa: B006 (read only)
    """``value`` as the interpreter computes it from ``known`` (this runtime's floats: layer
    outputs from its codes, float tensors it recorded) through the float ops a fused epilogue
    computes after its layer, and dequantized ``codes`` (this runtime's codes of a quantize
    node: a quantized residual, as the CSQ reference's ResNet-18 has); None where an input is
    not known."""
    if value in known:
        return known[value]
    node = producers.get(value)
    if node is not None and node.op == "dequantize" and node.inputs[0] in codes:
        return np.asarray(HANDLERS["dequantize"](g, node, [codes[node.inputs[0]]]), np.float32)
    if node is None or node.op not in _EPILOGUE_TAIL_OPS:
        return None
    inputs = [_float_from_runtime(g, producers, v, known, codes) for v in node.inputs]
    if any(x is None for x in inputs):
        return None
    return np.asarray(HANDLERS[node.op](g, node, inputs), np.float32)


def _check_layers(g: Graph, golden: Mapping[str, np.ndarray], rt: Runtime, tensors: Mapping[str, np.ndarray],
                  stats: dict[str, _LayerStats], atol: float, rtol: float) -> None:
    """Check one batch of one runtime's per-layer tensors against the golden model (see module doc).

    Where the runtime's inputs to a step equal the golden run's, the golden run's own result
    is the expected value; only after a difference is the step recomputed on the runtime's
    inputs (the interpreter is slow, and differences are rare).
    """
    sources = _layer_inputs(g)
    producers, users = g.producers(), g.users()
    synced = True  # the runtime has followed the golden run exactly so far
    # layers whose codes, scale and accumulator equal the golden run's: in a runtime that follows
    # the IR's float order their float output equals it too, bit for bit
    clean: set[str] = set()
    # a layer's float output as the interpreter computes it from this runtime's codes: what a
    # dynamic quantizer fused into that layer's epilogue (no float tensor recorded) must quantize
    expected_out: dict[str, np.ndarray] = {}
    recorded: dict[str, np.ndarray] = {}  # float values this runtime recorded (layer inputs)
    runtime_codes: dict[str, QValue] = {}  # quantize node -> this runtime's codes and scale of it
    for layer in g.quant_layers():
        name = layer.name
        st = stats.setdefault(name, _LayerStats(name, rt.name))
        t = {k: tensors.get(f"{name}.{k}") for k in LAYER_TENSORS}
        gold = {k: golden.get(f"{name}.{k}") for k in LAYER_TENSORS}
        same_in = t["in"] is not None and np.array_equal(t["in"], gold["in"])
        residual = tensors.get(f"{name}.residual")
        if residual is not None:  # the other operand of the residual add this layer's epilogue computed
            for add in users.get(name, []):
                if add.op == "add":
                    recorded.update({v: np.asarray(residual, np.float32) for v in add.inputs if v != name})
        if t["in"] is not None and sources[name][0] is not None:
            recorded[sources[name][0]] = np.asarray(t["in"], np.float32)
        float_bad = 0  # float elements of this batch outside the tolerance
        if t["in"] is not None and synced:
            ok = _close(gold["in"], t["in"], atol, rtol, float(np.abs(gold["in"]).max(initial=0)))
            float_bad += int(ok.size - ok.sum())
            st.add("in", "float", ok.size, int(ok.size - ok.sum()))
        quant = sources[name][1]
        if quant is not None:
            qnode = g.node(quant)
            if t["in"] is not None and t["xq"] is not None:
                expect = (QValue(gold["xq"], gold["scale"], qnode.type.qbits) if same_in
                          else HANDLERS["quantize"](g, qnode, [np.asarray(t["in"], np.float32)]))
                bad = int((expect.centered() != t["xq"].astype(np.int64)).sum())  # asymmetric: u - zp
                if t["scale"] is not None and np.float32(t["scale"]) != np.float32(expect.scale):
                    bad += 1
                st.add("xq", "exact", expect.codes.size, bad)
            elif t["in"] is None and t["xq"] is not None and (fused_in := _float_from_runtime(
                    g, producers, sources[name][0], {**recorded, **expected_out}, runtime_codes)) is not None:
                # a dynamic quantizer its producer's epilogue computed: exact on that layer's output
                # (or on the residual add and activation after it, the float residual the runtime's)
                expect = HANDLERS["quantize"](g, qnode, [fused_in])
                bad = int((expect.codes != t["xq"].astype(np.int64)).sum())
                if t["scale"] is not None and np.float32(t["scale"]) != np.float32(expect.scale):
                    bad += 1
                st.add("xq", "exact", expect.codes.size, bad)
            elif t["in"] is None and t["xq"] is not None:
                # codes a fused layer wrote (no float tensor to requantize): where its inputs matched
                # the golden run's and the runtime follows the IR's float order, they must match too;
                # else (a float-input layer rounds its float y its own way) a code may move by one
                # step at a rounding boundary, never more: a larger difference is an integer error
                step = 0 if rt.exact and sources[name][0] in clean else 1
                bad = int((np.abs(t["xq"].astype(np.int64) - gold["xq"]) > step).sum())
                if t["scale"] is not None and np.float32(t["scale"]) != np.float32(gold["scale"]):
                    bad += 1
                st.add("xq", "exact", gold["xq"].size, bad)
            if t["xq"] is None or t["scale"] is None:
                continue
            # (centered codes: (u - zp) R / L is also the asymmetric dequantization)
            runtime_codes[quant] = QValue(t["xq"].astype(np.int32), np.float32(t["scale"]), qnode.type.qbits)
            same_codes = (np.array_equal(t["xq"].astype(np.int64), gold["xq"])
                          and np.float32(t["scale"]) == np.float32(gold["scale"]))
            if not same_codes:
                st.codes_equal_golden_run = synced = False  # float differences upstream flipped a code
                x = QValue(t["xq"].astype(np.int32), np.float32(t["scale"]), qnode.type.qbits)
                out, acc = _golden_layer(g, layer, x)
            else:
                out, acc = gold["out"], gold["acc"]
            if isinstance(out, np.ndarray):
                expected_out[name] = out
            acc_ok = True
            if t["acc"] is not None:
                bad = int((acc != t["acc"]).sum())
                st.add("acc", "exact", acc.size, bad)
                acc_ok = bad == 0
            if t["out"] is not None and acc_ok:
                if rt.exact:
                    st.add("out", "exact", out.size, int((out != t["out"]).sum()))
                else:
                    ok = _close(out, t["out"], atol, rtol, float(np.abs(out).max(initial=0)))
                    float_bad += int(ok.size - ok.sum())
                    st.add("out", "float", ok.size, int(ok.size - ok.sum()))
            if not acc_ok:
                synced = False
            elif same_codes:
                clean.add(name)
        elif t["in"] is not None and t["out"] is not None:
            out = gold["out"] if same_in else _golden_layer(g, layer, np.asarray(t["in"], np.float32))[0]
            ok = _close(out, t["out"], atol, rtol, float(np.abs(out).max(initial=0)))
            float_bad += int(ok.size - ok.sum())
            st.add("out", "float", ok.size, int(ok.size - ok.sum()))
        if float_bad:
            synced = False


# -- verify ----------------------------------------------------------------------------------------


def verify(
    model: CsqcModel,
    *,
    inputs: Sequence[np.ndarray] | np.ndarray | None = None,
    samples: int = 4,
    dataset: str | None = None,
    artifact: str | None = None,
    per_layer: bool = False,
    batch: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    min_top1_agreement: float = 0.99,
    float_rel_tol: float = 0.5,
    deploy_min_top1: float = 0.95,
    deploy_max_accuracy_drop: float = 0.02,
    runtimes: Sequence[str] = DEFAULT_RUNTIMES,
    seed: int = 0,
    intra_op_num_threads: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    rpc: str | None = None,
    key: str | None = None,
    calibrate=None,
) -> VerifyReport:
    """Run ``model`` (a ``CsqcModel`` or its file's path, as ``csqc.compile`` takes) in every
    runtime on the same batches and compare (see module docstring).

    ``inputs``: arrays (one per model input, samples first); else ``dataset`` ("digits", its
    test split, with accuracy per runtime); else ``samples`` seeded uniform [0, 1) inputs.
    ``batch``: samples per run (default: the artifact's, else the model file's batch size).
    ``atol`` is relative to each output's largest magnitude (at least 1); ``rtol`` elementwise.
    Pairs of runtimes that both follow the IR's float order (interpreters, ONNX Runtime,
    artifacts) must agree within ``atol``/``rtol``. PyTorch computes in another float order;
    a 4-bit activation code then flips on a rounding tie now and then and the flip cascades
    through the dynamic scales, so the PyTorch pair passes within ``atol``/``rtol`` or on top-1
    agreement (at least ``min_top1_agreement`` for 2-D outputs) and a coarse ``max_rel_error <=
    float_rel_tol``; where it misses both, on PyTorch run with the golden run's codes
    (``csqc.forced_codes``: every code PyTorch's own or a tie's other neighbour, the outputs
    within ``atol``/``rtol``). Exactness is proved along the IR chain.
    ``per_layer``: also compare every layer's float input and output with the golden run and
    list per-layer statistics; ``first_divergence`` is always reported.
    A deploy-form ONNX artifact (``csqc.kind=deploy``: static activation scales calibrated ahead
    of time, QDQ int8) promises PyTorch's predictions, not its bits: it is compared with PyTorch
    on top-1 agreement (at least ``deploy_min_top1``) and, on a labelled data set, an accuracy
    at most ``deploy_max_accuracy_drop`` below PyTorch's; the notes say so. ``on_batch(done, total)``
    is called after every batch with the samples checked so far (for a progress bar).
    ``rpc``: run the artifact (a ``.so``) on a remote TVM RPC server at "host:port" instead (with
    ``key``: a tracker there and the device key; see ``csqc.remote``); the report's ``devices``
    says where it ran.
    ``calibrate`` (``"digits"``, an ``.npz`` path or arrays, as for ``csqc.compile``): check the
    calibrated model, its dynamic activation scales made static on that data: every runtime
    and the artifact exactly against the calibrated interpreter, PyTorch (the trained model,
    dynamic scales) on top-1 agreement and a coarse error only.
    An artifact built with ``--calibrate`` records its scales (``csqc.calibration``): then every
    reference runtime uses exactly those, applied to the captured graph, and the report's
    ``calibration`` says so; nothing is measured again. ``calibrate`` given as well: the scales
    are measured on that data and compared with the recorded ones (a note lists any that
    differ), and the check still uses the recorded ones. A recorded scale edited after
    compilation therefore shows as a scale mismatch of the layer that reads it (the kernels
    hold the old one); an ONNX model whose recorded scales disagree with its initializers, or a
    record that is malformed or names quantizers the model lacks, is refused (``BadInput``).
    """
    if atol < 0 or rtol < 0 or math.isnan(atol) or math.isnan(rtol):
        raise BadInput("atol and rtol must be non-negative numbers")
    if batch is not None and batch < 1:  # before the defaults below, which would take 0 for "not given"
        raise BadInput(f"batch must be at least 1, got {batch}")
    from .compiler import to_model

    model = to_model(model)
    check_batch_first(model, "verify", fixed_ok=True)
    takes_samples = sample_inputs(model)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise BadInput(f"unknown runtime(s) {', '.join(unknown)}; known: {', '.join(RUNTIMES)}")
    names = list(dict.fromkeys(runtimes))
    if GOLDEN not in names:  # the golden interpreter always runs, after the PyTorch reference
        names.insert(1 if names[:1] == ["pytorch"] else 0, GOLDEN)
    if rpc is not None and not artifact:
        raise BadInput("--rpc runs an artifact on a remote device: give the artifact with --artifact")
    if artifact:
        check_artifact_model(model, artifact)  # another model's artifact would read as runtimes that disagree
    art = _open_artifact(artifact, rpc, key) if artifact else None
    devices = {art.name: art.device} if art is not None and art.device else {}
    try:
        if art is not None and art.deploy and inputs is None and dataset is None:
            raise BadInput(f"{artifact} is a deploy-form ONNX model, calibrated on real data: random inputs say "
                           "nothing about it; verify it on that kind of data (--dataset digits or --inputs x.npz)")
        ctx = _Context(model, intra_op_num_threads)
        arrays, labels = _samples(model, inputs, samples, dataset, seed, ctx)
        n = len(arrays[takes_samples.index(True)])
        fixed_batch = _fixed_batch(model)
        batch = batch or (art.batch if art else None) or fixed_batch or int(model.input_specs[0]["shape"][0]) or 1
        if art and art.batch not in (None, batch):
            raise BadInput(f"the artifact runs batches of {art.batch}; verify with batch {art.batch}")
        if fixed_batch not in (None, batch):
            raise BadInput(f"the model runs batches of {fixed_batch} only (torch.export fixed its shapes); verify "
                           f"with batch {fixed_batch}")
        notes: list[str] = []
        calibration = None
        stored = _stored_calibration(artifact) if artifact else None
        source = calibrate if isinstance(calibrate, (str, Path)) else "arrays"
        if calibrate is not None:
            from .compiler import calibration_arrays

            calibration = calibration_arrays(model, calibrate)  # (an array or a tensor is one input's samples)
            if stored is None:
                notes.append(f"calibrated on {source} ({len(calibration[0])} samples): static activation scales, a "
                             "different model from the trained one; PyTorch is compared on top-1 agreement, every "
                             "other runtime exactly")
        if stored is not None:
            notes.append(f"calibrated: the {len(stored)} static activation scale(s) the artifact was built with, a "
                         "different model from the trained one; PyTorch is compared on top-1 agreement, every other "
                         "runtime exactly")
        ctx = _Context(model, intra_op_num_threads, calibration, stored, str(artifact))
        starts = list(range(0, n, batch))
        if n % batch and ((art is not None and art.batch is not None) or fixed_batch is not None):
            notes.append(f"the last {n % batch} sample(s) do not fill a batch of {batch} and were not run")
            starts = starts[:-1]
        if not starts:
            raise BadInput(f"{n} sample(s) do not fill one batch of {batch}")
        total = sum(min(batch, n - start) for start in starts)
        by_size: dict[int, list[Runtime]] = {}
        outputs: dict[str, list[list[np.ndarray]]] = {}
        stats: dict[str, dict[str, _LayerStats]] = {}
        used = 0
        # PyTorch again with the golden run's codes (and a calibrated graph's scales) at its
        # quantizers (csqc.forced_codes), to tell codes flipped at rounding ties (or a calibrated
        # model's other predictions) from a model captured wrongly
        forcing: ForcedRun | None = None
        can_force = "pytorch" in names
        forced_outputs: list[list[np.ndarray]] = []
        interpreters: dict[str, ForcedInterpreter | None] = {}  # runtime -> the golden graph with its codes
        forced_outputs_of: dict[str, list[list[np.ndarray]]] = {}
        for index, start in enumerate(starts):
            chunk = _batch_of(arrays, takes_samples, start, batch, index, ctx, seed)
            size = len(chunk[takes_samples.index(True)])
            if size not in by_size:
                by_size[size] = [RUNTIMES[r](ctx, size) for r in names] + ([art] if art else [])
            golden_graph = ctx.graph("integer", size)
            # every run gets the batch afresh: a model that writes its input in place (x.mul_(2))
            # would otherwise hand the runtimes after it another input than the golden run's
            golden_run = next(rt for rt in by_size[size] if rt.name == GOLDEN).run(_fresh(chunk))
            if can_force and forcing is None:
                forcing = ForcedRun.for_model(getattr(ctx.model, "module", None), golden_graph, rtol)
                can_force = forcing is not None
            if forcing is not None:
                forced_outputs.append(forcing.run([_as_input(x) for x in _fresh(chunk)], golden_run.record))
            golden_run.record = None  # (every value of the model: only the forced run reads it)
            golden = golden_run.tensors
            for rt in by_size[size]:
                # each runtime is checked as soon as it ran and its tensors dropped: a large model's
                # per-layer tensors are GBs a runtime (MaxViT-T: 0.5-0.7), so holding every
                # runtime's at once multiplied the peak
                result = golden_run if rt.name == GOLDEN else rt.run(_fresh(chunk))
                outputs.setdefault(rt.name, []).append(result.outputs)
                if rt.name != GOLDEN and result.tensors:
                    tensors = result.tensors
                    _check_layers(golden_graph, golden, rt, tensors, stats.setdefault(rt.name, {}), atol, rtol)
                    # the golden graph again with this runtime's codes (csqc.forced_codes), where they
                    # left the golden run's: what its outputs are judged on if they miss the tolerance
                    if rt.name not in interpreters:
                        interpreters[rt.name] = ForcedInterpreter.for_graph(golden_graph, rt.name, rtol)
                    forced_run = interpreters[rt.name]
                    if forced_run is not None:
                        same = all(np.array_equal(tensors.get(k), v) for k, v in golden.items() if k.endswith(".xq"))
                        if same:
                            forced_run.count_equal(golden_graph)
                        forced_outputs_of.setdefault(rt.name, []).append(
                            golden_run.outputs if same else forced_run.run(golden_graph, chunk, tensors))
                result = tensors = None
            golden_run = golden = None  # (before the next batch's golden run)
            used += size
            if on_batch is not None:
                on_batch(used, total)
        runtime_names = [rt.name for rt in by_size[min(by_size)]] if by_size else names
        runtime_names = [r for r in runtime_names if r in outputs]
        pairs = _compare_pairs(runtime_names, outputs, atol, rtol, art.name if art else None,
                               deploy=bool(art and art.deploy))
        order = [l.name for l in ctx.graph("integer", batch).quant_layers()]
        folded = _folded_layer_names(ctx.graph("integer", batch))
        notes += [f"{name}: no nonzero weights; folded to a constant output (no codes or accumulator to compare; "
                  "the values that read it are checked)" for name in folded]
        for rt in (r for r in runtime_names if r not in (GOLDEN, "pytorch")):
            for name in folded:  # listed, not missing
                stats.setdefault(rt, {}).setdefault(name, _LayerStats(name, rt, folded=True))
        forced_pairs: list[tuple[PairReport, PairReport]] = []  # (the pair judged, the forced run's)
        for p in pairs:
            if p.kind == "exact":
                p.ok = p.within_tolerance
                resynced = _diverged_only_by_float_rounding(stats.get(p.b, {}), order)
                forced_run = interpreters.get(p.b)
                if not p.ok and resynced and forced_run is not None \
                        and len(forced_outputs_of.get(p.b, ())) == len(outputs[p.b]):
                    forced_pair = PairReport(f"{GOLDEN} ({p.b}'s codes)", p.b, "exact")
                    _accumulate(forced_pair, forced_outputs_of[p.b], outputs[p.b], atol, rtol)
                    forced_pair.ok = forced_pair.within_tolerance and not forced_run.problem_count
                    forced_pairs.append((p, forced_pair))
                    p.ok = forced_pair.ok
                    notes.append(_resynced_note(p, forced_pair, forced_run, resynced))
                elif not p.ok and resynced:
                    # every layer was exact on its own inputs; a float op upstream (a float first
                    # layer, an add) rounded differently and flipped an activation code on a tie,
                    # which the dynamic scales carry to the outputs: judge outputs like PyTorch's
                    top1_ok = p.top1_agreement is None or p.top1_agreement >= min_top1_agreement
                    p.ok = top1_ok and p.max_rel_error <= float_rel_tol
                    notes.append(f"{p.b}: activation codes first left the golden run at {resynced} after a float "
                                 "rounding difference upstream; every layer's codes and accumulators are exact on "
                                 "its own inputs, so its outputs are judged on top-1 agreement and a coarse error")
            elif p.kind == "float":
                top1_ok = p.top1_agreement is None or p.top1_agreement >= min_top1_agreement
                p.ok = p.within_tolerance or (top1_ok and p.max_rel_error <= float_rel_tol)
                if not p.ok and forcing is not None and p.b == GOLDEN:
                    forced_pair = PairReport(f"{p.a} (golden codes)", p.b, "exact")
                    _accumulate(forced_pair, forced_outputs, outputs[p.b], atol, rtol)
                    forced_pair.ok = forced_pair.within_tolerance and not forcing.problem_count
                    forced_pairs.append((p, forced_pair))
                    p.ok = forced_pair.ok
                    calibrated = ctx.calibration is not None or stored is not None
                    notes.append(_forced_note(p, forced_pair, forcing, calibrated))
        for judged, forced_pair in forced_pairs:  # listed after the pair it judged
            pairs.insert(next(i for i, q in enumerate(pairs) if q is judged) + 1, forced_pair)
        accuracy = {}
        if labels is not None:
            y = labels[:used]
            for r in runtime_names:
                logits = np.concatenate([o[0] for o in outputs[r]])
                accuracy[r] = float((logits.argmax(-1) == y).mean())
        for p in pairs:
            if p.kind == "deploy":
                notes.append(_judge_deploy(p, accuracy, deploy_min_top1, deploy_max_accuracy_drop, float_rel_tol))
        exact_ok, first = _summarize(stats, order, per_layer)
        layers = [s.to_json() for r in stats for s in stats[r].values()] if per_layer else []
        ok = exact_ok and all(p.ok for p in pairs)
        stored_report = None
        if stored is not None:
            stored_report = {"source": "artifact", "scales": len(stored),
                             "recomputed_on": None if calibrate is None else str(source),
                             "differences": ctx.differences or []}
            if calibrate is not None:
                notes.append(_recomputed_note(str(source), len(stored), ctx.differences or []))
        return VerifyReport(ok, runtime_names, pairs, exact_ok, first, used, batch, atol, rtol, accuracy, layers,
                            notes, folded, devices, stored_report)
    finally:
        if art is not None and art.close is not None:
            art.close()  # a remote server serves one session at a time


def _fresh(chunk: list) -> list:
    """A copy of a batch's arrays for one run."""
    return [np.array(x, copy=True) for x in chunk]


def check_batch_first(model: CsqcModel, what: str, *, fixed_ok: bool = False) -> None:
    """``BadInput`` unless the inputs of ``model`` take samples as ``what`` (verify, calibration,
    bench) stacks them: on their first axis, or (``fixed_ok``: verify and bench) one value of a
    fixed shape a batch for the others (:func:`sample_inputs`). Calibration stacks every input's."""
    batched, specs = model.batched_inputs, model.input_specs
    leading = [s["shape"][0] if s["shape"] else None for s in specs]
    if all(batched) and len(set(leading)) > 1:
        shapes = ", ".join(f"{spec['name']} {spec['shape']}" for spec in specs)
        raise BadInput(f"{what} runs samples along every input's first axis, and the inputs' first axes differ "
                       f"({shapes}): this model file is from a csqc that made every first axis the batch: save it "
                       "again")
    takes = sample_inputs(model)
    if all(takes) or (fixed_ok and any(takes)):
        return
    fixed = [f"{s['name']} {s['shape']}" for s, t in zip(specs, takes) if not t]
    which = f"input {fixed[0]} has a fixed shape" if len(fixed) == 1 else f"inputs {', '.join(fixed)} have fixed shapes"
    raise BadInput(f"{what} runs samples along every input's first axis, and {which} (the first axis is not the "
                   "batch): give the model inputs that are all batch-first (pass such a state in as [N, ...] and "
                   "transpose it inside the model); compile without --calibrate and run take it as it is"
                   + ("" if fixed_ok else "; verify and bench take it too"))


def _stored_calibration(artifact: str) -> Calibration | None:
    """The calibration a csqc artifact (``.so``, ``.onnx``) records; other artifact types record none."""
    if not Path(artifact).name.endswith((".so", ".onnx")):
        return None
    return artifact_calibration(artifact)


def _recomputed_note(source: str, count: int, differences: list[str]) -> str:
    """What ``--calibrate`` with a calibrated artifact found: the scales measured again, against the stored ones."""
    if not differences:
        return f"{source}: the scales measured there equal the artifact's {count} bit for bit"
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    return (f"{source}: the scales measured there differ from the artifact's for {len(differences)} quantizer(s) "
            f"({shown}); verified against the artifact's scales, the ones its kernels were built with")


def _folded_layer_names(g: Graph) -> list[str]:
    from .passes.fold_zero_layers import folded_layers

    return [n.name for n in folded_layers(g)]


def _compare_pairs(names: list[str], outputs, atol: float, rtol: float, artifact_name: str | None,
                   deploy: bool = False) -> list[PairReport]:
    pairs = []
    for b in names[1:] if names else []:
        is_deploy = deploy and b == artifact_name
        parent = "pytorch" if is_deploy else _PARENT.get("artifact" if b == artifact_name else b)
        a = parent if parent in names else names[0]
        if a == b:
            continue
        p = PairReport(a, b, "deploy" if is_deploy else "float" if "pytorch" in (a, b) else "exact")
        _accumulate(p, outputs[a], outputs[b], atol, rtol)
        pairs.append(p)
    return pairs


def _accumulate(p: PairReport, outputs_a, outputs_b, atol: float, rtol: float) -> None:
    """Compare ``p``'s two runtimes' outputs (one list of arrays per batch) into ``p``."""
    a, b = p.a, p.b
    for out_a, out_b in zip(outputs_a, outputs_b):
        if len(out_a) != len(out_b):
            raise CsqcError(f"{a} gives {len(out_a)} outputs, {b} gives {len(out_b)}")
        for ya, yb in zip(out_a, out_b):
            ya, yb = np.asarray(ya, np.float64), np.asarray(yb, np.float64)
            if ya.shape != yb.shape:
                raise CsqcError(f"{a} and {b} disagree on an output shape: {ya.shape} vs {yb.shape}")
            err = np.abs(ya - yb)
            peak = float(np.abs(ya).max(initial=0))
            p.max_abs_error = max(p.max_abs_error, float(err.max(initial=0)))
            p.max_rel_error = max(p.max_rel_error, float(err.max(initial=0)) / peak if peak else float(err.max(initial=0)))
            p.within_tolerance &= bool(_close(ya, yb, atol, rtol, peak).all())
        if out_a and np.ndim(out_a[0]) == 2:
            scores_a, scores_b = np.asarray(out_a[0], np.float64), np.asarray(out_b[0], np.float64)
            same = np.argmax(scores_a, -1) == np.argmax(scores_b, -1)
            # a row whose scores agree within the exact pairs' tolerance is a tie where its
            # top-1 differs (random weights: every logit near 0, a 1e-10 rounding picks the class)
            tied = _close(scores_a, scores_b, atol, rtol, float(np.abs(scores_a).max(initial=0))).all(-1)
            p._agree += int((same | tied).sum())
            p._rows += len(out_a[0])
    p.top1_agreement = p._agree / p._rows if p._rows else None


def _resynced_note(p: PairReport, forced: PairReport, run: ForcedInterpreter, first: str) -> str:
    """What judged the exact pair ``p`` whose runtime's codes left the golden run at layer
    ``first``: ``forced``, the golden graph run with that runtime's codes (``run``)."""
    what = (f"{p.b}: activation codes first left the golden run at {first} after a float rounding difference "
            f"upstream (every layer's codes and accumulators exact on its own inputs; outputs max abs err "
            f"{p.max_abs_error:.3g}); the golden graph run with {p.b}'s codes at its {len(run.static)} quantizer(s)")
    if forced.ok:
        return (what + f" agrees with {p.b} within the tolerance (max abs err {forced.max_abs_error:.3g}) and "
                + run.summary() + ": the pair passes on that")
    if run.problem_count:
        return what + ": " + run.summary()
    return (what + f" still differs from {p.b} beyond the tolerance (max abs err {forced.max_abs_error:.3g}; "
            + run.summary() + "): a float op computes something else than the interpreter's")


def _forced_note(p: PairReport, forced: PairReport, run: ForcedRun, calibrated: bool) -> str:
    """What judged the PyTorch pair ``p`` once its outputs missed the coarse bounds: ``forced``,
    PyTorch run with the golden run's codes (``run``; see csqc.forced_codes)."""
    agreement = "" if p.top1_agreement is None else f", top-1 agreement {p.top1_agreement:.0%}"
    scales = "the calibrated scales and " if calibrated else ""
    what = (f"{p.a}'s outputs missed the top-1 or coarse error bound (max abs err {p.max_abs_error:.3g}{agreement}); "
            f"{p.a} run again with {scales}the golden run's codes at its {len(run.names)} quantizer(s)")
    if forced.ok:
        why = ("so the difference is the calibration's (static scales), not the compilation's" if calibrated else
               "the codes flipped at ties and the dynamic scales carried the flips, so the pair passes on that")
        return (what + f" agrees within the tolerance (max abs err {forced.max_abs_error:.3g}) and "
                + run.summary() + ": " + why)
    if run.problem_count:
        return what + ": " + run.summary() + ": the model computes something else than PyTorch's"
    return (what + f" still differs beyond the tolerance (max abs err {forced.max_abs_error:.3g}; "
            + run.summary() + "): a float op of the graph computes something else than PyTorch's")


def _judge_deploy(p: PairReport, accuracy: Mapping[str, float], min_top1: float, max_drop: float,
                  rel_tol: float) -> str:
    """Set ``p.ok`` for a deploy-form artifact against PyTorch; returns the note that says how."""
    if p.top1_agreement is None:  # no class scores to agree on: a coarse error bound
        top1_ok, how = p.max_rel_error <= rel_tol, f"an error at most {rel_tol:.0%} of {p.a}'s largest output"
    else:
        top1_ok, how = p.top1_agreement >= min_top1, f"top-1 agreement with {p.a} at least {min_top1:.0%}"
    drop = None
    if p.a in accuracy and p.b in accuracy:
        drop = accuracy[p.a] - accuracy[p.b]
        how += f" and accuracy at most {max_drop:.1%} below it (drop {drop:.2%})"
    p.ok = top1_ok and (drop is None or drop <= max_drop)
    return (f"{p.b} is a deploy-form ONNX model (static activation scales, QDQ int8): it promises "
            f"PyTorch's predictions, not its bits, so it is judged on {how}; no accumulator is checked")


def _diverged_only_by_float_rounding(per_layer: dict[str, _LayerStats], order: list[str]) -> str | None:
    """The first layer whose input codes left the golden run, when every exact check still passed."""
    if not per_layer or any(bad for s in per_layer.values() for t, bad in s.mismatched.items() if s.kinds[t] == "exact"):
        return None
    return next((name for name in order if name in per_layer and not per_layer[name].codes_equal_golden_run), None)


def _summarize(stats: dict[str, dict[str, _LayerStats]], order: list[str], per_layer: bool):
    """``(all exact checks pass, first divergence)``: layers in graph order, tensors in, xq, acc, out."""
    exact_ok = all(
        not bad for per_rt in stats.values() for s in per_rt.values()
        for t, bad in s.mismatched.items() if s.kinds[t] == "exact"
    )
    for layer in order:
        for tensor in LAYER_TENSORS:
            for runtime, per_rt in stats.items():
                s = per_rt.get(layer)
                if s is None or not s.mismatched.get(tensor):
                    continue
                if s.kinds[tensor] == "float" and tensor == "in" and not per_layer:
                    continue  # float inputs are compared only when asked for (per_layer)
                return exact_ok, {"layer": layer, "tensor": f"{layer}.{tensor}", "runtime": runtime,
                                  "kind": s.kinds[tensor], "mismatched": s.mismatched[tensor],
                                  "checked": s.checked[tensor]}
    return exact_ok, None
