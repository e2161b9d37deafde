"""The ``cuda`` target's registry entry (cheap to import: the TVM work is imported when called)."""
from __future__ import annotations

from pathlib import Path

from csqc.ir import Graph
from csqc.targets.registry import CompileOptions, Target, register
from csqc.targets.tvm import coverage as tvm_coverage

__all__ = ["TARGET"]


def _check(options: CompileOptions) -> None:
    """A missing nvcc or a bad arch fails here, before the slow part."""
    from .target import check_toolchain

    check_toolchain(options.arch)


def _emit(graph: Graph, output: Path, options: CompileOptions) -> dict:
    from .target import emit_cuda

    return emit_cuda(graph, output, arch=options.arch, emit_source=options.emit_source, on_layer=options.on_layer,
                     force_kernel=options.force_kernel, calibration=options.calibration_record,
                     model_digest=options.model_digest)


TARGET = register(Target(
    name="cuda", description="TVM CUDA: GPU bit-serial / bit-parallel kernels, device code compiled ahead of time",
    pipeline="default", suffix=".so", runs_here=False, needs_gpu=True, emulated=False, check=_check, emit=_emit,
    unsupported=tvm_coverage.unsupported, ops=tvm_coverage.ops,
))
