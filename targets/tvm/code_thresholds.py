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

Where every channel's staircase is close enough to a line, :func:`code_form` replaces the
search by fixed-point integer arithmetic (``glue.epilogue``'s ``code_form``), proved equal to
the staircase at compile time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from csqc.interpreter import layer_output
from csqc.ir import Graph, Node

__all__ = ["CodeTables", "TABLE_ENTRIES", "DOMAIN", "NO_STEP", "FORM_FIELDS", "code_form", "code_tables",
           "form_codes", "forms_in_range", "saturation_thresholds"]

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


def _channel_flips(g: Graph, n: Node) -> tuple[int, int, np.ndarray] | None:
    """Layer ``n``'s channel axis, channel count and where the search runs on ``~acc`` (``mult[c]
    < 0``: ``y`` then never decreases in it); None where ``mult`` is not finite per channel."""
    axis = 1 if n.op == "qconv2d" else -1
    channels = int(n.type.shape[axis])
    mult = np.asarray(g.params[n.layer.mult], np.float32).reshape(-1)
    if mult.size != channels or not np.isfinite(mult).all():
        return None
    return axis, channels, np.signbit(mult) & (mult != 0)


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
    found = _channel_flips(g, n)
    if found is None:
        return None
    axis, channels, flip = found

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


def saturation_thresholds(g: Graph, n: Node, in_scale: float, in_levels: int, bound: float) -> np.ndarray | None:
    """Per output channel of layer ``n`` (float output ``y``, its input codes at scale ``in_scale``
    of ``in_levels`` levels), the least int16 search value ``s`` (``acc``, or ``~acc`` where
    ``mult[c] < 0``: ``y`` never decreases in it) whose ``y`` reaches ``bound`` (a clip's upper
    end), from the interpreter's own float32 chain; 32767 (above every stored int16 accumulator)
    where no int16 value does, -32768 where every one does. None where the chain leaves
    float32's range."""
    found = _channel_flips(g, n) if n.quant.out_bits is None else None
    if found is None:
        return None
    axis, channels, flip = found

    def reached(s: np.ndarray) -> np.ndarray:
        acc = np.where(flip, ~s, s)[None, :, None, None] if axis == 1 else np.where(flip, ~s, s)[None, :]
        with np.errstate(all="ignore"):
            y = np.asarray(layer_output(g, n, acc, in_scale, in_levels), np.float32).reshape(-1)
        if not np.isfinite(y).all():
            raise FloatingPointError
        return y >= np.float32(bound)

    lo = np.full(channels, -(2**15), np.int64)  # int16's ends
    hi = np.full(channels, 2**15 - 1, np.int64)
    try:
        top, bottom = reached(hi), reached(lo)
        # least s in (lo, hi] with reached(s), by bisection: not reached(lo), reached(hi)
        a, b = lo.copy(), hi.copy()
        for _ in range(17):
            mid = (a + b) // 2
            r = reached(mid)
            b, a = np.where(r, mid, b), np.where(r, a, mid)
        inside = top & ~bottom  # the channels whose threshold lies within int16
        if not (reached(b)[inside].all() and not reached(b - 1)[inside].any()):
            return None  # not monotone (cannot happen for the chain; refuse rather than guess)
    except FloatingPointError:
        return None
    return np.where(bottom, -(2**15), np.where(top, b, 2**15 - 1)).astype(np.int16)


# --------------------------------------------------------------------------------------------
# The staircase as integer arithmetic: a proved fixed-point form instead of the search
# --------------------------------------------------------------------------------------------
FORM_FIELDS = 8  # int16 per channel: lo, hi, q, M, B, r, and two lanes of padding
_M_LIMIT = 2**15  # M is an int16 multiplier (vpmulhw), B keeps h + B inside int16 (|h| < 2**14)
_B_LIMIT = 2**14


def form_codes(s: np.ndarray, form: np.ndarray) -> np.ndarray:
    """The codes less ``base`` that a channel's fixed-point ``form`` (``lo, hi, q, M, B, r``;
    :func:`code_form`) gives search points ``s`` (int16 values, any integer array): what the kernels
    compute in int16 lanes, ``((((clamp(s, lo, hi) - lo) << q) * M >> 16) + B) >> r``, every step a
    floor."""
    lo, hi, q, m, b, r = (int(v) for v in form[:6])
    u = (np.clip(np.asarray(s, np.int64), lo, hi) - lo) << q
    return (((u * m) >> 16) + b) >> r


def _channel_form(t: np.ndarray) -> np.ndarray | None:
    """The form of one channel's ascending thresholds ``t`` (``NO_STEP`` entries dropped), or None."""
    n = len(t)
    form = np.zeros(FORM_FIELDS, np.int64)
    if n == 0:  # a flat staircase: every field 0, every code 0 (then base)
        return form.astype(np.int16)
    lo, hi = int(t[0]), int(t[-1]) + 1
    span = hi - lo
    if span >= _M_LIMIT:  # clamp(s) - lo must fit int16
        return None
    q = 0  # pre-shift: the clamped, lowered value fills int16, so the multiplier keeps ~15 bits
    while span << (q + 1) < _M_LIMIT:
        q += 1
    u0, u1 = (t - lo) << q, (t + 1 - lo) << q  # the value at each threshold, and one above it
    # slopes (code per unit of u) a real line needs to step at every threshold: pairs bound it
    i, j = np.triu_indices(n, 1)
    gap = (t[j] - t[i]).astype(np.float64) * 2.0**q
    slope_lo = float(np.max((j - i) / (gap + 2.0**q), initial=0.0))
    wide_gap = gap > 2.0**q
    slope_hi = float(np.min((j - i)[wide_gap] / (gap[wide_gap] - 2.0**q), initial=math.inf))
    level = np.arange(1, n + 1)  # the code just above each threshold
    for r in range(15, -1, -1):  # the finest rounding first
        scale = 2.0 ** (16 + r)
        m_lo = max(1, math.floor(slope_lo * scale))
        m_hi = min(_M_LIMIT - 1, math.ceil(slope_hi * scale) if math.isfinite(slope_hi) else _M_LIMIT - 1)
        if m_lo > m_hi:
            continue
        ms = np.unique(np.clip((m_lo + m_hi) // 2 + np.arange(-32, 33), m_lo, m_hi))
        h0, h1 = (u0[None, :] * ms[:, None]) >> 16, (u1[None, :] * ms[:, None]) >> 16
        # floor((h0 + B) / 2^r) <= level - 1 and floor((h1 + B) / 2^r) >= level; at u = 0 (h = 0)
        # exactly 0, and at the top (the last h1) exactly n
        b_lo = np.maximum(np.max(level * 2**r - h1, axis=1), 0)
        b_hi = np.minimum(np.min(level * 2**r - h0, axis=1), np.minimum(2**r, (n + 1) * 2**r - h1[:, -1])) - 1
        for k in np.flatnonzero(b_lo <= b_hi):
            b = (int(b_lo[k]) + int(b_hi[k])) // 2
            if -_B_LIMIT <= b < _B_LIMIT:
                form[:6] = (lo, hi, q, int(ms[k]), b, r)
                return form.astype(np.int16)
    return None


def code_form(tables: CodeTables) -> np.ndarray | None:
    """Each channel's staircase as fixed-point integer arithmetic, ``int16[C, FORM_FIELDS]``
    (``lo, hi, q, M, B, r``: :func:`form_codes`, then ``+ base``), or None where a channel has none.

    Six int16 vector operations on 32 lanes (clamp, lower, shift, ``vpmulhw``, add, shift)
    replace the search's ``steps`` lookups, compares and selects. Proved here, not sampled: the
    form is monotone in ``s`` (every step is), so it equals the staircase ``base + #{k : s > t_k}``
    everywhere when it does at each threshold and one above it, and at the clamp's two ends. A
    channel whose thresholds span 2**15 or more, or whose steps no one slope fits closely enough
    (a 30-step staircase 4,000 accumulators wide needs more than int16's precision), has none.
    ``q`` shifts the clamped value up to fill int16 before the multiply, which keeps about 15
    bits of slope whatever the steps' spacing. Every threshold is within int16's range
    (:func:`code_tables`), so the search value saturated to int16 keeps its code."""
    forms = []
    for row in tables.thresholds.astype(np.int64):
        t = row[row != NO_STEP]
        form = _channel_form(t)
        if form is None:
            return None
        probes = np.concatenate([t, t + 1, [int(form[0]) - 1, int(form[1]) + 1]]) if len(t) else np.array([0])
        want = np.searchsorted(t, probes, side="left")
        if not np.array_equal(form_codes(probes, form), want):
            return None  # cannot happen for the bounds above; refuse rather than guess
        forms.append(form)
    return np.stack(forms) if forms else np.zeros((0, FORM_FIELDS), np.int16)


def forms_in_range(flat: np.ndarray) -> bool:
    """Whether ``flat`` (``code_form(...).reshape(-1)``, read back from an artifact) holds only
    forms :func:`code_form` can write: shifts below 16 and no int16 step overflowing, so a
    tampered artifact is refused instead of reaching the kernels' shifts and multiplies."""
    if flat.dtype != np.int16 or flat.ndim != 1 or flat.size % FORM_FIELDS:
        return False
    lo, hi, q, m, b, r = (f.astype(np.int64) for f in flat.reshape(-1, FORM_FIELDS)[:, :6].T)
    width = hi - lo
    return bool(((width >= 0) & (q >= 0) & (q < 16) & (r >= 0) & (r < 16) & (m >= 0) & (b >= -_B_LIMIT)
                 & (b < _B_LIMIT)).all() and ((width << np.minimum(q, 15)) < _M_LIMIT).all())
