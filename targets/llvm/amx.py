"""Bit-parallel dense and conv kernels on Intel AMX tiles (Sapphire Rapids and later).

At many rows a bit-parallel layer is compute bound, and AVX-512 VNNI does 64 multiply-adds per
instruction where one AMX ``tdpbusd`` does 16 x 16 x 64 = 16384 (16 cycles: ~16x the VNNI rate
of a core). ONNX Runtime uses AMX on such CPUs, so csqc must too (issue 16, item 5).

The weights need no layout of their own: ``packing.pack_bitparallel_weight``'s
``w[N/16, K/4, 64]`` (16 outputs x 4 consecutive k per 64-byte row) is the VNNI-grouped layout
``tdpbusd`` wants for its second operand, so a B tile (16 rows: 64 k x 16 outputs) is 1 KiB of
``w`` read with a 64-byte stride, and the activation codes ``x[M, K]`` are A tiles as they lie
(16 rows x 64 k, stride K). Every task computes one 64-output block for all rows: tile
registers 0-3 accumulate 16 rows x 64 outputs, 4 holds the codes, 5-7 the weights; the block's
weights (64 x K bytes) stay in the core's caches across the row blocks.

Linux grants the tile registers per process (``arch_prctl(ARCH_REQ_XCOMP_PERM)``): without it
the first tile instruction raises SIGILL, so everything that runs these kernels calls
:func:`request_tile_permission` first (``csqc.runtime`` does when it loads an artifact built
with them). Exact: integer products and sums, the same accumulators as the VNNI kernel.

Convolutions (:func:`amx_conv2d`) turn the operands around: ``tdpbsud`` takes signed weights as
the first operand, 16 output channels x 64 input channels of one tap (``conv_rows`` layout:
``w[O, taps, 4*ceil(C/4)]``, rows of one output channel), and the codes staged as in the VNNI
pixel kernel (``staging.phase_staging``: words of 4 channels, one plane per channel group) as the
second, 16 channel groups x 16 consecutive output columns of one row, so an accumulator tile is
16 output channels x 16 columns of one NCHW output row and is stored where it belongs.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from csqc.targets.tvm.geometry import ConvGeometry, conv_geometry

from .codes_main import ConvCodes, codes_main
from .host import host_has_amx, request_tile_permission  # (here for callers of amx; the runtime imports .host)
from .staging import phase_pairs, phase_staging

__all__ = ["amx_conv2d", "amx_conv_fits", "amx_dense", "amx_dense_epilogue", "amx_dense_fits", "amx_pointwise_codes",
           "amx_pointwise_codes_fits", "host_has_amx",
           "request_tile_permission", "target_has_amx"]

_TILE_ROWS, _TILE_BYTES = 16, 64  # a tile register: 16 rows of 64 bytes
_BLOCK_OUTPUTS = 64  # outputs per task: four accumulator tiles of 16 int32 columns
# Below this many multiply-adds a kernel runs on the calling thread: tiles do ~1000 a cycle, so
# a few million take a microsecond or two, less than a fork-join of the thread pool (ResNet-20's
# 32x32 convs, 2.4 M each: 12-14 us on two threads). kernels.SERIAL_DENSE_MACS, scaled to tiles.
SERIAL_TILE_MACS = 1 << 23
# ... unless it stores this many int32 sums (256 KiB) or more (amx._amx_pointwise_conv), or
# writes this many codes (amx_pointwise_codes)
_PARALLEL_TILE_STORES = 1 << 16
_PARALLEL_TILE_CODES = 1 << 15


def _task_loop(macs: int, outputs: int = 0, parallel_outputs: int = 0):
    """``T.parallel`` from SERIAL_TILE_MACS multiply-adds, or from ``parallel_outputs`` outputs
    (stored sums or codes) where that is given, else ``T.serial``."""
    if macs >= SERIAL_TILE_MACS or (parallel_outputs and outputs >= parallel_outputs):
        return T.parallel
    return T.serial


def target_has_amx(target) -> bool:
    """Whether an LLVM target (its CPU name and ``-mattr``) has AMX-INT8 tiles."""
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(["amx-tile", "amx-int8"], target))


def amx_dense_fits(M: int, N: int, K: int) -> bool:
    """Whether :func:`amx_dense` takes this shape (whole tiles along N and K)."""
    return M >= 1 and N % _BLOCK_OUTPUTS == 0 and K % _TILE_BYTES == 0


def _tile(name: str, *args):
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _tile_configuration(row_bytes, rows):
    """A macro ``configure(cfg, size)`` loading palette 1 with tile t (0..7) of ``rows(t, size)``
    rows of ``row_bytes(t, size)`` bytes (``cfg``: a 64-byte scratch buffer). The configuration
    is per thread: every task loads its own."""
    @T.macro
    def configure(cfg, size):
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)
        for t in range(8):
            cfg[16 + 2 * t] = T.Cast("uint8", row_bytes(t, size))
            cfg[48 + t] = T.Cast("uint8", rows(t, size))
        _tile("ldtilecfg", T.address_of(cfg[0]))

    return configure


def amx_dense(M: int, N: int, K: int) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * q[n, k]`` on AMX tiles, the signature of
    ``kernels.bitparallel_dense`` with int8 weights::

        main(x: uint8[M, K], w: int8[N/16, K/4, 64], y: int32[M, N])

    Needs ``N % 64 == 0`` and ``K % 64 == 0`` (:func:`amx_dense_fits`); any M (the last row
    block loads and stores ``M % 16`` rows). From 32 rows: :func:`_amx_dense_square`.
    """
    if not amx_dense_fits(M, N, K):
        raise ValueError(f"amx_dense needs N % {_BLOCK_OUTPUTS} == 0 and K % {_TILE_BYTES} == 0, got {M}x{N}x{K}")
    if M >= 2 * _TILE_ROWS:
        return _amx_dense_square(M, N, K)
    n_tiles, k_groups, k_tiles = N // 16, K // 4, K // _TILE_BYTES
    full_blocks, tail_rows = divmod(M, _TILE_ROWS)
    blocks = N // _BLOCK_OUTPUTS
    task_loop = _task_loop(M * N * K)

    # tiles 0-4 (accumulators, codes) hold `rows` rows, 5-7 (weights) 16; 64 bytes each
    configure = _tile_configuration(lambda t, rows: _TILE_BYTES, lambda t, rows: T.Select(t < 5, rows, _TILE_ROWS))

    @T.macro
    def row_block(x, w, y, block, m0):
        for t in T.unroll(4):
            _tile("tilezero", T.Cast("int8", t))
        for kt in range(k_tiles):
            _tile("tileloadd64", T.int8(4), T.address_of(x[m0, kt * _TILE_BYTES]), T.int64(K))
            for t in T.unroll(4):
                _tile("tileloadd64", T.Cast("int8", 5 + t % 3),
                      T.address_of(w[block * 4 + t, kt * _TILE_ROWS, 0]), T.int64(_TILE_BYTES))
                _tile("tdpbusd", T.Cast("int8", t), T.int8(4), T.Cast("int8", 5 + t % 3))
        for t in T.unroll(4):
            _tile("tilestored64", T.Cast("int8", t), T.address_of(y[m0, block * _BLOCK_OUTPUTS + t * 16]),
                  T.int64(4 * N))

    @T.prim_func
    def main(x: T.Buffer((M, K), "uint8"), w: T.Buffer((n_tiles, k_groups, 64), "int8"),
             y: T.Buffer((M, N), "int32")):
        T.func_attr({"tir.noalias": True})
        for block in task_loop(blocks):
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            if full_blocks > 0:
                configure(cfg, _TILE_ROWS)
                for mb in range(full_blocks):
                    row_block(x, w, y, block, mb * _TILE_ROWS)
            if tail_rows > 0:
                configure(cfg, tail_rows)
                row_block(x, w, y, block, full_blocks * _TILE_ROWS)
            _tile("tilerelease")

    return main


