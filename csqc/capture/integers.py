"""Integers the model computes from its token ids (RoBERTa's position ids: ``ids != pad``, its
cumulative sum, an embedding at those positions), held exactly as float32 in the IR.

csqc's runtimes compute in float32, which holds every integer of magnitude up to 2^24 exactly.
Each integer value capture builds gets a bound on its magnitude (``_Ctx.int_bounds``), derived op
by op; an integer op whose result capture cannot bound, or bounds past 2^24, is refused, so no
integer is ever rounded. Token ids themselves stay integer IR inputs that only embeddings read:

- a comparison of ids with a constant is a lookup of its result for every id the model accepts
  (an ``embedding`` of a ``[V, 1]`` table: the runtime refuses ids past the smallest embedding
  table they index, ``V``);
- ``cumsum`` of integers is a float linear layer of a triangular 0/1 matrix (each output a sum of
  integers under 2^24: exact in any order);
- an embedding at computed positions is a one-hot row (``[p == k]``, exact on integers) times
  the table's rows the bound allows: exactly the row picked, as a product by 1 and zeros.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..ir import TensorType
from .context import _aten, _base, _Ctx, _is_condition, _scalar, _shape_of, _typed, _Unsupported

EXACT_INTEGERS = 2.0**24  # float32 holds every integer of smaller magnitude
MAX_CUMSUM_LENGTH = 4096  # its triangular matrix: 64 MiB of float32 at this length

# value-preserving ops: the result's integers are the input's (views, copies, conversions)
_SAME_VALUES = frozenset({
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.expand.default, _aten.slice.Tensor,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.clone.default, _aten.alias.default,
    _aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout, _aten.type_as.default, _aten.contiguous.default,
    _aten.cat.default, _aten.flatten.using_ints, _aten.select.int, _aten.repeat.default,
})
_SUM_OF_BOUNDS = frozenset({_aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor, _aten.sub.Scalar,
                            _aten.rsub.Scalar})
_PRODUCT_OF_BOUNDS = frozenset({_aten.mul.Tensor, _aten.mul.Scalar})
_IDS_VIEWS = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
                        _aten.unsqueeze.default, _aten.squeeze.dim, _aten.flatten.using_ints,
                        _aten.clone.default, _aten.alias.default, _aten.contiguous.default})


def is_integer_typed(fx: torch.fx.Node) -> bool:
    val = fx.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.is_floating_point() and not val.is_complex() \
        and val.dtype != torch.bool


def check_integer_result(ctx: _Ctx, fx: torch.fx.Node, out: str) -> None:
    """Record the bound of integer value ``out`` that ``fx`` computed, or refuse it: capture
    computes integers only where it can bound them under 2^24."""
    if out in ctx.integer_inputs or out in ctx.int_bounds:
        return  # a view of the ids, or bounded by the handler that built it
    bounds = [_bound_of(ctx, a) for a in fx.args if isinstance(a, (torch.fx.Node, int, bool))]
    if fx.target in _SAME_VALUES:
        bounds = bounds[:1] if fx.target not in (_aten.cat.default, _aten.type_as.default) else bounds
    if fx.target == _aten.cat.default:
        bounds = [_bound_of(ctx, a) for a in fx.args[0]]
    bound = None
    if bounds and all(b is not None for b in bounds):
        if fx.target in _SAME_VALUES:
            bound = max(bounds)
        elif fx.target in _SUM_OF_BOUNDS and len(bounds) == 2:
            bound = bounds[0] + bounds[1] * abs(float(fx.kwargs.get("alpha", 1)))
        elif fx.target in _PRODUCT_OF_BOUNDS and len(bounds) == 2:
            bound = bounds[0] * bounds[1]
        elif fx.target == _aten.neg.default:
            bound = bounds[0]
    if bound is None:
        if any(isinstance(a, torch.fx.Node) and ctx.env.get(a.name) in ctx.integer_inputs for a in fx.args):
            raise _Unsupported(f"{fx.meta['val'].dtype} arithmetic on the token ids themselves (csqc's integer "
                               "inputs feed embeddings and comparisons with a number)")
        raise _Unsupported(f"{fx.meta['val'].dtype} arithmetic on values the model computes (csqc computes in "
                           "float32: integers from token ids by comparisons, cumsum, +, - and * are supported)")
    if bound >= EXACT_INTEGERS:
        raise _Unsupported(f"integers the model computes may reach {bound:.0f}, past float32's exact 2^24")
    ctx.int_bounds[out] = bound


def _bound_of(ctx: _Ctx, a) -> float | None:
    """The magnitude bound of integer operand ``a``: a number, a constant, a condition (1), or
    a bounded value; None where capture knows none (a float, or token ids themselves)."""
    if isinstance(a, (bool, int)):
        return float(abs(int(a)))
    if not isinstance(a, torch.fx.Node):
        return None
    if ctx.is_const(a):
        t = ctx.tensor(a).detach().cpu()
        if t.is_floating_point() and not bool((t == t.round()).all()):
            return None
        return float(t.abs().max()) if t.numel() else 0.0
    if _is_condition(a):
        return 1.0
    value = ctx.env.get(a.name)
    return ctx.int_bounds.get(value) if value is not None else None


def ids_limit(ctx: _Ctx, ids_input: str) -> int:
    """The rows of the smallest table the integer input ``ids_input`` indexes (an embedding, an
    ``index_select`` of rows): the runtime refuses ids outside it, so they lie in ``[0, limit)``."""
    placeholder = next(name for name, v in ctx.env.items() if v == ids_input)
    limits = []
    for fx in ctx.program.graph.nodes:
        if fx.op != "call_function":
            continue
        if fx.target == _aten.embedding.default:
            ids = fx.args[1]
        elif fx.target == _aten.index_select.default and int(fx.args[1]) == 0:
            ids = fx.args[2]
        else:
            continue
        while isinstance(ids, torch.fx.Node) and ids.op == "call_function" and ids.target in _IDS_VIEWS:
            ids = ids.args[0]
        if isinstance(ids, torch.fx.Node) and ids.name == placeholder:
            limits.append(int(fx.args[0].meta["val"].shape[0]))
    if not limits:
        raise _Unsupported("a comparison of token ids that index no embedding (csqc bounds ids by the "
                           "embedding table they index)")
    return min(limits)


_COMPARE = {"gt": operator.gt, "lt": operator.lt, "ge": operator.ge, "le": operator.le, "eq": operator.eq,
            "ne": operator.ne}


def compared_ids(ctx: _Ctx, fx: torch.fx.Node, kind: str) -> str | None:
    """``ids <op> c`` (or ``c <op> ids``) of integer input ids and a scalar constant: the result
    for every id below the embedding limit, looked up (0.0 / 1.0). None where neither operand is
    token ids."""
    a, b = fx.args[:2]
    ids_side = [isinstance(v, torch.fx.Node) and not ctx.is_const(v) and ctx.value(v) in ctx.integer_inputs
                for v in (a, b)]
    if not any(ids_side):
        return None
    other = b if ids_side[0] else a
    if all(ids_side):
        raise _Unsupported("a comparison of two token id tensors")
    if isinstance(other, torch.fx.Node):
        if not ctx.is_const(other) or ctx.tensor(other).numel() != 1:
            raise _Unsupported("a comparison of token ids with a value other than one number")
        other = ctx.tensor(other).item()
    ids_value = ctx.value(a if ids_side[0] else b)
    limit = ids_limit(ctx, ids_value)
    every_id = np.arange(limit, dtype=np.int64)
    left, right = (every_id, other) if ids_side[0] else (other, every_id)
    table = np.asarray(_COMPARE[kind](left, right), np.float32).reshape(limit, 1)
    weight = ctx.param(_base(fx, f"{kind}.table"), table)
    ctx.nonneg.add(weight)
    id_shape = ctx.id_shapes[ids_value]
    looked_up = _typed(ctx, fx, "embedding", [weight, ids_value], id_shape + (1,), f"{kind}.lookup")
    out = ctx.emit(fx, "reshape", [looked_up], TensorType(_shape_of(fx)), base=_base(fx, kind))
    ctx.nonneg.add(out)
    ctx.int_bounds[out] = 1.0
    return out


def cumsum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``cumsum(x, dim)`` of integers the model computes (a mask's running count): a float linear
    layer of the lower-triangular 0/1 matrix along ``dim`` (moved last and back by permutes)."""
    x, dim = fx.args[:2]
    shape = _shape_of(x)
    bound = _bound_of(ctx, x)
    if bound is None:
        raise _Unsupported("cumsum of float values (a running float sum rounds in torch's order; cumsum of "
                           "integers, such as a mask's, is supported)")
    axis = int(dim) % len(shape)
    length = int(shape[axis])
    if length > MAX_CUMSUM_LENGTH:
        raise _Unsupported(f"cumsum along an axis of {length} (up to {MAX_CUMSUM_LENGTH})")
    if bound * length >= EXACT_INTEGERS:
        raise _Unsupported(f"a cumsum that may reach {bound * length:.0f}, past float32's exact 2^24")
    order = [d for d in range(len(shape)) if d != axis] + [axis]
    moved_shape = tuple(shape[d] for d in order)
    xv = ctx.value(x)
    if axis != len(shape) - 1:
        xv = _typed(ctx, fx, "permute", [xv], moved_shape, "cumsum.moved", {"dims": tuple(order)})
    weight = ctx.param(_base(fx, "cumsum.triangle"), np.tril(np.ones((length, length), np.float32)))
    zero = ctx.param(_base(fx, "cumsum.bias"), np.zeros(length, np.float32))
    last = axis == len(shape) - 1
    attrs = {"act": "none"}
    if last:
        out = ctx.emit(fx, "linear", [xv, weight, zero], TensorType(shape), attrs, base=_base(fx, "cumsum"))
    else:
        summed = _typed(ctx, fx, "linear", [xv, weight, zero], moved_shape, "cumsum.sums", attrs)
        back = tuple(int(i) for i in np.argsort(order))
        out = ctx.emit(fx, "permute", [summed], TensorType(shape), {"dims": back}, base=_base(fx, "cumsum"))
    ctx.int_bounds[out] = bound * length
    return out


