"""TensorIR kernels for the csqc LLVM (CPU) target: bit-serial and bit-parallel dense and conv2d.

Semantics (exact integer math, see the csqc docs): weights are a plane decomposition
``q[n, k] = sum_p sign_p 2^shift_p plane_p[n, k] - zero_point`` (planes most significant first),
activations are unsigned codes ``x[m, k]`` in ``[0, 2^act_bits)``, and every kernel computes
``acc[m, n] = sum_k x[m, k] q[n, k]``.

Kernels are written in TVMScript with compile-time shapes; Python-level parameters (shapes,
``shifts_signs``, knobs) are captured by closure, so each builder returns a specialised,
already scheduled ``PrimFunc`` (loops carry their ``parallel``/``vectorized``/``unroll`` kinds;
the knob dataclasses are the schedule space a tuner can grid-search).  The last parameter of
every kernel is its output buffer; scalars come right before it.

* :func:`bitserial_dense` -- popcount kernel: packs the activation codes into bit-planes in the
  same PrimFunc, then for every tile of ``lanes`` outputs accumulates
  ``popcount(W_p & X_j)`` per activation bit in vector registers (lanes along N), folding the
  activation bits and the plane coefficient once per plane.  The runtime ``n_planes`` argument
  stops after the first planes (PrecisionBatching); the test is lane-uniform, once per plane.
  With ``BitserialKnobs.table_lookup`` (AVX-512 VBMI) and up to 5 activation bits it looks up
  per-row tables of activation sums with ``vpermb`` instead (7 vector ops per 64 bytes of
  planes instead of 3 per activation bit): the batch-1 GEMV.
* :func:`bitparallel_dense` -- int8 weights (combined at pack time), u8 x s8 dot products with
  AVX-512 VNNI ``vpdpbusd`` (or AVX2's pair of instructions: ``isa.dot4``, picked by the target in
  scope) over a register tile of rows x output vectors; int16 fallback.
* :func:`nibble_dense` (from :mod:`.nibble`) -- the same products on weights stored as nibbles
  (plus a fifth bit), unpacked in registers: the batch-1 GEMV of 4-bit layers.
* :func:`amx_dense` (from :mod:`.amx`) -- the same products on Intel AMX tiles, same weights:
  many rows on CPUs that have them; :func:`amx_dense_epilogue` applies the layer's float
  epilogue to the tiles' accumulators in the same call.
* :func:`lut_dense` (from :mod:`.weightonly`) -- float activations x weight planes by table
  lookups, for quantized linear layers whose input is not quantized; :func:`dequant_dense`
  dequantizes packed weight codes in registers for the same layers (more rows or planes).
* :func:`bitserial_conv2d`, :func:`bitparallel_conv2d` -- implicit GEMM per group (im2col fused
  into the activation packing, so no im2col buffer); depthwise (one input channel per group)
  uses a direct int32 kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from csqc.errors import CompileError
from csqc.targets.tvm import macro_lookup
from csqc.targets.tvm.geometry import ConvGeometry, conv_geometry
from csqc.targets.tvm.vector_lanes import vector_loop

from .amx import (amx_conv2d, amx_conv_fits, amx_dense, amx_dense_epilogue, amx_dense_fits, amx_pointwise_codes,
                  host_has_amx,
                  request_tile_permission, target_has_amx)
from .host import host_mattr
from .isa import AVX2, AVX512, accumulator_budget, dot4, dot4_sum, missing_features, sign_flip_mask, sign_flipped, tier
from .nibble import nibble_dense
from .codes_main import ConvCodes, codes_main
from .staging import phase_pairs, phase_staging, staging_loop, task_rows_staging
from .packing import VNNI_LANES, WORD_BITS, effective_lanes, words_for
from .weightonly import (LUT_LANES, dequant_blocking, dequant_dense, lut_dense, lut_tiles_per_task,
                         pack_dequant_weight, pack_lut_weight)

macro_lookup.install()  # the kernels' TVMScript macros expand without reading source (see macro_lookup)

__all__ = [
    "BitserialKnobs",
    "BitparallelKnobs",
    "cpu_target",
    "build",
    "CompiledKernel",
    "bitserial_dense",
    "bitparallel_dense",
    "bitparallel_dense_signed",
    "nibble_dense",
    "amx_dense",
    "amx_dense_epilogue",
    "amx_dense_fits",
    "amx_conv2d",
    "amx_conv_fits",
    "amx_pointwise_codes",
    "SERIAL_DENSE_MACS",
    "bitserial_conv2d",
    "bitparallel_conv2d",
    "ConvCodes",
    "bitparallel_conv2d_codes",
    "conv_codes_fit",
    "task_rows",
    "channels_on_lanes_pay",
    "small_plane_row_block",
    "bitparallel_depthwise_codes",
    "bitparallel_depthwise_saturated_codes",
    "depthwise_codes_fit",
    "LUT_LANES",
    "lut_dense",
    "lut_tiles_per_task",
    "pack_lut_weight",
    "dequant_blocking",
    "dequant_dense",
    "pack_dequant_weight",
]

_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
# Register-sized scratch buffers stay LLVM allocas (promoted to registers).  Without this the
# TVM 0.27 lowering turns local buffers inside parallel loops into TVMBackendAllocWorkspace
# calls per task, and accumulators then round-trip through memory on every iteration.
_ON_STACK = {"disable_lower_builtin": True}


# --------------------------------------------------------------------------------------------
# Knobs (the schedule space)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitserialKnobs:
    """Schedule knobs of the bit-serial kernels.

    lanes: outputs per vector tile (16 = one zmm of int32); must match the packed weight layout
        (conv uses ``effective_lanes(O/groups, lanes)``).
    word_unroll: packed K-words unrolled in the popcount loop.
    rows_per_task: rows of M handled by one parallel task (the weight tile stays in L1).
    pack_chunk: packed words per vector chunk in the activation packer.
    table_lookup: dense kernels with ``act_bits <= 5``, int32 accumulators and 16 lanes look up
        per-row tables of activation sums (``vpermb``, AVX-512 VBMI: the backend sets it only
        for CPUs that have it) instead of AND+popcount per activation bit (see
        :func:`_bitserial_dense_lut`); same weight layout and results.
    """

    lanes: int = 16
    word_unroll: int = 2
    rows_per_task: int = 8
    pack_chunk: int = 64
    table_lookup: bool = False


@dataclass(frozen=True)
class BitparallelKnobs:
    """Schedule knobs of the bit-parallel (int8 VNNI) kernels.

    row_block: rows of M held in registers per tile (dense; and the conv fallback for
        strides > 2).
    col_vectors: 16-output vectors held in registers per tile (row_block * col_vectors zmm
        accumulators; keep it <= ~24).
    conv_channels, conv_vectors, conv_rows: tiling of the (non-depthwise) conv kernel, which
        puts output pixels on the lanes: output channels x 16-pixel vectors held in registers
        (their product is the number of zmm accumulators), and output rows per parallel task.
        0 = per shape, by a heuristic (``csqc compile --tune`` searches them: ``tuning.py``).
    conv_form: ``"pixels"`` (output pixels on the lanes, the knobs above), ``"channels"`` (output
        channels on the lanes, ``row_block`` x ``col_vectors`` register tiles) or ``""`` (by shape).
    """

    row_block: int = 8
    col_vectors: int = 2
    conv_channels: int = 0
    conv_vectors: int = 0
    conv_rows: int = 0
    conv_form: str = ""
    int16_groups: int = 1


# --------------------------------------------------------------------------------------------
# Target, build and run
# --------------------------------------------------------------------------------------------
def cpu_target(mcpu: str | None = None, mattr: Sequence[str] | None = None) -> tvm.target.Target:
    """LLVM target for this CPU.  A generic ``{"kind": "llvm"}`` emits no popcount or VNNI
    instructions, so the CPU name is always given: detected when ``mcpu`` is None, with its
    instruction sets corrected to those this machine's OS lists (``host.host_mattr``: in a VM the
    name can promise AMX tiles the hypervisor hides, or miss ones it has). ``mattr`` comes last,
    so it overrides."""
    cpu = mcpu or tvm.target.codegen.llvm_get_system_cpu()
    mattr = [*(host_mattr(cpu) if mcpu is None else ()), *(mattr or ())]
    config = {"kind": "llvm", "mcpu": cpu}
    if mattr:
        config["mattr"] = mattr
    return tvm.target.Target(config)


class CompiledKernel:
    """A built kernel callable on numpy arrays and Python ints.

    ``kernel(*inputs)`` takes every parameter except the last (the output buffer, allocated
    here) and returns the output as a numpy array.
    """

    def __init__(self, prim_func: tirx.PrimFunc, executable, device):
        self.prim_func = prim_func
        self.executable = executable
        self.module = executable.mod
        self.device = device
        out_buffer = prim_func.params[-1]  # TVM 0.27: buffer parameters are the buffers
        self.output_shape = tuple(int(d) for d in out_buffer.shape)
        self.output_dtype = str(out_buffer.dtype)

    def _convert(self, args):
        converted = []
        for value in args:
            if isinstance(value, np.ndarray):
                converted.append(tvm.runtime.tensor(np.ascontiguousarray(value), self.device))
            else:
                converted.append(value)
        return converted

    def __call__(self, *args):
        out = tvm.runtime.tensor(np.zeros(self.output_shape, self.output_dtype), self.device)
        self.executable(*self._convert(args), out)
        return out.numpy()

    def time_us(self, *args, number: int = 100, repeat: int = 10) -> float:
        """Median run time in microseconds (TVM ``time_evaluator``)."""
        out = tvm.runtime.tensor(np.zeros(self.output_shape, self.output_dtype), self.device)
        timer = self.module.time_evaluator("main", self.device, number=number, repeat=repeat)
        result = timer(*self._convert(args), out)
        return float(np.median(result.results) * 1e6)

    def assembly(self) -> str:
        return self.module.inspect_source("asm")


def build(prim_func: tirx.PrimFunc, target: tvm.target.Target | None = None) -> CompiledKernel:
    """Compile a kernel PrimFunc for the CPU and wrap it for numpy use: for ``target``, else the
    target in scope (the one whose tier built the kernel: ``with cpu_target("haswell")``), else
    this machine's."""
    target = target or tvm.target.Target.current(allow_none=True) or cpu_target()
    missing = missing_features([prim_func], target)
    if missing:
        raise CompileError(f"this kernel uses instructions {target.attrs.get('mcpu', 'the CPU')} lacks: "
                           f"{', '.join(missing)} (build it inside `with target:`)")
    func = prim_func.with_attr("global_symbol", "main")
    # StorageRewrite re-creates allocations without their annotations (see _ON_STACK); the
    # kernels' scratch buffers are few and small, so nothing is lost by skipping it.
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        executable = tvm.compile(tvm.IRModule({"main": func}), target=target)
    if target_has_amx(target) and host_has_amx():  # it may run tile instructions here
        request_tile_permission()
    return CompiledKernel(func, executable, tvm.cpu())


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _check_planes(shifts_signs, act_bits: int, acc_dtype: str):
    if not shifts_signs:
        raise ValueError("at least one weight plane is required")
    for shift, sign in shifts_signs:
        if sign not in (1, -1) or not 0 <= shift <= 15:
            raise ValueError(f"invalid plane (shift={shift}, sign={sign})")
    if not 1 <= act_bits <= 8:
        raise ValueError(f"act_bits must be 1..8, got {act_bits}")
    if acc_dtype not in ("int32", "int64"):
        raise ValueError(f"acc_dtype must be int32 or int64, got {acc_dtype}")


def _plane_coefficient(plane, shifts_signs, dtype: str):
    """``sign_p * 2^shift_p`` of a plane index expression (a Select chain folded per tile)."""
    expr = tirx.const(0, dtype)
    for index in reversed(range(len(shifts_signs))):
        shift, sign = shifts_signs[index]
        expr = tirx.Select(plane == index, tirx.const(sign * (1 << shift), dtype), expr)
    return expr


def _fold_activation_bits(counts, lane, act_bits: int):
    """``sum_j 2^j counts[j, lane]`` (once per plane and tile, not per word)."""
    expr = counts[0, lane]
    for bit in range(1, act_bits):
        expr = expr + (counts[bit, lane] << bit)
    return expr


def _bit_of(code, bit, position):
    """Bit ``bit`` of a uint8 code moved to bit ``position`` of a uint32 word."""
    word = tirx.Cast("uint32", code)
    return ((word >> tirx.Cast("uint32", bit)) & tirx.const(1, "uint32")) << tirx.Cast("uint32", position)


def _chunks(total: int, chunk: int) -> tuple[int, int, int]:
    """(chunk size, number of full chunks, tail size) covering ``total``."""
    chunk = max(1, min(chunk, total))
    return chunk, total // chunk, total % chunk


