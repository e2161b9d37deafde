"""Bit-level algebra of CSQ weights: signed digits, plane encodings, packing into words.

A CSQ weight is ``q = sum_b d_b 2^b`` over the layer's active positions ``b`` with digits
``d_b = p_b - n_b`` in {-1, 0, 1}. Two plane encodings are used:

* ``posneg``: a +plane and a -plane per position, ``q = sum_b 2^b (P_b - N_b)``;
* ``offset``: the bits of the unsigned ``q + z``, ``q = sum_b 2^b U_b - z``, with a correction
  term ``z * sum(x)`` in the accumulator.

PrecisionBatching's run-time knob keeps a most significant prefix of the planes. Offset planes
then pair with :func:`kept_zero_point`: ``z`` rounded down to the lowest kept position, as the
unsigned ``q + z`` is, so a zero weight stays zero (``q + z`` and ``z`` lose the same bits).

Planes are ``uint8`` 0/1 arrays ``[P, O, K]`` (K = the flattened reduction axis); packed planes
hold bit ``k % W`` of word ``k // W`` (W = 32 or 64), padded with zero bits.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import CsqcError

__all__ = [
    "signed_digits", "posneg_planes", "offset_planes", "planes_to_q", "pack_planes", "unpack_planes",
    "trailing_zero_bits", "plane_popcounts", "kept_zero_point", "offset_base",
]


@lru_cache(maxsize=256)
def _digit_table(active: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Every value representable with digits {-1,0,1} on ``active`` -> digits (fewest nonzeros)."""
    reps: dict[int, tuple[int, ...]] = {0: ()}
    for b in sorted(active):
        nxt: dict[int, tuple[int, ...]] = {}
        for v, digits in reps.items():
            for d in (0, 1, -1):
                key, cand = v + d * (1 << b), digits + (d,)
                old = nxt.get(key)
                if old is None or sum(map(abs, cand)) < sum(map(abs, old)):
                    nxt[key] = cand
        reps = nxt
    return reps


def signed_digits(q: np.ndarray, active_bits) -> np.ndarray:
    """Digits ``d[len(active), ...]`` in {-1,0,1} with ``q = sum d[i] * 2^active[i]`` (active highest first)."""
    active = tuple(sorted(active_bits))
    table = _digit_table(active)
    values, inverse = np.unique(np.asarray(q, dtype=np.int64), return_inverse=True)
    missing = [int(v) for v in values if int(v) not in table]
    if missing:
        raise CsqcError(f"weights {missing[:5]} cannot be written with bit positions {sorted(active, reverse=True)}")
    lut = np.array([table[int(v)] for v in values], dtype=np.int8).reshape(len(values), len(active))
    digits = lut[inverse.reshape(-1)].reshape(*np.shape(q), len(active))
    return np.moveaxis(digits, -1, 0)[::-1]  # highest position first


def posneg_planes(q2d: np.ndarray, active_bits, positions) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """+/- planes for every position in ``positions`` (highest first); masked ones are zero."""
    digits = signed_digits(q2d, active_bits) if len(active_bits) else np.zeros((0,) + q2d.shape, np.int8)
    by_pos = dict(zip(sorted(active_bits, reverse=True), digits))
    planes, spec = [], []
    zero = np.zeros(q2d.shape, np.uint8)
    for b in positions:
        d = by_pos.get(b)
        planes.append(zero if d is None else (d > 0).astype(np.uint8))
        planes.append(zero if d is None else (d < 0).astype(np.uint8))
        spec += [(b, 1), (b, -1)]
    arr = np.stack(planes) if planes else np.zeros((0,) + q2d.shape, np.uint8)
    return arr, spec


def offset_base(lo: int, hi: int) -> int:
    """The offset ``z`` whose ``q + z`` holds weights in ``[lo, hi]`` in the fewest bits ``t``:
    ``2^(t-1)`` (offset binary) where that fits, else ``-lo``.

    Offset binary makes dropping low planes (the run-time knob, with ``kept_zero_point``, which
    leaves ``2^(t-1)`` as it is) round each weight down to the kept grid: zero stays zero and
    the range stays ``[-2^(t-1), 2^(t-1))``, the layouts chosen for it (a CSQ layer's weights
    in ``[-(2^n - 1), 2^n - 1]`` take ``t = n + 1`` bits either way). With ``-lo`` an odd zero
    point would round zero up: ``q = 2^n - 1`` would become ``2^n``, past int8 or a nibble."""
    bits = (hi - lo).bit_length()
    half = 1 << (bits - 1) if bits else 0
    return half if bits and -half <= lo and hi < half else -lo


