"""Reference interpreter for the IR (numpy): the golden model every target is checked against.

Its integer path is exact: accumulators are computed with float64 BLAS on integer-valued
operands, which is exact while every partial sum stays below 2^53 (checked), then returned as
int64. Float operations follow the order the IR documents (``csqc.ir``), in float32.
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .bitplanes import unpack_planes
from .errors import BadInput, CsqcError
from .ir import Graph, Node, QUANT_LAYER_OPS

__all__ = ["QValue", "run", "decode_weight", "conv2d_nchw", "HANDLERS", "quantization_overflows",
           "largest_safe_scale", "scale_overflow",
           "overflow_error"]

_F32 = np.float32
_EXACT_LIMIT = 2.0**53


@dataclass(frozen=True)
class QValue:
    """A quantized activation at run time: integer codes and the float32 tensor scale ``S``."""

    codes: np.ndarray  # int32 codes in [-L, L] (or [0, L] when unsigned)
    scale: np.float32
    bits: int

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def dequantize(self) -> np.ndarray:
        return (self.codes.astype(_F32) * _F32(self.scale)) / _F32(self.levels)


def decode_weight(g: Graph, n: Node) -> np.ndarray:
    """The integer weight (int64, ``weight_shape``) a quantized layer multiplies with."""
    spec, w = n.quant, g.params[n.inputs[1]]
    shape = tuple(n.attr("weight_shape"))
    if spec.encoding == "int":
        return w.astype(np.int64).reshape(shape)
    k = int(np.prod(shape[1:]))
    planes = unpack_planes(w, k, spec.packed_word) if spec.packed_word else w
    q = np.zeros((shape[0], k), dtype=np.int64)
    for (shift, sign), plane in zip(spec.planes, planes):
        q += sign * (1 << shift) * plane.astype(np.int64)
    return (q - spec.zero_point).reshape(shape)


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
    outs = []
    for gi in range(groups):
        cols, oh, ow = _im2col(x[:, gi * cg : (gi + 1) * cg], kh, kw, stride, padding, dilation)
        wg = w[gi * og : (gi + 1) * og].reshape(og, -1).astype(x.dtype)
        outs.append(cols @ wg.T)  # [B, OH*OW, og]
    y = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    return y.transpose(0, 2, 1).reshape(b, o, oh, ow)


def _channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _activation(n: Node, y: np.ndarray) -> np.ndarray:
    act = n.attr("act", "none")
    if act == "relu":
        return np.maximum(y, _F32(0))
    if act == "clip":
        return np.clip(y, _F32(n.attr("clip_lo")), _F32(n.attr("clip_hi"))).astype(_F32)
    return y


def _quant_layer(g: Graph, n: Node, x, record: dict | None, planes_used: Mapping[str, int] | None):
    q = decode_weight(g, n)
    if planes_used and n.name in planes_used and n.quant.encoding != "int":
        q = _truncated_weight(g, n, planes_used[n.name])
    mult = g.params[n.inputs[2]]
    add = g.params[n.inputs[3]] if len(n.inputs) == 4 else None
    is_conv = n.op == "qconv2d"
    axis = 1 if is_conv else -1
    if isinstance(x, QValue):
        a = x.codes.astype(np.float64)
        bound = float(np.abs(q).sum(axis=tuple(range(1, q.ndim))).max(initial=0)) * x.levels
        if bound >= _EXACT_LIMIT:
            raise CsqcError(f"{n.name}: accumulator bound {bound:.3g} exceeds the exact range of the interpreter")
        if is_conv:
            acc = conv2d_nchw(a, q.astype(np.float64), n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        else:
            acc = a @ q.astype(np.float64).T
        acc = acc.astype(np.int64)
        if record is not None:
            record[f"{n.name}.acc"] = acc << n.quant.low_shift  # comparable across plane-shift passes
        y = (acc.astype(_F32) * _F32(x.scale)) / _F32(x.levels)
    else:
        xf = np.asarray(x, dtype=_F32)
        wf = q.astype(_F32)
        if is_conv:
            y = conv2d_nchw(xf, wf, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")).astype(_F32)
        else:
            y = (xf @ wf.T).astype(_F32)
    y = y * _channel(mult, y.ndim, axis)
    if add is not None:
        y = y + _channel(add, y.ndim, axis)
    return _activation(n, y.astype(_F32))


def _truncated_weight(g: Graph, n: Node, keep: int) -> np.ndarray:
    """PrecisionBatching's run-time knob: only the ``keep`` most significant planes count."""
    spec = n.quant
    sub = n.replace(quant=spec.replace(planes=spec.planes[:keep]))
    w = g.params[n.inputs[1]][:keep]
    tmp = g.with_params({n.inputs[1] + "#trunc": w})
    return decode_weight(tmp, sub.replace(inputs=(n.inputs[0], n.inputs[1] + "#trunc") + n.inputs[2:]))


