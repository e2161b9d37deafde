"""Float convolution and linear layers (FMA register tiles), with their fused tails."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as I

from .common import (
    _activation, _check_act, F32, _f32, _flat, _for_each, LANES, _largest_divisor, _levels, _local, _pair,
    _parallel_or_serial, prim_func, _QUOTIENT_DIVISORS, _rounded, _zeroed_accumulators)
from .quantizers import _divisor_of, _store_codes
from .epilogues import _layer_value
from ..isa import AVX512, tier


@dataclass(frozen=True)
class ConvKnobs:
    """Register tile of :func:`conv2d_f32`: ``oc_block`` output channels (weights broadcast)
    x ``segment`` output pixels along a row (vector lanes); ``oc_block * segment / 16`` zmm
    accumulators (keep <= ~24). ``row_block`` > 0 puts output channels on the lanes instead
    (:data:`CHANNEL_LANES` layout of the weights): ``row_block`` output positions (inputs
    broadcast) x ``col_vectors`` 16-channel vectors. ``winograd_block`` > 0 (3x3, stride 1, one
    group) computes by Winograd F(2x2, 3x3) (:mod:`.winograd`): its products' register tile is
    ``winograd_block`` output channels x ``winograd_vectors`` vectors of 16 tiles."""

    oc_block: int = 8
    segment: int = 32
    row_block: int = 0
    col_vectors: int = 0
    winograd_block: int = 0
    winograd_vectors: int = 0


@dataclass(frozen=True)
class LinearKnobs:
    """Register tile of :func:`linear_f32`: ``m_block`` rows x ``n_block`` outputs, each a
    16-lane partial dot product along K."""

    m_block: int = 4
    n_block: int = 4


def conv_output_hw(input_hw, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a convolution (the interpreter's ``_im2col`` arithmetic)."""
    (h, w), (kh, kw) = input_hw, kernel_hw
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"convolution output would be empty ({oh}x{ow})")
    return oh, ow


@dataclass(frozen=True)
class FloatTail:
    """:func:`epilogue`'s float chain of a float-input quantized layer (``levels`` None: ``y =
    act(acc * mult[c] + add[c])``), for a float kernel to apply while its sums are still in
    registers (:func:`conv2d_f32` with ``tail``): the same expression, so the same bits, and no
    float accumulator buffer written and read back. Writes ``y``, or with ``out_bits`` and a
    static ``out_scale`` its codes as :func:`epilogue` lays them out. ``has_residual``: a
    residual block's ``add`` and ``post_act`` after it, as :func:`epilogue` applies them (``y =
    post_act(y_layer + residual)``; a ``residual`` parameter follows ``add``)."""

    act: str = "none"
    clip_lo: float = 0.0
    clip_hi: float = 0.0
    has_add: bool = False
    out_bits: int | None = None
    out_scale: float = 0.0
    out_signed: bool = False
    out_offset: bool = False
    has_residual: bool = False
    post_act: str = "none"
    post_lo: float = 0.0
    post_hi: float = 0.0

    def __post_init__(self):
        _check_act(self.act)
        _check_act(self.post_act)
        if self.out_bits is not None and not (self.out_scale > 0 and (not self.out_offset or self.out_signed)):
            raise ValueError("a float tail writes codes of a static scale only (offset codes signed)")
        if self.post_act != "none" and not self.has_residual:
            raise ValueError("post_act applies after a residual add (has_residual)")

    def params(self, channels: int, out_shape) -> list[tuple[str, tuple, str]]:
        """``mult``, ``add``, ``residual``, then ``y``, or ``out_scale`` and the code buffers
        (epilogue's order)."""
        params = [("mult", (channels,), F32)] + ([("add", (channels,), F32)] if self.has_add else [])
        if self.has_residual:
            params.append(("residual", tuple(out_shape), F32))
        if self.out_bits is None:
            return params + [("y", tuple(out_shape), F32)]
        params += [("out_scale", (1,), F32), ("codes_pos", tuple(out_shape), "uint8")]
        if self.out_signed and not self.out_offset:
            params.append(("codes_neg", tuple(out_shape), "uint8"))
        return params

    def emit_prologue(self, named: dict) -> None:
        if self.out_bits is not None:
            I.buffer_store(named["out_scale"], _f32(self.out_scale), [0])

    def store(self, acc, c, i, named: dict) -> None:
        """Element ``i`` (flat output index, channel ``c``) from float sum ``acc``."""
        value = _layer_value(acc, c, named, None, self.act, self.clip_lo, self.clip_hi, False)
        if self.has_residual:
            value = _activation(_rounded(value) + _flat(named["residual"])[i], self.post_act, self.post_lo,
                                self.post_hi)
        if self.out_bits is None:
            I.buffer_store(_flat(named["y"]), value, [i])
            return
        levels = _levels(self.out_bits)
        divisor = _divisor_of(named["out_scale"], self.out_scale, levels + 1, levels)
        lo, hi = _QUOTIENT_DIVISORS
        fast = divisor if lo <= float(np.float32(self.out_scale)) <= hi else None  # epilogue's branch, decided here
        act, lo, hi = (self.post_act, self.post_lo, self.post_hi) if self.has_residual else \
            (self.act, self.clip_lo, self.clip_hi)
        nonnegative = act == "relu" or (act == "clip" and min(lo, hi) >= 0)
        neg = _flat(named["codes_neg"]) if "codes_neg" in named else None
        _store_codes(_rounded(value), i, named["out_scale"], levels, True, self.out_offset, _flat(named["codes_pos"]),
                     neg, fast=fast, nonnegative=nonnegative)


