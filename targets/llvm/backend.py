"""The x86 CPU backend of the shared TVM planner: kernels and glue per instruction-set tier (``isa.py``),
and their cost model."""
from __future__ import annotations

from typing import Callable

import numpy as np

from csqc.ir import Node
from csqc.targets.tvm.backend import LayerChoice
from csqc.targets.tvm.geometry import is_depthwise_layer

from csqc.artifact import NIBBLE_K, VNNI_LANES, nibble_high_for_range

from .isa import AVX2, AVX512, avx2_dot_exact, avx2_int16_groups
from .packing import dequant_code_bits

_LUT_MAX_ACT_BITS = 5  # kernels._LUT_MAX_ACT_BITS (kernels imports TVM; this module must not)

__all__ = ["CpuBackend", "avx2_dot_bounds", "choose_avx512_kernel", "choose_kernel", "has_table_lookup", "nibble_high",
           "tile_conv", "tile_dense"]


def has_table_lookup(target) -> bool:
    """Whether an x86 TVM target has the byte permutes (AVX-512 VBMI ``vpermb``) of the
    table-lookup bit-serial dense kernel (Ice Lake, Sapphire Rapids, Zen 4 and later;
    Cascade Lake has VNNI without VBMI)."""
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(["avx512vbmi"], target))


def choose_kernel(n: Node, rows: int, q: np.ndarray, table_lookup: bool = False, tier: str = AVX512) -> LayerChoice:
    """Pick the faster kernel for one quantized layer that ``tier`` (``isa.tier``) can run exactly:
    :func:`choose_avx512_kernel`'s choice, with the kernels a smaller tier lacks replaced."""
    choice = choose_avx512_kernel(n, rows, q, table_lookup)
    if tier == AVX512:
        return choice
    # AVX2, measured on a Zen 3 (2 threads, interleaved medians): the bit-serial kernel's popcounts
    # are vpshufb nibble lookups there, and it lost to the AVX2 int8 kernel at every size tried:
    # 4096 x 4096 at one row w2a4 1390 against 779 us, w4a8 4653 against 563, 4 rows w2a4 3334
    # against 673; 1024 x 1024 at one row w2a4 100 against 43, w1a2 54 against 47.
    if n.quant.act_bits is None:
        return _choose_float_input_kernel(n, rows, q, tier)
    if choice.kernel == "bitparallel" and is_depthwise_layer(n.op, n.attr("weight_shape")):
        return choice  # the depthwise kernels are plain integer vector code (no dot product)
    if tier == AVX2 and n.quant.act_bits is not None and n.quant.acc_dtype == "int32" \
            and int(np.abs(q).max(initial=0)) <= 127:
        max_code, max_weight = avx2_dot_bounds(n.quant, q)
        if not avx2_dot_exact(max_code, max_weight):
            return LayerChoice("bitserial", f"codes up to {max_code} x weights up to {max_weight} could saturate "
                                            "AVX2's int16 pair sums (vpmaddubsw); popcounts are exact")
        if choice.kernel == "bitserial":  # (for want of VPOPCNTDQ, not of int8 weights or an int32 sum)
            return LayerChoice("bitparallel", f"AVX2: int8 dot products beat emulated popcounts at every size measured "
                                              f"(an AVX-512 CPU would pick bit-serial: {choice.reason})")
        return choice
    if choice.kernel != "bitparallel":
        return choice
    return LayerChoice("bitserial", f"this CPU has no int8 dot product (an AVX2 or AVX-512 CPU would pick "
                                    f"bit-parallel: {choice.reason})")


def avx2_dot_bounds(spec, q: np.ndarray) -> tuple[int, int]:
    """The largest input code and weight magnitude a bit-parallel layer may multiply: codes are
    one byte, at most ``2 * (2**act_bits - 1)`` (offset codes ``code + L``); the weights of every
    run-time plane count (a most significant prefix of the planes, whose weights can exceed the
    whole one's) lie between minus the negative planes' sum and the positive planes' sum, less
    the zero point."""
    max_code = min(255, 2 * (2**spec.act_bits - 1))
    positive = sum(1 << int(shift) for shift, sign in spec.planes if sign > 0)
    negative = sum(1 << int(shift) for shift, sign in spec.planes if sign < 0)
    zero_point = int(spec.zero_point)
    return max_code, max(int(np.abs(q).max(initial=0)), positive - zero_point, negative + zero_point)


