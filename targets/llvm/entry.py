"""The ``llvm`` target's registry entry (cheap to import: the TVM work is imported when called)."""
from __future__ import annotations

from pathlib import Path

from csqc.ir import Graph
from csqc.targets.registry import CompileOptions, Target, register
from csqc.targets.tvm import coverage as tvm_coverage

__all__ = ["TARGET"]


def _check(options: CompileOptions) -> None:
    from .target import check_cpu, check_tune

    check_cpu(options.mcpu)
    if options.tune:
        check_tune(options.mcpu)


def _emit(graph: Graph, output: Path, options: CompileOptions) -> dict:
    from .target import emit_llvm

    return emit_llvm(graph, output, mcpu=options.mcpu, force_kernel=options.force_kernel, on_layer=options.on_layer,
                     calibration=options.calibration_record, model_digest=options.model_digest, tune=options.tune,
                     on_tune=options.on_tune)


TARGET = register(Target(
    name="llvm", description="TVM CPU: bit-serial / bit-parallel kernels, one shared library",
    pipeline="default", suffix=".so", runs_here=True, needs_gpu=False, emulated=False, check=_check, emit=_emit,
    unsupported=tvm_coverage.unsupported, ops=tvm_coverage.ops, tunable=True,
))
