"""Codes by threshold search: a layer's output codes found among integer thresholds of its
accumulators (``vpermw`` tables), for static scales and, proved per call, for dynamic ones,
where each row takes a fixed-point line through its thresholds instead when one holds."""

from __future__ import annotations

import math
from typing import Callable

from tvm import tirx
from tvm.script.ir_builder import tirx as I

from csqc.targets.tvm.code_thresholds import FORM_FIELDS, NO_STEP, TABLE_ENTRIES
from .common import (
    _channel_view, F32, _f32, _fma, LANES, _less_offset, _levels, _local, _parallel_or_serial, _round_to_int,
    _vector_span)


SEARCH_LANES = TABLE_ENTRIES  # int16 lanes of one AVX-512 register: one vpermw table of thresholds


_VPERMW = "llvm.x86.avx512.permvar.hi.512"


def _check_code_search(shape, channel_axis, levels, out_bits, out_scale, storage, has_neg, has_zero_point,
                       has_residual, keep_y, steps) -> None:
    inner = _channel_view(shape, channel_axis)[3]
    if not 1 <= steps <= 5:  # 2**steps - 1 entries, within one 32-lane table
        raise ValueError(f"code_search takes 1..5 steps, got {steps}")
    if (levels is None or out_bits is None or not out_scale > 0 or storage not in ("int16", "int32") or has_neg
            or has_zero_point or has_residual or keep_y or inner < SEARCH_LANES):
        raise ValueError("code_search needs static output codes of one int16 or int32 accumulator per element (no "
                         "negative part, zero point, residual or kept y) on rows of at least "
                         f"{SEARCH_LANES} elements of one channel")


