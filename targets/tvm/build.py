"""Build a lowered plan into one TVM library and write it as a csqc artifact.

An artifact is a single file: the TVM-built shared library with a zip archive appended
(``plan.json`` + ``weights.npz`` + ``integrity.json``); ``csqc.artifact`` owns that format and
its reading, so ``csqc.runtime`` needs only numpy and the TVM runtime to run it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from csqc.archive import npz_bytes
from csqc.artifact import plan_document, write_artifact_file

from .lower import Plan

__all__ = ["build_plan", "write_artifact"]


def build_plan(plan: Plan, target) -> object:
    """Compile every PrimFunc of the plan into one TVM executable."""
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in plan.funcs.items()})
    # see kernels._ON_STACK: storage rewrite would drop the on-stack annotation of scratch buffers
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        return tvm.compile(mod, target=target)


def write_artifact(plan: Plan, executable, path: str | os.PathLike, meta: dict, *, fcompile=None) -> Path:
    """``fcompile``: the linker ``export_library`` uses (a cross compiler for foreign targets)."""
    doc = plan_document(meta, inputs=plan.inputs, outputs=plan.outputs, buffers=plan.buffers, steps=plan.steps,
                        layers=plan.layers, entry=plan.entry, pools=plan.pools)
    with tempfile.TemporaryDirectory(prefix="csqc-build-") as d:
        lib = os.path.join(d, "lib.so")
        executable.export_library(lib, fcompile=fcompile)
        library = Path(lib).read_bytes()
    write_artifact_file(path, library, doc, npz_bytes(plan.weights))
    return Path(path)