def quantization_overflows(scale, levels) -> bool:
    """Whether ``|x| * L`` overflows float32 for some ``|x| <= scale`` (or the scale is NaN).

    Every runtime computes ``(|x| * L) / S`` in float32; rounding is monotonic, so the
    largest ``|x|`` (the dynamic scale itself) decides: this is the exact bound.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return not np.isfinite(_F32(scale) * _F32(levels))


@functools.lru_cache(maxsize=None)
def largest_safe_scale(levels: int) -> float:
    """The largest float32 ``S`` with ``S * L`` finite in float32, so that
    ``quantization_overflows(s, levels) == (not s <= largest_safe_scale(levels))`` for every
    float32 ``s`` (NaN included): one float comparison where a call is timed in microseconds."""
    lo, hi = 0, int(np.array(np.finfo(_F32).max, _F32).view(np.uint32))  # positive floats order like their bits
    while lo < hi:  # the largest bit pattern whose float does not overflow
        mid = (lo + hi + 1) // 2
        if quantization_overflows(np.array(mid, np.uint32).view(_F32), levels):
            hi = mid - 1
        else:
            lo = mid
    return float(np.array(lo, np.uint32).view(_F32))


def scale_overflow(quantize: str, scale, levels: int) -> str:
    """Where an overflow shows, for ``overflow_error``: a dynamic scale out of range."""
    if not np.isfinite(scale):
        return f"{quantize} quantizes NaN or infinite activations"
    return f"{quantize} quantizes activations up to {float(scale):.4g}, and {float(scale):.4g} * {levels} overflows"


def overflow_error(where: str) -> BadInput:
    """The one error every runtime raises for an input that leaves float32's range inside the model."""
    return BadInput(f"the input overflows float32 inside the model ({where}); csqc refuses inputs whose "
                    "activations leave float32's range: scale the input down")


def _quantize(n: Node, x: np.ndarray) -> QValue:
    bits = n.attr("bits")
    levels = _F32(2**bits - 1)
    x = np.asarray(x, dtype=_F32)
    static = n.attr("static_scale", 0.0)
    s = _F32(static) if static > 0 else _F32(np.abs(x).max(initial=0))
    if static > 0 and not np.isfinite(x).all():  # a static scale clamps huge values, not NaN
        raise overflow_error(f"{n.name} quantizes NaN or infinite activations")
    if static <= 0 and quantization_overflows(s, levels):
        raise overflow_error(scale_overflow(n.name, s, int(levels)))
    if s > 0:
        mag = np.round((np.abs(x) * levels) / s)
        if static > 0:
            mag = np.minimum(mag, levels)
        codes = (np.sign(x) * mag).astype(np.int32)
    else:
        codes = np.zeros(x.shape, dtype=np.int32)
    return QValue(codes, s, bits)


def _float_layer(g: Graph, n: Node, x):
    w = g.params[n.inputs[1]]
    b = g.params[n.inputs[2]] if len(n.inputs) == 3 else None
    if n.op == "conv2d":
        y = conv2d_nchw(np.asarray(x, _F32), w, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        if b is not None:
            y = y + _channel(b, 4, 1)
    else:
        y = np.asarray(x, _F32) @ w.T
        if b is not None:
            y = y + b
    return _activation(n, y.astype(_F32))


def _pool(x: np.ndarray, n: Node, reduce: str) -> np.ndarray:
    kh, kw = n.attr("kernel")
    stride = n.attr("stride")
    padding = n.attr("padding")
    dilation = n.attr("dilation", (1, 1))
    b, c, h, w = x.shape
    if n.attr("ceil_mode", False):
        raise CsqcError(f"{n.name}: ceil_mode pooling is not supported")
    fill = -np.inf if reduce == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=fill) if any(padding) else x
    s = xp.strides
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    view = np.lib.stride_tricks.as_strided(
        xp, (b, c, oh, ow, kh, kw), (s[0], s[1], s[2] * stride[0], s[3] * stride[1], s[2] * dilation[0], s[3] * dilation[1]),
        writeable=False,
    )
    if reduce == "max":
        return view.max(axis=(4, 5)).astype(_F32)
    total = view.sum(axis=(4, 5), dtype=_F32)
    divisor = n.attr("divisor", 0) or (kh * kw)
    if not n.attr("count_include_pad", True) and any(padding):
        ones = np.pad(np.ones((h, w), _F32), ((padding[0],) * 2, (padding[1],) * 2))
        so = ones.strides
        cnt = np.lib.stride_tricks.as_strided(ones, (oh, ow, kh, kw), (so[0] * stride[0], so[1] * stride[1], so[0], so[1])).sum(axis=(2, 3))
        return (total / cnt).astype(_F32)
    return (total / _F32(divisor)).astype(_F32)