def amx_dense_epilogue(M: int, N: int, K: int, epilogue) -> tirx.PrimFunc:
    """:func:`amx_dense` and the layer's float epilogue in one kernel: each 32-output block's
    accumulators go from the tiles to a 4 KiB stack buffer (up to 32 rows at a time) and through
    ``epilogue`` (a ``glue.TileEpilogue``: ``glue.epilogue``'s chain, the same expression) into
    the float output, so the int32 accumulators (4 bytes an output, written and read back by a
    separate epilogue) never leave the core::

        main(x: uint8[M, K], w: int8[N/16, K/4, 64], <epilogue.params(N)>, y: float32[M, N])

    Needs :func:`amx_dense_fits`. Tiles 0-3 accumulate 2 x 2 (or 1 x 2) tiles, 4-5 hold codes,
    6-7 weights, as in :func:`_amx_dense_square`; fewer than 16 rows left reconfigure the tiles.
    """
    from tvm.script.ir_builder import tirx as I

    from .glue.common import prim_func

    if not amx_dense_fits(M, N, K):
        raise ValueError(f"amx_dense_epilogue needs N % {_BLOCK_OUTPUTS} == 0 and K % {_TILE_BYTES} == 0, "
                         f"got {M}x{N}x{K}")
    block_n = 32
    k_tiles, blocks = K // _TILE_BYTES, N // block_n
    pairs, rest = divmod(M, 2 * _TILE_ROWS)
    singles, tail = divmod(rest, _TILE_ROWS)
    params = [("x", (M, K), "uint8"), ("w", (N // 16, K // 4, 64), "int8"), *epilogue.params(N),
              ("y", (M, N), "float32")]
    on_stack = {"disable_lower_builtin": True}

    def tile(name: str, *args):
        I.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))

    def tile_id(t: int):
        return tirx.const(t, "int8")

    def configure(cfg, rows: int):
        # palette 1; tiles 0-5 (accumulators, codes): `rows` rows, 6-7 (weights): 16; 64 bytes each
        with I.serial(0, 64) as i:
            I.buffer_store(cfg, tirx.const(0, "uint8"), [i])
        I.buffer_store(cfg, tirx.const(1, "uint8"), [0])
        for t in range(8):
            I.buffer_store(cfg, tirx.const(_TILE_BYTES, "uint8"), [16 + 2 * t])
            I.buffer_store(cfg, tirx.const(rows if t < 6 else _TILE_ROWS, "uint8"), [48 + t])
        tile("ldtilecfg", tirx.address_of(cfg[0]))

    def rows_block(x, w, y, named, acc, block, m0, row_tiles: int, rows: int):
        # rows m0.. (row_tiles x 16, or `rows` when fewer) x outputs 32*block..: products, then y
        for t in range(2 * row_tiles):
            tile("tilezero", tile_id(t))
        with I.serial(0, k_tiles) as kt:
            for i in range(2):
                tile("tileloadd64", tile_id(6 + i), tirx.address_of(w[block * 2 + i, kt * _TILE_ROWS, 0]),
                     tirx.const(_TILE_BYTES, "int64"))
            for r in range(row_tiles):
                tile("tileloadd64", tile_id(4 + r), tirx.address_of(x[m0 + r * _TILE_ROWS, kt * _TILE_BYTES]),
                     tirx.const(K, "int64"))
                for i in range(2):
                    tile("tdpbusd", tile_id(2 * r + i), tile_id(4 + r), tile_id(6 + i))
        for r in range(row_tiles):
            for i in range(2):
                tile("tilestored64", tile_id(2 * r + i), tirx.address_of(acc[r * _TILE_ROWS * block_n + i * 16]),
                     tirx.const(4 * block_n, "int64"))
        n_rows = (row_tiles - 1) * _TILE_ROWS + rows

        def emit(fast: bool):
            with I.serial(0, n_rows) as row:
                with I.vectorized(0, block_n) as j:
                    c = block * block_n + j
                    I.buffer_store(y, epilogue.value(acc[row * block_n + j], c, named, fast), [m0 + row, c])

        epilogue.on_scale_range(named, emit)

    def body(x, w, *rest):
        named = dict(zip([name for name, _, _ in params[2:]], rest))
        y = named["y"]
        loop = I.serial if M * N * K < SERIAL_TILE_MACS else I.parallel
        with loop(0, blocks) as block:
            cfg = I.alloc_buffer((64,), "uint8", scope="local", annotations=on_stack)
            acc = I.alloc_buffer((2 * _TILE_ROWS * block_n,), "int32", scope="local", annotations=on_stack)
            if pairs or singles:
                configure(cfg, _TILE_ROWS)
            if pairs:
                with I.serial(0, pairs) as p:
                    rows_block(x, w, y, named, acc, block, p * 2 * _TILE_ROWS, 2, _TILE_ROWS)
            if singles:
                rows_block(x, w, y, named, acc, block, pairs * 2 * _TILE_ROWS, 1, _TILE_ROWS)
            if tail:
                configure(cfg, tail)
                rows_block(x, w, y, named, acc, block, M - tail, 1, tail)
            tile("tilerelease")

    return prim_func(params, body)


