"""Handlers that change spatial resolution: pooling (2-D and 1-D, adaptive) and nearest and
linear upsampling."""

from __future__ import annotations

import numpy as np
import torch

from ..ir import TensorType
from .context import _arg, _aten, _base, _Ctx, module_path, _pair, _shape_of, _type_of, _typed, _Unsupported
from .layers import _as_2d
from .tensors import _gathered, _repeated_in_place


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
        return ctx.emit(fx, op, [xv], attrs=attrs, base=f"{module_path(fx) or fx.name}")

    return handler


def _adaptive_avg(ctx: _Ctx, fx: torch.fx.Node) -> str:
    xv = ctx.value(fx.args[0])
    return ctx.emit(fx, "adaptive_avg_pool2d", [xv], attrs={"output_size": _pair(fx.args[1])})


def _max_pool_with_indices(ctx: _Ctx, fx: torch.fx.Node) -> str:
    if any(u.args[1] != 0 for u in fx.users):
        raise _Unsupported("max_pool2d indices are used")
    kernel = _pair(fx.args[1])
    attrs = {"kernel": kernel, "stride": _pair(_arg(fx, 2, "stride"), kernel),
             "padding": _pair(_arg(fx, 3, "padding", 0)), "dilation": _pair(_arg(fx, 4, "dilation", 1)),
             "ceil_mode": bool(_arg(fx, 5, "ceil_mode", False))}
    xv = ctx.value(fx.args[0])
    val = fx.meta["val"][0]
    return ctx.emit(fx, "max_pool2d", [xv], TensorType(tuple(val.shape)), attrs)


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
    """``adaptive_max_pool2d`` / ``adaptive_max_pool1d`` (values; the indices unused) over
    PyTorch's windows ``[floor(i * H / oh), ceil((i + 1) * H / oh))``. Where the sizes divide, one
    max pool whose kernel and stride are the ratio; else, max being separable, each window's max
    along the height (a slice and an amax), concatenated, then along the width: exact either way."""
    one_d = fx.target == _aten.adaptive_max_pool1d.default
    what = "adaptive_max_pool1d" if one_d else "adaptive_max_pool2d"
    if any(u.args[1] != 0 and u.users for u in fx.users):
        raise _Unsupported(f"{what} indices are used")
    shape, xv = _shape_of(fx.args[0]), ctx.value(fx.args[0])
    if len(shape) != (3 if one_d else 4):
        raise _Unsupported(f"{what} of a {len(shape)}-D input (a batch of channels expected)")
    out = TensorType(tuple(int(s) for s in fx.meta["val"][0].shape))
    if one_d:
        xv, shape = _as_2d(ctx, fx, xv, shape), (shape[0], shape[1], 1, shape[2])
    sizes = (1, out.shape[2]) if one_d else out.shape[2:]
    if all(n % k == 0 for n, k in zip(shape[2:], sizes)):
        kernel = tuple(n // k for n, k in zip(shape[2:], sizes))
        attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}
        if not one_d:
            return ctx.emit(fx, "max_pool2d", [xv], out, attrs)
        pooled = _typed(ctx, fx, "max_pool2d", [xv], (*shape[:2], *sizes), "max_pool2d", attrs)
        return ctx.emit(fx, "reshape", [pooled], out, base=_base(fx, what))
    axes = [(axis, n) for axis, n in ((2, sizes[0]), (3, sizes[1])) if shape[axis] != n]
    for axis, n_out in axes:
        n_in = shape[axis]
        if n_out > 64:
            raise _Unsupported(f"{what} from {n_in} to {n_out} positions (windows that overlap: at most 64)")
        pieces = []
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            window = _typed(ctx, fx, "slice", [xv], (*shape[:axis], end - start, *shape[axis + 1:]),
                            f"window{axis}_{i}", {"axis": axis, "start": start, "end": end})
            pieces.append(_typed(ctx, fx, "amax", [window], (*shape[:axis], 1, *shape[axis + 1:]),
                                 f"window{axis}_{i}.max", {"dims": (axis,), "keepdim": True}))
        shape = (*shape[:axis], n_out, *shape[axis + 1:])
        if axis == axes[-1][0] and not one_d:
            return ctx.emit(fx, "cat", pieces, out, {"axis": axis}, base=_base(fx, what))
        xv = _typed(ctx, fx, "cat", pieces, shape, f"windows{axis}", {"axis": axis})
    return ctx.emit(fx, "reshape", [xv], out, base=_base(fx, what))