"""The ``llvm`` target: plan with the CPU backend, build one x86 shared library, write the artifact
(``csqc.targets.tvm.build``; format: ``csqc.artifact``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from csqc.calibration import plan_entry
from csqc.provenance import plan_entry as provenance_entry
from csqc.errors import BadInput, CompileError
from csqc.ir import Graph
from csqc.targets.tvm.build import build_plan, write_artifact
from csqc.targets.tvm.lower import lower_graph
from csqc.targets.tvm.memory import share_temp_memory, temporary_bytes
from csqc.targets.tvm.whole_model import add_whole_model_function

from .backend import CpuBackend, has_table_lookup

__all__ = ["check_cpu", "check_tune", "emit_llvm", "one_thread_layer_macs", "thread_cap", "ONE_THREAD_LAYER_MACS"]

log = logging.getLogger(__name__)

# A model whose every quantized layer is below this many multiply-adds is capped at one thread:
# each of its kernels takes microseconds, a parallel launch costs about as much as it saves, and a
# pool worker spinning after it slows the serial kernels in between. Measured per call, same
# process, 2 vCPUs: ResNet-20 (2.4 M per conv) 261-303 us on one thread, 305-407 us on two; linear
# 4096 w2a4 (16.8 M) and MobileNetV2 (largest 19 M) run 1.4x-1.9x faster on two. The cap is the
# starting guess: the runtime times calls both ways and keeps the faster (csqc.call_choice).
ONE_THREAD_LAYER_MACS = 1 << 22


def one_thread_layer_macs(tier: str = "avx512") -> int:
    """:data:`ONE_THREAD_LAYER_MACS` for a tier's kernels: a quarter below AVX-512, whose int8
    dot products take four to six times as long a multiply-add. Measured on a Zen 3 (AVX2, 2
    vCPUs): ResNet-20 (2.4 M per conv) 734 us on one thread, 538 on two."""
    return ONE_THREAD_LAYER_MACS if tier == "avx512" else ONE_THREAD_LAYER_MACS >> 2


def thread_cap(graph: Graph, funcs: dict | None = None, tier: str = "avx512") -> int | None:
    """The most threads the artifact's calls should use (the plan's ``threads``; None: no cap).
    ``funcs`` (the plan's PrimFuncs): no cap where none of them has a parallel loop, as the
    cap only costs there (lowering and restoring the variable: about 2.5 us a call, a tenth of
    an LSTM step's). ``tier``: the target's (``isa.tier``)."""
    layers = graph.quant_layers()
    if not layers or max(n.multiply_adds for n in layers) >= one_thread_layer_macs(tier):
        return None
    if funcs is not None and not any("T.parallel" in f.script() for f in funcs.values()):
        return None
    return 1


def check_cpu(mcpu: str | None) -> None:
    """Refuse a CPU name LLVM does not know (it would abort the whole process). Every x86-64 CPU
    it knows gets the kernels of its instruction-set tier (``isa.tier``)."""
    from tvm.target import codegen

    cpu, triple = mcpu or codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple()
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise BadInput(f"--mcpu {cpu!r} is not a CPU LLVM knows for {triple}; leave it out to build for this "
                       "machine, or name one such as cascadelake, icelake-server, znver3, znver4")


def check_tune(mcpu: str | None) -> None:
    """``--tune`` times candidate kernels here: it can only tune for this machine's CPU."""
    from tvm.target import codegen

    if mcpu is not None and mcpu != codegen.llvm_get_system_cpu():
        raise BadInput(f"--tune times kernels on this machine ({codegen.llvm_get_system_cpu()}), so it cannot tune "
                       f"for --mcpu {mcpu}; leave --mcpu out, or tune on a {mcpu} machine")


def cpu_backend(target, tuner=None) -> CpuBackend:
    """The backend that lowers for LLVM ``target`` (``kernels.cpu_target``): its tier's kernels,
    table lookups, AMX tiles. ``csqc inspect`` asks it for the kernel choices a compile makes."""
    from .amx import target_has_amx
    from .isa import tier

    return CpuBackend(table_lookup=has_table_lookup(target), amx=target_has_amx(target), tuner=tuner, tier=tier(target))


def emit_llvm(graph: Graph, output, *, mcpu: str | None = None, mattr=None, force_kernel: str | None = None,
              on_layer: Callable[[str], None] | None = None, target_kind: str = "llvm", calibration=None,
              model_digest: str | None = None, tune: bool = False, on_tune: Callable[[str], None] | None = None) -> dict:
    """Lower, build and write an artifact; returns a report (kernels per layer, timings, sizes).
    ``calibration``: the ``csqc.calibration.Calibration`` the plan records; ``model_digest``: the
    ``csqc.provenance`` digest of the model it comes from. ``tune``: search the
    kernel schedules per shape on this machine (``tuning.py``; cached on disk), calling
    ``on_tune`` with each shape searched; the report's ``tuning`` says what was found."""
    from .host import isa_features
    from .isa import missing_features
    from .kernels import cpu_target

    try:
        target = cpu_target(mcpu, mattr)
    except Exception as e:
        raise CompileError(f"invalid CPU target (mcpu={mcpu!r}): {e}") from None
    t0 = time.perf_counter()
    tuner = None
    if tune:
        from csqc.runtime import pool_threads

        from .tuning import Tuner, TuningCache, cache_path, cpu_key

        threads = pool_threads()  # what the artifact's calls will run on
        tuner = Tuner(target, TuningCache.load(cache_path(), cpu_key(target, threads)), threads, on_search=on_tune)
    backend = cpu_backend(target, tuner)
    cpu_tier = backend.tier
    with target:  # the kernels emit the instructions of this target's tier (isa.tier)
        plan = lower_graph(graph, backend=backend, force_kernel=force_kernel, on_layer=on_layer)
    if tuner is not None and tuner.report()["searched"]:
        try:
            tuner.cache.save()
        except OSError as e:  # the schedules are in this build all the same
            log.warning("could not write the tuning cache %s: %s", tuner.cache.path, e)
    share_temp_memory(plan)
    add_whole_model_function(plan)
    missing = missing_features(plan.funcs.values(), target)
    if missing:  # a backend bug, but LLVM would abort the process on it
        raise CompileError(f"the plan's kernels use instructions CPU {str(target.attrs.get('mcpu', ''))!r} lacks: "
                           f"{', '.join(missing)}")
    t1 = time.perf_counter()
    executable = build_plan(plan, target)
    # the instruction sets it needs: loading it on a CPU without one is refused (csqc.runtime)
    meta = {"target": {"kind": target_kind, "mcpu": str(target.attrs.get("mcpu", "")),
                       "features": isa_features(target)}, "model": graph.name,
            **plan_entry(calibration), **provenance_entry(model_digest)}
    threads = thread_cap(graph, plan.funcs, cpu_tier)
    if threads is not None:
        meta["threads"] = threads
    write_artifact(plan, executable, output, meta)  # writes the objects and links them
    t2 = time.perf_counter()
    weight_bytes = sum(int(a.nbytes) for a in plan.weights.values())  # stored in the artifact
    return {
        **({"tuning": tuner.report()} if tuner is not None else {}),
        "target": target_kind, "output": str(output), "mcpu": meta["target"]["mcpu"], "tier": cpu_tier,
        "threads": threads,
        "kernels": {name: info["kernel"] for name, info in plan.layers.items()},
        "layers": plan.layers, "functions": len(plan.funcs), "steps": len(plan.steps),
        "lower_seconds": t1 - t0, "build_seconds": t2 - t1, "weight_bytes": weight_bytes,
        "size_bytes": Path(output).stat().st_size, **temporary_bytes(plan),
    }
