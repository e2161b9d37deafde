"""The x86 CPU backend of the shared TVM planner: AVX-512 kernels and glue, and their cost model."""
from __future__ import annotations

import numpy as np

from csqc.ir import Node
from csqc.targets.tvm.backend import LayerChoice
from csqc.targets.tvm.geometry import is_depthwise_layer

_LUT_MAX_ACT_BITS = 5  # kernels._LUT_MAX_ACT_BITS (kernels imports TVM; this module must not)

__all__ = ["CpuBackend", "choose_kernel", "has_table_lookup"]


def has_table_lookup(target) -> bool:
    """Whether an x86 TVM target has the byte permutes (AVX-512 VBMI ``vpermb``) of the
    table-lookup bit-serial dense kernel (Ice Lake, Sapphire Rapids, Zen 4 and later;
    Cascade Lake has VNNI without VBMI)."""
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(["avx512vbmi"], target))


def choose_kernel(n: Node, rows: int, q: np.ndarray, table_lookup: bool = False) -> LayerChoice:
    """Pick the faster kernel for one quantized layer (a cost model from measurements here).

    Bit-serial cost grows with planes x activation bits per row; int8 VNNI cost is flat in
    bits. Measured on this CPU (AVX-512 VPOPCNTDQ + VNNI): at one row, 2-bit weights x 4-bit
    activations (8 plane pairs) run ~1.6x faster bit-serial, 4 x 8 (32 pairs) ~2.4x slower;
    at 64 rows int8 wins at every width.  With ``table_lookup`` (the vpermb GEMV, cost flat in
    activation bits up to 5) one row stays bit-serial up to 5 planes: 4096x4096 on a Zen 5 core,
    5 planes took 118-143 us against 157-177 us for int8 (10 MiB of planes against 16 MiB).
    """
    spec = n.quant
    if spec.act_bits is None:
        return _choose_float_input_kernel(n, rows)
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


# Weight-only (float input) linear layers: the table-lookup kernel costs planes/4 lookups per
# weight and row, the fp32 kernel one FMA per weight and row but streams 32-bit weights; both
# grow linearly with rows. Measured here (4096x4096, one thread, busy 2-core AMD EPYC): lut
# 2.2-4.4x faster than fp32 at 8 and 16 rows with 3 and 5 planes (16 x 5 = 80 row-planes, the
# largest measured); at 256x784 (fp32 weights in cache) fp32 ties at 1 row and wins at 4.
_LUT_MAX_ROW_PLANES = 80
_LUT_MIN_WEIGHTS = 1 << 18  # 1 MiB of fp32 weights: below that they stay in cache


def _choose_float_input_kernel(n: Node, rows: int) -> LayerChoice:
    """``lut`` or ``float`` for a quantized layer whose input is not quantized."""
    if n.op != "qlinear":
        return LayerChoice("float", "input activations are not quantized (convolution: fp32 kernel)")
    planes = max(1, n.quant.num_planes)
    weights = int(np.prod(n.attr("weight_shape")))
    if weights < _LUT_MIN_WEIGHTS:
        return LayerChoice("float", f"float input, {weights} weights: fp32 weights stay in cache, one FMA each is cheaper")
    if rows * planes > _LUT_MAX_ROW_PLANES:
        return LayerChoice("float", f"float input, {rows} row(s) x {planes} planes: fp32 FMAs are cheaper than lookups")
    return LayerChoice("lut", f"float input, {rows} row(s) x {planes} planes: table lookups over packed planes "
                              f"stream {planes} bits per weight instead of 32")


class CpuBackend:
    """``TvmBackend`` of the ``llvm`` target (TVM imported on construction, not on import)."""

    name = "llvm"
    # signed activations feeding only linear layers are quantized to one offset code buffer
    # (code + L), so each layer multiplies once instead of once per sign
    offset_codes = True
    fused_requant = True  # the epilogue writes the codes the next layer reads
    int16_depthwise = True  # 32 int16 lanes per register where the accumulator bound allows
    # consecutive elementwise nodes (and a quantizer after them) run as one kernel: an LSTM
    # step's gates are one call instead of fifteen (glue.elementwise_chain)
    fuse_elementwise = True

    def __init__(self, table_lookup: bool = False):
        """``table_lookup``: build bit-serial dense kernels with ``vpermb`` table lookups (the
        target CPU has AVX-512 VBMI; see :func:`has_table_lookup`)."""
        from . import glue, kernels, packing

        self.glue, self.kernels, self.packing = glue, kernels, packing
        self.table_lookup = table_lookup

    def bitserial_knobs(self):
        return self.kernels.BitserialKnobs(table_lookup=self.table_lookup)

    def choose_kernel(self, n: Node, rows: int, q: np.ndarray) -> LayerChoice:
        return choose_kernel(n, rows, q, self.table_lookup)
