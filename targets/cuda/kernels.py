"""CUDA kernels of csqc: bit-serial and bit-parallel dense and conv2d (TE compute + GPU schedule).

Same semantics and Python signatures as ``csqc.targets.llvm.kernels``: weights are planes,
``q[n, k] = sum_p sign_p 2^shift_p plane_p[n, k] - zero_point`` (most significant first),
activations are unsigned codes ``x[m, k]``, and each kernel computes the exact integer
``acc[m, n] = sum_k x[m, k] q[n, k]``.  Bit-serial kernels take the run-time ``n_planes``
argument (only planes ``p < n_planes`` count; the zero-point correction always does).

Every kernel is two pieces, kept apart on purpose:

* ``*_compute(...)`` builds the *unscheduled* PrimFunc from ``te.compute`` stages.  It runs on
  any target; the tests build it for LLVM and compare it exactly with numpy.
* the builder (``bitserial_dense`` etc.) schedules that same PrimFunc for the GPU (block/thread
  bindings, shared memory, warp reductions) without changing a single expression.

Schedules
---------
* bit-serial dense (batch-1 GEMV, PrecisionBatching): a kernel packs the activation codes into
  bit-planes ``[M, A, KW]`` (uint32, the CPU bit order).  The product kernel gives each output a
  group of up to 32 threads (one warp) that split its K words; the activation planes of the row
  are staged in shared memory; each thread loads one weight word into a register and ANDs it
  with all ``A`` activation planes (the activation bits are the rows of a binary matrix product,
  so each weight word is reused ``A`` times), ``__popc`` on uint32 words, then a warp-shuffle
  reduction over K.
* bit-serial conv2d: the pack kernel does the im2col gather into planes ``[G, A, KW, rows]``
  (consecutive output pixels are consecutive words: coalesced).  The product is a tiled GEMM:
  a block covers a tile of output pixels x output channels, each thread a register tile; the
  packed weight planes of the block's channels are staged through shared memory per chunk of
  K words and reused by every pixel of the tile.
* bit-parallel dense/conv2d: int8 weights (the CPU layouts, which the runtime re-packs for
  ``skip_planes``) times uint8 codes with int32 multiply-adds in the same tiled schedule, the
  weight tile in shared memory.
* depthwise (one input channel per group): a direct kernel, one output per thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import tvm
from tvm import te, tirx

from csqc.targets.tvm.geometry import ConvGeometry, conv_geometry

from .packing import VNNI_LANES, WORD_BITS, words_for

__all__ = [
    "TileKnobs",
    "BitserialKnobs",
    "BitparallelKnobs",
    "GPU_LIMITS",
    "bitserial_dense_compute",
    "bitserial_conv2d_compute",
    "bitparallel_dense_compute",
    "bitparallel_conv2d_compute",
    "bitserial_dense",
    "bitserial_conv2d",
    "bitparallel_dense",
    "bitparallel_conv2d",
    "schedule_pointwise",
    "lower_for_verification",
    "verify_gpu",
]

WARP = 32
# The limits every scheduled kernel is verified against (all CUDA GPUs since sm_70 meet them).
GPU_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024,
              "max_thread_x": 1024, "max_thread_y": 1024, "max_thread_z": 64, "max_vthread": 1}


# --------------------------------------------------------------------------------------------
# Knobs (the schedule space)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileKnobs:
    """Tiled GEMM schedule (conv and bit-parallel): a block is ``row_threads x col_threads``
    threads, each owning ``rows_per_thread x cols_per_thread`` outputs in registers; the weight
    tile is staged in shared memory per ``k_chunk`` steps of the chunked reduction axis."""

    row_threads: int = 32
    rows_per_thread: int = 2
    col_threads: int = 8
    cols_per_thread: int = 4
    k_chunk: int = 8


@dataclass(frozen=True)
class BitserialKnobs:
    """Schedule knobs of the bit-serial kernels.

    lanes: weight layout parameter read by the planner; the GPU layout keeps each output's
        words contiguous, so it is always 1.
    block_threads: threads per block of the GEMV product (outputs per block = this / 32).
    tile: tiled schedule of the conv product.
    """

    lanes: int = 1
    block_threads: int = 256
    tile: TileKnobs = field(default_factory=TileKnobs)


@dataclass(frozen=True)
class BitparallelKnobs:
    """Schedule knobs of the bit-parallel kernels (the tiled schedule)."""

    tile: TileKnobs = field(default_factory=lambda: TileKnobs(k_chunk=16))


# --------------------------------------------------------------------------------------------
# Shared compute helpers
# --------------------------------------------------------------------------------------------
def _check_planes(shifts_signs, act_bits: int, acc_dtype: str) -> list[tuple[int, int]]:
    if not shifts_signs:
        raise ValueError("at least one weight plane is required")
    planes = [(int(s), int(g)) for s, g in shifts_signs]
    for shift, sign in planes:
        if sign not in (1, -1) or not 0 <= shift <= 15:
            raise ValueError(f"invalid plane (shift={shift}, sign={sign})")
    if not 1 <= act_bits <= 8:
        raise ValueError(f"act_bits must be 1..8, got {act_bits}")
    if acc_dtype not in ("int32", "int64"):
        raise ValueError(f"acc_dtype must be int32 or int64, got {acc_dtype}")
    return planes


def _coefficient(p, shifts_signs, dtype: str):
    """``sign_p * 2^shift_p`` of plane ``p`` (constant once the plane loop is unrolled)."""
    expr = tirx.const(0, dtype)
    for index in reversed(range(len(shifts_signs))):
        shift, sign = shifts_signs[index]
        expr = tirx.Select(p == index, tirx.const(sign * (1 << shift), dtype), expr)
    return expr


def _bitserial_term(weight_word, act_word, p, j, shifts_signs, n_planes, zero_point,
                    with_zero_point: bool, acc_dtype: str):
    """One (plane, K word, activation bit) term of the bit-serial product.

    Planes at or after ``n_planes`` contribute nothing (lazy ``if_then_else``: their weight
    words are not loaded); the offset encoding's ``-zero_point * sum_k x`` is folded in as
    ``popcount`` of the activation word, counted once (plane 0) whatever ``n_planes`` is.
    """
    count = tirx.Cast(acc_dtype, tirx.popcount(weight_word & act_word))
    term = tirx.if_then_else(p < n_planes, _coefficient(p, shifts_signs, acc_dtype) * count,
                             tirx.const(0, acc_dtype))
    if with_zero_point:
        ones = tirx.Cast(acc_dtype, tirx.popcount(act_word))
        term = term - tirx.Select(p == 0, tirx.Cast(acc_dtype, zero_point) * ones, tirx.const(0, acc_dtype))
    return term << tirx.Cast(acc_dtype, j)


def _bit_at(code, j, b):
    """Bit ``j`` of a uint8 code moved to bit ``b`` of a uint32 word."""
    word = tirx.Cast("uint32", code)
    return ((word >> tirx.Cast("uint32", j)) & tirx.const(1, "uint32")) << tirx.Cast("uint32", b)


def _padded(x: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """Zero-bordered input (code 0 is value 0, so padding is exact); inlined on the GPU."""
    ph, pw = geo.padding

    def value(n, c, h, w):
        inside = tirx.all(h >= ph, h < geo.height + ph, w >= pw, w < geo.width + pw)
        return tirx.if_then_else(inside, x[n, c, tirx.max(tirx.min(h - ph, geo.height - 1), 0),
                                           tirx.max(tirx.min(w - pw, geo.width - 1), 0)],
                                 tirx.const(0, x.dtype))

    return te.compute((geo.batch, geo.in_channels, geo.padded_h, geo.padded_w), value, name="x_padded")


def _row_pixel(r, geo: ConvGeometry):
    """(batch, oh, ow) of implicit-GEMM row ``r``."""
    return r // (geo.out_h * geo.out_w), r // geo.out_w % geo.out_h, r % geo.out_w


def _nchw_view(acc: te.Tensor, geo: ConvGeometry, dtype: str) -> te.Tensor:
    """The ``[rows, O]`` product as the NCHW output (inlined into the product on the GPU)."""
    return te.compute((geo.batch, geo.out_channels, geo.out_h, geo.out_w),
                      lambda n, o, oh, ow: acc[(n * geo.out_h + oh) * geo.out_w + ow, o].astype(dtype), name="y")


# --------------------------------------------------------------------------------------------
# Unscheduled computes
# --------------------------------------------------------------------------------------------
def bitserial_dense_compute(M: int, N: int, K: int, shifts_signs: Sequence[tuple[int, int]], act_bits: int,
                            zero_point: bool, acc_dtype: str = "int32") -> tirx.PrimFunc:
    """``main(x: uint8[M, K], w_planes: uint32[N, P, KW], n_planes, zero_point, y: acc[M, N])``."""
    planes = _check_planes(shifts_signs, act_bits, acc_dtype)
    P, A, KW = len(planes), act_bits, words_for(K)
    x = te.placeholder((M, K), "uint8", name="x")
    w = te.placeholder((N, P, KW), "uint32", name="w_planes")
    n_planes, zp = tirx.Var("n_planes", "int32"), tirx.Var("zero_point", "int32")
    b = te.reduce_axis((0, WORD_BITS), "b")
    xp = te.compute(
        (M, A, KW),
        lambda m, j, wd: te.sum(tirx.if_then_else(
            b * KW + wd < K, _bit_at(x[m, tirx.min(b * KW + wd, K - 1)], j, b), tirx.const(0, "uint32")), axis=b),
        name="act_planes")
    p, wd, j = te.reduce_axis((0, P), "p"), te.reduce_axis((0, KW), "wd"), te.reduce_axis((0, A), "j")
    y = te.compute(
        (M, N),
        lambda m, n: te.sum(_bitserial_term(w[n, p, wd], xp[m, j, wd], p, j, planes, n_planes, zp,
                                            bool(zero_point), acc_dtype), axis=[p, wd, j]),
        name="y")
    return te.create_prim_func([x, w, n_planes, zp, y])


def bitserial_conv2d_compute(input_shape, weight_shape, shifts_signs, act_bits: int, zero_point: bool,
                             stride=1, padding=0, dilation=1, groups=1, acc_dtype: str = "int32") -> tirx.PrimFunc:
    """``main(x: uint8[B, C, H, W], w_planes, n_planes, zero_point, y: acc[B, O, OH, OW])``;
    ``w_planes`` is ``uint32[O, P, KW]`` (K = (c, r, s) per group) or, depthwise,
    ``uint8[O, P, kh*kw]``."""
    planes = _check_planes(shifts_signs, act_bits, acc_dtype)
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    P, A = len(planes), act_bits
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    kh, kwid = geo.kernel_h, geo.kernel_w
    x = te.placeholder((geo.batch, geo.in_channels, geo.height, geo.width), "uint8", name="x")
    n_planes, zp = tirx.Var("n_planes", "int32"), tirx.Var("zero_point", "int32")
    xpad = _padded(x, geo)
    out_shape = (geo.batch, geo.out_channels, geo.out_h, geo.out_w)

    if geo.is_depthwise:
        if acc_dtype != "int32":
            raise ValueError("the depthwise direct kernel accumulates in int32")
        taps = kh * kwid
        w = te.placeholder((geo.out_channels, P, taps), "uint8", name="w_planes")
        p = te.reduce_axis((0, P), "p")

        def weight(o, t):
            term = tirx.if_then_else(p < n_planes, _coefficient(p, planes, "int32") * w[o, p, t].astype("int32"),
                                     tirx.const(0, "int32"))
            if zero_point:
                term = term - tirx.Select(p == 0, zp, tirx.const(0, "int32"))
            return te.sum(term, axis=p)

        q = te.compute((geo.out_channels, taps), weight, name="q")
        r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kwid), "s")
        y = te.compute(out_shape, lambda n, o, oh, ow: te.sum(
            xpad[n, o // geo.out_per_group, oh * sh + r * dh, ow * sw + s * dw].astype("int32") * q[o, r * kwid + s],
            axis=[r, s]), name="y")
        return te.create_prim_func([x, w, n_planes, zp, y])

    K, KW, Cg, Og = geo.reduction, words_for(geo.reduction), geo.in_per_group, geo.out_per_group
    rows = geo.batch * geo.out_h * geo.out_w
    w = te.placeholder((geo.out_channels, P, KW), "uint32", name="w_planes")
    b = te.reduce_axis((0, WORD_BITS), "b")

    def pack(g, j, wd, r):
        k = tirx.min(b * KW + wd, K - 1)
        n, oh, ow = _row_pixel(r, geo)
        code = xpad[n, g * Cg + k // (kh * kwid), oh * sh + k // kwid % kh * dh, ow * sw + k % kwid * dw]
        return te.sum(tirx.if_then_else(b * KW + wd < K, _bit_at(code, j, b), tirx.const(0, "uint32")), axis=b)

    xp = te.compute((geo.groups, A, KW, rows), pack, name="act_planes")
    p, wd, j = te.reduce_axis((0, P), "p"), te.reduce_axis((0, KW), "wd"), te.reduce_axis((0, A), "j")
    acc = te.compute((rows, geo.out_channels), lambda r, o: te.sum(
        _bitserial_term(w[o, p, wd], xp[o // Og, j, wd, r], p, j, planes, n_planes, zp, bool(zero_point), acc_dtype),
        axis=[p, wd, j]), name="acc")
    return te.create_prim_func([x, w, n_planes, zp, _nchw_view(acc, geo, acc_dtype)])


def bitparallel_dense_compute(M: int, N: int, K: int) -> tirx.PrimFunc:
    """``main(x: uint8[M, K], w: int8[ceil(N/16), ceil(K/4), 64], y: int32[M, N])`` (CPU layout)."""
    x = te.placeholder((M, K), "uint8", name="x")
    w = te.placeholder((-(-N // VNNI_LANES), -(-K // 4), 4 * VNNI_LANES), "int8", name="w")
    k = te.reduce_axis((0, K), "k")
    y = te.compute((M, N), lambda m, n: te.sum(
        x[m, k].astype("int32") * w[n // VNNI_LANES, k // 4, n % VNNI_LANES * 4 + k % 4].astype("int32"), axis=k),
        name="y")
    return te.create_prim_func([x, w, y])


def bitparallel_conv2d_compute(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1) -> tirx.PrimFunc:
    """``main(x: uint8[B, C, H, W], w, y: int32[B, O, OH, OW])`` with the CPU weight layouts:
    ``int8[G, ceil(Og/16), kh*kw*ceil(Cg/4), 64]`` (K = (r, s, c)), or ``int32[O, kh*kw]``
    for depthwise."""
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    kh, kwid, Cg, Og = geo.kernel_h, geo.kernel_w, geo.in_per_group, geo.out_per_group
    x = te.placeholder((geo.batch, geo.in_channels, geo.height, geo.width), "uint8", name="x")
    xpad = _padded(x, geo)
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kwid), "s")
    if geo.is_depthwise:
        w = te.placeholder((geo.out_channels, kh * kwid), "int32", name="w")
        y = te.compute((geo.batch, geo.out_channels, geo.out_h, geo.out_w), lambda n, o, oh, ow: te.sum(
            xpad[n, o // Og, oh * sh + r * dh, ow * sw + s * dw].astype("int32") * w[o, r * kwid + s],
            axis=[r, s]), name="y")
        return te.create_prim_func([x, w, y])
    c_words = -(-Cg // 4)
    w = te.placeholder((geo.groups, -(-Og // VNNI_LANES), kh * kwid * c_words, 4 * VNNI_LANES), "int8", name="w")
    c = te.reduce_axis((0, Cg), "c")

    def product(row, o):
        n, oh, ow = _row_pixel(row, geo)
        g, og = o // Og, o % Og
        code = xpad[n, g * Cg + c, oh * sh + r * dh, ow * sw + s * dw]
        weight = w[g, og // VNNI_LANES, (r * kwid + s) * c_words + c // 4, og % VNNI_LANES * 4 + c % 4]
        return te.sum(code.astype("int32") * weight.astype("int32"), axis=[r, s, c])

    acc = te.compute((geo.batch * geo.out_h * geo.out_w, geo.out_channels), product, name="acc")
    return te.create_prim_func([x, w, _nchw_view(acc, geo, "int32")])


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _read_index(sch, block, name: str) -> int:
    for i, region in enumerate(sch.get(block).reads):
        if region.source.name == name:
            return i
    raise ValueError(f"block reads no buffer {name!r}")


def _loop_extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def schedule_pointwise(sch, block, threads: int = 256) -> None:
    """One output per thread: fuse the spatial loops, ``threads`` per block; any reduction
    loops of the block stay serial inside the thread."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.DataPar]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    threads = min(threads, _pow2_ceil(_loop_extent(sch, fused)))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _cooperative_fetch(sch, cache_block, first_inner: int, ty: int, tx: int) -> None:
    """Bind the copy loops of a shared-memory stage to the block's threads (a stage of one
    element, whose unit loops TVM dropped, gets a unit loop: one thread copies it)."""
    loops = sch.get_loops(cache_block)[first_inner:]
    if not loops:
        loops = [sch.add_unit_loop(cache_block)]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ly, lx = sch.split(fused, [None, ty, tx])
    sch.bind(ly, "threadIdx.y")
    sch.bind(lx, "threadIdx.x")


