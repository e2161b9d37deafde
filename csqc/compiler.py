"""The compiler driver: model file -> capture -> passes -> target. Library twin of the CLI."""
from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BadInput
from .ir import Graph

if TYPE_CHECKING:
    from .modelfile import CsqcModel

__all__ = ["TARGETS", "CompileResult", "default_output", "optimize", "compile", "inspect", "to_model",
           "calibration_arrays", "load_calibration_samples", "capture_calibrated", "is_artifact_path", "inspect_artifact"]

log = logging.getLogger(__name__)

def _target_table() -> dict[str, tuple[str, str]]:
    from .targets.registry import registered_targets

    return {name: (t.pipeline, t.description) for name, t in registered_targets().items()}


# target name -> (IR pipeline it consumes, one-line description), from csqc.targets.registry
TARGETS: dict[str, tuple[str, str]] = _target_table()


def default_output(model_source, target: str, *, arch: str = "sm_80", onnx_form: str = "reference") -> Path:
    """The artifact name when none is given: the model's name, then target and form, in the current folder.

    Each target and form gets its own name (``m.llvm.so``, ``m.cuda-sm_90.so``, ``m.arm64.so``,
    ``m.onnx``, ``m.deploy.onnx``), so compiling for a second one never replaces the first.
    """
    stem = Path(model_source).stem if model_source else "model"
    suffix = {"llvm": "llvm.so", "aarch64": "arm64.so", "cuda": f"cuda-{arch}.so",
              "onnx": "deploy.onnx" if onnx_form == "deploy" else "onnx"}.get(target)
    if suffix is None:
        raise BadInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return Path(f"{stem}.{suffix}")


@dataclass
class CompileResult:
    target: str
    output: Path
    graph: Graph
    report: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ok": True, "target": self.target, "output": str(self.output), "seconds": self.seconds, **self.report}


def to_model(model, *, model_factory: str | None = None, input_shape=None):
    """A ``CsqcModel`` from a path, a ``CsqcModel`` or a finalized ``torch.nn.Module``."""
    from .modelfile import CsqcModel, load

    if isinstance(model, CsqcModel):
        return model
    if isinstance(model, (str, Path)):
        return load(model, model_factory=model_factory, input_shape=input_shape)
    raise BadInput(f"expected a model file path or a CsqcModel, got {type(model).__name__} "
                   "(save a torch model with csqc.save first)")


def load_calibration_samples(model: CsqcModel, calibration: str | None, samples: int, seed: int = 0) -> list:
    """Calibration arrays: an ``.npz`` file, ``digits`` (its training split) or random [0, 1)."""
    import numpy as np

    from .verify import load_inputs

    if calibration is None:
        rng = np.random.default_rng(seed)
        return [rng.random((samples, *s["shape"][1:]), dtype=np.float32) for s in model.input_specs]
    if calibration == "digits":
        from .data import load_digits_split

        shape = tuple(model.input_specs[0]["shape"][1:])
        split = load_digits_split(image=len(shape) == 3)
        if split.x_train.shape[1:] != shape:
            raise BadInput(f"the digits data set has samples of shape {list(split.x_train.shape[1:])}, the model takes {list(shape)}")
        return [split.x_train[:samples]]
    return load_inputs(calibration, model, max_samples=samples)


def calibration_arrays(model, calibrate, samples: int = 256) -> list:
    """Calibration samples for ``calibrate``: ``"digits"`` (its training split), an ``.npz`` path,
    one array or a list of arrays (one per model input, samples first); at most ``samples``."""
    import numpy as np

    if isinstance(calibrate, (str, Path)):
        return load_calibration_samples(to_model(model), str(calibrate), samples)
    one_array = isinstance(calibrate, np.ndarray) or callable(getattr(calibrate, "detach", None))  # (a torch tensor)
    arrays = [calibrate] if one_array else list(calibrate)
    return [np.asarray(a.detach() if callable(getattr(a, "detach", None)) else a, np.float32)[:samples] for a in arrays]


