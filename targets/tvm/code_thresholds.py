"""Integer thresholds of a calibrated layer's output codes (``glue.epilogue``'s ``code_search``).

With static input and output scales, a quantized layer's output code is a function of its
integer accumulator alone, per channel: ``code = quantize(act(((f32(acc) * S) / L) * mult[c] +
add[c]))``. Every step rounds monotonically, ``mult[c]``'s sign fixes the direction and the
activations (none, relu, clip) are monotone, so the code is a staircase in ``acc`` with at most
``2 L' + 1`` steps. A kernel can then find it by a binary search over the staircase's integer
thresholds instead of running the float chain (a byte-wide table lookup per step, 32 int16
lanes at a time), and gets the interpreter's codes exactly: the thresholds come from the
interpreter's own float32 arithmetic (``csqc.interpreter.layer_output``).

Search space: ``s = acc`` where ``mult[c] >= 0``, ``s = ~acc = -acc - 1`` where ``mult[c] < 0``,
so the code never decreases in ``s``; ``code(s) = base[c] + #{k : s > thresholds[c, k]}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from csqc.interpreter import layer_output
from csqc.ir import Graph, Node

__all__ = ["CodeTables", "TABLE_ENTRIES", "DOMAIN", "code_tables"]

TABLE_ENTRIES = 32  # one vpermw table: the int16 lanes of a zmm register
# Accumulators searched: |acc| < DOMAIN. The kernels that take tables store int16 accumulators
# whose true value (less any offset) is within 2**15 under every plane setting, so this is
# wide enough, and small enough that f32(acc) * S stays finite for any float32 scale a
# calibration gives (thresholds are clamped to it; the ones past it are never crossed).
DOMAIN = 2**17


@dataclass(frozen=True)
class CodeTables:
    """Per output channel: ``thresholds`` (int32 ``[C, TABLE_ENTRIES]``, ascending, padded with
    ``DOMAIN``), ``base`` (int32 ``[C]``: the code below every threshold) and ``flip`` (int32
    ``[C]``: -1 where the search runs on ``~acc``, else 0); ``steps``: binary-search steps that
    cover the longest staircase."""

    thresholds: np.ndarray
    base: np.ndarray
    flip: np.ndarray
    steps: int


def code_tables(g: Graph, n: Node, in_scale: float, in_levels: int, wide: bool = False) -> CodeTables | None:
    """The threshold tables of quantized layer ``n`` (with a static output scale) whose input
    codes have the static scale ``in_scale`` and ``in_levels`` levels; None where a channel's
    staircase has more steps than a table holds or the float chain leaves float32's range.
    Unsigned output codes are the staircase of ``max(code, 0)``, what their layout stores.

    ``wide``: the accumulators are int32 and the kernel compares them saturated to int16, which
    keeps every comparison where the staircase is flat past int16's range: every threshold
    within -32767..32766 and the codes at int32's ends those at the domain's (else None)."""
    spec = n.quant
    if spec is None or spec.out_bits is None or not spec.out_scale > 0 or not in_scale > 0:
        return None
    axis = 1 if n.op == "qconv2d" else -1
    channels = int(n.type.shape[axis])
    mult = np.asarray(g.params[n.layer.mult], np.float32).reshape(-1)
    if mult.size != channels or not np.isfinite(mult).all():
        return None
    flip = np.signbit(mult) & (mult != 0)

    def codes(s: np.ndarray) -> np.ndarray:
        """Codes of search points ``s`` (int64 ``[C, K]``) of each channel."""
        acc = np.where(flip[:, None], ~s, s)
        shaped = acc[None, :, :, None] if axis == 1 else acc.T
        with np.errstate(all="ignore"):
            out = layer_output(g, n, shaped, in_scale, in_levels)
        c = (out.codes[0, :, :, 0] if axis == 1 else out.codes.T).astype(np.int64)
        return c if spec.out_signed else np.maximum(c, 0)  # unsigned codes store a negative y as 0

    lowest = np.full((channels, 1), -DOMAIN + 1, np.int64)
    try:
        base = codes(lowest)[:, 0]
        top = codes(np.full((channels, 1), DOMAIN - 1, np.int64))[:, 0]
    except Exception:  # noqa: BLE001 -- a float chain outside float32's range: keep the float epilogue
        return None
    if wide:
        try:
            ends = codes(np.tile(np.array([-(2**31), 2**31 - 1], np.int64), (channels, 1)))
        except Exception:  # noqa: BLE001 -- (as above)
            return None
        if not (np.array_equal(ends[:, 0], base) and np.array_equal(ends[:, 1], top)):
            return None
    counts = top - base
    if (counts < 0).any() or counts.max(initial=0) > TABLE_ENTRIES - 1:
        return None
    width = max(1, int(counts.max(initial=0)))
    level = base[:, None] + np.arange(1, width + 1)[None, :]  # the code each threshold leads to
    valid = np.arange(width)[None, :] < counts[:, None]
    # least s with code(s) >= level, by bisection: code(lo) < level <= code(hi)
    lo = np.broadcast_to(lowest, level.shape).copy()
    hi = np.full(level.shape, DOMAIN - 1, np.int64)
    for _ in range(math.ceil(math.log2(2 * DOMAIN))):
        mid = (lo + hi) // 2
        reached = codes(mid) >= level
        hi = np.where(reached, mid, hi)
        lo = np.where(reached, lo, mid)
    # threshold: the largest s below the step (code(s) > ... <=> s > lo)
    if not (np.where(valid, codes(lo) < level, True).all() and np.where(valid, codes(lo + 1) >= level, True).all()):
        return None  # not a staircase (cannot happen for the monotone chain; refuse rather than guess)
    if wide and not np.where(valid, (lo >= -(2**15) + 1) & (lo <= 2**15 - 2), True).all():
        return None
    thresholds = np.full((channels, TABLE_ENTRIES), DOMAIN, np.int64)
    thresholds[:, :width] = np.where(valid, lo, DOMAIN)
    steps = max(1, math.ceil(math.log2(int(counts.max(initial=0)) + 1)))
    return CodeTables(thresholds.astype(np.int32), base.astype(np.int32), np.where(flip, -1, 0).astype(np.int32), steps)
