"""Integers the model computes from its token ids (RoBERTa's position ids: ``ids != pad``, its
cumulative sum, an embedding at those positions), held exactly as float32 in the IR.

csqc's runtimes compute in float32, which holds every integer of magnitude up to 2^24 exactly.
Each integer value capture builds gets the range of values it may hold (``_Ctx.int_ranges``),
derived op by op; an integer op whose result capture cannot range, a range past 2^24, a conversion
to a type that would wrap it, or positions outside the table they index are refused, so no integer
is ever rounded and no lookup returns a row where torch raises. Token ids themselves stay integer
IR inputs that only embeddings read:

- a comparison of ids with a constant is a lookup of its result for every id the model accepts
  (an ``embedding`` of a ``[V, 1]`` table: the runtime refuses ids past the smallest embedding
  table they index, ``V``);
- ``cumsum`` of integers is a float linear layer of a triangular 0/1 matrix (each output a sum of
  integers under 2^24: exact in any order);
- an embedding at computed positions is a one-hot row (``[p == k]``, exact on integers) times
  the table's rows the range spans: exactly the row picked, as a product by 1 and zeros;
- ``argmax`` is the first maximum's one-hot row and its position, and ``x[arange(b), index]``
  a batched matmul by the one-hot row (CLIP's pooled output).

An integer input that indexes no table (an attention mask) takes its range from
``csqc.save(..., input_ranges=...)``; the lookups capture builds make the runtime refuse values
outside it.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..ir import TensorType
from .context import _arg, _aten, _base, _Ctx, _is_condition, _scalar, _shape_of, _typed, _Unsupported

EXACT_INTEGERS = 2.0**24  # float32 holds every integer of smaller magnitude
MAX_CUMSUM_LENGTH = 4096  # its triangular matrix: 64 MiB of float32 at this length
MAX_LOOKUP_ROWS = 1 << 22  # a lookup table of an integer input's every value: 16 MiB of float32

Range = tuple[float, float]  # the least and greatest value an integer tensor may hold

# value-preserving ops: the result's integers are among the input's (views, copies, concatenations)
_SAME_VALUES = frozenset({
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.expand.default, _aten.slice.Tensor,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.clone.default, _aten.alias.default,
    _aten.contiguous.default, _aten.cat.default, _aten.flatten.using_ints, _aten.select.int, _aten.repeat.default,
})
# conversions: the values themselves where the target integer type holds the whole range
_CONVERSIONS = frozenset({_aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout, _aten.type_as.default})
# what may stand between token ids and the table they index (conversions: see ids_as)
_IDS_VIEWS = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
                        _aten.unsqueeze.default, _aten.squeeze.dim, _aten.flatten.using_ints,
                        _aten.clone.default, _aten.alias.default, _aten.contiguous.default}) | _CONVERSIONS


def is_integer_typed(fx: torch.fx.Node) -> bool:
    val = fx.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.is_floating_point() and not val.is_complex() \
        and val.dtype != torch.bool


def holds(dtype: torch.dtype, span: Range) -> bool:
    """Whether integer ``dtype`` holds every value of ``span`` (a narrowing conversion wraps)."""
    info = torch.iinfo(dtype)
    return info.min <= span[0] and span[1] <= info.max


def check_integer_result(ctx: _Ctx, fx: torch.fx.Node, out: str) -> None:
    """Record the range of integer value ``out`` that ``fx`` computed, or refuse it: capture
    computes integers only where it can bound them under 2^24, and converts them only to types
    that hold them."""
    if out in ctx.integer_inputs or out in ctx.int_ranges:
        if out in ctx.int_ranges and not holds(fx.meta["val"].dtype, ctx.int_ranges[out]):
            raise _Unsupported(f"integers in {_shown(ctx.int_ranges[out])} converted to {fx.meta['val'].dtype}, "
                               "which wraps them")
        return  # a view of the ids, or a range its handler derived
    span = _derived_range(ctx, fx)
    if span is None:
        if any(isinstance(a, torch.fx.Node) and ctx.env.get(a.name) in ctx.integer_inputs for a in fx.args):
            raise _Unsupported(f"{fx.meta['val'].dtype} arithmetic on the token ids themselves (csqc's integer "
                               "inputs feed embeddings and comparisons with a number)")
        raise _Unsupported(f"{fx.meta['val'].dtype} arithmetic on values the model computes (csqc computes in "
                           "float32: integers from token ids by comparisons, cumsum, +, - and * are supported)")
    if not max(abs(span[0]), abs(span[1])) < EXACT_INTEGERS:
        raise _Unsupported(f"integers the model computes may reach {_shown(span)}, past float32's exact 2^24")
    if not holds(fx.meta["val"].dtype, span):
        raise _Unsupported(f"integers in {_shown(span)} as {fx.meta['val'].dtype}, which wraps them")
    ctx.int_ranges[out] = span


def _shown(span: Range) -> str:
    return f"[{span[0]:.0f}, {span[1]:.0f}]"


def _derived_range(ctx: _Ctx, fx: torch.fx.Node) -> Range | None:
    """The range of ``fx``'s integer result from its operands' ranges; None where capture knows
    none (an operand of unknown range, or an op other than these)."""
    target = fx.target
    if target == _aten.cat.default:
        spans = [range_of(ctx, a) for a in fx.args[0]]
    elif target in _SAME_VALUES or target in _CONVERSIONS or target == _aten.neg.default:
        spans = [range_of(ctx, fx.args[0])]
    else:
        spans = [range_of(ctx, a) for a in fx.args[:2]]
    if not spans or any(s is None for s in spans):
        return None
    if target in _SAME_VALUES or target in _CONVERSIONS:
        return min(s[0] for s in spans), max(s[1] for s in spans)
    if target == _aten.neg.default:
        return -spans[0][1], -spans[0][0]
    if len(spans) != 2:
        return None
    (alo, ahi), (blo, bhi) = spans
    alpha = fx.kwargs.get("alpha", 1)
    if not isinstance(alpha, int):
        return None
    if target in (_aten.rsub.Scalar, _aten.rsub.Tensor):  # b - alpha * a
        (alo, ahi), (blo, bhi) = spans[1], spans[0]
        target = _aten.sub.Tensor
    if target in (_aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor, _aten.sub.Scalar):  # a +- alpha * b
        blo, bhi = sorted((blo * alpha, bhi * alpha))
        if target in (_aten.sub.Tensor, _aten.sub.Scalar):
            return alo - bhi, ahi - blo
        return alo + blo, ahi + bhi
    if target in (_aten.mul.Tensor, _aten.mul.Scalar):
        products = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        return min(products), max(products)
    return None


def range_of(ctx: _Ctx, a) -> Range | None:
    """The range of integer operand ``a``: a number, an integer-valued constant, a condition
    ([0, 1]), or a value capture ranged; None where it knows none (a float, the token ids)."""
    if isinstance(a, bool):
        return float(a), float(a)
    if isinstance(a, int):
        return float(a), float(a)
    if not isinstance(a, torch.fx.Node):
        return None
    if ctx.is_const(a):
        t = ctx.tensor(a).detach().cpu().double()  # (float64: abs(-2^63) would wrap in int64)
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            return None
        return float(t.min()), float(t.max())
    if _is_condition(a):
        return 0.0, 1.0
    value = ctx.env.get(a.name)
    return ctx.int_ranges.get(value) if value is not None else None


def ids_as(ctx: _Ctx, fx: torch.fx.Node, ids_input: str) -> str:
    """Token ids converted to another integer type (CLIP's ``input_ids.to(torch.int)``): the ids
    themselves where the type holds every id their tables allow."""
    dtype = fx.meta["val"].dtype
    if not holds(dtype, (0, ids_limit(ctx, ids_input) - 1)):
        raise _Unsupported(f"token ids converted to {dtype}, which wraps the ids their tables take")
    return ids_input


def ids_limit(ctx: _Ctx, ids_input: str) -> int:
    """The rows of the smallest table the integer input ``ids_input`` indexes (an embedding, an
    ``index_select`` of rows), or the end of its declared range (``input_ranges``; a mask input):
    the runtime refuses ids outside the tables capture builds, so they lie in ``[0, limit)``."""
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
    declared = ctx.declared_ranges.get(ids_input)
    if declared is not None and declared[0] >= 0:  # csqc.save(..., input_ranges=): the runtime checks them
        limits.append(int(declared[1]))
    if not limits:
        raise _Unsupported("integer inputs compared or converted where they index no embedding (declare their "
                           "range: csqc.save(..., input_ranges={name: (low, high)}))")
    if min(limits) > MAX_LOOKUP_ROWS:
        raise _Unsupported(f"integer inputs of {min(limits)} values compared or converted (up to {MAX_LOOKUP_ROWS})")
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
        other = ctx.tensor(other).detach().cpu().reshape(())
    ids_fx = a if ids_side[0] else b
    # torch itself compares every id (its type promotion: a Python float against int64 ids is
    # compared in float32, a 0-d float64 tensor in float64)
    return ids_condition(ctx, fx, ids_fx, lambda every_id: _COMPARE[kind](every_id, other) if ids_side[0]
                         else _COMPARE[kind](other, every_id), kind)


def ids_condition(ctx: _Ctx, fx: torch.fx.Node, ids_fx: torch.fx.Node, condition, what: str) -> str:
    """``condition(ids)`` (0.0 / 1.0) of token ids: torch's result for every id the model takes
    (``[0, ids_limit)``), looked up by an ``embedding`` of that ``[limit, 1]`` table."""
    ids_value = ctx.value(ids_fx)
    limit = ids_limit(ctx, ids_value)
    table = condition(torch.arange(limit, dtype=ids_fx.meta["val"].dtype)).to(torch.float32).numpy()
    out = _looked_up(ctx, fx, ids_value, table, _shape_of(fx), what, final=True)
    ctx.int_ranges[out] = (0.0, 1.0)
    return out


def _looked_up(ctx: _Ctx, fx: torch.fx.Node, ids_value: str, table: np.ndarray, shape, what: str,
               final: bool = False) -> str:
    """``table[ids]`` of a table of one value per id (non-negative), viewed as ``shape``."""
    weight = ctx.param(_base(fx, f"{what}.table"), table.reshape(-1, 1))
    ctx.nonneg.add(weight)
    rows = _typed(ctx, fx, "embedding", [weight, ids_value], ctx.id_shapes[ids_value] + (1,), f"{what}.lookup")
    out = (ctx.emit(fx, "reshape", [rows], TensorType(shape), base=_base(fx, what)) if final
           else _typed(ctx, fx, "reshape", [rows], shape, what))
    ctx.nonneg.add(out)
    return out


def cumsum(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``cumsum(x, dim)`` of integers the model computes (a mask's running count): a float linear
    layer of the lower-triangular 0/1 matrix along ``dim`` (moved last and back by permutes)."""
    x, dim = fx.args[:2]
    shape = _shape_of(x)
    span = range_of(ctx, x)
    if span is None:
        raise _Unsupported("cumsum of float values (a running float sum rounds in torch's order; cumsum of "
                           "integers, such as a mask's, is supported)")
    axis = int(dim) % len(shape)
    length = int(shape[axis])
    if length > MAX_CUMSUM_LENGTH:
        raise _Unsupported(f"cumsum along an axis of {length} (up to {MAX_CUMSUM_LENGTH})")
    # a running sum of k terms lies in [k lo, k hi], k from 1 to the length
    summed = (min(span[0], span[0] * length), max(span[1], span[1] * length))
    dtype = fx.meta["val"].dtype
    if dtype.is_floating_point:
        raise _Unsupported(f"cumsum of integers to {dtype}")
    if not max(abs(summed[0]), abs(summed[1])) < EXACT_INTEGERS or not holds(dtype, summed):
        raise _Unsupported(f"a cumsum that may reach {_shown(summed)}: past float32's exact 2^24 or its {dtype}")
    order = [d for d in range(len(shape)) if d != axis] + [axis]
    moved_shape = tuple(shape[d] for d in order)
    xv = ctx.value(x)
    if axis != len(shape) - 1:
        xv = _typed(ctx, fx, "permute", [xv], moved_shape, "cumsum.moved", {"dims": tuple(order)})
    weight = ctx.param(_base(fx, "cumsum.triangle"), np.tril(np.ones((length, length), np.float32)))
    zero = ctx.param(_base(fx, "cumsum.bias"), np.zeros(length, np.float32))
    attrs = {"act": "none"}
    if axis == len(shape) - 1:
        out = ctx.emit(fx, "linear", [xv, weight, zero], TensorType(shape), attrs, base=_base(fx, "cumsum"))
    else:
        sums = _typed(ctx, fx, "linear", [xv, weight, zero], moved_shape, "cumsum.sums", attrs)
        back = tuple(int(i) for i in np.argsort(order))
        out = ctx.emit(fx, "permute", [sums], TensorType(shape), {"dims": back}, base=_base(fx, "cumsum"))
    ctx.int_ranges[out] = summed
    return out


def embedding_at_positions(ctx: _Ctx, fx: torch.fx.Node, table: np.ndarray, ids_value: str, ids_shape) -> str:
    """``table[ids]`` at integer positions the model computed: ``[ids == k]`` (a one-hot row over
    the ``k`` the positions' range spans) times those rows, a float linear layer whose every
    output is one row element times 1 plus zeros: exactly the element. Positions that may fall
    outside the table (where torch raises) are refused."""
    ids_shape = tuple(int(s) for s in ids_shape)
    lo, hi = ctx.int_ranges[ids_value]
    if lo < 0 or hi >= table.shape[0]:
        raise _Unsupported(f"positions the model computes may reach {_shown((lo, hi))}, outside the table's "
                           f"{table.shape[0]} rows (torch raises there)")
    first, rows = int(lo), int(hi) - int(lo) + 1
    column = _typed(ctx, fx, "reshape", [ids_value], ids_shape + (1,), "positions.column")
    one_hot = _one_hot(ctx, fx, column, np.arange(first, first + rows), ids_shape + (rows,), "positions")
    weight = ctx.param(_base(fx, "weight"), np.ascontiguousarray(table[first:first + rows].T, dtype=np.float32))
    zero = ctx.param(_base(fx, "positions.bias"), np.zeros(table.shape[1], np.float32))
    return ctx.emit(fx, "linear", [one_hot, weight, zero], TensorType(ids_shape + (table.shape[1],)),
                    {"act": "none"}, base=_base(fx, "embedding"))


def _integer_values(ctx: _Ctx, fx: torch.fx.Node, x) -> tuple[str, Range]:
    """Integer operand ``x`` as a float32 IR value and its range: token ids looked up as
    themselves (a ``[limit, 1]`` table of 0, 1, ...), a ranged value or a condition as it is."""
    value = ctx.value(x)
    if value in ctx.integer_inputs:
        limit = ids_limit(ctx, value)
        return _looked_up(ctx, fx, value, np.arange(limit, dtype=np.float32), _shape_of(x), "ids"), (0.0, limit - 1.0)
    span = range_of(ctx, x)
    if span is None:
        raise _Unsupported("argmax of float values (where NaN leads torch's order; argmax of integers, such as "
                           "token ids or a mask, is supported)")
    return value, span


def argmax(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``argmax(x, dim, keepdim)`` of integers (CLIP's end-of-text position: the greatest token
    id): ``hit = [x == max]`` (exact indicators), its running count (a triangular linear layer),
    the first hit ``hit * [count <= 1]`` (torch returns the first maximum), and its position as
    that one-hot row times ``0, 1, ...`` (a linear layer: one product by 1). An index in
    ``[0, n)``, ranged for what reads it (a row picked by ``x[arange(b), index]``)."""
    from .elementwise import _above  # (elementwise imports this module's comparison of ids)

    x = fx.args[0]
    dim, keep = _arg(fx, 1, "dim", None), bool(_arg(fx, 2, "keepdim", False))
    if dim is None:
        raise _Unsupported("argmax over every axis (give dim)")
    shape = _shape_of(x)
    axis = int(dim) % len(shape)
    length = int(shape[axis])
    if length > MAX_CUMSUM_LENGTH:
        raise _Unsupported(f"argmax along an axis of {length} (up to {MAX_CUMSUM_LENGTH})")
    xv, _ = _integer_values(ctx, fx, x)
    order = [d for d in range(len(shape)) if d != axis] + [axis]
    moved = tuple(shape[d] for d in order)
    if axis != len(shape) - 1:
        xv = _typed(ctx, fx, "permute", [xv], moved, "argmax.moved", {"dims": tuple(order)})
    last, reduced = len(moved) - 1, moved[:-1] + (1,)
    greatest = _typed(ctx, fx, "amax", [xv], reduced, "argmax.max", {"dims": (last,), "keepdim": True})
    one = _scalar(ctx, fx, 1.0, "argmax.one")
    hit = _typed(ctx, fx, "sub", [one, _above(ctx, fx, greatest, xv, moved, "argmax.below")], moved, "argmax.hit")
    linear = {"act": "none"}
    triangle = ctx.param(_base(fx, "argmax.triangle"), np.tril(np.ones((length, length), np.float32)))
    zeros = ctx.param(_base(fx, "argmax.bias"), np.zeros(length, np.float32))
    count = _typed(ctx, fx, "linear", [hit, triangle, zeros], moved, "argmax.count", linear)
    later = _typed(ctx, fx, "sub", [one, _above(ctx, fx, count, one, moved, "argmax.repeat")], moved, "argmax.once")
    first = _typed(ctx, fx, "mul", [hit, later], moved, "argmax.first")
    positions = ctx.param(_base(fx, "argmax.positions"), np.arange(length, dtype=np.float32).reshape(1, length))
    zero = ctx.param(_base(fx, "argmax.zero"), np.zeros(1, np.float32))
    index = _typed(ctx, fx, "linear", [first, positions, zero], reduced, "argmax.index", linear)
    out_shape = tuple(1 if d == axis else n for d, n in enumerate(shape)) if keep else tuple(
        n for d, n in enumerate(shape) if d != axis)
    out = ctx.emit(fx, "reshape", [index], TensorType(out_shape), base=_base(fx, "argmax"))
    ctx.nonneg.add(out)
    ctx.int_ranges[out] = (0.0, float(length - 1))
    return out


def rows_at(ctx: _Ctx, fx: torch.fx.Node, x, batch_index, index) -> str:
    """``x[arange(b), index]`` (one row per batch element at a computed position: CLIP's pooled
    output): ``[index == k]`` one-hot rows ``[b, 1, n]`` times ``x`` as ``[b, n, rest]`` (a
    batched matmul: each output one element times 1 plus zeros, exactly the element)."""
    shape = _shape_of(x)
    if len(shape) < 2 or not ctx.is_const(batch_index):
        raise _Unsupported("advanced indexing by a computed index (x[arange(batch), index] is supported)")
    batch, length = int(shape[0]), int(shape[1])
    rows = ctx.tensor(batch_index).detach().cpu().numpy()
    span = range_of(ctx, index)
    if not np.array_equal(rows.reshape(-1), np.arange(batch)) or tuple(_shape_of(index)) != (batch,):
        raise _Unsupported("advanced indexing by a computed index (x[arange(batch), index] is supported)")
    if span is None or span[0] < 0 or span[1] >= length:
        raise _Unsupported(f"indexing at computed positions that may fall outside the axis of {length}")
    rest = int(np.prod(shape[2:], dtype=np.int64))
    column = _typed(ctx, fx, "reshape", [ctx.value(index)], (batch, 1, 1), "rows.column")
    one_hot = _one_hot(ctx, fx, column, np.arange(length), (batch, 1, length), "rows")
    values = _typed(ctx, fx, "reshape", [ctx.value(x)], (batch, length, rest), "rows.values")
    picked = _typed(ctx, fx, "matmul", [one_hot, values], (batch, 1, rest), "rows.picked")
    return ctx.emit(fx, "reshape", [picked], TensorType((batch,) + tuple(shape[2:])), base=_base(fx, "rows"))


def _one_hot(ctx: _Ctx, fx: torch.fx.Node, column: str, ks: np.ndarray, shape, what: str) -> str:
    """``[column == k]`` for each ``k`` of ``ks`` (the last axis of ``shape``): ``1 - ([c > k] +
    [k > c])``, exact indicators of integers."""
    from .elementwise import _above  # (elementwise imports this module's comparison of ids)

    rows = ctx.param(_base(fx, f"{what}.rows"), ks.astype(np.float32))
    if (ks >= 0).all():
        ctx.nonneg.add(rows)
    differ = _typed(ctx, fx, "add", [_above(ctx, fx, column, rows, shape, f"{what}.above"),
                                     _above(ctx, fx, rows, column, shape, f"{what}.below")], shape, f"{what}.differ")
    return _typed(ctx, fx, "sub", [_scalar(ctx, fx, 1.0, f"{what}.one"), differ], shape, f"{what}.one_hot")