def capture_calibrated(model, *, batch: int | None = None, calibrate=None) -> tuple[Graph, dict | None]:
    """The captured graph, its dynamic quantizers made static on ``calibrate`` when given
    (see ``csqc.passes.calibrate_scales``), and the calibration report (None: not calibrated)."""
    graph, report, _ = _capture_and_calibrate(model, batch, calibrate)
    return graph, report


def _capture_and_calibrate(model, batch: int | None, calibrate):
    """``capture_calibrated`` and the ``Calibration`` the artifact records (None: not calibrated)."""
    from .capture import capture

    model = to_model(model)
    graph = capture(model, batch=batch)
    if calibrate is None:
        return graph, None, None
    from .calibration import record_calibration
    from .passes.calibrate_scales import calibrate as calibrate_graph, calibration_report
    from .verify import check_batch_first

    check_batch_first(model, "calibration")
    arrays = calibration_arrays(model, calibrate)
    result, quantizers = calibrate_graph(graph, arrays)
    source = str(calibrate) if isinstance(calibrate, (str, Path)) else "arrays"
    static = [q.name for q in quantizers if q.scale is not None]
    record = record_calibration(result.graph, static, source, arrays) if static else None
    return result.graph, calibration_report(quantizers, source, len(arrays[0])), record


def optimize(model, pipeline: str = "default", *, batch: int | None = None, dump_dir=None, calibrate=None) -> Graph:
    """Capture ``model`` (calibrated on ``calibrate`` when given) and run an IR pipeline over it."""
    from .passes import run_passes

    graph, _ = capture_calibrated(model, batch=batch, calibrate=calibrate)
    graph, _ = run_passes(graph, pipeline, dump_dir=dump_dir)
    return graph


def inspect(model, *, batch: int | None = None, calibrate=None):
    """Per-layer report of the optimized graph (bits, planes, sizes, CPU kernel choice);
    ``calibrate``: of the model calibrated on that data (the report's ``calibration`` says so)."""
    from .passes import run_passes
    from .report import inspect_graph

    captured, calibration = capture_calibrated(model, batch=batch, calibrate=calibrate)
    graph, _ = run_passes(captured, "default")
    kernels = {}
    try:
        from .targets.llvm.kernels import cpu_target
        from .targets.llvm.target import cpu_backend
        from .targets.tvm.lower import output_rows
        from .interpreter import decode_weight

        backend = cpu_backend(cpu_target(None))  # this CPU's, as `csqc compile` without --mcpu
        for n in graph.quant_layers():
            kernels[n.name] = backend.choose_kernel(n, output_rows(n), decode_weight(graph, n)).kernel
    except ImportError:  # TVM missing: the report still stands without kernel choices
        pass
    report = inspect_graph(graph, kernels, captured)
    report.calibration = calibration
    return report


def is_artifact_path(path) -> bool:
    """Whether ``path`` names a compiled artifact (``.so`` of the TVM targets, ``.onnx``), not a model file."""
    return Path(path).name.endswith((".so", ".onnx"))


