"""csqc's torch custom operators: the quantized layers as they appear in a captured graph.

A finalized CSQ layer computes ``W = scale * q / (2^N - 1)`` with integer ``q``. Exporting it as
plain aten ops would constant-fold ``W`` into a float tensor and lose ``q``, the bit mask and N;
these ops keep them as explicit arguments so capture reads the integer weights directly and a
model file stays self-describing.

Numerics (the order of float operations is part of the contract; every runtime repeats it):
  weight:      W = (float32(q) * scale) / (2^N - 1)
  activation:  L = 2^a - 1, S = max|x| (dynamic) or the static scale
               code = round_half_even((|x| * L) / S), clamped to L for a static scale
               value = (sign(x) * code * S) / L,  and 0 everywhere when S == 0
  asymmetric activation (unsigned codes u with a zero point zp, range R; csqc.interpreter):
               dynamic: lo = min(min(x), 0), R = max(max(x), 0) - lo, zp = round((-lo * L) / R)
               static:  R = the calibrated range hi - lo, zp = its zero point
               u = clamp(round((x * L) / R) + zp, 0, L),  value = (float32(u - zp) * R) / L,
               all codes and zp 0 when R == 0
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "dequantize_weight",
    "act_codes",
    "fake_quant_act",
    "quant_linear",
    "quant_conv2d",
    "quant_conv_transpose2d",
    "transposed_weight",
    "polyphase_weight",
    "act_quant",
    "act_codes_asymmetric",
    "fake_quant_act_asymmetric",
    "act_quant_asymmetric",
]


def dequantize_weight(q: Tensor, scale: Tensor, n_bits: int) -> Tensor:
    """The float weight of a finalized CSQ layer, in csqc's canonical operation order."""
    scale = scale.to(torch.float32)
    if scale.numel() > 1:  # per-output-channel scale
        scale = scale.reshape((-1,) + (1,) * (q.dim() - 1))
    return (q.to(torch.float32) * scale) / float(2**n_bits - 1)


def act_codes(x: Tensor, bits: int, static_scale: float) -> tuple[Tensor, Tensor]:
    """Signed integer activation codes and the tensor scale ``S`` (see module docstring)."""
    levels = float(2**bits - 1)
    x = x.to(torch.float32)
    if static_scale > 0:
        s = torch.tensor(static_scale, dtype=torch.float32, device=x.device)
    else:
        s = x.abs().amax()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    mag = torch.round((x.abs() * levels) / safe)
    if static_scale > 0:
        mag = torch.clamp(mag, max=levels)
    codes = torch.where(s > 0, torch.sign(x) * mag, torch.zeros_like(x))
    return codes, s


def fake_quant_act(x: Tensor, bits: int, static_scale: float) -> Tensor:
    codes, s = act_codes(x, bits, static_scale)
    return (codes * s) / float(2**bits - 1)


@torch.library.custom_op("csqc::act_quant", mutates_args=())
def act_quant(x: Tensor, bits: int, static_scale: float) -> Tensor:
    """a-bit activation quantization; ``static_scale <= 0`` selects the dynamic max-abs scale."""
    return fake_quant_act(x, bits, static_scale)


@act_quant.register_fake
def _act_quant_fake(x, bits, static_scale):
    return torch.empty_like(x)