def choose_avx512_kernel(n: Node, rows: int, q: np.ndarray, table_lookup: bool = False) -> LayerChoice:
    """Pick the faster kernel for one quantized layer on an AVX-512 VNNI CPU (a cost model from
    measurements here).

    Bit-serial cost grows with planes x activation bits per row; int8 VNNI cost is flat in
    bits. Measured on this CPU (AVX-512 VPOPCNTDQ + VNNI): at one row, 2-bit weights x 4-bit
    activations (8 plane pairs) run ~1.6x faster bit-serial, 4 x 8 (32 pairs) ~2.4x slower;
    at 64 rows int8 wins at every width.  With ``table_lookup`` (the vpermb GEMV, cost flat in
    activation bits up to 5) one row stays bit-serial up to 5 planes: 4096x4096 on a Zen 5 core,
    5 planes took 118-143 us against 157-177 us for int8 (10 MiB of planes against 16 MiB).
    """
    spec = n.quant
    if spec.act_bits is None:
        return _choose_float_input_kernel(n, rows, q)
    fits_int8 = int(np.abs(q).max(initial=0)) <= 127
    pairs = max(1, spec.num_planes) * spec.act_bits
    depthwise = is_depthwise_layer(n.op, n.attr("weight_shape"))
    if spec.acc_dtype == "int64":
        return LayerChoice("bitserial", "int64 accumulator needed (only the bit-serial kernel has one)")
    if not fits_int8:
        return LayerChoice("bitserial", "weights exceed int8")
    if depthwise:
        return LayerChoice("bitparallel", "depthwise: K is tiny, direct int8 kernel")
    # (offset activation codes take one more bit, hence < rather than <=)
    if table_lookup and n.op == "qlinear" and rows == 1 and spec.act_bits < _LUT_MAX_ACT_BITS \
            and spec.num_planes <= 5:
        return LayerChoice("bitserial", f"one row, {spec.num_planes} planes: table lookups stream fewer bytes "
                                        "than int8")
    if rows * pairs <= 12:
        return LayerChoice("bitserial", f"{rows} row(s) x {pairs} plane pairs: popcount is cheaper")
    return LayerChoice("bitparallel", f"{rows} rows x {pairs} plane pairs: int8 dot products are cheaper")