def inspect_artifact(path) -> dict:
    """What a compiled artifact says about itself, read and checked without loading its library
    or running a graph: its target, model name, size in bytes, inputs and outputs (name, shape,
    dtype), the digest of the model's weights (``csqc.provenance``; None: not recorded), thread cap (where it has one), the calibration it records (``csqc.calibration``;
    None: dynamic scales); for a TVM artifact also the CPU it was built for, its layers by
    kernel, its float-input convs by weight layout (``float_layouts``), kernel calls, and the memory a loaded model takes (weights, buffers derived at load,
    intermediates shared and unshared: ``targets.tvm.memory``); for ONNX its operators."""
    from .calibration import onnx_calibration, plan_calibration
    from .provenance import onnx_digest, plan_digest

    path = Path(path)
    info: dict = {"artifact": str(path)}
    if path.name.endswith(".onnx"):
        from .targets.onnx.runner import load_onnx

        model = load_onnx(path)
        kind = {p.key: p.value for p in model.metadata_props}.get("csqc.kind", "not written by csqc")
        target, name = f"onnx ({kind})", model.graph.name
        calibration, threads, digest = onnx_calibration(model, path), None, onnx_digest(model, path)
        inputs, outputs = (_onnx_tensors(model.graph.input), _onnx_tensors(model.graph.output))
        operators: dict[str, int] = {}
        for node in model.graph.node:
            operators[node.op_type] = operators.get(node.op_type, 0) + 1
        details = {"operators": dict(sorted(operators.items(), key=lambda kv: (-kv[1], kv[0])))}
    else:
        from .artifact import read_artifact
        from .runtime import check_plan
        from .targets.tvm.memory import pooled_bytes, temp_memory

        contents = read_artifact(path)  # digests and sizes, then the plan: no library is loaded
        plan = contents.plan
        check_plan(path, plan, contents.weights)
        target, name = plan["target"]["kind"], str(plan.get("model"))
        calibration, digest = plan_calibration(plan, path), plan_digest(plan, path)
        threads = plan.get("threads")
        inputs = [{k: spec[k] for k in ("name", "shape", "dtype")} for spec in plan["inputs"]]
        outputs = [{k: spec[k] for k in ("name", "shape", "dtype")} for spec in plan["outputs"]]
        buffers = plan["buffers"]
        kernels = _counts(layer["kernel"] for layer in plan["layers"].values())
        temps = temp_memory(buffers, plan.get("pools", {}))
        details = {
            "cpu": plan["target"].get("mcpu") or plan["target"].get("arch") or "",
            "layers": kernels,
            "kernel_calls": len(plan["steps"]), "whole_model_function": "entry" in plan,
            # depthwise convs that try their codes at the ReLU6 bound first (saturated dynamic scales)
            "saturated_scales": sum("saturated" in layer for layer in plan["layers"].values()),
            # convs between two clips whose dynamic epilogue runs its codes at the bounds where both saturate
            "saturated_epilogues": sum("saturated_epilogue" in layer for layer in plan["layers"].values()),
            # float-input quantized convs whose weights the runtime derives in a kernel form's order
            "float_layouts": _counts(layer["float_layout"] for layer in plan["layers"].values()
                                     if layer.get("float_layout")),
            "memory": {"weights": sum(int(w.nbytes) for w in contents.weights.values()),
                       "derived": pooled_bytes({n: b for n, b in buffers.items()
                                                if b["kind"] == "derived" and "alias" not in b}, {}),
                       "intermediates": temps["temp_bytes"], "intermediates_unshared": temps["temp_bytes_unshared"],
                       "pools": len(plan.get("pools", {}))}}
    info.update({"target": target, "model": name, "model_digest": digest, "bytes": path.stat().st_size, "inputs": inputs,
                 "outputs": outputs, **details, **({"threads": threads} if threads else {})})
    info["calibration"] = None if calibration is None else {
        "scales": len(calibration), "samples": calibration.samples,
        "source_sha256": calibration.source_sha256, "data_sha256": calibration.data_sha256,
        "quantizers": calibration.summary()}
    return info