def embedding_at_positions(ctx: _Ctx, fx: torch.fx.Node, table: np.ndarray, ids_value: str, ids_shape) -> str:
    """``table[ids]`` at integer positions the model computed: ``[ids == k]`` (a one-hot row over
    the ``k`` the positions' bound allows) times those rows, a float linear layer whose every
    output is one row element times 1 plus zeros: exactly the element."""
    ids_shape = tuple(int(s) for s in ids_shape)
    rows = int(min(table.shape[0], ctx.int_bounds[ids_value] + 1))
    column = _typed(ctx, fx, "reshape", [ids_value], ids_shape + (1,), "positions.column")
    ks = ctx.param(_base(fx, "positions.rows"), np.arange(rows, dtype=np.float32))
    ctx.nonneg.add(ks)
    from .elementwise import _above  # (elementwise imports this module's comparison of ids)

    hot_shape = ids_shape + (rows,)
    above = _above(ctx, fx, column, ks, hot_shape, "positions.above")
    below = _above(ctx, fx, ks, column, hot_shape, "positions.below")
    differ = _typed(ctx, fx, "add", [above, below], hot_shape, "positions.differ")
    one_hot = _typed(ctx, fx, "sub", [_scalar(ctx, fx, 1.0, "positions.one"), differ], hot_shape, "positions.one_hot")
    weight = ctx.param(_base(fx, "weight"), np.ascontiguousarray(table[:rows].T, dtype=np.float32))
    zero = ctx.param(_base(fx, "positions.bias"), np.zeros(table.shape[1], np.float32))
    return ctx.emit(fx, "linear", [one_hot, weight, zero], TensorType(ids_shape + (table.shape[1],)),
                    {"act": "none"}, base=_base(fx, "embedding"))
