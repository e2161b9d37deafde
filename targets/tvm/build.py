"""Build a lowered plan into one TVM library and write it as a csqc artifact.

An artifact is a single file: the TVM-built shared library with a zip archive appended
(``plan.json`` + ``weights.npz`` + ``integrity.json``); ``csqc.artifact`` owns that format and
its reading, so ``csqc.runtime`` needs only numpy and the TVM runtime to run it.

LLVM takes most of a compile (MobileNetV2: 27 of its 31 s), one thread per module, and its
time grows faster than the module does. So the plan's functions are compiled as several
modules on threads side by side (TVM's passes and LLVM release the GIL), their objects written
side by side, and the link joins them into one library: MobileNetV2's build 27 -> 11 s on two
cores, 19 s on one (Zen 4). The whole-model function calls the kernels of other modules through
symbols the link defines (``whole_model.py``).
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from csqc.archive import npz_bytes
from csqc.artifact import plan_document, write_artifact_file
from csqc.errors import BadInput, CompileError

from .lower import Plan
from .vector_lanes import check_vector_widths
from .whole_model import WHOLE_MODEL_FUNC

__all__ = ["BUILD_THREADS_ENV", "PlanLibrary", "build_plan", "build_threads", "side_by_side", "write_artifact"]

BUILD_THREADS_ENV = "CSQC_BUILD_THREADS"
# the symbol TVM exports a PrimFunc's packed entry under
FFI_SYMBOL_PREFIX = "__tvm_ffi_"
# Kernels per module. A module has a cost of its own (~50 ms: the pass pipeline, LLVM's setup), so
# tiny kernels share one, and enough modules keep every thread busy to the end. A count of the
# plan's, not of the threads: the library is the same bytes on any thread count. Build and
# link (Zen 4, two threads / one): MobileNetV2 (79 functions) 10-11 / 19 s, 27 s as one module;
# a 4-layer Llama of 34 small ones 2.7 / 4.3 s, 4.1 s as one; ResNet-20 3.4 / 4.7 s.
KERNELS_PER_MODULE = 2


def build_threads() -> int:
    """Threads to build with: ``$CSQC_BUILD_THREADS``, else the CPUs this process may run on."""
    value = os.environ.get(BUILD_THREADS_ENV)
    if value is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if not value.strip().isdigit() or int(value) < 1:
        raise BadInput(f"${BUILD_THREADS_ENV} must be a positive number of threads, not {value!r}")
    return int(value)


class PlanLibrary:
    """A plan compiled as several LLVM modules; ``export_library`` writes their objects and
    links them into one shared library, defining each call-site symbol of ``calls`` as the
    entry of the kernel it names."""

    def __init__(self, modules: Sequence, calls: dict[str, str], threads: int):
        self.modules, self.calls, self.threads = list(modules), dict(calls), threads

    def export_library(self, path: str | os.PathLike, fcompile: Callable | None = None) -> None:
        """``fcompile``: the linker (TVM's ``create_shared`` signature: output, files); default
        this machine's C++ compiler driver."""
        from tvm.support.cc import create_shared

        with tempfile.TemporaryDirectory(prefix="csqc-objects-") as folder:
            objects = [os.path.join(folder, f"part{i}.o") for i in range(len(self.modules))]
            side_by_side(lambda i: self.modules[i].write_to_file(objects[i]), range(len(objects)), self.threads)
            inputs = list(objects)
            if self.calls:  # an implicit linker script: symbol assignments only
                script = os.path.join(folder, "calls.ld")
                Path(script).write_text("".join(f"{symbol} = {FFI_SYMBOL_PREFIX}{func};\n"
                                                for symbol, func in self.calls.items()))
                inputs.append(script)
            (fcompile or create_shared)(os.fspath(path), inputs)


def build_plan(plan: Plan, target, *, threads: int | None = None) -> PlanLibrary:
    """Compile every PrimFunc of the plan, as modules of a few functions each, on ``threads``
    threads (default :func:`build_threads`); the modules do not depend on ``threads``."""
    import tvm

    threads = threads or build_threads()
    funcs = {name: f.with_attr("global_symbol", name) for name, f in plan.funcs.items()}
    missing = sorted(set(plan.calls.values()) - set(funcs))
    if missing:
        raise CompileError(f"the whole-model function calls kernels the plan lacks: {', '.join(missing)}")
    check_vector_widths(funcs)

    def compile_part(names: list[str]):
        # the pass context is per thread; see kernels._ON_STACK: storage rewrite would drop the
        # on-stack annotation of scratch buffers
        with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
            module = tvm.compile(tvm.IRModule({name: funcs[name] for name in names}), target=target).mod
        if module.kind != "llvm" or list(module.imports):
            raise CompileError(f"TVM built {module.kind!r} module with {len(module.imports)} imports for "
                               f"{', '.join(names[:3])}; expected one LLVM module")
        return module

    return PlanLibrary(side_by_side(compile_part, _parts(funcs), threads), plan.calls, threads)


def _parts(funcs: dict) -> list[list[str]]:
    """The function names of each module: the whole-model function alone, first (the largest:
    it unpacks every buffer; MobileNetV2's takes 2.2 s), then the kernels dealt round-robin,
    ``KERNELS_PER_MODULE`` to a module."""
    kernels = [name for name in funcs if name != WHOLE_MODEL_FUNC]
    count = -(-len(kernels) // KERNELS_PER_MODULE)
    parts = [[WHOLE_MODEL_FUNC]] if WHOLE_MODEL_FUNC in funcs else []
    return parts + [kernels[i::count] for i in range(count)]


def side_by_side(work: Callable, items, threads: int) -> list:
    """``[work(item) for item in items]`` on up to ``threads`` threads, in order. The first
    failure is raised once the work in flight has finished; work not yet started is dropped."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    pool = ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="csqc-build")
    try:
        futures = [pool.submit(work, item) for item in items]
        return [future.result() for future in futures]
    finally:  # also on Ctrl-C: no new work, and no thread left writing into a removed folder
        pool.shutdown(wait=True, cancel_futures=True)


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
