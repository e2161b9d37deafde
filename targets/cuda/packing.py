"""Numpy packing helpers for the CUDA kernels (same function names and arguments as the CPU ones).

Bit order along K is the CPU one (``csqc.targets.llvm.packing``): K values are packed 32 per
``uint32`` word, interleaved (bit ``b`` of word ``w`` holds ``k = b * KW + w``), zero padded.
What differs is the tiling of outputs:

* bit-serial dense weights: ``[N, P, KW]`` uint32.  Every output row keeps its planes and words
  contiguous, so the 32 threads of a warp that split one output's K words load 32 consecutive
  words (one 128-byte transaction).  This is the CPU layout with ``lanes=1`` (the unit lane axis
  dropped); the ``lanes`` argument is accepted for the planner and must be 1.
* bit-serial conv weights: ``[O, P, KW]`` uint32, K ordered ``(c, r, s)`` per group (outputs of
  group ``g`` are rows ``g*O/G .. (g+1)*O/G - 1``).
* depthwise, bit-parallel dense and bit-parallel conv weights: exactly the CPU layouts (the
  runtime re-combines bit-parallel weights for ``skip_planes`` with the CPU packers, so the GPU
  kernels read those layouts: ``int8[ceil(N/16), ceil(K/4), 64]`` is 16 outputs x 4 consecutive K
  values per 64 bytes, i.e. one int32 word per (output, 4 K values), coalesced along outputs).
"""
from __future__ import annotations

import numpy as np

from csqc.targets.llvm import packing as _cpu
from csqc.targets.llvm.packing import (  # noqa: F401  (re-exported: same layouts on the GPU)
    VNNI_LANES,
    WORD_BITS,
    bitparallel_weight_dtype,
    combine_planes,
    pack_activation_planes,
    pack_bitparallel_conv_weight,
    pack_bitparallel_weight,
    pack_bits_along_k,
    pack_depthwise_weight_planes,
    unpack_bitparallel_weight,
    unpack_bits_along_k,
    words_for,
)

__all__ = [
    "WORD_BITS",
    "VNNI_LANES",
    "words_for",
    "pack_bits_along_k",
    "unpack_bits_along_k",
    "pack_weight_planes",
    "unpack_weight_planes",
    "pack_activation_planes",
    "pack_conv_weight_planes",
    "pack_depthwise_weight_planes",
    "combine_planes",
    "bitparallel_weight_dtype",
    "pack_bitparallel_weight",
    "unpack_bitparallel_weight",
    "pack_bitparallel_conv_weight",
]


def _check_lanes(lanes: int) -> None:
    if lanes != 1:
        raise ValueError(f"the CUDA bit-serial layout keeps each output contiguous (lanes=1), got lanes={lanes}")


def pack_weight_planes(planes: np.ndarray, word_bits: int = WORD_BITS, lanes: int = 1) -> np.ndarray:
    """Pack weight planes ``[P, N, K]`` (0/1) into ``uint32[N, P, KW]``."""
    _check_lanes(lanes)
    if word_bits != WORD_BITS:
        raise ValueError("the CUDA kernels use 32-bit words (__popc)")
    return np.ascontiguousarray(_cpu.pack_weight_planes(planes, word_bits, lanes=1)[..., 0])


def unpack_weight_planes(packed: np.ndarray, n: int, k: int, word_bits: int = WORD_BITS) -> np.ndarray:
    """Inverse of :func:`pack_weight_planes`: ``[N, P, KW]`` to 0/1 ``[P, n, k]``."""
    return _cpu.unpack_weight_planes(np.asarray(packed)[..., None], n, k, word_bits)


def pack_conv_weight_planes(planes: np.ndarray, groups: int, lanes: int = 1,
                            word_bits: int = WORD_BITS) -> np.ndarray:
    """Pack conv weight planes ``[P, O, C/groups, kh, kw]`` into ``uint32[O, P, KW]`` with K
    ordered ``(c, r, s)`` (``groups`` only checks the shape: rows are already per output)."""
    _check_lanes(lanes)
    planes = np.asarray(planes)
    p, o = planes.shape[:2]
    if o % groups:
        raise ValueError(f"output channels {o} not divisible by groups {groups}")
    return pack_weight_planes(planes.reshape(p, o, -1), word_bits, lanes=1)
