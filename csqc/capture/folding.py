"""Constant folding at capture: ops whose inputs are all constants (masks, positions) are
evaluated with torch and become parameters; some ops are supported only that way."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from ..errors import BadInput
from .context import _aten, _base, _Ctx, _Unsupported
from .integers import range_of

# ops supported only on constants: evaluated at capture, an error where they read the model's input
_CONSTANT_ONLY = (
    _aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.ge.Scalar, _aten.ge.Tensor,
    _aten.le.Scalar, _aten.le.Tensor, _aten.gt.Scalar, _aten.gt.Tensor, _aten.lt.Scalar, _aten.lt.Tensor,
    _aten.eq.Scalar, _aten.eq.Tensor, _aten.ne.Scalar, _aten.ne.Tensor,
    _aten.where.self, _aten.where.ScalarOther, _aten.where.ScalarSelf, _aten.gather.default,
    _aten.__and__.Tensor, _aten.__or__.Tensor, _aten.bitwise_not.default, _aten.logical_not.default,
    _aten.cumsum.default, _aten.diff.default, _aten.index.Tensor, _aten.new_ones.default, _aten.ones.default,
    _aten.ones_like.default, _aten.full_like.default, _aten.expand.default, _aten.masked_fill.Scalar,
    _aten.tril.default, _aten.triu.default, _aten.pow.Scalar, _aten.fill_.Scalar, _aten.fill_.Tensor,
    _aten.zero_.default,
    # position tables computed in forward: DeBERTa-v2's log buckets (ceil), BLOOM's ALiBi slopes
    # (pow of two tensors), BEiT's relative position index (meshgrid, copy_), index arithmetic
    _aten.ceil.default, _aten.floor.default, _aten.round.default, _aten.round.decimals, _aten.trunc.default,
    _aten.pow.Tensor_Tensor, _aten.meshgrid.default, _aten.meshgrid.indexing, _aten.copy_.default,
    _aten.div.Tensor_mode, _aten.floor_divide.default, _aten.remainder.Scalar, _aten.remainder.Tensor,
    _aten.fmod.Scalar, _aten.fmod.Tensor, _aten.log2.default, _aten.scalar_tensor.default, _aten.sum.default,
    _aten.logical_and.default, _aten.logical_or.default, _aten.argsort.default, _aten.cumprod.default,
    _aten.linspace.default, _aten.logspace.default,
)
# ops whose result depends only on their first input's shape and dtype (x.new_zeros(...)): a
# constant, folded, whatever that input is (Swin builds its window mask from one and fills it)
_SHAPE_ONLY = frozenset({_aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default,
                         _aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default})

# expanded float values that feed the model stay IR ops (see _foldable)
_BROADCASTS = frozenset({_aten.expand.default, _aten.expand_as.default, _aten.broadcast_to.default,
                         _aten.repeat.default})
# csqc's own layer ops read their weights as constants and must stay layers
_NEVER_FOLDED = frozenset({torch.ops.csqc.quant_conv2d.default, torch.ops.csqc.quant_linear.default,
                           torch.ops.csqc.quant_conv_transpose2d.default,
                           torch.ops.csqc.act_quant.default, torch.ops.csqc.act_quant_asymmetric.default})


def _constant_only(ctx: _Ctx, fx: torch.fx.Node) -> str:
    raise _Unsupported("supported on constants only (folded at capture); here it depends on the model's input")


def _foldable(ctx: _Ctx, fx: torch.fx.Node) -> bool:
    """Whether every tensor ``fx`` reads is a constant (parameters, buffers, folded results)."""
    if fx.target in _NEVER_FOLDED:
        return False
    if (fx.target in _BROADCASTS and _is_float(fx)
            and any(u.name not in ctx.constant_derived for u in fx.users)):
        return False  # a class token expanded to the batch: an IR expand, not a batch-sized constant
    if _gathers_a_uniform_constant(ctx, fx):
        return True
    return all(a.name in ctx.consts for a in _value_inputs(fx))


def _gathers_a_uniform_constant(ctx: _Ctx, fx: torch.fx.Node) -> bool:
    """``gather(x, dim, index)`` of a constant ``x`` whose values do not vary along ``dim``: the
    same whatever the index (RoBERTa's zero token types at its computed positions), so it folds;
    torch refuses an index outside ``dim``, so every valid one picks these values."""
    if fx.target != _aten.gather.default or not ctx.is_const(fx.args[0]):
        return False
    x = ctx.tensor(fx.args[0])
    if x.dim() == 0 or x.numel() == 0:
        return False
    dim = int(fx.args[1]) % x.dim()
    span = range_of(ctx, fx.args[2])  # (torch raises for an index outside the axis: so must capture)
    if span is None or span[0] < 0 or span[1] >= x.shape[dim]:
        return False
    return bool((x == x.narrow(dim, 0, 1)).all())


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


# A model file is untrusted: ``ones(2**40)`` folded would take whatever memory its program asks
# for. Each fold's result is checked before it is evaluated (its size comes from the program's
# shapes, which capture's re-export recomputed), and what folding keeps alive is bounded in all;
# views of what exists (slices of a mask buffer, one per layer) cost nothing and count nothing.
MAX_FOLDED_BYTES = 256 << 20  # one folded constant; a real model's masks and positions are KBs to MBs
MAX_FOLDED_TOTAL = 1 << 30  # all of them together


def _nbytes(val) -> int:
    nbytes = 0
    for v in val if isinstance(val, (list, tuple)) else [val]:
        if isinstance(v, torch.Tensor):
            count = 1
            for n in v.shape:
                count *= int(n)
            nbytes += count * v.element_size()
    return nbytes


def _refuse(fx: torch.fx.Node, nbytes: int, limit: int, what: str) -> BadInput:
    return BadInput(f"the model's program builds constants of {nbytes:,} bytes {what} at {fx.name} ({fx.target}), "
                    f"more than the {limit >> 20} MiB csqc evaluates at capture; refusing")


def _fold(ctx: _Ctx, fx: torch.fx.Node) -> None:
    """Evaluate ``fx`` with torch now; its result is a constant (a parameter once a runtime op reads it)."""
    def constant(a: torch.fx.Node):
        if a.name in ctx.consts:
            return ctx.consts[a.name]
        val = a.meta["val"]  # (an op that reads only the shape and dtype of a runtime value: no data)
        return torch.zeros((), dtype=val.dtype).expand(tuple(int(n) for n in val.shape))

    size = _nbytes(fx.meta.get("val"))
    if size > MAX_FOLDED_BYTES:
        raise _refuse(fx, size, MAX_FOLDED_BYTES, "in one tensor")
    args, kwargs = torch.fx.node.map_arg((fx.args, fx.kwargs), constant)
    try:
        with torch.no_grad():
            ctx.consts[fx.name] = fx.target(*args, **kwargs)
    except Exception as e:  # torch raises many types; the op is then reported as unsupported
        raise _Unsupported(f"could not evaluate on constants ({type(e).__name__})") from None
    storages = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    result = ctx.consts[fx.name]
    if not (isinstance(result, torch.Tensor) and result.untyped_storage().data_ptr() in storages):  # a view: nothing new
        ctx.folded_bytes += _nbytes(result)
        if ctx.folded_bytes > MAX_FOLDED_TOTAL:
            raise _refuse(fx, ctx.folded_bytes, MAX_FOLDED_TOTAL, "in all")
    ctx.folded[fx.name] = _base(fx, "const")