def _make_bitserial_core(*, groups: int, rows: int, n_tiles: int, lanes: int, kw: int,
                         shifts_signs, act_bits: int, acc_dtype: str, knobs: BitserialKnobs,
                         with_zero_point: bool, weight_at: Callable, plane_at: Callable,
                         rowsum_at: Callable, store_tile, store_block=None):
    """The popcount loop nest shared by dense and conv.

    Parallel tasks are (group, output tile, block of rows).  Per row and plane: ``act_bits``
    vector accumulators of popcounts (``lanes`` outputs each, lane-uniform activation word
    broadcast), folded into the output accumulator with the plane coefficient; planes at or
    after ``n_planes`` are skipped with one scalar test per plane.  With ``store_block`` the
    rows of a task are collected in a ``[rows_per_task, lanes]`` stack tile and stored once per
    task (``store_block(out, block, g, nt, first_row)``) instead of row by row.
    """
    blocked = store_block is not None
    n_planes_total = len(shifts_signs)
    rows_per_task = max(1, min(knobs.rows_per_task, rows))
    row_blocks = -(-rows // rows_per_task)
    unroll, full_steps, tail_words = _chunks(kw, knobs.word_unroll)
    tasks = groups * n_tiles * row_blocks

    @T.macro
    def accumulate_words(weights, planes, counts, g, nt, p, m, first_word, count):
        for wi in T.unroll(count):
            for j in T.unroll(act_bits):
                for lane in T.vectorized(lanes):
                    counts[j, lane] = counts[j, lane] + T.reinterpret(
                        "int32",
                        T.popcount(weight_at(weights, g, nt, p, first_word + wi, lane)
                                   & plane_at(planes, g, m, j, first_word + wi)),
                    )

    @T.macro
    def core(weights, planes, rowsum, out, n_planes, zero_point):
        for task in T.parallel(tasks):
            block = T.alloc_buffer((rows_per_task, lanes), acc_dtype, scope="local", annotations=_ON_STACK)
            for mi in range(rows_per_task):
                if (task % row_blocks) * rows_per_task + mi < rows:
                    total = T.alloc_buffer((lanes,), acc_dtype, scope="local", annotations=_ON_STACK)
                    counts = T.alloc_buffer((act_bits, lanes), "int32", scope="local", annotations=_ON_STACK)
                    for lane in T.vectorized(lanes):
                        total[lane] = T.Cast(acc_dtype, 0)
                    for p in range(n_planes_total):
                        if p < n_planes:
                            for j in T.unroll(act_bits):
                                for lane in T.vectorized(lanes):
                                    counts[j, lane] = 0
                            for step in range(full_steps):
                                accumulate_words(weights, planes, counts,
                                                 task // (n_tiles * row_blocks),
                                                 task // row_blocks % n_tiles, p,
                                                 (task % row_blocks) * rows_per_task + mi,
                                                 step * unroll, unroll)
                            if tail_words > 0:
                                accumulate_words(weights, planes, counts,
                                                 task // (n_tiles * row_blocks),
                                                 task // row_blocks % n_tiles, p,
                                                 (task % row_blocks) * rows_per_task + mi,
                                                 full_steps * unroll, tail_words)
                            for lane in T.vectorized(lanes):
                                total[lane] = total[lane] + _plane_coefficient(
                                    p, shifts_signs, acc_dtype) * T.Cast(
                                    acc_dtype, _fold_activation_bits(counts, lane, act_bits))
                    if with_zero_point:
                        for lane in T.vectorized(lanes):
                            total[lane] = total[lane] - T.Cast(acc_dtype, zero_point) * T.Cast(
                                acc_dtype, rowsum_at(rowsum, task // (n_tiles * row_blocks),
                                                     (task % row_blocks) * rows_per_task + mi))
                    if blocked:
                        for lane in T.vectorized(lanes):
                            block[mi, lane] = total[lane]
                    else:
                        store_tile(out, total, task // (n_tiles * row_blocks),
                                   task // row_blocks % n_tiles,
                                   (task % row_blocks) * rows_per_task + mi)
            if blocked:
                store_block(out, block, task // (n_tiles * row_blocks), task // row_blocks % n_tiles,
                            (task % row_blocks) * rows_per_task)

    return core


# --------------------------------------------------------------------------------------------
# Bit-serial dense
# --------------------------------------------------------------------------------------------
def bitserial_dense(M: int, N: int, K: int, shifts_signs: Sequence[tuple[int, int]], act_bits: int,
                    zero_point: bool, acc_dtype: str = "int32",
                    knobs: BitserialKnobs | None = None) -> tirx.PrimFunc:
    """Bit-serial dense kernel.

    Signature of the returned PrimFunc::

        main(x: uint8[M, K], w_planes: uint32[ceil(N/lanes), P, KW, lanes],
             n_planes: int32, zero_point: int32, y: acc_dtype[M, N])

    ``w_planes`` comes from ``packing.pack_weight_planes(planes, lanes=knobs.lanes)``;
    ``shifts_signs`` lists ``(shift, sign)`` per plane, most significant first.  Only planes
    ``p < n_planes`` are accumulated (pass P for the exact result).  ``zero_point`` is used only
    when the kernel is built with ``zero_point=True`` (offset encoding): the kernel then
    subtracts ``zero_point * sum_k x[m, k]`` whatever ``n_planes`` is.
    """
    _check_planes(shifts_signs, act_bits, acc_dtype)
    with_zero_point = bool(zero_point)  # the PrimFunc has a scalar parameter of the same name
    knobs = knobs or BitserialKnobs()
    shifts_signs = [tuple(map(int, item)) for item in shifts_signs]
    if _lut_applies(act_bits, acc_dtype, knobs):
        return _bitserial_dense_lut(M, N, K, shifts_signs, act_bits, with_zero_point, knobs)
    planes_count = len(shifts_signs)
    lanes = knobs.lanes
    kw = words_for(K)
    n_tiles = -(-N // lanes)
    chunk, full_chunks, tail_chunk = _chunks(kw, knobs.pack_chunk)
    last_tile_width = N - (n_tiles - 1) * lanes

    @T.macro
    def pack_chunk(x, planes, m, first_word, size):
        # Plane j, word w, bit b holds bit j of x[m, b*KW + w]: a contiguous vector load per b.
        bits = T.alloc_buffer((act_bits, size), "uint32", scope="local", annotations=_ON_STACK)
        for j in T.unroll(act_bits):
            for lane in T.vectorized(size):
                bits[j, lane] = T.uint32(0)
        for b in range(WORD_BITS):
            if b * kw + first_word + size <= K:
                for j in T.unroll(act_bits):
                    for lane in T.vectorized(size):
                        bits[j, lane] = bits[j, lane] | _bit_of(x[m, b * kw + first_word + lane], j, b)
            else:
                for lane in range(size):
                    if b * kw + first_word + lane < K:
                        for j in T.unroll(act_bits):
                            bits[j, lane] = bits[j, lane] | _bit_of(
                                x[m, b * kw + first_word + lane], j, b)
        for j in T.unroll(act_bits):
            for lane in T.vectorized(size):
                planes[m, j, first_word + lane] = bits[j, lane]

    def weight_at(weights, g, nt, p, word, lane):
        return weights[nt, p, word, lane]

    def plane_at(planes, g, m, j, word):
        return planes[m, j, word]

    def rowsum_at(rowsum, g, m):
        return rowsum[m]

    @T.macro
    def store_tile(out, total, g, nt, m):
        if last_tile_width == lanes:
            for lane in T.vectorized(lanes):
                out[m, nt * lanes + lane] = total[lane]
        else:
            if nt < n_tiles - 1:
                for lane in T.vectorized(lanes):
                    out[m, nt * lanes + lane] = total[lane]
            else:
                for lane in range(last_tile_width):
                    out[m, nt * lanes + lane] = total[lane]

    core = _make_bitserial_core(
        groups=1, rows=M, n_tiles=n_tiles, lanes=lanes, kw=kw, shifts_signs=shifts_signs,
        act_bits=act_bits, acc_dtype=acc_dtype, knobs=knobs, with_zero_point=with_zero_point,
        weight_at=weight_at, plane_at=plane_at, rowsum_at=rowsum_at, store_tile=store_tile)

    @T.prim_func
    def main(x: T.Buffer((M, K), "uint8"),
             w_planes: T.Buffer((n_tiles, planes_count, kw, lanes), "uint32"),
             n_planes: T.int32, zero_point: T.int32,
             y: T.Buffer((M, N), acc_dtype)):
        T.func_attr({"tir.noalias": True})
        act_planes = T.alloc_buffer((M, act_bits, kw), "uint32")
        rowsum = T.alloc_buffer((M,), "int32")
        for m in T.parallel(M):
            for c in range(full_chunks):
                pack_chunk(x, act_planes, m, c * chunk, chunk)
            if tail_chunk > 0:
                pack_chunk(x, act_planes, m, full_chunks * chunk, tail_chunk)
            if with_zero_point:
                # sum_k x[m, k] from the planes: A*KW scalar popcounts per row.
                sums = T.alloc_buffer((1,), "int32", scope="local", annotations=_ON_STACK)
                sums[0] = 0
                for j in range(act_bits):
                    for word in range(kw):
                        sums[0] = sums[0] + (T.reinterpret("int32", T.popcount(act_planes[m, j, word])) << j)
                rowsum[m] = sums[0]
        core(w_planes, act_planes, rowsum, y, n_planes, zero_point)

    return main


# Table lookup: ``table[m, w, half, 16 * b + e]`` is the sum of the activation codes of the
# 4-value group ``(w, nibble 2b + half)`` selected by the 4 bits of ``e``; the group of nibble
# ``i`` of packed word ``w`` is ``k = (4i + t) * KW + w`` for ``t < 4`` (the packing's bit order).
# Four groups' entries fit one 64-byte vpermb table, one per byte position of a weight dword;
# a byte's two nibbles use the tables of its two halves.  Entries are at most 4 * 31, so the two
# lookups of a byte add up to at most 248 and fit an unsigned byte (hence act_bits <= 5).
_LUT_MAX_ACT_BITS = 5
_VPERMB = "llvm.x86.avx512.permvar.qi.512"
_VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"
_VPMADDUBSW = "llvm.x86.avx512.pmaddubs.w.512"
_NIBBLES = 0x0F0F0F0F
_BYTE_TABLE = 0x30201000  # byte b of a dword indexes the 16-entry table at offset 16 * b


def _lut_applies(act_bits: int, acc_dtype: str, knobs: BitserialKnobs) -> bool:
    return knobs.table_lookup and knobs.lanes == 16 and act_bits <= _LUT_MAX_ACT_BITS and acc_dtype == "int32"


def _lookup_words(acc, tables, weights, m, nt, p, first_word, count):
    """``acc`` plus the table sums of ``count`` packed words (per output lane, bytes summed by
    ``vpdpbusd`` with ones)."""
    ones = T.broadcast(T.int8(1), 4 * VNNI_LANES)
    total = acc
    for wi in range(count):
        word = weights[nt, p, first_word + wi, T.ramp(0, 1, VNNI_LANES)]
        low = T.reinterpret("int8x64", (word & T.broadcast(T.uint32(_NIBBLES), VNNI_LANES))
                            | T.broadcast(T.uint32(_BYTE_TABLE), VNNI_LANES))
        high = T.reinterpret("int8x64", ((word >> T.broadcast(T.uint32(4), VNNI_LANES))
                                         & T.broadcast(T.uint32(_NIBBLES), VNNI_LANES))
                             | T.broadcast(T.uint32(_BYTE_TABLE), VNNI_LANES))
        sums = (T.call_llvm_pure_intrin("int8x64", _VPERMB, T.reinterpret(
                    "int8x64", tables[m, first_word + wi, 0, T.ramp(0, 1, 4 * VNNI_LANES)]), low)
                + T.call_llvm_pure_intrin("int8x64", _VPERMB, T.reinterpret(
                    "int8x64", tables[m, first_word + wi, 1, T.ramp(0, 1, 4 * VNNI_LANES)]), high))
        total = T.call_llvm_pure_intrin("int32x16", _VPDPBUSD, total, sums, ones)
    return total


# Table-lookup GEMV tables of at most this many packed words (K / 32 per row) are built on the
# calling thread: a parallel launch for them cost more than the building it shares. Measured
# on a Zen 5 (2 threads, alternating runs): the 784-4096-4096-10 w2a4 MLP 62.8 -> 59.2 us
# (its 4096-wide layer's 128 words a row had been built by two tasks).
_SERIAL_TABLE_WORDS = 256


def _bitserial_dense_lut(M: int, N: int, K: int, shifts_signs, act_bits: int, with_zero_point: bool,
                         knobs: BitserialKnobs) -> tirx.PrimFunc:
    """:func:`bitserial_dense` by table lookups (same signature, weights and result).

    The popcount kernel spends an AND, a popcount and an add per weight vector and activation
    bit (12 vector ops per 64 bytes of planes at 4 bits, the bound at batch 1 on AVX-512);
    here a weight vector costs two ``vpermb`` lookups into per-row tables of activation sums,
    one byte add and one ``vpdpbusd`` (7 ops whatever ``act_bits``).  The tables
    (``KW * 128`` bytes per row) are built once per call, in parallel over word chunks.
    """
    planes_count = len(shifts_signs)
    lanes = VNNI_LANES
    kw = words_for(K)
    n_tiles = -(-N // lanes)
    last_tile_width = N - (n_tiles - 1) * lanes
    rows_per_task = max(1, min(knobs.rows_per_task, M))
    row_blocks = -(-M // rows_per_task)
    unroll, full_steps, tail_words = _chunks(kw, knobs.word_unroll)
    word_chunk, word_chunks, word_tail = _chunks(kw, knobs.pack_chunk)
    chunks_per_row = word_chunks + (1 if word_tail else 0)
    # small tables are built on the calling thread (see _SERIAL_TABLE_WORDS)
    table_loop = T.serial if M * kw <= _SERIAL_TABLE_WORDS else T.parallel

    def code(x, m, k):
        return T.if_then_else(k < K, T.Cast("uint8", x[m, T.min(k, K - 1)]), T.uint8(0))

    @T.macro
    def build_tables(x, tables, m, first_word, size):
        for wi in range(size):
            for half in T.unroll(2):
                for b in T.unroll(4):
                    for e in T.vectorized(16):
                        tables[m, first_word + wi, half, b * 16 + e] = (
                            T.Select(e & 1 == 1, code(x, m, (8 * b + 4 * half) * kw + first_word + wi), T.uint8(0))
                            + T.Select(e & 2 == 2, code(x, m, (8 * b + 4 * half + 1) * kw + first_word + wi), T.uint8(0))
                            + T.Select(e & 4 == 4, code(x, m, (8 * b + 4 * half + 2) * kw + first_word + wi), T.uint8(0))
                            + T.Select(e & 8 == 8, code(x, m, (8 * b + 4 * half + 3) * kw + first_word + wi), T.uint8(0)))

    @T.macro
    def plane_sums(tables, weights, total, m, nt, p):
        acc = T.alloc_buffer((unroll,), "int32x16", scope="local", annotations=_ON_STACK)
        for u in T.unroll(unroll):
            acc[u] = T.broadcast(T.int32(0), lanes)
        for step in range(full_steps):
            for u in T.unroll(unroll):
                acc[u] = _lookup_words(acc[u], tables, weights, m, nt, p, step * unroll + u, 1)
        if tail_words > 0:
            acc[0] = _lookup_words(acc[0], tables, weights, m, nt, p, full_steps * unroll, tail_words)
        for u in T.unroll(unroll):
            total[T.ramp(0, 1, lanes)] = total[T.ramp(0, 1, lanes)] + T.broadcast(
                _plane_coefficient(p, shifts_signs, "int32"), lanes) * acc[u]

    @T.macro
    def store_tile(out, total, nt, m):
        if last_tile_width == lanes:
            out[m, T.ramp(nt * lanes, 1, lanes)] = total[T.ramp(0, 1, lanes)]
        else:
            if nt < n_tiles - 1:
                out[m, T.ramp(nt * lanes, 1, lanes)] = total[T.ramp(0, 1, lanes)]
            else:
                for lane in range(last_tile_width):
                    out[m, nt * lanes + lane] = total[lane]

    @T.prim_func
    def main(x: T.Buffer((M, K), "uint8"),
             w_planes: T.Buffer((n_tiles, planes_count, kw, lanes), "uint32"),
             n_planes: T.int32, zero_point: T.int32,
             y: T.Buffer((M, N), "int32")):
        T.func_attr({"tir.noalias": True})
        tables = T.alloc_buffer((M, kw, 2, 4 * lanes), "uint8")
        rowsum = T.alloc_buffer((M,), "int32")
        for task in table_loop(M * chunks_per_row):
            if task % chunks_per_row < word_chunks:
                build_tables(x, tables, task // chunks_per_row, task % chunks_per_row * word_chunk, word_chunk)
            else:
                build_tables(x, tables, task // chunks_per_row, word_chunks * word_chunk, word_tail)
        if with_zero_point:
            for m in T.parallel(M):
                sums = T.alloc_buffer((lanes,), "int32", scope="local", annotations=_ON_STACK)
                for lane in T.vectorized(lanes):
                    sums[lane] = 0
                for c in range(K // lanes):
                    for lane in T.vectorized(lanes):
                        sums[lane] = sums[lane] + T.Cast("int32", x[m, c * lanes + lane])
                for k in range(K % lanes):
                    sums[0] = sums[0] + T.Cast("int32", x[m, K // lanes * lanes + k])
                rowsum[m] = 0
                for lane in range(lanes):
                    rowsum[m] = rowsum[m] + sums[lane]
        for task in T.parallel(n_tiles * row_blocks):
            total = T.alloc_buffer((lanes,), "int32", scope="local", annotations=_ON_STACK)
            for mi in range(rows_per_task):
                if (task % row_blocks) * rows_per_task + mi < M:
                    total[T.ramp(0, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                    for p in range(planes_count):
                        if p < n_planes:
                            plane_sums(tables, w_planes, total, (task % row_blocks) * rows_per_task + mi,
                                       task // row_blocks, p)
                    if with_zero_point:
                        total[T.ramp(0, 1, lanes)] = total[T.ramp(0, 1, lanes)] - T.broadcast(
                            zero_point * rowsum[(task % row_blocks) * rows_per_task + mi], lanes)
                    store_tile(y, total, task // row_blocks, (task % row_blocks) * rows_per_task + mi)

    return main


# --------------------------------------------------------------------------------------------
# Bit-parallel dense (int8 VNNI)
# --------------------------------------------------------------------------------------------
def _vnni(acc, act_word, weight_vector):
    """acc[i] += sum_{t<4} u8(act_word byte t) * s8(weight byte 4i+t) (16 int32 lanes; the int8
    dot product of the target's tier, ``isa.dot4``)."""
    return dot4(acc, T.reinterpret("int8x64", T.broadcast(act_word, VNNI_LANES)), weight_vector)


def bitparallel_dense(M: int, N: int, K: int, weight_dtype: str = "int8", acc_dtype: str = "int32",
                      knobs: BitparallelKnobs | None = None, two_signs: bool = False) -> tirx.PrimFunc:
    """Bit-parallel dense kernel on weights combined at pack time.

    ``weight_dtype="int8"`` (``vpdpbusd``; requires ``-128 <= q <= 127``)::

        main(x: uint8[M, K], w: int8[ceil(N/16), ceil(K/4), 64], y: int32[M, N])

    ``two_signs`` (int8 weights, ``K % 4 == 0``): ``main(x_pos, x_neg, w, y)`` computes
    ``y = x_pos @ q.T - x_neg @ q.T`` for the sign parts of signed codes (at each position at most
    one of them not 0) in one pass over the weights, one dot product a weight vector and row
    (``isa.sign_flip_mask``; the accumulators start from the row's sum of negative parts). On
    AVX2 it is exact only where pairs of codes times weights one larger in magnitude fit
    ``vpmaddubsw``'s int16 (the caller's bound: ``CpuBackend.signed_dense``).

    ``weight_dtype="int16"`` (vectorized int32 multiply-add fallback for wider q)::

        main(x: uint8[M, K], w: int16[ceil(N/16), K, 16], y: int32[M, N])

    Weights come from ``packing.pack_bitparallel_weight(q)``.  Precision is fixed at pack time
    (no ``n_planes``: combine fewer planes with ``packing.combine_planes(..., n_planes=)``).
    """
    if acc_dtype != "int32":
        raise ValueError("bit-parallel kernels accumulate in int32 (vpdpbusd); use bit-serial for int64")
    if two_signs and (weight_dtype != "int8" or K % 4 or tier() not in (AVX512, AVX2)):
        raise ValueError("both sign parts in one pass need int8 weights, K % 4 == 0 and an int8 dot product "
                         "(AVX-512, or AVX2 where the caller bounds its int16 pair sums)")
    knobs = knobs or BitparallelKnobs()
    n_tiles = -(-N // VNNI_LANES)
    row_block = max(1, min(knobs.row_block, M))
    row_blocks = -(-M // row_block)
    last_tile_width = N - (n_tiles - 1) * VNNI_LANES

    @T.macro
    def store_rows(y, acc, nt, m0, cv):
        for r in range(row_block):
            if m0 + r < M:
                if last_tile_width == VNNI_LANES:
                    y[m0 + r, T.ramp(nt * VNNI_LANES, 1, VNNI_LANES)] = acc[r, cv]
                elif nt < n_tiles - 1:
                    y[m0 + r, T.ramp(nt * VNNI_LANES, 1, VNNI_LANES)] = acc[r, cv]
                else:
                    spill = T.alloc_buffer((VNNI_LANES,), "int32", scope="local", annotations=_ON_STACK)
                    spill[T.ramp(0, 1, VNNI_LANES)] = acc[r, cv]
                    for lane in range(last_tile_width):
                        y[m0 + r, nt * VNNI_LANES + lane] = spill[lane]

    if weight_dtype == "int16":
        @T.prim_func
        def main16(x: T.Buffer((M, K), "uint8"), w: T.Buffer((n_tiles, K, VNNI_LANES), "int16"),
                   y: T.Buffer((M, N), "int32")):
            T.func_attr({"tir.noalias": True})
            for task in T.parallel(n_tiles * row_blocks):
                acc = T.alloc_buffer((row_block, 1), "int32x16", scope="local", annotations=_ON_STACK)
                for r in T.unroll(row_block):
                    acc[r, 0] = T.broadcast(T.int32(0), VNNI_LANES)
                for k in range(K):
                    for r in T.unroll(row_block):
                        acc[r, 0] = acc[r, 0] + T.broadcast(T.Cast(
                            "int32", x[T.min((task % row_blocks) * row_block + r, M - 1), k]),
                            VNNI_LANES) * T.Cast("int32x16", w[task // row_blocks, k, T.ramp(0, 1, VNNI_LANES)])
                store_rows(y, acc, task // row_blocks, (task % row_blocks) * row_block, 0)

        return main16
    if weight_dtype != "int8":
        raise ValueError(f"weight_dtype must be int8 or int16, got {weight_dtype}")

    k_groups = -(-K // 4)
    col_vectors = max(1, min(knobs.col_vectors, n_tiles))
    col_blocks = -(-n_tiles // col_vectors)

    @T.macro
    def vnni_tile(xw, w, y, task):
        # One int32x16 element per accumulator: LLVM keeps the whole tile in zmm registers.
        acc = T.alloc_buffer((row_block, col_vectors), "int32x16", scope="local", annotations=_ON_STACK)
        for r in T.unroll(row_block):
            for cv in T.unroll(col_vectors):
                acc[r, cv] = T.broadcast(T.int32(0), VNNI_LANES)
        for kg in range(k_groups):
            for cv in T.unroll(col_vectors):
                for r in T.unroll(row_block):
                    acc[r, cv] = _vnni(
                        acc[r, cv],
                        xw[T.min((task % row_blocks) * row_block + r, M - 1), kg],
                        w[T.min((task // row_blocks) * col_vectors + cv, n_tiles - 1), kg,
                          T.ramp(0, 1, 4 * VNNI_LANES)])
        for cv in range(col_vectors):
            if (task // row_blocks) * col_vectors + cv < n_tiles:
                store_rows(y, acc, (task // row_blocks) * col_vectors + cv,
                           (task % row_blocks) * row_block, cv)

    @T.macro
    def signed_vnni_tile(xw, xw_neg, w, sums, y, task):
        # both sign parts: their OR times the weights complemented where the code is negative
        acc = T.alloc_buffer((row_block, col_vectors), "int32x16", scope="local", annotations=_ON_STACK)
        for r in T.unroll(row_block):
            for cv in T.unroll(col_vectors):
                acc[r, cv] = T.broadcast(sums[T.min((task % row_blocks) * row_block + r, M - 1)], VNNI_LANES)
        for kg in range(k_groups):
            for cv in T.unroll(col_vectors):
                for r in T.unroll(row_block):
                    acc[r, cv] = _vnni(
                        acc[r, cv],
                        xw[T.min((task % row_blocks) * row_block + r, M - 1), kg]
                        | xw_neg[T.min((task % row_blocks) * row_block + r, M - 1), kg],
                        sign_flipped(w[T.min((task // row_blocks) * col_vectors + cv, n_tiles - 1), kg,
                                       T.ramp(0, 1, 4 * VNNI_LANES)],
                                     sign_flip_mask(xw_neg[T.min((task % row_blocks) * row_block + r, M - 1), kg])))
        for cv in range(col_vectors):
            if (task // row_blocks) * col_vectors + cv < n_tiles:
                store_rows(y, acc, (task // row_blocks) * col_vectors + cv,
                           (task % row_blocks) * row_block, cv)

    if two_signs:
        @T.prim_func
        def main8_signs(x: T.Buffer((M, K), "uint8"), x_neg: T.Buffer((M, K), "uint8"),
                        w: T.Buffer((n_tiles, k_groups, 4 * VNNI_LANES), "int8"), y: T.Buffer((M, N), "int32")):
            T.func_attr({"tir.noalias": True})
            xw = T.decl_buffer((M, k_groups), "int32", data=x.data)
            xw_neg = T.decl_buffer((M, k_groups), "int32", data=x_neg.data)
            sums = T.alloc_buffer((M,), "int32")  # each row's sum of negative parts, on the calling thread
            for m in range(M):
                part = T.alloc_buffer((VNNI_LANES,), "int32", scope="local", annotations=_ON_STACK)
                part[T.ramp(0, 1, VNNI_LANES)] = T.broadcast(T.int32(0), VNNI_LANES)
                for v in range(K // VNNI_LANES):
                    part[T.ramp(0, 1, VNNI_LANES)] = part[T.ramp(0, 1, VNNI_LANES)] + T.Cast(
                        "int32x16", x_neg[m, T.ramp(v * VNNI_LANES, 1, VNNI_LANES)])
                sums[m] = 0
                for lane in range(VNNI_LANES):
                    sums[m] = sums[m] + part[lane]
                for k in range(K % VNNI_LANES):
                    sums[m] = sums[m] + T.Cast("int32", x_neg[m, K // VNNI_LANES * VNNI_LANES + k])
            for task in T.parallel(col_blocks * row_blocks):
                signed_vnni_tile(xw, xw_neg, w, sums, y, task)

        return main8_signs

    if K % 4 == 0:
        @T.prim_func
        def main8(x: T.Buffer((M, K), "uint8"), w: T.Buffer((n_tiles, k_groups, 4 * VNNI_LANES), "int8"),
                  y: T.Buffer((M, N), "int32")):
            T.func_attr({"tir.noalias": True})
            # Four consecutive u8 codes read as one int32 word (broadcast to all lanes).
            xw = T.decl_buffer((M, k_groups), "int32", data=x.data)
            for task in T.parallel(col_blocks * row_blocks):
                vnni_tile(xw, w, y, task)

        return main8

    @T.prim_func
    def main8_padded(x: T.Buffer((M, K), "uint8"),
                     w: T.Buffer((n_tiles, k_groups, 4 * VNNI_LANES), "int8"),
                     y: T.Buffer((M, N), "int32")):
        T.func_attr({"tir.noalias": True})
        # K is not a multiple of 4: copy rows into a zero-padded buffer (code 0 adds nothing).
        x_padded = T.alloc_buffer((M, 4 * k_groups), "uint8")
        for m in T.parallel(M):
            for k in vector_loop(4 * k_groups):
                x_padded[m, k] = T.uint8(0)
            for k in vector_loop(K):
                x_padded[m, k] = x[m, k]
        xw = T.decl_buffer((M, k_groups), "int32", data=x_padded.data)
        for task in T.parallel(col_blocks * row_blocks):
            vnni_tile(xw, w, y, task)

    return main8_padded


# Below this many multiply-adds (M x N x K, per sign) a dense layer runs on the calling thread:
# a parallel launch costs microseconds on a busy machine, more than the work (an LSTM step's
# 1024 x 256 projection is ~3 us of VNNI work on one core, ~5 us through the thread pool).
SERIAL_DENSE_MACS = 1 << 19


def bitparallel_dense_signed(M: int, N: int, K: int, two_signs: bool = True, parallel: bool | None = None,
                             col_vectors: int = 4, one_product: bool | None = None) -> tirx.PrimFunc:
    """Bit-parallel dense kernel for small layers: signed codes' two sign parts in one call.

    ``two_signs``::

        main(x_pos: uint8[M, K], x_neg: uint8[M, K], w: int8[ceil(N/16), ceil(K/4), 64], y: int32[M, N])

    computes ``y = x_pos @ q.T - x_neg @ q.T`` (the signed codes ``x_pos - x_neg`` times ``q``;
    at each position at most one part is not 0, as quantizers write them). With
    ``one_product`` (default: on AVX-512) one dot product multiplies the parts' OR by each
    weight vector with the negative positions' bytes complemented, the accumulators starting
    from the row's sum of negative parts (``isa.sign_flip_mask``); on AVX2 that is exact only
    where pairs of codes times weights one larger in magnitude fit int16 (the caller's bound:
    ``CpuBackend.small_dense_one_product``). Otherwise each weight vector is loaded once for two
    dot products, one per part, whose difference is exact in int32 (each is within the layer's
    accumulator bound, so is their difference). Without ``two_signs`` the kernel has one code
    buffer and computes ``y = x @ q.T``.

    Weights are :func:`bitparallel_dense`'s int8 layout (zero padded along K). A K that is not a
    multiple of 4 needs no padded copy of the codes: full groups are read as unaligned words,
    the last partial group byte by byte. ``parallel`` None: parallel over column blocks only
    from :data:`SERIAL_DENSE_MACS` multiply-adds.
    """
    signs = 2 if two_signs else 1
    one_product = two_signs and (tier() == AVX512 if one_product is None else one_product)
    parallel = M * N * K >= SERIAL_DENSE_MACS if parallel is None else parallel
    n_tiles = -(-N // VNNI_LANES)
    k_groups, k_full = -(-K // 4), K // 4
    col_vectors = max(1, min(col_vectors, n_tiles))
    col_blocks = -(-n_tiles // col_vectors)
    last_tile_width = N - (n_tiles - 1) * VNNI_LANES
    tail_bytes = K - 4 * k_full

    def word(x, m, kg):
        """Codes x[m, 4kg:4kg+4] as one int32 (bytes past K read as 0: their weights are 0 anyway)."""
        if tail_bytes == 0:
            return T.reinterpret("int32", x[m, T.ramp(kg * 4, 1, 4)])
        value = T.Cast("int32", x[m, k_full * 4])
        for t in range(1, tail_bytes):
            value = value | T.shift_left(T.Cast("int32", x[m, k_full * 4 + t]), T.int32(8 * t))
        return T.Select(kg < k_full, T.reinterpret("int32", x[m, T.ramp(T.min(kg, k_full - 1) * 4, 1, 4)])
                        if k_full else T.int32(0), value)

    def negative_sum(x_neg, m):
        """``sum_k x_neg[m, k]`` (the one-product form's start value)."""
        from tvm.script.ir_builder import tirx as I

        total = I.alloc_buffer((1,), "int32", scope="local", annotations=_ON_STACK)
        I.buffer_store(total, T.int32(0), [0])
        with I.serial(0, K) as k:
            I.buffer_store(total, total[0] + T.Cast("int32", x_neg[m, k]), [0])
        return total[0]

    def block(xs, w, y, m, cb):
        from tvm.script.ir_builder import tirx as I

        parts = 1 if one_product else signs  # accumulator sets
        acc = I.alloc_buffer((parts, col_vectors), "int32x16", scope="local", annotations=_ON_STACK)
        start = negative_sum(xs[1], m) if one_product else T.int32(0)
        for s in range(parts):
            for cv in range(col_vectors):
                I.buffer_store(acc, T.broadcast(start, VNNI_LANES), [s, cv])
        with I.serial(0, k_groups) as kg:
            words = [word(x, m, kg) for x in xs]
            if one_product:
                flip = sign_flip_mask(words[1])
            for cv in range(col_vectors):
                weights = w[T.min(cb * col_vectors + cv, n_tiles - 1), kg, T.ramp(0, 1, 4 * VNNI_LANES)]
                if one_product:
                    I.buffer_store(acc, _vnni(acc[0, cv], words[0] | words[1], sign_flipped(weights, flip)), [0, cv])
                    continue
                for s in range(signs):
                    I.buffer_store(acc, _vnni(acc[s, cv], words[s], weights), [s, cv])
        for cv in range(col_vectors):
            nt = cb * col_vectors + cv
            value = acc[0, cv] - acc[1, cv] if parts == 2 else acc[0, cv]
            with I.If(nt < n_tiles - (0 if last_tile_width == VNNI_LANES else 1)):
                with I.Then():
                    I.buffer_store(y, value, [m, T.ramp(nt * VNNI_LANES, 1, VNNI_LANES)])
            if last_tile_width != VNNI_LANES:
                with I.If(nt == n_tiles - 1):
                    with I.Then():
                        spill = I.alloc_buffer((VNNI_LANES,), "int32", scope="local", annotations=_ON_STACK)
                        I.buffer_store(spill, value, [T.ramp(0, 1, VNNI_LANES)])
                        with I.serial(0, last_tile_width) as lane:
                            I.buffer_store(y, spill[lane], [m, nt * VNNI_LANES + lane])

    return _signed_dense_func(M, K, N, n_tiles, k_groups, col_blocks, signs, parallel, block)


def _signed_dense_func(M, K, N, n_tiles, k_groups, col_blocks, signs, parallel, block) -> tirx.PrimFunc:
    """The PrimFunc of :func:`bitparallel_dense_signed` around its register-tile ``block``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    with IRBuilder() as builder:
        with I.prim_func():
            I.func_name("main")
            I.func_attr({"tir.noalias": True})
            xs = [I.arg(name, I.Buffer((M, K), "uint8")) for name in ("x_pos", "x_neg")[:signs]]
            w = I.arg("w", I.Buffer((n_tiles, k_groups, 4 * VNNI_LANES), "int8"))
            y = I.arg("y", I.Buffer((M, N), "int32"))
            loop = I.parallel if parallel else I.serial
            with loop(0, M * col_blocks) as task:
                block(xs, w, y, task // col_blocks, task % col_blocks)
    return builder.get()


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------
def _make_pad_copy(geo: ConvGeometry, fill: int = 0):
    """Macro copying the NCHW codes into a buffer bordered by ``fill``, the code of zero (0; L for
    offset codes ``code + L``): exact."""
    ph, pw = geo.padding

    @T.macro
    def pad_copy(x, x_padded):
        for bc in T.parallel(geo.batch * geo.in_channels):
            for h in range(geo.padded_h):
                for w in vector_loop(geo.padded_w):
                    x_padded[bc // geo.in_channels, bc % geo.in_channels, h, w] = T.uint8(fill)
            for h in range(geo.height):
                for w in vector_loop(geo.width):
                    x_padded[bc // geo.in_channels, bc % geo.in_channels, h + ph, w + pw] = \
                        x[bc // geo.in_channels, bc % geo.in_channels, h, w]

    return pad_copy


# A fused depthwise task's phase-split copy of its channel lives on the task's stack (reused
# from channel to channel, so it stays in L1) up to this size; larger planes take a global buffer
_TASK_STAGING_BYTES = 64 * 1024


def _staging_pitch(width: int) -> int:
    """Row pitch of a phase-split plane: whole cache lines (rows of a few bytes: the next power
    of two), so no row's stores or vector loads straddle two lines."""
    return 64 * -(-width // 64) if width > 32 else max(8, 1 << (width - 1).bit_length())


def _make_depthwise_fused(geo: ConvGeometry, weight_of: Callable, acc_dtype: str = "int32",
                          out_dtype: str = "int32", tap_pairs: bool = False, codes: bool = False,
                          pad_code: int = 0):
    """Direct int32 depthwise kernel, one parallel task per (batch, input channel): the task
    copies its channel into a padded (with ``pad_code``, the code of zero: 0, or L for offset
    codes), stride-phase-split plane ``xp[sh, sw, Hq, pitch]`` (flat)
    (so strided taps read contiguous runs), then computes every output row of the channel's
    ``O/C`` output channels as whole-row vectors (contiguous NCHW stores).

    Returns a macro ``depthwise(x, weights, y, n_planes, zero_point)``, or None for strides > 2.
    With K = kh*kw (9 for 3x3) a popcount over packed K words would use 9 of 32 bits per word;
    int32 multiply-adds are cheaper.  ``acc_dtype="int16"`` (the caller proved every partial
    sum fits) multiplies and adds 32 lanes per register instead of 16; the stores widen to
    ``out_dtype`` (int32, or int16 where the outputs fit too).

    The plane is the task's own (on its stack, up to ``_TASK_STAGING_BYTES``), its rows a whole
    number of cache lines apart, and only its padding is zeroed: the copy of MobileNetV2's
    96-channel 112x112 stride-2 input took four fifths of the kernel with a shared buffer,
    57-byte rows and every row zeroed before it was written.

    ``tap_pairs`` (int16 accumulation, AVX-512 VBMI): two taps a step, as ``vpmaddubsw`` of the
    two taps' codes interleaved byte by byte (``vpermi2b`` of their 64-byte runs) with the
    broadcast weight pair: 5 multiplies and 5 permutes for a 3x3 conv's 32 outputs where the
    int16 form needs 9 multiplies and 9 widenings (both on the same two vector ports). Exact
    where int16 accumulation is: each pair sum is a partial sum, and weights must be int8.

    ``codes`` (int16 accumulation): the task writes its output channel's *codes* instead
    (:func:`bitparallel_depthwise_codes`): the rows go to an int16 plane on its stack, then
    through the channel's fixed-point form (``glue.form_codes``, its constants loaded once a
    channel); ``y`` is then ``(codes, code_form, code_base, acc_flip)``. None where the staging
    or the plane would not fit the task's stack."""
    pairs, n_pairs = phase_pairs(geo)
    if pairs is None:
        return None
    if tap_pairs and acc_dtype != "int16":
        raise ValueError("tap pairs accumulate in int16: acc_dtype must be int16")
    if codes and acc_dtype != "int16":
        raise ValueError("a depthwise conv writes codes from int16 accumulators: acc_dtype must be int16")
    if codes:
        out_dtype = "int16"  # the rows' stores go to the stack plane
    B, C, H = geo.batch, geo.in_channels, geo.height
    OH, OW = geo.out_h, geo.out_w
    sh, sw = geo.stride
    dh, dw = geo.dilation
    ph, pw = geo.padding
    kh, kwid = geo.kernel_h, geo.kernel_w
    taps = kh * kwid
    multiplier = geo.out_per_group
    Hq, Wq = -(-geo.padded_h // sh), -(-geo.padded_w // sw)
    pitch = _staging_pitch(Wq)
    # tap pairs load 64 codes from any row and column of a phase: rows past the last phase's
    # make those loads stay inside the buffer (their codes land only in lanes never stored)
    slack_rows = -(-(64 + 2 * 64) // pitch) + 64 // pitch if tap_pairs else 0
    plane = (sh, sw, Hq + slack_rows, pitch)
    per_task = sh * sw * Hq * pitch <= _TASK_STAGING_BYTES
    P0, P1, P2, P3 = pairs
    pieces = -(-OW // 64)
    width = -(-OW // pieces)
    full, tail = OW // width, OW % width
    W = geo.width
    # stride-2 columns of even-width rows: one byte of each 16-bit pair of codes, so contiguous
    # 16-bit loads and a narrowing store instead of a byte gather (96 channels of 112x112 with
    # stride 2, one thread: 392-406 -> 247-282 us)
    pairs16 = sw == 2 and W % 2 == 0

    plane_bytes = math.prod(plane)
    if codes and not (per_task and OH * OW * 2 <= _CODES_PLANE_BYTES):
        return None

    def at(task, a_h, a_w, hq, j):
        """Flat index of row ``hq``, column ``j`` of phase ``(a_h, a_w)`` in the staging buffer
        (flat: a tap pair's 64-code loads run on past their row, and TVM sizes a local buffer
        by the index ranges it reads, dimension by dimension)."""
        index = ((a_h * sw + a_w) * plane[2] + hq) * pitch + j
        return [index] if per_task else [task * plane_bytes + index]

    @T.macro
    def copy_pair(x, xp, b, c, pair):
        x16 = T.decl_buffer((B * C * H * W // 2 if pairs16 else 1,), "uint16", data=x.data)
        for hq in range(Hq):
            if 0 <= hq * sh + pair[0] - ph and hq * sh + pair[0] - ph < H:
                # the columns left and right of the input's: padding, read by the edge taps
                if pair[2] > 0:
                    for j in vector_loop(pair[2]):
                        xp[at(b * C + c, pair[0], pair[1], hq, j)] = T.uint8(pad_code)
                if Wq - pair[2] - pair[3] > 0:
                    for j in vector_loop(Wq - pair[2] - pair[3]):
                        xp[at(b * C + c, pair[0], pair[1], hq, pair[2] + pair[3] + j)] = T.uint8(pad_code)
                # (a phase of a narrow input may hold no input column: its row is padding only)
                if pair[3] > 0 and pairs16:
                    # input column 2 (lo + j) + d, d = a_w - pw: byte d % 2 of pair lo + j + d // 2
                    for j in vector_loop(pair[3]):
                        xp[at(b * C + c, pair[0], pair[1], hq, pair[2] + j)] = T.Cast("uint8", x16[
                            ((b * C + c) * H + hq * sh + pair[0] - ph) * (W // 2) + pair[2] + j + (pair[1] - pw) // 2]
                            >> T.uint16(8 * ((pair[1] - pw) % 2)))
                if pair[3] > 0 and not pairs16:
                    for j in vector_loop(pair[3]):
                        xp[at(b * C + c, pair[0], pair[1], hq, pair[2] + j)] = \
                            x[b, c, hq * sh + pair[0] - ph, (pair[2] + j) * sw + pair[1] - pw]
            else:
                for j in vector_loop(Wq):
                    xp[at(b * C + c, pair[0], pair[1], hq, j)] = T.uint8(pad_code)

    @T.macro
    def row_piece(xp, y, q, b, c, o, oh, ow0, size):
        acc = T.alloc_buffer((size,), acc_dtype, scope="local", annotations=_ON_STACK)
        for lane in T.vectorized(size):
            acc[lane] = T.Cast(acc_dtype, 0)
        for r in T.unroll(kh):
            for s in T.unroll(kwid):
                for lane in T.vectorized(size):
                    acc[lane] = acc[lane] + q[r * kwid + s] * T.Cast(
                        acc_dtype, xp[at(b * C + c, r * dh % sh, s * dw % sw, oh + r * dh // sh,
                                         ow0 + lane + s * dw // sw)])
        for lane in T.vectorized(size):
            y[b, o, oh, ow0 + lane] = T.Cast(out_dtype, acc[lane])

    tap_steps = -(-taps // 2)
    # rows of at most 64 columns: a pair step covers 64 // pitch whole rows of the phase plane
    # (its flat run of codes: rows are pitch apart), so a 14-column plane fills 56 of 64 lanes
    flat_rows = 64 // pitch if pitch <= 64 else 0
    halves = -(-((flat_rows - 1) * pitch + OW) // 32) if flat_rows else (2 if width > 32 else 1)

    def pair_source(xp, task, t, oh, ow0):
        """The 64 codes of tap ``t`` (clamped to the last) for outputs ``ow0 ..`` of row ``oh``."""
        r, s = T.min(t, taps - 1) // kwid, T.min(t, taps - 1) % kwid
        return T.reinterpret("int8x64", xp[T.ramp(at(task, r * dh % sh, s * dw % sw, oh + r * dh // sh,
                                                        ow0 + s * dw // sw)[0], 1, 64)])

    @T.macro
    def row_piece_pairs(xp, y, qp, b, c, o, oh, ow0, size):
        acc = T.alloc_buffer((32 * halves,), "int16", scope="local", annotations=_ON_STACK)
        for lane in T.vectorized(32 * halves):
            acc[lane] = T.int16(0)
        for step in T.unroll(tap_steps):
            for half in T.unroll(halves):
                # bytes 2i, 2i+1: code i + 32 * half of the first tap's run, then of the second's
                acc[T.ramp(32 * half, 1, 32)] = acc[T.ramp(32 * half, 1, 32)] + T.call_llvm_pure_intrin(
                    "int16x32", _VPMADDUBSW, T.call_llvm_pure_intrin(
                        "int8x64", _VPERMI2B, pair_source(xp, b * C + c, 2 * step, oh, ow0),
                        T.reinterpret("int8x64", T.ramp(T.int16(16384 + 8224 * half), T.int16(257), 32)),
                        pair_source(xp, b * C + c, 2 * step + 1, oh, ow0)),
                    T.reinterpret("int8x64", T.broadcast(qp[step], 32)))
        if flat_rows > 0:
            for i in range(flat_rows):
                if oh + i < OH:
                    for lane in vector_loop(OW):
                        y[b, o, oh + i, lane] = T.Cast(out_dtype, acc[i * pitch + lane])
        else:
            for lane in T.vectorized(size):
                y[b, o, oh, ow0 + lane] = T.Cast(out_dtype, acc[lane])

    piece = row_piece_pairs if tap_pairs else row_piece

    @T.macro
    def row_pieces(xp, y, q, task, m):
        # every output row of output channel m of the task's channel, in pieces of at most 64 columns
        for oh in range(OH):
            for p in range(full):
                piece(xp, y, q, task // C, task % C, task % C * multiplier + m, oh, p * width, width)
            if tail > 0:
                piece(xp, y, q, task // C, task % C, task % C * multiplier + m, oh, full * width, tail)

    @T.macro
    def plane_pieces(xp, plane, q, task):
        # row_pieces into the task's int16 plane (batch and channel 0 of it: per-task staging
        # reads ignore the task's batch)
        for oh in range(OH):
            for p in range(full):
                piece(xp, plane, q, 0, task % C, 0, oh, p * width, width)
            if tail > 0:
                piece(xp, plane, q, 0, task % C, 0, oh, full * width, tail)

    @T.macro
    def channel_pairs(x, xp, weights, y, n_planes, zero_point, task):
        for m in range(multiplier):
            qp = T.alloc_buffer((tap_steps,), "int16", scope="local", annotations=_ON_STACK)
            for step in range(tap_steps):
                # weight pair of taps 2 step (low byte) and 2 step + 1 (high byte; 0 past the last)
                qp[step] = T.Cast("int16", (weight_of(weights, task % C * multiplier + m, 2 * step, n_planes,
                                                      zero_point) & 255)
                                  | (T.if_then_else(2 * step + 1 < taps, weight_of(
                                      weights, task % C * multiplier + m, T.min(2 * step + 1, taps - 1),
                                      n_planes, zero_point), 0) << 8))
            if codes:
                plane = T.alloc_buffer((1, 1, OH, OW), "int16", scope="local", annotations=_ON_STACK)
                if flat_rows > 0:
                    for oh in range(-(-OH // flat_rows)):
                        row_piece_pairs(xp, plane, qp, 0, task % C, 0, oh * flat_rows, 0, 64)
                else:
                    plane_pieces(xp, plane, qp, task)
                _depthwise_plane_codes(plane, y, task // C, task % C * multiplier + m)
            elif flat_rows > 0:
                for oh in range(-(-OH // flat_rows)):
                    row_piece_pairs(xp, y, qp, task // C, task % C, task % C * multiplier + m, oh * flat_rows,
                                    0, 64)
            else:
                row_pieces(xp, y, qp, task, m)

    @T.macro
    def channel_taps(x, xp, weights, y, n_planes, zero_point, task):
        for m in range(multiplier):
            q = T.alloc_buffer((taps,), acc_dtype, scope="local", annotations=_ON_STACK)
            for t in range(taps):
                q[t] = T.Cast(acc_dtype, weight_of(weights, task % C * multiplier + m, t, n_planes, zero_point))
            if codes:
                plane = T.alloc_buffer((1, 1, OH, OW), "int16", scope="local", annotations=_ON_STACK)
                plane_pieces(xp, plane, q, task)
                _depthwise_plane_codes(plane, y, task // C, task % C * multiplier + m)
            else:
                row_pieces(xp, y, q, task, m)

    @T.macro
    def channel(x, xp, weights, y, n_planes, zero_point, task):
        copy_pair(x, xp, task // C, task % C, P0)
        if n_pairs > 1:
            copy_pair(x, xp, task // C, task % C, P1)
        if n_pairs > 2:
            copy_pair(x, xp, task // C, task % C, P2)
        if n_pairs > 3:
            copy_pair(x, xp, task // C, task % C, P3)
        if tap_pairs:
            channel_pairs(x, xp, weights, y, n_planes, zero_point, task)
        else:
            channel_taps(x, xp, weights, y, n_planes, zero_point, task)

    if per_task:
        @T.macro
        def depthwise(x, weights, y, n_planes, zero_point):
            for task in T.parallel(B * C):
                xp = T.alloc_buffer((plane_bytes,), "uint8", scope="local", annotations=_ON_STACK)
                channel(x, xp, weights, y, n_planes, zero_point, task)
    else:
        @T.macro
        def depthwise(x, weights, y, n_planes, zero_point):
            xp = T.alloc_buffer((B * C * plane_bytes,), "uint8")
            for task in T.parallel(B * C):
                channel(x, xp, weights, y, n_planes, zero_point, task)

    return depthwise


# A codes-writing depthwise task keeps its output channel's int16 plane on its stack (with its
# staging, up to _TASK_STAGING_BYTES): MobileNetV2's largest, 112x112, is 24.5 KiB
_CODES_PLANE_BYTES = 32 * 1024


def _depthwise_plane_codes(plane, tables, b, o) -> None:
    """Output channel ``o``'s codes from its int16 accumulators ``plane`` (``[1, 1, OH, OW]``):
    ``form_codes(acc ^ flip) + base`` 32 lanes a vector over the flattened plane, the last vector
    ending at its end (overlapping the one before it: its common codes are written twice,
    equal), as ``glue.epilogue``'s ``code_form`` pass does over a stored int16 buffer, so the
    same codes. ``tables``: ``(codes, code_form, code_base, acc_flip)``; unsigned codes, one part."""
    from tvm.script.ir_builder import tirx as I

    from .glue import SEARCH_LANES, form_codes, form_row, store_searched_codes

    codes, form, base, flip = tables[:4]
    lanes, i16 = SEARCH_LANES, f"int16x{SEARCH_LANES}"
    batch, channels, oh, ow = (int(v) for v in codes.shape)
    positions = oh * ow
    values = I.decl_buffer((positions,), "int16", data=plane.data)
    out = I.decl_buffer((batch * channels * positions,), "uint8", data=codes.data)
    constants = form_row(form, o)
    per_channel = I.alloc_buffer((3,), i16, scope="local", annotations=_ON_STACK)  # base, flip, greatest s
    I.buffer_store(per_channel, tirx.Broadcast(tirx.Cast("int16", base[o]), lanes), [0])
    I.buffer_store(per_channel, tirx.Broadcast(tirx.Cast("int16", flip[o]), lanes), [1])
    I.buffer_store(per_channel, tirx.Broadcast(tirx.const(-(2**15), "int16"), lanes), [2])
    with I.serial(0, -(-positions // lanes)) as v:
        first = tirx.min(v * lanes, positions - lanes)
        searched = values[tirx.Ramp(first, 1, lanes)] ^ per_channel[1]
        code = form_codes(searched, constants) + per_channel[0]
        store_searched_codes(code, (b * channels + o) * positions + first, out, None, 0, False)
        if len(tables) == 6:
            I.buffer_store(per_channel, tirx.Max(per_channel[2], searched), [2])
    if len(tables) == 6:  # whether a value of the channel reached its saturation threshold
        saturation_at, saturated = tables[4:]
        greatest = I.call_llvm_pure_intrin("int16", "llvm.vector.reduce.smax", per_channel[2])
        I.buffer_store(saturated, tirx.Cast("int32", greatest >= saturation_at[o]), [b * channels + o])


def _depthwise_codes_macro(input_shape, weight_shape, stride, padding, dilation, tap_pairs: bool):
    """The geometry and the codes-writing fused depthwise macro of a conv
    :func:`depthwise_codes_fit` takes (ValueError for any other)."""
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, int(input_shape[1]))
    if not depthwise_codes_fit(geo):
        raise ValueError(f"a depthwise conv writing its codes has strides up to 2 and output planes of 32 to "
                         f"{_CODES_PLANE_BYTES // 2} codes, not {tuple(input_shape)} -> {tuple(weight_shape)}")
    depthwise = _make_depthwise_fused(geo, lambda weights, o, t, n_planes, zp: weights[o, t], "int16", "int16",
                                      tap_pairs, codes=True)
    if depthwise is None:
        raise ValueError("this depthwise conv's staging does not fit a task's stack")
    return geo, depthwise


def bitparallel_depthwise_codes(input_shape, weight_shape, stride, padding, dilation, out_scale: float,
                                tap_pairs: bool = False) -> tirx.PrimFunc:
    """A depthwise conv that writes its output *codes* (unsigned, one part), its int16
    accumulators never leaving the task's stack: the fused depthwise kernel (int16
    accumulation, its caller's bound proved) whose task runs its channel's fixed-point form
    (``code_thresholds.code_form``) over the plane it just summed. The same codes, bit for bit,
    as the kernel writing int16 accumulators and ``glue.epilogue`` with ``code_form``::

        main(x: uint8[B, C, H, W], w: int32[O, kh*kw], code_form: int16[O * FORM_FIELDS],
             code_base: int8[O], acc_flip: int8[O], out_scale: float32[1], codes: uint8[B, O, OH, OW])

    ``out_scale`` receives the static output scale. Needs :func:`depthwise_codes_fit`."""
    from csqc.targets.tvm.code_thresholds import FORM_FIELDS

    geo, depthwise = _depthwise_codes_macro(input_shape, weight_shape, stride, padding, dilation, tap_pairs)
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW, taps = geo.out_channels, geo.out_h, geo.out_w, geo.kernel_h * geo.kernel_w

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps), "int32"),
             code_form: T.Buffer((O * FORM_FIELDS,), "int16"), code_base: T.Buffer((O,), "int8"),
             acc_flip: T.Buffer((O,), "int8"), scale: T.Buffer((1,), "float32"),
             codes: T.Buffer((B, O, OH, OW), "uint8")):
        T.func_attr({"tir.noalias": True})
        scale[0] = T.float32(out_scale)
        depthwise(x, w, (codes, code_form, code_base, acc_flip), 0, 0)

    return main


def bitparallel_depthwise_saturated_codes(input_shape, weight_shape, stride, padding, dilation, in_bound: float,
                                          out_bound: float, tap_pairs: bool = False) -> tirx.PrimFunc:
    """:func:`bitparallel_depthwise_codes` under dynamic scales, where both are bounded by a clip
    (ReLU6: ``in_bound = out_bound = 6``): a dynamic scale ``S = max|y|`` *is* its bound as soon
    as one value reaches it, and the codes at ``S' = out_bound`` are then the static-scale codes
    whose forms the compiler proved for scales ``(in_bound, out_bound)``. Runs only where this
    call's input scale equals ``in_bound``; each task also flags whether a value of its channel
    reached the output bound (its search value ``s >= saturation_at[o]``, the least ``s`` whose
    ``y`` is the bound). Where one did, it writes ``out_bound`` as the scale and ``done = 1``: the
    codes are the dynamic path's, bit for bit. Otherwise ``done = 0`` and the codes written are
    not the layer's: the conv and its dynamic epilogue run after it (their ``skip_when_done``
    variants) and write them::

        main(x: uint8[B, C, H, W], w: int32[O, kh*kw], in_scale: float32[1],
             code_form: int16[O * FORM_FIELDS], code_base: int8[O], acc_flip: int8[O],
             saturation_at: int16[O], scale: float32[1], codes: uint8[B, O, OH, OW], done: int32[1])"""
    from csqc.targets.tvm.code_thresholds import FORM_FIELDS

    if not (in_bound > 0 and out_bound > 0):
        raise ValueError(f"the bounds of saturated scales are positive, not {in_bound}, {out_bound}")
    geo, depthwise = _depthwise_codes_macro(input_shape, weight_shape, stride, padding, dilation, tap_pairs)
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW, taps = geo.out_channels, geo.out_h, geo.out_w, geo.kernel_h * geo.kernel_w

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps), "int32"), in_scale: T.Buffer((1,), "float32"),
             code_form: T.Buffer((O * FORM_FIELDS,), "int16"), code_base: T.Buffer((O,), "int8"),
             acc_flip: T.Buffer((O,), "int8"), saturation_at: T.Buffer((O,), "int16"),
             scale: T.Buffer((1,), "float32"), codes: T.Buffer((B, O, OH, OW), "uint8"),
             done: T.Buffer((1,), "int32")):
        T.func_attr({"tir.noalias": True})
        done[0] = 0
        if in_scale[0] == T.float32(in_bound):
            saturated = T.alloc_buffer((B * O,), "int32")
            depthwise(x, w, (codes, code_form, code_base, acc_flip, saturation_at, saturated), 0, 0)
            for i in range(B * O):
                done[0] = done[0] | saturated[i]
            if done[0] != 0:
                scale[0] = T.float32(out_bound)

    return main


def depthwise_codes_fit(geo: ConvGeometry) -> bool:
    """Whether :func:`bitparallel_depthwise_codes` takes this conv: depthwise on the fused kernel
    (strides up to 2), an output plane of at least one 32-lane vector and at most
    ``_CODES_PLANE_BYTES`` of int16, and its input staging on the task's stack."""
    if not (geo.is_depthwise and depthwise_writes_int16(geo) and 32 <= geo.out_h * geo.out_w
            and geo.out_h * geo.out_w * 2 <= _CODES_PLANE_BYTES):
        return False
    sh, sw = geo.stride
    Hq, Wq = -(-geo.padded_h // sh), -(-geo.padded_w // sw)
    return sh * sw * Hq * _staging_pitch(Wq) <= _TASK_STAGING_BYTES


def depthwise_tap_pairs_pay(geo: ConvGeometry) -> bool:
    """Whether the fused depthwise kernel's tap pairs beat its int16 taps for this shape. Measured
    on MobileNetV2's 3x3 convs (one thread, AVX-512 VBMI): stride 1 at 112 to 7 columns 1.14x-1.7x;
    stride 2 1.17x-1.44x to 56 and 28 output columns, 1.0x at 14 and 0.47x at 7 (four phase planes
    of 8-byte rows: the int16 taps' short vectors win there)."""
    return depthwise_writes_int16(geo) and (geo.stride == (1, 1) or geo.out_w >= 28)


def depthwise_writes_int16(geo: ConvGeometry) -> bool:
    """Whether :func:`bitparallel_conv2d` can store this depthwise conv's outputs as int16 (its
    fused kernel, strides up to 2; the caller must also prove the outputs fit and accumulate
    them in int16)."""
    return phase_pairs(geo)[0] is not None


def _make_depthwise_direct(geo: ConvGeometry, weight_of: Callable, chunk: int = 32):
    """Direct int32 depthwise kernel: for each (batch, output channel) a 2-D stencil vectorized
    along the output row.  With K = kh*kw (9 for 3x3) a popcount over packed K words would
    use 9 of 32 bits per word; plain int32 multiply-adds on the codes are cheaper."""
    sh, sw = geo.stride
    dh, dw = geo.dilation
    taps = geo.kernel_h * geo.kernel_w
    multiplier = geo.out_per_group
    width, full, tail = _chunks(geo.out_w, chunk)

    @T.macro
    def row_chunk(x_padded, y, q, b, o, oh, ow0, size):
        acc = T.alloc_buffer((size,), "int32", scope="local", annotations=_ON_STACK)
        for lane in T.vectorized(size):
            acc[lane] = 0
        for r in range(geo.kernel_h):
            for s in range(geo.kernel_w):
                for lane in T.vectorized(size):
                    acc[lane] = acc[lane] + q[r * geo.kernel_w + s] * T.Cast(
                        "int32", x_padded[b, o // multiplier, oh * sh + r * dh, (ow0 + lane) * sw + s * dw])
        for lane in T.vectorized(size):
            y[b, o, oh, ow0 + lane] = acc[lane]

    @T.macro
    def depthwise(x_padded, weights, y, n_planes, zero_point):
        for task in T.parallel(geo.batch * geo.out_channels):
            q = T.alloc_buffer((taps,), "int32", scope="local", annotations=_ON_STACK)
            for t in range(taps):
                q[t] = weight_of(weights, task % geo.out_channels, t, n_planes, zero_point)
            for oh in range(geo.out_h):
                for c in range(full):
                    row_chunk(x_padded, y, q, task // geo.out_channels, task % geo.out_channels,
                              oh, c * width, width)
                if tail > 0:
                    row_chunk(x_padded, y, q, task // geo.out_channels, task % geo.out_channels,
                              oh, full * width, tail)

    return depthwise


def bitserial_conv2d(input_shape, weight_shape, shifts_signs: Sequence[tuple[int, int]], act_bits: int,
                     zero_point: bool, stride=1, padding=0, dilation=1, groups=1,
                     acc_dtype: str = "int32", knobs: BitserialKnobs | None = None) -> tirx.PrimFunc:
    """Bit-serial NCHW conv2d (implicit GEMM per group; direct kernel for depthwise).

    Signature of the returned PrimFunc::

        main(x: uint8[B, C, H, W], w_planes, n_planes: int32, zero_point: int32,
             y: acc_dtype[B, O, OH, OW])

    ``w_planes`` is ``packing.pack_conv_weight_planes(planes, groups, knobs.lanes)``
    (``uint32[G, NT, P, KW, lanes]``, K ordered (c, r, s)), or for depthwise
    (``C/groups == 1``) ``packing.pack_depthwise_weight_planes(planes)`` (``uint8[O, P, kh*kw]``).
    The im2col gather is fused into the activation packing: planes are packed along output
    rows (lanes = output columns), so no im2col buffer is materialised.
    """
    _check_planes(shifts_signs, act_bits, acc_dtype)
    with_zero_point = bool(zero_point)  # the PrimFunc has a scalar parameter of the same name
    knobs = knobs or BitserialKnobs()
    shifts_signs = [tuple(map(int, item)) for item in shifts_signs]
    planes_count = len(shifts_signs)
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW, G = geo.out_channels, geo.out_h, geo.out_w, geo.groups
    Hp, Wp = geo.padded_h, geo.padded_w
    pad_copy = _make_pad_copy(geo)

    if geo.is_depthwise:
        if acc_dtype != "int32":
            raise ValueError("the depthwise direct kernel accumulates in int32")
        taps = geo.kernel_h * geo.kernel_w

        def weight_of(weights, o, t, n_planes, zp):
            expr = -zp if with_zero_point else tirx.const(0, "int32")
            for p in range(planes_count):
                shift, sign = shifts_signs[p]
                expr = expr + tirx.Select(p < n_planes, tirx.const(sign * (1 << shift), "int32"),
                                          tirx.const(0, "int32")) * T.Cast("int32", weights[o, p, t])
            return expr

        depthwise_fused = _make_depthwise_fused(geo, weight_of)
        if depthwise_fused is not None:
            @T.prim_func
            def main_dw_fused(x: T.Buffer((B, C, H, W), "uint8"),
                              w_planes: T.Buffer((O, planes_count, taps), "uint8"),
                              n_planes: T.int32, zero_point: T.int32,
                              y: T.Buffer((B, O, OH, OW), "int32")):
                T.func_attr({"tir.noalias": True})
                depthwise_fused(x, w_planes, y, n_planes, zero_point)

            return main_dw_fused

        depthwise = _make_depthwise_direct(geo, weight_of)

        @T.prim_func
        def main_dw(x: T.Buffer((B, C, H, W), "uint8"),
                    w_planes: T.Buffer((O, planes_count, taps), "uint8"),
                    n_planes: T.int32, zero_point: T.int32,
                    y: T.Buffer((B, O, OH, OW), "int32")):
            T.func_attr({"tir.noalias": True})
            x_padded = T.alloc_buffer((B, C, Hp, Wp), "uint8")
            pad_copy(x, x_padded)
            depthwise(x_padded, w_planes, y, n_planes, zero_point)

        return main_dw

    Cg, Og = geo.in_per_group, geo.out_per_group
    kh, kwid = geo.kernel_h, geo.kernel_w
    sh, sw = geo.stride
    dh, dw = geo.dilation
    K = geo.reduction
    kw = words_for(K)
    lanes = effective_lanes(Og, knobs.lanes)
    n_tiles = -(-Og // lanes)
    rows = B * OH * OW
    width, full, tail = _chunks(OW, 32)

    @T.macro
    def pack_row_chunk(x_padded, planes, g, b, oh, word, ow0, size):
        # One packed word (32 K positions) for `size` output pixels of one output row.
        bits = T.alloc_buffer((act_bits, size), "uint32", scope="local", annotations=_ON_STACK)
        for j in T.unroll(act_bits):
            for lane in T.vectorized(size):
                bits[j, lane] = T.uint32(0)
        for bit in range(WORD_BITS):
            if bit * kw + word < K:
                for j in T.unroll(act_bits):
                    for lane in T.vectorized(size):
                        bits[j, lane] = bits[j, lane] | _bit_of(
                            x_padded[b, g * Cg + (bit * kw + word) // (kh * kwid),
                                     oh * sh + (bit * kw + word) // kwid % kh * dh,
                                     (ow0 + lane) * sw + (bit * kw + word) % kwid * dw], j, bit)
        for j in T.unroll(act_bits):
            for lane in T.vectorized(size):
                planes[g, j, word, (b * OH + oh) * OW + ow0 + lane] = bits[j, lane]

    def weight_at(weights, g, nt, p, word, lane):
        return weights[g, nt, p, word, lane]

    def plane_at(planes, g, m, j, word):
        return planes[g, j, word, m]

    def rowsum_at(rowsum, g, m):
        return rowsum[g, m]

    @T.macro
    def store_tile(out, total, g, nt, m):
        for lane in range(lanes):
            if nt * lanes + lane < Og:
                out[m // (OH * OW), g * Og + nt * lanes + lane, m // OW % OH, m % OW] = total[lane]

    rows_per_task = max(1, min(knobs.rows_per_task, rows))
    OHW = OH * OW

    @T.macro
    def store_block(out, block, g, nt, m0):
        # NCHW output: consecutive rows of one channel are contiguous unless the block crosses
        # an image or the end; then element by element.
        y_flat = T.decl_buffer((B * O * OHW,), acc_dtype, data=out.data)
        for lane in range(lanes):
            if nt * lanes + lane < Og:
                if m0 % OHW + rows_per_task <= OHW and m0 + rows_per_task <= rows:
                    for mi in T.vectorized(rows_per_task):
                        y_flat[(m0 // OHW * O + g * Og + nt * lanes + lane) * OHW + m0 % OHW + mi] = \
                            block[mi, lane]
                else:
                    for mi in range(rows_per_task):
                        if m0 + mi < rows:
                            y_flat[((m0 + mi) // OHW * O + g * Og + nt * lanes + lane) * OHW
                                   + (m0 + mi) % OHW] = block[mi, lane]

    core = _make_bitserial_core(
        groups=G, rows=rows, n_tiles=n_tiles, lanes=lanes, kw=kw, shifts_signs=shifts_signs,
        act_bits=act_bits, acc_dtype=acc_dtype, knobs=knobs, with_zero_point=with_zero_point,
        weight_at=weight_at, plane_at=plane_at, rowsum_at=rowsum_at, store_tile=store_tile,
        store_block=store_block)

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"),
             w_planes: T.Buffer((G, n_tiles, planes_count, kw, lanes), "uint32"),
             n_planes: T.int32, zero_point: T.int32,
             y: T.Buffer((B, O, OH, OW), acc_dtype)):
        T.func_attr({"tir.noalias": True})
        x_padded = T.alloc_buffer((B, C, Hp, Wp), "uint8")
        act_planes = T.alloc_buffer((G, act_bits, kw, rows), "uint32")
        rowsum = T.alloc_buffer((G, rows), "int32")
        pad_copy(x, x_padded)
        for task in T.parallel(G * B * OH):
            for word in range(kw):
                for c in range(full):
                    pack_row_chunk(x_padded, act_planes, task // (B * OH), task // OH % B, task % OH,
                                   word, c * width, width)
                if tail > 0:
                    pack_row_chunk(x_padded, act_planes, task // (B * OH), task // OH % B, task % OH,
                                   word, full * width, tail)
            if with_zero_point:
                # sum of the codes of each output pixel's patch, vectorized along the row.
                for ow in vector_loop(OW):
                    rowsum[task // (B * OH), (task // OH % B * OH + task % OH) * OW + ow] = 0
                for j in range(act_bits):
                    for word in range(kw):
                        for ow in vector_loop(OW):
                            rowsum[task // (B * OH), (task // OH % B * OH + task % OH) * OW + ow] = \
                                rowsum[task // (B * OH), (task // OH % B * OH + task % OH) * OW + ow] + (
                                    T.reinterpret("int32", T.popcount(
                                        act_planes[task // (B * OH), j, word,
                                                   (task // OH % B * OH + task % OH) * OW + ow])) << j)
        core(w_planes, act_planes, rowsum, y, n_planes, zero_point)

    return main


@dataclass(frozen=True)
class _PixelPlan:
    """Resolved tiling of the pixels-on-lanes bit-parallel conv (see :func:`_conv_pixel_plan`)."""

    channels: int      # output channels per register tile (weight words broadcast)
    vectors: int       # 16-pixel vectors per register tile
    rows: int          # output rows per parallel task
    chunks: int        # register tiles per task (rows * Wq positions rounded up; direct: rows * OW)
    direct: bool       # register tiles stored straight into the output (see _direct_rows)
    packed: bool = False  # positions are output positions, each vector gathered from rows (_packed_rows)


def _direct_rows(geo: ConvGeometry, vectors: int, rows: int) -> int:
    """Rows per task near ``rows`` for which every register tile can be stored straight into
    the output, 0 where none can. That needs vectors that are runs of one output's layout:
    either the flat ``rows x Wq`` domain is that layout (``Wq == OW``: one-column kernels without
    column padding, any stride) and whole vectors reach the output's end, or output rows are
    whole vectors (``OW % 16 == 0``: the vectors then skip the ``Wq - OW`` columns no output
    has, which are not computed either). Whole tiles per task (``rows * OW`` a multiple of
    ``16 * vectors``): the last task's tiles past ``OH`` rows are skipped whole. It saves the
    stack tile and its copy (a 1x1 conv 16 -> 96 channels at 112x112, one thread: 351-405 ->
    248-261 us)."""
    oh, ow = geo.out_h, geo.out_w
    flat = -(-geo.padded_w // geo.stride[1]) == ow and oh * ow % VNNI_LANES == 0
    if not flat and ow % VNNI_LANES:
        return 0
    step = VNNI_LANES * vectors // math.gcd(ow, VNNI_LANES * vectors)  # rows per whole number of tiles
    if step > oh:
        return 0
    return max(step, min(round(rows / step) * step, oh // step * step))


def _packed_rows(geo: ConvGeometry, vectors: int, rows: int) -> int:
    """Rows per task near ``rows`` for which a 16-position vector can be output rows packed
    together (0 where not): narrow outputs (``OW`` 4 or 8, a divisor of 16) whose staged rows
    carry padding columns (``Wq > OW``). The flat ``rows x Wq`` domain then computes
    ``Wq / OW`` times the outputs (ResNet-20's 8x8 stage: 80 positions for 64 outputs); packed,
    each code vector is ``16 / OW`` row runs loaded and joined (one shuffle, shared by the tile's
    output channels), every position is an output, and the tiles store straight into ``y``.
    Whole tiles per task and over the plane (``OH`` a multiple of the rows a tile spans)."""
    if not _packs(geo, vectors):
        return 0
    step = VNNI_LANES * vectors // geo.out_w  # rows per tile
    return max(step, min(round(rows / step) * step, geo.out_h // step * step))


def _packs(geo: ConvGeometry, vectors: int) -> bool:
    """Whether tiles of ``vectors`` vectors can pack output rows (see :func:`_packed_rows`)."""
    ow = geo.out_w
    return (ow in (4, 8) and -(-geo.padded_w // geo.stride[1]) != ow
            and geo.out_h % (VNNI_LANES * vectors // ow) == 0)


def _two_vector_tiles_pay(geo: ConvGeometry, wq: int) -> bool:
    """Whether 8 output channels x 2 pixel vectors beat 16 x 1 as an AVX-512 register tile (the
    same 16 accumulators): a step then loads 2 code vectors and broadcasts 8 weight words, 10
    loads for 16 ``vpdpbusd`` instead of 17, where two ``vpdpbusd`` a cycle (Zen 5) leave the
    loads the limit. It pays over reductions of 64 and more (shorter ones lose to the longer
    tile's stores: 32 -> 192 channels at 28x28 8.3 -> 14.4 us) and where 32-position tiles waste
    at most 10% more of the plane than 16-position ones (an 8x8 output on its padded rows: 96
    against 80 positions, 12.8 -> 14.0 us; packed rows, :func:`_packed_rows`, are 64 either
    way: 64 -> 64 channels 3x3 at 8x8 3.8 -> 3.5 us, one thread 5.5 -> 4.7). Zen 5, 2 threads,
    ResNet-18's and MobileNetV2's conv shapes: ResNet-18's 3x3 convs 5-14% faster, its 1x1s
    4-12%, MobileNetV2's 1x1s 0-22%."""
    reduction = geo.in_per_group * geo.kernel_h * geo.kernel_w

    def computed(vectors):  # positions a tile of ``vectors`` vectors computes over the plane
        width = VNNI_LANES * vectors
        return -(-(geo.out_h * (geo.out_w if _packs(geo, vectors) else wq)) // width) * width

    return reduction >= 64 and geo.out_per_group % 8 == 0 and computed(2) <= 1.1 * computed(1)


_TASK_POSITIONS = 1024  # most flat positions a task computes (its stack tile: 32 KiB at 8 channels)
_MIN_TASKS = 4          # parallel tasks a conv keeps where its plane has the rows for them


def task_rows(geo: ConvGeometry, wq: int, vectors: int, o_blocks: int) -> int:
    """Output rows per parallel task: the fewest positions computed over the plane. A task
    computes whole tiles of ``16 * vectors`` positions over its ``rows x Wq`` flat domain, and
    the last row task as many as the others, so a domain that is not whole tiles, or rows that
    do not divide ``OH``, compute positions no output has (ResNet-18's 56x56 3x3 conv at about
    256 positions a task: 5 rows of 58, 320 positions for 290, 12 tasks for 11.2 rows: 18% more
    than its outputs; 14 rows: 2.5%). Ties go to larger tasks (fewer launches' worth of per-task
    work); at most ``_TASK_POSITIONS`` a task, and at least ``_MIN_TASKS`` tasks."""
    width = VNNI_LANES * vectors
    best_rows, best = 1, None
    for rows in range(1, geo.out_h + 1):
        if rows > 1 and rows * wq > _TASK_POSITIONS:
            break
        row_tasks = -(-geo.out_h // rows)
        if rows > 1 and o_blocks * row_tasks < _MIN_TASKS:
            break
        computed = row_tasks * -(-(rows * wq) // width) * width
        if best is None or computed <= best:
            best_rows, best = rows, computed
    return best_rows


def channels_on_lanes_pay(geo: ConvGeometry) -> bool:
    """Whether output channels on the lanes, 7 positions a register tile (7 x 2 vectors), beat the
    pixel kernel: on AVX-512, where the reduction is long (2048 and more: the channels kernel's
    scattered stores then cost little) and the plane is whole 7-position tiles while the pixel
    plan computes a tenth more positions than there are (a 7x7 plane: 64 for 49; 14x14: 224 for
    196). Zen 5, 2 threads, alternating runs: 512 -> 512 3x3 at 7x7 155 -> 129 us, stride 2 from
    14x14 163 -> 144, 256 -> 256 at 14x14 133 -> 126, 2048 -> 512 1x1 at 7x7 81 -> 76; shorter
    reductions lose (512 -> 512 1x1 at 7x7 25 -> 29 us, 128 -> 128 3x3 13 -> 14)."""
    if accumulator_budget() < 16 or geo.groups != 1 or geo.is_depthwise or phase_pairs(geo)[0] is None:
        return False
    positions = geo.batch * geo.out_h * geo.out_w
    if geo.in_per_group * geo.kernel_h * geo.kernel_w < 2048 or positions % 7:
        return False
    plan = _conv_pixel_plan(geo, BitparallelKnobs())
    if plan.packed or plan.direct:
        return False
    computed = geo.batch * -(-geo.out_h // plan.rows) * plan.chunks * plan.vectors * VNNI_LANES
    return computed >= 1.1 * positions


def small_plane_row_block(geo: ConvGeometry) -> int:
    """Output positions a register tile of the channels-on-lanes kernel takes where the plane is
    too small for the pixel kernel's 16 lanes (0: keep the pixel kernel): at most 25 positions
    an image, of which the pixel plan computes at least 1.5x (a 2x2 plane fills 4 of 16 lanes, a
    3x3 one 9, a 5x5 one 25 of 48; 4x4 and 8x8 planes pack whole rows and waste none). Rows of 5,
    4 or 3 positions, whichever pads the fewest, by four 16-channel vectors. Zen 4, 2 threads
    (slow state, pixels -> channels): 512 -> 512 3x3 at 2x2 177 -> 57 us (VGG-19-BN's last
    stage), at 3x3 179 -> 112, 256 -> 256 3x3 at 5x5 136 -> 80, 240 -> 960 1x1 at 1x1 (a
    squeeze-excitation's) 26 -> 12, 64 -> 64 3x3 at 2x2 11.7 -> 3.3; 4x4 and 5x5 1x1 planes
    (1.0x and 1.28x computed) measured even, and keep the pixel kernel."""
    if accumulator_budget() < 16 or geo.groups != 1 or geo.is_depthwise or phase_pairs(geo)[0] is None:
        return 0
    plane = geo.out_h * geo.out_w
    if plane > 25:
        return 0
    plan = _conv_pixel_plan(geo, BitparallelKnobs())
    computed = -(-geo.out_h // plan.rows) * plan.chunks * plan.vectors * VNNI_LANES
    if computed < 1.5 * plane:
        return 0
    positions = geo.batch * plane
    return min((rows for rows in (5, 4, 3) if rows <= positions), key=lambda rows: -(-positions // rows) * rows,
               default=positions)


def _conv_pixel_plan(geo: ConvGeometry, knobs: BitparallelKnobs) -> _PixelPlan:
    """Per-shape tiling: the knobs where given, else the heuristic."""
    sw = geo.stride[1]
    wq = -(-geo.padded_w // sw)
    og = geo.out_per_group
    channels, vectors, rows = knobs.conv_channels, knobs.conv_vectors, knobs.conv_rows
    explicit_rows = bool(rows)
    budget = accumulator_budget()  # (AVX2: a quarter of AVX-512's register file)
    if not channels:
        # Largest register tile width that wastes fewest padded output channels.
        channels = min((c for c in (4, 8, 12, 16) if c <= budget) if budget >= 16 else (4, 6),
                       key=lambda c: (-(-og // c) * c - og, -c))
        if channels == 16 and not vectors and _two_vector_tiles_pay(geo, wq):
            channels, vectors = 8, 2
    if not vectors:
        vectors = {16: 1, 12: 2, 8: 2}.get(channels, max(1, 16 // channels)) if budget >= 16 else 1
        # Small output planes: fewer vectors so the rounding waste stays small.
        while vectors > 1 and geo.out_h * wq < 2 * 16 * vectors:
            vectors //= 2
    if not rows:
        o_blocks = geo.groups * -(-og // channels) * geo.batch
        if _direct_rows(geo, vectors, 1) or _packs(geo, vectors):
            # About 256 flat positions per task (tiles stored straight to the output or packed
            # compute no row's gap columns, and the last task skips the tiles past its plane),
            # rows balanced over the tasks, and at least _MIN_TASKS tasks.
            row_tasks = max(1, min(geo.out_h, round(geo.out_h * wq / 256)))
            while row_tasks < geo.out_h and o_blocks * row_tasks < _MIN_TASKS:
                row_tasks += 1
            rows = -(-geo.out_h // row_tasks)
        else:
            rows = task_rows(geo, wq, vectors, o_blocks)
    rows = max(1, min(rows, geo.out_h))
    packed_rows = _packed_rows(geo, vectors, rows)
    if packed_rows and not (explicit_rows and packed_rows != rows):
        rows = packed_rows
        return _PixelPlan(channels, vectors, rows, rows * geo.out_w // (16 * vectors), True, packed=True)
    direct_rows = _direct_rows(geo, vectors, rows)
    if explicit_rows and direct_rows != rows:
        direct_rows = 0  # the knobs' rows stand; direct stores only where they allow them
    rows = direct_rows or rows
    chunks = rows * geo.out_w // (16 * vectors) if direct_rows else -(-(rows * wq) // (16 * vectors))
    return _PixelPlan(channels, vectors, rows, chunks, direct_rows > 0)


def _plane_codes(tile, o, codes: ConvCodes, buffers, b, c, channels: int, positions: int) -> None:
    """Output channel ``c`` (image ``b``) of a register tile's stack copy: its ``positions``
    int32 accumulators, flat from ``tile[o, 0]``, to its codes, 32 lanes a vector over the plane
    (the last vector ending at its end, overlapping the one before it: its common codes are
    written twice, equal), as ``glue.epilogue``'s ``code_search``/``code_form`` pass does over
    stored int32 accumulators (saturated to int16 against wide tables), so the same codes.
    The channel's constants are loaded once, before its vectors."""
    from tvm.script.ir_builder import tirx as I

    from .glue import SEARCH_LANES, form_codes, form_row, saturated_search_value, searched_codes, store_searched_codes

    acc_offset, thresholds, base, flip, pos, neg = buffers
    lanes = SEARCH_LANES
    wide = I.alloc_buffer((2,), f"int32x{lanes}", scope="local", annotations=_ON_STACK)
    offset = acc_offset[c] if acc_offset is not None else tirx.const(0, "int32")
    I.buffer_store(wide, tirx.Broadcast(offset, lanes), [0])
    I.buffer_store(wide, tirx.Broadcast(tirx.Cast("int32", flip[c]), lanes), [1])
    base_lanes = I.alloc_buffer((1,), f"int16x{lanes}", scope="local", annotations=_ON_STACK)
    I.buffer_store(base_lanes, tirx.Broadcast(tirx.Cast("int16", base[c]), lanes), [0])
    constants = form_row(thresholds, c) if not codes.steps else None
    out = I.decl_buffer((tile.shape[0] * tile.shape[1],), "int32", data=tile.data)
    with I.serial(0, -(-positions // lanes)) as v:
        first = tirx.min(v * lanes, positions - lanes)
        value = saturated_search_value(out[tirx.Ramp(o * tile.shape[1] + first, 1, lanes)], wide[0], wide[1])
        if codes.steps:
            entries = 2**codes.steps - 1
            code = searched_codes(value, thresholds[tirx.Ramp(c * entries, 1, lanes)], base_lanes[0], codes.steps)
        else:
            code = form_codes(value, constants) + base_lanes[0]
        store_searched_codes(code, (b * channels + c) * positions + first, pos, neg, codes.out_levels,
                             codes.out_offset)


def conv_codes_fit(geo: ConvGeometry, plan: "_PixelPlan | BitparallelKnobs") -> bool:
    """Whether the pixel conv of this plan (or of these knobs) can write its codes
    (:func:`bitparallel_conv2d_codes`): every task holds whole output planes of its channels in
    its stack tile, flat (one row task; unpadded columns, ``Wq == OW``; not stored direct), and a
    plane has at least one 32-lane vector."""
    from .glue import SEARCH_LANES

    if isinstance(plan, BitparallelKnobs):
        if plan.conv_form == "channels" or geo.groups != 1 or geo.is_depthwise or phase_pairs(geo)[0] is None:
            return False
        plan = _conv_pixel_plan(geo, plan)
    wq = -(-geo.padded_w // geo.stride[1])
    return ((plan.packed or not plan.direct) and plan.rows >= geo.out_h and (wq == geo.out_w or plan.packed)
            and geo.out_h * geo.out_w >= SEARCH_LANES)


def bitparallel_conv2d_codes(input_shape, weight_shape, stride, padding, dilation, codes: ConvCodes,
                             knobs: BitparallelKnobs | None = None, pad_code: int = 0) -> tirx.PrimFunc:
    """:func:`bitparallel_conv2d` (output pixels on the lanes, one group) writing its output
    *codes* instead of its accumulators: each task runs its channels' whole planes through the
    code search or fixed-point form while they sit in its stack tile (``codes_main``'s
    signature, ``w`` the pixel conv's weights). The same codes, bit for bit, as the conv and
    ``glue.epilogue`` with ``code_search``/``code_form`` over int32 accumulators. Needs
    :func:`conv_codes_fit`. ``pad_code``: as :func:`bitparallel_conv2d`'s."""
    knobs = knobs or BitparallelKnobs()
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, 1)
    if not conv_codes_fit(geo, knobs):
        raise ValueError(f"bitparallel_conv2d_codes needs whole output planes per task of at least 32 positions, "
                         f"unpadded columns: not {tuple(input_shape)} -> {tuple(weight_shape)}")
    if not 0 <= codes.steps <= 5:
        raise ValueError(f"a code search takes 1..5 steps (0: the fixed-point form), got {codes.steps}")
    return _bitparallel_conv2d_pixels(geo, knobs, codes=codes, pad_code=pad_code)


def _bitparallel_conv2d_pixels(geo: ConvGeometry, knobs: BitparallelKnobs, out_dtype: str = "int32",
                               codes: "ConvCodes | None" = None, pad_code: int = 0) -> tirx.PrimFunc:
    """Bit-parallel conv with output pixels on the vector lanes (``vpdpbusd`` with the 4-channel
    weight word broadcast): the output stays NCHW, so every store is a contiguous vector.

    The input is copied once to int32 words of 4 channels in a zero-padded, stride-phase-split
    layout ``xs[B, G*ceil(Cg/4), sh, sw, rows, Wq]`` (``Wq = ceil(Wp/sw)``): input column
    ``w = sw*j + phase``.  Every tap (r, s) of every output row then reads one contiguous run of
    words: output (oh, ow) of tap (r, s) is at phase ``(r*dh % sh, s*dw % sw)``, row
    ``oh + r*dh // sh``, column ``ow + s*dw // sw``.  Positions are computed over the flat
    ``rows x Wq`` domain of a task (columns ``ow >= OW`` are computed and dropped), staged in a
    small stack tile and copied out row by row; where the plan allows (``_direct_rows``) the
    vectors are runs of output rows instead, stored straight into ``y``.

    An input under ``staging.MIN_PARALLEL_STAGING`` codes is staged by each task instead, just
    the rows it reads, on its stack (``staging.task_rows_staging``; a task then runs every
    output-channel block of its rows, or half of them where the plane is one row block).

    ``codes`` (:func:`bitparallel_conv2d_codes`): each task's tile goes through its channels'
    codes (:func:`_plane_codes`) instead of being copied out, and the PrimFunc takes
    ``codes_main``'s parameters in place of ``y``.
    """
    plan = _conv_pixel_plan(geo, knobs)
    if codes is None and not knobs.conv_rows and geo.out_h > 1 and staging_loop(geo) is T.serial \
            and geo.batch * geo.groups * -(-geo.out_h // plan.rows) == 1:
        # a small input's tasks stage their own rows (below): two row blocks stage it about once,
        # two output-channel blocks twice (where both halves store whole vectors: a 7x7 plane's
        # flat halves took 160 -> 960 channels 44 -> 53 us on one thread)
        halves = _conv_pixel_plan(geo, replace(knobs, conv_rows=-(-geo.out_h // 2)))
        if halves.rows < geo.out_h and halves.direct:
            plan = halves
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW, G = geo.out_channels, geo.out_h, geo.out_w, geo.groups
    Hp, Wp = geo.padded_h, geo.padded_w
    ph, pw = geo.padding
    sh, sw = geo.stride
    dh, dw = geo.dilation
    kh, kwid = geo.kernel_h, geo.kernel_w
    Cg, Og = geo.in_per_group, geo.out_per_group
    c_groups = -(-Cg // 4)
    n_tiles = -(-Og // VNNI_LANES)
    k_groups = kh * kwid * c_groups
    Hq, Wq = -(-Hp // sh), -(-Wp // sw)
    OB, V, NR, NCH, direct, packed = plan.channels, plan.vectors, plan.rows, plan.chunks, plan.direct, plan.packed
    if codes is not None:
        direct = False  # the codes come from the task's stack tile
    span = NCH * V * VNNI_LANES            # positions computed per task
    pitch = OW if packed else Wq           # positions per output row in a task's domain
    segments = VNNI_LANES // OW if packed else 1  # output rows a packed vector joins
    # direct stores with Wq > OW: vector f of a task starts at output row f // vpr, and the
    # input position skips the row's gap columns
    gap = Wq - OW if direct and not packed else 0
    out_vector = f"{out_dtype}x{VNNI_LANES}"
    vpr = OW // VNNI_LANES if gap else 1
    o_blocks = -(-Og // OB)
    row_tasks = -(-OH // NR)
    tasks = B * G * o_blocks * row_tasks
    max_read = ((row_tasks - 1) * NR + (kh - 1) * dh // sh) * Wq + (kwid - 1) * dw // sw + max(span, NR * Wq)
    rows_alloc = max(Hq, -(-max_read // Wq))
    planes = G * c_groups
    # small inputs: each task stages the rows it reads on its own stack (task_rows_staging)
    task_rows = -(-(((kh - 1) * dh // sh) * Wq + (kwid - 1) * dw // sw + max(span, NR * Wq)) // Wq)
    own_staging = (tasks > 1 and staging_loop(geo) is T.serial
                   and c_groups * sh * sw * task_rows * Wq * 4 <= _TASK_STAGING_BYTES)
    # a task staging its rows runs several output-channel blocks on them: one task a row block,
    # two where the plane is one row block (each task stages its rows: a stride-2 ResNet-20 conv
    # staging its input four times took 16 us on one thread, 8.5 staging it once)
    ob_tasks = min(o_blocks, 1 if B * G * row_tasks > 1 else 2)
    obs_per_task = -(-o_blocks // ob_tasks)
    ob_tasks = -(-o_blocks // obs_per_task)
    stage = (task_rows_staging(geo, task_rows, pad_code) if own_staging
             else phase_staging(geo, rows_alloc, pad_code))
    if stage is None:
        return None
    R = task_rows if own_staging else rows_alloc  # staged rows a plane of the staging holds
    # AVX2 (two 256-bit halves a dot product): with the taps unrolled LLVM schedules every low
    # half first and spills the loaded codes and broadcast weights for the high halves (a 3x3
    # conv 32 -> 32 at 16x16: 1070 stack accesses, 55 us; a loop over the taps: 50, 26.5 us)
    tap_loop = T.unroll if accumulator_budget() >= 16 else T.serial
    P = max(1, min(knobs.int16_groups, c_groups))  # channel groups a dot4_sum adds (AVX2: in int16)

    def plane_start(at, cq, r, s):
        """Where the staged words of tap (r, s)'s phase, channels 4cq .. 4cq+3, begin (``at``: the
        task's batch, group, output-channel block and row block)."""
        plane = cq if own_staging else at[0] * planes + at[1] * c_groups + cq
        return ((plane * sh + r * dh % sh) * sw + s * dw % sw) * R * Wq

    def first_row(at):
        """The staged row of the task's first output row."""
        return 0 if own_staging else at[3] * NR

    def pixel_codes(xw, at, chunk, v, r, s, cq):
        """The codes of 16 output pixels' tap (r, s), input channels 4cq .. 4cq+3 (int8x64)."""
        if packed:
            row = first_row(at) + (chunk * V + v) * segments + r * dh // sh
            runs = [xw[T.ramp(plane_start(at, cq, r, s) + (row + g) * Wq + s * dw // sw, 1, OW)]
                    for g in range(segments)]
            width = OW
            while len(runs) > 1:  # join halves: 4 + 4 -> 8, 8 + 8 -> 16
                runs = [tirx.Shuffle([runs[i], runs[i + 1]], list(range(2 * width))) for i in range(0, len(runs), 2)]
                width *= 2
            return T.reinterpret("int8x64", runs[0])
        return T.reinterpret("int8x64", xw[T.ramp(plane_start(at, cq, r, s)
                                                 + (first_row(at) + r * dh // sh) * Wq + s * dw // sw
                                                 + (chunk * V + v) * VNNI_LANES + (chunk * V + v) // vpr * gap,
                                                 1, VNNI_LANES)])

    def channel_weights(ww, at, o, r, s, cq):
        """Output channel o's weight word of tap (r, s), channels 4cq .. 4cq+3, broadcast (int8x64)."""
        channel = T.min(at[2] * OB + o, n_tiles * VNNI_LANES - 1)
        word = ww[((at[1] * n_tiles + channel // VNNI_LANES) * k_groups
                   + (r * kwid + s) * c_groups + cq) * VNNI_LANES + channel % VNNI_LANES]
        return T.reinterpret("int8x64", T.broadcast(word, VNNI_LANES))

    @T.macro
    def task_body(at, xw, ww, y, yw, acc_offset, thresholds, base, flip, pos, neg):
        # at: the task's (batch, group, output-channel block, row block)
        tile = T.alloc_buffer((OB, span if not direct else 1), "int32", scope="local", annotations=_ON_STACK)
        acc = T.alloc_buffer((OB, V), "int32x16", scope="local", annotations=_ON_STACK)
        for chunk in range(NCH):
            for o in T.unroll(OB):
                for v in T.unroll(V):
                    acc[o, v] = T.broadcast(T.int32(0), VNNI_LANES)
            for r in tap_loop(kh):
                for s in tap_loop(kwid):
                    if P == 1:
                        for cq in range(c_groups):
                            for o in T.unroll(OB):
                                for v in T.unroll(V):
                                    acc[o, v] = dot4(acc[o, v], pixel_codes(xw, at, chunk, v, r, s, cq),
                                                     channel_weights(ww, at, o, r, s, cq))
                    else:
                        for cb in range(c_groups // P):
                            for o in T.unroll(OB):
                                for v in T.unroll(V):
                                    acc[o, v] = dot4_sum(acc[o, v], [
                                        (pixel_codes(xw, at, chunk, v, r, s, cb * P + j),
                                         channel_weights(ww, at, o, r, s, cb * P + j)) for j in range(P)])
                        if c_groups % P != 0:
                            for cq in range(c_groups - c_groups % P, c_groups):
                                for o in T.unroll(OB):
                                    for v in T.unroll(V):
                                        acc[o, v] = dot4(acc[o, v], pixel_codes(xw, at, chunk, v, r, s, cq),
                                                         channel_weights(ww, at, o, r, s, cq))
            if direct:
                # vector f is output run f (see _direct_rows); whole vectors up to OH * OW
                for o in T.unroll(OB):
                    for v in T.unroll(V):
                        if (at[2] * OB + o < Og
                                and at[3] * NR * OW + (chunk * V + v) * VNNI_LANES < OH * OW):
                            yw[T.ramp((at[0] * O
                                       + at[1] * Og
                                       + at[2] * OB + o) * OH * OW
                                      + at[3] * NR * OW + (chunk * V + v) * VNNI_LANES,
                                      1, VNNI_LANES)] = T.Cast(out_vector, acc[o, v])
            else:
                for o in T.unroll(OB):
                    for v in T.unroll(V):
                        tile[o, T.ramp(chunk * V * VNNI_LANES + v * VNNI_LANES, 1, VNNI_LANES)] = acc[o, v]
        if codes is not None:
            # the task's tile holds its channels' whole planes, flat (see conv_codes_fit)
            for o in range(OB):
                if at[2] * OB + o < Og:
                    _plane_codes(tile, o, codes, (acc_offset, thresholds, base, flip, pos, neg),
                                 at[0],
                                 at[1] * Og + at[2] * OB + o,
                                 O, OH * OW)
        elif not direct:
            for o in range(OB):
                if at[2] * OB + o < Og:
                    for rr in range(NR):
                        if at[3] * NR + rr < OH:
                            for ow in vector_loop(OW):
                                y[at[0],
                                  at[1] * Og + at[2] * OB + o,
                                  at[3] * NR + rr, ow] = T.Cast(out_dtype, tile[o, rr * pitch + ow])

    @T.macro
    def conv(x, w, y, acc_offset, thresholds, base, flip, pos, neg):
        ww = T.decl_buffer((G * n_tiles * k_groups * VNNI_LANES,), "int32", data=w.data)
        yw = T.decl_buffer((B * O * OH * OW,), out_dtype, data=(x if codes is not None else y).data)  # (codes: unused)
        if own_staging:
            for task in T.parallel(B * G * row_tasks * ob_tasks):
                xt = T.alloc_buffer((c_groups * sh * sw * task_rows * Wq,), "uint32", scope="local",
                                    annotations=_ON_STACK)
                stage(x, xt, task // (G * row_tasks * ob_tasks), task // (row_tasks * ob_tasks) % G,
                      task // ob_tasks % row_tasks * NR)
                for obi in range(obs_per_task):
                    if task % ob_tasks * obs_per_task + obi < o_blocks:
                        task_body((task // (G * row_tasks * ob_tasks), task // (row_tasks * ob_tasks) % G,
                                   task % ob_tasks * obs_per_task + obi, task // ob_tasks % row_tasks),
                                  xt, ww, y, yw, acc_offset, thresholds, base, flip, pos, neg)
        else:
            xs = T.alloc_buffer((B, planes, sh, sw, rows_alloc, Wq), "uint32")
            stage(x, xs)
            xw = T.decl_buffer((B * planes * sh * sw * rows_alloc * Wq,), "int32", data=xs.data)
            for task in T.parallel(tasks):
                task_body((task // (G * o_blocks * row_tasks), task // (o_blocks * row_tasks) % G,
                           task // row_tasks % o_blocks, task % row_tasks),
                          xw, ww, y, yw, acc_offset, thresholds, base, flip, pos, neg)

    w_t = T.Buffer((G, n_tiles, k_groups, 4 * VNNI_LANES), "int8")
    if codes is not None:
        if not conv_codes_fit(geo, plan):
            raise ValueError("a conv writes its codes where each task holds whole output planes (conv_codes_fit)")
        return codes_main((B, C, H, W), (B, O, OH, OW), w_t, codes,
                           lambda x, w, acc_offset, thresholds, base, flip, pos, neg: conv(
                               x, w, None, acc_offset, thresholds, base, flip, pos, neg))

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"), w: w_t, y: T.Buffer((B, O, OH, OW), out_dtype)):
        T.func_attr({"tir.noalias": True})
        conv(x, w, y, None, None, None, None, None, None)

    return main


def bitparallel_conv2d(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1,
                       knobs: BitparallelKnobs | None = None, int16_depthwise: bool = False,
                       out_dtype: str = "int32", tap_pairs: bool = False, pad_code: int = 0,
                       skip_when_done: bool = False) -> tirx.PrimFunc:
    """Bit-parallel NCHW conv2d on int8 weights (implicit GEMM with ``vpdpbusd``).

    Signature of the returned PrimFunc::

        main(x: uint8[B, C, H, W], w, y: int32[B, O, OH, OW])

    ``w`` is ``packing.pack_bitparallel_conv_weight(q, groups)``
    (``int8[G, ceil(Og/16), kh*kw*ceil(Cg/4), 64]``, K ordered (r, s, c)); for depthwise
    (``C/groups == 1``) it is ``int32[O, kh*kw]`` (``q.reshape(O, -1)``) for the direct kernel.
    The input is first copied to a zero-padded NHWC-like buffer ``[B, Hp, Wp, G, ceil(Cg/4)*4]``
    so that four consecutive channels form one int32 word for ``vpdpbusd``.
    ``int16_depthwise``: the caller guarantees every partial sum of a depthwise output fits
    int16 (e.g. 3-bit weights x 4-bit codes x 9 taps), so the direct kernel accumulates 32
    lanes per register.
    ``out_dtype`` ``int16``: ``y`` is int16, each accumulator narrowed as it is stored; the
    caller guarantees that every output fits (see ``csqc.targets.tvm.lower``): half the bytes
    written here and read by the epilogue. Depthwise convs only with ``int16_depthwise`` where
    :func:`depthwise_writes_int16`.
    ``pad_code``: the code padding reads as (0; offset codes ``code + L``: ``L``, so the
    caller's per-channel ``L * sum_k q[c, k]`` is exact at the borders too).
    ``skip_when_done`` (the fused depthwise kernel): a last parameter ``done: int32[1]``, and the
    kernel returns at once where it is not 0 (:func:`bitparallel_depthwise_saturated_codes` wrote
    the layer's codes).
    """
    if out_dtype not in ("int32", "int16"):
        raise ValueError(f"out_dtype must be int32 or int16, got {out_dtype!r}")
    knobs = knobs or BitparallelKnobs()
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW, G = geo.out_channels, geo.out_h, geo.out_w, geo.groups
    Hp, Wp = geo.padded_h, geo.padded_w
    ph, pw = geo.padding
    sh, sw = geo.stride
    dh, dw = geo.dilation
    kh, kwid = geo.kernel_h, geo.kernel_w

    if geo.is_depthwise:
        if out_dtype != "int32" and not (int16_depthwise and depthwise_writes_int16(geo)):
            raise ValueError("depthwise convs write int16 outputs only on the fused kernel (strides up to 2) "
                             "with int16 accumulation")
        taps = kh * kwid
        pad_copy = _make_pad_copy(geo, pad_code)

        def weight_of(weights, o, t, n_planes, zp):
            return weights[o, t]

        depthwise_fused = _make_depthwise_fused(geo, weight_of, "int16" if int16_depthwise else "int32", out_dtype,
                                                tap_pairs, pad_code=pad_code)
        if depthwise_fused is not None and skip_when_done:
            @T.prim_func
            def main_dw_skipping(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps), "int32"),
                                 y: T.Buffer((B, O, OH, OW), out_dtype), done: T.Buffer((1,), "int32")):
                T.func_attr({"tir.noalias": True})
                if done[0] == 0:
                    depthwise_fused(x, w, y, 0, 0)

            return main_dw_skipping
        if depthwise_fused is not None:
            @T.prim_func
            def main_dw_fused(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps), "int32"),
                              y: T.Buffer((B, O, OH, OW), out_dtype)):
                T.func_attr({"tir.noalias": True})
                depthwise_fused(x, w, y, 0, 0)

            return main_dw_fused
        if skip_when_done:
            raise ValueError("only the fused depthwise kernel (strides up to 2) skips when done")

        depthwise = _make_depthwise_direct(geo, weight_of)

        @T.prim_func
        def main_dw(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps), "int32"),
                    y: T.Buffer((B, O, OH, OW), "int32")):
            T.func_attr({"tir.noalias": True})
            x_padded = T.alloc_buffer((B, C, Hp, Wp), "uint8")
            pad_copy(x, x_padded)
            depthwise(x_padded, w, y, 0, 0)

        return main_dw

    if knobs.conv_form not in ("", "pixels", "channels"):
        raise ValueError(f"conv_form must be pixels, channels or empty, got {knobs.conv_form!r}")
    # Output pixels on the lanes wherever that kernel exists (strides up to 2). It wastes lanes
    # on small planes (a 7x7 plane fills 49 of 64), yet beat the channels-on-lanes kernel below
    # on every shape measured (Xeon, AVX-512 VNNI, one thread): ResNet-18's 3x3 convs at 14x14
    # and 7x7 by 1.26x-1.47x, MobileNetV2's 1x1 convs at 28x28 down to 7x7 by 1.2x-4.9x (short
    # K loops cost the channels kernel most), and equal on ResNet-20's. --tune still tries both.
    # Reductions of 2048 and more on planes of whole 7-position tiles are the exception
    # (channels_on_lanes_pay: Zen 5 measurements).
    if knobs.conv_form == "" and channels_on_lanes_pay(geo):
        knobs = replace(knobs, conv_form="channels", row_block=7)
    elif knobs.conv_form == "" and (small_rows := small_plane_row_block(geo)):
        knobs = replace(knobs, conv_form="channels", row_block=small_rows, col_vectors=4)
    if knobs.conv_form in ("", "pixels"):
        pixels = _bitparallel_conv2d_pixels(geo, knobs, out_dtype, pad_code=pad_code)
        if pixels is not None:
            return pixels

    # Output channels on the lanes: strides > 2 (more than 4 stride phases), or asked for.
    Cg, Og = geo.in_per_group, geo.out_per_group
    c_groups = -(-Cg // 4)          # int32 words of 4 channels per group and pixel
    words_per_pixel = G * c_groups
    n_tiles = -(-Og // VNNI_LANES)
    k_groups = kh * kwid * c_groups
    rows = B * OH * OW
    row_block = max(1, min(knobs.row_block, rows))
    row_blocks = -(-rows // row_block)
    col_vectors = max(1, min(knobs.col_vectors, n_tiles))
    col_blocks = -(-n_tiles // col_vectors)
    tasks = G * col_blocks * row_blocks
    padding_loop = staging_loop(geo)

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"),
             w: T.Buffer((G, n_tiles, k_groups, 4 * VNNI_LANES), "int8"),
             y: T.Buffer((B, O, OH, OW), out_dtype)):
        T.func_attr({"tir.noalias": True})
        x_nhwc = T.alloc_buffer((B, Hp, Wp, G, 4 * c_groups), "uint8")
        for bh in padding_loop(B * Hp):
            for wc in vector_loop(Wp * G * 4 * c_groups):
                x_nhwc[bh // Hp, bh % Hp, wc // (G * 4 * c_groups), wc // (4 * c_groups) % G,
                       wc % (4 * c_groups)] = T.uint8(pad_code)
            if ph <= bh % Hp and bh % Hp < H + ph:
                for c in range(C):
                    for col in range(W):
                        x_nhwc[bh // Hp, bh % Hp, col + pw, c // Cg, c % Cg] = \
                            x[bh // Hp, c, bh % Hp - ph, col]
        x_words = T.decl_buffer((B * Hp * Wp * words_per_pixel,), "int32", data=x_nhwc.data)
        for task in T.parallel(tasks):
            base = T.alloc_buffer((row_block,), "int32", scope="local", annotations=_ON_STACK)
            acc = T.alloc_buffer((row_block, col_vectors, VNNI_LANES), "int32", scope="local", annotations=_ON_STACK)
            for r in range(row_block):
                # Word offset of the top-left input pixel of output row (clamped) r.
                base[r] = (((T.min((task % row_blocks) * row_block + r, rows - 1) // (OH * OW)) * Hp
                            + T.min((task % row_blocks) * row_block + r, rows - 1) // OW % OH * sh) * Wp
                           + T.min((task % row_blocks) * row_block + r, rows - 1) % OW * sw) \
                    * words_per_pixel + task // (col_blocks * row_blocks) * c_groups
            for r in T.unroll(row_block):
                for cv in T.unroll(col_vectors):
                    for lane in T.vectorized(VNNI_LANES):
                        acc[r, cv, lane] = 0
            for rr in range(kh):
                for ss in range(kwid):
                    for cq in range(c_groups):
                        for cv in T.unroll(col_vectors):
                            for r in T.unroll(row_block):
                                acc[r, cv, T.ramp(0, 1, VNNI_LANES)] = _vnni(
                                    acc[r, cv, T.ramp(0, 1, VNNI_LANES)],
                                    x_words[base[r] + (rr * dh * Wp + ss * dw) * words_per_pixel + cq],
                                    w[task // (col_blocks * row_blocks),
                                      T.min(task // row_blocks % col_blocks * col_vectors + cv, n_tiles - 1),
                                      (rr * kwid + ss) * c_groups + cq,
                                      T.ramp(0, 1, 4 * VNNI_LANES)])
            for r in range(row_block):
                for cv in range(col_vectors):
                    for lane in range(VNNI_LANES):
                        if ((task % row_blocks) * row_block + r < rows
                                and (task // row_blocks % col_blocks * col_vectors + cv) * VNNI_LANES + lane < Og):
                            y[((task % row_blocks) * row_block + r) // (OH * OW),
                              task // (col_blocks * row_blocks) * Og
                              + (task // row_blocks % col_blocks * col_vectors + cv) * VNNI_LANES + lane,
                              ((task % row_blocks) * row_block + r) // OW % OH,
                              ((task % row_blocks) * row_block + r) % OW] = T.Cast(out_dtype, acc[r, cv, lane])

    return main
