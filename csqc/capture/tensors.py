"""Handlers that move data without arithmetic: views, permutes, slices, pads, concatenation,
splits, gathers with constant indices, and dtype no-ops."""

from __future__ import annotations

import numpy as np
import torch

from ..ir import INT_DTYPES, TensorType
from .context import _arg, _aten, _base, _Ctx, _is_condition, module_path, _shape_of, _type_of, _typed, _Unsupported
from .integers import ids_as, rows_at
from .layers import _table_rows


def _passthrough(ctx: _Ctx, fx: torch.fx.Node) -> str:
    return ctx.value(fx.args[0])


def _reshape(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    if xv in ctx.integer_inputs:  # a view of token ids: the embedding reading them restores the shape
        return xv
    return ctx.emit(fx, "reshape", [xv], base=f"{module_path(fx) or fx.name}.reshape")


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


def _reversed_axes(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.T``: every axis reversed (numpy's transpose)."""
    return _permute(ctx, fx, list(reversed(range(len(_type_of(fx).shape)))))


def _matrix_transpose(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.mT`` (and ``mH``, ``adjoint``, ``H``: the same of real values): the last two axes swapped."""
    if _type_of(fx.args[0]).dtype.startswith("complex"):
        raise _Unsupported("the conjugate transpose of complex values")
    nd = len(_type_of(fx).shape)
    dims = list(range(nd))
    dims[-2:] = dims[-1], dims[-2]
    return _permute(ctx, fx, dims)


def _movedim(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``movedim(x, source, destination)``: the axes of ``source`` at ``destination``, the others
    in their order in the places left."""
    nd = len(_type_of(fx).shape)
    source, destination = fx.args[1], fx.args[2]
    source = [int(source)] if isinstance(source, int) else [int(d) for d in source]
    destination = [int(destination)] if isinstance(destination, int) else [int(d) for d in destination]
    source, destination = [d % nd for d in source], [d % nd for d in destination]
    dims: list[int | None] = [None] * nd
    for src, dst in zip(source, destination):
        dims[dst] = src
    rest = iter(d for d in range(nd) if d not in source)
    return _permute(ctx, fx, [next(rest) if d is None else d for d in dims])


def _cat(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``torch.cat``, leaving out pieces of no elements (an empty slice)."""
    vals = [ctx.value(v) for v in fx.args[0] if not (ctx.is_const(v) and ctx.tensor(v).numel() == 0)]
    nd = len(_type_of(fx).shape)
    axis = int(_arg(fx, 1, "dim", 0)) % nd
    if len(vals) == 1:
        return vals[0]
    return ctx.emit(fx, "cat", vals, attrs={"axis": axis})


def _getitem(ctx: _Ctx, fx: torch.fx.Node) -> str:
    src, idx = fx.args
    pieces = ctx.env.get(src.name)
    if isinstance(pieces, tuple):  # split / unbind: one IR value per piece
        return pieces[idx]
    if src.name in ctx.env and (idx == 0 or not fx.users):  # (an unused second output: nothing reads it)
        return ctx.env[src.name]
    raise _Unsupported("only the first output of a multi-output op is supported")


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


def _tensor_split(ctx: _Ctx, fx: torch.fx.Node) -> tuple[str, ...]:
    """``tensor_split(x, sections | indices, dim)``: ``n`` sections (the first ``size % n`` one
    longer), or pieces cut before each index."""
    shape = _shape_of(fx.args[0])
    axis = int(_arg(fx, 2, "dim", 0)) % len(shape)
    size, cut = int(shape[axis]), fx.args[1]
    if isinstance(cut, int):
        if cut < 1:
            raise _Unsupported(f"tensor_split into {cut} sections")
        lengths = [size // cut + (i < size % cut) for i in range(cut)]
        bounds = [sum(lengths[:i]) for i in range(cut + 1)]
    else:
        bounds = [0] + [min(max(int(i) + size if int(i) < 0 else int(i), 0), size) for i in cut] + [size]
    read = {u.args[1] for u in fx.users if u.users}  # the pieces some op reads
    pieces = list(zip(bounds[:-1], bounds[1:]))
    if any(end <= start for i, (start, end) in enumerate(pieces) if i in read):
        raise _Unsupported(f"tensor_split with an empty piece (axis of {size}) the model reads")
    xv = ctx.value(fx.args[0])
    # (an empty piece nothing reads has no value: the IR has no empty tensors)
    return tuple(_slice_value(ctx, fx, xv, shape, axis, start, end) if end > start else None
                 for start, end in pieces)


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


def _same_dtype(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # to.dtype / _to_copy of a runtime value: a float32 -> float32 copy is a no-op, and so is any
    # conversion of integers the model computed (capture.integers: exact float32 in the IR)
    src = fx.args[0]
    if ctx.value(src) in ctx.integer_inputs and _type_of(fx).dtype in INT_DTYPES:
        return ids_as(ctx, fx, ctx.value(src))
    integers = isinstance(src, torch.fx.Node) and (ctx.env.get(src.name) in ctx.int_ranges or _is_condition(src))
    to_condition = _is_condition(fx) and not _is_condition(src)  # (x != 0: capture.elementwise)
    if _type_of(fx).dtype != _type_of(src).dtype and not (integers and not to_condition):
        raise _Unsupported(f"a dtype conversion of a runtime value to {_type_of(fx).dtype}")
    return ctx.value(src)


def _no_op(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """_assert_tensor_metadata (a trace-time check) and in-place detach: the value itself."""
    return ctx.value(fx.args[0])


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


def _feature_dropout(ctx: _Ctx, fx: torch.fx.Node) -> str:
    if _arg(fx, 2, "train", False):
        raise _Unsupported("dropout in training mode (call model.eval())")
    return ctx.value(fx.args[0])


_MAX_GATHER_RUNS = 8  # runs a constant-index gather takes as slices and a cat; more: one take


def _index_runs(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, index, what: str) -> str:
    """``x`` gathered along ``axis`` at constant positions ``index``: one slice per run of
    consecutive positions, concatenated (a permutation of a few channels, a reversal of a short
    axis: slices fuse into elementwise chains); past ``_MAX_GATHER_RUNS`` runs, or for an index
    of several dimensions, one ``take`` (a relative position table, a long reversal)."""
    size = int(shape[axis])
    index = np.asarray(index).astype(np.int64)
    index = np.where(index < 0, index + size, index)
    if index.size == 0 or (index < 0).any() or (index >= size).any():
        raise _Unsupported(f"{what}: an index outside the axis of {size}")
    flat = index.reshape(-1)
    runs = 1 + int(np.count_nonzero(np.diff(flat) != 1))
    if index.ndim != 1 or runs > _MAX_GATHER_RUNS:
        return _taken(ctx, fx, xv, shape, axis, index, what)
    return _gathered(ctx, fx, xv, shape, axis, flat, what)


def _taken(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, axis: int, index: np.ndarray, what: str,
           final: bool = True) -> str:
    """One ``take`` of ``x`` along ``axis`` at ``index`` (int32, checked inside the axis)."""
    out = tuple(shape[:axis]) + tuple(index.shape) + tuple(shape[axis + 1:])
    if max(int(np.prod(shape, dtype=np.int64)), int(np.prod(out, dtype=np.int64))) >= 2**31:
        raise _Unsupported(f"{what} of a tensor of 2^31 elements or more (the kernels index in int32)")
    positions = ctx.param(_base(fx, f"{what}.index"), index.astype(np.int32))
    if final:
        return ctx.emit(fx, "take", [xv, positions], TensorType(out), {"axis": axis}, base=_base(fx, what))
    return _typed(ctx, fx, "take", [xv, positions], out, what, {"axis": axis})


def _gather(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``torch.gather(x, dim, index)`` of the model's values at a constant index (DeBERTa's
    relative positions): each output element's flat position in ``x`` computed now, then one
    ``take``. Leading axes the index does not vary along (and spans whole) stay axes of their
    own, so a batch axis stays the batch (``x`` viewed as those axes and one flat axis)."""
    x, dim, index = fx.args[:3]
    if _arg(fx, 3, "sparse_grad", False):
        raise _Unsupported("gather with sparse_grad")
    if not ctx.is_const(index):
        raise _Unsupported("gather by an index computed from the model's input (a constant index is supported)")
    shape = _shape_of(x)
    index = ctx.tensor(index).detach().cpu().numpy().astype(np.int64)
    axis = int(dim) % len(shape)
    if index.ndim != len(shape) or any(i > n for d, (i, n) in enumerate(zip(index.shape, shape)) if d != axis):
        raise _Unsupported(f"gather by an index of shape {list(index.shape)} from values of shape {list(shape)}")
    size = int(shape[axis])
    index = np.where(index < 0, index + size, index)
    if index.size == 0 or (index < 0).any() or (index >= size).any():
        raise _Unsupported(f"gather: an index outside the axis of {size}")
    kept = 0  # leading axes whole and uniform in the index: they stay axes (the batch among them)
    while (kept < axis and index.shape[kept] == shape[kept]
           and (index == np.take(index, [0], axis=kept)).all()):
        kept += 1
    sample = index[(0,) * kept]  # the index over the remaining axes
    coords = list(np.indices(sample.shape))
    coords[axis - kept] = sample
    positions = np.ravel_multi_index(coords, shape[kept:])
    flat = _typed(ctx, fx, "reshape", [ctx.value(x)], tuple(shape[:kept]) + (int(np.prod(shape[kept:])),),
                  "gather.flat")
    return _taken(ctx, fx, flat, tuple(shape[:kept]) + (int(np.prod(shape[kept:])),), kept, positions, "gather")


def _index_select(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape = _shape_of(fx.args[0])
    axis = int(fx.args[1]) % len(shape)
    if not ctx.is_const(fx.args[2]):  # rows of a constant table at ids or computed positions: an embedding
        if axis != 0 or len(shape) != 2 or not ctx.is_const(fx.args[0]):
            raise _Unsupported("index_select by a computed index of values other than a constant table's rows")
        return _table_rows(ctx, fx, fx.args[0], fx.args[2])
    index = ctx.tensor(fx.args[2]).numpy().reshape(-1)  # (a 0-d index keeps the axis, of one)
    return _index_runs(ctx, fx, ctx.value(fx.args[0]), shape, axis, index, "index_select")


def _index(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x[..., idx, ...]`` with one constant index (the other axes whole): a gather; an index of
    several dimensions takes their place in the output."""
    indices = list(fx.args[1])
    axes = [i for i, t in enumerate(indices) if t is not None]
    if len(axes) > 1:
        return _index_leading_axes(ctx, fx, indices, axes)
    index = ctx.tensor(indices[axes[0]]).numpy()
    if index.dtype == np.bool_:
        raise _Unsupported("indexing by a mask")
    picked = _index_runs(ctx, fx, ctx.value(fx.args[0]), _shape_of(fx.args[0]), axes[0], index.reshape(-1) if
                         index.ndim == 0 else index, "indexing")
    if index.ndim == 0:  # a 0-d index drops the axis, as select does
        return ctx.emit(fx, "reshape", [picked], base=_base(fx, "indexing"))
    return picked


def _index_leading_axes(ctx: _Ctx, fx: torch.fx.Node, indices: list, axes: list[int]) -> str:
    """``x[i, j, ...]`` with constant index arrays on the leading axes (broadcast together):
    the flat positions they pick among those axes, one ``take`` of ``x`` viewed with them as one
    axis (transformers' padding masks: ``mask[batch_idx, kv_idx]``)."""
    if len(axes) == 2 and axes == [0, 1] and not ctx.is_const(indices[1]):
        return rows_at(ctx, fx, fx.args[0], indices[0], indices[1])
    if axes != list(range(len(axes))) or not all(ctx.is_const(indices[a]) for a in axes):
        raise _Unsupported("advanced indexing on several axes (constant indices on the leading axes are supported)")
    shape = _shape_of(fx.args[0])
    arrays = []
    for a in axes:
        index = ctx.tensor(indices[a]).detach().cpu().numpy()
        if index.dtype == np.bool_:
            raise _Unsupported("indexing by a mask")
        index = np.where(index < 0, index + shape[a], index).astype(np.int64)
        if index.size == 0 or (index < 0).any() or (index >= shape[a]).any():
            raise _Unsupported(f"indexing: an index outside the axis of {shape[a]}")
        arrays.append(index)
    positions = np.ravel_multi_index(np.broadcast_arrays(*arrays), shape[:len(axes)])
    lead = int(np.prod(shape[:len(axes)], dtype=np.int64))
    flat_shape = (lead,) + tuple(shape[len(axes):])
    flat = _typed(ctx, fx, "reshape", [ctx.value(fx.args[0])], flat_shape, "indexing.flat")
    return _taken(ctx, fx, flat, flat_shape, 0, positions, "indexing")


def _flip(ctx: _Ctx, fx: torch.fx.Node) -> str:
    shape, value = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    for dim in fx.args[1]:
        axis = int(dim) % len(shape)
        value = _index_runs(ctx, fx, value, shape, axis, np.arange(shape[axis])[::-1], "flip")
    return value


# -- sliding windows: Tensor.unfold, F.unfold (im2col) and F.fold (col2im) ---------------------
def _windows(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``x.unfold(dim, size, step)`` (PatchTST's patches): the windows' positions along ``dim``
    as one ``take`` (index ``[n, size]``), the window axis moved last as torch puts it; windows
    that tile the axis exactly are a reshape."""
    x, dim, size, step = fx.args[:4]
    shape = _shape_of(x)
    nd = len(shape)
    axis, size, step = int(dim) % max(nd, 1), int(size), int(step)
    if nd == 0 or size < 1 or step < 1 or size > shape[axis]:
        raise _Unsupported(f"unfold of size {size}, step {step} on a shape of {list(shape)}")
    count = (shape[axis] - size) // step + 1
    split = tuple(shape[:axis]) + (count, size) + tuple(shape[axis + 1:])
    if step == size and count * size == shape[axis]:
        windows = _typed(ctx, fx, "reshape", [ctx.value(x)], split, "unfold.windows")
    else:
        index = np.arange(count)[:, None] * step + np.arange(size)[None, :]
        windows = _taken(ctx, fx, ctx.value(x), shape, axis, index, "unfold", final=False)
    if axis == nd - 1:
        return windows
    dims = tuple(range(axis + 1)) + tuple(range(axis + 2, nd + 1)) + (axis + 1,)
    return ctx.emit(fx, "permute", [windows], attrs={"dims": dims}, base=_base(fx, "unfold"))


def _window_geometry(fx: torch.fx.Node, first: int):
    """``kernel, dilation, padding, stride`` of im2col / col2im (arguments from ``first`` on)."""
    return [tuple(int(v) for v in (a if isinstance(a, (list, tuple)) else (a, a)))
            for a in (fx.args[first + i] for i in range(4))]


def _patch_positions(size, kernel, dilation, padding, stride):
    """Per kernel offset and output position, the padded input position it reads along one axis."""
    padded = size + 2 * padding
    count = (padded - dilation * (kernel - 1) - 1) // stride + 1
    if count < 1:
        raise _Unsupported(f"a sliding window of {kernel} (dilation {dilation}) on {size} positions padded by "
                           f"{padding}: no window fits")
    return np.arange(kernel)[:, None] * dilation + np.arange(count)[None, :] * stride, padded, count


def _patches(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.unfold`` (im2col; MobileViT-v2's patches): the input zero-padded as ``F.pad`` pads,
    its spatial axes flattened, each patch's pixels picked by one ``take`` (index ``[kh * kw,
    L]``), reshaped to torch's ``[N, C * kh * kw, L]`` (channel-major)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _window_geometry(fx, 1)
    shape = list(_shape_of(fx.args[0]))
    if len(shape) not in (3, 4):
        raise _Unsupported(f"im2col of a {len(shape)}-D input")
    rows, height, oh = _patch_positions(shape[-2], kh, dh, ph, sh)
    cols, width, ow = _patch_positions(shape[-1], kw, dw, pw, sw)
    value = ctx.value(fx.args[0])
    for axis, pad in ((len(shape) - 2, ph), (len(shape) - 1, pw)):
        value = _padded_axis(ctx, fx, value, shape, axis, pad, pad)
    lead = tuple(shape[:-2])
    flat = _typed(ctx, fx, "reshape", [value], lead + (height * width,), "im2col.flat")
    # index[ki * kw + kj, i * ow + j] = (i * sh + ki * dh) * W + (j * sw + kj * dw)
    index = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(kh * kw, oh * ow)
    taken = _taken(ctx, fx, flat, lead + (height * width,), len(lead), index, "im2col", final=False)
    return ctx.emit(fx, "reshape", [taken], base=_base(fx, "im2col"))


def _folded_patches(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.fold`` (col2im) of patches that do not overlap (MobileViT-v2 folds back what it
    unfolded): each output pixel is the one patch element written there, or 0 where none is, as
    one ``take`` from the patches (a zero appended for the uncovered). Overlapping patches sum,
    which is refused by name."""
    out_h, out_w = (int(v) for v in fx.args[1])
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _window_geometry(fx, 2)
    shape = tuple(_shape_of(fx.args[0]))
    rows, _, oh = _patch_positions(out_h, kh, dh, ph, sh)
    cols, _, ow = _patch_positions(out_w, kw, dw, pw, sw)
    channels = shape[-2] // (kh * kw)
    if len(shape) not in (2, 3) or shape[-2] != channels * kh * kw or shape[-1] != oh * ow:
        raise _Unsupported(f"col2im of patches of shape {list(shape)} to {out_h}x{out_w}")
    source = np.full((out_h + 2 * ph, out_w + 2 * pw), -1, np.int64)
    for ki in range(kh):
        for kj in range(kw):
            at = np.ix_(rows[ki], cols[kj])
            if (source[at] >= 0).any():
                raise _Unsupported("col2im of overlapping patches (they sum)")
            source[at] = (ki * kw + kj) * (oh * ow) + np.arange(oh)[:, None] * ow + np.arange(ow)[None, :]
    source = source[ph:ph + out_h, pw:pw + out_w]
    lead = tuple(shape[:-2]) + (channels,)
    patches = size = kh * kw * oh * ow
    value = _typed(ctx, fx, "reshape", [ctx.value(fx.args[0])], lead + (patches,), "col2im.flat")
    if (source < 0).any():  # pixels no patch covers: 0, from a zero appended to the patches
        zero = ctx.param(_base(fx, "col2im.zero"), np.zeros((1,) * len(lead) + (1,), np.float32))
        ctx.nonneg.add(zero)
        block = _typed(ctx, fx, "expand", [zero], lead + (1,), "col2im.zero_block")
        size = patches + 1
        value = _typed(ctx, fx, "cat", [value, block], lead + (size,), "col2im.padded", {"axis": len(lead)})
        source = np.where(source < 0, patches, source)
    return _taken(ctx, fx, value, lead + (size,), len(lead), source, "col2im")