# Weight-only (float input) linear layers. Per 16 weights and row the table-lookup kernel costs
# planes/4 lookups (vpermps) and adds, the dequantizing kernel one lookup shared by up to 4 rows
# and one FMA per row, the fp32 kernel one FMA per row but streams 32-bit weights. Measured here
# (busy 2-core AMD EPYC, 2 threads, min of 5): 4096x4096 at one row, 3 planes lut 437-559 us vs
# dequant 651-901 us; 5 planes dequant 651-1861 us vs lut 511-2226 us; 8 rows, 3 planes dequant
# 2158-3217 us vs lut 2331-3865 us vs fp32 14941 us; 8 rows, 5 planes dequant 2699 vs lut 5034;
# 16 rows, 5 planes dequant 6995 vs lut 12728 vs fp32 32319; 64 rows, 3 planes dequant 28494 vs
# lut 40618 vs fp32 157670 (64x1024x1024: 1227 / 1631 / 2263). The load made absolute times
# swing 2-4x between runs; the order held in every run but the one-row, 3-plane one.
# lut alone (planes that form no unsigned code): 2.2-4.4x faster than fp32 at 8 and 16 rows
# with 3 and 5 planes (16 x 5 = 80 row-planes, the largest measured); at 256x784 (fp32 weights
# in cache) fp32 ties at 1 row and wins at 4.
_LUT_MAX_ROW_PLANES = 80
_LUT_MIN_WEIGHTS = 1 << 18  # 1 MiB of fp32 weights: below that they stay in cache
_LUT_ONE_ROW_MAX_PLANES = 3  # one row: planes/4 lookups per 16 weights beat dequantizing's one
_DEQUANT_MAX_ROWS = 64  # the largest batch measured against fp32
# AVX2 takes the dequantizing kernel's 8-lane form (a table-lookup kernel would need 8-entry
# tables: 3 activations a lookup, no fewer lookups than dequantizing's one per 8 weights).
# Measured against the fp32 kernel (-mcpu=haswell on a Zen 4, 2 threads, alternating medians),
# 4096 x 4096, 3 planes: 1 row 336 / 1484 us, 2 rows 553 / 1985, 8 rows 1728 / 5040, 64 rows
# 12542 / 39160; 4 planes (two permutes) 1 row 614 / 1481, 64 rows 16901 / 37612; 5 planes (byte
# codes) 1 row 823 / 2104, 8 rows 2904 / 5254, 64 rows 19926 / 41624; 6 planes 1 row 726 / 1820,
# 64 rows 18615 / 40118; 1024 x 1024, 3 planes: 1 row 25 / 33, 64 rows 781 / 1201; 512 x 512:
# 1 row 9 / 10, 8 rows 31 / 54. AVX-512 at 6 planes (two 16-entry lookups added) against lut and
# fp32, 4096 x 4096: 1 row 497 / 738 / 1806 us, 4 rows 909 / 1642 / 2326, 16 rows 3608 / 5624 / 9938.


def _plane_count(spec, q: np.ndarray) -> int:
    """Planes the weight-only kernels read: a layer still stored as integers is split into
    offset planes of ``q - min q`` when lowered."""
    if spec.encoding == "int":
        span = int(q.max(initial=0)) - int(q.min(initial=0))
        return max(1, span.bit_length())
    return max(1, spec.num_planes)


def _choose_float_input_kernel(n: Node, rows: int, q: np.ndarray, tier: str = AVX512) -> LayerChoice:
    """``lut``, ``dequant`` or ``float`` for a quantized layer whose input is not quantized."""
    if n.op != "qlinear":
        return LayerChoice("float", "input activations are not quantized (convolution: fp32 kernel)")
    planes = _plane_count(n.quant, q)
    weights = int(np.prod(n.attr("weight_shape")))
    if tier not in (AVX512, AVX2):
        return LayerChoice("float", "float input: the weight-only kernels need AVX2 or AVX-512 permutes")
    if weights < _LUT_MIN_WEIGHTS:
        return LayerChoice("float", f"float input, {weights} weights: fp32 weights stay in cache, one FMA each is cheaper")
    code_bits = dequant_code_bits(planes)
    if tier == AVX2:
        if not code_bits or rows > _DEQUANT_MAX_ROWS:
            return LayerChoice("float", f"float input, {rows} row(s) x {planes} planes: AVX2's weight-only kernel "
                                        "reads codes of up to 6 planes (64 levels), up to 64 rows")
        return LayerChoice("dequant", f"float input, {rows} row(s) x {planes} planes: {planes}-bit codes dequantized "
                                      "in registers (AVX2: 8-lane lookups, two past 3 planes, shared by up to 4 rows)")
    if code_bits and (rows > 1 or planes > _LUT_ONE_ROW_MAX_PLANES) and rows <= _DEQUANT_MAX_ROWS:
        return LayerChoice("dequant", f"float input, {rows} row(s) x {planes} planes: {planes}-bit codes "
                                      "dequantized in registers, one lookup per 16 weights for up to 4 rows")
    if rows * planes > _LUT_MAX_ROW_PLANES:
        return LayerChoice("float", f"float input, {rows} row(s) x {planes} planes: fp32 FMAs are cheaper than lookups")
    return LayerChoice("lut", f"float input, {rows} row(s) x {planes} planes: table lookups over packed planes "
                              f"stream {planes} bits per weight instead of 32")


