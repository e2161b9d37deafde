"""The compiler driver: model file -> capture -> passes -> target. Library twin of the CLI."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BadInput, CompileError
from .ir import Graph

__all__ = ["TARGETS", "CompileResult", "default_output", "optimize", "compile", "inspect", "to_model"]

log = logging.getLogger(__name__)

# target name -> (IR pipeline it consumes, one-line description)
TARGETS: dict[str, tuple[str, str]] = {
    "llvm": ("default", "TVM CPU: bit-serial / bit-parallel kernels, one shared library"),
    "aarch64": ("default", "TVM ARM64 CPU: bit-serial NEON kernels, cross-compiled shared library"),
    "cuda": ("default", "TVM CUDA: GPU bit-serial / bit-parallel kernels, device code compiled ahead of time"),
    "onnx": ("integer", "ONNX: integer-exact reference graph (or --onnx-form deploy)"),
}


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


def optimize(model, pipeline: str = "default", *, batch: int | None = None, dump_dir=None) -> Graph:
    """Capture ``model`` and run an IR pipeline over it."""
    from .capture import capture
    from .passes import run_passes

    graph = capture(to_model(model), batch=batch)
    graph, _ = run_passes(graph, pipeline, dump_dir=dump_dir)
    return graph


def inspect(model, *, batch: int | None = None):
    """Per-layer report of the optimized graph (bits, planes, sizes, CPU kernel choice)."""
    from .capture import capture
    from .passes import run_passes
    from .report import inspect_graph

    captured = capture(to_model(model), batch=batch)
    graph, _ = run_passes(captured, "default")
    kernels = {}
    try:
        from .targets.llvm.lower import _rows, choose_kernel
        from .interpreter import decode_weight

        for n in graph.quant_layers():
            kernels[n.name] = choose_kernel(n, _rows(n), decode_weight(graph, n)).kernel
    except ImportError:  # TVM missing: the report still stands without kernel choices
        pass
    return inspect_graph(graph, kernels, captured)


def compile(model, target: str = "llvm", output=None, *, batch: int | str | None = None, pipeline: str | None = None,
            mcpu: str | None = None, arch: str = "sm_80", emit_source=None, force_kernel: str | None = None,
            onnx_form: str = "reference",
            check_planes: bool = False, calibration=None, int4: bool = True, dump_ir=None,
            on_layer: Callable[[str], None] | None = None, model_factory=None, input_shape=None) -> CompileResult:
    """Compile a model for ``target`` and write the artifact to ``output`` (atomically).

    ``mcpu``: LLVM CPU name for ``llvm`` and ``aarch64``; ``arch`` (sm_80, sm_90, ...) and ``emit_source`` (a
    folder for the CUDA source) for ``cuda``; ``onnx_form``, ``check_planes`` and
    ``calibration`` (arrays, for the deploy form) for ``onnx``. ``batch="dynamic"`` (onnx only):
    a symbolic batch dimension instead of a fixed batch size.
    """
    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    batch, dynamic_batch = _batch_option(batch, target)
    if target == "cuda":  # fail on a missing nvcc or a bad arch before the slow part
        from .targets.cuda.target import check_toolchain

        check_toolchain(arch)
    if target == "llvm":
        _check_cpu(mcpu)
    if target == "aarch64":  # fail on a missing cross compiler or an unknown CPU before the slow part
        from .targets.aarch64.target import check_toolchain as check_cross_toolchain

        check_cross_toolchain(mcpu, force_kernel)
    from .outputs import check_output, check_output_folder

    model = to_model(model, model_factory=model_factory, input_shape=input_shape)
    if output is None:
        output = default_output(model.source, target, arch=arch, onnx_form=onnx_form)
    # every output, before the work: `compile model.so` would otherwise replace its own input
    output = check_output(output, inputs=[model.source])
    for folder, what in ((dump_ir, "--dump-ir"), (emit_source, "--emit-source")):
        if folder is not None:
            check_output_folder(folder, what=what)
    start = time.perf_counter()
    graph = optimize(model, pipeline or TARGETS[target][0], batch=batch, dump_dir=dump_ir)
    if target == "llvm":
        from .targets.llvm.target import emit_llvm

        report = emit_llvm(graph, output, mcpu=mcpu, force_kernel=force_kernel, on_layer=on_layer)
    elif target == "aarch64":
        from .targets.aarch64.target import emit_aarch64

        report = emit_aarch64(graph, output, mcpu=mcpu, force_kernel=force_kernel, on_layer=on_layer)
    elif target == "cuda":
        from .targets.cuda.target import emit_cuda

        report = emit_cuda(graph, output, arch=arch, emit_source=emit_source, on_layer=on_layer,
                           force_kernel=force_kernel)
    elif target == "onnx":
        report = _emit_onnx(graph, output, onnx_form, check_planes, calibration, int4, dynamic_batch)
    else:  # pragma: no cover - TARGETS is the source of truth
        raise CompileError(f"target {target} has no emitter")
    return CompileResult(target, Path(output), graph, report, time.perf_counter() - start)


def _check_cpu(mcpu: str | None) -> None:
    """LLVM aborts the whole process when asked for instructions a CPU lacks: refuse first."""
    import tvm
    from tvm.target import codegen

    cpu, triple = mcpu or codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple()
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise BadInput(f"--mcpu {cpu!r} is not a CPU LLVM knows for {triple}; leave it out to build for this "
                       "machine, or name one such as cascadelake, icelake-server, znver4")
    if not codegen.llvm_cpu_has_features(["avx512vnni"], tvm.target.Target({"kind": "llvm", "mcpu": cpu})):
        hint = ("name one that has it, e.g. cascadelake, icelake-server, sapphirerapids, znver4" if mcpu
                else "compile on such a machine, or for one with --mcpu cascadelake (or newer)")
        raise (BadInput if mcpu else CompileError)(
            f"CPU {cpu!r} has no AVX-512 VNNI, which csqc's CPU kernels are built on; {hint}")


def _batch_option(batch: int | str | None, target: str) -> tuple[int | None, bool]:
    """(batch size to capture at, symbolic batch dimension?) for ``compile``'s ``batch``."""
    if batch != "dynamic":
        return batch, False
    if target != "onnx":  # TVM kernels are built for one batch size: their loops and buffers are fixed
        raise BadInput(f"--batch dynamic is for --target onnx; a {target} artifact runs one batch size, "
                       "compile it with --batch N")
    return None, True


def _emit_onnx(graph: Graph, output: Path, form: str, check_planes: bool, calibration, int4: bool,
               dynamic_batch: bool = False) -> dict:
    from .targets.onnx.reference import emit_reference
    from .targets.onnx.runner import save_onnx

    if form == "reference":
        model = emit_reference(graph, check_planes=check_planes, dynamic_batch=dynamic_batch)
        save_onnx(model, output)
        return {"onnx_form": "reference", "size_bytes": output.stat().st_size, "dynamic_batch": dynamic_batch}
    if form == "deploy":
        from .targets.onnx.deploy import emit_deploy

        if calibration is None:
            raise BadInput("--onnx-form deploy needs calibration inputs (--dataset digits or --calibration file.npz)")
        model, report = emit_deploy(graph, calibration, int4=int4, dynamic_batch=True if dynamic_batch else None)
        save_onnx(model, output)
        return {"onnx_form": "deploy", **report}
    raise BadInput(f"unknown --onnx-form {form!r}: use reference or deploy")
