"""The op-definition table: one target-neutral entry per IR op.

Every IR op is defined once here: its arity, its attribute schema (checked by ``ir.verify``),
its output shape (checked for every node), the sign rule capture applies (when the output is
known to be >= 0, so an activation quantizer can use unsigned codes), its numpy semantics (what
the interpreter runs, from ``csqc.numerics``), its PyTorch form (the bench baseline), and the
key of its lowering in the shared TVM planner. The IR's op list, the verifier's checks, the
interpreter's handlers and the bench's torch runner derive from this table; capture handlers,
ONNX emitters and TVM kernels stay per target, and each target reports the ops it cannot
lower before it starts (``tests/test_op_matrix.py`` checks every op on every target).

The quantization ops (``quantize``, ``dequantize``, ``qconv2d``, ``qlinear``) carry no numpy
function: their semantics is the quantization contract in ``csqc.interpreter``, which records
exact integer tensors on the way.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import numerics as num
from .numerics import F32

__all__ = ["Attr", "OpDef", "OP_TABLE", "ShapeError", "op_def", "attr_problems", "expected_shape",
           "output_nonneg", "QUANT_OPS"]

REQUIRED = object()


class ShapeError(ValueError):
    """An op's inputs and attributes admit no output shape, or not the node's."""


@dataclass(frozen=True)
class Attr:
    """One attribute: ``kind`` is int, float, bool, str, ints (a tuple of ints) or ints_or_empty."""

    kind: str
    default: Any = REQUIRED
    choices: tuple = ()
    length: int | None = None  # for ints

    def problem(self, name: str, value) -> str | None:
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "ints": lambda v: isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        }[self.kind](value)
        if not ok:
            return f"attribute {name}={value!r} must be {self.kind}"
        if self.kind == "ints" and self.length is not None and len(value) != self.length:
            return f"attribute {name}={list(value)} must have {self.length} values"
        if self.choices and value not in self.choices:
            return f"attribute {name}={value!r} not one of {list(self.choices)}"
        return None


def _nothing_nonneg(nonneg: Sequence[bool], attrs: Mapping) -> bool:
    return False


def _always_nonneg(nonneg: Sequence[bool], attrs: Mapping) -> bool:
    return True


def _keeps_sign(nonneg: Sequence[bool], attrs: Mapping) -> bool:
    """Non-negative when every input is (sums, products, minima, windows and moves of them)."""
    return bool(nonneg) and all(nonneg)


def _clip_sign(nonneg: Sequence[bool], attrs: Mapping) -> bool:
    # min(max(x, lo), hi) >= 0 needs hi >= 0 as well as lo >= 0 or x >= 0
    return attrs["hi"] >= 0 and (attrs["lo"] >= 0 or nonneg[0])


def _layer_sign(nonneg: Sequence[bool], attrs: Mapping) -> bool:
    act = attrs.get("act", "none")
    return act == "relu" or (act == "clip" and attrs.get("clip_lo", -1.0) >= 0)


class _LazyTorch:
    """``torch`` imported on first use: the table is imported by runtimes that never load torch."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("torch"), name)


T = _LazyTorch()


def _F():
    return importlib.import_module("torch.nn.functional")


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int]
    attrs: Mapping[str, Attr]
    # expected output shape from the input shapes and the node (raises ShapeError)
    shape: Callable[[list[tuple[int, ...]], Any], tuple[int, ...]]
    sign: Callable[[Sequence[bool], Mapping], bool] = _nothing_nonneg
    evaluate: Callable[[Any, list[np.ndarray]], np.ndarray] | None = None  # numpy semantics (node, inputs)
    torch: Callable[[Any, list], Any] | None = None  # PyTorch form (node, input tensors)
    tvm: str | None = None  # the shared TVM planner's lowering key
    doc: str = ""
    param_inputs: tuple[int, ...] = field(default=())  # input positions that must be parameters

    def attr_defaults(self) -> dict:
        return {k: a.default for k, a in self.attrs.items() if a.default is not REQUIRED}


# -- shape inference ----------------------------------------------------------------------------


def _same(shapes, n) -> tuple[int, ...]:
    return shapes[0]


def _broadcast(shapes, n) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"input shapes {[list(s) for s in shapes]} do not broadcast") from None


