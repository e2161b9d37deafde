"""Handlers that change spatial resolution: pooling (2-D and 1-D, adaptive) and nearest, linear
and bicubic resizing to any size (torch's ``upsample_*`` ops, which also shrink)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..ir import TensorType
from .context import _arg, _aten, _base, _Ctx, module_path, _pair, _shape_of, _type_of, _typed, _Unsupported
from .layers import _as_2d
from .tensors import _gathered, _index_runs, _repeated_in_place


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


def _nearest_sources(fx: torch.fx.Node, axis: int, size: int, grown: int, scale) -> np.ndarray:
    """The input position torch's nearest (or nearest-exact) kernel reads for each output position
    along one spatial axis: its own kernel run on a probe holding each position's index (float32
    is exact below 2^24), the other spatial axes one long, so its special cases (same size, 2x)
    and float32 index arithmetic are its own."""
    rank = len(_shape_of(fx.args[0])) - 2
    d = axis - 2
    # (two channels: one would make the layout ambiguous, and torch might take its channels-last kernel)
    probe = torch.arange(size, dtype=torch.float32).reshape([1, 1] + [size if a == d else 1 for a in range(rank)])
    probe = probe.expand([1, 2] + list(probe.shape[2:])).contiguous()
    scales = [float(scale) if a == d and scale else None for a in range(rank)]
    out = fx.target.overloadpacket.default(probe, [grown if a == d else 1 for a in range(rank)], *scales)
    return out[0, 0].reshape(-1).numpy().astype(np.int64)


def _upsample_nearest(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.interpolate`` / ``nn.Upsample`` in ``nearest`` or ``nearest-exact`` mode to any size
    (U-Nets, FPNs, generators, a map resized to an input's size): each output position reads
    the input position torch's own index arithmetic picks (``_nearest_sources``). Where every
    axis picks ``dst // factor``, each element is repeated in place, as ``_repeat`` does it (a
    size-1 axis after each spatial axis, expanded to the factor, merged back); otherwise each
    resized axis is gathered at its positions (slices, or one ``take``). Data movement, exact."""
    shape, out = _shape_of(fx.args[0]), _type_of(fx).shape
    scales = _arg(fx, 2, "scale_factors", None)
    sources = {}
    for d, (size, grown) in enumerate(zip(shape[2:], out[2:])):
        scale = scales[d] if scales and scales[d] > 0 else None
        index = _nearest_sources(fx, 2 + d, size, grown, scale)
        if grown != size or not np.array_equal(index, np.arange(size)):  # (a 3-D kernel moves a kept size)
            sources[2 + d] = index
    repeats = all(grown % size == 0 and np.array_equal(sources[2 + d], np.arange(grown) // (grown // size))
                  for d, (size, grown) in enumerate(zip(shape[2:], out[2:])) if 2 + d in sources)
    value = ctx.value(fx.args[0])
    if repeats:
        return _repeated_in_place(ctx, fx, value, shape, (1, 1, *(g // s for s, g in zip(shape[2:], out[2:]))),
                                  "upsample")
    shape = list(shape)
    for axis, index in sorted(sources.items(), reverse=True):
        value = _index_runs(ctx, fx, value, shape, axis, index, "upsample")
        shape[axis] = len(index)
    return value


_MAX_PHASES = 16  # whole factors gathered phase by phase (a cat of that many); larger: one take


@functools.cache
def _torch_fuses_source_index() -> bool:
    """Whether this torch's linear resize computes the half-pixel position ``ratio * (i + 0.5) -
    0.5`` as one FMA (its x86 builds with AVX2 or AVX-512 kernels, and its arm builds, contract
    it; a build without FMA rounds twice): read off its kernel at a position where the two
    differ, 67 -> 40 positions, output 38 (input 64's weight 0.98749924 fused, 0.9874954 not)."""
    one_hot = torch.zeros(1, 1, 67)
    one_hot[0, 0, 64] = 1.0
    weight = torch.nn.functional.interpolate(one_hot, size=40, mode="linear")[0, 0, 38].item()
    return np.float32(weight) == np.float32(0.98749924)


def _source_positions(size: int, grown: int, scale, align_corners: bool) -> np.ndarray:
    """torch's float32 source position of each output position (``area_pixel_compute_scale``,
    ``area_pixel_compute_source_index`` before the linear modes' clamp at 0): with aligned
    corners the ends map onto the ends, the ratio ``(size - 1) / (grown - 1)``; without, pixel
    centres, the ratio the given scale's inverse or ``size / grown``."""
    if align_corners:
        ratio = np.float32(size - 1) / np.float32(grown - 1) if grown > 1 else np.float32(0)
        return np.arange(grown, dtype=np.float32) * ratio
    ratio = np.float32(1.0 / scale) if scale else np.float32(size) / np.float32(grown)
    if _torch_fuses_source_index():  # one rounding: float64 (exact product and difference), float32
        return (np.float64(ratio) * (np.arange(grown) + 0.5) - 0.5).astype(np.float32)
    return (np.arange(grown, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5)


def _linear_weights(size: int, grown: int, scale, align_corners: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's source indices and weights of linear resampling, per output position, in its
    float32 arithmetic (``_source_positions``, positions before the first pixel centre clamped
    to it, then ``guard_index_and_lambda``; tested against its kernel)."""
    real = _source_positions(size, grown, scale, align_corners)
    if not align_corners:
        real = np.maximum(real, np.float32(0))
    first = np.minimum(np.floor(real).astype(np.int64), size - 1)
    second = first + (first < size - 1)
    lam = np.clip(real - first.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return first, second, (np.float32(1) - lam).astype(np.float32), lam


def _upsample_linear(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.interpolate`` in ``linear`` / ``bilinear`` / ``trilinear`` mode to any size, corners
    aligned or not (segmentation heads, U-Nets, a map resized to an input's size): along each
    spatial axis, the last first as torch nests them, ``x[i0] * w0 + x[i1] * w1`` with torch's
    own float32 indices and weights. By a whole factor without aligned corners the gathers are
    per phase of the factor (output positions ``f*j + k``): a shifted copy, a few slices,
    interleaved by a cat on a new axis; otherwise each is gathered at its positions (slices, or
    one ``take``). Every runtime runs the same float32 multiplies and adds (PyTorch's kernel may
    fuse them: float tolerance there)."""
    align_corners = bool(_arg(fx, 2, "align_corners", False))
    shape, out = list(_shape_of(fx.args[0])), _type_of(fx).shape
    scales = _arg(fx, 3, "scale_factors", None)
    value = ctx.value(fx.args[0])
    for d in reversed(range(len(shape) - 2)):
        axis, size, grown = 2 + d, shape[2 + d], out[2 + d]
        if grown == size:  # torch copies an axis it does not resize, whatever the scale
            continue
        scale = scales[d] if scales and scales[d] > 0 else None
        first, second, w0, w1 = _linear_weights(size, grown, scale, align_corners)
        phased = not align_corners and grown % size == 0 and grown // size <= _MAX_PHASES
        terms = []
        for index, weight, what in ((first, w0, "near"), (second, w1, "far")):
            grown_shape = shape[:axis] + [grown] + shape[axis + 1:]
            if phased:
                factor = grown // size
                phases = [_gathered(ctx, fx, value, shape, axis, index[k::factor], f"upsample.{what}")
                          for k in range(factor)]
                split = shape[:axis + 1] + [1] + shape[axis + 1:]
                stacked = _typed(ctx, fx, "cat",
                                 [_typed(ctx, fx, "reshape", [p], split, "upsample.phase") for p in phases],
                                 shape[:axis + 1] + [factor] + shape[axis + 1:], f"upsample.{what}s",
                                 {"axis": axis + 1})
                gathered = _typed(ctx, fx, "reshape", [stacked], grown_shape, f"upsample.{what}")
            else:
                gathered = _index_runs(ctx, fx, value, shape, axis, index, f"upsample.{what}")
            w = ctx.param(_base(fx, f"upsample.{what}_weight"),
                          weight.reshape([grown if a == axis else 1 for a in range(len(shape))]))
            ctx.nonneg.add(w)
            terms.append(_typed(ctx, fx, "mul", [gathered, w], grown_shape, f"upsample.{what}_term"))
        shape[axis] = grown
        value = _typed(ctx, fx, "add", terms, shape, "upsample")
    return value


def _cubic_taps(fx: torch.fx.Node, axis: int, size: int, grown: int, scale, align_corners: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """The four input positions and weights of torch's bicubic resampling (``A = -0.75``) per
    output position along one spatial axis, ``[4, grown]`` each. Positions as its kernel computes
    them (``area_pixel_compute_source_index`` without the clamp at 0, taps clamped into the
    axis); weights read off its kernel: five probes, each 1 at the positions of one residue
    modulo 5, so each output's four consecutive taps read one probe each (border taps clamped
    onto one position come out summed, and capture takes them as one tap, the rest weight 0)."""
    first = np.floor(_source_positions(size, grown, scale, align_corners)).astype(np.int64)
    index = np.clip(first[None, :] - 1 + np.arange(4)[:, None], 0, size - 1)
    d = axis - 2
    combs = (np.arange(size)[None, :] % 5 == np.arange(5)[:, None]).astype(np.float32)
    probe = torch.from_numpy(combs).reshape([5, 1] + [size if a == d else 1 for a in range(2)])
    scales = [float(scale) if a == d and scale else None for a in range(2)]
    out = fx.target.overloadpacket.default(probe, [grown if a == d else 1 for a in range(2)], align_corners, *scales)
    probed = out.reshape(5, grown).numpy()
    weight = probed[index % 5, np.arange(grown)[None, :]].astype(np.float32)
    repeated = np.zeros_like(index, dtype=bool)
    repeated[1:] = (index[1:] == index[:-1])  # (clamped taps are consecutive)
    weight[repeated] = 0
    return index, weight


def _upsample_bicubic(ctx: _Ctx, fx: torch.fx.Node) -> str:
    """``F.interpolate(mode="bicubic")`` to any size, corners aligned or not (super-resolution
    nets add it to their output): along the width, then the height, as torch nests them,
    ``((x[i0] w0 + x[i1] w1) + x[i2] w2) + x[i3] w3`` with torch's own positions and weights
    (``_cubic_taps``), gathered by slices or a ``take``. Unlike the linear modes, torch's bicubic
    kernel resamples an axis it keeps under a scale factor; an axis it leaves is skipped."""
    align_corners = bool(_arg(fx, 2, "align_corners", False))
    shape, out = list(_shape_of(fx.args[0])), _type_of(fx).shape
    scales = _arg(fx, 3, "scale_factors", None)
    value = ctx.value(fx.args[0])
    for d in (1, 0):
        axis, size, grown = 2 + d, shape[2 + d], out[2 + d]
        index, weight = _cubic_taps(fx, axis, size, grown, scales[d] if scales and scales[d] > 0 else None,
                                    align_corners)
        if grown == size and np.array_equal(index[1], np.arange(size)) and (weight[1] == 1).all():
            continue
        grown_shape = shape[:axis] + [grown] + shape[axis + 1:]
        total = None
        for k in range(4):
            if not weight[k].any():
                continue
            gathered = _index_runs(ctx, fx, value, shape, axis, index[k], f"bicubic.tap{k}")
            w = ctx.param(_base(fx, f"bicubic.tap{k}_weight"),
                          weight[k].reshape([grown if a == axis else 1 for a in range(len(shape))]))
            term = _typed(ctx, fx, "mul", [gathered, w], grown_shape, f"bicubic.tap{k}_term")
            total = term if total is None else _typed(ctx, fx, "add", [total, term], grown_shape, "bicubic")
        shape[axis] = grown
        value = total
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