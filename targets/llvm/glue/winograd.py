"""Float 3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", CVPR 2016): each 2x2 block of outputs takes 16
multiplies per input channel instead of 36, as 16 independent matrix products over the tiles."""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as I

from csqc.artifact import WINOGRAD_POINTS
from .common import F32, _f32, _flat, LANES, _local, prim_func, _zeroed_accumulators
from ..isa import AVX2, AVX512, tier
from .float_layers import (
    _conv_outputs, _conv_params, conv_output_hw, _emit_phase_split, _pair, _store_sum, ConvKnobs, FloatTail)

# The tile's 4x4 input patch is V = B^T d B and its 2x2 outputs A^T M A, M the 16 products
# (the kernel transform U = G g G^T is the runtime's: csqc.artifact.winograd_weight).


def _input_transform(d):
    """``B^T d`` over four values (a patch's rows or columns)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_transform(m):
    """``A^T m`` over four values."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_geometry(input_shape, out_channels: int, padding, vectors: int) -> dict:
    """The tiling: ``tiles`` (2x2 output blocks, flattened over batch and plane), its padding to
    whole register tiles, and the bytes of the two transformed tensors the kernel keeps."""
    n, c, h, w = (int(s) for s in input_shape)
    ph, pw = padding
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    tiles_h, tiles_w = -(-oh // 2), -(-ow // 2)
    tiles = n * tiles_h * tiles_w
    vectors = max(1, min(vectors, -(-tiles // LANES)))
    padded = -(-tiles // (vectors * LANES)) * vectors * LANES
    stride = padded + LANES  # a tile row's last vector may run up to 15 tiles past the end
    return dict(out_hw=(oh, ow), tiles_hw=(tiles_h, tiles_w), tiles=tiles, vectors=vectors, padded=padded,
                stride=stride, scratch_bytes=4 * WINOGRAD_POINTS * (c + int(out_channels)) * stride)


# Where Winograd pays, by instruction tier: (least channels a side, least direct multiply-adds,
# register tile (channels, vectors of tiles) or None for "by the tiles"). Zen 4, 2 threads,
# against the direct forms: with AVX-512, 9.4 M multiply-adds (64 -> 64 at 16x16, 128 -> 128
# at 8x8) run about even and 32 channels lose (32 -> 32 at 32x32 155 -> 185 us); with AVX2
# (``-mcpu=haswell``: 16 registers, the direct form far below its peak) Winograd wins from
# 16 -> 16 at 32x32 (52 us against the direct form's 83-124 across runs) and 64 -> 64 at 8x8
# (41 against 47).
WINOGRAD_WHERE = {AVX512: (64, 12_000_000, None), AVX2: (16, 2_000_000, (4, 1))}
WINOGRAD_MAX_SCRATCH = 32 << 20  # bytes of transformed input and products a call may hold


def winograd_knobs(input_shape, weight_shape, stride, padding, dilation) -> ConvKnobs | None:
    """Winograd F(2x2, 3x3)'s knobs for a 3x3 conv of stride 1 where it pays, else None: enough
    channels and direct work for the tier (:data:`WINOGRAD_WHERE`), a vector of 2x2 tiles (a
    4x4 plane's 4 tiles fill a quarter of one: 512 -> 512 at 4x4 393 -> 825 us with AVX-512,
    1,136 -> 1,412 with AVX2), and at most 32 MiB of transformed tensors. It takes 16 multiplies
    a tile per channel pair where the direct conv takes 36; measured (Zen 4, 2 threads, direct
    -> Winograd), AVX-512: 64 -> 64 at 56x56 1,060 -> 624 us, 128 -> 128 at 28x28 1,062 -> 602,
    256 -> 256 at 14x14 1,044 -> 651, 512 -> 512 at 7x7 1,072 -> 689, at 14x14 4,252 -> 2,879,
    64 -> 64 at 32x32 349 -> 205, 256 -> 256 at 8x8 396 -> 259; AVX2 (direct at its 4 x 16 tile):
    64 -> 64 at 56x56 2,377 -> 1,142, 128 -> 128 at 28x28 2,725 -> 1,049, 256 -> 256 at 14x14
    4,325 -> 1,301. AVX-512's register tile: 2 vectors of tiles x 8 channels, or where the
    tiles fill one vector up to 24 channels (the block that wastes fewest padding channels);
    AVX2's: 4 channels x 1 vector (8 of its 16 registers)."""
    where = WINOGRAD_WHERE.get(tier())
    n, c, h, w = (int(s) for s in input_shape)
    o, cg, kh, kw = (int(s) for s in weight_shape)
    if where is None or (kh, kw) != (3, 3) or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1) or cg != c:
        return None
    min_channels, min_macs, tile = where
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    geo = winograd_geometry(input_shape, o, _pair(padding), 2)
    if min(c, o) < min_channels or n * o * c * 9 * oh * ow < min_macs or geo["tiles"] < LANES \
            or geo["scratch_bytes"] > WINOGRAD_MAX_SCRATCH:
        return None
    if tile is not None:
        return ConvKnobs(winograd_block=tile[0], winograd_vectors=tile[1])
    if geo["vectors"] == 2:
        return ConvKnobs(winograd_block=8, winograd_vectors=2)
    block = min((24, 16, 12, 8), key=lambda b: (-(-o // b) * b, -b))
    return ConvKnobs(winograd_block=block, winograd_vectors=1)


def conv2d_f32_winograd(input_shape, weight_shape, padding, has_bias: bool, act: str, clip_lo: float,
                        clip_hi: float, knobs: ConvKnobs, tail: FloatTail | None) -> tirx.PrimFunc:
    """:func:`~.float_layers.conv2d_f32` (3x3, stride 1, one group) by F(2x2, 3x3): the weights
    come transformed, ``U[16, ceil(O/block), C, block]`` (``block = knobs.winograd_block``;
    :func:`csqc.artifact.winograd_weight`). Three parallel phases:

    1. the zero-padded input, cut into overlapping 4x4 patches, 16 tiles of a
       tile row a vector (two loads and an even/odd shuffle give a column of 16 patches), each
       patch transformed to ``V[16, C, tiles]``;
    2. 16 matrix products ``M[e, o, t] = sum_c U[e, c, o] V[e, c, t]``, a register tile of
       ``block`` output channels (weights broadcast) x ``knobs.winograd_vectors`` vectors of 16 tiles, the
       weights of a block contiguous;
    3. each tile's 16 products transformed to its 2x2 outputs, stored a row of 16 at a time.

    The sums are not the direct conv's: within a few float32 ulps of its magnitudes (the
    transforms add and subtract; the weight transform is exact for integer weights up to 2^20),
    as any other summation order."""
    n, c, h, w = (int(s) for s in input_shape)
    o, cg, kh, kw = (int(s) for s in weight_shape)
    if (kh, kw) != (3, 3) or cg != c:
        raise ValueError(f"Winograd F(2x2, 3x3) takes 3x3 kernels of one group, got {weight_shape} on {c} channels")
    ph, pw = padding
    geo = winograd_geometry(input_shape, o, padding, knobs.winograd_vectors)
    (oh, ow), (tiles_h, tiles_w) = geo["out_hw"], geo["tiles_hw"]
    tiles, vectors, padded, stride = geo["tiles"], geo["vectors"], geo["padded"], geo["stride"]
    block = knobs.winograd_block
    blocks = -(-o // block)
    tile_blocks = padded // (vectors * LANES)
    src_h, src_w = 2 * tiles_h + 2, 2 * tiles_w + 2
    src_hw = src_h * src_w
    row_vectors = -(-tiles_w // LANES)
    # point strides skewed by a cache line: 16 streams 2^k bytes apart would share a cache set
    v_point, m_point = c * stride + LANES, o * stride + LANES

    params = _conv_params((n, c, h, w), (WINOGRAD_POINTS, blocks, c, block), (n, o, oh, ow), has_bias, act, tail)

    def store_sum(value, oc, out, named, y_flat):
        _store_sum(value, oc, out, named, y_flat, tail, act, clip_lo, clip_hi)

    def body(x, u, *rest):
        named, y_flat = _conv_outputs(params, rest, tail)
        u_flat = _flat(u)
        # slack past the last row: a row's last column vector reads up to 30 columns beyond it
        xp = I.alloc_buffer((n * c * src_hw + 3 * LANES,), F32, scope="global")
        _emit_phase_split(_flat(x), xp, (n, c, h, w), (1, 1), (ph, pw), (src_h, src_w), 0.0)
        v = I.alloc_buffer((WINOGRAD_POINTS * v_point,), F32, scope="global")
        m = I.alloc_buffer((WINOGRAD_POINTS * m_point,), F32, scope="global")

        # 1. V = B^T d B, one input channel a task (its tile rows in order: a row's last vector
        # spills into the next row's tiles, which that row then overwrites)
        with I.parallel(0, c) as ci:
            patch = _local((16 * LANES,))
            with I.serial(0, n * tiles_h) as tile_row:
                b, ty = tile_row // tiles_h, tile_row % tiles_h
                with I.serial(0, row_vectors) as rv:
                    t0 = tile_row * tiles_w + rv * LANES
                    for i in range(4):
                        base = (b * c + ci) * src_hw + (2 * ty + i) * src_w + rv * 2 * LANES
                        for shift in (0, 2):  # columns 2t and 2t+1, then 2t+2 and 2t+3
                            pair = [xp[tirx.Ramp(base + shift + k * LANES, 1, LANES)] for k in range(2)]
                            for j in range(2):
                                lanes = [tirx.const(2 * lane + j, "int32") for lane in range(LANES)]
                                I.buffer_store(patch, tirx.Shuffle(pair, lanes),
                                               [tirx.Ramp((i * 4 + shift + j) * LANES, 1, LANES)])
                    # from registers: LLVM cannot tell V's stores from xp's loads and would reload
                    d = [[patch[tirx.Ramp((i * 4 + j) * LANES, 1, LANES)] for j in range(4)] for i in range(4)]
                    rows = [_input_transform([d[i][j] for i in range(4)]) for j in range(4)]
                    for xi in range(4):
                        point = _input_transform([rows[j][xi] for j in range(4)])
                        for nu in range(4):
                            I.buffer_store(v, point[nu], [tirx.Ramp((xi * 4 + nu) * v_point + ci * stride + t0, 1,
                                                                    LANES)])
            with I.serial(0, WINOGRAD_POINTS) as e:  # padding tiles: finite, so no lane computes a NaN
                with I.serial(0, stride - tiles) as k:
                    I.buffer_store(v, _f32(0.0), [e * v_point + ci * stride + tiles + k])

        # 2. M[e] = U[e]^T V[e]
        with I.parallel(0, WINOGRAD_POINTS * blocks * tile_blocks) as task:
            e = task // (blocks * tile_blocks)
            ob = task // tile_blocks % blocks
            t0 = task % tile_blocks * vectors * LANES
            acc = _zeroed_accumulators(block * vectors)
            with I.serial(0, c) as ci:
                with I.unroll(0, block) as oi:
                    with I.unroll(0, vectors) as vi:
                        with I.vectorized(0, LANES) as lane:
                            slot = (oi * vectors + vi) * LANES + lane
                            weight = u_flat[((e * blocks + ob) * c + ci) * block + oi]
                            value = v[e * v_point + ci * stride + t0 + vi * LANES + lane]
                            I.buffer_store(acc, acc[slot] + value * weight, [slot])
            with I.serial(0, block) as oi:
                with I.If(ob * block + oi < o):
                    with I.Then():
                        with I.unroll(0, vectors) as vi:
                            with I.vectorized(0, LANES) as lane:
                                I.buffer_store(m, acc[(oi * vectors + vi) * LANES + lane],
                                               [e * m_point + (ob * block + oi) * stride + t0 + vi * LANES + lane])

        # 3. outputs A^T M A, one output channel a task
        with I.parallel(0, o) as oc:
            outputs = _local((4 * LANES,))
            interleaved = _local((4 * LANES,))
            with I.serial(0, n * tiles_h) as tile_row:
                b, ty = tile_row // tiles_h, tile_row % tiles_h
                with I.serial(0, row_vectors) as rv:
                    t0 = tile_row * tiles_w + rv * LANES
                    products = [m[tirx.Ramp(e * m_point + oc * stride + t0, 1, LANES)] for e in range(WINOGRAD_POINTS)]
                    rows = [_output_transform([products[xi * 4 + nu] for xi in range(4)]) for nu in range(4)]
                    for i in range(2):
                        out = _output_transform([rows[nu][i] for nu in range(4)])
                        for j in range(2):
                            I.buffer_store(outputs, out[j], [tirx.Ramp((i * 2 + j) * LANES, 1, LANES)])
                    for i in range(2):  # output row 2ty+i: the tiles' columns 2t and 2t+1, interleaved
                        even, odd = (outputs[tirx.Ramp((i * 2 + j) * LANES, 1, LANES)] for j in range(2))
                        for half in range(2):
                            lanes = [tirx.const(half * LANES // 2 + lane // 2 + lane % 2 * LANES, "int32")
                                     for lane in range(LANES)]
                            I.buffer_store(interleaved, tirx.Shuffle([even, odd], lanes),
                                           [tirx.Ramp((i * 2 + half) * LANES, 1, LANES)])
                    with I.serial(0, 2) as i:
                        with I.If(2 * ty + i < oh):
                            with I.Then():
                                with I.serial(0, 2) as half:
                                    col0 = rv * 2 * LANES + half * LANES
                                    out0 = ((b * o + oc) * oh + 2 * ty + i) * ow + col0
                                    with I.If(col0 + LANES <= ow):
                                        with I.Then():
                                            with I.vectorized(0, LANES) as k:
                                                store_sum(interleaved[(i * 2 + half) * LANES + k], oc, out0 + k, named,
                                                          y_flat)
                                        with I.Else():
                                            with I.serial(0, LANES) as k:
                                                with I.If(col0 + k < ow):
                                                    with I.Then():
                                                        store_sum(interleaved[(i * 2 + half) * LANES + k], oc,
                                                                  out0 + k, named, y_flat)

    return prim_func(params, body)
