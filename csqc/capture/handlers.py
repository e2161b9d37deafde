"""The frontend's table: each aten (or ``csqc::``) op and the handler that translates it into IR
nodes. An op missing here is reported by ``capture`` with the module it came from."""

from __future__ import annotations

import operator
from typing import Callable

import torch

from .attention import _sdpa
from .context import _arg, _aten, _base, _Ctx, _scalar
from .elementwise import (
    _absolute, _add_product, _binary, _clip, _compared, _COMPARISONS, _difference, _dtype_conversion, _elu,
    _exp_less_one, _float_unary, _gelu, _glu, _interpolated, _leaky_relu, _log_one_plus, _log_sigmoid, _logic, _LOGIC,
    _masked_fill, _maximum, _mish, _negated, _outer, _pow, _power_of_two, _reciprocal_sqrt, _relu, _rrelu_eval, _rsub,
    _selected, _shrink, _sign, _softplus, _squared, _threshold, _triangle)
from .folding import _CONSTANT_ONLY, _constant_only
from .integers import argmax, cumsum
from .layers import (
    _act_quant, _act_quant_asymmetric, _addmm, _batch_norm, _conv1d, _einsum, _embedding, _float_conv,
    _float_conv_convolution, _float_linear, _matmul, _quant_layer, _scaled_sum_of_product)
from .reductions import (
    _amax, _amin, _cosine_similarity, _group_norm, _layer_norm, _log_softmax, _logsumexp, _mean, _rms_norm, _softmax,
    _sum, _variance, _vector_norm)
from .resampling import (
    _adaptive_avg, _adaptive_avg1d, _adaptive_max, _max_pool_with_indices, _pool, _pool1d, _upsample_bicubic,
    _upsample_linear, _upsample_nearest)
from .tensors import (
    _cat, _chunk, _expand, _feature_dropout, _filled, _flip, _folded_patches, _gather, _getitem, _patches, _windows, _index, _index_select, _matrix_transpose,
    _movedim, _narrow, _no_op, _pad, _passthrough, _permute, _pixel_shuffle, _repeat, _repeat_interleave, _reshape,
    _reversed_axes, _roll, _select, _slice, _split, _stack, _tensor_split, _transpose, _unbind)
from .transposed import _conv_transpose, _quant_conv_transpose