def offset_planes(q2d: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """Planes of ``q + z`` (``z``: :func:`offset_base`), all-zero planes dropped, all-one planes
    folded into ``z``.

    Nonzero weights always keep at least one plane (all-equal weights: one all-one plane)."""
    q2d = np.asarray(q2d, dtype=np.int64)
    z = offset_base(int(q2d.min()), int(q2d.max())) if q2d.size else 0
    u = q2d + z
    top = int(u.max()).bit_length() if u.size else 0
    planes, spec = [], []
    for b in reversed(range(top)):
        p = ((u >> b) & 1).astype(np.uint8)
        if not p.any():
            continue
        if p.all():  # a constant plane is a constant term: fold it into the zero point
            z -= 1 << b
            continue
        planes.append(p)
        spec.append((b, 1))
    if not planes and q2d.any():
        # all weights equal (u is 0 everywhere): kernels need a plane, so write q = 1 - (1 - q)
        planes.append(np.ones(q2d.shape, np.uint8))
        spec.append((0, 1))
        z += 1
    arr = np.stack(planes) if planes else np.zeros((0,) + q2d.shape, np.uint8)
    return arr, spec, z


def kept_zero_point(zero_point: int, shifts, kept: int) -> int:
    """The zero point of a layer's first ``kept`` planes (``shifts``: each plane's position, most
    significant first): ``zero_point`` rounded down to a multiple of ``2^s``, ``s`` the lowest
    kept position, when planes are dropped (all kept, or no zero point: ``zero_point``).

    Dropping the low planes of the unsigned ``u = q + z`` rounds ``u`` down to that multiple;
    subtracting ``z`` as it is would move every weight down (a zero weight, most of a CSQ
    layer's, to minus the dropped positions' bits of ``z``). Rounding ``z`` alike keeps zero at
    zero and moves any weight by less than ``2^s``, never across zero."""
    zero_point, kept = int(zero_point), int(kept)
    if not zero_point or kept >= len(shifts) or kept <= 0:
        return zero_point
    low = min(int(s) for s in shifts[:kept])
    return (zero_point >> low) << low


def planes_to_q(planes: np.ndarray, spec, zero_point: int = 0) -> np.ndarray:
    q = np.zeros(planes.shape[1:], dtype=np.int64)
    for (shift, sign), p in zip(spec, planes):
        q += sign * (1 << shift) * p.astype(np.int64)
    return q - zero_point


def pack_planes(planes: np.ndarray, word_bits: int = 32) -> np.ndarray:
    """``[..., K]`` 0/1 -> ``[..., ceil(K/W)]`` words of ``uint{W}`` (zero-padded): bit ``k % W``
    of word ``k // W``. Packs bytes (``np.packbits``, 1/8 of the input in memory), then reads
    each ``W/8`` bytes as one little-endian word."""
    k = planes.shape[-1]
    words = -(-k // word_bits)
    packed = np.packbits(np.asarray(planes, np.uint8) != 0, axis=-1, bitorder="little")
    pad = words * word_bits // 8 - packed.shape[-1]
    if pad:
        packed = np.concatenate([packed, np.zeros(packed.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.dtype(f"<u{word_bits // 8}")).astype(np.dtype(f"uint{word_bits}"))


def unpack_planes(words: np.ndarray, k: int, word_bits: int) -> np.ndarray:
    """Inverse of ``pack_planes``: ``[..., ceil(K/W)]`` words -> ``[..., K]`` uint8 0/1."""
    as_bytes = np.ascontiguousarray(words, dtype=np.dtype(f"<u{word_bits // 8}")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :k]


def plane_popcounts(words: np.ndarray) -> np.ndarray:
    """Set bits of each packed row: ``[..., words] -> [...]`` int64, without unpacking."""
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def trailing_zero_bits(values: np.ndarray) -> int:
    """Common trailing zero bits of the nonzero ``values`` (0 when all are zero)."""
    nz = np.abs(np.asarray(values, dtype=np.int64))
    nz = nz[nz != 0]
    if nz.size == 0:
        return 0
    acc = int(np.bitwise_or.reduce(nz))
    return (acc & -acc).bit_length() - 1
