"""Element-wise handlers: binary arithmetic, clipping and the float activations (as IR ops, or
composed from them where the IR has no op of their own)."""

from __future__ import annotations

import numpy as np
import torch

from ..idioms import idiom_attrs
from .context import (
    _arg, _aten, _base, _Ctx, _is_condition, module_path, _scalar, _shape_of, _type_of, _typed, _Unsupported)
from .integers import compared_ids, ids_condition, is_integer_typed
from .tensors import _same_dtype, _slice_value


def _clip(ctx: _Ctx, fx: torch.fx.Node, lo, hi) -> str:
    lo = -np.inf if lo is None else float(lo)
    hi = np.inf if hi is None else float(hi)
    xv = ctx.value(fx.args[0])
    # min(max(x, lo), hi) >= 0 needs hi >= 0 as well as lo >= 0 or x >= 0
    return ctx.emit(fx, "clip", [xv], attrs={"lo": lo, "hi": hi, **idiom_attrs(fx)})  # idiom: a quantizer left float


def _binary(op: str):
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        a, b = fx.args[:2]
        if fx.kwargs.get("alpha", 1) != 1:
            raise _Unsupported("add with alpha != 1")
        if _is_condition(fx) and op != "mul":  # torch's bool arithmetic: c + d is c or d
            if op != "add":
                raise _Unsupported(f"{op} of boolean values")
            return _either(ctx, fx, a, b)
        vals = []
        for i, v in enumerate((a, b)):
            if isinstance(v, (int, float)):
                vals.append(ctx.param(f"{fx.name}.scalar{i}", np.array(v, dtype=np.float32)))
                if v >= 0:
                    ctx.nonneg.add(vals[-1])
            else:
                vals.append(ctx.value(v))
        return ctx.emit(fx, op, vals, base=f"{module_path(fx) or fx.name}.{op}")

    return handler


def _either(ctx: _Ctx, fx: torch.fx.Node, a, b) -> str:
    """``c + d`` of conditions (or a Python bool): ``c or d``, as ``c + d - c * d`` (exact on 0 and 1)."""
    c, d = (_scalar(ctx, fx, float(bool(v)), f"or.{i}") if isinstance(v, (bool, int, float)) else ctx.value(v)
            for i, v in enumerate((a, b)))
    shape = _type_of(fx).shape
    total = _typed(ctx, fx, "add", [c, d], shape, "or.sum")
    return ctx.emit(fx, "sub", [total, _typed(ctx, fx, "mul", [c, d], shape, "or.both")], base=_base(fx, "or"))


def _relu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.emit(fx, "relu", [ctx.value(fx.args[0])], base=f"{module_path(fx) or fx.name}")