HANDLERS: dict[object, Callable[[_Ctx, torch.fx.Node], str]] = {
    torch.ops.csqc.quant_conv2d.default: lambda c, f: _quant_layer(c, f, conv=True),
    torch.ops.csqc.quant_conv_transpose2d.default: lambda c, f: _quant_conv_transpose(c, f),
    torch.ops.csqc.quant_linear.default: lambda c, f: _quant_layer(c, f, conv=False),
    torch.ops.csqc.act_quant.default: _act_quant,
    torch.ops.csqc.act_quant_asymmetric.default: _act_quant_asymmetric,
    _aten.conv2d.default: _float_conv,
    _aten.convolution.default: lambda c, f: _float_conv_convolution(c, f),
    _aten.linear.default: _float_linear,
    _aten.batch_norm.default: _batch_norm,
    _aten._native_batch_norm_legit_no_training.default: _batch_norm,
    _aten.relu.default: _relu,
    _aten.relu_.default: _relu,
    _aten.relu6.default: lambda c, f: _clip(c, f, 0.0, 6.0),
    _aten.hardtanh.default: lambda c, f: _clip(c, f, _arg(f, 1, "min_val", -1.0), _arg(f, 2, "max_val", 1.0)),
    _aten.hardtanh_.default: lambda c, f: _clip(c, f, _arg(f, 1, "min_val", -1.0), _arg(f, 2, "max_val", 1.0)),
    _aten.clamp.default: lambda c, f: _clip(c, f, _arg(f, 1, "min"), _arg(f, 2, "max")),
    _aten.clamp_.default: lambda c, f: _clip(c, f, _arg(f, 1, "min"), _arg(f, 2, "max")),
    _aten.clamp_min.default: lambda c, f: _clip(c, f, f.args[1], None),
    _aten.minimum.default: _binary("minimum"),
    _aten.min.other: _binary("minimum"),  # x.min(alpha): the CSQ reference's PACT clipping
    _aten.add.Tensor: _binary("add"),
    _aten.add_.Tensor: _binary("add"),
    _aten.mul.Tensor: _binary("mul"),
    _aten.mul_.Tensor: _binary("mul"),
    _aten.cat.default: _cat,
    _aten.max_pool2d.default: _pool("max_pool2d"),
    _aten.max_pool2d_with_indices.default: _max_pool_with_indices,
    _aten.avg_pool2d.default: _pool("avg_pool2d"),
    _aten.adaptive_avg_pool2d.default: _adaptive_avg,
    _aten._adaptive_avg_pool2d.default: _adaptive_avg,
    _aten.mean.dim: _mean,
    _aten.sum.dim_IntList: _sum,
    _aten.flatten.using_ints: _reshape,
    _aten.view.default: _reshape,
    _aten.reshape.default: _reshape,
    _aten._unsafe_view.default: _reshape,
    _aten.squeeze.dim: _reshape,
    _aten.unsqueeze.default: _reshape,
    _aten.permute.default: _permute,
    _aten.transpose.int: _transpose,
    _aten.t.default: _transpose,
    _aten.swapaxes.default: _transpose,
    _aten.swapdims.default: _transpose,
    _aten.einsum.default: _einsum,
    _aten.roll.default: _roll,
    _aten.pad.default: _pad,
    _aten.constant_pad_nd.default: _pad,
    _aten.sigmoid.default: _float_unary("sigmoid"),
    _aten.tanh.default: _float_unary("tanh"),
    _aten.sqrt.default: _float_unary("sqrt"),
    _aten.rsqrt.default: _reciprocal_sqrt,
    # vision activations (MobileNetV3, EfficientNet), in place or not
    _aten.hardswish.default: _float_unary("hardswish"),
    _aten.hardswish_.default: _float_unary("hardswish"),
    _aten.hardsigmoid.default: _float_unary("hardsigmoid"),
    _aten.hardsigmoid_.default: _float_unary("hardsigmoid"),
    _aten.silu.default: _float_unary("silu"),
    _aten.silu_.default: _float_unary("silu"),
    _aten.sub.Tensor: _binary("sub"),
    _aten.rsub.Scalar: _rsub,
    _aten.rsub.Tensor: _rsub,
    _aten.slice.Tensor: _slice,
    _aten.select.int: _select,
    _aten.split.Tensor: _split,
    _aten.split_with_sizes.default: _split,
    _aten.chunk.default: _chunk,
    _aten.unbind.int: _unbind,
    _aten.stack.default: _stack,
    _aten.new_zeros.default: _filled(None),
    _aten.zeros.default: _filled(None),
    _aten.zeros_like.default: _filled(None),
    _aten.full.default: _filled(1),
    _aten.softmax.int: _softmax,
    _aten._softmax.default: _softmax,
    _aten.layer_norm.default: _layer_norm,
    _aten.native_layer_norm.default: _layer_norm,
    _aten.gelu.default: _gelu,
    _aten.matmul.default: _matmul,
    _aten.bmm.default: _matmul,
    _aten.div.Tensor: _binary("div"),
    _aten.dropout.default: _passthrough,
    _aten.dropout_.default: _passthrough,
    _aten.contiguous.default: _passthrough,
    _aten.clone.default: _passthrough,
    _aten.alias.default: _passthrough,
    _aten.detach.default: _passthrough,
    operator.getitem: _getitem,
}


# Hugging Face transformers: runtime ops, then ops they only run on constants (masks, positions)
HANDLERS.update({
    _aten.embedding.default: _embedding,
    _aten.cumsum.default: cumsum,  # of integers the model computes (RoBERTa's position ids)
    _aten.argmax.default: argmax,  # of integers (CLIP's end-of-text position)
    _aten.addmm.default: _addmm,
    _aten.unflatten.int: _reshape,
    _aten.pow.Tensor_Scalar: _pow,
    _aten.to.dtype: _dtype_conversion,
    _aten.to.device: _dtype_conversion,
    _aten.to.dtype_layout: _dtype_conversion,
    _aten._to_copy.default: _dtype_conversion,
    _aten.type_as.default: _dtype_conversion,  # (RoBERTa's position ids)
    _aten._assert_tensor_metadata.default: _no_op,
    _aten.detach_.default: _no_op,
    _aten.lift_fresh_copy.default: _no_op,
})


