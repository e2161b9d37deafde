"""The weight-only dense kernels of the LLVM (CPU) target: float activations x low-bit weight planes.

Two forms, chosen per layer by ``backend.choose_kernel``: :func:`lut_dense` (table lookups of
activation partial sums, below; AVX-512) and :func:`dequant_dense` (codes dequantized in
registers, see its section further down; AVX-512, and AVX2 at 8 lanes).

A quantized linear layer whose input is not quantized (``act_bits`` None) computes
``acc[m, n] = sum_k x[m, k] * float32(q[n, k])`` in float32 (the IR contract of a float-input
layer; the epilogue then applies ``mult`` and ``add``). Instead of decoding ``q`` to fp32 (32
bits per weight streamed), this kernel reads the bit-serial weight planes (``P`` bits per weight)
and looks partial sums up in a table, in the style of T-MAC:

* per row ``m``, every group of four activations that share a packed nibble position gets a
  16-entry table ``T[i] = sum_{t<4} bit_t(i) * x[k_t]`` (float32, one zmm per group);
* a plane word holds 32 weight bits of one output (the interleaved bit order of
  ``packing.pack_bits_along_k``: bit ``b`` of word ``w`` is ``k = b*KW + w``); its nibble ``s``
  indexes the table of ``k = (4s + t)*KW + w``, ``t < 4``. With lanes along N, one ``vpermps``
  (``llvm.x86.avx512.permvar.sf.512``, which reads only the low 4 index bits) gives 16 outputs'
  partial sums of four activations for one plane. The index of nibble ``s`` is the 16 words
  loaded ``s // 2`` bytes further on (no shift for even nibbles, one by 4 for odd ones);
* each plane has its own accumulators; ``acc = sum_p sign_p 2^shift_p acc_p - z * sum_k x[m, k]``
  at the end (power-of-two scaling is exact). Half of the accumulators take the coefficient at
  once by FMA (exact too), which spreads the accumulation over the FMA and the FADD pipes.
  Planes at or after the run-time ``n_planes`` get coefficient 0 (PrecisionBatching's plane
  skipping, as in the bit-serial kernel);
* several rows (batch > 1) share each index: the rows of a pass look up their own tables with it.

Per lookup (16 outputs x 4 activations x 1 plane) the inner loop issues one vpermps, one vaddps
or vfmadd, half a shift and half an index load, and an eighth to a quarter of a table load.

Work is ``P/4`` table lookups per weight and row against one FMA per weight for the fp32
kernel, and the weights stream at ``P`` bits instead of 32: it wins for few rows and few planes
(``backend.choose_kernel`` weighs that). Float sums run in another order than numpy's, so the
result agrees within float tolerance, like every float layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from .packing import WORD_BITS, dequant_code_bits, words_for

__all__ = ["LUT_LANES", "lut_tiles_per_task", "pack_lut_weight", "lut_dense", "dequant_blocking",
           "pack_dequant_weight", "dequant_dense"]

LUT_LANES = 16  # outputs per vector tile: 16 float32 lanes of one zmm (the packed weight lanes)
_GROUP = 4  # activations per table: a nibble of weight bits indexes 16 entries
_NIBBLES = WORD_BITS // _GROUP
_VPERMPS = "llvm.x86.avx512.permvar.sf.512"
_ZMM_REGISTERS = 32  # AVX-512 vector registers: accumulators, indices, tables, coefficients
_LOAD_SLACK = 4  # bytes after the last plane word: the byte-offset loads of _nibble_index read 3 past it
# register-sized scratch stays an LLVM alloca (see kernels._ON_STACK)
_ON_STACK = {"disable_lower_builtin": True}


def _check(shifts_signs) -> list[tuple[int, int]]:
    planes = [(int(shift), int(sign)) for shift, sign in shifts_signs]
    if not planes:
        raise ValueError("at least one weight plane is required")
    for shift, sign in planes:
        if sign not in (1, -1) or not 0 <= shift <= 15:
            raise ValueError(f"invalid plane (shift={shift}, sign={sign})")
    return planes


def _plane_coefficient(p, n_planes, shifts_signs) -> tirx.PrimExpr:
    """float32 ``sign_p * 2^shift_p`` of plane index ``p`` (a Select chain folded when the loop is
    unrolled), 0 for a plane at or after ``n_planes``."""
    expr = tirx.const(0.0, "float32")
    for index in reversed(range(len(shifts_signs))):
        shift, sign = shifts_signs[index]
        expr = tirx.Select(p == index, tirx.const(float(sign * (1 << shift)), "float32"), expr)
    return tirx.Select(p < n_planes, expr, tirx.const(0.0, "float32"))


def _nibble_index(w_bytes: tirx.Buffer, word_byte: tirx.PrimExpr, nibble: tirx.PrimExpr) -> tirx.PrimExpr:
    """Nibble ``nibble`` of 16 consecutive plane words (starting at byte ``word_byte``) in the
    low 4 bits of each int32 lane, the only bits vpermps reads. Loading the words
    ``nibble // 2`` bytes further brings an even nibble to the bottom without a shift (a lane's
    top byte then comes from the next lane, which vpermps ignores); odd ones shift by 4 more."""
    load = tirx.BufferLoad(w_bytes, [tirx.Ramp(word_byte + nibble // 2, 1, 4 * LUT_LANES)])
    # a shift by 0 (even nibbles) folds away once the nibble loop is unrolled
    return tirx.reinterpret(f"int32x{LUT_LANES}", load) >> tirx.Broadcast(_GROUP * (nibble % 2), LUT_LANES)


def _lookup(table: tirx.Buffer, row, word, nibble, index: tirx.PrimExpr) -> tirx.PrimExpr:
    """16 partial sums: ``table[row, word, nibble, index[lane]]`` per lane (one vpermps)."""
    entries = tirx.BufferLoad(table, [row, word, nibble, tirx.Ramp(0, 1, LUT_LANES)])
    return tirx.call_llvm_pure_intrin(f"float32x{LUT_LANES}", _VPERMPS, entries, index)


def _tile_store(lanes: int, n_tiles: int, last_tile_width: int):
    """Macro ``store(y, value, m, tile)``: one ``lanes``-wide vector of outputs into row ``m`` of
    ``y``; the last tile of a row may be narrower (spilled to the stack, stored lane by lane)."""

    @T.macro
    def store(y, value, m, tile):
        if last_tile_width == lanes:
            y[m, T.ramp(tile * lanes, 1, lanes)] = value
        elif tile < n_tiles - 1:
            y[m, T.ramp(tile * lanes, 1, lanes)] = value
        else:
            spill = T.alloc_buffer((lanes,), "float32", scope="local", annotations=_ON_STACK)
            spill[T.ramp(0, 1, lanes)] = value
            for lane in range(last_tile_width):
                y[m, tile * lanes + lane] = spill[lane]

    return store


def lut_tiles_per_task(planes: int, n_tiles: int, tiles_per_task: int = 0) -> int:
    """Output tiles sharing each table load: ``tiles x planes`` accumulators, plus as many plane
    words in flight, must fit the 32 zmm registers (8 accumulators measured best here)."""
    return max(1, min(tiles_per_task or max(1, 8 // planes), n_tiles))


def _rows_per_pass(rows: int, planes: int, tiles_per_task: int) -> int:
    """Rows sharing each plane-word load and shift: the largest divisor of ``rows`` whose
    accumulators and table (one per row), next to the plane-word indices and plane
    coefficients, fit the 32 zmm registers (a pass of 4 rows spilled and ran slower here)."""
    lookups = planes * tiles_per_task  # accumulators per row, and indices in flight
    fitting = max(1, (_ZMM_REGISTERS - lookups - planes) // (lookups + 1))
    return max(d for d in range(1, min(rows, fitting) + 1) if rows % d == 0)


def pack_lut_weight(packed_planes: np.ndarray, tiles_per_task: int) -> np.ndarray:
    """The bit-serial plane layout ``[N_tiles, P, KW, 16]`` (``packing.pack_weight_planes``)
    regrouped for :func:`lut_dense`: words ``[blocks, KW, tiles_per_task, P, 16]``, so that one
    task streams one contiguous range (N padded with zero tiles to whole blocks), as flat bytes."""
    n_tiles, planes, kw, lanes = packed_planes.shape
    if lanes != LUT_LANES:
        raise ValueError(f"the weight-only kernel reads {LUT_LANES}-lane plane tiles, got {lanes}")
    blocks = -(-n_tiles // tiles_per_task)
    padded = np.zeros((blocks * tiles_per_task, planes, kw, lanes), packed_planes.dtype)
    padded[:n_tiles] = packed_planes
    words = padded.reshape(blocks, tiles_per_task, planes, kw, lanes).transpose(0, 3, 1, 2, 4)
    # the kernel loads words at byte offsets: little-endian uint32 bytes, then the load slack
    little_endian = np.ascontiguousarray(words, dtype="<u4").reshape(-1).view(np.uint8)
    return np.concatenate([little_endian, np.zeros(_LOAD_SLACK, np.uint8)])


def lut_dense(M: int, N: int, K: int, shifts_signs: Sequence[tuple[int, int]], zero_point: bool,
              tiles_per_task: int = 0) -> tirx.PrimFunc:
    """Weight-only dense kernel (float32 activations, bit-plane weights, float32 accumulators).

    Signature of the returned PrimFunc::

        main(x: float32[M, K], w_bytes: uint8[blocks * KW * tiles_per_task * P * 16 * 4 + 4],
             n_planes: int32, zero_point: int32, y: float32[M, N])

    ``w_bytes`` comes from ``pack_lut_weight(packing.pack_weight_planes(planes, lanes=16),
    lut_tiles_per_task(P, ceil(N/16)))``, ``shifts_signs``
    lists ``(shift, sign)`` per plane, most significant first. With ``zero_point=True`` (offset
    encoding) the kernel subtracts ``zero_point * sum_k x[m, k]``. ``tiles_per_task``: output
    tiles sharing each table load (0: :func:`lut_tiles_per_task` picks).
    """
    shifts_signs = _check(shifts_signs)
    planes = len(shifts_signs)
    with_zero_point = bool(zero_point)
    lanes = LUT_LANES
    kw = words_for(K)
    k_padded = kw * WORD_BITS
    n_tiles = -(-N // lanes)
    block = lut_tiles_per_task(planes, n_tiles, tiles_per_task)
    blocks = -(-n_tiles // block)
    last_tile_width = N - (n_tiles - 1) * lanes
    rows_per_pass = _rows_per_pass(M, planes, block)
    halves = 2 if rows_per_pass == 1 else 1  # accumulator slots per row (see tile_block)
    slots = rows_per_pass * halves

    @T.macro
    def build_tables(x, table, rowsum, m):
        # zero-padded copy of the row: positions k >= K add nothing to any table entry
        row = T.alloc_buffer((k_padded,), "float32")
        for k in T.vectorized(k_padded):
            row[k] = T.float32(0)
        for k in T.vectorized(K):
            row[k] = x[m, k]
        for w in range(kw):
            for s in T.unroll(_NIBBLES):
                for i in T.vectorized(_GROUP * _GROUP):
                    # entry i sums the activations whose bit is set in i (selected by a 0/1 factor)
                    table[m, w, s, i] = (
                        (row[(_GROUP * s) * kw + w] * T.Cast("float32", i & 1)
                         + row[(_GROUP * s + 1) * kw + w] * T.Cast("float32", (i >> 1) & 1))
                        + (row[(_GROUP * s + 2) * kw + w] * T.Cast("float32", (i >> 2) & 1)
                           + row[(_GROUP * s + 3) * kw + w] * T.Cast("float32", (i >> 3) & 1)))
        if with_zero_point:
            part = T.alloc_buffer((lanes,), "float32", scope="local", annotations=_ON_STACK)
            for lane in T.vectorized(lanes):
                part[lane] = T.float32(0)
            for v in range(k_padded // lanes):
                for lane in T.vectorized(lanes):
                    part[lane] = part[lane] + row[v * lanes + lane]
            total = T.alloc_buffer((1,), "float32", scope="local", annotations=_ON_STACK)
            total[0] = T.float32(0)
            for lane in range(lanes):
                total[0] = total[0] + part[lane]
            rowsum[m] = total[0]

    store = _tile_store(lanes, n_tiles, last_tile_width)

    def slot(r, half):
        # accumulator slot of row r of the pass; odd slots hold coefficient-scaled sums
        return r * halves + half

    def word_index(w_bytes, task, w, s, b, p):
        return _nibble_index(w_bytes, ((((task * kw + w) * block + b) * planes + p) * lanes) * 4, s)

    @T.macro
    def tile_block(w_bytes, table, rowsum, y, n_planes, zero_point, task, m0):
        # accumulator slots: even ones add lookups (FADD pipes), odd ones fold the plane coefficient
        # in by FMA (FMA pipes; exact scaling by a power of two), so both kinds of pipe share the
        # accumulation; a single row alternates by nibble parity (two halves), several rows by row
        acc = T.alloc_buffer((slots, block, planes), "float32x16", scope="local", annotations=_ON_STACK)
        for a in T.unroll(slots):
            for b in T.unroll(block):
                for p in T.unroll(planes):
                    acc[a, b, p] = T.broadcast(T.float32(0), lanes)
        for w in range(kw):
            for s in T.unroll(_NIBBLES):
                for b in T.unroll(block):
                    for p in T.unroll(planes):
                        # the index (load, shift) is shared by the rows of the pass
                        for r in T.unroll(rows_per_pass):
                            if slot(r, s % halves) % 2 == 0:
                                acc[slot(r, s % halves), b, p] = acc[slot(r, s % halves), b, p] + _lookup(
                                    table, m0 + r, w, s, word_index(w_bytes, task, w, s, b, p))
                            else:
                                acc[slot(r, s % halves), b, p] = T.call_llvm_pure_intrin(
                                    "float32x16", "llvm.fma",
                                    _lookup(table, m0 + r, w, s, word_index(w_bytes, task, w, s, b, p)),
                                    T.broadcast(_plane_coefficient(p, n_planes, shifts_signs), lanes),
                                    acc[slot(r, s % halves), b, p])
        for r in range(rows_per_pass):
            for b in range(block):
                if task * block + b < n_tiles:
                    total = T.alloc_buffer((1,), "float32x16", scope="local", annotations=_ON_STACK)
                    total[0] = T.broadcast(T.float32(0), lanes)
                    for p in T.unroll(planes):
                        for h in T.unroll(halves):
                            if slot(r, h) % 2 == 0:
                                total[0] = total[0] + acc[slot(r, h), b, p] * T.broadcast(
                                    _plane_coefficient(p, n_planes, shifts_signs), lanes)
                            else:
                                total[0] = total[0] + acc[slot(r, h), b, p]
                    if with_zero_point:
                        total[0] = total[0] - T.broadcast(T.Cast("float32", zero_point) * rowsum[m0 + r], lanes)
                    store(y, total[0], m0 + r, task * block + b)

    @T.prim_func
    def main(x: T.Buffer((M, K), "float32"),
             w_bytes: T.Buffer((blocks * kw * block * planes * lanes * 4 + _LOAD_SLACK,), "uint8"),
             n_planes: T.int32, zero_point: T.int32,
             y: T.Buffer((M, N), "float32")):
        T.func_attr({"tir.noalias": True})
        table = T.alloc_buffer((M, kw, _NIBBLES, _GROUP * _GROUP), "float32")
        rowsum = T.alloc_buffer((M,), "float32")
        for m in T.parallel(M):
            build_tables(x, table, rowsum, m)
        for task in T.parallel(blocks):
            for pass_ in range(M // rows_per_pass):
                tile_block(w_bytes, table, rowsum, y, n_planes, zero_point, task, pass_ * rows_per_pass)

    return main


# --------------------------------------------------------------------------------------------
# Dequantize in registers: packed codes -> float32 levels (one permute) -> FMA
# --------------------------------------------------------------------------------------------
# The other weight-only form: the planes are recombined at compile time into one code per
# weight, one bit a plane (``c = sum_p bit_p << (P - 1 - p)``, planes most significant first),
# packed as nibbles (up to 4 planes) or bytes (5 or 6). In the kernel a code indexes a level table
# ``level[c] = sum_p bit_p(c) sign_p 2^shift_p - z`` built per call (planes at or after
# ``n_planes`` count 0), and the levels meet each row's broadcast activation in one FMA. Signs,
# repeated shifts and gaps in the mask live in the table, so any planes form a code. Levels are
# exact small integers, so every product is exact and only the sum order differs from numpy (as
# in the fp32 kernel). Work: one lookup per weight vector shared by all rows of a pass, one FMA
# per weight and row.
#
# Two widths: AVX-512 (16 lanes: one vpermps reads 16 levels, vpermi2ps 32, 64 take two
# 16-entry lookups added, the low 4 code bits' planes and the top bits') and AVX2 (8 lanes: one
# vpermps reads 8 levels; 16 to 64 take two 8-entry lookups added, the low 3 bits' and the top).
_VPERMI2PS = "llvm.x86.avx512.vpermi2var.ps.512"
_VPERMPS_256 = "llvm.x86.avx2.permps"  # reads the low 3 index bits
_DEQUANT_MAX_ROWS = 4  # rows per pass (sharing each lookup); 4 rows x 4 tiles measured best at 8 rows
_DEQUANT_ACCUMULATORS = 8  # independent FMA chains at one row (FMA latency x 2 pipes)
_AVX2_LANES = 8


def dequant_blocking(rows: int, n_tiles: int, lanes: int = LUT_LANES) -> tuple[int, int]:
    """``(rows_per_pass, tiles_per_task)``: rows sharing each lookup, and output tiles per task,
    so that enough FMA chains run side by side without spilling (16 zmm accumulators at most on
    AVX-512; AVX2's 16 ymm registers hold 8 besides the table, index and broadcast rows) and a
    narrow layer still splits into two tasks."""
    rows_per_pass = min(rows, _DEQUANT_MAX_ROWS)
    if lanes == LUT_LANES:
        tiles = _DEQUANT_ACCUMULATORS if rows_per_pass == 1 else 4
    else:  # AVX2 (measured -mcpu=haswell on a Zen 4, 4096 x 4096, 2 threads; see backend.py)
        tiles = {1: 6, 2: 4}.get(rows_per_pass, 2)
    # at least two tasks (both threads busy) where there are two tiles
    return rows_per_pass, max(1, min(tiles, n_tiles // 2))


def _dequant_codes(planes: np.ndarray) -> np.ndarray:
    """One code per weight, one bit a plane: plane 0 (the most significant) in the top bit."""
    count = planes.shape[0]
    codes = np.zeros(planes.shape[1:], np.uint32)
    for p, plane in enumerate(planes):
        codes |= plane.astype(np.uint32) << (count - 1 - p)
    return codes


def pack_dequant_weight(planes: np.ndarray, shifts_signs, tiles_per_task: int, lanes: int = LUT_LANES) -> np.ndarray:
    """Weight planes ``[P, N, K]`` (0/1, most significant first) as the codes of
    :func:`dequant_dense`: words ``[blocks, KW, tiles_per_task, lanes]`` little-endian, whose
    code ``s`` (nibble or byte) is ``k = codes_per_word * w + s`` of lane ``n``, then the load
    slack, as flat bytes (N padded with zero tiles to whole blocks)."""
    planes = np.asarray(planes)
    count, n, k = planes.shape
    if count != len(shifts_signs):
        raise ValueError(f"{count} weight planes but {len(shifts_signs)} plane specs")
    code_bits = dequant_code_bits(count)
    if not code_bits:
        raise ValueError(f"{count} planes make codes wider than the dequantizing kernel reads (6 planes at most)")
    codes = _dequant_codes(planes)
    per_word = WORD_BITS // code_bits
    kw = -(-k // per_word)
    n_tiles = -(-n // lanes)
    blocks = -(-n_tiles // tiles_per_task)
    padded = np.zeros((blocks * tiles_per_task * lanes, kw * per_word), np.uint32)
    padded[:n, :k] = codes  # padding codes meet zero activations (the kernel's padded row copy)
    grouped = padded.reshape(blocks, tiles_per_task, lanes, kw, per_word)
    words = np.zeros(grouped.shape[:-1], np.uint32)
    for s in range(per_word):
        words |= grouped[..., s] << (code_bits * s)
    little_endian = np.ascontiguousarray(words.transpose(0, 3, 1, 2), dtype="<u4").reshape(-1).view(np.uint8)
    return np.concatenate([little_endian, np.zeros(_LOAD_SLACK, np.uint8)])


def _code_index(w_bytes: tirx.Buffer, word_byte: tirx.PrimExpr, code: int, code_bits: int, lanes: int) -> tirx.PrimExpr:
    """Code ``code`` of ``lanes`` consecutive words in the low bits of each int32 lane (the
    permutes read only the low 3, 4 or 5 bits): the words loaded ``code_bits * code // 8`` bytes
    further on (a lane's top byte then comes from the next lane), and a shift by 4 for odd
    nibbles (bytes never shift)."""
    load = tirx.BufferLoad(w_bytes, [tirx.Ramp(word_byte + code_bits * code // 8, 1, 4 * lanes)])
    # a shift by 0 (even nibbles, bytes) folds away once the code loop is unrolled
    return tirx.reinterpret(f"int32x{lanes}", load) >> tirx.Broadcast(code_bits * code % 8, lanes)


def _level(c, n_planes, shifts_signs, zero_point, code_bits: range | None = None) -> tirx.PrimExpr:
    """float32 level of code ``c``: its planes' ``sign 2^shift`` (0 at or after ``n_planes``), less
    ``zero_point``. ``code_bits``: only the planes whose code bit lies there, ``c`` holding the
    first of them in its bit 0 (a part of a split table)."""
    count = len(shifts_signs)
    code_bits = code_bits or range(count)
    total = tirx.const(0.0, "float32")
    for p in range(count):
        if count - 1 - p in code_bits:
            bit = tirx.Cast("float32", (c >> (count - 1 - p - code_bits.start)) & 1)
            total = total + bit * _plane_coefficient(p, n_planes, shifts_signs)
    return total - tirx.Cast("float32", zero_point)


def dequant_dense(M: int, N: int, K: int, shifts_signs: Sequence[tuple[int, int]], zero_point: bool,
                  lanes: int = LUT_LANES) -> tirx.PrimFunc:
    """Weight-only dense kernel that dequantizes packed codes in registers (float32 accumulators).

    Signature of the returned PrimFunc (the same as :func:`lut_dense`'s)::

        main(x: float32[M, K], w_bytes: uint8[blocks * KW * tiles * lanes * 4 + 4],
             n_planes: int32, zero_point: int32, y: float32[M, N])

    ``w_bytes`` comes from ``pack_dequant_weight(planes, shifts_signs, tiles, lanes)`` with
    ``tiles`` from ``dequant_blocking(M, ceil(N/lanes), lanes)``; ``lanes`` is 16 (AVX-512) or 8
    (AVX2), and the planes must form codes that width reads (:func:`packing.dequant_code_bits`).
    ``y = x @ float32(q' - zero_point).T`` (``zero_point`` used when the flag is set), ``q'`` the
    weights of the planes before ``n_planes``.
    """
    shifts_signs = _check(shifts_signs)
    if lanes not in (LUT_LANES, _AVX2_LANES):
        raise ValueError(f"the dequantizing kernel runs 16 (AVX-512) or 8 (AVX2) lanes, not {lanes}")
    code_bits = dequant_code_bits(len(shifts_signs))
    if not code_bits:
        raise ValueError(f"{len(shifts_signs)} planes make codes wider than the dequantizing kernel reads (6 planes at most)")
    with_zero_point = bool(zero_point)
    levels = 1 << len(shifts_signs)
    per_word = WORD_BITS // code_bits
    kw = -(-K // per_word)
    k_padded = kw * per_word
    n_tiles = -(-N // lanes)
    rows_per_pass, block = dequant_blocking(M, n_tiles, lanes)
    blocks = -(-n_tiles // block)
    passes = -(-M // rows_per_pass)
    m_padded = passes * rows_per_pass
    last_tile_width = N - (n_tiles - 1) * lanes
    table_vectors = -(-levels // lanes)
    # Past one permute's levels (AVX2: 8; AVX-512: 32 by vpermi2ps) a level is the sum of two
    # lookups, its low code bits' planes (3 or 4 bits, a vector of entries) and its top bits'
    # (with the zero point): levels are sums over planes, so they split (on AVX2 at 4 planes
    # faster than two lookups and a blend on the top bit: 860 against 1,172 us at one row of
    # 4096 x 4096, 2,089 against 2,230 at 8; haswell code on a Zen 4, alternating)
    split = levels > (lanes if lanes == _AVX2_LANES else 2 * lanes)
    low_bits = lanes.bit_length() - 1
    if split:
        table_vectors = 2
    vector = f"float32x{lanes}"

    padded = (m_padded, k_padded) != (M, K)

    def activation(x, rows, m, k):
        return tirx.BufferLoad(rows if padded else x, [m, k])

    def level_vector(table, w_bytes, word_byte, code):
        index = _code_index(w_bytes, word_byte, code, code_bits, lanes)
        low = tirx.BufferLoad(table, [tirx.Ramp(0, 1, lanes)])
        if table_vectors == 1:
            return tirx.call_llvm_pure_intrin(vector, _VPERMPS if lanes == LUT_LANES else _VPERMPS_256, low, index)
        high = tirx.BufferLoad(table, [tirx.Ramp(lanes, 1, lanes)])
        if not split:
            return tirx.call_llvm_pure_intrin(vector, _VPERMI2PS, low, index, high)
        # (the top part's table repeats every 2^(P - low_bits) entries: index bits past the code's
        # are the next code's, or zero)
        permute = _VPERMPS if lanes == LUT_LANES else _VPERMPS_256
        return (tirx.call_llvm_pure_intrin(vector, permute, low, index)
                + tirx.call_llvm_pure_intrin(vector, permute, high, index >> tirx.Broadcast(low_bits, lanes)))

    store_tile = _tile_store(lanes, n_tiles, last_tile_width)

    @T.macro
    def store(y, value, m, tile):
        if m < M:  # rows past M: padding of the last pass
            store_tile(y, value, m, tile)

    @T.prim_func
    def main(x: T.Buffer((M, K), "float32"),
             w_bytes: T.Buffer((blocks * kw * block * lanes * 4 + _LOAD_SLACK,), "uint8"),
             n_planes: T.int32, zero_point: T.int32,
             y: T.Buffer((M, N), "float32")):
        T.func_attr({"tir.noalias": True})
        # zero-padded rows and columns: padding codes (and padding rows) add nothing; whole
        # shapes read x itself (no copy, no second parallel region)
        rows = T.alloc_buffer((m_padded, k_padded) if padded else (1, 1), "float32")
        table = T.alloc_buffer((table_vectors * lanes,), "float32")
        if split:
            for c in range(lanes):
                table[c] = _level(c, n_planes, shifts_signs, 0, range(low_bits))
                table[lanes + c] = _level(c % (levels >> low_bits), n_planes, shifts_signs,
                                          zero_point * int(with_zero_point), range(low_bits, len(shifts_signs)))
        else:
            for c in range(table_vectors * lanes):
                table[c] = _level(c, n_planes, shifts_signs, zero_point * int(with_zero_point))
        if padded:
            for m in T.parallel(m_padded):
                for k in T.vectorized(k_padded):
                    rows[m, k] = T.float32(0)
                if m < M:
                    for k in T.vectorized(K):
                        rows[m, k] = x[m, k]
        for task in T.parallel(blocks):
            for pass_ in range(passes):
                acc = T.alloc_buffer((rows_per_pass, block), vector, scope="local", annotations=_ON_STACK)
                for r in T.unroll(rows_per_pass):
                    for b in T.unroll(block):
                        acc[r, b] = T.broadcast(T.float32(0), lanes)
                for w in range(kw):
                    for s in T.unroll(per_word):
                        for b in T.unroll(block):
                            # one lookup per weight vector, shared by the rows of the pass
                            for r in T.unroll(rows_per_pass):
                                acc[r, b] = T.call_llvm_pure_intrin(
                                    vector, "llvm.fma",
                                    level_vector(table, w_bytes, (((task * kw + w) * block + b) * lanes) * 4, s),
                                    T.broadcast(activation(x, rows, pass_ * rows_per_pass + r, w * per_word + s), lanes),
                                    acc[r, b])
                for r in range(rows_per_pass):
                    for b in range(block):
                        if task * block + b < n_tiles:
                            store(y, acc[r, b], pass_ * rows_per_pass + r, task * block + b)

    return main