def _counts(names) -> dict[str, int]:
    """How often each name occurs, the most frequent first (ties by name)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _onnx_tensors(values) -> list[dict]:
    """Name, shape (a symbolic dimension by its name) and dtype of ONNX graph inputs or outputs."""
    import onnx

    tensors = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
        except (KeyError, ValueError, TypeError):  # a type number ONNX does not define: the file says so
            dtype = f"unknown ONNX type {tensor.elem_type}"
        tensors.append({"name": value.name, "shape": shape, "dtype": dtype})
    return tensors


def compile(model, target: str = "llvm", output=None, *, batch: int | str | None = None, pipeline: str | None = None,
            mcpu: str | None = None, arch: str = "sm_80", emit_source=None, force_kernel: str | None = None,
            onnx_form: str = "reference",
            check_planes: bool = False, calibration=None, int4: bool = True, dump_ir=None, calibrate=None,
            on_layer: Callable[[str], None] | None = None, model_factory=None, input_shape=None,
            tune: bool = False, on_tune: Callable[[str], None] | None = None) -> CompileResult:
    """Compile a model for ``target`` and write the artifact to ``output`` (atomically).

    ``mcpu``: LLVM CPU name for ``llvm`` and ``aarch64``; ``arch`` (sm_80, sm_90, ...) and ``emit_source`` (a
    folder for the CUDA source) for ``cuda``; ``onnx_form``, ``check_planes`` and
    ``calibration`` (arrays, for the deploy form) for ``onnx``. ``batch="dynamic"`` (onnx only):
    a symbolic batch dimension instead of a fixed batch size. ``calibrate`` (every target):
    ``"digits"``, an ``.npz`` path or arrays; the dynamic activation scales become static ones
    measured there by the interpreter, a different model (the report's ``calibration`` says so).
    ``tune`` (``llvm``, this machine's CPU): time candidate schedules of the bit-parallel kernels and
    the bit-serial linear kernels per layer shape here and build with the fastest, cached on disk (``$CSQC_TUNING_CACHE``, else
    ``~/.cache/csqc/tuning.json``) for the next ``tune``; ``on_tune`` is called per shape searched.
    """
    from .targets.registry import CompileOptions, check_coverage, get_target

    entry = get_target(target)
    batch, dynamic_batch = _batch_option(batch, target)
    options = CompileOptions(mcpu=mcpu, arch=arch, emit_source=emit_source, force_kernel=force_kernel,
                             onnx_form=onnx_form, check_planes=check_planes, calibration=calibration, int4=int4,
                             dynamic_batch=dynamic_batch, on_layer=on_layer, tune=tune, on_tune=on_tune)
    if tune and not entry.tunable:
        raise BadInput(f"--tune searches CPU kernel schedules on this machine; it is for --target llvm, not {target}")
    entry.check(options)  # a missing toolchain or a bad option fails before the slow part
    from .outputs import check_output, check_output_folder

    model = to_model(model, model_factory=model_factory, input_shape=input_shape)
    if dynamic_batch and not all(model.batched_inputs):
        fixed = [f"{s['name']} {s['shape']}" for s, b in zip(model.input_specs, model.batched_inputs) if not b]
        raise BadInput(f"--batch dynamic needs every input to take any batch on its first axis; "
                       f"{', '.join(fixed)} {'has a' if len(fixed) == 1 else 'have'} fixed shape"
                       f"{'' if len(fixed) == 1 else 's'}: compile for the batch the model takes (--batch N)")
    if output is None:
        output = default_output(model.source, target, arch=arch, onnx_form=onnx_form)
    # every output, before the work: `compile model.so` would otherwise replace its own input
    output = check_output(output, inputs=[model.source])
    for folder, what in ((dump_ir, "--dump-ir"), (emit_source, "--emit-source")):
        if folder is not None:
            check_output_folder(folder, what=what)
    from .passes import run_passes
    from .provenance import model_digest
    from .report import activation_rows

    start = time.perf_counter()
    captured, calibrated, record = _capture_and_calibrate(model, batch, calibrate)
    graph, _ = run_passes(captured, pipeline or entry.pipeline, dump_dir=dump_ir)
    check_coverage(entry, graph)
    # the artifact records its scales, and which model it was built from (verify and bench check it)
    options = dataclasses.replace(options, calibration_record=record, model_digest=model_digest(model))
    # which quantizer feeds each layer (csqc's, a recognised idiom, one left float): from the
    # captured graph, where a left-float clip is not yet fused into its layer
    report = {**entry.emit(graph, output, options), "activations": [r.to_json() for r in activation_rows(captured)]}
    if calibrated is not None:
        report = {**report, "calibration": calibrated}
    return CompileResult(target, Path(output), graph, report, time.perf_counter() - start)


def _batch_option(batch: int | str | None, target: str) -> tuple[int | None, bool]:
    """(batch size to capture at, symbolic batch dimension?) for ``compile``'s ``batch``."""
    if batch is None or (isinstance(batch, numbers.Integral) and not isinstance(batch, bool)):
        return batch, False
    if batch != "dynamic":
        raise BadInput(f"batch must be a whole number of samples, None (the model file's) or 'dynamic', got {batch!r}")
    if target != "onnx":  # TVM kernels are built for one batch size: their loops and buffers are fixed
        raise BadInput(f"--batch dynamic is for --target onnx; a {target} artifact runs one batch size, "
                       "compile it with --batch N")
    return None, True
