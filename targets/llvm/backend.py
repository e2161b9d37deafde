"""The x86 CPU backend of the shared TVM planner: AVX-512 kernels and glue, and their cost model."""
from __future__ import annotations

import numpy as np

from csqc.ir import Node
from csqc.targets.tvm.backend import LayerChoice
from csqc.targets.tvm.geometry import is_depthwise_layer

__all__ = ["CpuBackend", "choose_kernel"]


def choose_kernel(n: Node, rows: int, q: np.ndarray) -> LayerChoice:
    """Pick the faster kernel for one quantized layer (a cost model from measurements here).

    Bit-serial cost grows with planes x activation bits per row; int8 VNNI cost is flat in
    bits. Measured on this CPU (AVX-512 VPOPCNTDQ + VNNI): at one row, 2-bit weights x 4-bit
    activations (8 plane pairs) run ~1.6x faster bit-serial, 4 x 8 (32 pairs) ~2.4x slower;
    at 64 rows int8 wins at every width.
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
    if rows * pairs <= 12:
        return LayerChoice("bitserial", f"{rows} row(s) x {pairs} plane pairs: popcount is cheaper")
    return LayerChoice("bitparallel", f"{rows} rows x {pairs} plane pairs: int8 dot products are cheaper")


# Weight-only (float input) linear layers: the table-lookup kernel costs planes/4 lookups per
# weight and row, the fp32 kernel one FMA per weight and row but streams 32-bit weights.
# Measured here (4096x4096, 2 busy cores): lut 5-9x faster at 1 row and 2-4 planes, still ~2x
# at 8 rows x 4 planes; at 256x784 (fp32 weights in cache) fp32 ties at 1 row and wins at 4.
_LUT_MAX_ROW_PLANES = 32
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

    def __init__(self):
        from . import glue, kernels, packing

        self.glue, self.kernels, self.packing = glue, kernels, packing

    def choose_kernel(self, n: Node, rows: int, q: np.ndarray) -> LayerChoice:
        return choose_kernel(n, rows, q)
