"""Activation codes by a constant scale without a divide, proved exact per scale when compiling.

A static quantizer (``compile --calibrate``) computes ``code = min(roundeven(RN(n / S)), L)``
for every numerator ``n = min(RN(|x| * L), RN((L + 1) * S))``; ``glue.common._quotient`` divides
exactly for any ``S`` in 1 multiply + 4 FMAs. For one known ``S`` cheaper forms usually give the
same *codes* (not the same quotients, which is all a code needs):

* ``single``: ``RN(n * zh)`` with ``zh = RN(1 / S)``, one multiply;
* ``split``: ``RN(n * zh + RN(n * zl))`` with ``zl = RN(1 / S - zh)`` (the reciprocal to twice
  float32's precision, Brisebarre, Muller and Raina 2004), one multiply and one FMA.

Each form is used only where :func:`code_form` proves it gives every code the divide gives.
The proof: ``n -> code`` is a non-decreasing step function of ``n`` for the divide and for both
forms (``RN`` and ``roundeven`` are monotone; in ``split`` one ulp more of ``n`` adds
``ulp(n) * zh`` before rounding, more than ``RN(n * zl)`` can lose since ``|zl| <= 2^-24 zh``).
Two such functions on ``[0, bound]`` are equal exactly when each code ``k = 1..L`` is first
reached at the same ``n``; that ``n`` is found for each ``k`` by bisection over the float32 bit
patterns (ordered like the values for ``n >= 0``), with every candidate form evaluated exactly
in numpy (float64 products of float32 values are exact; the FMA's sum is rounded once, see
:func:`_split_quotients`). About 32 steps per code and form: microseconds per scale.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["code_form", "reciprocal_parts"]


def reciprocal_parts(scale: float) -> tuple[float, float]:
    """``(zh, zl)``: ``zh = RN(1 / S)``, ``zl = RN(1 / S - zh)`` as float32 values."""
    s = np.float32(scale)
    zh = np.float32(1.0) / s
    zl = np.float32(np.float64(1.0) / np.float64(s) - np.float64(zh))  # 1/S - zh is exact in float64
    return float(zh), float(zl)


def _split_quotients(n: np.ndarray, zh: np.float32, zl: np.float32) -> np.ndarray:
    """``RN32(n * zh + RN32(n * zl))`` exactly, as the FMA computes it, for float32 ``n``."""
    t = (n * zl).astype(np.float32)  # RN32 of the product
    p = n.astype(np.float64) * np.float64(zh)  # exact: 24 + 24 significant bits
    s = p + t.astype(np.float64)
    e = (p - (s - (s - p))) + (t.astype(np.float64) - (s - p))  # TwoSum: s + e == p + t exactly
    r = s.astype(np.float32)
    # RN32(s) is RN32(s + e) unless s is a float32 midpoint (no midpoint lies strictly between
    # s + e and s = RN64(s + e)); there the sign of e decides
    up = np.nextafter(r, np.float32(np.inf))
    down = np.nextafter(r, np.float32(-np.inf))
    above = (r.astype(np.float64) + up.astype(np.float64)) / 2
    below = (r.astype(np.float64) + down.astype(np.float64)) / 2
    return np.where((s == above) & (e > 0), up, np.where((s == below) & (e < 0), down, r))


def _first_numerators(codes_of, bound_bits: int, levels: int) -> np.ndarray:
    """For each code ``k = 1..L``, the bit pattern of the least ``n`` in ``[0, bound]`` whose
    code is at least ``k`` (``bound_bits + 1``: none), for a non-decreasing ``codes_of``."""
    want = np.arange(1, levels + 1)
    lo = np.zeros(levels, np.int64)
    hi = np.full(levels, bound_bits + 1, np.int64)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        n = np.minimum(mid, bound_bits).astype(np.int32).view(np.float32)
        reached = (codes_of(n) >= want) & (mid <= bound_bits)
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid + 1)
    return lo


@functools.lru_cache(maxsize=4096)
def code_form(scale: float, levels: int) -> str:
    """``"single"``, ``"split"`` or ``"quotient"``: the cheapest form whose codes equal the
    divide's for every numerator in ``[0, RN((L + 1) * S)]`` with static scale ``S``."""
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0) or levels < 1:
        return "quotient"
    with np.errstate(over="ignore", under="ignore"):
        bound = np.float32(levels + 1) * s
        if not np.isfinite(bound):
            return "quotient"
        bound_bits = int(np.asarray(bound, np.float32).view(np.int32))
        zh, zl = (np.float32(v) for v in reciprocal_parts(scale))

        def divided(n):
            return np.minimum(np.rint(n / s), levels)

        exact = _first_numerators(divided, bound_bits, levels)
        if np.array_equal(_first_numerators(lambda n: np.minimum(np.rint(n * zh), levels), bound_bits, levels),
                          exact):
            return "single"
        if np.array_equal(_first_numerators(lambda n: np.minimum(np.rint(_split_quotients(n, zh, zl)), levels),
                                            bound_bits, levels), exact):
            return "split"
    return "quotient"