# Nibble-packed dense (kernels.nibble_dense): 5 bits per weight instead of 8, and both sign
# parts of 8-bit symmetric codes per weight read. Measured here (Zen 5, 2 threads, 4096x4096,
# weights in [-15, 15], min of 2 runs): one row 66 us against 75 us for the int8 kernel (which
# streams 16 MiB at the L3's bandwidth; unpacking makes the nibble kernel compute bound), two
# sign parts 77 us against 2 x 75 us; 1024 wide 3.8-4.8 us against 4.9 us. At 8 rows the
# unpacking is not hidden: 249 us against 143 us (1024: 15 us against 8.5 us), so one row only.
_NIBBLE_MAX_ROWS = 1


def nibble_high(n: Node, rows: int, weight_range: Callable[[], tuple[int, int]]) -> int | None:
    """The nibble layout's fifth-bit value for bit-parallel linear layer ``n`` when the nibble
    kernel is the faster one (None: the int8 kernel). Its shape must fit the layout (16 outputs,
    32 K positions a block) and its weights, for every plane setting (``weight_range()``, the
    bounds over all of them), span at most 32 values."""
    out_features, k = n.attr("weight_shape")[0], int(np.prod(n.attr("weight_shape")[1:]))
    if n.op != "qlinear" or rows > _NIBBLE_MAX_ROWS or out_features % VNNI_LANES or k % NIBBLE_K:
        return None
    return nibble_high_for_range(*weight_range())


# Signed 8-bit codes' two sign parts in one pass of the int8 dense kernel (one vpdpbusd a weight
# vector, weights complemented where the code is negative) instead of one call a part. Measured
# on a Zen 4 (2 threads, 4096 x 4096, alternating): one row 190 -> 108 us, two 192 -> 158; four
# and eight rows tie (596-606 us at eight), 1024 x 1024 at four and 32 rows too.
_SIGNED_DENSE_MAX_ROWS = 2


# AVX2 bit-parallel convs add two channel groups' vpmaddubsw sums in int16 before one vpmaddwd
# where the bound allows. Measured on a Zen 3 (2 threads, medians of 7, one group against two
# against four): 3x3 64 -> 64 at 56x56 839 / 701 / 820 us; 128 -> 128 at 28x28 895 / 715 / 770;
# 32 -> 32 at 16x16 30.3 / 25.8 / 26.3; 1x1 96 -> 24 at 56x56 105 / 92; 256 -> 512 at 14x14
# 188 / 173; 3x3 stride 2 128 -> 256 at 28x28 603 / 512. (The 4096 x 4096 GEMV streams its
# weights at the memory's bandwidth: 1, 2, 4 groups tie there, so dense layers keep one.)
_CONV_INT16_GROUPS = 2


# AMX tiles (kernels.amx_dense) for bit-parallel linear layers from this many rows. Measured
# (Intel Xeon with AMX-INT8, 2 threads, min of 3 runs), AMX against VNNI: 1024 x 1024 at 1, 4,
# 8, 16, 64 rows 11.8 / 11.9 / 13.0 / 17.5 / 59 us against 13.2 / 16.5 / 26.9 / 49.2 / 192 us;
# 4096 x 4096 ties below 16 rows (both stream the 16 MiB of weights: ~620 us), then 641 against
# 1027 us at 16 rows and 1196 against 3335 us at 64.
_AMX_MIN_ROWS = 4


def tile_dense(m: int, n: int, k: int) -> bool:
    """Whether a bit-parallel linear layer of ``m`` rows runs on AMX tiles (where the target has them)."""
    from .amx import amx_dense_fits

    return m >= _AMX_MIN_ROWS and amx_dense_fits(m, n, k)


