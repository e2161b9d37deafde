"""Capture: a csqc model (``torch.export`` program) -> csqc IR, through a table of op handlers.

The program is re-exported at a concrete batch size so every shape is static. Each aten (or
``csqc::``) op maps to one handler in ``HANDLERS``; an op without a handler is collected with
the module it came from, and capture fails once with the complete list (``UnsupportedOps``).
IR nodes are named after the module that produced them (``layer1.0.conv1``), so inspect
tables, verify reports and ONNX tensor names read like the user's model.
"""
from __future__ import annotations

import logging
import math
import operator
import string
from dataclasses import dataclass, field, replace as _replace_fields
from typing import Callable

import numpy as np
import torch

from . import ops
from .errors import BadInput, CsqcError, UnsupportedOps
from .idioms import IDIOM_META, idiom_attrs, rewrite_idioms
from .ir import Graph, Node, QuantSpec, TensorType, Value, nonfinite_params, verify
from .modelfile import CsqcModel
from .optable import output_nonneg

__all__ = ["capture", "HANDLERS"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten


class _Unsupported(Exception):
    """Raised by a handler for a form of a supported op it cannot translate."""


@dataclass
class _Ctx:
    program: torch.export.ExportedProgram
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # fx node name -> IR value name
    consts: dict[str, torch.Tensor] = field(default_factory=dict)  # fx placeholder -> tensor
    nonneg: set[str] = field(default_factory=set)  # IR values known to be >= 0
    taken: set[str] = field(default_factory=set)
    folded: dict[str, str] = field(default_factory=dict)  # fx node evaluated at capture -> parameter base name
    integer_inputs: set[str] = field(default_factory=set)  # IR inputs holding token ids
    id_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # their shapes
    constant_derived: set[str] = field(default_factory=set)  # fx nodes computed from constants only

    def name(self, base: str) -> str:
        base = base.replace("/", ".") or "v"
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    def tensor(self, arg) -> torch.Tensor:
        """A constant tensor argument (parameter, buffer or lifted constant)."""
        if isinstance(arg, torch.fx.Node) and arg.name in self.consts:
            return self.consts[arg.name]
        raise _Unsupported("expected a constant tensor (parameter or buffer) here")

    def is_const(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in self.consts

    def param(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.params[name] = np.ascontiguousarray(array)
        return name

    def value(self, arg, base: str = "const") -> str:
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.env:
                return self.env[arg.name]
            if arg.name in self.folded:
                return self._folded_param(arg.name)
            if arg.name in self.consts:
                t = self.consts[arg.name].detach().cpu().numpy()
                v = self.param(base, t.astype(np.float32) if t.dtype.kind == "f" else t)
                self.env[arg.name] = v
                if (t >= 0).all():
                    self.nonneg.add(v)
                return v
        raise _Unsupported(f"unsupported argument {arg!r}")

    def _folded_param(self, fx_name: str) -> str:
        """A constant computed at capture time, as the float32 parameter runtime ops read."""
        t = self.consts[fx_name]
        if not isinstance(t, torch.Tensor):
            raise _Unsupported(f"a folded constant of type {type(t).__name__} used as a tensor")
        a = t.detach().cpu().numpy()
        if a.dtype.kind == "f" and not np.isfinite(a.astype(np.float32)).all():
            raise BadInput(f"constant {self.folded[fx_name]!r} computed from the model's constants is NaN or "
                           "infinite in float32; no runtime can match it bit for bit")
        as_f32 = a.astype(np.float32)
        if a.dtype.kind in "biu" and not (as_f32.astype(np.float64) == a.astype(np.float64)).all():
            raise _Unsupported(f"integer constant {self.folded[fx_name]!r} is not exact in float32")
        v = self.param(self.folded[fx_name], as_f32)
        self.env[fx_name] = v
        if (as_f32 >= 0).all():
            self.nonneg.add(v)
        return v

    def emit(self, fx: torch.fx.Node, op: str, inputs, ttype: TensorType | None = None, attrs=None,
             quant: QuantSpec | None = None, base: str | None = None) -> str:
        name = self.name(base or _module_path(fx) or fx.name)
        node = Node(name, op, tuple(inputs), ttype or _type_of(fx), attrs or {}, quant, _module_path(fx))
        self.nodes.append(node)
        # the op table's sign rule: unsigned codes for quantizers of values known to be >= 0
        if output_nonneg(op, [i in self.nonneg for i in node.inputs], node.attrs):
            self.nonneg.add(name)
        return name


def _module_path(fx: torch.fx.Node) -> str:
    stack = fx.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").replace("L['self']", "").replace("_modules['", "").replace("']", "")


def _type_of(fx: torch.fx.Node) -> TensorType:
    val = fx.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise _Unsupported(f"output of {fx.name} is not a single tensor")
    return TensorType(tuple(int(s) for s in val.shape), str(val.dtype).replace("torch.", ""))


def _pair(v, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v * 2 if len(v) == 1 else v


def _arg(fx: torch.fx.Node, i: int, name: str, default=None):
    if len(fx.args) > i:
        return fx.args[i]
    return fx.kwargs.get(name, default)


def _active_bits(mask: int, n_bits: int) -> tuple[int, ...]:
    return tuple(b for b in reversed(range(n_bits)) if mask >> b & 1)


def _quant_layer(ctx: _Ctx, fx: torch.fx.Node, conv: bool, x_value: str | None = None, conv_attrs: dict | None = None,
                 ttype: TensorType | None = None, weight: np.ndarray | None = None, channel_repeat: int = 1) -> str:
    """A ``csqc::quant_linear`` / ``quant_conv2d`` node as a qlinear / qconv2d; ``x_value``,
    ``conv_attrs``, ``ttype`` and ``weight`` replace its input, convolution attributes, type and
    codes, and each output channel's scale and bias then serve ``channel_repeat`` channels in a
    row (a transposed convolution's stride-one form: its phases stacked per channel)."""
    x, q, scale, bias, n_bits, mask = fx.args[:6]
    qt, st = ctx.tensor(q), ctx.tensor(scale)
    codes = qt.detach().numpy() if weight is None else weight
    out_ch = qt.shape[0]
    base = _module_path(fx) or fx.name
    mult = (st.detach().to(torch.float32) / float(2**n_bits - 1)).numpy().astype(np.float32)
    per_channel = mult.size > 1
    mult = np.repeat(np.broadcast_to(mult.reshape(-1), (out_ch,)), channel_repeat)
    inputs = [x_value or ctx.value(x), ctx.param(f"{base}.weight", codes), ctx.param(f"{base}.mult", mult)]
    if bias is not None:
        add = ctx.tensor(bias).detach().numpy().astype(np.float32)
        inputs.append(ctx.param(f"{base}.add", np.repeat(add, channel_repeat)))
    attrs = {"weight_shape": tuple(codes.shape), "act": "none"}
    form = _layer_form(fx)
    if form:
        attrs["form"] = form
    if codes.size != qt.numel():  # the phases' zero taps (or a latent's linear form): the model's own count
        attrs["form_weights"] = int(qt.numel())
    if conv_attrs is not None:
        attrs.update(conv_attrs)
    elif conv:
        stride, padding, dilation, groups = fx.args[6:10]
        attrs.update(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=int(groups))
    spec = QuantSpec(int(n_bits), _active_bits(int(mask), int(n_bits)), "per_channel" if per_channel else "per_tensor")
    return ctx.emit(fx, "qconv2d" if conv else "qlinear", inputs, ttype, attrs=attrs, quant=spec)


def _layer_form(fx: torch.fx.Node) -> str:
    """A quantized layer as the model wrote it where its IR op says another thing (a 1-D
    convolution runs as a 2-D one over a height of one, a transposed one as the convolution of
    its phases), for reports: ``conv1d 64x64x3``, ``conv_transpose2d 256x128x4x4 stride 2x2``
    (PyTorch's weight shape); "" otherwise."""
    stack = fx.meta.get("nn_module_stack") or {}
    module = str(list(stack.values())[-1][1]).rsplit(".", 1)[-1] if stack else ""
    shape = _shape_of(fx.args[1])
    if len(shape) != 4:
        return ""
    o, c_g, kh, kw = shape
    if fx.target == torch.ops.csqc.quant_conv_transpose2d.default:
        groups, (sh, sw) = int(fx.args[10]), _pair(fx.args[6])
        if module == "CSQConvTranspose1d":
            return f"conv_transpose1d {c_g * groups}x{o // groups}x{kw} stride {sw}"
        return f"conv_transpose2d {c_g * groups}x{o // groups}x{kh}x{kw} stride {sh}x{sw}"
    if fx.target == torch.ops.csqc.quant_conv2d.default and module == "CSQConv1d":
        return f"conv1d {o}x{c_g}x{kw}"
    return ""


def _act_quant(ctx: _Ctx, fx: torch.fx.Node) -> str:
    x, bits, static = fx.args[:3]
    xv = ctx.value(x)
    base = (_module_path(fx) or fx.name)
    t = _type_of(fx)
    idiom = fx.meta.get(IDIOM_META)
    if idiom is not None and idiom.unsigned and xv not in ctx.nonneg:
        # a 0..L grid maps negative inputs to code 0: relu, then csqc's unsigned codes
        xv = ctx.emit(fx, "relu", [xv], t, base=f"{base}.relu")
    signed = xv not in ctx.nonneg
    q = ctx.emit(fx, "quantize", [xv], TensorType(t.shape, "int32", int(bits), signed),
                 {"bits": int(bits), "static_scale": float(static), "signed": signed, **idiom_attrs(fx)},
                 base=f"{base}.quant")
    return ctx.emit(fx, "dequantize", [q], t, base=f"{base}.dequant")


def _act_quant_asymmetric(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``csqc::act_quant_asymmetric``: unsigned codes with a zero point (static: the op's own)."""
    x, bits, static, zero_point = fx.args[:4]
    t = _type_of(fx)
    base = _module_path(fx) or fx.name
    static = float(static)
    attrs = {"bits": int(bits), "static_scale": static, "signed": False, "asymmetric": True,
             "zero_point": int(zero_point) if static > 0 else 0, **idiom_attrs(fx)}
    q = ctx.emit(fx, "quantize", [ctx.value(x)], TensorType(t.shape, "int32", int(bits), False, True), attrs,
                 base=f"{base}.quant")
    return ctx.emit(fx, "dequantize", [q], t, base=f"{base}.dequant")


def _float_conv(ctx: _Ctx, fx: torch.fx.Node) -> str:
    x, w = fx.args[:2]
    b = _arg(fx, 2, "bias")
    base = _module_path(fx) or fx.name
    inputs = [ctx.value(x), ctx.param(f"{base}.weight", ctx.tensor(w).detach().numpy().astype(np.float32))]
    if b is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(b).detach().numpy().astype(np.float32)))
    attrs = {"stride": _pair(_arg(fx, 3, "stride", 1)), "padding": _pair(_arg(fx, 4, "padding", 0)),
             "dilation": _pair(_arg(fx, 5, "dilation", 1)), "groups": int(_arg(fx, 6, "groups", 1)), "act": "none"}
    if isinstance(_arg(fx, 4, "padding", 0), str):
        raise _Unsupported("string padding")
    return ctx.emit(fx, "conv2d", inputs, attrs=attrs)


def _float_linear(ctx: _Ctx, fx: torch.fx.Node) -> str:
    x, w = fx.args[:2]
    b = _arg(fx, 2, "bias")
    base = _module_path(fx) or fx.name
    inputs = [ctx.value(x), ctx.param(f"{base}.weight", ctx.tensor(w).detach().numpy().astype(np.float32))]
    if b is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(b).detach().numpy().astype(np.float32)))
    return ctx.emit(fx, "linear", inputs, attrs={"act": "none"})


def _batch_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # batch_norm(x, weight, bias, mean, var, training, momentum, eps) and the no_training form
    if fx.target == _aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, _, eps = fx.args[:7]
    else:
        x, w, b, mean, var, training, _, eps = fx.args[:8]
        if training:
            raise _Unsupported("batch_norm in training mode (call model.eval())")
    var_t = ctx.tensor(var).detach().float().numpy()
    mean_t = ctx.tensor(mean).detach().float().numpy()
    if not (var_t + np.float32(eps) > 0).all():  # 1 / sqrt would be NaN or infinite
        raise BadInput(f"batch norm {_module_path(fx) or fx.name}: running variance + eps must be positive; "
                       "the model's statistics are damaged")
    c = var_t.shape[0]
    w_t = ctx.tensor(w).detach().float().numpy() if w is not None else np.ones(c, np.float32)
    b_t = ctx.tensor(b).detach().float().numpy() if b is not None else np.zeros(c, np.float32)
    # the inference transform torch uses: x * alpha + (beta - mean * alpha); an overflow is
    # refused with the parameter's name once the graph is built
    with np.errstate(over="ignore", invalid="ignore"):
        alpha = (np.float32(1) / np.sqrt(var_t + np.float32(eps))).astype(np.float32) * w_t
        shift = (b_t - mean_t * alpha).astype(np.float32)
    base = _module_path(fx) or fx.name
    return ctx.emit(fx, "batch_norm", [ctx.value(x), ctx.param(f"{base}.mul", alpha), ctx.param(f"{base}.add", shift)])


def _clip(ctx: _Ctx, fx: torch.fx.Node, lo, hi) -> str:
    lo = -np.inf if lo is None else float(lo)
    hi = np.inf if hi is None else float(hi)
    xv = ctx.value(fx.args[0])
    # min(max(x, lo), hi) >= 0 needs hi >= 0 as well as lo >= 0 or x >= 0
    return ctx.emit(fx, "clip", [xv], attrs={"lo": lo, "hi": hi, **idiom_attrs(fx)})  # idiom: a quantizer left float


def _passthrough(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.value(fx.args[0])


def _binary(op: str):
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        a, b = fx.args[:2]
        if fx.kwargs.get("alpha", 1) != 1:
            raise _Unsupported("add with alpha != 1")
        vals = []
        for i, v in enumerate((a, b)):
            if isinstance(v, (int, float)):
                vals.append(ctx.param(f"{fx.name}.scalar{i}", np.array(v, dtype=np.float32)))
                if v >= 0:
                    ctx.nonneg.add(vals[-1])
            else:
                vals.append(ctx.value(v))
        return ctx.emit(fx, op, vals, base=f"{_module_path(fx) or fx.name}.{op}")

    return handler


def _reshape(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    if xv in ctx.integer_inputs:  # a view of token ids: the embedding reading them restores the shape
        return xv
    return ctx.emit(fx, "reshape", [xv], base=f"{_module_path(fx) or fx.name}.reshape")


def _permute(ctx: _Ctx, fx: torch.fx.Node, dims=None) -> str:
    xv = ctx.value(fx.args[0])
    if dims is None:
        nd = len(_type_of(fx).shape)
        dims = [d % nd for d in fx.args[1]]
    return ctx.emit(fx, "permute", [xv], attrs={"dims": tuple(dims)})


def _transpose(ctx: _Ctx, fx: torch.fx.Node) -> str:
    nd = len(_type_of(fx).shape)
    d0, d1 = (fx.args[1] % nd, fx.args[2] % nd) if len(fx.args) > 2 else (0, 1)
    dims = list(range(nd))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return _permute(ctx, fx, dims)


def _pool(op: str):
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        kernel = _pair(fx.args[1])
        stride = _pair(_arg(fx, 2, "stride"), kernel)
        padding = _pair(_arg(fx, 3, "padding", 0))
        attrs = {"kernel": kernel, "stride": stride, "padding": padding}
        if op == "max_pool2d":
            attrs["dilation"] = _pair(_arg(fx, 4, "dilation", 1))
            attrs["ceil_mode"] = bool(_arg(fx, 5, "ceil_mode", False))
        else:
            attrs["ceil_mode"] = bool(_arg(fx, 4, "ceil_mode", False))
            attrs["count_include_pad"] = bool(_arg(fx, 5, "count_include_pad", True))
            attrs["divisor"] = int(_arg(fx, 6, "divisor_override", None) or 0)
        xv = ctx.value(fx.args[0])
        return ctx.emit(fx, op, [xv], attrs=attrs, base=f"{_module_path(fx) or fx.name}")

    return handler


def _adaptive_avg(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    return ctx.emit(fx, "adaptive_avg_pool2d", [xv], attrs={"output_size": _pair(fx.args[1])})


def _mean(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    nd = len(_type_of(fx.args[0]).shape)
    dims = tuple(sorted(d % nd for d in fx.args[1]))
    return ctx.emit(fx, "mean", [xv], attrs={"dims": dims, "keepdim": bool(_arg(fx, 2, "keepdim", False))})


def _sum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.sum(dims)`` as the mean over them times their element count (exact where the count is
    a power of two; else one rounding more than a sum: float tolerance against torch, the same
    bits in every runtime of the IR)."""
    shape = _shape_of(fx.args[0])
    dims = _arg(fx, 1, "dim", None)
    dims = tuple(sorted({int(d) % len(shape) for d in dims})) if dims else tuple(range(len(shape)))
    if _arg(fx, 3, "dtype", None) not in (None, torch.float32):
        raise _Unsupported("sum to another dtype")
    keep = bool(_arg(fx, 2, "keepdim", False))
    out = tuple(1 if d in dims else n for d, n in enumerate(shape)) if keep else tuple(
        n for d, n in enumerate(shape) if d not in dims)
    mean = _typed(ctx, fx, "mean", [ctx.value(fx.args[0])], out, "mean", {"dims": dims, "keepdim": keep})
    count = _scalar(ctx, fx, float(np.prod([shape[d] for d in dims], dtype=np.int64)), "count")
    return ctx.emit(fx, "mul", [mean, count], base=_base(fx, "sum"))


def _cat(ctx: _Ctx, fx: torch.fx.Node) -> str:
    vals = [ctx.value(v) for v in fx.args[0]]
    nd = len(_type_of(fx).shape)
    axis = int(_arg(fx, 1, "dim", 0)) % nd
    return ctx.emit(fx, "cat", vals, attrs={"axis": axis})


def _softmax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    nd = len(_type_of(fx).shape)
    return ctx.emit(fx, "softmax", [ctx.value(fx.args[0])], attrs={"axis": int(fx.args[1]) % nd})


def _relu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.emit(fx, "relu", [ctx.value(fx.args[0])], base=f"{_module_path(fx) or fx.name}")


# -- transformer blocks: layer norm, gelu, batched matmul of two values ------------------------


def _layer_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable) and
    # native_layer_norm(x, normalized_shape, weight, bias, eps) -> (y, mean, rstd): only y is used
    x, normalized = fx.args[:2]
    w, b = _arg(fx, 2, "weight"), _arg(fx, 3, "bias")
    eps = float(_arg(fx, 4, "eps", 1e-5))
    val = fx.meta.get("val")
    t = TensorType(tuple(int(s) for s in (val[0] if isinstance(val, (tuple, list)) else val).shape))
    normalized = tuple(int(s) for s in normalized)
    axis = len(t.shape) - len(normalized)
    base = _module_path(fx) or fx.name
    weight = (ctx.param(f"{base}.weight", ctx.tensor(w).detach().float().numpy()) if w is not None
              else ctx.param(f"{base}.weight", np.ones(normalized, np.float32)))
    bias = (ctx.param(f"{base}.bias", ctx.tensor(b).detach().float().numpy()) if b is not None
            else ctx.param(f"{base}.bias", np.zeros(normalized, np.float32)))
    return ctx.emit(fx, "layer_norm", [ctx.value(x), weight, bias], t, {"axis": axis, "eps": eps}, base=base)


def _gelu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    approximate = str(_arg(fx, 1, "approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise _Unsupported(f"gelu approximate={approximate!r}")
    return ctx.emit(fx, "gelu", [ctx.value(fx.args[0])], attrs={"approximate": approximate},
                    base=f"{_module_path(fx) or fx.name}")


def _matmul(ctx: _Ctx, fx: torch.fx.Node) -> str:
    a, b = fx.args[:2]
    if min(len(_type_of(v).shape) for v in (a, b)) < 2:
        raise _Unsupported("matmul of a vector (rank-1 operand)")
    return ctx.emit(fx, "matmul", [ctx.value(a), ctx.value(b)], base=f"{_module_path(fx) or fx.name}.matmul")


def _einsum_subscripts(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """The operands' and the output's subscripts of ``equation`` (an implicit output: the
    letters used once, in alphabetical order, as torch.einsum reads it; an ellipsis: letters of
    their own, :func:`_named_ellipsis`)."""
    equation = _named_ellipsis(equation.replace(" ", ""), ranks)
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        out = "".join(sorted(c for c in set(lhs.replace(",", "")) if lhs.count(c) == 1))
    if len(terms) != len(ranks) or any(len(t) != r for t, r in zip(terms, ranks)) or not all(
            c.isalpha() for c in "".join(terms) + out):
        raise _Unsupported(f"einsum {equation!r} does not match its operands' ranks {ranks}")
    if any(len(set(t)) != len(t) for t in [*terms, out]):
        raise _Unsupported(f"einsum {equation!r} repeats a subscript within a term (a diagonal)")
    if not set(out) <= set("".join(terms)):
        raise _Unsupported(f"einsum {equation!r}: an output subscript no operand has")
    return terms, out


def _named_ellipsis(equation: str, ranks: list[int]) -> str:
    """``equation`` with each ``...`` spelled as letters it does not use (the same dimensions in
    every operand that has one, and in the output: leading ones, where the output is implicit).
    An ellipsis standing for different numbers of dimensions (broadcast) is not translated."""
    if "." not in equation:
        return equation
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if equation.count(".") != 3 * equation.count("...") or len(terms) != len(ranks) or any(
            t.count("...") > 1 for t in [*terms, out]):
        raise _Unsupported(f"einsum {equation!r}: an ellipsis must be '...', once a term")
    counts = {r - len(t) + 3 for t, r in zip(terms, ranks) if "..." in t}
    if len(counts) != 1 or min(counts) < 0:
        raise _Unsupported(f"einsum {equation!r} broadcasts its ellipsis over operands of different ranks")
    spare = [c for c in string.ascii_letters if c not in equation]
    named = "".join(spare[:counts.pop()])
    if not arrow:
        once = sorted(c for c in set(lhs.replace(",", "").replace(".", "")) if lhs.count(c) == 1)
        out = "..." + "".join(once)
    return ",".join(t.replace("...", named) for t in terms) + "->" + out.replace("...", named)


def _einsum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``einsum`` of one operand (a permutation) or two (a batched matmul: batch subscripts in
    both and the output, contracted ones in both only, free ones in one and the output), as
    permute / reshape / matmul / reshape / permute; sums over one operand's own subscripts, and
    broadcast (size-1) dimensions, are not translated."""
    equation, operands = fx.args[0], list(fx.args[1])
    types = [_type_of(v) for v in operands]
    terms, out = _einsum_subscripts(equation, [len(t.shape) for t in types])
    base, dtype = f"{_module_path(fx) or fx.name}.einsum", _type_of(fx).dtype
    sizes: dict[str, int] = {}
    for term, t in zip(terms, types):
        for c, n in zip(term, t.shape):
            if sizes.setdefault(c, n) != n:
                raise _Unsupported(f"einsum {equation!r}: subscript {c} has sizes {sizes[c]} and {n} (broadcast)")
    values = [ctx.value(v) for v in operands]

    def permute(value: str, term: str, order: str, part: str) -> str:
        if term == order:
            return value
        return ctx.emit(fx, "permute", [value], TensorType(tuple(sizes[c] for c in order), dtype),
                        {"dims": tuple(term.index(c) for c in order)}, base=f"{base}.{part}")

    def reshape(value: str, shape: tuple[int, ...], part: str, current: tuple[int, ...]) -> str:
        if shape == current:
            return value
        return ctx.emit(fx, "reshape", [value], TensorType(shape, dtype), base=f"{base}.{part}")

    if not out:
        raise _Unsupported(f"einsum {equation!r} to a scalar")
    if len(terms) == 1:
        if set(terms[0]) != set(out):
            raise _Unsupported(f"einsum {equation!r} sums over one operand's own subscripts")
        return permute(values[0], terms[0], out, "permute")
    a, b = terms
    batch = "".join(c for c in out if c in a and c in b)
    contract = "".join(c for c in a if c in b and c not in out)
    free_a, free_b = "".join(c for c in out if c in a and c not in b), "".join(c for c in out if c in b and c not in a)
    if set(a) != set(batch + contract + free_a) or set(b) != set(batch + contract + free_b):
        raise _Unsupported(f"einsum {equation!r} sums over one operand's own subscripts")
    nb, nm, nk, nn = (int(np.prod([sizes[c] for c in part], dtype=np.int64))
                      for part in (batch, free_a, contract, free_b))
    left = permute(values[0], a, batch + free_a + contract, "a")
    left = reshape(left, (nb, nm, nk), "a_3d", tuple(sizes[c] for c in batch + free_a + contract))
    right = permute(values[1], b, batch + contract + free_b, "b")
    right = reshape(right, (nb, nk, nn), "b_3d", tuple(sizes[c] for c in batch + contract + free_b))
    product = ctx.emit(fx, "matmul", [left, right], TensorType((nb, nm, nn), dtype), base=f"{base}.matmul")
    order = batch + free_a + free_b
    product = reshape(product, tuple(sizes[c] for c in order), "unflatten", (nb, nm, nn))
    return permute(product, order, out, "out")


def _getitem(ctx: _Ctx, fx: torch.fx.Node) -> str:
    src, idx = fx.args
    pieces = ctx.env.get(src.name)
    if isinstance(pieces, tuple):  # split / unbind: one IR value per piece
        return pieces[idx]
    if src.name in ctx.env and (idx == 0 or not fx.users):  # (an unused second output: nothing reads it)
        return ctx.env[src.name]
    raise _Unsupported("only the first output of a multi-output op is supported")


# -- recurrent layers: gate nonlinearities, slices of the gate vector, stacking time steps -----


def _base(fx: torch.fx.Node, op: str) -> str:
    return f"{_module_path(fx) or fx.name}.{op}"


def _float_unary(op: str):
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        xv = ctx.value(fx.args[0])
        return ctx.emit(fx, op, [xv], base=_base(fx, op))

    return handler


def _reciprocal_sqrt(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``rsqrt(x)`` as ``1 / sqrt(x)``, two correctly rounded steps, as torch's CPU kernel computes
    it (RMSNorm: Llama, Mistral, Qwen)."""
    root = _typed(ctx, fx, "sqrt", [ctx.value(fx.args[0])], _shape_of(fx.args[0]), "sqrt")
    return ctx.emit(fx, "div", [_scalar(ctx, fx, 1.0, "one"), root], base=_base(fx, "rsqrt"))


def _rsub(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # rsub(x, other, alpha=1) = other - alpha * x
    x, other = fx.args[:2]
    if _arg(fx, 2, "alpha", 1) != 1:
        raise _Unsupported("rsub with alpha != 1")
    a = (ctx.param(f"{fx.name}.scalar", np.array(other, dtype=np.float32)) if isinstance(other, (int, float))
         else ctx.value(other))
    return ctx.emit(fx, "sub", [a, ctx.value(x)], base=_base(fx, "sub"))


def _slice_value(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, start: int, end: int,
                 ttype: TensorType | None = None) -> str:
    """``x[..., start:end, ...]`` along ``axis`` (the whole axis: the value itself)."""
    size = int(shape[axis])
    if (start, end) == (0, size) and ttype is None:
        return xv
    out_shape = tuple(int(s) for s in shape[:axis]) + (end - start,) + tuple(int(s) for s in shape[axis + 1:])
    return ctx.emit(fx, "slice", [xv], ttype or TensorType(out_shape), {"axis": axis, "start": start, "end": end},
                    base=_base(fx, "slice"))


def _bounds(start, end, size: int) -> tuple[int, int]:
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return start, max(start, end)


def _slice(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # slice.Tensor(x, dim=0, start=None, end=None, step=1)
    shape = _type_of(fx.args[0]).shape
    axis = int(_arg(fx, 1, "dim", 0)) % len(shape)
    step = int(_arg(fx, 4, "step", 1))
    start, end = _bounds(_arg(fx, 2, "start"), _arg(fx, 3, "end"), shape[axis])
    if start == end:
        raise _Unsupported("empty slice")
    if step != 1:
        return _strided_slice(ctx, fx, ctx.value(fx.args[0]), shape, axis, start, end, step)
    return _slice_value(ctx, fx, ctx.value(fx.args[0]), shape, axis, start, end)


def _strided_slice(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, start: int, end: int,
                   step: int) -> str:
    """``x[start:end:step]`` along ``axis`` (Swin's patch merging: ``x[..., 0::2, 1::2, :]``): the
    run of whole steps reshaped to ``[count, step]`` and its first column kept, then the last
    element where the axis ends inside a step."""
    if step < 1:
        raise _Unsupported(f"slice with step {step}")
    shape = tuple(int(n) for n in shape)
    count = -(-(end - start) // step)
    whole = count if start + count * step <= shape[axis] else count - 1  # steps that fit in the axis
    pieces = []
    if whole:
        run = _slice_value(ctx, fx, xv, shape, axis, start, start + whole * step)
        split = shape[:axis] + (whole, step) + shape[axis + 1:]
        run = ctx.emit(fx, "reshape", [run], TensorType(split), base=_base(fx, "strided"))
        first = _slice_value(ctx, fx, run, split, axis + 1, 0, 1)
        pieces.append(ctx.emit(fx, "reshape", [first], TensorType(shape[:axis] + (whole,) + shape[axis + 1:]),
                               base=_base(fx, "strided")))
    if whole < count:
        last = start + whole * step
        pieces.append(_slice_value(ctx, fx, xv, shape, axis, last, last + 1))
    if len(pieces) == 1:
        return pieces[0]
    return ctx.emit(fx, "cat", pieces, _type_of(fx), {"axis": axis}, base=_base(fx, "strided"))


def _roll(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``torch.roll(x, shifts, dims)`` along each dim: the last ``shift`` elements, then the
    rest (two slices and a cat; a whole turn leaves the value). No dims: the flattened roll,
    the same on ``x`` reshaped to one axis, reshaped back."""
    shifts, dims = fx.args[1], _arg(fx, 2, "dims", ())
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    value, t = ctx.value(fx.args[0]), _type_of(fx)
    if not dims and len(shifts) == 1:
        flat = TensorType((int(np.prod(t.shape, dtype=np.int64)),), t.dtype)
        rolled = _rolled(ctx, fx, ctx.emit(fx, "reshape", [value], flat, base=_base(fx, "roll.flat")), flat,
                         shifts, [0])
        return ctx.emit(fx, "reshape", [rolled], t, base=_base(fx, "roll"))
    if len(dims) != len(shifts):
        raise _Unsupported("roll with a shift per dim, or one shift and no dims")
    return _rolled(ctx, fx, value, t, shifts, dims)


def _rolled(ctx: _Ctx, fx: torch.fx.Node, value: str, t: TensorType, shifts, dims) -> str:
    """``value`` (of type ``t``) rolled by each shift along its dim."""
    for shift, dim in zip(shifts, dims):
        axis = int(dim) % len(t.shape)
        size = int(t.shape[axis])
        cut = size - int(shift) % size
        if cut == size:
            continue
        tail = _slice_value(ctx, fx, value, t.shape, axis, cut, size)
        head = _slice_value(ctx, fx, value, t.shape, axis, 0, cut)
        value = ctx.emit(fx, "cat", [tail, head], t, {"axis": axis}, base=_base(fx, "roll"))
    return value


_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _pad(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.pad(x, pad, mode, value)`` (``aten.pad`` / ``constant_pad_nd``; ``nn.ReflectionPad2d``,
    a conv's ``padding_mode``...): along each padded axis, from the last one back, pieces
    concatenated before and after the value: blocks of the fill value (``constant``), the
    mirrored slices next to the edge (``reflect``), the edge slice repeated (``replicate``), the
    other end's slice (``circular``), of the value cropped first where a width is negative (as
    torch does). Pure data movement, so every runtime computes the same bits; one axis after the
    other gives torch's corners, as each mode is separable."""
    mode = _arg(fx, 2, "mode", "constant") if fx.target == _aten.pad.default else "constant"
    if mode not in _PAD_MODES:
        raise _Unsupported(f"pad mode {mode!r}")
    pad = [int(p) for p in fx.args[1]]
    fill = _arg(fx, 3 if fx.target == _aten.pad.default else 2, "value", None)
    fill = 0.0 if fill is None else float(fill)
    if len(pad) % 2 or len(pad) // 2 > len(_type_of(fx.args[0]).shape):
        raise _Unsupported(f"pad {pad}: not one (before, after) pair per trailing axis")
    value, shape = ctx.value(fx.args[0]), list(_type_of(fx.args[0]).shape)
    for i in range(len(pad) // 2):  # pairs from the last axis backwards
        value = _padded_axis(ctx, fx, value, shape, len(shape) - 1 - i, pad[2 * i], pad[2 * i + 1], mode, fill)
    return value


def _padded_axis(ctx: _Ctx, fx: torch.fx.Node, value: str, shape: list[int], axis: int, before: int, after: int,
                 mode: str = "constant", fill: float = 0.0) -> str:
    """``value`` padded along ``axis`` as :func:`_pad` does (``shape`` updated in place)."""
    if before < 0 or after < 0:
        start, end = max(-before, 0), shape[axis] - max(-after, 0)
        if start >= end:
            raise _Unsupported(f"padding by ({before}, {after}) crops axis {axis} to nothing")
        value = _slice_value(ctx, fx, value, shape, axis, start, end)
        shape[axis], before, after = end - start, max(before, 0), max(after, 0)
    if before or after:
        value = ctx.emit(fx, "cat", _pad_pieces(ctx, fx, value, shape, axis, before, after, mode, fill),
                         TensorType(tuple(shape[:axis] + [shape[axis] + before + after] + shape[axis + 1:]),
                                    _type_of(fx).dtype), {"axis": axis}, base=_base(fx, "pad"))
        shape[axis] += before + after
    return value


def _pad_pieces(ctx: _Ctx, fx: torch.fx.Node, value: str, shape: list[int], axis: int, before: int, after: int,
                mode: str, fill: float) -> list[str]:
    """The values concatenated along ``axis`` to pad ``value`` by ``before`` and ``after``."""
    size = shape[axis]

    def run(start: int, end: int) -> str:
        return _slice_value(ctx, fx, value, shape, axis, start, end)

    def block(source: str, width: int) -> str:  # a one-wide slice (or the fill scalar) repeated
        return ctx.emit(fx, "expand", [source], TensorType(tuple(shape[:axis] + [width] + shape[axis + 1:]),
                                                           _type_of(fx).dtype), base=_base(fx, "pad_block"))

    if mode == "constant":
        scalar = ctx.param(_base(fx, "pad_value"), np.full((1,) * len(shape), fill, np.float32))
        if fill >= 0:
            ctx.nonneg.add(scalar)
        first, last = [block(scalar, before)] if before else [], [block(scalar, after)] if after else []
    elif mode == "reflect":  # x[before], ..., x[1] | x | x[size-2], ..., x[size-1-after]
        if max(before, after) >= size:
            raise _Unsupported(f"reflect pad of {max(before, after)} on an axis of {size} (it must be smaller)")
        first = [run(k, k + 1) for k in range(before, 0, -1)]
        last = [run(k, k + 1) for k in range(size - 2, size - 2 - after, -1)]
    elif mode == "replicate":
        first = [block(run(0, 1), before)] if before else []
        last = [block(run(size - 1, size), after)] if after else []
    else:  # circular: the other end
        if max(before, after) > size:
            raise _Unsupported(f"circular pad of {max(before, after)} on an axis of {size} (at most its size)")
        first, last = [run(size - before, size)] if before else [], [run(0, after)] if after else []
    return first + [value] + last


def _select_value(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, index: int, out_shape) -> str:
    index = index + shape[axis] if index < 0 else index
    if not 0 <= index < shape[axis]:
        raise _Unsupported(f"select index {index} out of range")
    piece = _slice_value(ctx, fx, xv, shape, axis, index, index + 1, TensorType(
        tuple(shape[:axis]) + (1,) + tuple(shape[axis + 1:])))
    return ctx.emit(fx, "reshape", [piece], TensorType(tuple(out_shape)), base=_base(fx, "reshape"))


def _select(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape = _type_of(fx.args[0]).shape
    axis = int(fx.args[1]) % len(shape)
    return _select_value(ctx, fx, ctx.value(fx.args[0]), shape, axis, int(fx.args[2]), _type_of(fx).shape)


def _split(ctx: _Ctx, fx: torch.fx.Node) -> tuple[str, ...]:
    # split.Tensor(x, split_size, dim=0) / split_with_sizes(x, sizes, dim=0): one slice per piece
    shape = _type_of(fx.args[0]).shape
    axis = int(_arg(fx, 2, "dim", 0)) % len(shape)
    size = fx.args[1]
    sizes = [int(s) for s in size] if isinstance(size, (list, tuple)) else \
        [min(int(size), shape[axis] - i) for i in range(0, shape[axis], int(size))]
    xv, out, start = ctx.value(fx.args[0]), [], 0
    for s in sizes:
        out.append(_slice_value(ctx, fx, xv, shape, axis, start, start + s))
        start += s
    return tuple(out)


def _chunk(ctx: _Ctx, fx: torch.fx.Node) -> tuple[str, ...]:
    # chunk(x, chunks, dim=0) = split(x, ceil(size / chunks), dim)
    shape = _type_of(fx.args[0]).shape
    axis = int(_arg(fx, 2, "dim", 0)) % len(shape)
    size = -(-shape[axis] // int(fx.args[1]))
    xv, out = ctx.value(fx.args[0]), []
    for start in range(0, shape[axis], size):
        out.append(_slice_value(ctx, fx, xv, shape, axis, start, min(start + size, shape[axis])))
    return tuple(out)


def _unbind(ctx: _Ctx, fx: torch.fx.Node) -> tuple[str, ...]:
    shape = _type_of(fx.args[0]).shape
    axis = int(_arg(fx, 1, "dim", 0)) % len(shape)
    xv = ctx.value(fx.args[0])
    out_shape = tuple(shape[:axis]) + tuple(shape[axis + 1:])
    return tuple(_select_value(ctx, fx, xv, shape, axis, i, out_shape) for i in range(shape[axis]))


def _stack(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # stack(tensors, dim=0) = cat of the tensors, each with a new axis of size 1 at dim
    out_t = _type_of(fx)
    axis = int(_arg(fx, 1, "dim", 0)) % len(out_t.shape)
    vals = [ctx.value(v) for v in fx.args[0]]
    piece = TensorType(out_t.shape[:axis] + (1,) + out_t.shape[axis + 1:])
    grown = [ctx.emit(fx, "reshape", [v], piece, base=_base(fx, "unsqueeze")) for v in vals]
    if len(grown) == 1:
        return grown[0]
    return ctx.emit(fx, "cat", grown, out_t, {"axis": axis}, base=_base(fx, "stack"))


def _filled(value_arg: int | None):
    """zeros / new_zeros / full / zeros_like: a constant of the (static) output shape."""

    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        t = _type_of(fx)
        value = 0.0 if value_arg is None else float(fx.args[value_arg])
        if t.dtype != "float32":
            raise _Unsupported(f"a constant of dtype {t.dtype}")
        name = ctx.param(_base(fx, "const"), np.full(t.shape, value, np.float32))
        if value >= 0:
            ctx.nonneg.add(name)
        return name

    return handler


def _max_pool_with_indices(ctx: _Ctx, fx: torch.fx.Node) -> str:
    if any(u.args[1] != 0 for u in fx.users):
        raise _Unsupported("max_pool2d indices are used")
    kernel = _pair(fx.args[1])
    attrs = {"kernel": kernel, "stride": _pair(_arg(fx, 2, "stride"), kernel), "padding": _pair(_arg(fx, 3, "padding", 0)),
             "dilation": _pair(_arg(fx, 4, "dilation", 1)), "ceil_mode": bool(_arg(fx, 5, "ceil_mode", False))}
    xv = ctx.value(fx.args[0])
    val = fx.meta["val"][0]
    return ctx.emit(fx, "max_pool2d", [xv], TensorType(tuple(val.shape)), attrs)


# -- Hugging Face transformers: token embeddings, Conv1D's addmm, constant folding -------------


def _embedding(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False): the
    # IR op gives ids.shape + [dim]; a reshape restores a view of the ids taken on the way
    table, ids = fx.args[:2]
    base = _module_path(fx) or fx.name
    weight = ctx.param(f"{base}.weight", ctx.tensor(table).detach().float().numpy())
    ids_value = ctx.value(ids)
    if ids_value not in ctx.integer_inputs:
        raise _Unsupported("ids computed inside the model (only an integer model input may index an embedding)")
    t = _type_of(fx)
    rows_shape = ctx.id_shapes[ids_value] + (t.shape[-1],)
    out = ctx.emit(fx, "embedding", [weight, ids_value], TensorType(rows_shape), base=base)
    if rows_shape == t.shape:
        return out
    return ctx.emit(fx, "reshape", [out], t, base=_base(fx, "reshape"))


def _addmm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # addmm(bias, x, w, beta=1, alpha=1) = bias + x @ w: transformers' Conv1D keeps w as [in, out]
    bias, x, w = fx.args[:3]
    if _arg(fx, 3, "beta", 1) != 1 or _arg(fx, 4, "alpha", 1) != 1:
        raise _Unsupported("addmm with beta or alpha != 1")
    base = _module_path(fx) or fx.name
    if ctx.is_const(w) and ctx.is_const(bias) and ctx.tensor(bias).dim() == 1:
        weight = ctx.tensor(w).detach().float().numpy().T
        inputs = [ctx.value(x), ctx.param(f"{base}.weight", np.ascontiguousarray(weight)),
                  ctx.param(f"{base}.bias", ctx.tensor(bias).detach().float().numpy())]
        return ctx.emit(fx, "linear", inputs, attrs={"act": "none"})
    product = ctx.emit(fx, "matmul", [ctx.value(x), ctx.value(w)], base=_base(fx, "matmul"))
    return ctx.emit(fx, "add", [product, ctx.value(bias)], base=_base(fx, "add"))


def _pow(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x ** e`` for the exponents PyTorch's kernel computes without ``pow``: 2 and 3 as products
    (``x * x (* x)``), 0.5 as ``sqrt``, -0.5 as ``1 / sqrt``, -1 as ``1 / x``, -2 as ``1 / (x * x)``."""
    exponent = fx.args[1]
    if exponent not in (1, 2, 3, 0.5, -0.5, -1, -2):
        raise _Unsupported(f"pow with exponent {exponent!r} of a runtime value (only 1, 2, 3, 0.5, -0.5, -1, -2)")
    xv, shape = ctx.value(fx.args[0]), _shape_of(fx.args[0])
    if exponent in (0.5, -0.5):
        root = _typed(ctx, fx, "sqrt", [xv], shape, "sqrt")
        return root if exponent == 0.5 else ctx.emit(fx, "div", [_scalar(ctx, fx, 1.0, "one"), root],
                                                     base=_base(fx, "pow"))
    if exponent in (-1, -2):
        below = xv if exponent == -1 else _typed(ctx, fx, "mul", [xv, xv], shape, "square")
        return ctx.emit(fx, "div", [_scalar(ctx, fx, 1.0, "one"), below], base=_base(fx, "pow"))
    out = xv
    for _ in range(int(exponent) - 1):
        out = ctx.emit(fx, "mul", [out, xv], base=_base(fx, "pow"))
    return out


def _same_dtype(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # to.dtype / _to_copy of a runtime value: only a float32 -> float32 copy is a no-op
    src = fx.args[0]
    if _type_of(fx).dtype != _type_of(src).dtype:
        raise _Unsupported(f"a dtype conversion of a runtime value to {_type_of(fx).dtype}")
    return ctx.value(src)


def _no_op(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """_assert_tensor_metadata (a trace-time check) and in-place detach: the value itself."""
    return ctx.value(fx.args[0])


def _constant_only(ctx: _Ctx, fx: torch.fx.Node) -> str:
    raise _Unsupported("supported on constants only (folded at capture); here it depends on the model's input")


def _foldable(ctx: _Ctx, fx: torch.fx.Node) -> bool:
    """Whether every tensor ``fx`` reads is a constant (parameters, buffers, folded results)."""
    if fx.target in _NEVER_FOLDED:
        return False
    if (fx.target in _BROADCASTS and _is_float(fx)
            and any(u.name not in ctx.constant_derived for u in fx.users)):
        return False  # a class token expanded to the batch: an IR expand, not a batch-sized constant
    return all(a.name in ctx.consts for a in _value_inputs(fx))


def _is_float(fx: torch.fx.Node) -> bool:
    val = fx.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def _value_inputs(fx: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs whose values ``fx`` reads: not the first of an op that reads only its shape."""
    inputs = fx.all_input_nodes
    if fx.target in _SHAPE_ONLY and fx.args and isinstance(fx.args[0], torch.fx.Node):
        return [a for a in inputs if a is not fx.args[0]]
    return inputs


def _constant_derived(graph: torch.fx.Graph, consts) -> set[str]:
    """The nodes computed from constants alone (folded at capture, unless they feed the model)."""
    derived = set(consts)
    for fx in graph.nodes:
        if fx.op == "call_function" and fx.target not in _NEVER_FOLDED and all(
                a.name in derived for a in _value_inputs(fx)):
            derived.add(fx.name)
    return derived


def _fold(ctx: _Ctx, fx: torch.fx.Node) -> None:
    """Evaluate ``fx`` with torch now; its result is a constant (a parameter once a runtime op reads it)."""
    def constant(a: torch.fx.Node):
        if a.name in ctx.consts:
            return ctx.consts[a.name]
        val = a.meta["val"]  # (an op that reads only the shape and dtype of a runtime value)
        return torch.zeros(tuple(int(n) for n in val.shape), dtype=val.dtype)

    args, kwargs = torch.fx.node.map_arg((fx.args, fx.kwargs), constant)
    try:
        with torch.no_grad():
            ctx.consts[fx.name] = fx.target(*args, **kwargs)
    except Exception as e:  # torch raises many types; the op is then reported as unsupported
        raise _Unsupported(f"could not evaluate on constants ({type(e).__name__})") from None
    ctx.folded[fx.name] = _base(fx, "const")


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
    _aten.addmm.default: _addmm,
    _aten.unflatten.int: _reshape,
    _aten.pow.Tensor_Scalar: _pow,
    _aten.to.dtype: _same_dtype,
    _aten.to.device: _same_dtype,
    _aten.to.dtype_layout: _same_dtype,
    _aten._to_copy.default: _same_dtype,
    _aten._assert_tensor_metadata.default: _no_op,
    _aten.detach_.default: _no_op,
    _aten.lift_fresh_copy.default: _no_op,
})
_CONSTANT_ONLY = (
    _aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.ge.Scalar, _aten.ge.Tensor,
    _aten.le.Scalar, _aten.le.Tensor, _aten.gt.Scalar, _aten.gt.Tensor, _aten.lt.Scalar, _aten.lt.Tensor,
    _aten.eq.Scalar, _aten.eq.Tensor, _aten.ne.Scalar, _aten.ne.Tensor,
    _aten.where.self, _aten.where.ScalarOther, _aten.where.ScalarSelf, _aten.gather.default,
    _aten.__and__.Tensor, _aten.__or__.Tensor, _aten.bitwise_not.default, _aten.logical_not.default,
    _aten.cumsum.default, _aten.diff.default, _aten.index.Tensor, _aten.new_ones.default, _aten.ones.default,
    _aten.ones_like.default, _aten.full_like.default, _aten.expand.default, _aten.masked_fill.Scalar,
    _aten.tril.default, _aten.triu.default, _aten.pow.Scalar, _aten.fill_.Scalar, _aten.fill_.Tensor,
)
for _op in _CONSTANT_ONLY:
    HANDLERS.setdefault(_op, _constant_only)  # a runtime handler registered elsewhere wins
# ops whose result depends only on their first input's shape and dtype (x.new_zeros(...)): a
# constant, folded, whatever that input is (Swin builds its window mask from one and fills it)
_SHAPE_ONLY = frozenset({_aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default,
                         _aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default})
# csqc's own layer ops read their weights as constants and must stay layers
_BROADCASTS = frozenset({_aten.expand.default, _aten.expand_as.default, _aten.repeat.default})
_NEVER_FOLDED = frozenset({torch.ops.csqc.quant_conv2d.default, torch.ops.csqc.quant_linear.default,
                           torch.ops.csqc.quant_conv_transpose2d.default,
                           torch.ops.csqc.act_quant.default, torch.ops.csqc.act_quant_asymmetric.default})


def _float_conv_convolution(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
    if fx.args[6]:
        raise _Unsupported("transposed convolution")
    x, w, b, stride, padding, dilation = fx.args[:6]
    shim = torch.fx.Node.__new__(torch.fx.Node)
    shim.__dict__.update(fx.__dict__)
    shim.args = (x, w, b, stride, padding, dilation, fx.args[8])
    shim.kwargs = {}
    return _float_conv(ctx, shim)


# -- attention: scaled_dot_product_attention decomposed, expand / repeat, unflatten ----------

# float32's lowest finite value stands for -inf in masks: csqc refuses non-finite parameters,
# and softmax gives the same result either way: exp(lowest - row max) is 0 in float32 as
# exp(-inf) is, and score + lowest is lowest for any score below ~1e31 (half an ulp there).
# Only a row masked everywhere differs: -inf makes it NaN, lowest makes it uniform.
_MASKED = float(np.finfo(np.float32).min)


def _shape_of(arg) -> tuple[int, ...]:
    return _type_of(arg).shape


def _typed(ctx: _Ctx, fx: torch.fx.Node, op: str, inputs, shape, suffix: str, attrs=None) -> str:
    """An intermediate node of a decomposition: its own shape, named ``<module>.<suffix>``."""
    return ctx.emit(fx, op, inputs, TensorType(tuple(int(s) for s in shape)), attrs, base=_base(fx, suffix))


def _scalar(ctx: _Ctx, fx: torch.fx.Node, value: float, what: str) -> str:
    name = ctx.param(_base(fx, what), np.array(value, dtype=np.float32))
    if value >= 0:
        ctx.nonneg.add(name)
    return name


def _repeat_heads(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, groups: int, what: str) -> str:
    """``x.repeat_interleave(groups, dim=-3)`` (grouped-query attention) as reshape, expand, reshape."""
    lead, heads, tail = tuple(shape[:-3]), shape[-3], tuple(shape[-2:])
    grown = _typed(ctx, fx, "reshape", [xv], lead + (heads, 1) + tail, f"{what}.unsqueeze")
    spread = _typed(ctx, fx, "expand", [grown], lead + (heads, groups) + tail, f"{what}.expand")
    return _typed(ctx, fx, "reshape", [spread], lead + (heads * groups,) + tail, f"{what}.repeat")


def _constant_mask(mask: torch.Tensor | None, causal: bool, length: int, source: int) -> np.ndarray | None:
    """The additive float mask of a constant ``attn_mask`` and/or ``is_causal`` (True/1 = attend
    for a boolean mask, as in ``F.scaled_dot_product_attention``)."""
    bias = None
    if causal:  # attend to the diagonal and below
        bias = np.where(np.tril(np.ones((length, source), bool)), np.float32(0), np.float32(_MASKED))
    if mask is not None:
        m = mask.detach().cpu().numpy()
        m = (np.where(m, np.float32(0), np.float32(_MASKED)) if m.dtype == np.bool_
             else m.astype(np.float32))
        if bias is not None:  # both: PyTorch adds them; masked twice stays the lowest finite value
            with np.errstate(over="ignore"):
                m = np.maximum(bias + m, np.float32(_MASKED))
        bias = m
    return None if bias is None else bias.astype(np.float32)


def _sdpa(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=False,
    # scale=None, enable_gqa=False), in the order of PyTorch's documented reference:
    # softmax((q @ k^T) * scale + mask) @ v, scale = 1 / sqrt(E) unless given
    q, k, v = fx.args[:3]
    mask, dropout_p = _arg(fx, 3, "attn_mask"), float(_arg(fx, 4, "dropout_p", 0.0))
    causal, scale = bool(_arg(fx, 5, "is_causal", False)), _arg(fx, 6, "scale")
    if dropout_p != 0.0:  # the functional form drops at random even in eval mode
        raise _Unsupported(f"dropout_p={dropout_p} (random at inference; pass 0 outside training)")
    q_shape, k_shape, v_shape = (_shape_of(a) for a in (q, k, v))
    if min(len(q_shape), len(k_shape), len(v_shape)) < 2:
        raise _Unsupported("query, key and value need rank >= 2")
    kv, vv = ctx.value(k), ctx.value(v)
    if bool(_arg(fx, 7, "enable_gqa", False)) and len(q_shape) >= 3 and q_shape[-3] != k_shape[-3]:
        if q_shape[-3] % k_shape[-3] or q_shape[-3] % v_shape[-3]:
            raise _Unsupported(f"{q_shape[-3]} query heads are not a multiple of the key/value heads")
        kv = _repeat_heads(ctx, fx, kv, k_shape, q_shape[-3] // k_shape[-3], "sdpa.key")
        vv = _repeat_heads(ctx, fx, vv, v_shape, q_shape[-3] // v_shape[-3], "sdpa.value")
        k_shape = k_shape[:-3] + (q_shape[-3],) + k_shape[-2:]
    length, source = q_shape[-2], k_shape[-2]
    rank = len(k_shape)
    key_t = _typed(ctx, fx, "permute", [kv], k_shape[:-2] + (k_shape[-1], source), "sdpa.key_t",
                   {"dims": tuple(range(rank - 2)) + (rank - 1, rank - 2)})
    scores_shape = tuple(np.broadcast_shapes(q_shape[:-2], k_shape[:-2])) + (length, source)
    scores = _typed(ctx, fx, "matmul", [ctx.value(q), key_t], scores_shape, "sdpa.scores")
    factor = 1.0 / float(np.sqrt(q_shape[-1])) if scale is None else float(scale)
    scores = _typed(ctx, fx, "mul", [scores, _scalar(ctx, fx, factor, "sdpa.scale")], scores_shape, "sdpa.scaled")
    scores, scores_shape = _add_mask(ctx, fx, scores, scores_shape, mask, causal)
    weights = _typed(ctx, fx, "softmax", [scores], scores_shape, "sdpa.weights", {"axis": len(scores_shape) - 1})
    return ctx.emit(fx, "matmul", [weights, vv], base=_base(fx, "sdpa"))


def _add_mask(ctx: _Ctx, fx: torch.fx.Node, scores: str, shape, mask, causal: bool) -> tuple[str, tuple]:
    """``scores + mask`` and its shape: constant masks (and is_causal) folded into one float
    parameter; a mask computed at runtime must be float (a boolean one would need a select op)."""
    runtime_mask = mask is not None and not ctx.is_const(mask)
    if runtime_mask:
        if _type_of(mask).dtype != "float32":
            raise _Unsupported(f"a {_type_of(mask).dtype} attn_mask computed by the model (pass a float mask)")
        shape = tuple(np.broadcast_shapes(tuple(shape), _shape_of(mask)))
        scores = _typed(ctx, fx, "add", [scores, ctx.value(mask)], shape, "sdpa.masked")
    bias = _constant_mask(None if runtime_mask or mask is None else ctx.tensor(mask), causal, shape[-2], shape[-1])
    if bias is None:
        return scores, shape
    shape = tuple(np.broadcast_shapes(tuple(shape), bias.shape))
    return _typed(ctx, fx, "add", [scores, ctx.param(_base(fx, "sdpa.mask"), bias)], shape, "sdpa.masked"), shape


def _expand(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # expand(x, size) / expand_as: broadcast to the output shape (a class token to the batch);
    # an expand that changes nothing is the value itself
    t = _type_of(fx)
    xv = ctx.value(fx.args[0])
    if _shape_of(fx.args[0]) == t.shape:
        return xv
    return ctx.emit(fx, "expand", [xv], t, base=_base(fx, "expand"))


def _repeat(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # repeat(x, repeats) tiles x: every axis of size s becomes [r, s] (reshape to [1, s],
    # expand to [r, s]), then the pairs are merged; tile(x, dims) is repeat with the dims
    # padded by leading ones to x's rank
    repeats = tuple(int(r) for r in fx.args[1])
    repeats = (1,) * (len(_shape_of(fx.args[0])) - len(repeats)) + repeats
    shape = (1,) * (len(repeats) - len(_shape_of(fx.args[0]))) + _shape_of(fx.args[0])
    xv = ctx.value(fx.args[0])
    if all(r == 1 for r in repeats):  # at most new leading axes of size 1
        return xv if shape == _shape_of(fx.args[0]) else ctx.emit(fx, "reshape", [xv], base=_base(fx, "repeat"))
    paired = tuple(d for s in shape for d in (1, s))
    tiled = tuple(d for r, s in zip(repeats, shape) for d in (r, s))
    grown = _typed(ctx, fx, "reshape", [xv], paired, "repeat.pairs")
    spread = _typed(ctx, fx, "expand", [grown], tiled, "repeat.expand")
    return ctx.emit(fx, "reshape", [spread], base=_base(fx, "repeat"))


def _upsample_nearest(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.interpolate`` / ``nn.Upsample`` in ``nearest`` or ``nearest-exact`` mode by whole
    factors (U-Nets, FPNs, generators): every input row, column... repeated, as ``_repeat``
    does it (a size-1 axis after each spatial axis, expanded to the factor, merged back): data
    movement, exact. Where torch's own index arithmetic (float32 scales, as its kernel computes
    them) does not pick ``dst // factor`` for every output, or the sizes are not whole
    multiples, the op is refused by name."""
    shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
    scales = _arg(fx, 2, "scale_factors", None)
    exact = "exact" in str(fx.target)
    factors = []
    for d, (size, grown) in enumerate(zip(shape[2:], out[2:])):
        if grown % size:
            raise _Unsupported(f"nearest upsampling from {size} to {grown} (not a whole factor)")
        factor = grown // size
        scale = np.float32(1.0 / scales[d]) if scales and scales[d] > 0 else np.float32(size) / np.float32(grown)
        dst = np.arange(grown, dtype=np.float32)
        src = np.minimum(np.floor((dst + np.float32(0.5 * exact)) * scale).astype(np.int64), size - 1)
        if factor not in (1, 2) and not np.array_equal(src, np.arange(grown) // factor):  # (torch shifts for 2x)
            raise _Unsupported(f"nearest upsampling by {factor}: torch's float32 indices are not whole repeats")
        factors.append(factor)
    return _repeated_in_place(ctx, fx, ctx.value(fx.args[0]), shape, (1, 1, *factors), "upsample")


def _repeated_in_place(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, factors, what: str) -> str:
    """Each element of ``x`` repeated ``factors[axis]`` times in place along each axis: a size-1
    axis after every repeated axis, expanded to the factor, merged back (data movement, exact)."""
    if all(f == 1 for f in factors):
        return xv
    paired = [((s, 1), (s, f)) if f > 1 else ((s,), (s,)) for s, f in zip(shape, factors)]
    grown = _typed(ctx, fx, "reshape", [xv], tuple(d for one, _ in paired for d in one), f"{what}.pairs")
    spread = _typed(ctx, fx, "expand", [grown], tuple(d for _, many in paired for d in many), f"{what}.expand")
    return ctx.emit(fx, "reshape", [spread], base=_base(fx, what))


def _gathered(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, index: np.ndarray, what: str) -> str:
    """``x`` indexed by ``index`` along ``axis``: the index's runs of consecutive positions as
    slices, concatenated (a few runs: the callers pass per-phase indices of whole-factor
    resampling, a shifted copy with a clamped edge)."""
    runs, start = [], 0
    for t in range(1, len(index) + 1):
        if t == len(index) or index[t] != index[t - 1] + 1:
            runs.append(_slice_value(ctx, fx, xv, shape, axis, int(index[start]), int(index[t - 1]) + 1))
            start = t
    if len(runs) == 1:
        return runs[0]
    out = tuple(shape[:axis]) + (len(index),) + tuple(shape[axis + 1:])
    return _typed(ctx, fx, "cat", runs, out, what, {"axis": axis})


def _linear_weights(size: int, grown: int, scale) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's source indices and weights of linear resampling without aligned corners, per
    output position, in its float32 arithmetic (``compute_source_index_and_lambda``)."""
    ratio = np.float32(1.0 / scale) if scale else np.float32(size) / np.float32(grown)
    real = (np.arange(grown, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5)
    real = np.maximum(real, np.float32(0))
    first = np.minimum(np.floor(real).astype(np.int64), size - 1)
    second = first + (first < size - 1)
    lam = np.clip(real - first.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return first, second, (np.float32(1) - lam).astype(np.float32), lam


def _upsample_linear(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.interpolate`` in ``linear`` / ``bilinear`` / ``trilinear`` mode (``align_corners``
    False) by whole factors (segmentation heads, U-Nets): along each spatial axis, the last first
    as torch nests them, ``x[i0] * w0 + x[i1] * w1`` with torch's own float32 indices and
    weights. The gathers are per phase of the factor (output positions ``f*j + k``): a shifted
    copy, a few slices; the phases interleave by a cat on a new axis. Every runtime runs the same
    float32 multiplies and adds (PyTorch's kernel may fuse them: float tolerance there)."""
    if _arg(fx, 2, "align_corners", False):
        raise _Unsupported("linear upsampling with align_corners=True")
    shape, out = list(_shape_of(fx.args[0])), _type_of(fx).shape
    scales = _arg(fx, 3, "scale_factors", None)
    value = ctx.value(fx.args[0])
    for d in reversed(range(len(shape) - 2)):
        axis, size, grown = 2 + d, shape[2 + d], out[2 + d]
        if grown == size:
            continue
        if grown % size:
            raise _Unsupported(f"linear upsampling from {size} to {grown} (not a whole factor)")
        factor = grown // size
        first, second, w0, w1 = _linear_weights(size, grown, scales[d] if scales and scales[d] > 0 else None)
        terms = []
        for index, weight, what in ((first, w0, "near"), (second, w1, "far")):
            phases = [_gathered(ctx, fx, value, shape, axis, index[k::factor], f"upsample.{what}")
                      for k in range(factor)]
            split = shape[:axis + 1] + [1] + shape[axis + 1:]
            stacked = _typed(ctx, fx, "cat", [_typed(ctx, fx, "reshape", [p], split, "upsample.phase") for p in phases],
                             shape[:axis + 1] + [factor] + shape[axis + 1:], f"upsample.{what}s", {"axis": axis + 1})
            grown_shape = shape[:axis] + [grown] + shape[axis + 1:]
            gathered = _typed(ctx, fx, "reshape", [stacked], grown_shape, f"upsample.{what}")
            w = ctx.param(_base(fx, f"upsample.{what}_weight"),
                          weight.reshape([grown if a == axis else 1 for a in range(len(shape))]))
            ctx.nonneg.add(w)
            terms.append(_typed(ctx, fx, "mul", [gathered, w], grown_shape, f"upsample.{what}_term"))
        shape[axis] = grown
        value = _typed(ctx, fx, "add", terms, shape, "upsample")
    return value


HANDLERS.update({
    _aten.upsample_linear1d.vec: _upsample_linear,
    _aten.upsample_bilinear2d.vec: _upsample_linear,
    _aten.upsample_trilinear3d.vec: _upsample_linear,
    _aten.upsample_nearest1d.vec: _upsample_nearest,
    _aten.upsample_nearest2d.vec: _upsample_nearest,
    _aten.upsample_nearest3d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact1d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact2d.vec: _upsample_nearest,
    _aten._upsample_nearest_exact3d.vec: _upsample_nearest,
})


# -- more layers as compositions of IR ops (no op of their own) ----------------------------


def _group_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``group_norm(x, groups, weight, bias, eps)`` and ``instance_norm`` on the input's own
    statistics (one group a channel): each group's values as one row of a layer norm without
    affine (reshape, layer_norm, reshape back), then the per-channel weight and bias (multiply,
    add). torch fuses the scale into one multiply: float tolerance there; every runtime of the
    IR computes the same bits."""
    shape = _shape_of(fx.args[0])
    if fx.target == _aten.instance_norm.default:
        # instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn)
        if not _arg(fx, 5, "use_input_stats", True):
            raise _Unsupported("instance_norm with running statistics (track_running_stats in eval mode)")
        groups, w, b, eps = shape[1], _arg(fx, 1, "weight"), _arg(fx, 2, "bias"), float(_arg(fx, 7, "eps", 1e-5))
    else:
        groups, w, b, eps = int(fx.args[1]), _arg(fx, 2, "weight"), _arg(fx, 3, "bias"), float(_arg(fx, 4, "eps", 1e-5))
    row = int(np.prod(shape[1:], dtype=np.int64)) // groups
    base = _module_path(fx) or fx.name
    rows = _typed(ctx, fx, "reshape", [ctx.value(fx.args[0])], (shape[0], groups, row), "groups")
    ones, zeros = ctx.param(f"{base}.unit_weight", np.ones(row, np.float32)), ctx.param(f"{base}.unit_bias",
                                                                                        np.zeros(row, np.float32))
    normed = _typed(ctx, fx, "layer_norm", [rows, ones, zeros], (shape[0], groups, row), "normalized",
                    {"axis": 2, "eps": eps})
    value = _typed(ctx, fx, "reshape", [normed], shape, "ungrouped")
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    for tensor, op in ((w, "mul"), (b, "add")):
        if tensor is not None:
            param = ctx.param(f"{base}.{'weight' if op == 'mul' else 'bias'}",
                              ctx.tensor(tensor).detach().float().numpy().reshape(per_channel))
            value = _typed(ctx, fx, op, [value, param], shape, op)
    return value


def _leaky_relu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``leaky_relu(x, slope)`` and ``prelu(x, weight)`` (``x > 0 ? x : slope * x``) as
    ``relu(x) + min(x, 0) * slope``: each term is exactly torch's value or zero, so the sum is too."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    base = _module_path(fx) or fx.name
    if fx.target in (_aten.prelu.default, _aten._prelu_kernel.default):
        w = ctx.tensor(fx.args[1]).detach().float().numpy()
        slope = ctx.param(f"{base}.weight", w.reshape((1, w.size) + (1,) * (len(shape) - 2)) if w.size > 1 else
                          w.reshape((1,) * len(shape)))
    else:
        slope = _scalar(ctx, fx, float(_arg(fx, 1, "negative_slope", 0.01)), "slope")
    return _leaky(ctx, fx, xv, shape, slope, "leaky_relu")


def _leaky(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, slope: str, what: str) -> str:
    """``relu(x) + min(x, 0) * slope`` (``slope``: a parameter's name)."""
    zero = _scalar(ctx, fx, 0.0, "zero")
    positive = _typed(ctx, fx, "relu", [xv], shape, "positive")
    negative = _typed(ctx, fx, "mul", [_typed(ctx, fx, "minimum", [xv, zero], shape, "negative_part"), slope], shape,
                      "negative")
    return ctx.emit(fx, "add", [positive, negative], base=_base(fx, what))


def _pixel_shuffle(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``pixel_shuffle`` / ``pixel_unshuffle`` by ``r`` (super-resolution heads): reshape,
    permute, reshape."""
    n, c, h, w = _shape_of(fx.args[0])
    r = int(fx.args[1])
    if fx.target == _aten.pixel_shuffle.default:  # [n, c*r*r, h, w] -> [n, c, h*r, w*r]
        split, dims = (n, c // (r * r), r, r, h, w), (0, 1, 4, 2, 5, 3)
    else:  # [n, c, h*r, w*r] -> [n, c*r*r, h, w]
        split, dims = (n, c, h // r, r, w // r, r), (0, 1, 3, 5, 2, 4)
    parts = _typed(ctx, fx, "reshape", [ctx.value(fx.args[0])], split, "shuffle.split")
    moved = _typed(ctx, fx, "permute", [parts], tuple(split[d] for d in dims), "shuffle.permute", {"dims": dims})
    return ctx.emit(fx, "reshape", [moved], base=_base(fx, "shuffle"))


def _repeat_interleave(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``repeat_interleave(x, r, dim)`` with a whole ``r``: each element repeated in place along
    ``dim`` (a size-1 axis after it, expanded to ``r``, merged back)."""
    repeats, dim = fx.args[1], _arg(fx, 2, "dim", None)
    if dim is None or not isinstance(repeats, int):
        raise _Unsupported("repeat_interleave without a dim, or by a tensor of repeats")
    shape = _shape_of(fx.args[0])
    axis = int(dim) % len(shape)
    factors = tuple(int(repeats) if a == axis else 1 for a in range(len(shape)))
    return _repeated_in_place(ctx, fx, ctx.value(fx.args[0]), shape, factors, "interleave")


def _narrow(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape = _shape_of(fx.args[0])
    axis, start = int(fx.args[1]) % len(shape), int(fx.args[2])
    start = start + shape[axis] if start < 0 else start
    return _slice_value(ctx, fx, ctx.value(fx.args[0]), shape, axis, start, start + int(fx.args[3]))


def _negated(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.emit(fx, "mul", [ctx.value(fx.args[0]), _scalar(ctx, fx, -1.0, "minus_one")], base=_base(fx, "neg"))


def _squared(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    return ctx.emit(fx, "mul", [xv, xv], base=_base(fx, "square"))


def _feature_dropout(ctx: _Ctx, fx: torch.fx.Node) -> str:
    if _arg(fx, 2, "train", False):
        raise _Unsupported("dropout in training mode (call model.eval())")
    return ctx.value(fx.args[0])


def _as_2d(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape) -> str:
    return _typed(ctx, fx, "reshape", [xv], (shape[0], shape[1], 1, shape[2]), "as_2d")


def _over_height_one(fx: torch.fx.Node, i: int, name: str, default: int, height: int) -> tuple[int, int]:
    """A 1-D op's argument as its 2-D op's over a height of one: ``(height, value)``."""
    return height, int(_pair(_arg(fx, i, name, default))[0])


def _conv1d(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """A float ``conv1d`` as a conv2d over a height of one (weight ``[O, C/g, 1, K]``)."""
    shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
    if isinstance(_arg(fx, 4, "padding", 0), str):
        raise _Unsupported("string padding")
    base = _module_path(fx) or fx.name
    w = ctx.tensor(fx.args[1]).detach().numpy().astype(np.float32)
    inputs = [_as_2d(ctx, fx, ctx.value(fx.args[0]), shape), ctx.param(f"{base}.weight", w[:, :, None, :])]
    if _arg(fx, 2, "bias") is not None:
        inputs.append(ctx.param(f"{base}.bias", ctx.tensor(_arg(fx, 2, "bias")).detach().numpy().astype(np.float32)))
    attrs = {"stride": _over_height_one(fx, 3, "stride", 1, 1), "padding": _over_height_one(fx, 4, "padding", 0, 0),
             "dilation": _over_height_one(fx, 5, "dilation", 1, 1), "groups": int(_arg(fx, 6, "groups", 1)),
             "act": "none"}
    conv = _typed(ctx, fx, "conv2d", inputs, (out[0], out[1], 1, out[2]), "conv2d", attrs)
    return ctx.emit(fx, "reshape", [conv], base=_base(fx, "conv1d"))


def _pool1d(op: str):
    """``max_pool1d`` / ``avg_pool1d`` as the 2-D pool over a height of one."""
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
        kernel = int(_pair(fx.args[1])[0])
        stride = int(_pair(_arg(fx, 2, "stride") or kernel)[0])
        attrs = {"kernel": (1, kernel), "stride": (1, stride), "padding": (0, int(_pair(_arg(fx, 3, "padding", 0))[0]))}
        if op == "max_pool2d":
            attrs["dilation"] = (1, int(_pair(_arg(fx, 4, "dilation", 1))[0]))
            attrs["ceil_mode"] = bool(_arg(fx, 5, "ceil_mode", False))
        else:
            attrs["ceil_mode"] = bool(_arg(fx, 4, "ceil_mode", False))
            attrs["count_include_pad"] = bool(_arg(fx, 5, "count_include_pad", True))
        pooled = _typed(ctx, fx, op, [_as_2d(ctx, fx, ctx.value(fx.args[0]), shape)], (out[0], out[1], 1, out[2]),
                        op, attrs)
        return ctx.emit(fx, "reshape", [pooled], base=_base(fx, op.replace("2d", "1d")))
    return handler


def _adaptive_avg1d(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``adaptive_avg_pool1d`` as the 2-D one over a height of one (PyTorch's windows either way)."""
    shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
    pooled = _typed(ctx, fx, "adaptive_avg_pool2d", [_as_2d(ctx, fx, ctx.value(fx.args[0]), shape)],
                    (out[0], out[1], 1, out[2]), "adaptive_avg_pool2d", {"output_size": (1, int(out[2]))})
    return ctx.emit(fx, "reshape", [pooled], base=_base(fx, "adaptive_avg_pool1d"))


def _adaptive_max(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``adaptive_max_pool2d`` to sizes that divide the input's: a max pool whose kernel and
    stride are the ratio (values only; the indices unused)."""
    if any(u.args[1] != 0 and u.users for u in fx.users):
        raise _Unsupported("adaptive_max_pool2d indices are used")
    h, w = _shape_of(fx.args[0])[2:]
    oh, ow = _pair(fx.args[1])
    oh, ow = h if oh is None else int(oh), w if ow is None else int(ow)
    if h % oh or w % ow:
        raise _Unsupported(f"adaptive_max_pool2d from {h}x{w} to {oh}x{ow} (not whole windows)")
    kernel = (h // oh, w // ow)
    attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}
    return ctx.emit(fx, "max_pool2d", [ctx.value(fx.args[0])], TensorType(tuple(fx.meta["val"][0].shape)), attrs)


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
        base = _module_path(fx) or fx.name
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
    base = _module_path(fx) or fx.name
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
    base = _module_path(fx) or fx.name
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


_MAX_GATHER_RUNS = 64  # slices a constant-index gather may take along one axis


def _index_runs(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, index, what: str) -> str:
    """``x`` gathered along ``axis`` at constant positions ``index``: one slice per run of
    consecutive positions, concatenated (a permutation of a few channels, a reversal of a
    short axis); at most ``_MAX_GATHER_RUNS`` runs."""
    size = int(shape[axis])
    index = np.asarray(index).astype(np.int64).reshape(-1)
    index = np.where(index < 0, index + size, index)
    if index.size == 0 or (index < 0).any() or (index >= size).any():
        raise _Unsupported(f"{what}: an index outside the axis of {size}")
    runs = 1 + int(np.count_nonzero(np.diff(index) != 1))
    if runs > _MAX_GATHER_RUNS:
        raise _Unsupported(f"{what} of {runs} separate runs along an axis of {size} (at most {_MAX_GATHER_RUNS} "
                           "slices are translated)")
    return _gathered(ctx, fx, xv, shape, axis, index, what)


def _index_select(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape = _shape_of(fx.args[0])
    axis = int(fx.args[1]) % len(shape)
    return _index_runs(ctx, fx, ctx.value(fx.args[0]), shape, axis, ctx.tensor(fx.args[2]).numpy(), "index_select")


def _index(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x[..., idx, ...]`` with one constant 1-D index (the other axes whole): a gather."""
    indices = list(fx.args[1])
    axes = [i for i, t in enumerate(indices) if t is not None]
    if len(axes) != 1:
        raise _Unsupported("advanced indexing on several axes")
    index = ctx.tensor(indices[axes[0]]).numpy()
    if index.ndim != 1 or index.dtype == np.bool_:
        raise _Unsupported("indexing by a mask or a multi-dimensional index")
    return _index_runs(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), axes[0], index, "indexing")


def _flip(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape, value = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    for dim in fx.args[1]:
        axis = int(dim) % len(shape)
        value = _index_runs(ctx, fx, value, shape, axis, np.arange(shape[axis])[::-1], "flip")
    return value


# -- activations composed of exp and log (ELU family, softplus, Mish) ----------------------------
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _elu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``elu(x, alpha, scale, input_scale)`` (``x > 0 ? x * scale : (exp(x * input_scale) - 1) *
    alpha * scale``; CELU and SELU are ELUs) as ``relu(x) * scale + (exp(min(x, 0) * input_scale)
    - 1) * (alpha * scale)``: where ``x > 0`` the second term is exactly 0, elsewhere the first is;
    the exp is within an ulp or two of torch's (float tolerance, as sigmoid's)."""
    if fx.target in (_aten.celu.default, _aten.celu_.default):
        alpha = float(_arg(fx, 1, "alpha", 1.0))
        alpha, scale, input_scale = alpha, 1.0, 1.0 / alpha
    elif fx.target in (_aten.selu.default, _aten.selu_.default):
        alpha, scale, input_scale = _SELU_ALPHA, _SELU_SCALE, 1.0
    else:
        alpha, scale, input_scale = (float(_arg(fx, i, name, 1.0)) for i, name in
                                     ((1, "alpha"), (2, "scale"), (3, "input_scale")))
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    positive = _typed(ctx, fx, "relu", [xv], shape, "positive")
    if scale != 1.0:
        positive = _typed(ctx, fx, "mul", [positive, _scalar(ctx, fx, scale, "scale")], shape, "scaled")
    negative = _typed(ctx, fx, "minimum", [xv, _scalar(ctx, fx, 0.0, "zero")], shape, "negative_part")
    if input_scale != 1.0:
        negative = _typed(ctx, fx, "mul", [negative, _scalar(ctx, fx, input_scale, "input_scale")], shape,
                          "input_scaled")
    grown = _typed(ctx, fx, "exp", [negative], shape, "exp")
    less_one = _typed(ctx, fx, "sub", [grown, _scalar(ctx, fx, 1.0, "one")], shape, "expm1")
    tail = _typed(ctx, fx, "mul", [less_one, _scalar(ctx, fx, alpha * scale, "alpha")], shape, "negative")
    return ctx.emit(fx, "add", [positive, tail], base=_base(fx, "elu"))


def _log1p_of_positive(ctx: _Ctx, fx: torch.fx.Node, u: str, shape, what: str) -> str:
    """``log1p(u)`` for ``u >= 0`` as ``log(w) + (u - (w - 1)) / w``, ``w = 1 + u``: the
    correction restores what rounding ``1 + u`` lost (for ``u`` below an ulp of 1, all of it:
    ``log1p(u) = u``), so small values keep their relative precision as torch's log1p does."""
    one = _scalar(ctx, fx, 1.0, f"{what}.one")
    w = _typed(ctx, fx, "add", [u, one], shape, f"{what}.w")
    lost = _typed(ctx, fx, "sub", [u, _typed(ctx, fx, "sub", [w, one], shape, f"{what}.w_less_one")], shape,
                  f"{what}.lost")
    return _typed(ctx, fx, "add", [_typed(ctx, fx, "log", [w], shape, f"{what}.log"),
                                   _typed(ctx, fx, "div", [lost, w], shape, f"{what}.correction")], shape, what)


def _at_least(ctx: _Ctx, fx: torch.fx.Node, v: str, floor: float, shape, what: str) -> str:
    """``max(v, floor)`` exactly, as ``0 - min(0 - v, -floor)`` (negation is exact)."""
    zero = _scalar(ctx, fx, 0.0, f"{what}.zero")
    flipped = _typed(ctx, fx, "minimum", [_typed(ctx, fx, "sub", [zero, v], shape, f"{what}.negated"),
                                          _scalar(ctx, fx, -floor, f"{what}.floor")], shape, f"{what}.min")
    return _typed(ctx, fx, "sub", [zero, flipped], shape, what)


def _softplus_of(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, beta: float, threshold: float, what: str) -> str:
    """torch's ``softplus``: ``x * beta > threshold ? x : log1p(exp(x * beta)) / beta``, both
    branches computed (the log1p's exp reading ``min(x * beta, threshold)``: finite) and picked
    by an indicator of ``x * beta - threshold > 0`` that is exactly 0 or 1 (:func:`_indicator`).
    ``branch * indicator`` is exact for 0 and 1; ``x`` is kept above ``-FLT_MAX`` there so that
    ``0 * x`` is never ``0 * -inf``."""
    scaled = xv if beta == 1.0 else _typed(ctx, fx, "mul", [xv, _scalar(ctx, fx, beta, f"{what}.beta")], shape,
                                           f"{what}.scaled")
    limit = _scalar(ctx, fx, threshold, f"{what}.threshold")
    above = _indicator(ctx, fx, _typed(ctx, fx, "sub", [scaled, limit], shape, f"{what}.over"), shape,
                       f"{what}.indicator")
    grown = _typed(ctx, fx, "exp", [_typed(ctx, fx, "minimum", [scaled, limit], shape, f"{what}.within")], shape,
                   f"{what}.exp")
    below = _log1p_of_positive(ctx, fx, grown, shape, f"{what}.log1p")
    if beta != 1.0:
        below = _typed(ctx, fx, "div", [below, _scalar(ctx, fx, beta, f"{what}.divisor")], shape, f"{what}.curve")
    keep = _typed(ctx, fx, "sub", [_scalar(ctx, fx, 1.0, f"{what}.whole"), above], shape, f"{what}.below")
    bounded = _at_least(ctx, fx, xv, -float(np.finfo(np.float32).max), shape, f"{what}.bounded")
    return _typed(ctx, fx, "add", [_typed(ctx, fx, "mul", [below, keep], shape, f"{what}.curve_part"),
                                   _typed(ctx, fx, "mul", [bounded, above], shape, f"{what}.line_part")], shape, what)


def _softplus(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    beta, threshold = float(_arg(fx, 1, "beta", 1.0)), float(_arg(fx, 2, "threshold", 20.0))
    if not beta > 0:
        raise _Unsupported(f"softplus with beta {beta} (not above 0)")
    return _softplus_of(ctx, fx, xv, shape, beta, threshold, "softplus")


def _mish(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``mish(x) = x * tanh(log1p(exp(x)))``, the exp reading ``min(x, 20)`` (finite; past 20
    the tanh is 1 in float32 either way)."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    grown = _typed(ctx, fx, "exp", [_typed(ctx, fx, "minimum", [xv, _scalar(ctx, fx, 20.0, "limit")], shape,
                                           "within")], shape, "exp")
    soft = _log1p_of_positive(ctx, fx, grown, shape, "softplus")
    return ctx.emit(fx, "mul", [xv, _typed(ctx, fx, "tanh", [soft], shape, "tanh")], base=_base(fx, "mish"))


def _reduce_dims(fx: torch.fx.Node, dims) -> tuple[int, ...]:
    nd = len(_shape_of(fx.args[0]))
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return tuple(range(nd))
    return tuple(sorted({int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])}))


def _amax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``amax(x, dims, keepdim)``, and ``max(x, dim, keepdim)``'s values (its indices unused)."""
    if fx.target == _aten.max.dim and any(u.args[1] != 0 and u.users for u in fx.users):
        raise _Unsupported("max(dim) indices are used (argmax)")
    dims = _reduce_dims(fx, _arg(fx, 1, "dim", None))
    keep = bool(_arg(fx, 2, "keepdim", False))
    shape = _shape_of(fx.args[0])
    out = tuple(1 if d in dims else n for d, n in enumerate(shape)) if keep else tuple(
        n for d, n in enumerate(shape) if d not in dims)
    return ctx.emit(fx, "amax", [ctx.value(fx.args[0])], TensorType(out), {"dims": dims, "keepdim": keep})


def _log_softmax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``log_softmax(x, dim)`` in torch's order: ``(x - max) - log(sum(exp(x - max)))``, the max
    and its subtraction exact, the sum as mean times count (one rounding more: float tolerance)."""
    if fx.target == _aten.log_softmax.int and _arg(fx, 2, "dtype", None) not in (None, torch.float32):
        raise _Unsupported("log_softmax to another dtype")
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    axis = int(fx.args[1]) % len(shape)
    kept = tuple(1 if d == axis else n for d, n in enumerate(shape))
    top = _typed(ctx, fx, "amax", [xv], kept, "max", {"dims": (axis,), "keepdim": True})
    shifted = _typed(ctx, fx, "sub", [xv, top], shape, "shifted")
    grown = _typed(ctx, fx, "exp", [shifted], shape, "exp")
    mean = _typed(ctx, fx, "mean", [grown], kept, "mean", {"dims": (axis,), "keepdim": True})
    total = _typed(ctx, fx, "mul", [mean, _scalar(ctx, fx, float(shape[axis]), "count")], kept, "sum")
    return ctx.emit(fx, "sub", [shifted, _typed(ctx, fx, "log", [total], kept, "log")], base=_base(fx, "log_softmax"))


def _variance(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``var`` / ``std`` over dims with a correction (``unbiased``: 1) in two passes:
    ``d = x - mean(x)``, ``mean(d * d) * (N / (N - correction))`` (``mean(d * d)`` where the
    correction is 0), then ``sqrt`` for std. torch accumulates otherwise (Welford's update):
    float tolerance against it, the same bits on every runtime."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    if fx.target in (_aten.var.correction, _aten.std.correction):
        dims, keep = _arg(fx, 1, "dim", None), bool(fx.kwargs.get("keepdim", False))
        correction = fx.kwargs.get("correction", 1)
        correction = 1.0 if correction is None else float(correction)
    else:
        dims, keep = _arg(fx, 1, "dim", None), bool(_arg(fx, 3, "keepdim", False))
        correction = 1.0 if _arg(fx, 2, "unbiased", True) else 0.0
    dims = _reduce_dims(fx, dims)
    if not keep and len(dims) == len(shape):
        raise _Unsupported("a variance to a scalar (reduce to keepdim=True or over fewer dims)")
    count = float(np.prod([shape[d] for d in dims], dtype=np.int64))
    if count - correction <= 0:
        raise _Unsupported(f"a variance of {int(count)} element(s) with correction {correction:g}")
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    out = kept if keep else tuple(n for d, n in enumerate(shape) if d not in dims)
    what = "std" if fx.target in (_aten.std.dim, _aten.std.correction) else "var"
    mean = _typed(ctx, fx, "mean", [xv], kept, "mean", {"dims": dims, "keepdim": True})
    centered = _typed(ctx, fx, "sub", [xv, mean], shape, "centered")
    squares = _typed(ctx, fx, "mul", [centered, centered], shape, "squares")
    value = _typed(ctx, fx, "mean", [squares], out, "mean_square", {"dims": dims, "keepdim": keep})
    if correction:
        value = _typed(ctx, fx, "mul", [value, _scalar(ctx, fx, count / (count - correction), "correction")], out,
                       "var")
    if what == "std":
        value = _typed(ctx, fx, "sqrt", [value], out, "std")
    return value


def _indicator(ctx: _Ctx, fx: torch.fx.Node, d: str, shape, what: str) -> str:
    """Exactly 1 where ``d > 0`` and 0 elsewhere: ``min(relu(d) * 2^126 * 2^24, 1)`` (any positive
    float32, the least subnormal included, times 2^150 reaches 1; an overflow to inf still does)."""
    positive = _typed(ctx, fx, "relu", [d], shape, f"{what}.positive")
    steep = _typed(ctx, fx, "mul", [positive, _scalar(ctx, fx, 2.0**126, f"{what}.big")], shape, f"{what}.steep")
    steeper = _typed(ctx, fx, "mul", [steep, _scalar(ctx, fx, 2.0**24, f"{what}.bigger")], shape, f"{what}.steeper")
    return _typed(ctx, fx, "minimum", [steeper, _scalar(ctx, fx, 1.0, f"{what}.one")], shape, what)


def _negated_value(ctx: _Ctx, fx: torch.fx.Node, v: str, shape, what: str) -> str:
    return _typed(ctx, fx, "sub", [_scalar(ctx, fx, 0.0, f"{what}.zero"), v], shape, what)


def _log_sigmoid(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``log_sigmoid(x)`` as torch's kernel: ``min(x, 0) - log1p(exp(-|x|))``."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    negative = _typed(ctx, fx, "minimum", [xv, _scalar(ctx, fx, 0.0, "zero")], shape, "negative_part")
    magnitude = _abs_value(ctx, fx, xv, shape, "abs")
    grown = _typed(ctx, fx, "exp", [_negated_value(ctx, fx, magnitude, shape, "neg_abs")], shape, "exp")
    return ctx.emit(fx, "sub", [negative, _log1p_of_positive(ctx, fx, grown, shape, "log1p")],
                    base=_base(fx, "log_sigmoid"))


def _glu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``glu(x, dim)``: the first half times the sigmoid of the second."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    axis = int(_arg(fx, 1, "dim", -1)) % len(shape)
    half = shape[axis] // 2
    if shape[axis] % 2:
        raise _Unsupported(f"glu over an odd size ({shape[axis]})")
    a = _slice_value(ctx, fx, xv, shape, axis, 0, half)
    b = _slice_value(ctx, fx, xv, shape, axis, half, 2 * half)
    out = tuple(half if d == axis else n for d, n in enumerate(shape))
    return ctx.emit(fx, "mul", [a, _typed(ctx, fx, "sigmoid", [b], out, "gate")], base=_base(fx, "glu"))


def _shrink(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``hardshrink(x, l)`` (``|x| > l ? x : 0``) as ``x * [|x| - l > 0]``, and ``softshrink(x, l)``
    (``x > l ? x - l : x < -l ? x + l : 0``) as ``relu(x - l) + min(x + l, 0)``: one term is
    exactly 0 wherever the other is torch's value."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    lam = float(_arg(fx, 1, "lambd", 0.5))
    if fx.target == _aten.softshrink.default:
        upper = _typed(ctx, fx, "relu", [_typed(ctx, fx, "sub", [xv, _scalar(ctx, fx, lam, "lambd")], shape, "less")],
                       shape, "upper")
        lower = _typed(ctx, fx, "minimum", [_typed(ctx, fx, "add", [xv, _scalar(ctx, fx, lam, "lambd_")], shape,
                                                   "more"), _scalar(ctx, fx, 0.0, "zero")], shape, "lower")
        return ctx.emit(fx, "add", [upper, lower], base=_base(fx, "softshrink"))
    absolute = _abs_value(ctx, fx, xv, shape, "abs")
    keep = _indicator(ctx, fx, _typed(ctx, fx, "sub", [absolute, _scalar(ctx, fx, lam, "lambd")], shape, "margin"),
                      shape, "keep")
    return ctx.emit(fx, "mul", [xv, keep], base=_base(fx, "hardshrink"))


def _threshold(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``threshold(x, t, value)`` (``x > t ? x : value``) as ``x * [x - t > 0] + value * (1 -
    [x - t > 0])``, ``x`` kept above ``-FLT_MAX`` so that no ``0 * -inf`` appears."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    t, value = float(fx.args[1]), float(fx.args[2])
    if not np.isfinite(value):
        raise _Unsupported(f"threshold with a non-finite value ({value})")
    keep = _indicator(ctx, fx, _typed(ctx, fx, "sub", [xv, _scalar(ctx, fx, t, "threshold")], shape, "margin"),
                      shape, "keep")
    bounded = _at_least(ctx, fx, xv, -float(np.finfo(np.float32).max), shape, "bounded")
    kept = _typed(ctx, fx, "mul", [bounded, keep], shape, "kept")
    if value == 0.0:
        return kept
    replaced = _typed(ctx, fx, "mul", [_typed(ctx, fx, "sub", [_scalar(ctx, fx, 1.0, "one"), keep], shape, "drop"),
                                       _scalar(ctx, fx, value, "value")], shape, "replaced")
    return ctx.emit(fx, "add", [kept, replaced], base=_base(fx, "threshold"))


def _maximum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``maximum(a, b)`` as ``0 - minimum(0 - a, 0 - b)`` (negation is exact)."""
    a, b = fx.args[0], fx.args[1]
    na = _negated_value(ctx, fx, ctx.value(a), _shape_of(a), "neg_a")
    nb = _negated_value(ctx, fx, ctx.value(b), _shape_of(b), "neg_b")
    low = _typed(ctx, fx, "minimum", [na, nb], _type_of(fx).shape, "minimum")
    return ctx.emit(fx, "sub", [_scalar(ctx, fx, 0.0, "zero"), low], base=_base(fx, "maximum"))


def _rrelu_eval(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``rrelu`` in eval mode: a leaky ReLU of slope ``(lower + upper) / 2``."""
    if bool(_arg(fx, 3, "training", False)):
        raise _Unsupported("rrelu in training mode (random slopes)")
    lower, upper = float(_arg(fx, 1, "lower", 1.0 / 8)), float(_arg(fx, 2, "upper", 1.0 / 3))
    slope = _scalar(ctx, fx, float(np.float32((lower + upper) / 2)), "slope")
    return _leaky(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), slope, "rrelu")


_NORM_ORDERS = (1.0, 2.0, math.inf, -math.inf)


def _vector_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``linalg.vector_norm(x, ord, dims, keepdim)`` (``x.norm(p, dim=...)``, ``F.normalize``)
    of order 2 (``sqrt(sum(x * x))``), 1 (``sum(|x|)``; sums as mean times count: float
    tolerance against torch), inf and -inf (``amax(|x|)`` and ``-amax(-|x|)``: exact)."""
    shape = _shape_of(fx.args[0])
    order = float(_arg(fx, 1, "ord", 2))
    if order not in _NORM_ORDERS:
        raise _Unsupported(f"a vector norm of order {order:g} (only 1, 2, inf and -inf)")
    if _arg(fx, 4, "dtype", None) not in (None, torch.float32):
        raise _Unsupported("a vector norm to another dtype")
    dims = _reduce_dims(fx, _arg(fx, 2, "dim", None))
    keep = bool(_arg(fx, 3, "keepdim", False))
    if not keep and len(dims) == len(shape):
        raise _Unsupported("a vector norm to a scalar (keepdim=True or fewer dims)")
    return _norm_of(ctx, fx, ctx.value(fx.args[0]), shape, order, dims, keep, None)


def _norm_of(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, order: float, dims, keep: bool, what: str | None) -> str:
    """The ``order`` norm of ``xv`` over ``dims``: node ``fx``'s own output where ``what`` is None,
    else an intermediate named ``what``."""
    out = tuple(1 if d in dims else n for d, n in enumerate(shape)) if keep else tuple(
        n for d, n in enumerate(shape) if d not in dims)
    prefix = f"{what}." if what else ""

    def result(op: str, inputs, attrs=None) -> str:
        if what is None:
            return ctx.emit(fx, op, inputs, TensorType(out), attrs, base=_base(fx, "norm"))
        return _typed(ctx, fx, op, inputs, out, what, attrs)

    reduced = {"dims": tuple(dims), "keepdim": keep}
    if order == 2:
        squares = _typed(ctx, fx, "mul", [xv, xv], shape, f"{prefix}squares")
        mean = _typed(ctx, fx, "mean", [squares], out, f"{prefix}mean", reduced)
        count = float(np.prod([shape[d] for d in dims], dtype=np.int64))
        total = _typed(ctx, fx, "mul", [mean, _scalar(ctx, fx, count, f"{prefix}count")], out, f"{prefix}sum")
        return result("sqrt", [total])
    magnitude = _abs_value(ctx, fx, xv, shape, f"{prefix}abs")
    if order == 1:
        mean = _typed(ctx, fx, "mean", [magnitude], out, f"{prefix}mean", reduced)
        count = float(np.prod([shape[d] for d in dims], dtype=np.int64))
        return result("mul", [mean, _scalar(ctx, fx, count, f"{prefix}count")])
    if order == math.inf:
        return result("amax", [magnitude], reduced)
    least = _typed(ctx, fx, "amax", [_negated_value(ctx, fx, magnitude, shape, f"{prefix}neg_abs")], out,
                   f"{prefix}neg_min", reduced)
    return result("sub", [_scalar(ctx, fx, 0.0, f"{prefix}zero"), least])


def _cosine_similarity(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.cosine_similarity(a, b, dim, eps)`` in torch's order: each input divided by its 2-norm
    over ``dim`` (kept) clamped below at ``eps``, the quotients' product summed over ``dim``."""
    a, b = fx.args[0], fx.args[1]
    shape = tuple(int(s) for s in torch.broadcast_shapes(_shape_of(a), _shape_of(b)))
    dim = int(_arg(fx, 2, "dim", 1)) % len(shape)
    eps = float(_arg(fx, 3, "eps", 1e-8))
    if len(shape) == 1:
        raise _Unsupported("cosine_similarity of vectors (a scalar: give them a batch axis)")
    unit = []
    for side, arg in (("a", a), ("b", b)):
        v = ctx.value(arg)
        if _shape_of(arg) != shape:
            v = _typed(ctx, fx, "expand", [v], shape, f"{side}.expand")
        norm = _norm_of(ctx, fx, v, shape, 2.0, (dim,), True, f"{side}.norm")
        kept = tuple(1 if d == dim else n for d, n in enumerate(shape))
        clamped = _typed(ctx, fx, "clip", [norm], kept, f"{side}.clamped", {"lo": eps, "hi": math.inf})
        unit.append(_typed(ctx, fx, "div", [v, clamped], shape, f"{side}.unit"))
    product = _typed(ctx, fx, "mul", unit, shape, "product")
    out = tuple(n for d, n in enumerate(shape) if d != dim)
    mean = _typed(ctx, fx, "mean", [product], out, "mean", {"dims": (dim,), "keepdim": False})
    return ctx.emit(fx, "mul", [mean, _scalar(ctx, fx, float(shape[dim]), "count")], base=_base(fx, "cosine_similarity"))


def _sign(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``sign(x)`` as ``[x > 0] - [-x > 0]``, each an exact 0/1 indicator."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    up = _indicator(ctx, fx, xv, shape, "positive")
    down = _indicator(ctx, fx, _negated_value(ctx, fx, xv, shape, "neg"), shape, "negative")
    return ctx.emit(fx, "sub", [up, down], base=_base(fx, "sign"))


def _abs_value(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, what: str) -> str:
    """``|x|`` as ``x - min(x, 0) * 2``: exact (doubling is, and ``x - 2x`` is ``-x``)."""
    negative = _typed(ctx, fx, "minimum", [xv, _scalar(ctx, fx, 0.0, f"{what}.zero")], shape, f"{what}.negative_part")
    twice = _typed(ctx, fx, "mul", [negative, _scalar(ctx, fx, 2.0, f"{what}.two")], shape, f"{what}.twice")
    return _typed(ctx, fx, "sub", [xv, twice], shape, what)


def _absolute(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return _abs_value(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), "abs")


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


def _op_name(target) -> str:
    return getattr(target, "__name__", None) if target is operator.getitem else str(target)


def capture(model: CsqcModel, batch: int | None = None) -> Graph:
    """Translate ``model`` into a verified IR graph with static shapes (batch from the file)."""
    specs = model.input_specs
    shapes = [list(s["shape"]) for s in specs]
    if batch is not None:
        if batch < 1:
            raise BadInput(f"batch must be at least 1, got {batch}")
        for s in shapes:
            if s:
                s[0] = batch
    try:
        examples = tuple(torch.zeros(s, dtype=getattr(torch, spec["dtype"])) for s, spec in zip(shapes, specs))
    except (RuntimeError, TypeError, ValueError) as e:  # sizes torch cannot allocate, or not even represent
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"cannot make example inputs of shapes {shapes} ({reason}); use a smaller batch") from None
    try:
        program = torch.export.export(model.module, examples)
    except Exception as e:
        raise CsqcError(f"could not re-capture the model at input shapes {shapes}: {str(e).splitlines()[0]}") from e
    ctx = _Ctx(program)
    sig = program.graph_signature
    const_map = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tables = {**program.state_dict, **program.constants}
    _check_finite(tables)
    inputs: list[Value] = []
    for fx in program.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in const_map:
                ctx.consts[fx.name] = tables[const_map[fx.name]]
            else:
                name = ctx.name(f"input{len(inputs)}")
                inputs.append(Value(name, _type_of(fx)))
                ctx.env[fx.name] = name
                if _type_of(fx).dtype != "float32":
                    ctx.integer_inputs.add(name)
                    ctx.id_shapes[name] = _type_of(fx).shape
    rewrite_idioms(program.graph, ctx.consts)  # other code bases' quantizers -> csqc::act_quant
    ctx.constant_derived = _constant_derived(program.graph, ctx.consts)
    unsupported: list[tuple[str, str]] = []
    outputs: list[str] = []
    for fx in program.graph.nodes:
        if fx.op == "call_function":
            handler = HANDLERS.get(fx.target)
            where = _module_path(fx) or fx.name
            if handler is None:
                unsupported.append((_op_name(fx.target), where))
                continue
            if any(isinstance(a, torch.fx.Node) and a.op == "call_function" and a.name not in ctx.env
                   and a.name not in ctx.consts for a in fx.all_input_nodes):
                continue  # depends on an unsupported op: reported there
            try:
                if _foldable(ctx, fx):  # every input is a constant: evaluate it now
                    _fold(ctx, fx)
                    continue
                ctx.env[fx.name] = handler(ctx, fx)
            except _Unsupported as e:
                unsupported.append((f"{_op_name(fx.target)} [{e}]", where))
        elif fx.op == "output":
            flat = fx.args[0] if isinstance(fx.args[0], (list, tuple)) else [fx.args[0]]
            outputs = [ctx.env.get(a.name, "") for a in flat]
    if unsupported:
        raise UnsupportedOps(unsupported)
    name = str(model.manifest.get("metadata", {}).get("recipe") or "model")
    nodes, outputs = _named_outputs(ctx, outputs, [str(o.get("name", "")) for o in model.manifest["outputs"]])
    g = Graph(tuple(inputs), nodes, outputs, ctx.params, name=name)
    derived = nonfinite_params(g)
    if derived:  # finite weights whose folding overflowed float32
        raise BadInput(f"parameter {derived[0]!r} of the captured model is NaN or infinite (float32 overflow "
                       "folding the model's weights); the weights are out of range")
    verify(g)
    return g


def _named_outputs(ctx: _Ctx, outputs: list[str], names: list[str]) -> tuple[tuple[Node, ...], tuple[str, ...]]:
    """Output nodes renamed after the model's named outputs (``logits``, ``last_hidden_state``),
    so the IR, the artifacts and the reports use them; positional names (``output0``) change nothing."""
    produced = {n.name for n in ctx.nodes}
    renames: dict[str, str] = {}
    for value, name in zip(outputs, names):
        positional = name.startswith("output") and name[6:].isdigit()
        if positional or not name or value not in produced or value in renames or name in ctx.taken:
            continue
        ctx.taken.add(name)
        renames[value] = name
    if not renames:
        return tuple(ctx.nodes), tuple(outputs)
    nodes = tuple(n.replace(name=renames.get(n.name, n.name), inputs=tuple(renames.get(i, i) for i in n.inputs))
                  for n in ctx.nodes)
    return nodes, tuple(renames.get(o, o) for o in outputs)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Every float weight, buffer and constant of the program must be finite (NaN != NaN would
    make every runtime comparison fail, and compilers fold NaN in their own ways)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInput(f"model tensor {name!r} contains NaN or infinity; the model file's weights are damaged")
