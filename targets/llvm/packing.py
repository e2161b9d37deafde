"""Numpy packing helpers: weight and activation bit-planes in the layouts of the LLVM kernels.

Bit order along K (shared by weights and activations)
-----------------------------------------------------
K values are packed ``word_bits`` per word, *interleaved*: bit ``b`` of word ``w`` holds
``k = b * KW + w`` with ``KW = ceil(K / word_bits)``.  Any bijection between ``k`` and
(word, bit) gives the same popcount dot product as long as weights and activations share it;
this one lets the in-kernel activation packer load ``KW`` consecutive activation codes for
one bit position as a contiguous vector (no gathers).  Positions ``k >= K`` are zero bits in
both operands, so padding is exact.

Layouts
-------
* bit-serial dense weights: ``[N_tiles, P, KW, lanes]`` uint32.  ``lanes`` output rows form one
  vector tile (lanes run along N: contiguous vector loads, no horizontal reductions); N is
  padded with zero rows to ``N_tiles * lanes``.  Planes of a tile are contiguous, so skipping
  trailing planes at run time (``n_planes``) skips whole memory ranges.
* bit-serial conv weights: ``[G, N_tiles, P, KW, lanes]`` per group, K ordered ``(c, r, s)``.
* depthwise (``C/groups == 1``) weights: plain 0/1 bytes ``[O, P, kh*kw]`` for the direct kernel.
* activation planes (reference of the in-kernel packer): ``[M, A, KW]`` uint32.
* bit-parallel dense weights (defined in ``csqc.artifact``: the runtime derives them at load):
  int8 ``[ceil(N/16), ceil(K/4), 64]`` (16 outputs x 4 consecutive K values per 64-byte vector,
  the operand order of ``vpdpbusd``), or int16 ``[ceil(N/16), K, 16]`` when ``q`` does not fit int8.
* bit-parallel conv weights: int8 ``[G, ceil(Og/16), kh*kw*ceil(Cg/4), 64]`` with K ordered
  ``(r, s, c)`` and channels padded to a multiple of 4 per group (matches the NHWC input copy).
"""
from __future__ import annotations

import numpy as np

# the bit-parallel layouts are part of the artifact format (the runtime derives them at load)
from csqc.artifact import (  # noqa: F401  (the backend's packer API)
    VNNI_LANES,
    bitparallel_weight_dtype,
    combine_planes,
    pack_bitparallel_conv_weight,
    pack_bitparallel_weight,
)

__all__ = [
    "WORD_BITS",
    "VNNI_LANES",
    "words_for",
    "effective_lanes",
    "pack_bits_along_k",
    "unpack_bits_along_k",
    "pack_weight_planes",
    "unpack_weight_planes",
    "pack_activation_planes",
    "pack_conv_weight_planes",
    "pack_depthwise_weight_planes",
    "dequant_code_bits",
    "combine_planes",
    "bitparallel_weight_dtype",
    "pack_bitparallel_weight",
    "unpack_bitparallel_weight",
    "pack_bitparallel_conv_weight",
]

WORD_BITS = 32
_WORD_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def words_for(k: int, word_bits: int = WORD_BITS) -> int:
    """Number of packed words holding ``k`` bits."""
    return (k + word_bits - 1) // word_bits


def effective_lanes(n_outputs: int, lanes: int) -> int:
    """Vector lanes actually used for ``n_outputs`` rows: ``lanes``, or the next power of two
    below it when there are fewer outputs (a 4-output group should not pay for 16 lanes)."""
    needed = 1 << max(0, (n_outputs - 1).bit_length())
    return max(1, min(lanes, needed))


def pack_bits_along_k(bits: np.ndarray, word_bits: int = WORD_BITS) -> np.ndarray:
    """Pack 0/1 values ``[..., K]`` into words ``[..., KW]`` with the interleaved bit order."""
    bits = np.asarray(bits)
    if word_bits not in _WORD_DTYPES:
        raise ValueError(f"word_bits must be one of {sorted(_WORD_DTYPES)}, got {word_bits}")
    if bits.size and (bits.min() < 0 or bits.max() > 1):
        raise ValueError("bit planes must hold only 0 and 1")
    k = bits.shape[-1]
    kw = words_for(k, word_bits)
    padded = np.zeros(bits.shape[:-1] + (kw * word_bits,), dtype=np.uint64)
    padded[..., :k] = bits
    by_bit = padded.reshape(bits.shape[:-1] + (word_bits, kw))  # [..., b, w] holds k = b*KW + w
    shifts = np.arange(word_bits, dtype=np.uint64).reshape((word_bits, 1))
    words = np.bitwise_or.reduce(by_bit << shifts, axis=-2)
    return words.astype(_WORD_DTYPES[word_bits])


