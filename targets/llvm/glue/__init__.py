"""Scheduled TensorIR "glue" kernels of the csqc LLVM (CPU) target: everything but the integer layers.

The integer (bit-serial / bit-parallel) layers live in :mod:`csqc.targets.llvm.kernels`; this
package provides the rest of a CPU artifact: activation quantize / dequantize, the float epilogue
of quantized layers, float convolution and linear layers, elementwise ops with broadcasting,
pooling, reductions, softmax and layout ops.

Semantics and float32 operation order follow the golden model, :mod:`csqc.interpreter`:

* quantize: ``S = static_scale`` if > 0 else ``max|x|``; ``codes = round_half_even((|x| * L) / S)``
  (clamped to ``L`` when static), as uint8 magnitudes (pos / neg planes when signed), or for
  signed activations as one offset code ``sign(x) * code + L`` (``offset=True``).
* quantize_asymmetric: the interpreter's asymmetric quantizer (range ``R`` as the scale, an
  int32 zero point, unsigned codes ``u``); ``centered=True`` stores the sign parts of ``u - zp``
  instead, which every reader of symmetric signed codes takes as they are.
* epilogue: ``y = ((f32(acc - acc_neg) * S) / L) * mult[c] + add[c]``, then the activation; with
  offset codes ``acc - acc_offset[c]`` replaces ``acc - acc_neg``; with asymmetric codes
  ``acc - zp * acc_offset[c]`` (``acc_offset`` then holds the weight sums ``sum_k q[c, k]``).
* pooling / mean: sum, then one division; max pooling pads with -inf.

Exactness: LLVM is allowed to contract ``a * b + c`` into an FMA under TVM's default target
options, which changes the rounding.  Where the interpreter multiplies and then adds, the product
goes through ``llvm.arithmetic.fence`` (:func:`_rounded`) so the add sees the rounded product.
The quantizer and epilogue divisions by a scale or by ``L`` are hot (a vector divide costs about
ten multiplies), so where nothing can underflow or overflow they run as :func:`_quotient`, a
reciprocal multiply with two FMA corrections that gives the correctly rounded quotient (the
same float32 as the divide), or for the constant ``L`` as :func:`_split_quotient` (one multiply
and one FMA, checked exact for every significand); elsewhere divisions stay divisions.  Float
conv / linear sums use FMAs and a different summation order (within 1e-5 relative, not
bit-identical to numpy); large 3x3 float convs sum by Winograd's transforms, within the same.

Every builder is a pure function of static shapes and attributes and returns a scheduled
``tvm.tirx.PrimFunc`` (loops already carry their parallel / vectorized / unrolled kinds: TVM
0.27's default pipeline schedules nothing).  Buffers are row-major (NCHW for images); the last
parameter is the output (``quantize`` has two or three outputs: ``scale`` and the codes).
Compile them with :func:`csqc.targets.llvm.kernels.build`, which disables StorageRewrite so the
register-sized scratch buffers stay on the stack.

Modules: ``common.py`` (rounding fences, exact quotients, loop builders), ``quantizers.py``,
``code_search.py`` (codes by integer thresholds), ``epilogues.py``, ``float_layers.py`` (with
``winograd.py``: its 3x3 convs by Winograd F(2x2, 3x3)),
``layout.py``, ``elementwise.py`` (vector exp, log, erf), ``reductions.py`` (pooling, softmax)
and ``transformer.py`` (batched matmul, layer norm); the builders are re-exported here.
"""
from __future__ import annotations

from .common import F32, LANES
from .quantizers import dequantize, quantize, quantize_asymmetric
from .code_search import (
    dynamic_search_fits, DYNAMIC_SEARCH_MIN_ROW, dynamic_search_steps, form_codes, form_row, saturated_search_value,
    SEARCH_LANES, searched_codes, store_searched_codes)
from .epilogues import epilogue, TileEpilogue
from .float_layers import (
    conv2d_f32, conv_output_hw, ConvKnobs, default_conv_knobs, float_conv_knobs, FloatTail, linear_f32, LinearKnobs)
from .layout import concat, copy, embedding, slice_axis, take, transpose
from .elementwise import (
    binary, broadcast, CHAIN_OPS, ChainOp, ChainQuantize, channel_affine, elementwise_chain, gelu, select, unary)
from .reductions import adaptive_avg_pool2d, amax, avg_pool2d, max_pool2d, mean, softmax
from .transformer import layer_norm, matmul

__all__ = [
    "ConvKnobs", "default_conv_knobs", "float_conv_knobs", "FloatTail", "conv_output_hw", "LinearKnobs", "quantize",
    "quantize_asymmetric", "dequantize", "epilogue", "TileEpilogue", "conv2d_f32", "linear_f32", "binary",
    "broadcast", "unary", "channel_affine", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean", "amax",
    "softmax", "concat", "slice_axis", "transpose", "copy", "matmul", "layer_norm", "gelu", "embedding", "take", "select",
    "CHAIN_OPS", "ChainOp", "ChainQuantize", "elementwise_chain", "F32", "LANES", "SEARCH_LANES",
    "DYNAMIC_SEARCH_MIN_ROW", "dynamic_search_steps", "dynamic_search_fits", "form_row", "form_codes",
    "saturated_search_value", "searched_codes", "store_searched_codes",
]