def _expand(shapes, n) -> tuple[int, ...]:
    try:
        ok = tuple(np.broadcast_shapes(shapes[0], n.type.shape)) == n.type.shape
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(f"input shape {list(shapes[0])} does not broadcast to {list(n.type.shape)}")
    return n.type.shape


def _rank(shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ShapeError(f"{what} must have rank {rank}, has shape {list(shape)}")


def _conv(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    _rank(x, 4, "convolution input")
    w = tuple(n.attr("weight_shape")) if n.op == "qconv2d" else shapes[1]
    _rank(w, 4, "convolution weight")
    groups = n.attr("groups")
    if groups < 1 or x[1] != w[1] * groups or w[0] % groups:
        raise ShapeError(f"input {list(x)}, weight {list(w)} and groups {groups} do not fit")
    (sh, sw), (ph, pw), (dh, dw) = n.attr("stride"), n.attr("padding"), n.attr("dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ShapeError("stride and dilation must be >= 1, padding >= 0")
    oh = (x[2] + 2 * ph - dh * (w[2] - 1) - 1) // sh + 1
    ow = (x[3] + 2 * pw - dw * (w[3] - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"convolution output would be empty ({oh}x{ow})")
    return (x[0], w[0], oh, ow)


def _linear(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    w = tuple(n.attr("weight_shape")) if n.op == "qlinear" else shapes[1]
    _rank(w, 2, "linear weight")
    if not x or x[-1] != w[1]:
        raise ShapeError(f"input {list(x)} does not end in the weight's {w[1]} input features")
    return x[:-1] + (w[0],)


def _pool(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    _rank(x, 4, "pooling input")
    k, s, p = n.attr("kernel"), n.attr("stride"), n.attr("padding")
    d = n.attr("dilation", (1, 1))
    if min(k + s + d) < 1 or min(p) < 0 or any(2 * pi > ki for pi, ki in zip(p, k)):
        raise ShapeError(f"kernel {list(k)}, stride {list(s)}, padding {list(p)}: padding must be at most half the kernel")
    oh, ow = (num.pool_output_size(x[2 + i], k[i], s[i], p[i], d[i], n.attr("ceil_mode", False)) for i in range(2))
    if oh <= 0 or ow <= 0:
        raise ShapeError(f"pooling output would be empty ({oh}x{ow})")
    return (x[0], x[1], oh, ow)


def _adaptive(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    _rank(x, 4, "pooling input")
    oh, ow = n.attr("output_size")
    if oh < 1 or ow < 1:
        raise ShapeError(f"output_size {[oh, ow]} must be positive")
    return (x[0], x[1], oh, ow)


def _axes(dims, rank: int) -> tuple[int, ...]:
    if any(not 0 <= d < rank for d in dims) or len(set(dims)) != len(dims):
        raise ShapeError(f"dims {list(dims)} are not distinct axes of a rank-{rank} tensor")
    return tuple(dims)


def _mean(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    dims = _axes(n.attr("dims"), len(x))
    if n.attr("keepdim"):
        return tuple(1 if i in dims else s for i, s in enumerate(x))
    return tuple(s for i, s in enumerate(x) if i not in dims)


def _reshape(shapes, n) -> tuple[int, ...]:
    if int(np.prod(shapes[0])) != int(np.prod(n.type.shape)):
        raise ShapeError(f"cannot reshape {list(shapes[0])} to {list(n.type.shape)}")
    return n.type.shape


def _permute(shapes, n) -> tuple[int, ...]:
    x, dims = shapes[0], n.attr("dims")
    if sorted(dims) != list(range(len(x))):
        raise ShapeError(f"dims {list(dims)} are not a permutation of {len(x)} axes")
    return tuple(x[d] for d in dims)


def _cat(shapes, n) -> tuple[int, ...]:
    axis, first = n.attr("axis"), shapes[0]
    if not 0 <= axis < len(first):
        raise ShapeError(f"axis {axis} outside rank {len(first)}")
    for s in shapes[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != axis):
            raise ShapeError(f"shapes {[list(s) for s in shapes]} differ outside axis {axis}")
    return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1:]


def _axis_of(shapes, n) -> tuple[int, ...]:
    if not 0 <= n.attr("axis") < len(shapes[0]):
        raise ShapeError(f"axis {n.attr('axis')} outside rank {len(shapes[0])}")
    return shapes[0]


def _slice(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    axis, start, end = n.attr("axis"), n.attr("start"), n.attr("end")
    if not 0 <= axis < len(x) or not 0 <= start < end <= x[axis]:
        raise ShapeError(f"slice [{start}:{end}] of axis {axis} is outside input shape {list(x)}")
    return x[:axis] + (end - start,) + x[axis + 1:]


def _matmul(shapes, n) -> tuple[int, ...]:
    a, b = shapes
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul needs operands of rank >= 2, has {list(a)} and {list(b)}")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul inner dimensions differ: {list(a)} @ {list(b)}")
    try:
        batch = tuple(np.broadcast_shapes(a[:-2], b[:-2]))
    except ValueError:
        raise ShapeError(f"matmul batch dimensions of {list(a)} and {list(b)} do not broadcast") from None
    return batch + (a[-2], b[-1])


def _embedding(shapes, n) -> tuple[int, ...]:
    table, ids = shapes
    _rank(table, 2, "embedding table")
    return tuple(ids) + (table[1],)


def _take(shapes, n) -> tuple[int, ...]:
    x, index = shapes
    axis = n.attr("axis")
    if not 0 <= axis < len(x):
        raise ShapeError(f"take axis {axis} outside rank {len(x)}")
    return x[:axis] + tuple(index) + x[axis + 1:]


def _torch_take(n, a):
    index = a[1].to(T.int64)
    return T.index_select(a[0], n.attr("axis"), index.reshape(-1)).reshape(n.type.shape)


def _layer_norm(shapes, n) -> tuple[int, ...]:
    x, axis = shapes[0], n.attr("axis")
    if not 0 <= axis < len(x):
        raise ShapeError(f"layer_norm axis {axis} outside rank {len(x)}")
    for role, s in zip(("weight", "bias"), shapes[1:]):
        if s != x[axis:]:
            raise ShapeError(f"layer_norm {role} is {list(s)}, should be {list(x[axis:])}")
    return x


def _batch_norm(shapes, n) -> tuple[int, ...]:
    x = shapes[0]
    if len(x) < 2 or any(s != (x[1],) for s in shapes[1:]):
        raise ShapeError(f"batch_norm of {list(x)} needs mul and add of shape [{x[1] if len(x) > 1 else '?'}]")
    return x


# -- the torch forms (bench baselines) -----------------------------------------------------------


def _torch_act(n, y):
    act = n.attr("act", "none")
    if act == "relu":
        return _F().relu(y)
    if act == "clip":
        return T.clamp(y, n.attr("clip_lo"), n.attr("clip_hi"))
    return y


def _torch_channel(v, ndim: int):
    return v.reshape([1, -1] + [1] * (ndim - 2))


# -- the numpy forms ------------------------------------------------------------------------------


def _np_float_layer(n, a):
    x, w = np.asarray(a[0], F32), a[1]
    b = a[2] if len(a) == 3 else None
    if n.op == "conv2d":
        y = num.conv2d_nchw(x, w, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        if b is not None:
            y = y + num.channel(b, 4, 1)
    else:
        y = x @ w.T
        if b is not None:
            y = y + b
    return num.activation(n.attr("act", "none"), y.astype(F32), n.attr("clip_lo"), n.attr("clip_hi"))


def _np_pool(kind: str):
    def run(n, a):
        return num.pool2d(np.asarray(a[0], F32), kind, n.attr("kernel"), n.attr("stride"), n.attr("padding"),
                          n.attr("dilation", (1, 1)), n.attr("ceil_mode", False),
                          n.attr("count_include_pad", True), n.attr("divisor", 0))
    return run


_INTS2 = Attr("ints", length=2)
_ACT_ATTRS = {"act": Attr("str", "none", ("none", "relu", "clip")), "clip_lo": Attr("float", None),
              "clip_hi": Attr("float", None)}
# a quantized layer as the model wrote it, where the op says another thing (csqc.capture.layers._layer_form),
# and its weight count where the op's weight holds more (a transposed conv's phases: zero taps)
_FORM = {"form": Attr("str", ""), "form_weights": Attr("int", 0)}
_CONV_ATTRS = {"stride": _INTS2, "padding": _INTS2, "dilation": _INTS2, "groups": Attr("int")}


def _op(name: str, arity, shape, *, attrs=None, **kw) -> OpDef:
    return OpDef(name, arity, MappingProxyType(dict(attrs or {})), shape, **kw)


def _unary(name: str, numpy_fn, torch_fn, sign=_nothing_nonneg, attrs=None, doc: str = "") -> OpDef:
    return _op(name, (1, 1), _same, attrs=attrs, sign=sign, evaluate=numpy_fn, torch=torch_fn, tvm="unary", doc=doc)


def _binary(name: str, numpy_fn, torch_fn, sign=_nothing_nonneg, doc: str = "") -> OpDef:
    return _op(name, (2, 2), _broadcast, sign=sign, evaluate=lambda n, a: numpy_fn(a[0], a[1]).astype(F32),
               torch=lambda n, a: torch_fn(a[0], a[1]), tvm="binary", doc=doc + ", broadcasting")


_DEFS = [
    # quantization: semantics in csqc.interpreter (exact integer codes and accumulators)
    # asymmetric: unsigned codes with a zero point, but the value keeps the input's sign
    _op("quantize", (1, 1), _same, attrs={"bits": Attr("int"), "static_scale": Attr("float", 0.0),
                                          "signed": Attr("bool", False), "idiom": Attr("str", ""),
                                          "asymmetric": Attr("bool", False), "zero_point": Attr("int", 0)},
        sign=_keeps_sign, tvm="quantize",
        doc="activation codes and scale S (dynamic max|x| or static; asymmetric: range R and zero point)"),
    _op("dequantize", (1, 1), _same, sign=_keeps_sign, tvm="dequantize", doc="(codes * S) / L, (f32(u - zp) * R) / L"),
    _op("qconv2d", (3, 4), _conv, attrs={"weight_shape": Attr("ints", length=4), **_CONV_ATTRS, **_ACT_ATTRS, **_FORM},
        sign=_layer_sign, tvm="quant_layer", param_inputs=(1, 2, 3),
        doc="CSQ convolution: integer weight, per-channel mult and add, fused activation"),
    _op("qlinear", (3, 4), _linear, attrs={"weight_shape": Attr("ints", length=2), **_ACT_ATTRS, **_FORM},
        sign=_layer_sign, tvm="quant_layer", param_inputs=(1, 2, 3),
        doc="CSQ linear layer: integer weight, per-channel mult and add, fused activation"),
    # float layers
    _op("conv2d", (2, 3), _conv, attrs={**_CONV_ATTRS, **_ACT_ATTRS}, sign=_layer_sign, evaluate=_np_float_layer,
        torch=lambda n, a: _torch_act(n, _F().conv2d(a[0], a[1], a[2] if len(a) > 2 else None, n.attr("stride"),
                                                     n.attr("padding"), n.attr("dilation"), n.attr("groups"))),
        tvm="float_layer", param_inputs=(1, 2), doc="float convolution (NCHW, OIHW)"),
    _op("linear", (2, 3), _linear, attrs=_ACT_ATTRS, sign=_layer_sign, evaluate=_np_float_layer,
        torch=lambda n, a: _torch_act(n, _F().linear(a[0], a[1], a[2] if len(a) > 2 else None)),
        tvm="float_layer", param_inputs=(1, 2), doc="float linear layer x @ W.T + b"),
    _op("batch_norm", (3, 3), _batch_norm,
        evaluate=lambda n, a: (a[0] * num.channel(a[1], a[0].ndim, 1) + num.channel(a[2], a[0].ndim, 1)).astype(F32),
        torch=lambda n, a: a[0] * _torch_channel(a[1], a[0].dim()) + _torch_channel(a[2], a[0].dim()),
        tvm="batch_norm", param_inputs=(1, 2), doc="inference batch norm x * mul[c] + add[c] (channel axis 1)"),
    # elementwise
    _unary("relu", lambda n, a: np.maximum(a[0], F32(0)), lambda n, a: _F().relu(a[0]), _always_nonneg,
           doc="max(x, 0)"),
    _unary("clip", lambda n, a: np.clip(a[0], F32(n.attr("lo")), F32(n.attr("hi"))).astype(F32),
           lambda n, a: T.clamp(a[0], n.attr("lo"), n.attr("hi")), _clip_sign,
           attrs={"lo": Attr("float"), "hi": Attr("float"), "idiom": Attr("str", "")},
           doc="min(max(x, lo), hi); lo/hi may be infinite"),  # idiom: a quantizer left float (csqc.idioms)
    _unary("sigmoid", lambda n, a: num.sigmoid(a[0]), lambda n, a: T.sigmoid(a[0]), _always_nonneg,
           doc="1 / (1 + exp(-x))"),
    _unary("tanh", lambda n, a: np.tanh(np.asarray(a[0], F32)).astype(F32), lambda n, a: T.tanh(a[0]), doc="tanh(x)"),
    _op("gelu", (1, 1), _same, attrs={"approximate": Attr("str", "none", ("none", "tanh"))},
        evaluate=lambda n, a: num.gelu(a[0], n.attr("approximate", "none")),
        torch=lambda n, a: _F().gelu(a[0], approximate=n.attr("approximate", "none")), tvm="gelu",
        doc="GELU, erf or tanh form"),
    # vision activations (MobileNetV3, EfficientNet): PyTorch's float32 order, kept by every runtime
    _unary("hardsigmoid", lambda n, a: num.hardsigmoid(a[0]), lambda n, a: _F().hardsigmoid(a[0]), _always_nonneg,
           doc="min(max(x + 3, 0), 6) / 6"),
    _unary("hardswish", lambda n, a: num.hardswish(a[0]), lambda n, a: _F().hardswish(a[0]),
           doc="(x * min(max(x + 3, 0), 6)) / 6"),
    _unary("silu", lambda n, a: num.silu(a[0]), lambda n, a: _F().silu(a[0]), doc="x * (1 / (1 + exp(-x)))"),
    # correctly rounded in IEEE 754, so every runtime gives the same bits (RMSNorm's rsqrt: 1 / sqrt)
    _unary("sqrt", lambda n, a: num.sqrt(a[0]), lambda n, a: T.sqrt(a[0]), _always_nonneg,
           doc="sqrt(x) (also rsqrt and RMSNorm as 1 / sqrt)"),
    # within an ulp or two of each other on every runtime, as sigmoid's exp (ELU, softplus, Mish,
    # log_softmax are composed of them at capture)
    _unary("exp", lambda n, a: num.exp(a[0]), lambda n, a: T.exp(a[0]), _always_nonneg,
           doc="exp(x) (also ELU, CELU, SELU, softplus, Mish, expm1, exp2)"),
    _unary("log", lambda n, a: num.log(a[0]), lambda n, a: T.log(a[0]),
           doc="log(x) (also softplus, Mish and log1p, with a log1p correction)"),
    _unary("erf", lambda n, a: num.erf(a[0]), lambda n, a: T.erf(a[0]), _keeps_sign,
           doc="erf(x) (a hand-written GELU: x * 0.5 * (1 + erf(x / sqrt 2)))"),
    # within an ulp or two of float64's on every runtime (libm / CUDA / ONNX Runtime, each with
    # its own range reduction): sinusoidal time and position embeddings of the model's input
    _unary("sin", lambda n, a: num.sin(a[0]), lambda n, a: T.sin(a[0]), doc="sin(x) (timestep embeddings)"),
    _unary("cos", lambda n, a: num.cos(a[0]), lambda n, a: T.cos(a[0]), doc="cos(x)"),
    _binary("add", np.add, lambda a, b: a + b, _keeps_sign, "a + b"),
    _binary("sub", np.subtract, lambda a, b: a - b, doc="a - b (also comparisons: an indicator of a - b)"),
    _binary("mul", np.multiply, lambda a, b: a * b, _keeps_sign,
            "a * b (also where, masked_fill and logic of conditions, as 0.0 / 1.0)"),
    _binary("div", np.divide, lambda a, b: a / b, _keeps_sign, "a / b"),
    _binary("minimum", np.minimum, lambda a, b: T.minimum(a, b), _keeps_sign,
            "min(a, b) (also maximum, max against a tensor, abs, leaky ReLU, PReLU, RReLU, shrinks)"),
    _op("select", (3, 3), _broadcast, sign=lambda nonneg, attrs: bool(nonneg[1] and nonneg[2]),
        evaluate=lambda n, a: np.where(np.asarray(a[0]) != 0, np.asarray(a[1], F32), np.asarray(a[2], F32)).astype(F32),
        torch=lambda n, a: T.where(a[0] != 0, a[1], a[2]), tvm="select",
        doc="c != 0 ? a : b, broadcasting (where and masked_fill by a condition the model computes: the other "
            "branch is never read, inf or NaN there included)"),
    _op("expand", (1, 1), _expand, attrs={"folded_layer": Attr("str", ""), "weight_shape": Attr("ints", ()),
                                           "n_bits": Attr("int", 0)},
        sign=_keeps_sign, evaluate=lambda n, a: np.array(np.broadcast_to(a[0], n.type.shape), dtype=F32),
        torch=lambda n, a: a[0].expand(n.type.shape).contiguous(), tvm="expand",
        doc="broadcast to the node's shape (also broadcast_to, a folded zero-plane layer's constant output)"),
    # pooling and reductions
    _op("max_pool2d", (1, 1), _pool, attrs={"kernel": _INTS2, "stride": _INTS2, "padding": _INTS2,
                                            "dilation": Attr("ints", (1, 1), length=2), "ceil_mode": Attr("bool", False)},
        sign=_keeps_sign, evaluate=_np_pool("max"),
        torch=lambda n, a: _F().max_pool2d(a[0], n.attr("kernel"), n.attr("stride"), n.attr("padding"),
                                           n.attr("dilation"), ceil_mode=n.attr("ceil_mode", False)),
        tvm="max_pool2d", doc="max pooling, -inf padding"),
    _op("avg_pool2d", (1, 1), _pool, attrs={"kernel": _INTS2, "stride": _INTS2, "padding": _INTS2,
                                            "ceil_mode": Attr("bool", False), "count_include_pad": Attr("bool", True),
                                            "divisor": Attr("int", 0)},
        sign=_keeps_sign, evaluate=_np_pool("avg"),
        torch=lambda n, a: _F().avg_pool2d(a[0], n.attr("kernel"), n.attr("stride"), n.attr("padding"),
                                           ceil_mode=n.attr("ceil_mode", False),
                                           count_include_pad=n.attr("count_include_pad", True),
                                           divisor_override=n.attr("divisor", 0) or None),
        tvm="avg_pool2d", doc="average pooling (count_include_pad, divisor_override)"),
    _op("adaptive_avg_pool2d", (1, 1), _adaptive, attrs={"output_size": _INTS2}, sign=_keeps_sign,
        evaluate=lambda n, a: num.adaptive_avg_pool2d(np.asarray(a[0], F32), n.attr("output_size")),
        torch=lambda n, a: _F().adaptive_avg_pool2d(a[0], n.attr("output_size")), tvm="adaptive_avg_pool2d",
        doc="windows [floor(i*H/oh), ceil((i+1)*H/oh)) like PyTorch"),
    _op("mean", (1, 1), _mean, attrs={"dims": Attr("ints"), "keepdim": Attr("bool", False)}, sign=_keeps_sign,
        evaluate=lambda n, a: np.asarray(a[0]).mean(axis=tuple(n.attr("dims")), keepdims=n.attr("keepdim"),
                                                    dtype=F32).astype(F32),
        torch=lambda n, a: a[0].mean(dim=n.attr("dims"), keepdim=n.attr("keepdim")), tvm="mean",
        doc="mean over axes"),
    _op("amax", (1, 1), _mean, attrs={"dims": Attr("ints"), "keepdim": Attr("bool", False)}, sign=_keeps_sign,
        evaluate=lambda n, a: np.asarray(a[0], F32).max(axis=tuple(n.attr("dims")), keepdims=n.attr("keepdim")),
        torch=lambda n, a: a[0].amax(dim=n.attr("dims"), keepdim=n.attr("keepdim")), tvm="amax",
        doc="max over axes (also max(dim)'s values, amin and min(dim)'s as -amax(-x), log_softmax, logsumexp, "
            "adaptive max pools of overlapping windows)"),
    _op("softmax", (1, 1), _axis_of, attrs={"axis": Attr("int")}, sign=_always_nonneg,
        evaluate=lambda n, a: num.softmax(a[0], n.attr("axis")),
        torch=lambda n, a: T.softmax(a[0], n.attr("axis")), tvm="softmax", doc="softmax along one axis"),
    _op("layer_norm", (3, 3), _layer_norm, attrs={"axis": Attr("int"), "eps": Attr("float")},
        evaluate=lambda n, a: num.layer_norm(a[0], a[1], a[2], n.attr("axis"), n.attr("eps")),
        torch=lambda n, a: _F().layer_norm(a[0], a[1].shape, a[1], a[2], n.attr("eps")), tvm="layer_norm",
        param_inputs=(1, 2), doc="over the axes from `axis` on, with weight and bias"),
    _op("matmul", (2, 2), _matmul, sign=_keeps_sign,
        evaluate=lambda n, a: np.matmul(np.asarray(a[0], F32), np.asarray(a[1], F32)).astype(F32),
        torch=lambda n, a: T.matmul(a[0], a[1]), tvm="matmul",
        doc="batched float matmul of two values (also einsum of two operands, baddbmm, addmm)"),
    # token embeddings: the one op with an integer input (the ids, a graph input)
    _op("embedding", (2, 2), _embedding, evaluate=lambda n, a: num.embedding(a[0], a[1]),
        torch=lambda n, a: _F().embedding(a[1].to(T.int64), a[0]), tvm="embedding", param_inputs=(0,),
        doc="rows of a float table (a parameter) picked by integer ids; ids outside the table are refused"),
    # data movement
    _op("take", (2, 2), _take, attrs={"axis": Attr("int")}, sign=_keeps_sign,
        evaluate=lambda n, a: np.take(np.asarray(a[0], F32), np.asarray(a[1], np.int64), axis=n.attr("axis")),
        torch=_torch_take, tvm="take", param_inputs=(1,),
        doc="x along one axis at the positions of a constant integer index of any shape (gathers and indexing of "
            "many runs: relative position tables, long reversals)"),
    _op("reshape", (1, 1), _reshape, sign=_keeps_sign,
        evaluate=lambda n, a: np.ascontiguousarray(a[0]).reshape(n.type.shape),
        torch=lambda n, a: a[0].reshape(n.type.shape), tvm="reshape",
        doc="view, flatten, (un)squeeze, view_as, reshape_as"),
    _op("permute", (1, 1), _permute, attrs={"dims": Attr("ints")}, sign=_keeps_sign,
        evaluate=lambda n, a: np.ascontiguousarray(np.transpose(a[0], n.attr("dims"))),
        torch=lambda n, a: a[0].permute(n.attr("dims")), tvm="permute",
        doc="permute, transpose, swapaxes, movedim, x.T, x.mT (also einsum of one operand)"),
    _op("cat", (1, 64), _cat, attrs={"axis": Attr("int")}, sign=_keeps_sign,
        evaluate=lambda n, a: np.concatenate(a, axis=n.attr("axis")),
        torch=lambda n, a: T.cat(a, n.attr("axis")), tvm="cat", doc="concatenate (also stack, roll, pad in every mode)"),
    _op("slice", (1, 1), _slice, attrs={"axis": Attr("int"), "start": Attr("int"), "end": Attr("int")},
        sign=_keeps_sign, evaluate=lambda n, a: num.slice_axis(a[0], n.attr("axis"), n.attr("start"), n.attr("end")),
        torch=lambda n, a: a[0].narrow(n.attr("axis"), n.attr("start"), n.attr("end") - n.attr("start")),
        tvm="slice",
        doc="x[start:end] along one axis (also split, chunk, tensor_split, select, unbind, strided slices, roll, diff)"),
]

OP_TABLE: Mapping[str, OpDef] = MappingProxyType({d.name: d for d in _DEFS})
QUANT_OPS = ("quantize", "dequantize", "qconv2d", "qlinear")


def op_def(op: str) -> OpDef:
    return OP_TABLE[op]


def attr_problems(n) -> list[str]:
    """Schema findings for node ``n``'s attributes: unknown, missing or mistyped."""
    d = OP_TABLE[n.op]
    out = [f"unknown attribute {k!r}" for k in n.attrs if k not in d.attrs]
    for k, spec in d.attrs.items():
        if k not in n.attrs:
            if spec.default is REQUIRED:
                out.append(f"missing attribute {k!r}")
            continue
        value = n.attrs[k]
        if value is None and spec.default is None:
            continue
        problem = spec.problem(k, value)
        if problem:
            out.append(problem)
    return out


def expected_shape(n, input_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The output shape node ``n`` must have (raises ``ShapeError``)."""
    return tuple(OP_TABLE[n.op].shape(input_shapes, n))


def output_nonneg(op: str, inputs_nonneg: Sequence[bool], attrs: Mapping) -> bool:
    """Whether ``op``'s output is known to be >= 0 (capture's sign rule)."""
    d = OP_TABLE[op]
    full = {**d.attr_defaults(), **dict(attrs)}
    return bool(d.sign(tuple(inputs_nonneg), full))
