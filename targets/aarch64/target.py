"""The ``aarch64`` target: the CPU planner's kernels cross-compiled for 64-bit ARM (NEON).

Same artifact as the ``llvm`` target (``csqc.targets.tvm.build``: TVM shared library +
``plan.json`` + ``weights.npz``), built with LLVM's aarch64 backend (``-mtriple=aarch64-linux-gnu``) and linked
by the Debian cross compiler ``aarch64-linux-gnu-gcc`` (package ``gcc-aarch64-linux-gnu``).
The plan records ``{"kind": "aarch64", "mcpu": ...}``.

Every layer on quantized activations runs the bit-serial kernel: its ``popcount`` of
``uint32`` vectors lowers to NEON ``cnt v.16b`` (byte counts) summed per lane by ``udot``
against ones on CPUs with dotprod (neoverse-n1, the default) or by ``uaddlp``/``uadalp``
pairwise widening adds (cortex-a72). The bit-parallel kernel is built on the x86 ``vpdpbusd``
intrinsic and has no ARM variant yet, so the kernel choice never picks it here. The float glue
is portable TensorIR (its 16-lane vectors become four NEON registers).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from csqc.calibration import plan_entry
from csqc.provenance import plan_entry as provenance_entry
from csqc.errors import BadInput, CompileError
from csqc.ir import Graph
from csqc.targets.llvm.backend import CpuBackend, choose_kernel as choose_cpu_kernel
from csqc.targets.tvm.backend import LayerChoice
from csqc.targets.tvm.lower import Plan, lower_graph

__all__ = ["TRIPLE", "DEFAULT_MCPU", "CROSS_COMPILER", "CROSS_PACKAGES", "check_toolchain", "aarch64_target",
           "Aarch64Backend", "emit_aarch64"]

log = logging.getLogger(__name__)

TRIPLE = "aarch64-linux-gnu"
# Arm Neoverse N1 (AWS Graviton2, Ampere Altra): ARMv8.2-A with dotprod; a common server baseline
DEFAULT_MCPU = "neoverse-n1"
CROSS_COMPILER = "aarch64-linux-gnu-gcc"
CROSS_PACKAGES = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"


def check_toolchain(mcpu: str | None = None, force_kernel: str | None = None) -> str:
    """Path of the cross compiler after checking ``mcpu`` and the kernel; ``BadInput`` (exit code 2)
    when compiling for them is impossible here."""
    from tvm.target import codegen

    if force_kernel == "bitparallel":
        raise BadInput("--kernel bitparallel is x86-only (AVX-512 VNNI); aarch64 artifacts use the bit-serial kernel")

    cpu = mcpu or DEFAULT_MCPU
    if not codegen.llvm_is_valid_cpu(cpu, TRIPLE):
        raise BadInput(f"--mcpu {cpu!r} is not an ARM64 CPU LLVM knows; name one such as neoverse-n1, "
                       "neoverse-v1, cortex-a76, cortex-a72 or apple-m1")
    compiler = shutil.which(CROSS_COMPILER)
    if compiler is None:
        raise BadInput(f"--target aarch64 links with {CROSS_COMPILER}, which is not on PATH; install it with "
                       f"`apt-get install {CROSS_PACKAGES}` (Debian/Ubuntu)")
    return compiler


def aarch64_target(mcpu: str | None = None):
    """TVM target for ``mcpu``: NEON is part of ARMv8-A; the CPU name enables the rest."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu or DEFAULT_MCPU, "mattr": ["+neon"]})


def choose_kernel(n, rows: int, q: np.ndarray) -> LayerChoice:
    """The CPU choice, with the x86-only bit-parallel kernel replaced by the bit-serial one and
    the x86-only weight-only kernels (table lookup, dequantize) by the fp32 one."""
    choice = choose_cpu_kernel(n, rows, q)
    if choice.kernel in ("lut", "dequant"):
        return LayerChoice("float", f"the {choice.kernel} weight-only kernel uses x86 vpermps (x86 would pick it: "
                                    f"{choice.reason})")
    if choice.kernel == "bitparallel":
        return LayerChoice("bitserial", f"aarch64 has no int8 dot-product kernel yet (x86 would pick bit-parallel: "
                                        f"{choice.reason})")
    return choice


class Aarch64Backend(CpuBackend):
    """The CPU backend's kernels and glue (offset codes too), with the ARM kernel choice."""

    name = "aarch64"
    code_search = False  # the glue's search is x86 (vpermw)

    def choose_kernel(self, n, rows: int, q: np.ndarray) -> LayerChoice:
        return choose_kernel(n, rows, q)


def emit_aarch64(graph: Graph, output, *, mcpu: str | None = None, force_kernel: str | None = None,
                 on_layer: Callable[[str], None] | None = None, calibration=None,
                 model_digest: str | None = None) -> dict:
    """Lower, cross-compile and write an aarch64 artifact; returns the report ``emit_llvm`` gives.
    ``calibration``: the ``csqc.calibration.Calibration`` the plan records; ``model_digest``: the
    ``csqc.provenance`` digest of the model it comes from."""
    from tvm.support.cc import cross_compiler

    from csqc.targets.tvm.build import build_plan, write_artifact
    from csqc.targets.tvm.memory import share_temp_memory, temporary_bytes
    from csqc.targets.tvm.whole_model import add_whole_model_function

    compiler = check_toolchain(mcpu, force_kernel)
    target = aarch64_target(mcpu)
    t0 = time.perf_counter()
    plan: Plan = lower_graph(graph, force_kernel=force_kernel, on_layer=on_layer, backend=Aarch64Backend())
    share_temp_memory(plan)
    add_whole_model_function(plan)
    t1 = time.perf_counter()
    executable = build_plan(plan, target)
    meta = {"target": {"kind": "aarch64", "mcpu": str(target.attrs["mcpu"]), "triple": TRIPLE}, "model": graph.name,
            **plan_entry(calibration), **provenance_entry(model_digest)}
    try:
        write_artifact(plan, executable, output, meta, fcompile=cross_compiler(compiler))
    except RuntimeError as e:  # the cross linker failed (broken toolchain, missing libc for arm64)
        raise CompileError(f"linking the aarch64 library with {compiler} failed: {str(e).strip()[-400:]}; "
                           f"check that {CROSS_PACKAGES} are installed") from None
    t2 = time.perf_counter()  # the build: compiled, objects written and linked
    weight_bytes = sum(int(a.nbytes) for a in plan.weights.values())
    return {
        "target": "aarch64", "output": str(output), "mcpu": meta["target"]["mcpu"],
        "kernels": {name: info["kernel"] for name, info in plan.layers.items()},
        "layers": plan.layers, "functions": len(plan.funcs), "steps": len(plan.steps),
        "lower_seconds": t1 - t0, "build_seconds": t2 - t1, "weight_bytes": weight_bytes,
        "size_bytes": Path(output).stat().st_size, **temporary_bytes(plan),
    }