def _k_rows(groups4: int) -> int | None:
    """Channel groups (of 4 channels) per K tile for ``groups4`` groups: all of them up to 16 (a
    tile row is 64 bytes), else the largest divisor of ``groups4`` from 8 to 16 (equal K tiles, at
    least half full: 144 channels are 3 tiles of 12 groups), else None."""
    if groups4 <= _TILE_ROWS:
        return groups4
    return next((d for d in range(_TILE_ROWS, _TILE_ROWS // 2 - 1, -1) if groups4 % d == 0), None)


def _amx_dense_square(M: int, N: int, K: int) -> tirx.PrimFunc:
    """:func:`amx_dense` from 32 rows: every task computes one 32-output block, 32 rows at a
    time (tiles 0-3: 2 x 2 accumulators; 4-5 codes; 6-7 weights), so each tile load feeds two
    products and the block's weights (32 x K bytes: 32 KiB at K = 1024) stay in L1 across the row
    blocks. With 64-output blocks of 16 rows every weight tile fed one product and came from L2:
    64 x 1024 x 1024 took 54 us on one core (~40 cycles a product)."""
    k_tiles, blocks = K // _TILE_BYTES, N // 32
    pairs, rest = divmod(M, 2 * _TILE_ROWS)
    singles, tail = divmod(rest, _TILE_ROWS)  # a 16-row block left over, then a partial one
    task_loop = _task_loop(M * N * K)
    # tiles 0-5 (accumulators, codes) hold `rows` rows, 6-7 (weights) 16; 64 bytes each
    configure = _tile_configuration(lambda t, rows: _TILE_BYTES, lambda t, rows: T.Select(t < 6, rows, _TILE_ROWS))

    @T.macro
    def rows_block(x, w, y, block, m0, row_tiles):
        # rows m0.. (row_tiles x 16, or the configured partial rows) x outputs 32*block..
        for t in T.unroll(4):
            _tile("tilezero", T.Cast("int8", t))
        for kt in range(k_tiles):
            for i in T.unroll(2):
                _tile("tileloadd64", T.Cast("int8", 6 + i), T.address_of(w[block * 2 + i, kt * _TILE_ROWS, 0]),
                      T.int64(_TILE_BYTES))
            for r in T.unroll(row_tiles):
                _tile("tileloadd64", T.Cast("int8", 4 + r), T.address_of(x[m0 + r * _TILE_ROWS, kt * _TILE_BYTES]),
                      T.int64(K))
                for i in T.unroll(2):
                    _tile("tdpbusd", T.Cast("int8", 2 * r + i), T.Cast("int8", 4 + r), T.Cast("int8", 6 + i))
        for r in T.unroll(row_tiles):
            for i in T.unroll(2):
                _tile("tilestored64", T.Cast("int8", 2 * r + i),
                      T.address_of(y[m0 + r * _TILE_ROWS, block * 32 + i * 16]), T.int64(4 * N))

    @T.prim_func
    def main(x: T.Buffer((M, K), "uint8"), w: T.Buffer((N // 16, K // 4, 64), "int8"),
             y: T.Buffer((M, N), "int32")):
        T.func_attr({"tir.noalias": True})
        for block in task_loop(blocks):
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            configure(cfg, _TILE_ROWS)
            for p in range(pairs):
                rows_block(x, w, y, block, p * 2 * _TILE_ROWS, 2)
            if singles > 0:
                rows_block(x, w, y, block, pairs * 2 * _TILE_ROWS, 1)
            if tail > 0:
                configure(cfg, tail)
                rows_block(x, w, y, block, M - tail, 1)
            _tile("tilerelease")

    return main


def amx_conv_fits(geo: ConvGeometry) -> bool:
    """Whether :func:`amx_conv2d` takes this convolution: one group, output channels in whole
    tiles of 16, input channels in equal K tiles of 8 to 16 groups of 4 (or one tile of at most
    16 groups), strides <= 2; or a pointwise conv over whole 64-byte rows of output
    (:func:`_flat_pointwise_fits`: there 8 output channels may end the last tile)."""
    if _flat_pointwise_fits(geo):
        return True
    return (geo.groups == 1 and geo.out_channels % 16 == 0 and _k_rows(-(-geo.in_channels // 4)) is not None
            and phase_pairs(geo)[0] is not None)


def _pointwise(geo: ConvGeometry) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped conv: a product over the flattened pixels."""
    return (geo.groups == 1 and geo.kernel_h == geo.kernel_w == 1 and geo.stride == (1, 1)
            and geo.padded_h == geo.height and geo.padded_w == geo.width)


def _flat_pointwise_fits(geo: ConvGeometry) -> bool:
    """Whether :func:`amx_conv2d` runs this conv as :func:`_amx_pointwise_conv`: pointwise, planes
    of whole tile rows (``H*W`` a multiple of 16 pixels, at least 32), output channels a multiple of
    8 and input channels in equal K tiles."""
    pixels = geo.out_h * geo.out_w
    return (_pointwise(geo) and pixels % _TILE_ROWS == 0 and pixels >= 2 * _TILE_ROWS and geo.out_channels % 8 == 0
            and _k_rows(-(-geo.in_channels // 4)) is not None)


def amx_conv2d(input_shape, weight_shape, stride=1, padding=0, dilation=1) -> tirx.PrimFunc:
    """NCHW conv2d on AMX tiles, ``y[b, o, oh, ow] = sum_{c,r,s} x[b, c, ...] * q[o, c, r, s]``::

        main(x: uint8[B, C, H, W], w: int8[O, kh*kw, 4*ceil(C/4)], y: int32[B, O, OH, OW])

    ``w`` is ``csqc.artifact``'s ``conv_rows`` layout (zero past C). Tasks: (batch, 32 or 16
    output channels, 16-column segment of the output rows); each walks the rows two at a time,
    four accumulator tiles (two channel tiles x two rows), and the last segment of a row is a
    narrower tile (``OW % 16`` columns: its own tile configuration). Needs :func:`amx_conv_fits`.
    """
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, 1)
    if _flat_pointwise_fits(geo):
        return _amx_pointwise_conv(geo)
    if not amx_conv_fits(geo):
        raise ValueError(f"amx_conv2d cannot take this convolution ({input_shape} * {weight_shape}, groups 1, "
                         f"stride {stride}): output channels must be whole tiles of 16, input channels at most "
                         "64 or equal tiles of 32 to 64, strides at most 2")
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, OH, OW = geo.out_channels, geo.out_h, geo.out_w
    sh, sw = geo.stride
    dh, dw = geo.dilation
    kh, kwid = geo.kernel_h, geo.kernel_w
    taps = kh * kwid
    groups4 = -(-C // 4)
    k_rows = _k_rows(groups4)  # channel groups per K tile
    k_tiles = groups4 // k_rows
    Hq, Wq = -(-geo.padded_h // sh), -(-geo.padded_w // sw)
    plane = sh * sw * Hq * Wq  # words of one channel group's staged plane
    stage = phase_staging(geo, Hq)
    o_block = 32 if O % 32 == 0 else 16
    o_tiles, o_blocks = o_block // 16, O // o_block
    segments = -(-OW // 16)
    last_width = OW - (segments - 1) * 16
    row_pairs, odd_row = divmod(OH, 2)
    # parallel from as many stored sums as the pointwise kernel (64 -> 384 at 14x14, 4.8 M
    # multiply-adds: 12 -> 10.4 us on two threads)
    task_loop = _task_loop(B * O * OH * OW * taps * C, B * O * OH * OW, _PARALLEL_TILE_STORES)

    # tiles 0-3: accumulators (16 channels x `width` columns, int32); 4-5: weights (16 channels
    # x 4 k_rows bytes); 6-7: codes (k_rows channel groups x `width` columns of 4 bytes)
    configure = _tile_configuration(
        lambda t, width: T.Select(tirx.Or(t == 4, t == 5), 4 * k_rows, 4 * width),
        lambda t, width: T.Select(t >= 6, k_rows, _TILE_ROWS))

    @T.macro
    def output_rows(xw, w, y, b, o0, oh0, ow0, rows):
        # rows (1 or 2) output rows from oh0, columns ow0.., channels o0..o0+o_block
        for t in T.unroll(4):
            _tile("tilezero", T.Cast("int8", t))
        for r in T.unroll(kh):
            for s in T.unroll(kwid):
                for kt in range(k_tiles):
                    for i in T.unroll(o_tiles):
                        _tile("tileloadd64", T.Cast("int8", 4 + i),
                              T.address_of(w[o0 + 16 * i, r * kwid + s, kt * k_rows * 4]), T.int64(taps * groups4 * 4))
                    for j in T.unroll(2):
                        if j < rows:
                            _tile("tileloadd64", T.Cast("int8", 6 + j),
                                  T.address_of(xw[(b * groups4 + kt * k_rows) * plane
                                                  + ((r * dh % sh) * sw + s * dw % sw) * Hq * Wq
                                                  + (oh0 + j + r * dh // sh) * Wq + ow0 + s * dw // sw]),
                                  T.int64(plane * 4))
                            for i in T.unroll(o_tiles):
                                _tile("tdpbsud", T.Cast("int8", 2 * j + i), T.Cast("int8", 4 + i),
                                      T.Cast("int8", 6 + j))
        for j in T.unroll(2):
            if j < rows:
                for i in T.unroll(o_tiles):
                    _tile("tilestored64", T.Cast("int8", 2 * j + i), T.address_of(y[b, o0 + 16 * i, oh0 + j, ow0]),
                          T.int64(OH * OW * 4))

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, taps, groups4 * 4), "int8"),
             y: T.Buffer((B, O, OH, OW), "int32")):
        T.func_attr({"tir.noalias": True})
        xs = T.alloc_buffer((B, groups4, sh, sw, Hq, Wq), "uint32")
        stage(x, xs)
        xw = T.decl_buffer((B * groups4 * plane,), "uint32", data=xs.data)
        for task in task_loop(B * o_blocks * segments):
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            configure(cfg, T.Select(task % segments == segments - 1, last_width, 16))
            for p in range(row_pairs):
                output_rows(xw, w, y, task // (o_blocks * segments), task // segments % o_blocks * o_block, 2 * p,
                            task % segments * 16, 2)
            if odd_row > 0:
                output_rows(xw, w, y, task // (o_blocks * segments), task // segments % o_blocks * o_block,
                            2 * row_pairs, task % segments * 16, 1)
            _tile("tilerelease")

    return main


def _pointwise_block_product(P: int, groups4: int, k_rows: int, o_tiles: int):
    """A macro ``product(xw, w, b, o0, p0)``: the sums of ``o_tiles`` channel tiles from channel
    ``o0`` x the 32 pixels from ``p0`` of batch ``b`` of a 1x1 conv, in tiles ``2j + i`` (channel
    tile i x pixel tile j), from the staged codes ``xw`` (words of 4 channels, planes of ``P``) and
    the weights ``w[O, 1, 4 * groups4]``; tiles 4-5 hold weights and 6-7 codes on the way."""
    k_tiles = groups4 // k_rows

    @T.macro
    def product(xw, w, b, o0, p0):
        for t in T.unroll(4):
            _tile("tilezero", T.Cast("int8", t))
        for kt in range(k_tiles):
            for i in T.unroll(o_tiles):
                _tile("tileloadd64", T.Cast("int8", 4 + i), T.address_of(w[o0 + 16 * i, 0, kt * k_rows * 4]),
                      T.int64(groups4 * 4))
            for j in T.unroll(2):
                _tile("tileloadd64", T.Cast("int8", 6 + j),
                      T.address_of(xw[(b * groups4 + kt * k_rows) * P + p0 + 16 * j]), T.int64(P * 4))
                for i in T.unroll(o_tiles):
                    _tile("tdpbsud", T.Cast("int8", 2 * j + i), T.Cast("int8", 4 + i), T.Cast("int8", 6 + j))

    return product


def _amx_pointwise_conv(geo: ConvGeometry) -> tirx.PrimFunc:
    """:func:`amx_conv2d` of a pointwise conv whose planes are whole tile rows
    (:func:`_flat_pointwise_fits`): the product over the flattened pixels, tiled 32 pixels at a
    time as :func:`amx_pointwise_codes` tiles it (the last block of a plane ends at its end,
    overlapping the one before it where ``H*W`` is an odd number of tiles: its common sums are
    stored twice, equal). Every tile row it stores is one aligned 64-byte line. Tiles of one
    output row each stored 56- and 32-byte rows across cache lines at 28x28 and 56x56: 1x1 convs
    (Intel Xeon with AMX-INT8, 2 threads) 96 -> 576 at 28x28 63 -> 39 us, 144 -> 32 at 56x56 76
    -> 24, 96 -> 32 at 56x56 66 -> 18. Where ``O % 16 == 8`` the last 16-channel block is a tile of
    8 rows (its own tile configuration): MobileNetV2's 24-channel projections run here."""
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    O, P, lanes = geo.out_channels, geo.height * geo.width, 2 * _TILE_ROWS
    groups4 = -(-C // 4)
    k_rows = _k_rows(groups4)
    stage = phase_staging(geo, H)
    o_block = 32 if O % 32 == 0 else 16
    o_tiles, o_blocks = o_block // 16, -(-O // o_block)
    last_rows = O % 16 or 16  # rows of the last channel tile
    blocks = -(-P // lanes)  # 32-pixel blocks of a plane
    # tasks: runs of pixel blocks (at least 8 tasks where the planes allow), each over every
    # channel block where there are at most two or one ends in 8 rows (a task of each block would
    # leave one thread the 8-row tiles: 144 -> 24 at 56x56 42 -> 24 us), else (channel block, run)
    pixel_tasks = O % 16 != 0 or O <= 32
    runs = min(blocks, -(-8 // (B if pixel_tasks else B * o_blocks)))
    per_run = -(-blocks // runs)
    runs = -(-blocks // per_run)
    # the stores, not the products, bound these: 96 -> 24 at 56x56 (7 M multiply-adds) takes 44 us
    # on one thread, 19 on two
    task_loop = _task_loop(B * O * P * C, B * O * P, _PARALLEL_TILE_STORES)
    task_blocks = 1 if pixel_tasks else o_blocks
    # tiles 0-3: accumulators (channel tile i x pixel tile j: 2j + i); 4-5: weights (channel tile i x
    # 4 k_rows bytes); 6-7: codes (k_rows channel groups x 16 pixels); `rows`: the channel tiles' rows
    configure = _tile_configuration(lambda t, rows: T.Select(tirx.Or(t == 4, t == 5), 4 * k_rows, _TILE_BYTES),
                                    lambda t, rows: T.Select(t >= 6, k_rows, rows))

    product = _pointwise_block_product(P, groups4, k_rows, o_tiles)

    @T.macro
    def block(xw, w, y, b, o0, p0):
        # channels o0.. x pixels p0..p0+32 of batch b
        product(xw, w, b, o0, p0)
        for j in T.unroll(2):
            for i in T.unroll(o_tiles):
                _tile("tilestored64", T.Cast("int8", 2 * j + i),
                      T.address_of(y[(b * O + o0 + 16 * i) * P + p0 + 16 * j]), T.int64(P * 4))

    @T.prim_func
    def main(x: T.Buffer((B, C, H, W), "uint8"), w: T.Buffer((O, 1, groups4 * 4), "int8"),
             y: T.Buffer((B, O, H, W), "int32")):
        T.func_attr({"tir.noalias": True})
        xs = T.alloc_buffer((B, groups4, 1, 1, H, W), "uint32")
        stage(x, xs)
        xw = T.decl_buffer((B * groups4 * P,), "uint32", data=xs.data)
        yf = T.decl_buffer((B * O * P,), "int32", data=y.data)
        for task in task_loop(B * runs if pixel_tasks else B * o_blocks * runs):
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            b, first = task // (runs * task_blocks), (task % runs) * per_run
            for i in range(o_blocks if pixel_tasks else 1):
                block_index = i if pixel_tasks else task // runs % o_blocks
                configure(cfg, T.Select(block_index == o_blocks - 1, last_rows, _TILE_ROWS))
                for k in range(T.min(per_run, blocks - first)):
                    block(xw, w, yf, b, block_index * o_block, T.min((first + k) * lanes, P - lanes))
            _tile("tilerelease")

    return main


def amx_pointwise_codes_fits(geo: ConvGeometry) -> bool:
    """Whether :func:`amx_pointwise_codes` takes this convolution: a 1x1, stride-1, unpadded conv
    (a product over the flattened pixels) that :func:`amx_conv_fits` with whole 16-channel tiles,
    of at least 32 pixels."""
    return (_pointwise(geo) and geo.out_h * geo.out_w >= 2 * _TILE_ROWS and geo.out_channels % 16 == 0
            and amx_conv_fits(geo))


def amx_pointwise_codes(input_shape, out_channels: int, steps: int, out_levels: int, out_scale: float,
                        out_offset: bool = False, two_parts: bool = False, has_offset: bool = False) -> tirx.PrimFunc:
    """A pointwise conv on AMX tiles that writes its output *codes*, its accumulators never
    leaving the core: each 32-channel x 32-pixel block of accumulators goes from the tiles to a
    4 KiB stack buffer and through ``glue.searched_codes``, the binary search over the layer's
    integer thresholds (``code_thresholds.code_tables(wide=True)``) that ``glue.epilogue``'s
    ``code_search`` runs on a stored accumulator buffer. The same codes, bit for bit; the int32
    accumulators (4 bytes an output, written and read back) are not stored at all::

        main(x: uint8[B, C, H, W], w: int8[O, 1, 4*ceil(C/4)], acc_offset: int32[O] (has_offset),
             code_thresholds: int16[O*E + 32 - E], code_base: int8[O], acc_flip: int8[O],
             out_scale: float32[1], codes_pos: uint8[B, O, H, W], codes_neg: uint8[B, O, H, W] (two_parts))

    ``E = 2**steps - 1``; ``steps`` 0: ``code_thresholds`` is ``code_form: int16[O * FORM_FIELDS]``
    instead, each channel's fixed-point form (``glue.form_codes``, then ``+ code_base``);
    ``acc_offset``: offset input codes' per-channel ``L * sum_k q[c, k]``,
    subtracted before the search; ``out_scale`` receives the static output scale and the codes
    are laid out as ``glue.store_searched_codes`` lays them (the outputs of ``glue.epilogue``). Pixels
    are tiled along the flattened plane, 32 at a time; the last block of a plane ends at its end,
    overlapping the one before it (its common codes are written twice, equal): every tile is 16
    columns wide. Needs :func:`amx_pointwise_codes_fits`.
    """
    from .glue import SEARCH_LANES, form_codes, form_row, saturated_search_value, searched_codes, store_searched_codes

    B, C, H, W = (int(v) for v in input_shape)
    O = int(out_channels)
    geo = conv_geometry((B, C, H, W), (O, C, 1, 1), 1, 0, 1, 1)
    if not amx_pointwise_codes_fits(geo):
        raise ValueError(f"amx_pointwise_codes takes unpadded stride-1 1x1 convs of whole tiles and at least 32 "
                         f"pixels, not {tuple(input_shape)} -> {O} channels")
    if not 0 <= steps <= 5:
        raise ValueError(f"a code search takes 1..5 steps (0: the fixed-point form), got {steps}")
    P, lanes = H * W, SEARCH_LANES
    groups4 = -(-C // 4)
    k_rows = _k_rows(groups4)
    stage = phase_staging(geo, H)
    o_block = 32 if O % 32 == 0 else 16
    o_tiles, o_blocks = o_block // 16, O // o_block
    blocks = -(-P // lanes)  # 32-pixel blocks of a plane
    # tasks: (batch, channel block, run of pixel blocks), at least 8 where the planes allow
    runs = min(blocks, -(-8 // (B * o_blocks)))
    per_run = -(-blocks // runs)
    runs = -(-blocks // per_run)
    entries = 2**steps - 1
    # the codes, not the products, bound this kernel too: 160 -> 960 at 7x7 (7.5 M multiply-adds,
    # 47 K codes) 24 -> 16.5 us on two threads, 64 -> 384 at 14x14 19.5 -> 15; 64 -> 96 at 14x14
    # (19 K codes) 7 -> 10.5, so below 32 K codes one thread
    task_loop = _task_loop(B * O * P * C, B * O * P, _PARALLEL_TILE_CODES)
    configure = _tile_configuration(lambda t, _: T.Select(tirx.Or(t == 4, t == 5), 4 * k_rows, _TILE_BYTES),
                                    lambda t, _: T.Select(t >= 6, k_rows, _TILE_ROWS))

    def row_codes(acc, thresholds, base, flip, acc_offset, pos, neg, c, row, first):
        # one channel's 32 accumulators (row `row` of the block buffer) -> its 32 codes at `first`
        offset = acc_offset[c] if acc_offset is not None else T.int32(0)
        value = saturated_search_value(acc[T.Ramp(row * lanes, 1, lanes)], T.Broadcast(offset, lanes),
                                       T.Broadcast(T.Cast("int32", flip[c]), lanes))
        base_lanes = T.Broadcast(T.Cast("int16", base[c]), lanes)
        if steps:
            code = searched_codes(value, thresholds[T.Ramp(c * entries, 1, lanes)], base_lanes, steps)
        else:
            code = form_codes(value, form_row(thresholds, c)) + base_lanes
        store_searched_codes(code, first, pos, neg, out_levels, out_offset)

    block_product = _pointwise_block_product(P, groups4, k_rows, o_tiles)

    @T.macro
    def block_store(acc):
        # a channel's 32 accumulators become one row of `acc`
        for j in T.unroll(2):
            for i in T.unroll(o_tiles):
                _tile("tilestored64", T.Cast("int8", 2 * j + i), T.address_of(acc[i * 16 * lanes + 16 * j]),
                      T.int64(lanes * 4))

    @T.macro
    def block_codes(acc, thresholds, base, flip, acc_offset, pos, neg, b, o0, p0):
        for row in range(o_block):
            row_codes(acc, thresholds, base, flip, acc_offset, pos, neg, o0 + row, row, (b * O + o0 + row) * P + p0)

    @T.macro
    def tasks(x, w, acc_offset, thresholds, base, flip, pos, neg):
        xs = T.alloc_buffer((B, groups4, 1, 1, H, W), "uint32")
        stage(x, xs)
        xw = T.decl_buffer((B * groups4 * P,), "uint32", data=xs.data)
        for task in task_loop(B * o_blocks * runs):
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            acc = T.alloc_buffer((o_block * lanes,), "int32", scope="local",
                                 annotations={"disable_lower_builtin": True})
            configure(cfg, 16)
            b, o0, first = task // (o_blocks * runs), task // runs % o_blocks * o_block, (task % runs) * per_run
            for k in range(T.min(per_run, blocks - first)):
                p0 = T.min((first + k) * lanes, P - lanes)
                block_product(xw, w, b, o0, p0)
                block_store(acc)
                block_codes(acc, thresholds, base, flip, acc_offset, pos, neg, b, o0, p0)
            _tile("tilerelease")

    return codes_main((B, C, H, W), (B, O, H, W), T.Buffer((O, 1, groups4 * 4), "int8"),
                      ConvCodes(steps, out_levels, out_scale, out_offset, two_parts, has_offset), tasks)