def _adaptive_avg(x: np.ndarray, n: Node) -> np.ndarray:
    oh, ow = n.attr("output_size")
    b, c, h, w = x.shape
    if h % oh or w % ow:
        raise CsqcError(f"{n.name}: adaptive pooling {h}x{w} -> {oh}x{ow} needs divisible sizes")
    return x.reshape(b, c, oh, h // oh, ow, w // ow).mean(axis=(3, 5), dtype=_F32).astype(_F32)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(_F32)


def _float(v):
    return v.dequantize() if isinstance(v, QValue) else v


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float32 (exp overflows to inf for x < -88: the result is 0)."""
    with np.errstate(over="ignore"):
        return (_F32(1) / (_F32(1) + np.exp(-np.asarray(x, _F32)))).astype(_F32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, axis: int, eps: float) -> np.ndarray:
    """Over the trailing axes from ``axis``, in float32: ``mean = sum(x) / D; d = x - mean;
    var = sum(d * d) / D; y = (d / sqrt(var + eps)) * w + b``."""
    x = np.asarray(x, _F32)
    axes = tuple(range(axis, x.ndim))
    count = _F32(np.prod(x.shape[axis:]))
    mean = x.sum(axis=axes, keepdims=True, dtype=_F32) / count
    d = x - mean
    var = (d * d).sum(axis=axes, keepdims=True, dtype=_F32) / count
    return ((d / np.sqrt(var + _F32(eps))) * w + b).astype(_F32)


_SQRT1_2 = _F32(0.7071067811865476)
_TANH_GELU_C = _F32(0.7978845608028654)  # sqrt(2 / pi)
_TANH_GELU_K = _F32(0.044715)
_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """``(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`` (erf correctly rounded to float32), or the tanh
    form ``(x * 0.5) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * ((x * x) * x))))``."""
    x = np.asarray(x, _F32)
    if approximate == "tanh":
        inner = _TANH_GELU_C * (x + _TANH_GELU_K * ((x * x) * x))
        t = np.tanh(inner).astype(_F32)
    else:
        t = _erf64(x * _SQRT1_2).astype(_F32) if x.size else x.copy()
    return ((x * _F32(0.5)) * (_F32(1) + t)).astype(_F32)


def _slice(x: np.ndarray, n: Node) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[n.attr("axis")] = slice(n.attr("start"), n.attr("end"))
    return np.ascontiguousarray(x[tuple(index)])


HANDLERS: dict[str, Callable] = {
    "quantize": lambda g, n, a, **k: _quantize(n, _float(a[0])),
    "dequantize": lambda g, n, a, **k: a[0].dequantize(),
    "conv2d": lambda g, n, a, **k: _float_layer(g, n, _float(a[0])),
    "linear": lambda g, n, a, **k: _float_layer(g, n, _float(a[0])),
    "batch_norm": lambda g, n, a, **k: (a[0] * _channel(a[1], a[0].ndim, 1) + _channel(a[2], a[0].ndim, 1)).astype(_F32),
    "relu": lambda g, n, a, **k: np.maximum(a[0], _F32(0)),
    "clip": lambda g, n, a, **k: np.clip(a[0], _F32(n.attr("lo")), _F32(n.attr("hi"))).astype(_F32),
    "minimum": lambda g, n, a, **k: np.minimum(a[0], a[1]).astype(_F32),
    "add": lambda g, n, a, **k: (_float(a[0]) + _float(a[1])).astype(_F32),
    "mul": lambda g, n, a, **k: (_float(a[0]) * _float(a[1])).astype(_F32),
    "cat": lambda g, n, a, **k: np.concatenate([_float(v) for v in a], axis=n.attr("axis")),
    "max_pool2d": lambda g, n, a, **k: _pool(a[0], n, "max"),
    "avg_pool2d": lambda g, n, a, **k: _pool(a[0], n, "avg"),
    "adaptive_avg_pool2d": lambda g, n, a, **k: _adaptive_avg(a[0], n),
    "mean": lambda g, n, a, **k: a[0].mean(axis=tuple(n.attr("dims")), keepdims=n.attr("keepdim"), dtype=_F32).astype(_F32),
    "reshape": lambda g, n, a, **k: np.ascontiguousarray(_float(a[0])).reshape(n.type.shape),
    "permute": lambda g, n, a, **k: np.ascontiguousarray(np.transpose(_float(a[0]), n.attr("dims"))),
    "softmax": lambda g, n, a, **k: _softmax(a[0], n.attr("axis")),
    "sigmoid": lambda g, n, a, **k: _sigmoid(_float(a[0])),
    "tanh": lambda g, n, a, **k: np.tanh(np.asarray(_float(a[0]), _F32)).astype(_F32),
    "sub": lambda g, n, a, **k: (_float(a[0]) - _float(a[1])).astype(_F32),
    "slice": lambda g, n, a, **k: _slice(_float(a[0]), n),
    "matmul": lambda g, n, a, **k: np.matmul(np.asarray(_float(a[0]), _F32), np.asarray(_float(a[1]), _F32)).astype(_F32),
    "layer_norm": lambda g, n, a, **k: _layer_norm(_float(a[0]), a[1], a[2], n.attr("axis"), n.attr("eps")),
    "gelu": lambda g, n, a, **k: _gelu(_float(a[0]), n.attr("approximate", "none")),
    "div": lambda g, n, a, **k: (_float(a[0]) / _float(a[1])).astype(_F32),
    "expand": lambda g, n, a, **k: np.array(np.broadcast_to(_float(a[0]), n.type.shape), dtype=_F32),
}


def run(g: Graph, inputs, *, record: dict | None = None, planes_used: Mapping[str, int] | None = None) -> list[np.ndarray]:
    """Run ``g`` on ``inputs`` (a list of arrays, or a dict by input name).

    With ``record`` (a dict), every intermediate value is stored in it by name, plus each
    quantized layer's exact accumulator as ``<layer>.acc`` (scaled back by ``low_shift``) and
    each quantize node's codes and scale as ``<node>.codes`` / ``<node>.scale``.
    ``planes_used`` maps layer names to how many most-significant planes to accumulate.
    """
    if isinstance(inputs, Mapping):
        inputs = [inputs[v.name] for v in g.inputs]
    if len(inputs) != len(g.inputs):
        raise BadInput(f"model takes {len(g.inputs)} input(s), got {len(inputs)}")
    env: dict = dict(g.params)
    for v, x in zip(g.inputs, inputs):
        x = np.asarray(x)
        if tuple(x.shape) != v.type.shape:
            raise BadInput(f"input {v.name}: expected shape {list(v.type.shape)}, got {list(x.shape)}")
        if x.dtype != np.float32:
            if x.dtype.kind not in "fiu":
                raise BadInput(f"input {v.name}: expected float32 data, got {x.dtype}")
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise BadInput(f"input {v.name} contains NaN or infinity")
        env[v.name] = x
    for n in g.nodes:
        args = [env[i] for i in n.inputs]
        # an overflow is refused where it matters (quantize, outputs), with one message
        with np.errstate(over="ignore", invalid="ignore"):
            if n.op in QUANT_LAYER_OPS:
                out = _quant_layer(g, n, args[0], record, planes_used)
            else:
                handler = HANDLERS.get(n.op)
                if handler is None:
                    raise CsqcError(f"interpreter has no handler for op {n.op!r} ({n.name})")
                out = handler(g, n, args)
        env[n.name] = out
        if record is not None:
            record[n.name] = out
            if isinstance(out, QValue):
                record[f"{n.name}.codes"] = out.codes
                record[f"{n.name}.scale"] = out.scale
    outputs = [_float(env[o]) for o in g.outputs]
    for name, y in zip(g.outputs, outputs):
        if not np.isfinite(y).all():
            raise overflow_error(f"output {name} is NaN or infinite")
    return outputs
