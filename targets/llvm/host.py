"""What this machine's x86 CPU can run, as the operating system reports it.

LLVM's host CPU name is read from CPUID's family and model, not from the features the OS enables:
in a virtual machine the name can promise instructions the hypervisor hides (seen on an Intel Xeon
VM that LLVM names ``emeraldrapids`` and whose Linux lists no ``amx_tile``: tile kernels built
for the name alone would be refused at load, or raise SIGILL) or miss ones it has (another Xeon
VM, named ``rocketlake``, listed AMX). So the host target is the CPU name corrected by Linux's
``/proc/cpuinfo`` flags for every instruction set csqc's kernels may use, and an artifact
records the instruction sets it was built with, so that loading it on a CPU without one of them is
refused with a clear message instead of crashing.
"""
from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["ISA_FEATURES", "host_flags", "host_has", "host_has_amx", "host_mattr", "isa_features", "missing_on_host",
           "request_tile_permission"]

# LLVM feature name -> the flag Linux lists in /proc/cpuinfo: the instruction sets LLVM may emit
# for csqc's kernels (vectors, VNNI, byte permutes, popcounts, tiles) and the float glue
ISA_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "popcnt": "popcnt", "lzcnt": "abm",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


@functools.lru_cache(maxsize=1)
def host_flags() -> frozenset[str] | None:
    """The CPU flags Linux lists for this machine, or None where they cannot be read (then the
    CPU name is taken at its word)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def host_has(*features: str) -> bool:
    """Whether this machine has every one of the LLVM ``features`` (keys of :data:`ISA_FEATURES`)."""
    flags = host_flags()
    return flags is not None and all(ISA_FEATURES[f] in flags for f in features)


def host_has_amx() -> bool:
    """Whether this machine's CPU has AMX-INT8 tiles its OS enables (:func:`host_has`: LLVM's
    host CPU name alone can promise or miss them in a virtual machine)."""
    return host_has("amx-tile", "amx-int8")


@functools.lru_cache(maxsize=1)
def request_tile_permission() -> None:
    """Ask Linux for the AMX tile data state for this process (once; idempotent). Raises
    RuntimeError where it is refused (kernel before 5.16, or not Linux/x86-64)."""
    arch_req_xcomp_perm, xfeature_xtiledata, sys_arch_prctl = 0x1023, 18, 158
    if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
        raise RuntimeError("AMX tile kernels need Linux on x86-64")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0:
        raise RuntimeError(f"Linux refused the AMX tile state (arch_prctl: {os.strerror(ctypes.get_errno())}); "
                           "compile for a CPU without tiles instead (--mcpu icelake-server)")


def isa_features(target) -> list[str]:
    """The instruction sets of :data:`ISA_FEATURES` an LLVM target (CPU name and ``-mattr``) has."""
    from tvm.target import codegen

    have = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return sorted(f for f in ISA_FEATURES if f in have)


def host_mattr(cpu: str) -> list[str]:
    """``-mattr`` entries that make LLVM CPU ``cpu``'s instruction sets this machine's: ``-f``
    for each one the name implies and Linux does not list, ``+f`` for each one Linux lists and
    the name lacks. Empty where the flags cannot be read."""
    import tvm

    flags = host_flags()
    if flags is None:
        return []
    implied = set(isa_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))
    return [("+" if flag in flags else "-") + feature for feature, flag in ISA_FEATURES.items()
            if (feature in implied) != (flag in flags)]


def missing_on_host(features) -> list[str]:
    """Those of the LLVM ``features`` this machine lacks (none where its flags cannot be read,
    or for names outside :data:`ISA_FEATURES`)."""
    flags = host_flags()
    if flags is None:
        return []
    return [f for f in features if f in ISA_FEATURES and ISA_FEATURES[f] not in flags]