# AMX tiles (kernels.amx_conv2d) for convolutions whose products have at least this many channel
# groups of 4 (taps x ceil(C/4)): one tile row. Below it every tile product is mostly empty and
# the int32 tile stores dominate; the VNNI pixel kernel, which can also store int16, wins.
# Measured (Intel Xeon with AMX-INT8, 2 threads), 1x1 convs, AMX against VNNI (int16 out):
# 16 -> 96 at 112x112 182 / 78 us, 24 -> 144 at 56x56 65 / 46, 32 -> 192 at 28x28 30 / 24;
# from 16 groups tiles win: 64 -> 384 at 14x14 12.8 / 18.1, 192 -> 32 at 28x28 27 / 58, and
# 3x3 16 -> 16 at 32x32 (36 groups) 5.3 / 11.3. (Pointwise convs over planes of whole tile rows
# store aligned lines since (amx._amx_pointwise_conv): 16 -> 96 at 112x112 100 us, 24 -> 144 at
# 56x56 37, still behind the VNNI kernel's int16; 144 -> 24 at 56x56 24 against 55-80.)
_AMX_MIN_CONV_GROUPS = 16


def tile_conv(geo) -> bool:
    """Whether a bit-parallel convolution runs on AMX tiles (where the target has them)."""
    from .amx import amx_conv_fits

    return (not geo.is_depthwise and amx_conv_fits(geo)
            and geo.kernel_h * geo.kernel_w * -(-geo.in_channels // 4) >= _AMX_MIN_CONV_GROUPS)


class CpuBackend:
    """``TvmBackend`` of the ``llvm`` target (TVM imported on construction, not on import)."""

    name = "llvm"
    # signed activations feeding only linear layers are quantized to one offset code buffer
    # (code + L), so each layer multiplies once instead of once per sign
    offset_codes = True
    fused_requant = True  # the epilogue writes the codes the next layer reads
    # a residual add (+ relu/clip, + quantize) in the epilogue of the layer feeding it
    fused_residual = True
    int16_depthwise = True  # 32 int16 lanes per register where the accumulator bound allows
    int16_conv_outputs = True  # int16 accumulator buffers where every conv output fits
    # calibrated convs find their codes by a binary search of integer thresholds (vpermw, AVX-512 BW)
    code_search = True
    # ... or by each channel's proved fixed-point int16 form (vpmulhw), where every channel has one
    code_form = True
    # a calibrated depthwise conv whose channels all have forms writes its codes itself: its int16
    # accumulators stay on the task's stack (kernels.bitparallel_depthwise_codes)
    depthwise_codes = True
    # ... and, between two ReLU6 of dynamic scales, tries those codes at the scales the clips bound
    # (6) before it runs the conv and its dynamic epilogue (kernels.bitparallel_depthwise_saturated_codes)
    saturated_scales = True
    # ... and so does a calibrated conv whose pixel-kernel tasks hold whole output planes (the
    # 1x1 convs of 14x14 and 7x7 maps): its channels go through their codes from the task's tile
    # (kernels.bitparallel_conv2d_codes)
    conv_codes = True
    # consecutive elementwise nodes (and a quantizer after them) run as one kernel: an LSTM
    # step's gates are one call instead of fifteen (glue.elementwise_chain)
    fuse_elementwise = True

    def __init__(self, table_lookup: bool = False, amx: bool = False, tuner=None, tier: str = AVX512):
        """``table_lookup``: build bit-serial dense kernels with ``vpermb`` table lookups (the
        target CPU has AVX-512 VBMI; see :func:`has_table_lookup`); ``amx``: the target has AMX
        tiles (``amx.target_has_amx``), taken by bit-parallel linear layers of many rows and by
        convolutions whose channels fill tiles; ``tuner``: a ``tuning.Tuner`` whose knobs the
        bit-parallel convolutions and linear layers off tiles and the bit-serial linear layers
        take (``csqc compile --tune``); ``tier``: the target's instruction-set tier
        (``isa.tier``): below AVX-512 the layers take only kernels that tier runs exactly, and
        calibrated codes come from the float chain (the search and the fixed-point form are
        512-bit word permutes and multiplies)."""
        from . import glue, kernels, packing

        self.glue, self.kernels, self.packing = glue, kernels, packing
        self.tier = tier
        self.dequant_lanes = kernels.LUT_LANES if tier == AVX512 else 8  # AVX2: ymm permutes
        if tier != AVX512:
            self.code_search = self.code_form = False
            table_lookup = amx = False  # (both are AVX-512 CPUs' only)
        self.table_lookup = table_lookup
        # int16 depthwise convs take their taps two at a time (vpermi2b, vpmaddubsw: VBMI too)
        self.depthwise_tap_pairs = table_lookup
        self.amx = amx
        self.tuner = tuner

    def conv_knobs(self, geo):
        """Schedule knobs of a bit-parallel (non-depthwise) convolution off tiles."""
        return self.tuner.conv_knobs(geo) if self.tuner else self._default_knobs()

    def _default_knobs(self, rows: int = 0):
        # AVX2 has half the registers, each half as wide: a quarter of the AVX-512 dense tile,
        # but four output vectors for one row (more independent sums; the conv's register tile is
        # sized per tier by kernels._conv_pixel_plan). Measured on a Zen 3, 2 threads, medians of
        # 7: 4096 x 4096 at one row 1 x 1 vector 184 us, 1 x 3-6 145-148, 1 x 8 189; at 8 rows
        # 4 x 1 1273 us, 4 x 2 1722, 8 x 1 1788; 1024 x 1024 at 64 rows 4 x 1 403, 2 x 2 427, 4 x 2 563.
        if self.tier == AVX512:
            return self.kernels.BitparallelKnobs()
        return self.kernels.BitparallelKnobs(row_block=4, col_vectors=4 if rows == 1 else 1)

    def bitserial_dense_knobs(self, m: int, n: int, k: int, plane_spec, act_bits: int, zero_point: bool,
                              acc_dtype: str, base):
        """Schedule knobs of a bit-serial linear layer (``base``: :meth:`bitserial_knobs`)."""
        return self.tuner.bitserial_dense_knobs(m, n, k, plane_spec, act_bits, zero_point, acc_dtype, base) \
            if self.tuner else base

    def dense_knobs(self, m: int, n: int, k: int):
        """Schedule knobs of a bit-parallel ``[m, k] x [k, n]`` linear layer off tiles (int8 weights)."""
        return self.tuner.dense_knobs(m, n, k) if self.tuner else self._default_knobs(m)

    def bitserial_knobs(self):
        return self.kernels.BitserialKnobs(table_lookup=self.table_lookup)

    def choose_kernel(self, n: Node, rows: int, q: np.ndarray) -> LayerChoice:
        return choose_kernel(n, rows, q, self.table_lookup, self.tier)

    def bitparallel_exact(self, n: Node, q: np.ndarray) -> bool:
        """Whether this tier's bit-parallel kernel computes layer ``n`` exactly (``--kernel bitparallel``)."""
        if self.tier == AVX512 or is_depthwise_layer(n.op, n.attr("weight_shape")):
            return True
        return self.tier == AVX2 and avx2_dot_exact(*avx2_dot_bounds(n.quant, q))

    def depthwise_int16_pays(self, geo) -> bool:
        """Whether depthwise conv ``geo`` gains from int16 accumulation (twice the lanes). On
        AVX2 stride-2 convs over large planes lose with it. Measured on a Zen 3 (2 threads,
        medians of 7, int32 against int16): 3x3 stride 2 96 channels 112 -> 56 191 / 1163 us,
        144 at 56 -> 28 131 / 349, 192 at 28 -> 14 69 / 25, 576 at 14 -> 7 18 / 13; stride 1
        96 at 56 133 / 91, 32 at 112 173 / 94, 960 at 7 457 / 29."""
        return not (self.tier == AVX2 and geo.stride != (1, 1) and geo.out_w >= 28)

    def conv_int16_groups(self, n: Node, q: np.ndarray) -> int:
        """Input-channel groups of bit-parallel conv ``n`` whose ``vpmaddubsw`` sums add in int16
        before widening (``isa.dot4_sum``): 2 on AVX2 where the layer's codes and weights allow it
        (a third fewer multiplies), else 1."""
        if self.tier != AVX2:
            return 1
        return max(1, avx2_int16_groups(*avx2_dot_bounds(n.quant, q), limit=_CONV_INT16_GROUPS))

    def nibble_high(self, n: Node, rows: int, weight_range: Callable[[], tuple[int, int]]) -> int | None:
        return nibble_high(n, rows, weight_range) if self.tier == AVX512 else None  # (its unpacking is AVX-512)

    def small_dense_one_product(self, n: Node, q: np.ndarray) -> bool:
        """Whether the small dense kernel (``kernels.bitparallel_dense_signed``) takes signed
        layer ``n``'s two sign parts in one dot product (``isa.sign_flip_mask``): on AVX-512
        always (``vpdpbusd`` sums in int32), on AVX2 where a pair of products still fits
        ``vpmaddubsw``'s int16 with the weights complemented (``~w = -w - 1``: one larger in
        magnitude) and K is whole groups of 4. AVX2 code (built for ``haswell``) timed on a Zen 4
        core, one row of 1024 outputs: K 256 4.9 -> 3.3 us, K 96 1.9 -> 1.2; but K 98 (a partial
        group) 2.0 -> 3.9."""
        if self.tier == AVX512:
            return True
        max_code, max_weight = avx2_dot_bounds(n.quant, q)
        k = int(np.prod(n.attr("weight_shape")[1:]))
        return self.tier == AVX2 and k % 4 == 0 and avx2_dot_exact(max_code, max_weight + 1)

    def signed_dense(self, m: int, n: int, k: int, layer: Node, q: np.ndarray) -> bool:
        """Whether bit-parallel linear layer ``layer`` (an ``[m, k] x [k, n]`` product, weights
        ``q``) takes its signed codes' two sign parts in one pass
        (``kernels.bitparallel_dense(two_signs=True)``) instead of one call a part: at few rows,
        on AVX-512, and on AVX2 where a pair of codes times weights one larger in magnitude (the
        complemented ones) fits ``vpmaddubsw``'s int16 (``small_dense_one_product``'s bound).
        AVX2 (built for haswell, on a Zen 4, 2 threads), 4096 x 4096 with 8-bit codes: one row
        252-266 us for the two calls against 127-158 for one pass, two rows 720 against 404
        alternating; four rows tie (1,060 / 1,089)."""
        if m > _SIGNED_DENSE_MAX_ROWS or k % 4 or self.tile_dense(m, n, k):
            return False
        return self.tier == AVX512 or self.small_dense_one_product(layer, q)

    def tile_dense(self, m: int, n: int, k: int) -> bool:
        """Whether a bit-parallel ``[m, k] x [k, n]`` product runs on AMX tiles (``kernels.amx_dense``)."""
        return self.amx and tile_dense(m, n, k)

    def tile_dense_epilogue(self, m: int, n: int, k: int) -> bool:
        """Whether such a product on tiles also applies its layer's float epilogue in the core
        (``kernels.amx_dense_epilogue``: no int32 accumulators stored and read back). Always, on tiles."""
        return self.tile_dense(m, n, k)

    def tile_conv(self, geo) -> bool:
        """Whether a bit-parallel convolution (``ConvGeometry``) runs on AMX tiles (``kernels.amx_conv2d``)."""
        return self.amx and tile_conv(geo)

    def tile_codes(self, geo) -> str | None:
        """Which kernel writes a calibrated convolution's codes itself (threshold search or
        fixed-point form), its accumulators never stored and read back: ``"amx"`` straight from
        AMX tiles (``kernels.amx_pointwise_codes``: 1.3x-1.45x faster than the tile conv and the
        searched epilogue on cold caches), ``"pixels"`` from the stack tile of the VNNI pixel
        conv where each task holds whole output planes (``kernels.bitparallel_conv2d_codes``:
        calibrated MobileNetV2, whose 1x1 convs at 14x14 and 7x7 take it, 899 -> 845 us on Zen 5,
        2 threads), else None."""
        from .amx import amx_pointwise_codes_fits

        if self.tile_conv(geo):
            return "amx" if amx_pointwise_codes_fits(geo) else None
        if self.conv_codes and self.tier == AVX512 and self.kernels.conv_codes_fit(geo, self.conv_knobs(geo)):
            return "pixels"
        return None
