"""Reductions and normalizations: mean, sum, max, softmax, layer, group and instance norms,
variances and vector norms."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ir import TensorType
from .context import _arg, _aten, _base, _Ctx, module_path, _scalar, _shape_of, _type_of, _typed, _Unsupported
from .elementwise import _abs_value, _negated_value, _reciprocal_root


def _mean(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.mean(dims, keepdim)``; no dims (``x.mean()``, or an empty list): every axis."""
    if _arg(fx, 3 if fx.target == _aten.mean.dim else 1, "dtype", None) not in (None, torch.float32):
        raise _Unsupported("mean to another dtype")
    dims = _reduce_dims(fx, _arg(fx, 1, "dim", None) if fx.target == _aten.mean.dim else None)
    return ctx.emit(fx, "mean", [ctx.value(fx.args[0])],
                    attrs={"dims": dims, "keepdim": bool(_arg(fx, 2, "keepdim", False))})


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
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    out = kept if keep else tuple(n for d, n in enumerate(shape) if d not in dims)
    # to a single number: reduced keeping the axes, then reshaped (the count is a [1] parameter,
    # which a 0-d mean would broadcast to; as amin)
    keep_axes = keep or not out
    mean = _typed(ctx, fx, "mean", [ctx.value(fx.args[0])], kept if keep_axes else out, "mean",
                  {"dims": dims, "keepdim": keep_axes})
    count = _scalar(ctx, fx, float(np.prod([shape[d] for d in dims], dtype=np.int64)), "count")
    if out:
        return ctx.emit(fx, "mul", [mean, count], base=_base(fx, "sum"))
    total = _typed(ctx, fx, "mul", [mean, count], kept, "sum.kept")
    return ctx.emit(fx, "reshape", [total], TensorType(()), base=_base(fx, "sum"))


def _softmax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    nd = len(_type_of(fx).shape)
    return ctx.emit(fx, "softmax", [ctx.value(fx.args[0])], attrs={"axis": int(fx.args[1]) % nd})


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
    base = module_path(fx) or fx.name
    weight = (ctx.param(f"{base}.weight", ctx.tensor(w).detach().float().numpy()) if w is not None
              else ctx.param(f"{base}.weight", np.ones(normalized, np.float32)))
    bias = (ctx.param(f"{base}.bias", ctx.tensor(b).detach().float().numpy()) if b is not None
            else ctx.param(f"{base}.bias", np.zeros(normalized, np.float32)))
    return ctx.emit(fx, "layer_norm", [ctx.value(x), weight, bias], t, {"axis": axis, "eps": eps}, base=base)


