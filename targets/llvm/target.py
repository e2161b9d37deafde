"""The ``llvm`` target: build a lowered plan into one shared library, write the artifact.

An artifact is a single file: the TVM-built shared library with a zip archive appended
(``plan.json`` + ``weights.npz`` + ``integrity.json``, see ``csqc.artifact``), so
``csqc.runtime`` needs only numpy and the TVM runtime to run it.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from csqc.archive import npz_bytes
from csqc.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, write_artifact_file
from csqc.errors import BadInput, CompileError
from csqc.ir import Graph

from .lower import Plan, lower_graph

__all__ = ["ARTIFACT_FORMAT", "check_cpu", "build_plan", "write_artifact", "emit_llvm"]

log = logging.getLogger(__name__)


def check_cpu(mcpu: str | None) -> None:
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


def build_plan(plan: Plan, target) -> object:
    """Compile every PrimFunc of the plan into one TVM executable."""
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in plan.funcs.items()})
    # see kernels._ON_STACK: storage rewrite would drop the on-stack annotation of scratch buffers
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        return tvm.compile(mod, target=target)


def write_artifact(plan: Plan, executable, path: str | os.PathLike, meta: dict, *, fcompile=None) -> Path:
    """``fcompile``: the linker ``export_library`` uses (a cross compiler for foreign targets)."""
    doc = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **meta,
        "inputs": plan.inputs, "outputs": plan.outputs, "buffers": plan.buffers,
        "steps": plan.steps, "layers": plan.layers,
    }
    with tempfile.TemporaryDirectory(prefix="csqc-build-") as d:
        lib = os.path.join(d, "lib.so")
        executable.export_library(lib, fcompile=fcompile)
        library = Path(lib).read_bytes()
    write_artifact_file(path, library, doc, npz_bytes(plan.weights))
    return Path(path)


def emit_llvm(graph: Graph, output, *, mcpu: str | None = None, mattr=None, force_kernel: str | None = None,
              on_layer: Callable[[str], None] | None = None, target_kind: str = "llvm") -> dict:
    """Lower, build and write an artifact; returns a report (kernels per layer, timings, sizes)."""
    from .kernels import cpu_target

    try:
        target = cpu_target(mcpu, mattr)
    except Exception as e:
        raise CompileError(f"invalid CPU target (mcpu={mcpu!r}): {e}") from None
    t0 = time.perf_counter()
    plan = lower_graph(graph, force_kernel=force_kernel, on_layer=on_layer)
    t1 = time.perf_counter()
    executable = build_plan(plan, target)
    t2 = time.perf_counter()
    meta = {"target": {"kind": target_kind, "mcpu": str(target.attrs.get("mcpu", ""))}, "model": graph.name}
    write_artifact(plan, executable, output, meta)
    weight_bytes = sum(int(a.nbytes) for a in plan.weights.values())  # stored in the artifact
    return {
        "target": target_kind, "output": str(output), "mcpu": meta["target"]["mcpu"],
        "kernels": {name: info["kernel"] for name, info in plan.layers.items()},
        "layers": plan.layers, "functions": len(plan.funcs), "steps": len(plan.steps),
        "lower_seconds": t1 - t0, "build_seconds": t2 - t1, "weight_bytes": weight_bytes,
        "size_bytes": Path(output).stat().st_size,
    }
