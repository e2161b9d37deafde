"""Integer thresholds of a calibrated layer's output codes (``glue.epilogue``'s ``code_search``).

With static input and output scales, a quantized layer's output code is a function of its
integer accumulator alone, per channel: ``code = quantize(act(((f32(acc) * S) / L) * mult[c] +
add[c]))``. Every step rounds monotonically, ``mult[c]``'s sign fixes the direction and the
activations (none, relu, clip) are monotone, so the code is a staircase in ``acc`` with at most
``2 L' + 1`` steps. A kernel can then find it by a binary search over the staircase's integer
thresholds instead of running the float chain (a table lookup per step, 32 int16 lanes at a
time), and gets the interpreter's codes exactly: the thresholds come from the interpreter's own
float32 arithmetic (``csqc.interpreter.layer_output``).

Search space: ``s = acc`` where ``mult[c] >= 0``, ``s = ~acc = -acc - 1`` where ``mult[c] < 0``,
so the code never decreases in ``s``; ``code(s) = base[c] + #{k : s > thresholds[c, k]}``.
Every threshold lies within -32767..32766 (int16, 32767 marking the entries past a channel's
last step), which is where the accumulators of the kernels that take tables compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from csqc.interpreter import layer_output
from csqc.ir import Graph, Node

__all__ = ["CodeTables", "TABLE_ENTRIES", "DOMAIN", "NO_STEP", "code_tables"]

TABLE_ENTRIES = 32  # one vpermw table: the int16 lanes of a zmm register
NO_STEP = 2**15 - 1  # a table entry past the channel's last step: never crossed
# Accumulators searched: |acc| < DOMAIN. int16-stored accumulators are within 2**15 of it under
# every plane setting, offset included (the int16 storage rule); int32 ones saturate to int16
# where the staircase is flat beyond (``wide``). Small enough that f32(acc) * S stays finite for
# any float32 scale a calibration gives.
DOMAIN = 2**17


@dataclass(frozen=True)
class CodeTables:
    """Per output channel: ``thresholds`` (int16 ``[C, entries]``, ascending, ``NO_STEP`` past
    its last step; ``entries = 2**steps - 1``, what a search of ``steps`` steps probes), ``base``
    (int8 ``[C]``: the code below every threshold) and ``flip`` (int8 ``[C]``: -1 where the
    search runs on ``~acc``, else 0)."""

    thresholds: np.ndarray
    base: np.ndarray
    flip: np.ndarray
    steps: int

    def kernel_thresholds(self) -> np.ndarray:
        """The thresholds flat, padded so that a 32-lane load at any channel's row stays inside."""
        flat = self.thresholds.reshape(-1)
        return np.concatenate([flat, np.full(TABLE_ENTRIES - self.thresholds.shape[1], NO_STEP, np.int16)])


def code_tables(g: Graph, n: Node, in_scale: float, in_levels: int, wide: bool = False) -> CodeTables | None:
    """The threshold tables of quantized layer ``n`` (with a static output scale) whose input
    codes have the static scale ``in_scale`` and ``in_levels`` levels; None where a channel's
    staircase has more steps than a table holds, a step lies outside int16's range, or the
    float chain leaves float32's range. Unsigned output codes are the staircase of
    ``max(code, 0)``, what their layout stores.

    ``wide``: the accumulators are int32 and the kernel compares them saturated to int16, which
    keeps every comparison where the staircase is flat past int16's range: the codes at int32's
    ends must be those at the domain's (else None)."""
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
        if wide:
            ends = codes(np.tile(np.array([-(2**31), 2**31 - 1], np.int64), (channels, 1)))
            if not (np.array_equal(ends[:, 0], base) and np.array_equal(ends[:, 1], top)):
                return None
    except Exception:  # noqa: BLE001 -- a float chain outside float32's range: keep the float epilogue
        return None
    counts = top - base
    if (counts < 0).any() or counts.max(initial=0) > TABLE_ENTRIES - 1:
        return None
    steps = max(1, math.ceil(math.log2(int(counts.max(initial=0)) + 1)))
    entries = 2**steps - 1
    level = base[:, None] + np.arange(1, entries + 1)[None, :]  # the code each threshold leads to
    valid = np.arange(entries)[None, :] < counts[:, None]
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
    if not np.where(valid, (lo >= -NO_STEP) & (lo < NO_STEP), True).all():
        return None
    thresholds = np.where(valid, lo, NO_STEP).astype(np.int16)
    return CodeTables(thresholds, base.astype(np.int8), np.where(flip, -1, 0).astype(np.int8), steps)
