"""Target registry: each target subpackage declares one ``Target`` and registers it by name.

A target's ``entry`` module (``csqc.targets.<name>.entry``) builds its ``Target`` and calls
``register``; it must stay cheap to import (no TVM, no ONNX): ``check`` and ``emit`` import
their toolchains when called. ``compile()`` looks a target up here instead of branching on
names, so adding a target means one subpackage with an ``entry`` module, named in ``BUILTIN``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from csqc.errors import BadInput, CompileError
from csqc.ir import Graph

__all__ = ["BUILTIN", "CompileOptions", "Target", "register", "get_target", "registered_targets", "check_coverage",
           "describe_nodes", "support_matrix", "support_table_markdown"]

# subpackages with an ``entry`` module, in the order the CLI and error messages list them
BUILTIN = ("llvm", "aarch64", "cuda", "onnx")


@dataclass(frozen=True)
class CompileOptions:
    """The per-target knobs of ``csqc.compile``; each target reads the ones it knows."""

    mcpu: str | None = None  # llvm, aarch64: LLVM CPU name
    arch: str = "sm_80"  # cuda: GPU architecture
    emit_source: object = None  # cuda: folder for the CUDA source
    force_kernel: str | None = None  # TVM targets: bitserial | bitparallel | None (cost model)
    onnx_form: str = "reference"  # onnx: reference | deploy
    check_planes: bool = False  # onnx reference: one product per weight plane
    calibration: object = None  # onnx deploy: calibration inputs
    int4: bool = True  # onnx deploy: MatMulNBits where weights fit 4 bits
    dynamic_batch: bool = False  # onnx: a symbolic batch dimension (compile --batch dynamic)
    on_layer: Callable[[str], None] | None = None  # progress callback, one call per lowered node
    calibration_record: object = None  # every target: the csqc.calibration.Calibration the artifact records
    model_digest: str | None = None  # every target: the csqc.provenance digest of the model it was compiled from
    tune: bool = False  # targets that can (``Target.tunable``): search kernel schedules here, cached on disk
    on_tune: Callable[[str], None] | None = None  # progress callback, one call per kernel shape searched


@dataclass(frozen=True)
class Target:
    name: str
    description: str  # one line, for help texts
    pipeline: str  # the IR pipeline (csqc.passes.PIPELINES) it consumes
    suffix: str  # of its artifact file, with the dot
    runs_here: bool  # its artifacts run on this machine's CPU
    needs_gpu: bool  # its artifacts run on an NVIDIA GPU only
    emulated: bool  # verify runs its artifacts under an emulator
    # pre-flight: raise BadInput for a missing toolchain or a bad option before capture and passes
    check: Callable[[CompileOptions], None]
    # lower the optimized graph and write the artifact to ``output``; returns the report
    emit: Callable[[Graph, Path, CompileOptions], dict]
    # coverage, asked before lowering: ``(op or op [form], node)`` for every node it cannot lower
    unsupported: Callable[[Graph], list[tuple[str, str]]]
    # the IR ops it lowers (some in every form but those ``unsupported`` names), for the docs
    ops: Callable[[], frozenset[str]]
    # whether ``compile(tune=True)`` can time its kernels on this machine and pick schedules
    tunable: bool = False


_REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in _REGISTRY:
        raise RuntimeError(f"target {target.name} registered twice (is csqc.targets imported under two names?)")
    _REGISTRY[target.name] = target
    return target


def registered_targets() -> dict[str, Target]:
    """Every built-in target by name, in ``BUILTIN`` order."""
    for name in BUILTIN:
        if name not in _REGISTRY:
            importlib.import_module(f"csqc.targets.{name}.entry")
    return {name: _REGISTRY[name] for name in BUILTIN} | {n: t for n, t in _REGISTRY.items() if n not in BUILTIN}


def check_coverage(target: Target, graph: Graph) -> None:
    """Every op the target cannot lower, in one error, before any kernel is built."""
    missing = target.unsupported(graph)
    if missing:
        raise CompileError(f"the {target.name} target cannot lower op(s): {describe_nodes(missing)}")


def describe_nodes(missing: list[tuple[str, str]]) -> str:
    """``op (at node, node, ...); ...``, four nodes per op at most."""
    at: dict[str, list[str]] = {}
    for op, node in missing:
        at.setdefault(op, []).append(node)
    return "; ".join(f"{op} (at {', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''})"
                     for op, nodes in sorted(at.items()))


def support_matrix() -> dict[str, dict[str, bool]]:
    """op -> {"interpreter": True, target: lowers it} for every op of the op table."""
    from csqc.optable import OP_TABLE

    lowered = {name: t.ops() for name, t in registered_targets().items()}
    return {op: {"interpreter": True, **{name: op in ops for name, ops in lowered.items()}} for op in OP_TABLE}


def support_table_markdown() -> str:
    """The README's table of supported IR ops per runtime (``csqc ops --markdown``)."""
    from csqc.optable import OP_TABLE

    matrix = support_matrix()
    runtimes = list(next(iter(matrix.values())))
    lines = ["| op | what it computes | " + " | ".join(runtimes) + " |",
             "|---|---|" + "---|" * len(runtimes)]
    for op, row in matrix.items():
        doc = OP_TABLE[op].doc.replace("|", "\\|")
        lines.append(f"| `{op}` | {doc} | " + " | ".join("yes" if row[r] else "**no**" for r in runtimes) + " |")
    return "\n".join(lines) + "\n"


def get_target(name: str) -> Target:
    targets = registered_targets()
    try:
        return targets[name]
    except KeyError:
        raise BadInput(f"unknown target {name!r}; choose one of: {', '.join(targets)}") from None