def _schedule_gemv(sch, knobs: BitserialKnobs, act_words: int) -> None:
    """Bit-serial dense product: one output per thread group splitting K (warp reduction)."""
    block = sch.get_sblock("y")
    m, n, p, wd, j = sch.get_loops(block)
    tk = min(WARP, _pow2_ceil(_loop_extent(sch, wd)))
    ny = max(1, min(knobs.block_threads // tk, _pow2_ceil(_loop_extent(sch, n))))
    wo, wi = sch.split(wd, [None, tk])
    no, ni = sch.split(n, [None, ny])
    sch.reorder(m, no, ni, wi, p, wo, j)
    sch.bind(m, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(ni, "threadIdx.y")
    sch.bind(wi, "threadIdx.x")  # cross-thread (warp shuffle) reduction over K words
    if act_words * 4 <= GPU_LIMITS["max_shared_memory_per_block"]:
        shared = sch.cache_read(block, _read_index(sch, block, "act_planes"), "shared")
        sch.compute_at(shared, no)
        _cooperative_fetch(sch, shared, 2, ny, tk)
    # One register per weight word, reused by all activation bits (PrecisionBatching).
    word = sch.cache_read(block, _read_index(sch, block, "w_planes"), "local")
    sch.compute_at(word, wo)
    sch.unroll(p)
    sch.unroll(j)


def _word_chunk(extent: int, limit: int, word: int) -> int:
    """The largest divisor of ``extent`` up to ``limit`` that holds whole weight words of
    ``word`` elements, else ``extent`` (one chunk): a chunk that cuts a word (22 = 2 x 11 of
    4-element words) makes the staged tile's extent depend on the chunk, which TVM cannot lower."""
    fits = [d for d in range(word, min(extent, limit) + 1, word) if extent % d == 0]
    return max(fits) if fits else extent


def _schedule_tiled(sch, block_name: str, chunk_axis: int, weight: str, tile: TileKnobs,
                    group_cols: int, output_view: str | None, word: int = 1) -> None:
    """Tiled GEMM schedule of a ``[rows, cols]`` product block with reduction loops.

    ``chunk_axis`` (index among the reduction loops) is split by ``tile.k_chunk`` into chunks of
    whole ``word``-element weight words (:func:`_word_chunk`); the weight tile for one chunk is
    staged in shared memory.  Column tiles never straddle a group of ``group_cols`` columns.
    ``output_view`` names an NCHW view of the product to inline.
    """
    block = sch.get_sblock(block_name)
    loops = sch.get_loops(block)
    row, col, reductions = loops[0], loops[1], list(loops[2:])
    rows = _loop_extent(sch, row)
    col_tile = _largest_divisor(group_cols, tile.col_threads * tile.cols_per_thread)
    vc = _largest_divisor(col_tile, tile.cols_per_thread)
    ty = col_tile // vc
    vr = max(1, min(tile.rows_per_thread, rows))
    tx = max(1, min(tile.row_threads, _pow2_ceil(-(-rows // vr)), GPU_LIMITS["max_threads_per_block"] // ty))
    r0, r1, r2 = sch.split(row, [None, tx, vr])
    c0, c1, c2 = sch.split(col, [None, ty, vc])
    chunk = _word_chunk(_loop_extent(sch, reductions[chunk_axis]), tile.k_chunk, word)
    ko, ki = sch.split(reductions[chunk_axis], [None, chunk])
    outer = reductions[:chunk_axis] + [ko]
    inner = [ki] + reductions[chunk_axis + 1:]
    sch.reorder(r0, c0, r1, c1, *outer, *inner, r2, c2)
    sch.bind(r0, "blockIdx.x")
    sch.bind(c0, "blockIdx.y")
    sch.bind(r1, "threadIdx.x")
    sch.bind(c1, "threadIdx.y")
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, c1)
    if output_view:
        sch.reverse_compute_inline(sch.get_sblock(output_view))
    shared = sch.cache_read(block, _read_index(sch, block, weight), "shared")
    sch.compute_at(shared, outer[-1])
    _cooperative_fetch(sch, shared, 4 + len(outer), ty, tx)
    sch.decompose_reduction(block, outer[0])
    for lp in inner + [r2, c2]:
        sch.unroll(lp)


def _inline_padding(sch) -> None:
    try:
        sch.compute_inline(sch.get_sblock("x_padded"))
    except tvm.error.TVMError:  # pragma: no cover - no padding stage in this kernel
        pass


def _schedule(func: tirx.PrimFunc):
    import tvm.s_tir as s_tir

    return s_tir.Schedule(func)


# --------------------------------------------------------------------------------------------
# Builders (the planner's API; same signatures as the CPU kernels)
# --------------------------------------------------------------------------------------------
def bitserial_dense(M: int, N: int, K: int, shifts_signs: Sequence[tuple[int, int]], act_bits: int,
                    zero_point: bool, acc_dtype: str = "int32",
                    knobs: BitserialKnobs | None = None) -> tirx.PrimFunc:
    """Scheduled bit-serial dense kernel; see :func:`bitserial_dense_compute` for the signature
    (weights from ``cuda.packing.pack_weight_planes``)."""
    knobs = knobs or BitserialKnobs()
    sch = _schedule(bitserial_dense_compute(M, N, K, shifts_signs, act_bits, zero_point, acc_dtype))
    schedule_pointwise(sch, sch.get_sblock("act_planes"))
    _schedule_gemv(sch, knobs, act_bits * words_for(K))
    return sch.mod["main"]


def bitserial_conv2d(input_shape, weight_shape, shifts_signs: Sequence[tuple[int, int]], act_bits: int,
                     zero_point: bool, stride=1, padding=0, dilation=1, groups=1,
                     acc_dtype: str = "int32", knobs: BitserialKnobs | None = None) -> tirx.PrimFunc:
    """Scheduled bit-serial NCHW conv2d; see :func:`bitserial_conv2d_compute` (weights from
    ``cuda.packing.pack_conv_weight_planes``, or ``pack_depthwise_weight_planes``)."""
    knobs = knobs or BitserialKnobs()
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    sch = _schedule(bitserial_conv2d_compute(input_shape, weight_shape, shifts_signs, act_bits, zero_point,
                                             stride, padding, dilation, groups, acc_dtype))
    _inline_padding(sch)
    if geo.is_depthwise:
        schedule_pointwise(sch, sch.get_sblock("q"))
        schedule_pointwise(sch, sch.get_sblock("y"))
        return sch.mod["main"]
    schedule_pointwise(sch, sch.get_sblock("act_planes"))
    _schedule_tiled(sch, "acc", 1, "w_planes", knobs.tile, geo.out_per_group, "y")
    return sch.mod["main"]


def bitparallel_dense(M: int, N: int, K: int, weight_dtype: str = "int8", acc_dtype: str = "int32",
                      knobs: BitparallelKnobs | None = None) -> tirx.PrimFunc:
    """Scheduled bit-parallel dense kernel on int8 weights (``packing.pack_bitparallel_weight``)."""
    if weight_dtype != "int8" or acc_dtype != "int32":
        raise ValueError("the CUDA bit-parallel kernels take int8 weights and accumulate in int32")
    knobs = knobs or BitparallelKnobs()
    sch = _schedule(bitparallel_dense_compute(M, N, K))
    _schedule_tiled(sch, "y", 0, "w", knobs.tile, N, None, word=4)  # int8 weights, 4 a word
    return sch.mod["main"]


def bitparallel_conv2d(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1,
                       knobs: BitparallelKnobs | None = None) -> tirx.PrimFunc:
    """Scheduled bit-parallel NCHW conv2d (``packing.pack_bitparallel_conv_weight``; depthwise:
    ``int32[O, kh*kw]``)."""
    knobs = knobs or BitparallelKnobs()
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    sch = _schedule(bitparallel_conv2d_compute(input_shape, weight_shape, stride, padding, dilation, groups))
    _inline_padding(sch)
    if geo.is_depthwise:
        schedule_pointwise(sch, sch.get_sblock("y"))
        return sch.mod["main"]
    _schedule_tiled(sch, "acc", 2, "w", knobs.tile, geo.out_per_group, "y", word=4)
    return sch.mod["main"]


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
def lower_for_verification(func: tirx.PrimFunc, target) -> tirx.PrimFunc:
    """The scheduled function lowered to flat TIR with explicit thread extents and shared
    allocations (the form ``verify_gpu_code`` checks), before host/device splitting: the first
    passes of ``tvm.s_tir.pipeline.default_s_tir_pipeline``, in its order."""
    import tvm.s_tir as s_tir

    mod = tvm.IRModule({"main": func.with_attr("target", target)})
    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerCrossThreadReduction(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.LiftThreadBinding(),
        s_tir.transform.ManifestSharedMemoryLocalStage(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerAutoCopy(),
        s_tir.transform.UnifyThreadBinding(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
    ]
    with target:
        return tvm.ir.transform.Sequential(passes)(mod)["main"]


def verify_gpu(func: tirx.PrimFunc, target, limits: dict | None = None) -> bool:
    """``verify_gpu_code`` of a scheduled kernel under ``limits`` (default :data:`GPU_LIMITS`)."""
    import tvm.s_tir as s_tir

    return bool(s_tir.analysis.verify_gpu_code(lower_for_verification(func, target), limits or GPU_LIMITS))
