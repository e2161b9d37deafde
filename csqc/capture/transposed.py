"""Transposed convolutions: quantized ones as polyphase convs (one per output phase, exact
integer arithmetic on the input's own codes), float ones on a zero-stuffed input."""

from __future__ import annotations

from dataclasses import replace as _replace_fields

import numpy as np
import torch

from .. import ops
from ..ir import Node, TensorType
from .context import _arg, _aten, _base, _Ctx, module_path, _pair, _shape_of, _type_of, _typed
from .layers import _over_height_one, _quant_layer
from .tensors import _padded_axis, _slice_value


def _stuffed(ctx: _Ctx, fx: torch.fx.Node, value: str, shape: list[int], stride, kernel, padding, dilation, extra,
             crop: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
    """A transposed convolution's input as the stride-one convolution reads it: ``stride - 1``
    zeros between its elements along each spatial axis (reshape, cat of zero blocks, reshape,
    slice), padded by ``dilation * (k - 1) - padding`` before and that plus ``output_padding``
    after. Negative pads crop the input (``crop``) or are returned per axis as ``(before, after)``
    for the caller to crop from the convolution's output, which for a stride-one convolution is
    the same. Returns the value, its shape and those crops."""
    crops = []
    for axis, s, k, p, d, e in zip((2, 3), stride, kernel, padding, dilation, extra):
        if s > 1:  # s - 1 zeros after every element, the last ones cut
            zeros = ctx.param(_base(fx, "zeros"), np.zeros((1,) * 4, np.float32))
            ctx.nonneg.add(zeros)
            grown = _typed(ctx, fx, "reshape", [value], shape[:axis + 1] + [1] + shape[axis + 1:], "stuff.pairs")
            block = _typed(ctx, fx, "expand", [zeros], shape[:axis + 1] + [s - 1] + shape[axis + 1:], "stuff.zeros")
            both = _typed(ctx, fx, "cat", [grown, block], shape[:axis + 1] + [s] + shape[axis + 1:], "stuff",
                          {"axis": axis + 1})
            flat = shape[:axis] + [shape[axis] * s] + shape[axis + 1:]
            value = _slice_value(ctx, fx, _typed(ctx, fx, "reshape", [both], flat, "stuff.flat"), flat, axis, 0,
                                 (shape[axis] - 1) * s + 1)
            shape[axis] = (shape[axis] - 1) * s + 1
        before, after = d * (k - 1) - p, d * (k - 1) - p + e
        if not crop:
            crops.append((max(-before, 0), max(-after, 0)))
            before, after = max(before, 0), max(after, 0)
        value = _padded_axis(ctx, fx, value, shape, axis, before, after)
    return value, shape, crops


def _phase_plan(kernel, stride, padding, extra) -> tuple[tuple[int, int], tuple[int, int]]:
    """A transposed convolution of dilation one as the stride-one convolution of
    :func:`csqc.ops.polyphase_weight`: per spatial axis its padding and the first output of the
    interleaved phases to keep. Padding ``ceil(k/s) - 1`` covers the output unless
    ``output_padding`` reaches past the last phase row; one more row (and ``s`` more outputs
    cropped at the start) always does."""
    pads, starts = [], []
    for k, s, p, e in zip(kernel, stride, padding, extra):
        j = -(-k // s)
        more = int(k + e - p > j * s)
        pads.append(j - 1 + more)
        starts.append(p + more * s)
    return tuple(pads), tuple(starts)


def _phases_interleaved(ctx: _Ctx, fx: torch.fx.Node, z: str, z_shape, stride, starts, out_shape) -> str:
    """The stacked phases ``[N, C * sh * sw, Qh, Qw]`` of a polyphase transposed convolution as
    its output: each phase's rows and columns interleaved (reshape, permute, reshape: the
    ``pixel_shuffle`` of its strides), then cropped to ``out_shape`` from ``starts``."""
    n, stacked, qh, qw = z_shape
    sh, sw = stride
    c = stacked // (sh * sw)
    shape = [n, c, qh * sh, qw * sw]
    if sh * sw > 1:
        split = _typed(ctx, fx, "reshape", [z], (n, c, sh, sw, qh, qw), "phases")
        moved = _typed(ctx, fx, "permute", [split], (n, c, qh, sh, qw, sw), "phases.interleave",
                       {"dims": (0, 1, 4, 2, 5, 3)})
        z = _typed(ctx, fx, "reshape", [moved], shape, "phases.merged")
    for axis, start in zip((2, 3), starts):
        z = _slice_value(ctx, fx, z, shape, axis, start, start + out_shape[axis])
        shape[axis] = out_shape[axis]
    return z


def _polyphase_conv_transpose(ctx: _Ctx, fx: torch.fx.Node, x_value: str, x_shape, stride, padding, extra,
                              groups: int, out_shape, float_weight: np.ndarray | None = None) -> str:
    """A transposed convolution of dilation one as one stride-one convolution of
    :func:`csqc.ops.polyphase_weight` over its input as it is, then its phases interleaved and
    cropped: no zero-stuffed input, so no product with a stuffed zero, and a quantized layer's
    input quantizer sees the very tensor PyTorch's does. ``float_weight``: a float layer's
    stride-one weight (``[C_out, C_in/g, kh, kw]``); None: the quantized layer's codes. Returns
    the 4-D result (``out_shape``)."""
    quantized = float_weight is None
    weight = ctx.tensor(fx.args[1]).detach() if quantized else torch.from_numpy(float_weight)
    pads, starts = _phase_plan(weight.shape[2:], stride, padding, extra)
    phase_weight = ops.polyphase_weight(weight, stride).numpy()
    z_shape = (x_shape[0], phase_weight.shape[0]) + tuple(n + 2 * p - j + 1 for n, p, j in
                                                          zip(x_shape[2:], pads, phase_weight.shape[2:]))
    attrs = {"stride": (1, 1), "padding": pads, "dilation": (1, 1), "groups": groups}
    phases = int(stride[0]) * int(stride[1])
    if quantized:
        z = _quant_layer(ctx, fx, conv=True, x_value=x_value, conv_attrs=attrs, ttype=TensorType(z_shape),
                         weight=phase_weight, channel_repeat=phases)
    else:
        base = module_path(fx) or fx.name
        inputs = [x_value, ctx.param(f"{base}.weight", np.ascontiguousarray(phase_weight))]
        if _arg(fx, 2, "bias") is not None:
            bias = ctx.tensor(_arg(fx, 2, "bias")).detach().numpy().astype(np.float32)
            inputs.append(ctx.param(f"{base}.bias", np.repeat(bias, phases)))
        z = _typed(ctx, fx, "conv2d", inputs, z_shape, "phases.conv2d", {**attrs, "act": "none"})
    return _phases_interleaved(ctx, fx, z, z_shape, stride, starts, out_shape)


def _own_input_quantizer(ctx: _Ctx, x, value: str) -> tuple[Node, Node] | None:
    """``(quantize, dequantize)`` of a layer's input where that quantizer is the layer's own (just
    emitted, ``x`` read by nothing else), so capture may move it onto another view of ``x``."""
    producers = {n.name: n for n in ctx.nodes[-2:]}  # an input quantizer is emitted right before its layer
    deq = producers.get(value)
    quant = producers.get(deq.inputs[0]) if deq is not None and deq.op == "dequantize" else None
    own = quant is not None and quant.op == "quantize" and isinstance(x, torch.fx.Node) and len(x.users) == 1
    return (quant, deq) if own else None


def _unquantized(ctx: _Ctx, quantizer: tuple[Node, Node]) -> str:
    """Drops an own input quantizer (:func:`_own_input_quantizer`); returns the float it read."""
    quant, deq = quantizer
    ctx.nodes = [n for n in ctx.nodes if n.name not in (quant.name, deq.name)]
    ctx.taken -= {quant.name, deq.name}
    return quant.inputs[0]


def _requantized(ctx: _Ctx, fx: torch.fx.Node, quantizer: tuple[Node, Node], value: str, shape) -> str:
    """The dropped quantizer again, on ``value`` (of ``shape``), under its own names."""
    quant, deq = quantizer
    q = ctx.emit(fx, "quantize", [value], _replace_fields(quant.type, shape=tuple(shape)), quant.attrs,
                 base=quant.name)
    return ctx.emit(fx, "dequantize", [q], TensorType(tuple(shape)), base=deq.name)


def _point_matrix(w: np.ndarray, padding, ho: int, wo: int) -> np.ndarray:
    """A transposed convolution of a 1x1 input (a generator's first layer, projecting a latent
    vector to a small image) as the linear layer it is: from its weight ``w`` (``[C_in, C_out,
    kh, kw]``) the matrix ``[C_out * ho * wo, C_in]`` whose row ``(c, oh, ow)`` holds the taps
    ``w[:, c, oh + ph, ow + pw]`` (zeros past the kernel: output padding). The padded
    convolution would multiply mostly padding."""
    c_in, c_out, kh, kw = w.shape
    taps = np.zeros((c_in, c_out, ho + padding[0], wo + padding[1]), w.dtype)
    taps[:, :, :kh, :kw] = w[:, :, :ho + padding[0], :wo + padding[1]]
    return np.ascontiguousarray(taps[:, :, padding[0]:, padding[1]:].reshape(c_in, -1).T)


def _quant_conv_transpose(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``csqc::quant_conv_transpose2d``: of a 1x1 input, a qlinear (:func:`_point_matrix`; its
    own quantizer moved onto the input's [N, C] view: the same codes); of dilation one, the
    polyphase qconv2d (:func:`_polyphase_conv_transpose`); dilated, the stride-one qconv2d of its stored
    (convolution-layout) weights over the zero-stuffed, padded input. The stuffing and padding
    then happen on the float input before the layer's quantizer: zeros change neither max|x| nor
    the zero-point quantizer's range (which always holds 0), and quantize to the code of zero, so
    the codes are those of quantizing first. Padding beyond ``dilation * (k - 1)`` crops the
    convolution's output rather than its input, so the quantizer still sees every element."""
    x = fx.args[0]
    stride, padding, extra, dilation = (tuple(int(v) for v in _pair(a)) for a in fx.args[6:10])
    kernel = tuple(int(k) for k in ctx.tensor(fx.args[1]).shape[2:])
    groups, value, shape = int(fx.args[10]), ctx.value(x), list(_shape_of(x))
    own = _own_input_quantizer(ctx, x, value)
    read_codes = own is not None or any(n.name == value and n.op == "dequantize" for n in ctx.nodes)
    if shape[2:] == [1, 1] and groups == 1 and dilation == (1, 1) and (own is not None or not read_codes):
        source = _unquantized(ctx, own) if own is not None else value
        vector = _typed(ctx, fx, "reshape", [source], shape[:2], "as_vector")
        if own is not None:  # the same elements, so the same codes
            vector = _requantized(ctx, fx, own, vector, shape[:2])
        codes = ops.transposed_weight(ctx.tensor(fx.args[1]).detach(), 1).numpy()
        _, c_out, ho, wo = _type_of(fx).shape
        y = _quant_layer(ctx, fx, conv=False, x_value=vector, ttype=TensorType((shape[0], c_out * ho * wo)),
                         weight=_point_matrix(codes, padding, ho, wo), channel_repeat=ho * wo)
        return ctx.emit(fx, "reshape", [y], base=_base(fx, "conv_transpose2d"))
    if dilation == (1, 1):
        return _polyphase_conv_transpose(ctx, fx, value, shape, stride, padding, extra, groups, _type_of(fx).shape)
    source = _unquantized(ctx, own) if own is not None else value  # re-emitted below, on the stuffed input
    value, shape, crops = _stuffed(ctx, fx, source, shape, stride, kernel, padding, dilation, extra, crop=False)
    if own is not None:
        value = _requantized(ctx, fx, own, value, shape)
    out = [shape[0], int(ctx.tensor(fx.args[1]).shape[0])] + [n - d * (k - 1) for n, d, k in
                                                               zip(shape[2:], dilation, kernel)]
    attrs = {"stride": (1, 1), "padding": (0, 0), "dilation": dilation, "groups": int(fx.args[10])}
    if not any(b or a for b, a in crops):
        return _quant_layer(ctx, fx, conv=True, x_value=value, conv_attrs=attrs)
    y = _quant_layer(ctx, fx, conv=True, x_value=value, conv_attrs=attrs, ttype=TensorType(tuple(out)))
    for axis, (before, after) in zip((2, 3), crops):
        y = _slice_value(ctx, fx, y, out, axis, before, out[axis] - after,
                         _type_of(fx) if axis == 3 else None)
        out[axis] -= before + after
    return y


def _point_conv_transpose(ctx: _Ctx, fx: torch.fx.Node, value: str, x_shape, w: np.ndarray, padding, out_4d,
                          one_d: bool) -> str:
    """A float transposed convolution of a 1x1 input as a linear layer (:func:`_point_matrix`)."""
    n, c_in = x_shape[:2]
    _, c_out, ho, wo = out_4d
    base = module_path(fx) or fx.name
    inputs = [_typed(ctx, fx, "reshape", [value], (n, c_in), "as_vector"),
              ctx.param(f"{base}.weight", _point_matrix(w, padding, ho, wo))]
    if _arg(fx, 2, "bias") is not None:
        bias = ctx.tensor(_arg(fx, 2, "bias")).detach().numpy().astype(np.float32)
        inputs.append(ctx.param(f"{base}.bias", np.repeat(bias, ho * wo)))
    y = _typed(ctx, fx, "linear", inputs, (n, c_out * ho * wo), "linear", {"act": "none"})
    return ctx.emit(fx, "reshape", [y], base=_base(fx, "conv_transpose1d" if one_d else "conv_transpose2d"))


def _conv_transpose(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """A float ``conv_transpose2d`` / ``conv_transpose1d`` (decoders, GAN generators) as the conv
    it is the gradient of, each group's weight transposed and flipped: of a 1x1 input, a linear
    layer (:func:`_point_matrix`); of dilation one, its polyphase form
    (:func:`_polyphase_conv_transpose`); dilated, over the input with ``stride -
    1`` zeros between its elements along each spatial axis (reshape, cat of zero blocks,
    reshape, slice), padded by ``dilation * (k - 1) - padding`` (plus ``output_padding`` after;
    negative: cropped). Either way the sums are torch's products in another order (float
    tolerance), the same in every runtime."""
    one_d = fx.target == _aten.conv_transpose1d.default
    x_shape = _shape_of(fx.args[0])
    w = ctx.tensor(fx.args[1]).detach().numpy().astype(np.float32)
    if one_d:
        x_shape, w = (x_shape[0], x_shape[1], 1, x_shape[2]), w[:, :, None, :]

    def spatial(i: int, name: str, default: int) -> tuple[int, int]:  # (height, width); 1-D: a neutral height
        if one_d:
            return _over_height_one(fx, i, name, default, default)
        return tuple(int(v) for v in _pair(_arg(fx, i, name, default)))

    stride, padding, extra = spatial(3, "stride", 1), spatial(4, "padding", 0), spatial(5, "output_padding", 0)
    groups, dilation = int(_arg(fx, 6, "groups", 1)), spatial(7, "dilation", 1)
    c_in, c_out_g, kh, kw = w.shape
    base = module_path(fx) or fx.name
    value = ctx.value(fx.args[0])
    if one_d:
        value = _typed(ctx, fx, "reshape", [value], x_shape, "as_2d")
    flipped = np.ascontiguousarray(w.reshape(groups, c_in // groups, c_out_g, kh, kw).transpose(0, 2, 1, 3, 4)
                                   .reshape(groups * c_out_g, c_in // groups, kh, kw)[:, :, ::-1, ::-1])
    out = _type_of(fx).shape
    out_4d = (out[0], out[1], 1, out[2]) if one_d else tuple(out)
    if tuple(x_shape[2:]) == (1, 1) and groups == 1 and tuple(dilation) == (1, 1):
        return _point_conv_transpose(ctx, fx, value, x_shape, w, padding, out_4d, one_d)
    if tuple(dilation) == (1, 1):
        y = _polyphase_conv_transpose(ctx, fx, value, x_shape, stride, padding, extra, groups, out_4d, flipped)
        return ctx.emit(fx, "reshape", [y], base=_base(fx, "conv_transpose1d")) if one_d else y
    value, _, _ = _stuffed(ctx, fx, value, list(x_shape), stride, (kh, kw), padding, dilation, extra, crop=True)
    inputs = [value, ctx.param(f"{base}.weight", flipped)]
    if _arg(fx, 2, "bias") is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(_arg(fx, 2, "bias")).detach().numpy().astype(np.float32)))
    attrs = {"stride": (1, 1), "padding": (0, 0), "dilation": tuple(dilation), "groups": groups, "act": "none"}
    if not one_d:
        return ctx.emit(fx, "conv2d", inputs, attrs=attrs)
    conv = _typed(ctx, fx, "conv2d", inputs, (out[0], out[1], 1, out[2]), "conv2d", attrs)
    return ctx.emit(fx, "reshape", [conv], base=_base(fx, "conv_transpose1d"))
