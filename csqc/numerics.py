"""The numpy reference semantics of csqc's float ops (the interpreter runs these).

Each function repeats the order of float32 operations the IR documents for its op, so every
runtime can be held to it; ``csqc.optable`` binds them to op names. Integer-exact parts
(convolutions of integer codes) run in float64 on integer-valued operands.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import BadInput, CsqcError

__all__ = [
    "F32", "conv2d_nchw", "channel", "activation", "pool2d", "pool_output_size", "adaptive_avg_pool2d",
    "adaptive_bounds", "softmax", "sigmoid", "layer_norm", "gelu", "slice_axis", "embedding",
    "hardsigmoid", "hardswish", "silu", "sqrt", "exp", "log", "erf", "sin", "cos", "avg_pool_counts", "adaptive_counts",
]

F32 = np.float32


def _pad_hw(x: np.ndarray, padding) -> np.ndarray:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _im2col(x: np.ndarray, kh, kw, stride, padding, dilation) -> tuple[np.ndarray, int, int]:
    """``[B, C, H, W]`` -> ``[B, OH*OW, C*kh*kw]`` patches (a strided view, then a copy)."""
    x = _pad_hw(x, padding)
    b, c, h, w = x.shape
    sh, sw = stride
    dh, dw = dilation
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise CsqcError(f"convolution output would be empty ({oh}x{ow})")
    s = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (b, oh, ow, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw), writeable=False
    )
    return view.reshape(b, oh * ow, c * kh * kw), oh, ow


def conv2d_nchw(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Grouped 2-D convolution by im2col + matmul in ``x``'s dtype (float64 for exact ints)."""
    b, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    og = o // groups
    if cg == 1 and groups > 1 and x.dtype == np.float64 and b * x.shape[2] * x.shape[3] <= _SMALL_PLANES:
        return _depthwise_exact(x, w, stride, padding, dilation, og)
    # float32 keeps a product per group: its sums round in that product's order (one stacked
    # matmul for all groups rounded differently, e.g. two input channels a group)
    outs = []
    for gi in range(groups):
        cols, oh, ow = _im2col(x[:, gi * cg : (gi + 1) * cg], kh, kw, stride, padding, dilation)
        wg = w[gi * og : (gi + 1) * og].reshape(og, -1).astype(x.dtype)
        outs.append(cols @ wg.T)  # [B, OH*OW, og]
    y = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    return y.transpose(0, 2, 1).reshape(b, o, oh, ow)


# Integer depthwise convs whose planes (times the batch) hold at most this many pixels skip the
# product per channel: there it is mostly Python overhead (4 x 960 x 7 x 7: 29 -> 5 ms); on larger
# planes each channel's product is real work, and cache-sized (32 x 144 x 56 x 56: 528 ms per
# channel, 1035 ms by whole-tensor taps).
_SMALL_PLANES = 16384


def _depthwise_exact(x: np.ndarray, w: np.ndarray, stride, padding, dilation, per_channel: int) -> np.ndarray:
    """A depthwise conv of integers held in float64 as one multiply-add per tap over the whole
    tensor: exact in any order."""
    sh, sw = stride
    dh, dw = dilation
    o, _, kh, kw = w.shape
    xp = _pad_hw(x, padding)
    if per_channel > 1:  # output channel c * per_channel + m reads input channel c
        xp = np.repeat(xp, per_channel, axis=1)
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise CsqcError(f"convolution output would be empty ({oh}x{ow})")
    y = np.zeros((x.shape[0], o, oh, ow), np.float64)
    for r in range(kh):
        for s in range(kw):
            tap = xp[:, :, r * dh:r * dh + sh * (oh - 1) + 1:sh, s * dw:s * dw + sw * (ow - 1) + 1:sw]
            y += w[:, 0, r, s].astype(np.float64)[None, :, None, None] * tap
    return y


def channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def activation(act: str, y: np.ndarray, lo=None, hi=None) -> np.ndarray:
    """A layer's fused activation (``none``, ``relu``, ``clip`` to ``[lo, hi]``)."""
    if act == "relu":
        return np.maximum(y, F32(0))
    if act == "clip":
        return np.clip(y, F32(lo), F32(hi)).astype(F32)
    return y


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size; with ``ceil_mode`` the last window must start inside the
    input or its left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pool2d(x: np.ndarray, kind: str, kernel, stride, padding, dilation=(1, 1), ceil_mode: bool = False,
           count_include_pad: bool = True, divisor: int = 0) -> np.ndarray:
    """Max or average pooling, PyTorch's semantics: padding is ``-inf`` for max and 0 for the
    average; an average divides the float32 window sum by ``divisor`` if set, else by the window's
    size clipped to the padded input (``count_include_pad``) or to the input itself."""
    kh, kw = kernel
    b, c, h, w = x.shape
    oh = pool_output_size(h, kh, stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kw, stride[1], padding[1], dilation[1], ceil_mode)
    # ceil_mode windows may run past the right padding: pad far enough, those cells never count
    extra_h = max(0, (oh - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - (h + 2 * padding[0]))
    extra_w = max(0, (ow - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - (w + 2 * padding[1]))
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0] + extra_h), (padding[1], padding[1] + extra_w)),
                constant_values=fill) if any(padding) or extra_h or extra_w else x
    s = xp.strides
    view = np.lib.stride_tricks.as_strided(
        xp, (b, c, oh, ow, kh, kw), (s[0], s[1], s[2] * stride[0], s[3] * stride[1], s[2] * dilation[0], s[3] * dilation[1]),
        writeable=False,
    )
    if kind == "max":
        return view.max(axis=(4, 5)).astype(F32)
    total = view.sum(axis=(4, 5), dtype=F32)
    if divisor:
        return (total / F32(divisor)).astype(F32)
    counts = np.outer(_window_counts(h, oh, kh, stride[0], padding[0], count_include_pad),
                      _window_counts(w, ow, kw, stride[1], padding[1], count_include_pad)).astype(F32)
    if not count_include_pad or extra_h or extra_w:
        return (total / counts).astype(F32)
    return (total / F32(kh * kw)).astype(F32)  # every window whole: the constant divisor


def _window_counts(size: int, out: int, kernel: int, stride: int, padding: int, include_pad: bool) -> np.ndarray:
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if include_pad:
        return end - start
    return np.minimum(end, size) - np.maximum(start, 0)


def avg_pool_counts(size_hw, kernel, stride, padding, ceil_mode: bool, count_include_pad: bool) -> np.ndarray:
    """The ``[OH, OW]`` float32 divisors :func:`pool2d` uses for an average pool (no divisor
    override): each window's size clipped to the padded input, or to the input itself."""
    outs = [pool_output_size(size_hw[i], kernel[i], stride[i], padding[i], 1, ceil_mode) for i in range(2)]
    rows, cols = (_window_counts(size_hw[i], outs[i], kernel[i], stride[i], padding[i], count_include_pad)
                  for i in range(2))
    return np.outer(rows, cols).astype(F32)


def adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool2d(x: np.ndarray, output_size) -> np.ndarray:
    """Adaptive average pooling: each window's float32 sum divided by its element count."""
    oh, ow = output_size
    b, c, h, w = x.shape
    if h % oh == 0 and w % ow == 0:
        return x.reshape(b, c, oh, h // oh, ow, w // ow).mean(axis=(3, 5), dtype=F32).astype(F32)
    y = np.empty((b, c, oh, ow), F32)
    for i, (h0, h1) in enumerate(adaptive_bounds(h, oh)):
        for j, (w0, w1) in enumerate(adaptive_bounds(w, ow)):
            window = x[:, :, h0:h1, w0:w1]
            y[:, :, i, j] = window.sum(axis=(2, 3), dtype=F32) / F32((h1 - h0) * (w1 - w0))
    return y


def adaptive_counts(size_hw, output_size) -> np.ndarray:
    """The ``[OH, OW]`` float32 element counts of the adaptive pooling windows."""
    rows, cols = ([b - a for a, b in adaptive_bounds(size_hw[i], output_size[i])] for i in range(2))
    return np.outer(rows, cols).astype(F32)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(F32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float32 (exp overflows to inf for x < -88: the result is 0)."""
    with np.errstate(over="ignore"):
        return (F32(1) / (F32(1) + np.exp(-np.asarray(x, F32)))).astype(F32)


def hardsigmoid(x: np.ndarray) -> np.ndarray:
    """PyTorch's ``relu6(x + 3) / 6`` in float32: ``min(max(x + 3, 0), 6) / 6``."""
    x = np.asarray(x, F32)
    return (np.minimum(np.maximum(x + F32(3), F32(0)), F32(6)) / F32(6)).astype(F32)


def hardswish(x: np.ndarray) -> np.ndarray:
    """PyTorch's ``x * relu6(x + 3) / 6`` in float32: ``(x * min(max(x + 3, 0), 6)) / 6``."""
    x = np.asarray(x, F32)
    return ((x * np.minimum(np.maximum(x + F32(3), F32(0)), F32(6))) / F32(6)).astype(F32)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` in float32, the sigmoid being :func:`sigmoid`'s ``1 / (1 + exp(-x))``."""
    x = np.asarray(x, F32)
    return (x * sigmoid(x)).astype(F32)


def sqrt(x: np.ndarray) -> np.ndarray:
    """float32 square root (NaN below zero, without numpy's warning: the run's overflow check
    reports NaN outputs)."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.asarray(x, F32)).astype(F32)


def exp(x: np.ndarray) -> np.ndarray:
    """float32 ``exp`` (inf above ~88.7, 0 below ~-103.9, without numpy's overflow warning)."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, F32)).astype(F32)


def log(x: np.ndarray) -> np.ndarray:
    """float32 natural log (-inf at 0, NaN below it, without numpy's warnings)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(x, F32)).astype(F32)


_erf64 = np.vectorize(math.erf, otypes=[np.float64])
_ERF_BAND = 1e-12  # relative: far above the float64 error of either erf, far below float32's half ulp


def erf(x: np.ndarray) -> np.ndarray:
    """float32 ``erf`` (gelu's), correctly rounded: ``math.erf`` in float64, then rounded once.

    Vectorized by SciPy's float64 erf; the elements within ``_ERF_BAND`` of a float32 rounding
    boundary, where the two float64 erfs could round apart, take ``math.erf`` one by one (a
    Python call for every element was most of a transformer's interpreter time)."""
    from scipy.special import erf as erf64

    with np.errstate(invalid="ignore"):  # (a signaling NaN's cast)
        x64 = np.asarray(x, F32).astype(np.float64)
        y = np.asarray(erf64(x64))  # (SciPy gives a 0-d input back as a scalar)
        out = np.array(y.astype(F32))
        margin = np.abs(y) * _ERF_BAND
        near = (y - margin).astype(F32) != (y + margin).astype(F32)
    if near.any():
        out[near] = _erf64(x64[near]).astype(F32)
    return out


def sin(x: np.ndarray) -> np.ndarray:
    """float32 ``sin`` from float64's, rounded once (numpy's float32 sin takes a CPU-dependent
    vector path): NaN at +-inf and NaN."""
    with np.errstate(invalid="ignore"):
        return np.sin(np.asarray(x, F32).astype(np.float64)).astype(F32)


def cos(x: np.ndarray) -> np.ndarray:
    """float32 ``cos``, as :func:`sin`."""
    with np.errstate(invalid="ignore"):
        return np.cos(np.asarray(x, F32).astype(np.float64)).astype(F32)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, axis: int, eps: float) -> np.ndarray:
    """Over the trailing axes from ``axis``, in float32: ``mean = sum(x) / D; d = x - mean;
    var = sum(d * d) / D; y = (d / sqrt(var + eps)) * w + b``."""
    x = np.asarray(x, F32)
    axes = tuple(range(axis, x.ndim))
    count = F32(np.prod(x.shape[axis:]))
    mean = x.sum(axis=axes, keepdims=True, dtype=F32) / count
    d = x - mean
    var = (d * d).sum(axis=axes, keepdims=True, dtype=F32) / count
    return ((d / np.sqrt(var + F32(eps))) * w + b).astype(F32)


_SQRT1_2 = F32(0.7071067811865476)
_TANH_GELU_C = F32(0.7978845608028654)  # sqrt(2 / pi)
_TANH_GELU_K = F32(0.044715)


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """``(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`` (erf correctly rounded to float32), or the tanh
    form ``(x * 0.5) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * ((x * x) * x))))``."""
    x = np.asarray(x, F32)
    if approximate == "tanh":
        inner = _TANH_GELU_C * (x + _TANH_GELU_K * ((x * x) * x))
        t = np.tanh(inner).astype(F32)
    else:
        t = erf(x * _SQRT1_2)
    return ((x * F32(0.5)) * (F32(1) + t)).astype(F32)


def slice_axis(x: np.ndarray, axis: int, start: int, end: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end)
    return np.ascontiguousarray(x[tuple(index)])


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``table[ids]``; an id outside ``[0, rows)`` is refused, as PyTorch refuses it."""
    ids = np.asarray(ids)
    rows = table.shape[0]
    if ids.dtype.kind not in "iu":
        raise CsqcError(f"embedding ids must be integers, got {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise BadInput(f"token id out of range: ids must lie in [0, {rows}), got {int(ids.min())}..{int(ids.max())}")
    return np.ascontiguousarray(table[ids.astype(np.int64)], dtype=F32)