def unpack_bits_along_k(words: np.ndarray, k: int, word_bits: int = WORD_BITS) -> np.ndarray:
    """Inverse of :func:`pack_bits_along_k`: words ``[..., KW]`` to 0/1 uint8 ``[..., k]``."""
    words = np.asarray(words).astype(np.uint64)
    kw = words.shape[-1]
    shifts = np.arange(word_bits, dtype=np.uint64).reshape((word_bits, 1))
    by_bit = (words[..., None, :] >> shifts) & np.uint64(1)  # [..., b, w]
    flat = by_bit.reshape(words.shape[:-1] + (word_bits * kw,))
    return flat[..., :k].astype(np.uint8)


def pack_weight_planes(planes: np.ndarray, word_bits: int = WORD_BITS, lanes: int = 16) -> np.ndarray:
    """Pack weight planes ``[P, N, K]`` (0/1) into the bit-serial layout
    ``[ceil(N/lanes), P, KW, lanes]`` (zero rows pad N, zero bits pad K)."""
    planes = np.asarray(planes)
    if planes.ndim != 3:
        raise ValueError(f"planes must be [P, N, K], got shape {planes.shape}")
    p, n, _ = planes.shape
    n_tiles = -(-n // lanes)
    words = pack_bits_along_k(planes, word_bits)  # [P, N, KW]
    padded = np.zeros((p, n_tiles * lanes, words.shape[-1]), dtype=words.dtype)
    padded[:, :n] = words
    tiled = padded.reshape(p, n_tiles, lanes, -1)  # [P, NT, lanes, KW]
    return np.ascontiguousarray(tiled.transpose(1, 0, 3, 2))


def unpack_weight_planes(packed: np.ndarray, n: int, k: int, word_bits: int = WORD_BITS) -> np.ndarray:
    """Inverse of :func:`pack_weight_planes`: ``[NT, P, KW, lanes]`` to 0/1 ``[P, n, k]``."""
    packed = np.asarray(packed)
    n_tiles, p, kw, lanes = packed.shape
    words = packed.transpose(1, 0, 3, 2).reshape(p, n_tiles * lanes, kw)[:, :n]
    return unpack_bits_along_k(words, k, word_bits)


def pack_activation_planes(codes: np.ndarray, act_bits: int, word_bits: int = WORD_BITS) -> np.ndarray:
    """Reference packer of unsigned activation codes ``[M, K]`` into planes ``[M, A, KW]``
    (plane j holds bit j of every code).  The kernels pack in TensorIR; this mirrors it."""
    codes = np.asarray(codes).astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << act_bits)):
        raise ValueError(f"activation codes must lie in [0, {(1 << act_bits) - 1}]")
    bits = np.stack([(codes >> j) & 1 for j in range(act_bits)], axis=1)  # [M, A, K]
    return pack_bits_along_k(bits, word_bits)


def pack_conv_weight_planes(planes: np.ndarray, groups: int, lanes: int = 16,
                            word_bits: int = WORD_BITS) -> np.ndarray:
    """Pack conv weight planes ``[P, O, C/groups, kh, kw]`` into ``[G, NT, P, KW, lanes]``
    with ``lanes = effective_lanes(O/groups, lanes)`` and K ordered ``(c, r, s)``."""
    planes = np.asarray(planes)
    p, o = planes.shape[:2]
    if o % groups:
        raise ValueError(f"output channels {o} not divisible by groups {groups}")
    per_group = o // groups
    lanes = effective_lanes(per_group, lanes)
    flat = planes.reshape(p, groups, per_group, -1)
    return np.stack([pack_weight_planes(flat[:, g], word_bits, lanes) for g in range(groups)])


def pack_depthwise_weight_planes(planes: np.ndarray) -> np.ndarray:
    """Depthwise (one input channel per group) planes ``[P, O, 1, kh, kw]`` as bytes
    ``[O, P, kh*kw]`` for the direct kernel (K is kh*kw: nothing to gain from bit packing)."""
    planes = np.asarray(planes)
    p, o = planes.shape[:2]
    return np.ascontiguousarray(planes.reshape(p, o, -1).transpose(1, 0, 2)).astype(np.uint8)


def dequant_code_bits(planes: int) -> int:
    """Bits per weight of the dequantizing weight-only kernel's codes for ``planes`` weight
    planes, one code bit a plane (signs and shifts live in its level table, so any planes form
    one): 4 (nibbles, up to 4 planes) or 8 (bytes holding 5- or 6-plane codes, whose levels one
    AVX-512 ``vpermi2ps`` or two lookups added read), or 0 past 6 planes."""
    if 1 <= planes <= 4:
        return 4
    return 8 if planes in (5, 6) else 0


def unpack_bitparallel_weight(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bitparallel_weight` (returns int64 ``[n, k]``)."""
    packed = np.asarray(packed)
    if packed.dtype == np.int8:
        n_tiles, k4, _ = packed.shape
        blocked = packed.reshape(n_tiles, k4, VNNI_LANES, 4).transpose(0, 2, 1, 3)
        return blocked.reshape(n_tiles * VNNI_LANES, k4 * 4)[:n, :k].astype(np.int64)
    n_tiles, kk, _ = packed.shape
    return packed.transpose(0, 2, 1).reshape(n_tiles * VNNI_LANES, kk)[:n, :k].astype(np.int64)