def _emit_code_search(shape, channel_axis, acc_flat, acc_offset, named, code_parts, out_levels: int,
                      out_offset: bool, steps: int) -> None:
    """The codes of int16 or int32 accumulators, 32 lanes a vector: by binary search over their
    channel's thresholds (``steps`` > 0; see :func:`epilogue`'s ``code_search``), or by the
    channel's fixed-point form (``steps`` 0: ``code_form``).

    int16 accumulators, per row (one channel): the thresholds move by the run-time offset
    (``acc - off > t`` is ``acc > t + off``; on the flipped side ``~acc > t - off``) and narrow
    to int16 with saturation, which is exact because the stored accumulators stay within
    +-32766 (the int16 storage rule) and their complement within -32767..32765: a threshold
    saturated at -32768 is below every one of them, as it was before, and one at 32767 above.
    The form takes the search value itself instead, ``(acc ^ flip) - shift`` saturated to int16.

    int32 accumulators: ``acc - off`` (or its complement) saturates to int16 instead, exact
    where every threshold is within -32767..32766 and the staircase flat beyond
    (``code_tables(wide=True)``): a saturated value compares with each threshold as it did."""
    _, outer, channels, inner = _channel_view(shape, channel_axis)
    vectors = -(-inner // SEARCH_LANES)
    rows = outer * channels
    flip = named["acc_flip"]
    pos_flat, neg_flat = code_parts
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"
    wide = acc_flat.dtype == "int32"

    with _parallel_or_serial(rows, rows * inner) as row:
        c = row % channels
        off = acc_offset[c] if acc_offset is not None else tirx.const(0, "int32")
        flipped = tirx.Cast("int32", flip[c])
        shift = tirx.Select(flipped != 0, -off, off)  # what the search value loses: (acc ^ flip) - shift
        if steps:
            table, base = _search_row(named, c, steps, None if wide else shift)
        else:
            constants, base = form_row(named["code_form"], c), _local((1,), i16)
            I.buffer_store(base, tirx.Broadcast(tirx.Cast("int16", named["code_base"][c]), lanes), [0])
        # per-row constants in registers (loaded once: LLVM does not hoist them past the stores)
        flip_lanes = _local((2,), i16)
        I.buffer_store(flip_lanes, tirx.Broadcast(tirx.Cast("int16", flip[c]), lanes), [0])
        if wide:
            wide_constants = _local((2,), f"int32x{lanes}")
            I.buffer_store(wide_constants, tirx.Broadcast(off, lanes), [0])
            I.buffer_store(wide_constants, tirx.Broadcast(flipped, lanes), [1])

        def codes_of_row(value_of):
            with I.serial(0, vectors) as v:
                # the last vector of a row ends at the row's end, overlapping the one before it
                # (its common codes are written twice, equal): no partial vectors, no reads past the row
                first = row * inner + tirx.min(v * lanes, inner - lanes)
                value = value_of(acc_flat[tirx.Ramp(first, 1, lanes)])
                code = searched_codes(value, table[0], base[0], steps) if steps else \
                    form_codes(value, constants) + base[0]
                store_searched_codes(code, first, pos_flat, neg_flat, out_levels, out_offset)

        if wide:
            codes_of_row(lambda stored: saturated_search_value(stored, wide_constants[0], wide_constants[1]))
        elif steps or acc_offset is None:  # the search moved its thresholds instead
            codes_of_row(lambda stored: stored ^ flip_lanes[0])
        else:
            # the form reads the search value itself, saturated to int16 (as int32 accumulators'
            # is): (acc ^ flip) - shift saturates exactly so where the shift fits int16 (the int16
            # storage rule keeps it within +-2**13); otherwise widen to int32 first
            I.buffer_store(flip_lanes, tirx.Broadcast(tirx.Cast("int16", shift), lanes), [1])
            with I.If(tirx.all(shift >= -32767, shift <= 32767)):
                with I.Then():
                    codes_of_row(lambda stored: I.call_llvm_pure_intrin(
                        i16, "llvm.ssub.sat", stored ^ flip_lanes[0], flip_lanes[1]))
                with I.Else():
                    codes_of_row(lambda stored: saturated_search_value(
                        tirx.Cast(f"int32x{lanes}", stored), tirx.Broadcast(off, lanes),
                        tirx.Broadcast(flipped, lanes)))


# Rows shorter than this keep the float chain under a dynamic scale: finding a row's thresholds
# costs about as much as running the chain over this many elements (measured: see
# _emit_dynamic_code_search)
DYNAMIC_SEARCH_MIN_ROW = 512


def dynamic_search_steps(out_levels: int, signed: bool) -> int:
    """Search steps for codes of ``out_levels`` levels under a dynamic scale, which bounds every
    code of the tensor by ``L``: ``2 L`` thresholds for signed codes, ``L`` for unsigned ones."""
    return max(1, math.ceil(math.log2((2 * out_levels if signed else out_levels) + 1)))


def dynamic_search_fits(shape, channel_axis: int, levels: int | None, out_bits: int | None, out_scale: float,
                        signed: bool, storage: str, has_neg: bool, has_residual: bool, keep_y: bool) -> bool:
    """Whether :func:`epilogue` can take ``dynamic_search`` for these options."""
    if levels is None or out_bits is None or out_scale != 0 or has_neg or has_residual or keep_y:
        return False
    if storage not in ("int16", "int32") or _channel_view(tuple(shape), channel_axis)[3] < DYNAMIC_SEARCH_MIN_ROW:
        return False
    return dynamic_search_steps(_levels(out_bits), signed) <= 5


def _emit_dynamic_code_search(shape, channel_axis, acc_flat, extremes, named, code_of: Callable,
                              float_row: Callable, code_parts, out_levels: int, out_offset: bool,
                              negative_codes: bool, levels: int) -> None:
    """A dynamic scale's codes pass by a threshold search: per row (one channel), once ``S'`` is
    known, find the staircase's thresholds over the row's values (``extremes``, from the scale's
    pass), prove them, and find the codes 32 lanes a vector by a fixed-point line through them
    (:func:`_row_line`) or, where none holds, by the search :func:`_emit_code_search` runs; a
    row whose thresholds are not proved runs ``float_row`` (the float chain) instead.

    Search values are ``s = stored ^ flip`` (``flip`` -1 where ``mult[c] < 0``), in which the code
    (``code_of(s, c)``: the codes pass's own float chain, so the same bits) never decreases. A
    dynamic scale bounds every code of the tensor: they lie in ``[b, L']`` (``b = -L'`` where
    ``negative_codes``: signed codes of values that may be negative; else 0), so over the row's ``[s_min, s_max]`` the code is ``b + #{l : s > t_l}`` for
    the levels ``l = b + 1 .. L'``, where ``t_l`` is the greatest ``s`` in ``[s_min - 1, s_max]``
    whose code is below ``l`` (``s_min - 1``: reached by the whole row; ``s_max``: by none of it).
    Each ``t_l`` is estimated from the affine part of the chain, ``s ~ ((l - 1/2) S' / L' - add) /
    mult * L / S + offset``, rounded and kept in the row, and proved by three exact codes: with
    codes below ``s_min`` taken as below every level and above ``s_max`` as above,
    ``code(t0 - 1) < l <= code(t0 + 1)`` puts ``t_l`` at ``t0 - 1`` or ``t0`` (``code(t0)``
    says which). No level needs the row's own codes first, so every lane is independent: three
    chain vectors a row for codes of one sign (six for both signs) against the chain's ``inner /
    16``; from :data:`DYNAMIC_SEARCH_MIN_ROW` elements the search is the faster. Rows whose
    estimate misses run the chain: a staircase flattened inside the row by a clip below zero, or
    a channel whose ``mult`` is zero (constant codes, a NaN estimate) where a level is not reached.
    int32 storage is searched narrowed to int16, so a row whose values leave -32767..32767 runs the
    chain (``s_min - 1``, a threshold below the whole row, must be an int16 too)."""
    _, outer, channels, inner = _channel_view(shape, channel_axis)
    rows = outer * channels
    steps = dynamic_search_steps(out_levels, negative_codes)
    entries = (2 if negative_codes else 1) * out_levels  # levels b + 1 .. L'
    lowest = -out_levels if negative_codes else 0  # b: the code below every threshold
    blocks = -(-entries // LANES)
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"
    vectors = -(-inner // lanes)
    wide = acc_flat.dtype == "int32"
    mult, add = named["mult"], named.get("add")
    pos_flat, neg_flat = code_parts
    zero = tirx.const(0, "int32")
    beyond = tirx.const(1 << 20, "int32")  # a code no level reaches, and its negation

    # each channel's estimate s ~ (l - 1/2) * slope + intercept (float32, any accuracy: it is
    # proved), 16 channels a vector before the rows (three divides a row, in the rows, were
    # a fifth of a 14x14 layer's pass)
    lines = I.alloc_buffer((2 * channels,), F32, scope="global")  # slopes, then intercepts

    def line_of(_row, c):
        to_acc = _f32(levels) / named["scale"][0] / mult[c]
        I.buffer_store(lines, named["out_scale"][0] / _f32(out_levels) * to_acc, [c])
        offset = _less_offset(zero, c, named, "int32")  # acc = stored + offset
        intercept = tirx.Cast(F32, zero - offset) - (add[c] * to_acc if add is not None else _f32(0.0))
        I.buffer_store(lines, intercept, [channels + c])

    _vector_span(line_of, 0, 0, channels)

    with _parallel_or_serial(rows, rows * inner) as row:
        c = row % channels
        flip = tirx.Select(mult[c] < _f32(0.0), tirx.const(-1, "int32"), zero)
        low, high = extremes[row], extremes[rows + row]
        ends = _local((2,), "int32")  # s_min, s_max
        I.buffer_store(ends, tirx.Select(flip != 0, ~high, low), [0])
        I.buffer_store(ends, tirx.Select(flip != 0, ~low, high), [1])
        s_min, s_max = ends[0], ends[1]
        thresholds = _local((lanes,), "int32")  # the table: entries past the levels are never crossed
        proved = _local((blocks * LANES,), "int32")
        with I.vectorized(entries, lanes) as k:
            I.buffer_store(thresholds, tirx.const(NO_STEP, "int32"), [k])
        # each entry's estimate, then the three codes that prove it, then its threshold: the
        # codes in one loop over the probes (the chain written once, not three times an entry:
        # TVM took seconds over the expressions, ~2 s of a MobileNetV2 layer's build)
        estimates = _local((blocks * LANES,), "int32")
        for block in range(blocks):
            with I.vectorized(0, LANES) as lane:
                level = lowest + 1 + block * LANES + lane
                estimate = _fma(tirx.Cast(F32, level) - _f32(0.5), lines[c], lines[channels + c])
                estimate = tirx.Select(flip != 0, _f32(-1.0) - estimate, estimate)
                # kept in the row (a NaN or an overflow converts to some int32: still proved or refused)
                I.buffer_store(estimates, tirx.max(tirx.min(_round_to_int(estimate), s_max), s_min),
                               [block * LANES + lane])
        codes = _local((3 * blocks * LANES,), "int32")  # code(t0 - 1), code(t0), code(t0 + 1) of each entry
        with I.serial(0, 3 * blocks) as probe:
            with I.vectorized(0, LANES) as lane:
                # the code at s, taken as below every level left of the row and above right of it
                s = estimates[tirx.floormod(probe, blocks) * LANES + lane] + tirx.floordiv(probe, blocks) - 1
                inside = code_of(tirx.max(tirx.min(s, s_max), s_min), c)
                I.buffer_store(codes, tirx.Select(s < s_min, zero - beyond, tirx.Select(s > s_max, beyond, inside)),
                               [probe * LANES + lane])
        for block in range(blocks):
            with I.vectorized(0, LANES) as lane:
                k = block * LANES + lane
                level = lowest + 1 + k
                below, middle, above = (codes[d * blocks * LANES + k] for d in range(3))
                in_use = k < entries
                I.buffer_store(thresholds, tirx.Select(
                    in_use, estimates[k] - 1 + tirx.Cast("int32", middle < level), tirx.const(NO_STEP, "int32")), [k])
                I.buffer_store(proved, tirx.Cast("int32", tirx.Or(tirx.Not(in_use),
                                                                   tirx.And(below < level, above >= level))), [k])
        ok = _local((1,), "int32")
        # every table entry must be an int16, s_min - 1 included (int16 storage keeps |stored| <=
        # 32766, so only a row of int32 storage or at -32768 fails that), and the values searched
        # (int32 narrowed to int16) must be the values themselves
        I.buffer_store(ok, tirx.Cast("int32", tirx.all(s_min > -(2**15), s_max < 2**15)), [0])
        with I.serial(0, blocks * LANES) as k:
            I.buffer_store(ok, ok[0] & proved[k], [0])
        with I.If(ok[0] != 0):
            with I.Then():
                flip_type = "int32" if wide else "int16"
                flips = _local((1,), f"{flip_type}x{lanes}")
                I.buffer_store(flips, tirx.Broadcast(tirx.Cast(flip_type, flip), lanes), [0])

                def codes_of_row(code_of_value):
                    with I.serial(0, vectors) as v:
                        # the last vector of a row ends at the row's end, overlapping the one before it
                        first = row * inner + tirx.min(v * lanes, inner - lanes)
                        stored = acc_flat[tirx.Ramp(first, 1, lanes)]
                        value = tirx.Cast(i16, stored ^ flips[0]) if wide else stored ^ flips[0]
                        store_searched_codes(code_of_value(value), first, pos_flat, neg_flat, out_levels, out_offset)

                kind, constants, steps_table, form_base = _row_line(thresholds, entries, s_min, s_max, lines[c], lowest)
                with I.If(kind[0] == _EXACT):
                    with I.Then():
                        codes_of_row(lambda value: form_codes(value, constants) + form_base[0])
                    with I.Else():
                        with I.If(kind[0] == _WITHIN_ONE):
                            with I.Then():
                                codes_of_row(lambda value: line_codes(value, constants, steps_table[0]) + form_base[0])
                            with I.Else():
                                table = _local((1,), i16)
                                I.buffer_store(table, tirx.Cast(i16, thresholds[tirx.Ramp(0, 1, lanes)]), [0])
                                code_base = _local((1,), i16)
                                I.buffer_store(code_base, tirx.Broadcast(tirx.const(lowest, "int16"), lanes), [0])
                                searched_rows(codes_of_row,
                                              lambda value: searched_codes(value, table[0], code_base[0], steps))
            with I.Else():
                float_row(row, c)


def searched_rows(codes_of_row: Callable, code_of_value: Callable) -> None:
    """A dynamic row's codes by the threshold search, where no line holds (a function of its own,
    so that tests can leave these rows out and see which rows took a line)."""
    codes_of_row(code_of_value)


def line_codes(value, constants, steps_table) -> tirx.PrimExpr:
    """The codes less the row's base of ``value`` (32 int16 search values) from a line of kind
    ``_WITHIN_ONE`` (:func:`_row_line`): the line's code ``g`` (:func:`form_codes`), the code or
    one below it, plus one where ``value`` passes the step ``g`` leads to (one ``vpermw`` probe)."""
    below = form_codes(value, constants)
    probe = I.call_llvm_pure_intrin(f"int16x{SEARCH_LANES}", _VPERMW, steps_table, below)
    return tirx.Select(value > probe, below + tirx.Broadcast(tirx.const(1, "int16"), SEARCH_LANES), below)


_EXACT, _WITHIN_ONE = 1, 2  # the kinds of line _row_line finds (0: none)
LINE_KINDS = (_EXACT, _WITHIN_ONE)  # the kinds tried, in order (tests narrow it to reach each path)
# Multipliers tried for a row's line: the one its float line gives, then its neighbours (the
# first that fits is kept)
_LINE_TRIES = 5
_FAR = 2**30  # beyond every int32 a row's reductions see


def _row_line(thresholds, entries: int, s_min, s_max, slope, lowest: int):
    """A line through one row's proved staircase, found per call: a fixed-point form ``g``
    (:func:`form_codes`) that is the code everywhere in the row (kind ``_EXACT``: six int16
    operations a vector, as ``code_thresholds.code_form`` proves for a calibrated channel at
    compile time), or else the code or one below it (``_WITHIN_ONE``: one probe of the row's steps
    finishes each code, :func:`line_codes`); either against the search's ``steps`` lookups,
    compares and selects (17 operations at four steps). An exact form needs the line within one
    accumulator of every step, which int16 arithmetic misses on rows of wide steps; within one
    code it nearly always holds. Measured on MobileNetV2's 96 x 112 x 112 expansion (Zen 4, two
    threads): 83 us searched, 50 us exact, 69 us within one.

    Only the thresholds within ``[s_min, s_max - 1]`` matter in the row (``t < s_min``: crossed
    by every element, counted into the base; ``t = s_max``: by none). They are ascending (``t_l``
    is the greatest ``s`` whose code is below ``l``), so the ``n`` inside are entries ``below ..
    below + n - 1``, and the code less the base is ``#{j : s > t_j}``. With ``lo, hi = t_first,
    t_last + 1`` and ``q`` filling int16, each multiplier ``M`` tried (from the row's float line)
    gives the exact range of ``B`` for which ``g`` is 0 at ``u = 0``, at most ``n`` at the top,
    at most ``j`` at ``t_j`` and at least ``j + 1`` (exact) or ``j`` (within one) at ``t_j + 1``
    for every threshold inside: ``g`` never decreases, so that holds everywhere in the row.
    ``r``: the largest that keeps ``M`` below 2**15 for the exact try, ``12 - floor(log2 n)`` (which
    always does) for the other. Returns the kind (int32 local), the constants as :func:`form_row`
    gives them, the row's steps from ``below`` on (int16 lanes ``t_below + k``; those past
    them never cross the row) and the base (int16 lanes)."""
    lanes, i16 = SEARCH_LANES, f"int16x{SEARCH_LANES}"

    def splat(v):
        return tirx.Broadcast(tirx.const(v, "int32") if isinstance(v, int) else v, lanes)

    def reduce(op, vector):
        return I.call_llvm_pure_intrin("int32", f"llvm.vector.reduce.{op}", vector)

    t = thresholds[tirx.Ramp(0, 1, lanes)]
    index = tirx.Ramp(tirx.const(0, "int32"), tirx.const(1, "int32"), lanes)
    used = index < splat(entries)
    # vectors kept in registers: whether each lane is a step inside the row (0 or 1), its index
    # among those steps, and the line's input at the step and one past it (stored, not
    # re-expanded in each try: TVM's buffer-region analysis is slow on large expressions)
    vectors = _local((4,), f"int32x{lanes}")
    I.buffer_store(vectors, tirx.Cast(f"int32x{lanes}", tirx.And(used, tirx.And(t >= splat(s_min), t < splat(s_max)))),
                   [0])
    inside = vectors[0] != splat(0)
    fields = _local((10,), "int32")  # below, n, lo, span, q, r, M, B, the try's start, its kind
    I.buffer_store(fields, reduce("add", tirx.Cast(f"int32x{lanes}", tirx.And(used, t < splat(s_min)))), [0])
    I.buffer_store(fields, reduce("add", vectors[0]), [1])
    below, n = fields[0], fields[1]
    for k in range(2, 8):  # no step inside the row: g = 0 everywhere, the code (the base)
        I.buffer_store(fields, tirx.const(0, "int32"), [k])
    # a try's M and its range of B, kept in locals: written out, TVM's buffer-region analysis took
    # 0.7 s over them in each dynamic-search kernel
    tries = _local((3,), "int32")
    kind = _local((1,), "int32")
    I.buffer_store(kind, tirx.Select(n == 0, tirx.const(_EXACT, "int32"), tirx.const(0, "int32")), [0])
    with I.If(n > 0):
        with I.Then():
            I.buffer_store(fields, reduce("smin", tirx.Select(inside, t, splat(_FAR))), [2])
            lo = fields[2]
            I.buffer_store(fields, reduce("smax", tirx.Select(inside, t, splat(-_FAR))) + 1 - lo, [3])
            span = fields[3]
            with I.If(tirx.all(span < 2**15, bool(LINE_KINDS))):
                with I.Then():
                    I.buffer_store(fields, sum(tirx.Cast("int32", tirx.shift_left(span, k) < 2**15)
                                               for k in range(1, 16)), [4])
                    q = fields[4]
                    top = tirx.shift_left(span, q)
                    t_in = tirx.Max(tirx.Min(t, splat(lo + span - 1)), splat(lo))  # every lane within the steps
                    I.buffer_store(vectors, tirx.shift_left(t_in - splat(lo), splat(q)), [1])
                    I.buffer_store(vectors, tirx.shift_left(t_in + splat(1) - splat(lo), splat(q)), [2])
                    I.buffer_store(vectors, index - splat(below), [3])
                    j = vectors[3]
                    with I.serial(0, len(LINE_KINDS)) as attempt:
                        with I.If(kind[0] == 0):
                            with I.Then():
                                line_kind = tirx.const((*LINE_KINDS, 0)[0], "int32")
                                for later in LINE_KINDS[1:]:
                                    line_kind = tirx.Select(attempt > 0, tirx.const(later, "int32"), line_kind)
                                I.buffer_store(fields, line_kind, [9])
                                exact = fields[9] == _EXACT
                                # r: for an exact line the largest that keeps M (2**(16 + r - q) /
                                # |slope|) below 2**15 (NaN: 0); else 12 - floor(log2 n), which always does
                                most = _f32(32767.0 / 65536.0) * tirx.abs(slope) * tirx.Cast(
                                    F32, tirx.shift_left(tirx.const(1, "int32"), q))
                                I.buffer_store(fields, tirx.Select(
                                    exact, sum(tirx.Cast("int32", most >= _f32(2.0**k)) for k in range(1, 15)),
                                    12 - sum(tirx.Cast("int32", n >= 2**k) for k in range(1, 5))), [5])
                                r = fields[5]
                                from_line = tirx.Cast(F32, tirx.shift_left(tirx.const(1, "int32"), 16 + r - q)) \
                                    / tirx.abs(slope)  # (NaN and extremes clamped)
                                I.buffer_store(fields, _round_to_int(tirx.Select(from_line >= _f32(1.0), tirx.Select(
                                    from_line <= _f32(32767.0), from_line, _f32(32767.0)), _f32(1.0))), [8])
                                # exact: g(t_j + 1) >= j + 1, else >= j; both: g(0) >= 0 | g(t_j) <= j, g(0) <= 0, g(top) <= n
                                reach = j + splat(tirx.Cast("int32", exact))
                                with I.serial(0, _LINE_TRIES) as k:
                                    with I.If(kind[0] == 0):
                                        with I.Then():
                                            # the start, then one above, one below, two above, ...
                                            step = tirx.floordiv(k + 1, 2) * (2 * tirx.floormod(k, 2) - 1)
                                            I.buffer_store(tries, tirx.Max(tirx.Min(fields[8] + step, 2**15 - 1), 1),
                                                           [0])
                                            m = tries[0]
                                            h0 = tirx.shift_right(vectors[1] * splat(m), splat(16))
                                            h1 = tirx.shift_right(vectors[2] * splat(m), splat(16))
                                            I.buffer_store(tries, tirx.Max(reduce("smax", tirx.Select(
                                                inside, tirx.shift_left(reach, splat(r)) - h1, splat(-_FAR))), 0), [1])
                                            I.buffer_store(tries, tirx.Min(tirx.Min(reduce("smin", tirx.Select(
                                                inside, tirx.shift_left(j + splat(1), splat(r)) - h0, splat(_FAR))) - 1,
                                                tirx.shift_left(1, r) - 1),
                                                tirx.shift_left(n + 1, r) - tirx.shift_right(top * m, 16) - 1), [2])
                                            b_lo, b_hi = tries[1], tries[2]
                                            with I.If(b_lo <= b_hi):
                                                with I.Then():
                                                    I.buffer_store(fields, m, [6])
                                                    I.buffer_store(fields, tirx.shift_right(b_lo + b_hi, 1), [7])
                                                    I.buffer_store(kind, fields[9], [0])
    constants = _local((6,), i16)
    I.buffer_store(constants, tirx.Broadcast(tirx.Cast("int16", fields[2]) ^ tirx.const(_SIGN_BIT, "int16"), lanes), [0])
    I.buffer_store(constants, tirx.Broadcast(tirx.Cast("int16", fields[3]), lanes), [1])
    for k, field in ((2, 4), (3, 6), (4, 7), (5, 5)):
        I.buffer_store(constants, tirx.Broadcast(tirx.Cast("int16", fields[field]), lanes), [k])
    steps_table = _local((1,), i16)
    I.buffer_store(steps_table, I.call_llvm_pure_intrin(
        i16, _VPERMW, tirx.Cast(i16, t), tirx.Cast(i16, index + splat(below))), [0])
    base = _local((1,), i16)
    I.buffer_store(base, tirx.Broadcast(tirx.Cast("int16", lowest + below), lanes), [0])
    return kind, constants, steps_table, base


def _search_row(named, c, steps: int, shift) -> tuple:
    """Row ``c``'s search table (moved by ``shift``, an int32 scalar, unless None) and its code
    base, in local registers."""
    lanes, i16 = SEARCH_LANES, f"int16x{SEARCH_LANES}"
    entries = 2**steps - 1
    table = _local((1,), i16)
    # lanes past the channel's entries (the next channel's) are never probed
    raw = named["code_thresholds"][tirx.Ramp(c * entries, 1, lanes)]
    if shift is None:
        I.buffer_store(table, raw, [0])
    else:  # NO_STEP entries stay uncrossable whatever the offset
        moved = tirx.Cast(i16, tirx.Max(tirx.Min(tirx.Cast(f"int32x{lanes}", raw) + tirx.Broadcast(shift, lanes),
                                                 tirx.Broadcast(tirx.const(32767, "int32"), lanes)),
                                        tirx.Broadcast(tirx.const(-32768, "int32"), lanes)))
        I.buffer_store(table, tirx.Select(raw == tirx.Broadcast(tirx.const(NO_STEP, "int16"), lanes), raw, moved), [0])
    base = _local((1,), i16)
    I.buffer_store(base, tirx.Broadcast(tirx.Cast("int16", named["code_base"][c]), lanes), [0])
    return table, base


_VPMULHW = "llvm.x86.avx512.pmulh.w.512"


def form_row(form, c) -> tirx.Buffer:
    """Channel ``c``'s fixed-point form (``code_thresholds.code_form``: ``lo, hi, q, M, B, r``),
    each field broadcast to 32 int16 lanes of a local buffer (in registers for the row's loop)."""
    lanes = SEARCH_LANES
    constants = _local((6,), f"int16x{lanes}")
    lo, hi = form[c * FORM_FIELDS], form[c * FORM_FIELDS + 1]
    # lo in the biased order of form_codes, and the clamp's width
    I.buffer_store(constants, tirx.Broadcast(lo ^ tirx.const(_SIGN_BIT, "int16"), lanes), [0])
    I.buffer_store(constants, tirx.Broadcast(hi - lo, lanes), [1])
    for k in range(2, 6):
        I.buffer_store(constants, tirx.Broadcast(form[c * FORM_FIELDS + k], lanes), [k])
    return constants


_SIGN_BIT = -(2**15)  # int16 0x8000: x ^ it orders int16 values as uint16 ones


def form_codes(value, constants) -> tirx.PrimExpr:
    """The codes less the channel's base of ``value`` (32 int16 lanes of one channel, as
    :func:`searched_codes` takes them) by its fixed-point form in ``constants`` (:func:`form_row`):
    ``((((clamp(value, lo, hi) - lo) << q) * M >> 16) + B) >> r``. No step overflows int16:
    ``(hi - lo) << q`` and ``|B|`` stay below 2**15 and 2**14 (``code_thresholds.code_form``).

    ``clamp(value, lo, hi) - lo`` is ``min(sat(v - lo'), hi - lo)`` in uint16 lanes, ``v``
    and ``lo'`` biased by the sign bit (``vpsubusw``, ``vpminuw``): two operations instead of
    three, and the bias folds into the caller's ``^ flip``."""
    i16, u16 = f"int16x{SEARCH_LANES}", f"uint16x{SEARCH_LANES}"
    lo_biased, width, q, m, b, r = (constants[k] for k in range(6))
    biased = tirx.reinterpret(u16, value ^ tirx.Broadcast(tirx.const(_SIGN_BIT, "int16"), SEARCH_LANES))
    lowered = tirx.Min(I.call_llvm_pure_intrin(u16, "llvm.usub.sat", biased, tirx.reinterpret(u16, lo_biased)),
                       tirx.reinterpret(u16, width))
    high = I.call_llvm_pure_intrin(i16, _VPMULHW, tirx.shift_left(tirx.reinterpret(i16, lowered), q), m)
    return tirx.shift_right(high + b, r)


def saturated_search_value(acc, offset, flip) -> tirx.PrimExpr:
    """What a search compares with ``code_tables(wide=True)``'s thresholds, from 32 int32
    accumulators of one channel: ``(acc - offset) ^ flip`` (``flip`` -1 where the channel's
    multiplier is negative: the complement reverses the order) saturated to int16. Exact because
    wide tables put every step within -32767..32766 and are flat beyond: a saturated value
    compares with each threshold as the int32 one did."""
    lanes = SEARCH_LANES
    value = (acc - offset) ^ flip
    return tirx.Cast(f"int16x{lanes}", tirx.Max(tirx.Min(value, tirx.Broadcast(tirx.const(32767, "int32"), lanes)),
                                                tirx.Broadcast(tirx.const(-32768, "int32"), lanes)))


def searched_codes(value, table, code_base, steps: int) -> tirx.PrimExpr:
    """The codes of ``value`` (32 int16 lanes of one channel, :func:`saturated_search_value` or
    the int16 form) by a binary search of ``steps`` ``vpermw`` lookups in ``table`` (that
    channel's ``2**steps - 1`` thresholds), plus ``code_base`` (int16 lanes)."""
    lanes = SEARCH_LANES
    i16 = f"int16x{lanes}"

    def splat(v):
        return tirx.Broadcast(tirx.const(v, "int16"), lanes)

    searched, index = _local((1,), i16), _local((1,), i16)
    I.buffer_store(searched, value, [0])
    I.buffer_store(index, splat(0), [0])
    # the table moved up one lane (loop-invariant: LLVM hoists it): a step probes at its candidate
    # itself, not at the candidate less one (an OR a step less: 20 -> 17 vector ops per 32 codes)
    lanes_before = tirx.Max(tirx.Ramp(tirx.const(-1, "int16"), tirx.const(1, "int16"), lanes), splat(0))
    moved = I.call_llvm_pure_intrin(i16, _VPERMW, table, lanes_before)
    for step in (2**k for k in reversed(range(steps))):
        candidate = index[0] + splat(step)
        probe = I.call_llvm_pure_intrin(i16, _VPERMW, moved, candidate)
        I.buffer_store(index, tirx.Select(searched[0] > probe, candidate, index[0]), [0])
    return index[0] + code_base


def store_searched_codes(code, first, pos_flat, neg_flat, out_levels: int, out_offset: bool) -> None:
    """Store 32 int16 ``code`` lanes at ``first`` of the code buffers in ``quantize``'s layout:
    offset codes (``code + L``), or the positive part and, where there is one, the negative part."""
    lanes = SEARCH_LANES
    zero, at = tirx.Broadcast(tirx.const(0, "int16"), lanes), [tirx.Ramp(first, 1, lanes)]
    if out_offset:
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", code + tirx.Broadcast(tirx.const(out_levels, "int16"),
                                                                                    lanes)), at)
    elif neg_flat is None:  # unsigned codes: the staircase is max(code, 0)'s, its base >= 0 (code_tables)
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", code), at)
    else:
        I.buffer_store(pos_flat, tirx.Cast(f"uint8x{lanes}", tirx.Max(code, zero)), at)
        I.buffer_store(neg_flat, tirx.Cast(f"uint8x{lanes}", tirx.Max(zero - code, zero)), at)
