"""The ``aarch64`` target's registry entry (cheap to import: the TVM work is imported when called)."""
from __future__ import annotations

from pathlib import Path

from csqc.ir import Graph
from csqc.targets.registry import CompileOptions, Target, register
from csqc.targets.tvm import coverage as tvm_coverage

__all__ = ["TARGET"]


def _check(options: CompileOptions) -> None:
    """A missing cross compiler or an unknown CPU fails here, before the slow part."""
    from .target import check_toolchain

    check_toolchain(options.mcpu, options.force_kernel)


def _emit(graph: Graph, output: Path, options: CompileOptions) -> dict:
    from .target import emit_aarch64

    return emit_aarch64(graph, output, mcpu=options.mcpu, force_kernel=options.force_kernel, on_layer=options.on_layer,
                        calibration=options.calibration_record,
                        model_digest=options.model_digest)


TARGET = register(Target(
    name="aarch64", description="TVM ARM64 CPU: bit-serial NEON kernels, cross-compiled shared library",
    pipeline="default", suffix=".so", runs_here=False, needs_gpu=False, emulated=True, check=_check, emit=_emit,
    unsupported=tvm_coverage.unsupported, ops=tvm_coverage.ops,
))