def act_codes_asymmetric(x: Tensor, bits: int, static_range: float, zero_point: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Unsigned codes ``u``, the range ``R`` and the zero point of the asymmetric quantizer
    (module docstring); ``static_range <= 0`` selects the dynamic range."""
    levels = float(2**bits - 1)
    x = x.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if static_range > 0:
        r = torch.tensor(static_range, dtype=torch.float32, device=x.device)
        zp = torch.tensor(float(zero_point), dtype=torch.float32, device=x.device)
    else:
        lo = torch.minimum(x.amin(), zero) if x.numel() else zero
        hi = torch.maximum(x.amax(), zero) if x.numel() else zero
        r = hi - lo
        zp = torch.where(r > 0, torch.round((-lo * levels) / torch.where(r > 0, r, torch.ones_like(r))), zero)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    codes = torch.clamp(torch.round((x * levels) / safe) + zp, 0.0, levels)
    codes = torch.where(r > 0, codes, torch.zeros_like(x))
    return codes, r, torch.where(r > 0, zp, zero)


def fake_quant_act_asymmetric(x: Tensor, bits: int, static_range: float, zero_point: int) -> Tensor:
    codes, r, zp = act_codes_asymmetric(x, bits, static_range, zero_point)
    return ((codes - zp) * r) / float(2**bits - 1)


@torch.library.custom_op("csqc::act_quant_asymmetric", mutates_args=())
def act_quant_asymmetric(x: Tensor, bits: int, static_range: float, zero_point: int) -> Tensor:
    """a-bit asymmetric activation quantization (unsigned codes, zero point); ``static_range <= 0``
    selects the dynamic range and zero point."""
    return fake_quant_act_asymmetric(x, bits, static_range, zero_point)


@act_quant_asymmetric.register_fake
def _act_quant_asymmetric_fake(x, bits, static_range, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("csqc::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, n_bits: int, active_mask: int
) -> Tensor:
    """Linear layer with CSQ weights; ``active_mask`` bit b set = bit position b is kept."""
    return torch.nn.functional.linear(x, dequantize_weight(q, scale, n_bits), bias)


@quant_linear.register_fake
def _quant_linear_fake(x, q, scale, bias, n_bits, active_mask):
    return x.new_empty(tuple(x.shape[:-1]) + (q.shape[0],))


@torch.library.custom_op("csqc::quant_conv2d", mutates_args=())
def quant_conv2d(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    n_bits: int,
    active_mask: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """2-D convolution with CSQ weights (NCHW, weight OIHW)."""
    w = dequantize_weight(q, scale, n_bits)
    return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)


@quant_conv2d.register_fake
def _quant_conv2d_fake(x, q, scale, bias, n_bits, active_mask, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    kh, kw = q.shape[2], q.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, q.shape[0], oh, ow))


def transposed_weight(w: Tensor, groups: int) -> Tensor:
    """``nn.ConvTranspose2d``'s weight ``[C_in, C_out/g, kh, kw]`` from the weight of the
    stride-one convolution it equals on the zero-stuffed input, ``[C_out, C_in/g, kh, kw]``
    (each group's channels swapped, the kernel flipped); its own inverse's counterpart."""
    o, c_g, kh, kw = w.shape
    return (w.flip(2, 3).reshape(groups, o // groups, c_g, kh, kw).transpose(1, 2)
            .reshape(groups * c_g, o // groups, kh, kw))


def convolution_weight(w: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`transposed_weight`: ``[C_in, C_out/g, kh, kw]`` -> ``[C_out, C_in/g, kh, kw]``."""
    c_in, o_g, kh, kw = w.shape
    return (w.reshape(groups, c_in // groups, o_g, kh, kw).transpose(1, 2)
            .reshape(groups * o_g, c_in // groups, kh, kw).flip(2, 3))


def polyphase_weight(w: Tensor, stride) -> Tensor:
    """A transposed convolution of stride ``(sh, sw)`` and dilation one as ``sh * sw`` stride-one
    convolutions of the unstuffed input, stacked as output channels: from its stride-one weight
    ``w`` (:func:`convolution_weight`'s ``[C_out, C_in/g, kh, kw]``) the weight
    ``[C_out * sh * sw, C_in/g, ceil(kh/sh), ceil(kw/sw)]`` whose channel ``(c, rh, rw)`` holds
    the taps ``rh + j * sh`` (``rw + i * sw``) of channel ``c``, zeros where they run past the
    kernel. Convolved with padding ``ceil(k/s) - 1`` it gives, at ``(qh, qw)``, the transposed
    convolution's output at ``qh * sh + rh - padding`` (likewise in width): the same products
    without the stuffed zeros' (``1 / (sh * sw)`` of the work)."""
    c_out, c_g, kh, kw = w.shape
    sh, sw = (int(s) for s in stride)
    jh, jw = -(-kh // sh), -(-kw // sw)
    taps = w.flip(2, 3)  # taps[..., t] multiplies the input t positions before the output (in stride units: t // s)
    taps = torch.nn.functional.pad(taps, (0, jw * sw - kw, 0, jh * sh - kh))  # zero taps past the kernel
    # tap t = r + j * s -> phase r, position j; the stride-one convolution reads position j at offset J - 1 - j
    phases = taps.reshape(c_out, c_g, jh, sh, jw, sw).flip(2, 4).permute(0, 3, 5, 1, 2, 4)
    return phases.reshape(c_out * sh * sw, c_g, jh, jw).contiguous()


@torch.library.custom_op("csqc::quant_conv_transpose2d", mutates_args=())
def quant_conv_transpose2d(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    n_bits: int,
    active_mask: int,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """2-D transposed convolution with CSQ weights. ``q`` is stored as the weight of the stride-one
    convolution the transposed one equals on the zero-stuffed input (``[C_out, C_in/g, kh, kw]``,
    flipped), so its rows are output channels like every other CSQ layer's."""
    w = transposed_weight(dequantize_weight(q, scale, n_bits), groups)
    return torch.nn.functional.conv_transpose2d(x, w, bias, stride, padding, output_padding, groups, dilation)


@quant_conv_transpose2d.register_fake
def _quant_conv_transpose2d_fake(x, q, scale, bias, n_bits, active_mask, stride, padding, output_padding, dilation,
                                 groups):
    n, _, h, w = x.shape
    size = [(n_in - 1) * s - 2 * p + d * (k - 1) + e + 1
            for n_in, s, p, d, k, e in zip((h, w), stride, padding, dilation, q.shape[2:], output_padding)]
    return x.new_empty((n, q.shape[0], *size))