def _gelu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    approximate = str(_arg(fx, 1, "approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise _Unsupported(f"gelu approximate={approximate!r}")
    return ctx.emit(fx, "gelu", [ctx.value(fx.args[0])], attrs={"approximate": approximate},
                    base=f"{module_path(fx) or fx.name}")


def _float_unary(op: str):
    def handler(ctx: _Ctx, fx: torch.fx.Node) -> str:
        xv = ctx.value(fx.args[0])
        return ctx.emit(fx, op, [xv], base=_base(fx, op))

    return handler


def _reciprocal_sqrt(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``rsqrt(x)`` as ``1 / sqrt(x)``, two correctly rounded steps, as torch's CPU kernel computes
    it (RMSNorm: Llama, Mistral, Qwen)."""
    return _reciprocal_root(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), "rsqrt", final=True)


def _reciprocal_root(ctx: _Ctx, fx: torch.fx.Node, v: str, shape, what: str, final: bool = False) -> str:
    root = _typed(ctx, fx, "sqrt", [v], shape, f"{what}.sqrt" if not final else "sqrt")
    if final:
        return ctx.emit(fx, "div", [_scalar(ctx, fx, 1.0, "one"), root], base=_base(fx, what))
    return _typed(ctx, fx, "div", [_scalar(ctx, fx, 1.0, f"{what}.one"), root], shape, what)


_LN2 = 0.693147180559945309417232121458176568


def _power_of_two(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``exp2(x)`` as ``exp(x * ln 2)``: the product's rounding (2^-24 relative) is amplified by
    |x ln 2|, so up to ~20 ulps from torch's exp2 at |x| = 100 (float tolerance; the runtimes
    of the IR within an ulp or two of each other, as their exp is)."""
    shape = _shape_of(fx.args[0])
    scaled = _typed(ctx, fx, "mul", [ctx.value(fx.args[0]), _scalar(ctx, fx, _LN2, "ln2")], shape, "scaled")
    return ctx.emit(fx, "exp", [scaled], base=_base(fx, "exp2"))


def _exp_less_one(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``expm1(x)`` as ``exp(x) - 1``, as csqc's ELU computes it: within an ulp of 1 of torch's
    for small |x| (absolute, not relative, precision: ``expm1(1e-8)`` is 0, so a model dividing
    it by x loses that ratio there)."""
    shape = _shape_of(fx.args[0])
    grown = _typed(ctx, fx, "exp", [ctx.value(fx.args[0])], shape, "exp")
    return ctx.emit(fx, "sub", [grown, _scalar(ctx, fx, 1.0, "one")], base=_base(fx, "expm1"))


def _log_one_plus(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``log1p(u)`` of a computed value as :func:`_log1p_of_positive` computes it: for ``u`` above
    -1 (the correction holds there too; tiny values keep their relative precision). At -1 and
    below torch's result is not finite, which every runtime refuses."""
    shape = _shape_of(fx.args[0])
    return _log1p_of_positive(ctx, fx, ctx.value(fx.args[0]), shape, "log1p", final=True)


def _rsub(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # rsub(x, other, alpha=1) = other - alpha * x
    x, other = fx.args[:2]
    if _arg(fx, 2, "alpha", 1) != 1:
        raise _Unsupported("rsub with alpha != 1")
    a = (ctx.param(f"{fx.name}.scalar", np.array(other, dtype=np.float32)) if isinstance(other, (int, float))
         else ctx.value(other))
    return ctx.emit(fx, "sub", [a, ctx.value(x)], base=_base(fx, "sub"))


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


def _leaky_relu(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``leaky_relu(x, slope)`` and ``prelu(x, weight)`` (``x > 0 ? x : slope * x``) as
    ``relu(x) + min(x, 0) * slope``: each term is exactly torch's value or zero, so the sum is too."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    base = module_path(fx) or fx.name
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


def _negated(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.emit(fx, "mul", [ctx.value(fx.args[0]), _scalar(ctx, fx, -1.0, "minus_one")], base=_base(fx, "neg"))


def _squared(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    return ctx.emit(fx, "mul", [xv, xv], base=_base(fx, "square"))


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


def _log1p_of_positive(ctx: _Ctx, fx: torch.fx.Node, u: str, shape, what: str, final: bool = False) -> str:
    """``log1p(u)`` for ``u >= 0`` as ``log(w) + (u - (w - 1)) / w``, ``w = 1 + u``: the
    correction restores what rounding ``1 + u`` lost (for ``u`` below an ulp of 1, all of it:
    ``log1p(u) = u``), so small values keep their relative precision as torch's log1p does.
    ``final``: ``fx``'s own node, for any ``u`` (:func:`_log_one_plus`)."""
    one = _scalar(ctx, fx, 1.0, f"{what}.one")
    w = _typed(ctx, fx, "add", [u, one], shape, f"{what}.w")
    lost = _typed(ctx, fx, "sub", [u, _typed(ctx, fx, "sub", [w, one], shape, f"{what}.w_less_one")], shape,
                  f"{what}.lost")
    parts = [_typed(ctx, fx, "log", [w], shape, f"{what}.log"),
             _typed(ctx, fx, "div", [lost, w], shape, f"{what}.correction")]
    if final:
        return ctx.emit(fx, "add", parts, base=_base(fx, what))
    return _typed(ctx, fx, "add", parts, shape, what)


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
    negated = []
    for arg, what in ((fx.args[0], "neg_a"), (fx.args[1], "neg_b")):
        if ctx.is_const(arg):  # (x.max(t) of a constant t: negated here)
            negated.append(ctx.param(_base(fx, what), -ctx.tensor(arg).detach().cpu().numpy().astype(np.float32)))
        else:
            negated.append(_negated_value(ctx, fx, ctx.value(arg), _shape_of(arg), what))
    low = _typed(ctx, fx, "minimum", negated, _type_of(fx).shape, "minimum")
    return ctx.emit(fx, "sub", [_scalar(ctx, fx, 0.0, "zero"), low], base=_base(fx, "maximum"))


def _rrelu_eval(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``rrelu`` in eval mode: a leaky ReLU of slope ``(lower + upper) / 2``."""
    if bool(_arg(fx, 3, "training", False)):
        raise _Unsupported("rrelu in training mode (random slopes)")
    lower, upper = float(_arg(fx, 1, "lower", 1.0 / 8)), float(_arg(fx, 2, "upper", 1.0 / 3))
    slope = _scalar(ctx, fx, float(np.float32((lower + upper) / 2)), "slope")
    return _leaky(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), slope, "rrelu")


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


def _masked_fill(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.masked_fill(mask, v)`` with a constant mask (a causal attention mask) as
    ``x * keep + fill``: ``keep`` 1 and ``fill`` 0 where the mask is false, ``keep`` 0 and ``fill``
    v where it is true, which is v exactly for finite x (``x * 0`` is a signed zero) and x itself
    elsewhere (a -0.0 becomes +0.0: only a division by it could tell). An infinite v becomes the
    largest finite float32 of its sign, as attention masks do (``attention._MASKED``): a softmax
    over it gives the same, unless a whole row is masked. A mask the model computes (a comparison:
    0.0 / 1.0 in the IR) is a ``select`` op: v where it is set, x itself elsewhere (any x)."""
    x, mask, value = fx.args[:3]
    if isinstance(value, torch.fx.Node):  # masked_fill.Tensor: a one-element tensor
        if not ctx.is_const(value) or ctx.tensor(value).numel() != 1:
            raise _Unsupported("masked_fill with a fill value computed from the model's input")
        value = ctx.tensor(value).item()
    if _type_of(x).dtype != "float32":
        raise _Unsupported(f"masked_fill of {_type_of(x).dtype} values")
    shape = _shape_of(x)
    if not ctx.is_const(mask):  # a condition the model computes (0.0 / 1.0): a select
        fill = _scalar(ctx, fx, _finite_fill(float(value), "masked_fill"), "masked_fill.value")
        return ctx.emit(fx, "select", [ctx.value(mask), fill, ctx.value(x)], base=_base(fx, "masked_fill"))
    where = ctx.tensor(mask).detach().cpu().numpy().astype(bool)
    if tuple(np.broadcast_shapes(shape, where.shape)) != tuple(shape):
        raise _Unsupported(f"masked_fill with a mask of shape {list(where.shape)} for values of shape {list(shape)}")
    value = _finite_fill(float(value), "masked_fill")
    return _filled_where(ctx, fx, ctx.value(x), shape, where, value, "masked_fill")


def _finite_fill(value, what: str):
    """A fill value (a scalar or an array) with each infinity the largest finite float32 of its
    sign, as attention's masks (``attention._MASKED``): parameters are finite, and a softmax over
    it gives the same unless a whole row is filled. NaN is refused."""
    if np.isnan(value).any():
        raise _Unsupported(f"{what} with NaN")
    finite = np.where(np.isinf(value), np.copysign(np.finfo(np.float32).max, value), value)
    return float(finite) if np.ndim(finite) == 0 else finite


def _selected(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``torch.where(cond, a, b)``. A constant condition (GPT-2's causal mask) as ``a * [cond] + b *
    [not cond]``: each branch multiplied by exactly 0 or 1 (a parameter; a constant branch already
    0 off its side), exact for finite values, as :func:`_masked_fill` (a constant infinity becomes
    the largest finite float32 of its sign). A condition the model computes (a comparison, 0.0 /
    1.0 in the IR) is a ``select`` op: the branch not taken is never read, so the guard idioms
    (``where(x > 0, log(x), 0)``) hold for any value there."""
    cond, a, b = fx.args[:3]
    if _type_of(fx).dtype != "float32":
        raise _Unsupported(f"where of {_type_of(fx).dtype} values")
    branches = []
    for side, branch in (("true", a), ("false", b)):
        computed = isinstance(branch, torch.fx.Node) and not ctx.is_const(branch)
        if computed and _type_of(branch).dtype != "float32":
            raise _Unsupported(f"where of {_type_of(branch).dtype} values")
        constant = None if computed else np.asarray(_finite_fill(
            ctx.tensor(branch).detach().cpu().double().numpy() if isinstance(branch, torch.fx.Node) else
            np.float64(branch), "where"), np.float32)
        branches.append((side, branch, constant))
    if not ctx.is_const(cond):
        if not _is_condition(cond):
            raise _Unsupported("where with a condition that is not boolean")
        values = [ctx.value(branch) if constant is None else _constant_param(ctx, fx, constant, f"where.{side}")
                  for side, branch, constant in branches]
        return ctx.emit(fx, "select", [ctx.value(cond)] + values, base=_base(fx, "where"))
    mask = ctx.tensor(cond).detach().cpu().numpy().astype(bool)
    parts = []
    for (side, branch, constant), picked in zip(branches, (mask, ~mask)):
        if constant is not None:  # the part itself: the constant where picked, 0 elsewhere
            parts.append(_constant_param(ctx, fx, np.where(picked, constant, np.float32(0)), f"where.{side}_fill"))
            continue
        keep = ctx.param(_base(fx, f"where.{side}_keep"), picked.astype(np.float32))
        parts.append(_typed(ctx, fx, "mul", [ctx.value(branch), keep],
                            np.broadcast_shapes(_shape_of(branch), picked.shape), f"where.{side}_kept"))
    return ctx.emit(fx, "add", parts, base=_base(fx, "where"))


def _constant_param(ctx: _Ctx, fx: torch.fx.Node, array: np.ndarray, what: str) -> str:
    name = ctx.param(_base(fx, what), np.asarray(array, np.float32))
    if (ctx.params[name] >= 0).all():
        ctx.nonneg.add(name)
    return name


# -- comparisons and logic of values the model computes: float32 0.0 / 1.0 in the IR ------------
_COMPARISONS = {
    _aten.gt.Tensor: "gt", _aten.gt.Scalar: "gt", _aten.lt.Tensor: "lt", _aten.lt.Scalar: "lt",
    _aten.ge.Tensor: "ge", _aten.ge.Scalar: "ge", _aten.le.Tensor: "le", _aten.le.Scalar: "le",
    _aten.eq.Tensor: "eq", _aten.eq.Scalar: "eq", _aten.ne.Tensor: "ne", _aten.ne.Scalar: "ne",
}


def _compared_operand(ctx: _Ctx, fx: torch.fx.Node, v, what: str, integers: bool = False) -> tuple[str, tuple]:
    """A comparison's operand as a float32 IR value and its shape: a constant rounded to float32,
    as torch compares a float32 tensor with a Python number or an integer tensor. Against
    ``integers`` a 0-d float64 tensor is compared in float64 too (torch's promotion)."""
    if isinstance(v, torch.fx.Node) and not ctx.is_const(v):
        if _type_of(v).dtype != "float32" and ctx.value(v) not in ctx.int_ranges:
            raise _Unsupported(f"a comparison of {_type_of(v).dtype} values (token ids: csqc's integer inputs "
                               "feed embeddings and comparisons with a number)")
        return ctx.value(v), _shape_of(v)
    constant = ctx.tensor(v).detach().cpu().numpy() if isinstance(v, torch.fx.Node) else np.asarray(v)
    as_f32 = constant.astype(np.float32)
    if constant.dtype == np.float64 and (constant.ndim or integers) and not (as_f32.astype(np.float64) == constant).all():
        raise _Unsupported("a comparison with a float64 constant not exact in float32 (torch compares in float64)")
    if not np.isfinite(as_f32).all():
        raise _Unsupported("a comparison with a constant that is NaN or infinite in float32")
    name = ctx.param(_base(fx, what), as_f32)
    return name, as_f32.shape


def _compared(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``a > b`` (and ``<``, ``>=``, ``<=``, ``==``, ``!=``) of values the model computes, as 0.0
    / 1.0: ``[a > b]`` is :func:`_indicator` of ``a - b`` (for finite floats ``a - b > 0``
    exactly when ``a > b``, subnormals included; an overflow to inf still counts), the others
    composed of it (``a >= b`` is ``1 - [b > a]``, ``a != b`` is ``[a > b] + [b > a]``): exactly
    torch's result, NaN aside. Token ids against a number: ``capture.integers.compared_ids``."""
    kind = _COMPARISONS[fx.target]
    looked_up = compared_ids(ctx, fx, kind)
    if looked_up is not None:
        return looked_up
    integers = any(isinstance(v, torch.fx.Node) and is_integer_typed(v) for v in fx.args[:2])
    (av, a_shape), (bv, b_shape) = (_compared_operand(ctx, fx, v, f"{kind}.{side}", integers)
                                    for v, side in ((fx.args[0], "a"), (fx.args[1], "b")))
    shape = tuple(np.broadcast_shapes(a_shape, b_shape))

    def above(x, y, what):
        return _above(ctx, fx, x, y, shape, what)

    def complement(v, what):  # 1 - v
        return _typed(ctx, fx, "sub", [_scalar(ctx, fx, 1.0, f"{what}.one"), v], shape, what)

    if kind == "gt":
        return above(av, bv, "gt")
    if kind == "lt":
        return above(bv, av, "lt")
    if kind in ("ge", "le"):
        return complement(above(bv, av, f"{kind}.below") if kind == "ge" else above(av, bv, f"{kind}.above"), kind)
    differ = _typed(ctx, fx, "add", [above(av, bv, f"{kind}.above"), above(bv, av, f"{kind}.below")], shape,
                    "ne" if kind == "ne" else "eq.differ")
    return differ if kind == "ne" else complement(differ, "eq")


def _dtype_conversion(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.to(dtype)`` / ``x.type_as(y)`` of a runtime value: float32 to float32 (or a condition to
    float) is the value itself; float to bool is ``[x != 0]`` (an exact indicator, as ``!=``)."""
    src = fx.args[0]
    if _is_condition(fx) and ctx.value(src) in ctx.integer_inputs:  # a mask input as bool: ids != 0, looked up
        return ids_condition(ctx, fx, src, lambda every_id: every_id != 0, "nonzero")
    if _is_condition(fx) and not _is_condition(src) and (_type_of(src).dtype == "float32"
                                                         or ctx.value(src) in ctx.int_ranges):
        shape, xv = _shape_of(src), ctx.value(src)
        zero = _scalar(ctx, fx, 0.0, "nonzero.zero")
        sides = [_above(ctx, fx, xv, zero, shape, "nonzero.above"), _above(ctx, fx, zero, xv, shape, "nonzero.below")]
        return ctx.emit(fx, "add", sides, base=_base(fx, "nonzero"))
    return _same_dtype(ctx, fx)


def _above(ctx: _Ctx, fx: torch.fx.Node, x: str, y: str, shape, what: str) -> str:
    """``[x > y]``: :func:`_indicator` of ``x - y``."""
    return _indicator(ctx, fx, _typed(ctx, fx, "sub", [x, y], shape, f"{what}.difference"), shape, what)


_LOGIC = {
    _aten.logical_not.default: "not", _aten.bitwise_not.default: "not",
    _aten.logical_and.default: "and", _aten.__and__.Tensor: "and", _aten.bitwise_and.Tensor: "and",
    _aten.logical_or.default: "or", _aten.__or__.Tensor: "or", _aten.bitwise_or.Tensor: "or",
    _aten.logical_xor.default: "xor", _aten.__xor__.Tensor: "xor", _aten.bitwise_xor.Tensor: "xor",
}


def _logic(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``~c``, ``c & d``, ``c | d``, ``c ^ d`` of conditions (0.0 / 1.0): ``1 - c``, ``c * d``,
    ``c + d - c * d``, ``c + d - 2 c d``, each exact on 0 and 1. Of other values they are refused
    (bitwise integer logic; truthiness of floats)."""
    kind = _LOGIC[fx.target]
    args = fx.args[:1] if kind == "not" else fx.args[:2]
    if not all(_is_condition(a) for a in args):
        raise _Unsupported(f"logical {kind} of values that are not boolean")
    values = [ctx.value(a, base=_base(fx, f"{kind}.mask")) for a in args]
    shape = tuple(np.broadcast_shapes(*(_shape_of(a) for a in args)))
    one = _scalar(ctx, fx, 1.0, f"{kind}.one")
    if kind == "not":
        return ctx.emit(fx, "sub", [one, values[0]], base=_base(fx, "not"))
    both = _typed(ctx, fx, "mul", values, shape, f"{kind}.both")
    if kind == "and":
        return both
    either = _typed(ctx, fx, "add", values, shape, f"{kind}.sum")
    if kind == "xor":
        both = _typed(ctx, fx, "add", [both, both], shape, f"{kind}.twice_both")
    return ctx.emit(fx, "sub", [either, both], base=_base(fx, kind))


def _filled_where(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, where: np.ndarray, value: float, what: str) -> str:
    """``x`` with ``value`` where the constant ``where`` is true, as ``x * keep + fill`` (see :func:`_masked_fill`)."""
    keep = ctx.param(_base(fx, f"{what}.keep"), np.where(where, 0.0, 1.0).astype(np.float32))
    fill = ctx.param(_base(fx, f"{what}.fill"), np.where(where, np.float32(value), 0.0).astype(np.float32))
    kept = _typed(ctx, fx, "mul", [xv, keep], shape, f"{what}.kept")
    return ctx.emit(fx, "add", [kept, fill], base=_base(fx, what))


def _triangle(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``triu(x, k)`` / ``tril(x, k)`` of the model's values: zero outside the triangle of the last
    two axes, a constant mask applied as :func:`_masked_fill` applies one (exact for finite x, up to
    the sign of a zero: a kept -0 becomes +0, as there)."""
    x = fx.args[0]
    if _type_of(x).dtype != "float32":
        raise _Unsupported(f"{fx.target.__name__.split('.')[0]} of {_type_of(x).dtype} values")
    shape, k = _shape_of(x), int(_arg(fx, 1, "diagonal", 0))
    rows, cols = shape[-2:]
    inside = np.triu(np.ones((rows, cols), bool), k) if fx.target == _aten.triu.default else \
        np.tril(np.ones((rows, cols), bool), k)
    return _filled_where(ctx, fx, ctx.value(x), shape, ~inside, 0.0, fx.target.__name__.split(".")[0])


def _difference(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``diff(x, n, dim)``: ``x[1:] - x[:-1]`` along ``dim``, ``n`` times (torch's own order)."""
    if _arg(fx, 3, "prepend", None) is not None or _arg(fx, 4, "append", None) is not None:
        raise _Unsupported("diff with prepend or append (concatenate them first)")
    shape = _shape_of(fx.args[0])
    times, axis = int(_arg(fx, 1, "n", 1)), int(_arg(fx, 2, "dim", -1)) % len(shape)
    if not 1 <= times < shape[axis]:
        raise _Unsupported(f"diff {times} times along an axis of {shape[axis]}")
    xv = ctx.value(fx.args[0])
    for step in range(times):
        size = shape[axis]
        later, earlier = (_slice_value(ctx, fx, xv, shape, axis, start, start + size - 1) for start in (1, 0))
        shape = shape[:axis] + (size - 1,) + shape[axis + 1:]
        xv = ctx.emit(fx, "sub", [later, earlier], base=_base(fx, "diff")) if step == times - 1 else \
            _typed(ctx, fx, "sub", [later, earlier], shape, f"diff{step}")
    return xv


def _outer(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``outer(a, b)``: ``a[:, None] * b[None, :]``."""
    a, b = fx.args[:2]
    (m,), (n,) = _shape_of(a), _shape_of(b)
    column = _typed(ctx, fx, "reshape", [ctx.value(a)], (m, 1), "outer.column")
    row = _typed(ctx, fx, "reshape", [ctx.value(b)], (1, n), "outer.row")
    return ctx.emit(fx, "mul", [column, row], base=_base(fx, "outer"))


def _interpolated(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``lerp(a, b, w)`` of a number ``w`` (``lerp.Scalar``), in torch's two forms: ``a + w * (b - a)`` for
    ``|w| < 0.5``, else ``b - (b - a) * (1 - w)``."""
    a, b, weight = fx.args[:3]
    shape, weight = _type_of(fx).shape, float(weight)
    av, bv = ctx.value(a), ctx.value(b)
    step = _typed(ctx, fx, "sub", [bv, av], np.broadcast_shapes(_shape_of(a), _shape_of(b)), "lerp.step")
    if abs(weight) < 0.5:
        part = _typed(ctx, fx, "mul", [_scalar(ctx, fx, weight, "lerp.weight"), step], shape, "lerp.part")
        return ctx.emit(fx, "add", [av, part], base=_base(fx, "lerp"))
    part = _typed(ctx, fx, "mul", [step, _scalar(ctx, fx, 1.0 - weight, "lerp.rest")], shape, "lerp.part")
    return ctx.emit(fx, "sub", [bv, part], base=_base(fx, "lerp"))


def _add_product(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``addcmul(x, a, b, value=v)`` / ``addcdiv``: ``x + (v * a) * b`` (``/ b``), torch's order."""
    x, a, b = fx.args[:3]
    value = _arg(fx, 3, "value", 1)
    op = "div" if fx.target == _aten.addcdiv.default else "mul"
    scaled = _typed(ctx, fx, "mul", [_scalar(ctx, fx, float(value), "value"), ctx.value(a)], _shape_of(a), "scaled")
    term = _typed(ctx, fx, op, [scaled, ctx.value(b)], np.broadcast_shapes(_shape_of(a), _shape_of(b)), "term")
    return ctx.emit(fx, "add", [ctx.value(x), term], base=_base(fx, fx.target.__name__.split(".")[0]))