for _op in _CONSTANT_ONLY:
    HANDLERS.setdefault(_op, _constant_only)  # a runtime handler registered elsewhere wins


HANDLERS.update({
    _aten.masked_fill.Scalar: _masked_fill,  # on the model's values with a constant mask; folded on constants
    _aten.upsample_linear1d.vec: _upsample_linear,
    _aten.upsample_bilinear2d.vec: _upsample_linear,
    _aten.upsample_trilinear3d.vec: _upsample_linear,
    _aten.upsample_bicubic2d.vec: _upsample_bicubic,
    _aten.upsample_nearest1d.vec: _upsample_nearest,
    _aten.upsample_nearest2d.vec: _upsample_nearest,
    _aten.upsample_nearest3d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact1d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact2d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact3d.vec: _upsample_nearest,
})


HANDLERS.update({
    _aten.log_sigmoid.default: _log_sigmoid,
    _aten.erf.default: _float_unary("erf"),
    # (of constants alone, as rotary position tables, they still fold at capture)
    _aten.sin.default: _float_unary("sin"),
    _aten.cos.default: _float_unary("cos"),
    _aten.sign.default: _sign,
    _aten.sgn.default: _sign,
    _aten.cosine_similarity.default: _cosine_similarity,
    _aten.log_sigmoid_forward.default: _log_sigmoid,
    _aten.glu.default: _glu,
    _aten.hardshrink.default: _shrink,
    _aten.softshrink.default: _shrink,
    _aten.threshold.default: _threshold,
    _aten.threshold_.default: _threshold,
    _aten.maximum.default: _maximum,
    _aten.rrelu.default: _rrelu_eval,
    _aten.reciprocal.default: lambda c, f: c.emit(f, "div", [_scalar(c, f, 1.0, "one"), c.value(f.args[0])],
                                                  base=_base(f, "reciprocal")),
    _aten.linalg_vector_norm.default: _vector_norm,
    _aten.var.dim: _variance,
    _aten.var.correction: _variance,
    _aten.std.dim: _variance,
    _aten.std.correction: _variance,
    _aten.amax.default: _amax,
    _aten.max.dim: _amax,
    _aten.log_softmax.int: _log_softmax,
    _aten._log_softmax.default: _log_softmax,
    _aten.abs.default: _absolute,
    _aten.exp.default: _float_unary("exp"),
    _aten.log.default: _float_unary("log"),
    _aten.elu.default: _elu,
    _aten.elu_.default: _elu,
    _aten.celu.default: _elu,
    _aten.celu_.default: _elu,
    _aten.selu.default: _elu,
    _aten.selu_.default: _elu,
    _aten.softplus.default: _softplus,
    _aten.mish.default: _mish,
    _aten.mish_.default: _mish,
})


HANDLERS.update({
    _aten.index_select.default: _index_select,
    _aten.index.Tensor: _index,
    _aten.flip.default: _flip,
    _aten.conv_transpose2d.input: _conv_transpose,
    _aten.conv_transpose1d.default: _conv_transpose,
    _aten.group_norm.default: _group_norm,
    _aten.instance_norm.default: _group_norm,
    _aten.leaky_relu.default: _leaky_relu,
    _aten.leaky_relu_.default: _leaky_relu,
    _aten.prelu.default: _leaky_relu,
    _aten._prelu_kernel.default: _leaky_relu,
    _aten.pixel_shuffle.default: _pixel_shuffle,
    _aten.pixel_unshuffle.default: _pixel_shuffle,
    _aten.repeat_interleave.self_int: _repeat_interleave,
    _aten.tile.default: _repeat,
    _aten.narrow.default: _narrow,
    _aten.neg.default: _negated,
    _aten.square.default: _squared,
    _aten.feature_dropout.default: _feature_dropout,
    _aten.conv1d.default: _conv1d,
    _aten.max_pool1d.default: _pool1d("max_pool2d"),
    _aten.avg_pool1d.default: _pool1d("avg_pool2d"),
    _aten.adaptive_avg_pool1d.default: _adaptive_avg1d,
    _aten.adaptive_max_pool2d.default: _adaptive_max,
})