def conv2d_f32(input_shape, weight_shape, stride, padding, dilation, groups: int, has_bias: bool,
               act: str = "none", clip_lo: float = 0.0, clip_hi: float = 0.0,
               knobs: ConvKnobs | None = None, tail: FloatTail | None = None) -> tirx.PrimFunc:
    """Float32 grouped conv2d (NCHW), ``y = act(conv(x, w) + b)``.

    Parameters: ``x: f32[N,C,H,W], w: f32[O,C/groups,KH,KW], b: f32[O]`` (when ``has_bias``),
    ``y: f32[N,O,OH,OW]``; with ``tail`` (no bias, no act: a float-input quantized layer's
    product), ``tail.params`` in place of ``y``, and each sum goes through ``tail.store``.

    Schedule: when the conv pads or strides, a prologue writes the zero-padded input split into
    stride phases (``xph[n, c, rh, rw, i, j] = xpad[n, c, i*sh + rh, j*sw + rw]``), so every tap
    reads a contiguous run of pixels.  The main loop is a register tile of ``oc_block`` output
    channels x ``segment`` pixels of one output row (vectorized along the row; 1x1 convs use
    the flattened ``OH*OW`` row instead): per tap, ``segment/16`` vector loads, one broadcast
    weight per channel, ``oc_block * segment/16`` FMAs.  Tiles (batch, channel block, row,
    segment) are the parallel tasks; the last segment of a row is a narrower vector.
    """
    _check_act(act)
    n, c, h, w = (int(s) for s in input_shape)
    o, cg, kh, kw = (int(s) for s in weight_shape)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    if c != cg * groups or o % groups:
        raise ValueError(f"channels {c} -> {o} do not split into {groups} groups of {cg} inputs")
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    og = o // groups
    knobs = knobs or default_conv_knobs(o, cg * kh * kw, (sh, sw), groups)
    if knobs.winograd_block:
        if (kh, kw, sh, sw, dh, dw, groups) != (3, 3, 1, 1, 1, 1, 1):
            raise ValueError("Winograd F(2x2, 3x3) takes 3x3 convs of stride 1, no dilation, one group")
        from .winograd import conv2d_f32_winograd  # (built on this module's helpers)
        return conv2d_f32_winograd(input_shape, weight_shape, (ph, pw), has_bias, act, clip_lo, clip_hi, knobs, tail)
    if knobs.row_block:
        if groups != 1:
            raise ValueError("the channels-on-lanes float conv takes one group")
        return _conv2d_f32_channels(input_shape, weight_shape, stride, padding, dilation, has_bias, act, clip_lo,
                                    clip_hi, knobs, tail)
    phased = (sh, sw, ph, pw) != (1, 1, 0, 0)
    # Source planes: the phased padded input, or x itself.
    src_h = -(-(h + 2 * ph) // sh) if phased else h
    src_w = -(-(w + 2 * pw) // sw) if phased else w
    pointwise = kh == 1 and kw == 1  # the phase (0,0) plane is exactly OH x OW: flatten it
    rows, row_len = (1, oh * ow) if pointwise else (oh, ow)
    oc_block = _largest_divisor(o, knobs.oc_block)
    oc_blocks = o // oc_block
    tiles = _row_tiles(row_len, knobs.segment)

    params = _conv_params((n, c, h, w), (o, cg, kh, kw), (n, o, oh, ow), has_bias, act, tail)

    def body(x, weight, *rest):
        named, y_flat = _conv_outputs(params, rest, tail)
        x_flat = _flat(x)
        if phased:
            src = I.alloc_buffer((n * c * sh * sw * src_h * src_w,), F32, scope="global")
            _emit_phase_split(x_flat, src, (n, c, h, w), (sh, sw), (ph, pw), (src_h, src_w), 0.0)
        else:
            src = x_flat

        def tile(batch, oc0, row, col0, width):
            acc = _local((oc_block * width,))
            with I.unroll(0, oc_block) as oi:
                with I.vectorized(0, width) as lane:
                    I.buffer_store(acc, _f32(0.0), [oi * width + lane])
            with I.serial(0, cg) as ic:
                with I.serial(0, kh) as ki:
                    with I.unroll(0, kw) as kj:
                        with I.unroll(0, oc_block) as oi:
                            with I.vectorized(0, width) as lane:
                                channel = ((oc0 + oi) // og) * cg + ic
                                plane = ((batch * c + channel) * sh + (ki * dh) % sh) * sw + (kj * dw) % sw
                                pixel = (row + (ki * dh) // sh) * src_w + col0 + lane + (kj * dw) // sw
                                tap = src[plane * (src_h * src_w) + pixel] * weight[oc0 + oi, ic, ki, kj]
                                I.buffer_store(acc, acc[oi * width + lane] + tap, [oi * width + lane])
            with I.unroll(0, oc_block) as oi:
                with I.vectorized(0, width) as lane:
                    out = ((batch * o + oc0 + oi) * rows + row) * row_len + col0 + lane
                    _store_sum(acc[oi * width + lane], oc0 + oi, out, named, y_flat, tail, act, clip_lo, clip_hi)

        segments = sum(count for count, _ in tiles)
        with I.parallel(0, n * oc_blocks * rows * segments) as task:
            seg = task % segments
            row = task // segments % rows
            oc0 = task // (segments * rows) % oc_blocks * oc_block
            batch = task // (segments * rows * oc_blocks)
            _dispatch_tiles(tiles, seg, lambda col0, width: tile(batch, oc0, row, col0, width))

    return prim_func(params, body)


def _conv_params(x_shape, w_shape, out_shape, has_bias: bool, act: str, tail: FloatTail | None) -> list:
    """:func:`conv2d_f32`'s parameters: ``x``, ``w`` (in the form's layout), ``b``, then ``y`` or
    the tail's."""
    if tail is not None and (has_bias or act != "none"):
        raise ValueError("a conv with a float tail has no bias or activation of its own")
    params = [("x", tuple(x_shape), F32), ("w", tuple(w_shape), F32)]
    if has_bias:
        params.append(("b", (out_shape[1],), F32))
    return params + (tail.params(out_shape[1], out_shape) if tail is not None else [("y", tuple(out_shape), F32)])


def _conv_outputs(params, rest, tail: FloatTail | None):
    """``(named, y_flat)``: the buffers after ``x`` and ``w`` by name, and ``y`` flat (None with a
    tail, whose prologue is emitted here)."""
    named = dict(zip([name for name, _, _ in params[2:]], rest))
    if tail is not None:
        tail.emit_prologue(named)
        return named, None
    return named, _flat(named["y"])


def _store_sum(value, oc, out, named: dict, y_flat, tail: FloatTail | None, act: str, clip_lo: float, clip_hi: float):
    """Output element ``out`` (flat, channel ``oc``) from float sum ``value``: the tail's, or
    ``act(value + b[oc])``."""
    if tail is not None:
        tail.store(value, oc, out, named)
        return
    if "b" in named:
        value = value + named["b"][oc]
    I.buffer_store(y_flat, _activation(value, act, clip_lo, clip_hi), [out])


def _conv2d_f32_channels(input_shape, weight_shape, stride, padding, dilation, has_bias: bool, act: str,
                         clip_lo: float, clip_hi: float, knobs: ConvKnobs, tail: FloatTail | None) -> tirx.PrimFunc:
    """:func:`conv2d_f32` with output channels on the lanes (one group): the weights come as
    ``w: f32[ceil(O/16), C, KH, KW, 16]`` (:func:`csqc.artifact.channel_lanes_weight`), and a
    register tile is ``row_block`` output positions (flattened over batch and plane, each input
    value broadcast) x ``col_vectors`` vectors of 16 output channels. The lanes stay full on
    small planes, where the pixel form fills 4 of 16 lanes on a 4x4 plane and 7 on a 7x7 one.
    Broadcasts need no contiguous input, so an unpadded conv reads ``x`` itself at any stride (a
    strided 1x1 shortcut touches a quarter of its input) and a padded one a zero-padded copy.
    Parallel tasks run the position blocks of one channel block in a row, so a thread streams
    that block's weights from its cache once per position block rather than from memory. Each
    sum is the same float32 additions in the same order as the pixel form's (input channel, then
    tap), so the forms agree bit for bit."""
    n, c, h, w = (int(s) for s in input_shape)
    o, _, kh, kw = (int(s) for s in weight_shape)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    tiles = -(-o // LANES)
    src_h, src_w = h + 2 * ph, w + 2 * pw
    src_hw = src_h * src_w
    positions = n * oh * ow
    rows = max(1, min(knobs.row_block, positions))
    row_blocks = -(-positions // rows)
    vectors = max(1, min(knobs.col_vectors or 1, tiles))
    col_blocks = -(-tiles // vectors)
    params = _conv_params((n, c, h, w), (tiles, c, kh, kw, LANES), (n, o, oh, ow), has_bias, act, tail)

    def body(x, weight, *rest):
        named, y_flat = _conv_outputs(params, rest, tail)
        w_flat = _flat(weight)
        if ph or pw:
            src = I.alloc_buffer((n * c * src_hw,), F32, scope="global")
            _emit_phase_split(_flat(x), src, (n, c, h, w), (1, 1), (ph, pw), (src_h, src_w), 0.0)
        else:
            src = _flat(x)
        with I.parallel(0, col_blocks * row_blocks) as task:
            first = task % row_blocks * rows
            tile0 = task // row_blocks * vectors
            base = _local((rows,), "int32")
            with I.unroll(0, rows) as r:
                p = tirx.min(first + r, positions - 1)  # past the last position: recompute it, store nothing
                I.buffer_store(base, (p // (oh * ow)) * (c * src_hw) + (p // ow % oh) * sh * src_w + p % ow * sw, [r])
            acc = _zeroed_accumulators(rows * vectors)
            with I.serial(0, c) as ic:
                with I.serial(0, kh) as ki:
                    with I.unroll(0, kw) as kj:
                        tap = ic * src_hw + ki * dh * src_w + kj * dw
                        with I.unroll(0, rows) as r:
                            with I.unroll(0, vectors) as v:
                                with I.vectorized(0, LANES) as lane:
                                    tile = tirx.min(tile0 + v, tiles - 1)
                                    wv = w_flat[(((tile * c + ic) * kh + ki) * kw + kj) * LANES + lane]
                                    slot = (r * vectors + v) * LANES + lane
                                    I.buffer_store(acc, acc[slot] + src[base[r] + tap] * wv, [slot])
            with I.serial(0, rows) as r:
                p = first + r
                with I.serial(0, vectors) as v:
                    with I.serial(0, LANES) as lane:
                        oc = (tile0 + v) * LANES + lane
                        with I.If(tirx.all(p < positions, oc < o)):
                            with I.Then():
                                out = ((p // (oh * ow) * o + oc) * oh + p // ow % oh) * ow + p % ow
                                _store_sum(acc[(r * vectors + v) * LANES + lane], oc, out, named, y_flat, tail, act,
                                           clip_lo, clip_hi)

    return prim_func(params, body)


def float_conv_knobs(input_shape, weight_shape, stride, padding, dilation, groups: int) -> ConvKnobs:
    """:func:`conv2d_f32`'s schedule for a shape: output channels on the lanes where those fill
    more of the vectors than the pixels of an output row do (AVX-512, one group), else
    :func:`default_conv_knobs`. The pixel form's lanes are a row of the output plane (the whole
    plane for an unpadded 1x1), so on planes whose rows are no multiple of 16 it computes padding
    lanes or narrow vectors. Zen 4, 2 threads (pixels -> channels, 4 positions x 4 vectors):
    512 -> 512 3x3 at 4x4 958 -> 392 us, at 2x2 583 -> 112, 256 -> 256 at 7x7 579 -> 326, 256 ->
    512 3x3 stride 2 from 7x7 609 -> 272, 128 -> 128 at 14x14 386 -> 347, 64 -> 64 at 28x28 406 ->
    365 and at 8x8 50 -> 42, 1024 -> 256 1x1 at 7x7 194 -> 153 (rows of 5); a full-row plane
    (16 -> 16 3x3 at 32x32) 74 against 75-101, and 1x1 convs on 4x4 planes even: those keep the
    pixels. Below AVX-512 the pixel form's tile is :func:`default_conv_knobs`' 4 channels x 16
    pixels, 8 channels where rows are at most 8 pixels (``-mcpu=haswell``, one thread, 512 ->
    512 3x3 at 4x4: 4 channels 3,064 us, 8 channels 1,941; 64 -> 64 at 12x12: 290 against 818).
    Large 3x3 convs of stride 1 take Winograd (:func:`.winograd.winograd_knobs`) first."""
    n, c, h, w = (int(s) for s in input_shape)
    o, cg, kh, kw = (int(s) for s in weight_shape)
    default = default_conv_knobs(o, cg * kh * kw, _pair(stride), groups)
    if groups != 1:
        return default
    from .winograd import winograd_knobs  # (winograd.py builds on this module's helpers)
    winograd = winograd_knobs(input_shape, weight_shape, stride, padding, dilation)
    if winograd is not None:
        return winograd
    oh, ow = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    row_len = oh * ow if kh == kw == 1 else ow
    if tier() != AVX512:  # rows of up to 8 pixels fill half a vector: 8 channels, as many registers
        return replace(default, oc_block=8) if row_len <= LANES // 2 else default
    if default != ConvKnobs():  # a stem's tile
        return default
    pixel_use = row_len / (-(-row_len // LANES) * LANES)
    tiles = -(-o // LANES)
    vectors = min(4, tiles)
    positions = n * oh * ow
    rows = min((4, 5, 6), key=lambda r: (-(-positions // r) * r, r))
    channel_use = o / (tiles * LANES) * positions / (-(-positions // rows) * rows)
    if channel_use <= pixel_use:
        return default
    return ConvKnobs(row_block=rows, col_vectors=vectors)


def default_conv_knobs(out_channels: int, taps: int, stride: tuple[int, int], groups: int) -> ConvKnobs:
    """:func:`conv2d_f32`'s register tile unless one is given: a strided conv of few taps per
    output (an image stem: 3 channels x 3x3) and at most 32 outputs takes them all in one tile of
    16 pixels, so every input vector it loads feeds one FMA per output channel. Measured, 3 -> O
    3x3 stride 2 at 224x224 (2 threads), against 8 channels x 32 pixels: O = 32 173 -> 97 us
    (MobileNetV2's stem), 16 113 -> 54, 24 110 -> 78; 64 outputs in two tiles of 32 lose (219 ->
    270), and so do unstrided stems (3 -> 64 at 224x224: 497 against 602 us). At most 24
    channels a tile (conv2d_f32 takes the largest divisor of O up to that): 32 accumulators are
    all of AVX-512's registers, and around a calibrated stem's codes tail they spilled
    (MobileNetV2 calibrated, Zen 5, alternating runs: 911 -> 884 us with tiles of 16).

    Below AVX-512 (AVX2's 16 registers, NEON's 128-bit ones) every conv takes 4 channels x 16
    pixels, 8 registers of sums where 8 x 32 wanted 32 and spilled: ``-mcpu=haswell`` on Zen 4,
    2 threads, (8, 32) -> (4, 16): 128 -> 128 3x3 at 28x28 6,308 -> 2,725 us, 256 -> 256 at 14x14
    13,650 -> 4,325, 128 -> 128 stride 2 from 28x28 3,543 -> 1,382, 3 -> 64 7x7 stride 2 at 224x224
    2,454 -> 1,754, MobileNetV2's stem (24 x 16 before) 402 -> 229. (NEON not timed.)"""
    if tier() != AVX512:
        return ConvKnobs(oc_block=4, segment=LANES)
    if groups == 1 and max(stride) > 1 and taps <= 32 and out_channels <= 32:
        return ConvKnobs(oc_block=min(out_channels, 24), segment=LANES)
    return ConvKnobs()


def _row_tiles(row_len: int, segment: int) -> list[tuple[int, int]]:
    """Cover a row with ``(count, width)`` runs of tiles: full segments, then the remainder as
    whole vectors, then one narrow vector (odd widths such as 17 or 24 make LLVM emit poor code)."""
    segment = max(LANES, segment // LANES * LANES)
    full, rest = divmod(row_len, segment)
    tiles = [(full, segment)] if full else []
    if rest >= LANES:
        tiles.append((1, rest // LANES * LANES))
    if rest % LANES:
        tiles.append((1, rest % LANES))
    return tiles


def _dispatch_tiles(tiles, index, emit_tile):
    """``emit_tile(col0, width)`` for tile ``index`` of the runs in ``tiles`` (uniform branches)."""
    (count, width), rest = tiles[0], tiles[1:]
    if not rest:
        emit_tile(index * width, width)
        return
    with I.If(index < count):
        with I.Then():
            emit_tile(index * width, width)
        with I.Else():
            _dispatch_tiles([(c, w) for c, w in rest], index - count, lambda col0, w: emit_tile(count * width + col0, w))


def _emit_phase_split(x_flat, dst, shape, stride, padding, dst_hw, fill: float):
    """``dst[n, c, rh, rw, i, j] = xpad[n, c, i*sh + rh, j*sw + rw]`` (``fill`` outside ``x``).

    Parallel over destination rows; the row test is uniform, the column test is a per-lane
    select on a clamped (always in-bounds) load. With column stride 2 a vector of 16 columns
    whose 32 source columns lie inside the row is two contiguous loads and one shuffle of their
    even (or odd) lanes instead: per-lane loads of every other column (16 scalar loads and
    inserts a vector) took a third of MobileNetV2's stem.
    """
    n, c, h, w = shape
    (sh, sw), (ph, pw), (dst_h, dst_w) = stride, padding, dst_hw
    rows = n * c * sh * sw * dst_h

    def source_row(row):
        """``(plane, ih, rw)``: destination row ``row``'s input plane (n * C + c), input row and
        column phase."""
        i = row % dst_h
        rw = row // dst_h % sw
        rh = row // (dst_h * sw) % sh
        return row // (dst_h * sw * sh), i * sh + rh - ph, rw

    def emit(row, j):
        plane, ih, rw = source_row(row)
        iw = j * sw + rw - pw
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        load = x_flat[plane * (h * w) + tirx.min(tirx.max(ih, 0), h - 1) * w + tirx.min(tirx.max(iw, 0), w - 1)]
        I.buffer_store(dst, tirx.Select(inside, load, _f32(fill)), [row * dst_w + j])

    if sw != 2 or dst_w < LANES:
        _for_each(rows, dst_w, emit)
        return
    full = dst_w // LANES
    even_lanes = [tirx.const(2 * lane, "int32") for lane in range(LANES)]
    with _parallel_or_serial(rows, rows * dst_w) as row:
        plane, ih, rw = source_row(row)
        with I.serial(0, full) as v:
            first = v * (LANES * sw) + rw - pw  # the vector's first source column
            with I.If(tirx.all(ih >= 0, ih < h, first >= 0, first + 2 * LANES <= w)):
                with I.Then():
                    source = plane * (h * w) + ih * w + first
                    pair = [x_flat[tirx.Ramp(source, 1, LANES)], x_flat[tirx.Ramp(source + LANES, 1, LANES)]]
                    I.buffer_store(dst, tirx.Shuffle(pair, even_lanes), [tirx.Ramp(row * dst_w + v * LANES, 1, LANES)])
                with I.Else():
                    with I.vectorized(0, LANES) as lane:
                        emit(row, v * LANES + lane)
        if dst_w % LANES:
            with I.vectorized(0, dst_w % LANES) as lane:
                emit(row, full * LANES + lane)


def linear_f32(M: int, K: int, N: int, has_bias: bool, act: str = "none", clip_lo: float = 0.0,
               clip_hi: float = 0.0, knobs: LinearKnobs = LinearKnobs()) -> tirx.PrimFunc:
    """Float32 linear layer ``y = act(x @ w.T + b)``.

    Parameters: ``x: f32[M,K], w: f32[N,K], b: f32[N]`` (when ``has_bias``), ``y: f32[M,N]``.

    Schedule: dot products along K (both operands contiguous, so the weights stream once,
    which is what batch-1 layers need): a register tile of ``m_block x n_block`` 16-lane partial
    sums, parallel over tiles, the K remainder and the lane sums folded at the end.
    """
    _check_act(act)
    m_block = _largest_divisor(M, knobs.m_block)
    n_block = _largest_divisor(N, knobs.n_block if M > 1 else 2 * knobs.n_block)
    k_vectors, k_tail = divmod(K, LANES)
    n_tiles = N // n_block
    params = [("x", (M, K), F32), ("w", (N, K), F32)]
    if has_bias:
        params.append(("b", (N,), F32))
    params.append(("y", (M, N), F32))

    def body(x, weight, *rest):
        bias, y = (rest[0], rest[1]) if has_bias else (None, rest[0])
        with _parallel_or_serial((M // m_block) * n_tiles, M * N * K) as task:
            m0 = task // n_tiles * m_block
            n0 = task % n_tiles * n_block
            acc = _local((m_block * n_block * LANES,))
            total = _local((m_block * n_block,))
            with I.unroll(0, m_block * n_block) as ij:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(acc, _f32(0.0), [ij * LANES + lane])
            if k_vectors:
                with I.serial(0, k_vectors) as kv:
                    with I.unroll(0, m_block) as i:
                        with I.unroll(0, n_block) as j:
                            with I.vectorized(0, LANES) as lane:
                                slot = (i * n_block + j) * LANES + lane
                                product = x[m0 + i, kv * LANES + lane] * weight[n0 + j, kv * LANES + lane]
                                I.buffer_store(acc, acc[slot] + product, [slot])
            with I.unroll(0, m_block) as i:
                with I.unroll(0, n_block) as j:
                    I.buffer_store(total, _f32(0.0), [i * n_block + j])
                    with I.unroll(0, LANES) as lane:
                        I.buffer_store(total, total[i * n_block + j] + acc[(i * n_block + j) * LANES + lane], [i * n_block + j])
                    if k_tail:
                        with I.serial(0, k_tail) as kt:
                            k = k_vectors * LANES + kt
                            I.buffer_store(total, total[i * n_block + j] + x[m0 + i, k] * weight[n0 + j, k], [i * n_block + j])
                    value = total[i * n_block + j]
                    if bias is not None:
                        value = value + bias[n0 + j]
                    I.buffer_store(y, _activation(value, act, clip_lo, clip_hi), [m0 + i, n0 + j])

    return prim_func(params, body)