def _rms_norm(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``rms_norm(x, normalized_shape, weight, eps)`` (``nn.RMSNorm``) in torch's order:
    ``x * rsqrt(mean(x * x) + eps)`` over the normalized axes, then times the weight; ``eps``
    None is float32's machine epsilon, as torch takes it. The rsqrt as 1 / sqrt
    (:func:`_reciprocal_sqrt`); the mean sums in another order than torch's: float tolerance
    against torch; the runtimes of the IR agree as their mean does."""
    x, normalized = fx.args[:2]
    w, eps = _arg(fx, 2, "weight"), _arg(fx, 3, "eps")
    eps = float(np.finfo(np.float32).eps) if eps is None else float(eps)
    shape, xv = _shape_of(x), ctx.value(x)
    if _type_of(x).dtype != "float32":
        raise _Unsupported(f"rms_norm of {_type_of(x).dtype} values")
    dims = tuple(range(len(shape) - len(normalized), len(shape)))
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    squares = _typed(ctx, fx, "mul", [xv, xv], shape, "squares")
    mean = _typed(ctx, fx, "mean", [squares], kept, "mean_square", {"dims": dims, "keepdim": True})
    shifted = _typed(ctx, fx, "add", [mean, _scalar(ctx, fx, eps, "eps")], kept, "plus_eps")
    scale = _reciprocal_root(ctx, fx, shifted, kept, "rsqrt")
    if w is None:
        return ctx.emit(fx, "mul", [xv, scale], base=module_path(fx) or fx.name)
    normed = _typed(ctx, fx, "mul", [xv, scale], shape, "normalized")
    weight = ctx.param(f"{module_path(fx) or fx.name}.weight", ctx.tensor(w).detach().float().numpy())
    return ctx.emit(fx, "mul", [normed, weight], base=module_path(fx) or fx.name)


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
    base = module_path(fx) or fx.name
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


def _reduce_dims(fx: torch.fx.Node, dims) -> tuple[int, ...]:
    nd = len(_shape_of(fx.args[0]))
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return tuple(range(nd))
    return tuple(sorted({int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])}))


def _amax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``amax(x, dims, keepdim)``, and ``max(x, dim, keepdim)``'s values (its indices unused)."""
    if fx.target == _aten.max.dim and any(u.args[1] != 0 and u.users for u in fx.users):
        raise _Unsupported("max(dim) indices are used (argmax)")
    dims, keep, _, out = _extreme_shapes(fx)
    return ctx.emit(fx, "amax", [ctx.value(fx.args[0])], TensorType(out), {"dims": dims, "keepdim": keep})


def _extreme_shapes(fx: torch.fx.Node) -> tuple[tuple[int, ...], bool, tuple[int, ...], tuple[int, ...]]:
    """An ``amax`` / ``amin`` / ``max(dim)`` / ``min(dim)``'s dims, keepdim, input and output shapes."""
    dims = _reduce_dims(fx, _arg(fx, 1, "dim", None))
    keep = bool(_arg(fx, 2, "keepdim", False))
    shape = _shape_of(fx.args[0])
    out = tuple(1 if d in dims else n for d, n in enumerate(shape)) if keep else tuple(
        n for d, n in enumerate(shape) if d not in dims)
    return dims, keep, shape, out


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


_CORRECTION_FORMS = frozenset({_aten.var.correction, _aten.std.correction, _aten.var_mean.correction,
                               _aten.std_mean.correction})
_STANDARD_DEVIATIONS = frozenset({_aten.std.dim, _aten.std.correction, _aten.std_mean.dim, _aten.std_mean.correction})
_WITH_MEAN = frozenset({_aten.var_mean.dim, _aten.var_mean.correction, _aten.std_mean.dim, _aten.std_mean.correction})


def _variance(ctx: _Ctx, fx: torch.fx.Node) -> str | tuple[str, str]:
    """``var`` / ``std`` over dims with a correction (``unbiased``: 1) in two passes:
    ``d = x - mean(x)``, ``mean(d * d) * (N / (N - correction))`` (``mean(d * d)`` where the
    correction is 0), then ``sqrt`` for std. torch accumulates otherwise (Welford's update):
    float tolerance against it, the same bits on every runtime. ``var_mean`` / ``std_mean``: the
    value and that mean."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    if fx.target in _CORRECTION_FORMS:
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
    what = "std" if fx.target in _STANDARD_DEVIATIONS else "var"
    mean = _typed(ctx, fx, "mean", [xv], kept, "mean", {"dims": dims, "keepdim": True})
    centered = _typed(ctx, fx, "sub", [xv, mean], shape, "centered")
    squares = _typed(ctx, fx, "mul", [centered, centered], shape, "squares")
    value = _typed(ctx, fx, "mean", [squares], out, "mean_square", {"dims": dims, "keepdim": keep})
    if correction:
        value = _typed(ctx, fx, "mul", [value, _scalar(ctx, fx, count / (count - correction), "correction")], out,
                       "var")
    if what == "std":
        value = _typed(ctx, fx, "sqrt", [value], out, "std")
    if fx.target in _WITH_MEAN:
        return value, mean if keep else _typed(ctx, fx, "reshape", [mean], out, "mean.squeezed")
    return value


def _amin(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``amin(x, dims, keepdim)``, and ``min(x, dim, keepdim)``'s values (its indices unused), as
    ``-amax(-x)`` (exact)."""
    if fx.target == _aten.min.dim and any(u.args[1] != 0 and u.users for u in fx.users):
        raise _Unsupported("min(dim) indices are used (argmin)")
    dims, keep, shape, out = _extreme_shapes(fx)
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    # negated by -1 (a zero keeps its sign, as torch's minimum does); reduced keeping the axes,
    # then reshaped: the IR's scalar constants are [1], and a 0-d minimum would broadcast to it
    minus_one = _scalar(ctx, fx, -1.0, "minus_one")
    negated = _typed(ctx, fx, "mul", [ctx.value(fx.args[0]), minus_one], shape, "negated")
    top = _typed(ctx, fx, "amax", [negated], kept, "amax", {"dims": dims, "keepdim": True})
    if out == kept:
        return ctx.emit(fx, "mul", [top, minus_one], TensorType(out), base=_base(fx, "amin"))
    least = _typed(ctx, fx, "mul", [top, minus_one], kept, "amin.kept")
    return ctx.emit(fx, "reshape", [least], TensorType(out), base=_base(fx, "amin"))


def _logsumexp(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``logsumexp(x, dims, keepdim)`` in torch's order: ``log(sum(exp(x - max))) + max``, the sum
    as mean times count (one rounding more: float tolerance)."""
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    dims = _reduce_dims(fx, _arg(fx, 1, "dim", None))
    keep = bool(_arg(fx, 2, "keepdim", False))
    kept = tuple(1 if d in dims else n for d, n in enumerate(shape))
    out = kept if keep else tuple(n for d, n in enumerate(shape) if d not in dims)
    top = _typed(ctx, fx, "amax", [xv], kept, "max", {"dims": dims, "keepdim": True})
    grown = _typed(ctx, fx, "exp", [_typed(ctx, fx, "sub", [xv, top], shape, "shifted")], shape, "exp")
    # at the kept shape, reshaped last (the count is a [1] constant: a 0-d sum would broadcast to it)
    mean = _typed(ctx, fx, "mean", [grown], kept, "mean", {"dims": dims, "keepdim": True})
    count = float(np.prod([shape[d] for d in dims], dtype=np.int64))
    total = _typed(ctx, fx, "mul", [mean, _scalar(ctx, fx, count, "count")], kept, "sum")
    logged = _typed(ctx, fx, "log", [total], kept, "log")
    if out == kept:
        return ctx.emit(fx, "add", [logged, top], base=_base(fx, "logsumexp"))
    return ctx.emit(fx, "reshape", [_typed(ctx, fx, "add", [logged, top], kept, "logsumexp.kept")],
                    base=_base(fx, "logsumexp"))


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
    return ctx.emit(fx, "mul", [mean, _scalar(ctx, fx, float(shape[dim]), "count")],
                    base=_base(fx, "cosine_similarity"))