HANDLERS.update({
    _aten.scaled_dot_product_attention.default: _sdpa,
    _aten.expand.default: _expand,
    _aten.expand_as.default: _expand,
    _aten.repeat.default: _repeat,
    _aten.unflatten.int: _reshape,  # nn.MultiheadAttention splits its packed projection with it
})


# views and reductions torch.export keeps as their own ops (x.T, x.mT, movedim, view_as,
# tensor_split, ...), each as the IR ops above compose it
HANDLERS.update({
    _aten.numpy_T.default: _reversed_axes,
    _aten.mT.default: _matrix_transpose,
    _aten.mH.default: _matrix_transpose,
    _aten.adjoint.default: _matrix_transpose,
    _aten.matrix_H.default: _matrix_transpose,
    _aten.movedim.int: _movedim,
    _aten.movedim.intlist: _movedim,
    _aten.moveaxis.int: _movedim,
    _aten.moveaxis.intlist: _movedim,
    _aten.view_as.default: _reshape,
    _aten.reshape_as.default: _reshape,
    _aten.squeeze.default: _reshape,
    _aten.squeeze.dims: _reshape,
    _aten.broadcast_to.default: _expand,
    _aten.tensor_split.sections: _tensor_split,
    _aten.tensor_split.indices: _tensor_split,
    _aten.diff.default: _difference,
    _aten.outer.default: _outer,
    _aten.triu.default: _triangle,
    _aten.tril.default: _triangle,
    _aten.lerp.Scalar: _interpolated,
    _aten.addcmul.default: _add_product,
    _aten.addcdiv.default: _add_product,
    _aten.amin.default: _amin,
    _aten.min.dim: _amin,
    _aten.logsumexp.default: _logsumexp,
    _aten.var_mean.dim: _variance,
    _aten.var_mean.correction: _variance,
    _aten.std_mean.dim: _variance,
    _aten.std_mean.correction: _variance,
})


# the sweep's gaps that compose exactly (or within float tolerance) of IR ops: RMSNorm, BLOOM's
# baddbmm, GPT-2's where over a constant causal mask, max against a tensor, 1-D and overlapping
# adaptive max pools, exp2 / expm1 / log1p of computed values
HANDLERS.update({
    _aten.rms_norm.default: _rms_norm,
    _aten.baddbmm.default: _scaled_sum_of_product,
    _aten.where.self: _selected,
    _aten.where.ScalarOther: _selected,
    _aten.where.ScalarSelf: _selected,
    _aten.masked_fill.Tensor: _masked_fill,
    _aten.max.other: _maximum,
    _aten.adaptive_max_pool1d.default: _adaptive_max,
    _aten.exp2.default: _power_of_two,
    _aten.expm1.default: _exp_less_one,
    _aten.log1p.default: _log_one_plus,
    _aten.gather.default: _gather,  # at a constant index (DeBERTa's relative positions); one take
    _aten.mean.default: _mean,  # x.mean() and x.sum() of the model's values: over every axis
    _aten.sum.default: _sum,
    _aten.multiply.Tensor: _binary("mul"),  # (ConvBERT: torch.multiply, an alias of *)
    _aten.subtract.Tensor: _binary("sub"),
    _aten.divide.Tensor: _binary("div"),
    _aten.true_divide.Tensor: _binary("div"),
})


# comparisons and logic of values the model computes (0.0 / 1.0 in the IR), read by where,
# masked_fill, attention masks and products; of constants alone they still fold at capture
HANDLERS.update({op: _compared for op in _COMPARISONS})
HANDLERS.update({op: _logic for op in _LOGIC})


# sliding windows (PatchTST, MobileViT-v2): Tensor.unfold, F.unfold and F.fold of patches that do
# not overlap, as takes
HANDLERS.update({
    _aten.unfold.default: _windows,
    _aten.im2col.default: _patches,
    _aten.col2im.default: _folded_patches,
})
