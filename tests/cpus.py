"""The x86 CPUs tests build for (``targets/llvm/isa.py``'s tiers) and skips for this machine's.

Every CI CPU runs AVX2 code, so the AVX2 and generic tiers are tested everywhere (artifacts
built for :data:`AVX2_CPU` or :data:`GENERIC_CPU` run on any of them); kernels of the AVX-512
tier run only where this machine has AVX-512 VNNI.
"""
import pytest

from csqc.targets.llvm import isa

AVX2_CPU = "haswell"  # AVX2, FMA, BMI2: no AVX-512
GENERIC_CPU = "nehalem"  # SSE4.2 and POPCNT: no int8 dot product at all
HOST_TIER = isa.tier()

needs_avx512 = pytest.mark.skipif(HOST_TIER != isa.AVX512,
                                  reason=f"this CPU is of the {HOST_TIER} tier: no AVX-512 VNNI to run the kernel")


def code_limit_of(tier: str) -> int:
    """One past the largest input code a tier's bit-parallel kernels take with any int8 weight
    (AVX2 sums pairs of products in int16: isa.avx2_dot_exact(127, 128) holds, (128, 128) not)."""
    return 256 if tier == isa.AVX512 else 128


CODE_LIMIT = code_limit_of(HOST_TIER)  # the host tier's
