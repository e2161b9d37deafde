"""GPU glue kernels of the CUDA target: everything around the quantized products.

Same builder names, arguments and PrimFunc parameter orders as the CPU glue
(``csqc.targets.llvm.glue``).  Each builder writes its computation with ``te.compute`` (or a
TOPI compute), then schedules it with TVM's default GPU rules (``tvm.s_tir.dlight``: Matmul,
GEMV, Reduction, GeneralReduction, then Fallback, which binds any remaining block one output
per thread).  ``compute_only=True`` returns the unscheduled PrimFunc (the tests build it for
LLVM and compare it with the interpreter).

Float semantics follow ``csqc.interpreter`` operation by operation (float32, no fused
multiply-add: the target compiles device code with ``-fmad=false``), e.g. quantization is
``nearbyint((|x| * L) / s)`` (round half to even, like numpy) and the epilogue is
``((float(acc - acc_neg) * S) / L) * mult[c] + add[c]`` followed by the activation.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import tvm
from tvm import te, tirx, topi

from csqc.numerics import adaptive_bounds, pool_output_size
from csqc.targets.tvm.geometry import conv_geometry

__all__ = [
    "gpu_schedule",
    "quantize",
    "quantize_asymmetric",
    "dequantize",
    "epilogue",
    "conv2d_f32",
    "linear_f32",
    "channel_affine",
    "unary",
    "binary",
    "select",
    "broadcast",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "mean",
    "amax",
    "softmax",
    "concat",
    "slice_axis",
    "transpose",
    "matmul",
    "layer_norm",
    "gelu",
    "embedding",
    "take",
]

log = logging.getLogger(__name__)

_F32 = "float32"
# Schedules are target independent up to the warp size and thread limits shared by sm_70..sm_90.
_SCHEDULE_TARGET = {"kind": "cuda", "arch": "sm_80"}


# --------------------------------------------------------------------------------------------
# Scheduling
# --------------------------------------------------------------------------------------------
def gpu_schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Apply the default GPU rules of ``tvm.s_tir.dlight`` to a compute-only PrimFunc."""
    import tvm.s_tir.dlight as dl

    mod = tvm.IRModule({"main": func})
    with tvm.target.Target(_SCHEDULE_TARGET):
        mod = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
        )(mod)
    return mod["main"]


def _builder(fn=None, *, schedule=None):
    """Builders return the scheduled PrimFunc (``schedule``, default :func:`gpu_schedule`), or
    the compute alone with ``compute_only=True``."""
    if fn is None:
        return functools.partial(_builder, schedule=schedule)

    @functools.wraps(fn)
    def build(*args, compute_only: bool = False, **kwargs):
        func = te.create_prim_func(fn(*args, **kwargs))
        return func if compute_only else (schedule or gpu_schedule)(func)

    return build


def _schedule_tensor_reduction(sch, name: str) -> None:
    """Block ``name`` (one value: a tensor-wide reduction, or a scalar) as one block of up to
    1024 threads: in-thread partial results, then a cross-thread reduction through warp
    shuffles and shared memory. (dlight's fallback would leave it to a single thread.)"""
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    if len(loops) > 1:  # a reduction: loops are (i, reduction axes...)
        reduction = sch.fuse(*loops[1:]) if len(loops) > 2 else loops[1]
        threads = min(1024, 1 << max(0, int(sch.get(reduction).extent) - 1).bit_length())
        _, inner = sch.split(reduction, [None, threads])
        sch.bind(loops[0], "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    else:
        sch.bind(loops[0], "threadIdx.x")


def _schedule_quantize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The tensor-wide ``max|x|`` (:func:`_schedule_tensor_reduction`), or an asymmetric
    quantizer's min and max and the scalars from them; codes one per thread."""
    import tvm.s_tir as s_tir

    from .kernels import schedule_pointwise

    sch = s_tir.Schedule(func)
    for name in ("scale", "low", "high", "zero_point_value", "zero_point"):
        try:
            sch.get_sblock(name)
        except Exception:  # a symmetric quantizer has only its scale; a static one no min / max
            continue
        _schedule_tensor_reduction(sch, name)
    for name in ("codes", "codes_neg"):
        try:
            block = sch.get_sblock(name)
        except Exception:  # unsigned quantizer: no codes_neg stage
            continue
        schedule_pointwise(sch, block)
    return sch.mod["main"]


def _f32(value: float):
    return tirx.const(float(np.float32(value)), _F32)


def _activation(value, act: str, lo: float, hi: float):
    """relu / clip, a NaN kept (as numpy and the CPU kernels do: an overflow reaches the checks)."""
    if act == "relu":
        return tirx.Select(tirx.isnan(value), value, tirx.max(value, _f32(0.0)))
    if act == "clip":
        return tirx.Select(tirx.isnan(value), value, tirx.min(tirx.max(value, _f32(lo)), _f32(hi)))
    if act in ("none", None):
        return value
    raise ValueError(f"unknown activation {act!r}")


def _channel_index(index, axis: int):
    return index[axis]


def _normalize_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------
@_builder(schedule=_schedule_quantize)
def quantize(shape, bits: int, static_scale: float, signed: bool):
    """``main(x: f32[shape], scale: f32[1], codes: u8[shape][, codes_neg: u8[shape]])``.

    ``s`` is ``static_scale`` when > 0, else ``max|x|``; magnitudes are
    ``nearbyint((|x| * L) / s)`` (clamped to ``L`` with a static scale), 0 when ``s == 0``.
    ``codes`` holds the magnitudes of positive values, ``codes_neg`` those of negative values
    (an unsigned quantizer maps negative inputs to 0).
    """
    shape = tuple(int(d) for d in shape)
    levels = _f32(2**bits - 1)
    x = te.placeholder(shape, _F32, name="x")
    if static_scale > 0:
        scale = te.compute((1,), lambda _: _f32(static_scale), name="scale")
    else:
        axes = [te.reduce_axis((0, d), f"r{i}") for i, d in enumerate(shape)]
        scale = te.compute((1,), lambda _: te.max(tirx.abs(x[tuple(axes)]), axis=axes), name="scale")

    def magnitude(index):
        s = scale[0]
        mag = tirx.nearbyint((tirx.abs(x[index]) * levels) / s)
        if static_scale > 0:
            mag = tirx.min(mag, levels)
        return tirx.Select(s > _f32(0.0), mag, _f32(0.0))

    pos = te.compute(shape, lambda *i: tirx.Select(x[i] > _f32(0.0), magnitude(i), _f32(0.0)).astype("uint8"),
                     name="codes")
    outs = [x, scale, pos]
    if signed:
        outs.append(te.compute(shape, lambda *i: tirx.Select(x[i] < _f32(0.0), magnitude(i), _f32(0.0))
                               .astype("uint8"), name="codes_neg"))
    return outs


@_builder(schedule=_schedule_quantize)
def quantize_asymmetric(shape, bits: int, static_scale: float, zero_point: int, centered: bool = False):
    """``main(x: f32[shape], scale: f32[1], zero_point: i32[1], codes: u8[shape][, codes_neg])``:
    the interpreter's ``_quantize_asymmetric``, as the CPU kernel (``llvm.glue.quantize_asymmetric``)
    lays it out. ``scale`` is ``R`` (static, or ``max(max x, 0) - min(min x, 0)``), the zero point
    ``zp`` (static, or ``round((-lo * L) / R)``), the codes ``u = clamp(round((x * L) / R) + zp, 0,
    L)`` (0 where ``R == 0``), or, ``centered``, the magnitudes of ``u - zp`` where it is positive
    (codes) / negative (codes_neg): signed symmetric codes' layout, which every GPU kernel reads
    (the target keeps sign parts: no layer takes ``u`` and ``zp`` apart). Float32 throughout, the
    divisions IEEE (nvcc's default ``-prec-div=true``), ``rintf`` half to even."""
    shape = tuple(int(d) for d in shape)
    levels = _f32(2**bits - 1)
    zero = _f32(0.0)
    x = te.placeholder(shape, _F32, name="x")
    if static_scale > 0:
        scale = te.compute((1,), lambda _: _f32(static_scale), name="scale")
        zp = te.compute((1,), lambda _: _f32(int(zero_point)), name="zero_point_value")
    else:
        lo_axes = [te.reduce_axis((0, d), f"lo{i}") for i, d in enumerate(shape)]
        hi_axes = [te.reduce_axis((0, d), f"hi{i}") for i, d in enumerate(shape)]
        low = te.compute((1,), lambda _: te.min(x[tuple(lo_axes)], axis=lo_axes), name="low")
        high = te.compute((1,), lambda _: te.max(x[tuple(hi_axes)], axis=hi_axes), name="high")
        scale = te.compute((1,), lambda _: tirx.max(high[0], zero) - tirx.min(low[0], zero), name="scale")
        zp = te.compute((1,), lambda _: tirx.Select(
            scale[0] > zero, tirx.nearbyint((-tirx.min(low[0], zero) * levels) / scale[0]), zero), name="zero_point_value")
    zp_int = te.compute((1,), lambda _: zp[0].astype("int32"), name="zero_point")

    def code(index):
        u = tirx.min(tirx.max(tirx.nearbyint((x[index] * levels) / scale[0]) + zp[0], zero), levels)
        return tirx.Select(scale[0] > zero, u, zero)

    if not centered:
        return [x, scale, zp_int, te.compute(shape, lambda *i: code(i).astype("uint8"), name="codes")]
    pos = te.compute(shape, lambda *i: tirx.max(code(i) - zp[0], zero).astype("uint8"), name="codes")
    neg = te.compute(shape, lambda *i: tirx.max(zp[0] - code(i), zero).astype("uint8"), name="codes_neg")
    return [x, scale, zp_int, pos, neg]


@_builder
def dequantize(shape, bits: int, signed: bool):
    """``main(codes: u8[shape][, codes_neg], scale: f32[1], y: f32[shape])``:
    ``(float(codes - codes_neg) * s) / L``."""
    shape = tuple(int(d) for d in shape)
    pos = te.placeholder(shape, "uint8", name="codes")
    neg = te.placeholder(shape, "uint8", name="codes_neg") if signed else None
    scale = te.placeholder((1,), _F32, name="scale")

    def value(*i):
        code = pos[i].astype("int32") - (neg[i].astype("int32") if signed else 0)
        return (code.astype(_F32) * scale[0]) / _f32(2**bits - 1)

    y = te.compute(shape, value, name="y")
    return [pos] + ([neg] if signed else []) + [scale, y]


@_builder
def epilogue(shape, channel_axis: int, levels: int | None, act: str, clip_lo: float, clip_hi: float,
             has_add: bool, acc_dtype: str, has_neg: bool):
    """``main(acc[, acc_neg][, scale: f32[1]], mult: f32[C][, add: f32[C]], y: f32[shape])``:
    ``((float(acc - acc_neg) * S) / L) * mult[c] + add[c]``, then the activation (without
    ``levels`` the accumulator is already float: ``acc * mult[c] + add[c]``)."""
    shape = tuple(int(d) for d in shape)
    axis = _normalize_axis(channel_axis, len(shape))
    channels = shape[axis]
    acc = te.placeholder(shape, acc_dtype, name="acc")
    acc_neg = te.placeholder(shape, acc_dtype, name="acc_neg") if has_neg else None
    scale = te.placeholder((1,), _F32, name="scale") if levels is not None else None
    mult = te.placeholder((channels,), _F32, name="mult")
    add = te.placeholder((channels,), _F32, name="add") if has_add else None

    def value(*i):
        total = acc[i] - acc_neg[i] if has_neg else acc[i]
        v = total.astype(_F32)
        if levels is not None:
            v = (v * scale[0]) / _f32(levels)
        v = v * mult[i[axis]]
        if has_add:
            v = v + add[i[axis]]
        return _activation(v, act, clip_lo, clip_hi)

    y = te.compute(shape, value, name="y")
    params = [acc] + ([acc_neg] if has_neg else []) + ([scale] if scale is not None else []) + [mult]
    return params + ([add] if has_add else []) + [y]


# --------------------------------------------------------------------------------------------
# Float layers
# --------------------------------------------------------------------------------------------
def _schedule_per_output(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One output per thread, its products (its group's channels times the taps) serial in the
    thread, the padding inlined; then the activation, one element per thread. dlight's rules
    gave a float conv's outputs a thread block each, whose threads split the reduction: a
    224x224 stem's 147 products an output over 256 threads, 802,816 blocks; on small convs
    (grouped, depthwise, or 4 outputs of 18 products) that mapping failed to build or asserted."""
    import tvm.s_tir as s_tir

    from .kernels import schedule_pointwise

    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("x_padded"))
    schedule_pointwise(sch, sch.get_sblock("conv"))
    schedule_pointwise(sch, sch.get_sblock("y"))
    return sch.mod["main"]


def conv2d_f32(input_shape, weight_shape, stride, padding, dilation, groups: int, has_bias: bool,
               act: str, lo: float, hi: float, compute_only: bool = False) -> tirx.PrimFunc:
    """``main(x: f32[B, C, H, W], w: f32[O, C/g, kh, kw][, bias: f32[O]], y: f32[B, O, OH, OW])``,
    one output a thread (:func:`_schedule_per_output`)."""
    func = te.create_prim_func(_conv2d_f32_tensors(input_shape, weight_shape, stride, padding, dilation, groups,
                                                   has_bias, act, lo, hi))
    return func if compute_only else _schedule_per_output(func)


def _conv2d_f32_tensors(input_shape, weight_shape, stride, padding, dilation, groups: int, has_bias: bool,
                        act: str, lo: float, hi: float):
    geo = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    (sh, sw), (dh, dw), (ph, pw) = geo.stride, geo.dilation, geo.padding
    x = te.placeholder(tuple(int(d) for d in input_shape), _F32, name="x")
    w = te.placeholder(tuple(int(d) for d in weight_shape), _F32, name="w")
    bias = te.placeholder((geo.out_channels,), _F32, name="bias") if has_bias else None
    xpad = topi.nn.pad(x, [0, 0, ph, pw], [0, 0, ph, pw], 0.0, name="x_padded")
    c = te.reduce_axis((0, geo.in_per_group), "c")
    r, s = te.reduce_axis((0, geo.kernel_h), "r"), te.reduce_axis((0, geo.kernel_w), "s")
    conv = te.compute(
        (geo.batch, geo.out_channels, geo.out_h, geo.out_w),
        lambda n, o, oh, ow: te.sum(
            xpad[n, o // geo.out_per_group * geo.in_per_group + c, oh * sh + r * dh, ow * sw + s * dw] * w[o, c, r, s],
            axis=[c, r, s]),
        name="conv")
    y = te.compute(conv.shape, lambda n, o, oh, ow: _activation(
        conv[n, o, oh, ow] + bias[o] if has_bias else conv[n, o, oh, ow], act, lo, hi), name="y")
    return [x, w] + ([bias] if has_bias else []) + [y]


@_builder
def linear_f32(M: int, K: int, N: int, has_bias: bool, act: str, lo: float, hi: float):
    """``main(x: f32[M, K], w: f32[N, K][, bias: f32[N]], y: f32[M, N])``."""
    x = te.placeholder((M, K), _F32, name="x")
    w = te.placeholder((N, K), _F32, name="w")
    bias = te.placeholder((N,), _F32, name="bias") if has_bias else None
    k = te.reduce_axis((0, K), "k")
    mm = te.compute((M, N), lambda m, n: te.sum(x[m, k] * w[n, k], axis=k), name="matmul")
    y = te.compute((M, N), lambda m, n: _activation(mm[m, n] + bias[n] if has_bias else mm[m, n], act, lo, hi),
                   name="y")
    return [x, w] + ([bias] if has_bias else []) + [y]


# --------------------------------------------------------------------------------------------
# Elementwise
# --------------------------------------------------------------------------------------------
@_builder
def channel_affine(shape, axis: int):
    """``main(x, mult: f32[C], add: f32[C], y)``: ``x * mult[c] + add[c]``."""
    shape = tuple(int(d) for d in shape)
    axis = _normalize_axis(axis, len(shape))
    x = te.placeholder(shape, _F32, name="x")
    mult = te.placeholder((shape[axis],), _F32, name="mult")
    add = te.placeholder((shape[axis],), _F32, name="add")
    y = te.compute(shape, lambda *i: x[i] * mult[i[axis]] + add[i[axis]], name="y")
    return [x, mult, add, y]


def _relu6(value):
    return tirx.min(tirx.max(value, _f32(0.0)), _f32(6.0))


_UNARY = {
    "relu": lambda v, lo, hi: _activation(v, "relu", lo, hi),
    "clip": lambda v, lo, hi: _activation(v, "clip", lo, hi),
    # the interpreter's 1 / (1 + exp(-x)); CUDA's expf / tanhf are within a few ulp of numpy's
    "sigmoid": lambda v, lo, hi: _f32(1.0) / (_f32(1.0) + tirx.exp(-v)),
    "tanh": lambda v, lo, hi: tirx.tanh(v),
    # vision activations, in csqc.numerics' float32 order
    "hardsigmoid": lambda v, lo, hi: _relu6(v + _f32(3.0)) / _f32(6.0),
    "hardswish": lambda v, lo, hi: (v * _relu6(v + _f32(3.0))) / _f32(6.0),
    "silu": lambda v, lo, hi: v * (_f32(1.0) / (_f32(1.0) + tirx.exp(-v))),
    "sqrt": lambda v, lo, hi: tirx.sqrt(v),  # sqrtf: correctly rounded (nvcc's default -prec-sqrt=true)
    "exp": lambda v, lo, hi: tirx.exp(v),  # expf, logf: within an ulp or two (no --use_fast_math)
    "log": lambda v, lo, hi: tirx.log(v),
    "erf": lambda v, lo, hi: tirx.erf(v),  # erff, as gelu's
    "sin": lambda v, lo, hi: tirx.sin(v),  # sinf, cosf (not __sinf: no --use_fast_math)
    "cos": lambda v, lo, hi: tirx.cos(v),
}


@_builder
def unary(op: str, shape, lo: float = 0.0, hi: float = 0.0):
    """``main(x, y)`` for ``relu``, ``clip`` (to ``[lo, hi]``), ``sigmoid``, ``tanh``, ``hardsigmoid``,
    ``hardswish`` or ``silu``."""
    if op not in _UNARY:
        raise ValueError(f"unknown unary op {op!r}")
    x = te.placeholder(tuple(int(d) for d in shape), _F32, name="x")
    y = te.compute(x.shape, lambda *i: _UNARY[op](x[i], lo, hi), name="y")
    return [x, y]


def _broadcast_index(index, in_shape, out_shape):
    """Index into an operand of ``in_shape`` broadcast (numpy rules) to ``out_shape``."""
    offset = len(out_shape) - len(in_shape)
    return tuple(0 if int(d) == 1 and int(out_shape[offset + a]) != 1 else index[offset + a]
                 for a, d in enumerate(in_shape))


@_builder
def binary(op: str, a_shape, b_shape, out_shape):
    """``main(a, b, y)`` for ``add``, ``mul``, ``minimum`` or ``sub`` with numpy broadcasting."""
    fn = {"add": lambda u, v: u + v, "mul": lambda u, v: u * v, "minimum": tirx.min,
          "sub": lambda u, v: u - v, "div": lambda u, v: u / v}.get(op)
    if fn is None:
        raise ValueError(f"unknown binary op {op!r}")
    a_shape, b_shape, out_shape = (tuple(int(d) for d in s) for s in (a_shape, b_shape, out_shape))
    a = te.placeholder(a_shape, _F32, name="a")
    b = te.placeholder(b_shape, _F32, name="b")
    y = te.compute(out_shape, lambda *i: fn(a[_broadcast_index(i, a_shape, out_shape)],
                                            b[_broadcast_index(i, b_shape, out_shape)]), name="y")
    return [a, b, y]


@_builder
def select(c_shape, a_shape, b_shape, out_shape):
    """``main(c, a, b, y)``: ``y = c != 0 ? a : b`` with numpy broadcasting (the branch not taken
    is not read into the result)."""
    shapes = [tuple(int(d) for d in s) for s in (c_shape, a_shape, b_shape)]
    out_shape = tuple(int(d) for d in out_shape)
    c, a, b = (te.placeholder(shape, _F32, name=name) for shape, name in zip(shapes, "cab"))
    y = te.compute(out_shape, lambda *i: tirx.Select(c[_broadcast_index(i, shapes[0], out_shape)] != 0.0,
                                                     a[_broadcast_index(i, shapes[1], out_shape)],
                                                     b[_broadcast_index(i, shapes[2], out_shape)]), name="y")
    return [c, a, b, y]


@_builder
def broadcast(in_shape, out_shape):
    """``main(x, y)``: ``x`` broadcast (numpy rules) to ``out_shape``."""
    in_shape, out_shape = (tuple(int(d) for d in s) for s in (in_shape, out_shape))
    x = te.placeholder(in_shape, _F32, name="x")
    y = te.compute(out_shape, lambda *i: x[_broadcast_index(i, in_shape, out_shape)], name="y")
    return [x, y]


@_builder
def embedding(rows: int, dim: int, ids_shape, ids_dtype: str):
    """``main(table, ids, y)``: ``y[..., d] = table[ids[...], d]``. Ids are clamped into the
    table (memory safety); the runtime refuses ids outside it before the call."""
    ids_shape = tuple(int(d) for d in ids_shape)
    table = te.placeholder((int(rows), int(dim)), _F32, name="table")
    ids = te.placeholder(ids_shape, ids_dtype, name="ids")

    def row(*i):
        return tirx.Min(tirx.Max(ids[i[:-1]], tirx.const(0, ids_dtype)), tirx.const(int(rows) - 1, ids_dtype))

    y = te.compute(ids_shape + (int(dim),), lambda *i: table[row(*i), i[-1]], name="y")
    return [table, ids, y]


@_builder
def take(shape, axis: int, index_shape):
    """``main(x, index, y)``: ``y = take(x, index, axis)``, the positions of the int32 ``index``
    (any shape) along ``axis``, clamped into it (memory safety; the IR verifier refuses an index
    outside it first)."""
    shape, index_shape = tuple(int(d) for d in shape), tuple(int(d) for d in index_shape)
    axis = _normalize_axis(axis, len(shape))
    x = te.placeholder(shape, _F32, name="x")
    index = te.placeholder(index_shape, "int32", name="index")
    r = len(index_shape)

    def pick(*i):
        at = tirx.Min(tirx.Max(index[i[axis:axis + r]], tirx.const(0, "int32")), tirx.const(shape[axis] - 1, "int32"))
        return x[i[:axis] + (at,) + i[axis + r:]]

    y = te.compute(shape[:axis] + index_shape + shape[axis + 1:], pick, name="y")
    return [x, index, y]


# --------------------------------------------------------------------------------------------
# Pooling and reductions
# --------------------------------------------------------------------------------------------
def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def _pool_geometry(shape, kernel, stride, padding, dilation, ceil_mode: bool = False):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel, stride, padding, dilation))
    b, c, h, w = map(int, shape)
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)  # PyTorch's rule (csqc.numerics)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    return (b, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow)


def _padded(x, geometry, fill: float):
    """``x`` padded by the pooling padding, plus on the bottom/right whatever ceil_mode windows
    reach past it (those cells hold ``fill``: -inf never wins a max, 0 never changes a sum)."""
    (_, _, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = geometry
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    return topi.nn.pad(x, [0, 0, ph, pw], [0, 0, ph + extra_h, pw + extra_w], fill, name="x_padded")


@_builder
def max_pool2d(shape, kernel, stride, padding, dilation=(1, 1), ceil_mode: bool = False):
    """``main(x: f32[B, C, H, W], y)``: window maximum (padding is -inf)."""
    geometry = _pool_geometry(shape, kernel, stride, padding, dilation, ceil_mode)
    (b, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = geometry
    x = te.placeholder((b, c, h, w), _F32, name="x")
    xpad = _padded(x, geometry, -np.inf)
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    y = te.compute((b, c, oh, ow), lambda n, ch, i, j: te.max(
        xpad[n, ch, i * sh + r * dh, j * sw + s * dw], axis=[r, s]), name="y")
    return [x, y]


@_builder
def avg_pool2d(shape, kernel, stride, padding, count_include_pad: bool = True, divisor: int = 0,
               ceil_mode: bool = False):
    """``main(x, y)``: window sum / ``divisor`` (or ``kh*kw``, or the window's size clipped to
    the padded input (ceil_mode windows running past it) or, padding excluded, to the input)."""
    geometry = _pool_geometry(shape, kernel, stride, padding, 1, ceil_mode)
    (b, c, h, w), (kh, kw), (sh, sw), (ph, pw), _, (oh, ow) = geometry
    x = te.placeholder((b, c, h, w), _F32, name="x")
    xpad = _padded(x, geometry, 0.0)
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    total = te.compute((b, c, oh, ow), lambda n, ch, i, j: te.sum(xpad[n, ch, i * sh + r, j * sw + s], axis=[r, s]),
                       name="window_sum")
    clipped = not divisor and (ceil_mode or (not count_include_pad and (ph or pw)))
    pad_h, pad_w = (ph, pw) if count_include_pad else (0, 0)

    def count(i, j):
        rows = tirx.min(i * sh - ph + kh, h + pad_h) - tirx.max(i * sh - ph, -pad_h)
        cols = tirx.min(j * sw - pw + kw, w + pad_w) - tirx.max(j * sw - pw, -pad_w)
        return (rows * cols).astype(_F32)

    y = te.compute((b, c, oh, ow), lambda n, ch, i, j: total[n, ch, i, j] / (
        count(i, j) if clipped else _f32(divisor or kh * kw)), name="y")
    return [x, y]


@_builder
def adaptive_avg_pool2d(shape, output_size):
    """``main(x, y)``: mean over PyTorch's windows ``[floor(i*H/OH), ceil((i+1)*H/OH))``."""
    b, c, h, w = map(int, shape)
    oh, ow = _pair(output_size)
    if h % oh or w % ow:
        return _uneven_adaptive_avg_pool2d(b, c, h, w, oh, ow)
    fh, fw = h // oh, w // ow
    x = te.placeholder((b, c, h, w), _F32, name="x")
    r, s = te.reduce_axis((0, fh), "r"), te.reduce_axis((0, fw), "s")
    total = te.compute((b, c, oh, ow), lambda n, ch, i, j: te.sum(x[n, ch, i * fh + r, j * fw + s], axis=[r, s]),
                       name="window_sum")
    y = te.compute(total.shape, lambda *i: total[i] / _f32(fh * fw), name="y")
    return [x, y]


def _uneven_adaptive_avg_pool2d(b: int, c: int, h: int, w: int, oh: int, ow: int):
    """Windows of varying size: a sum over the largest window's extent in which taps outside
    the output's own window add 0, then one division by the window's size."""
    kh = max(e - s for s, e in adaptive_bounds(h, oh))
    kw = max(e - s for s, e in adaptive_bounds(w, ow))
    x = te.placeholder((b, c, h, w), _F32, name="x")
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")

    def bounds(i, size: int, out: int):
        return (i * size) // out, ((i + 1) * size + out - 1) // out

    def window_sum(n, ch, i, j):
        (h0, h1), (w0, w1) = bounds(i, h, oh), bounds(j, w, ow)
        row, col = tirx.min(h0 + r, h - 1), tirx.min(w0 + s, w - 1)  # always in range
        inside = tirx.all(h0 + r < h1, w0 + s < w1)
        return te.sum(tirx.if_then_else(inside, x[n, ch, row, col], _f32(0.0)), axis=[r, s])

    total = te.compute((b, c, oh, ow), window_sum, name="window_sum")

    def mean(n, ch, i, j):
        (h0, h1), (w0, w1) = bounds(i, h, oh), bounds(j, w, ow)
        return total[n, ch, i, j] / ((h1 - h0) * (w1 - w0)).astype(_F32)

    return [x, te.compute(total.shape, mean, name="y")]


@_builder
def mean(shape, dims: Sequence[int], keepdim: bool):
    """``main(x, y)``: mean over ``dims``."""
    return _reduction(shape, dims, keepdim, "mean")


@_builder
def amax(shape, dims: Sequence[int], keepdim: bool):
    """``main(x, y)``: max over ``dims`` (exact in any order)."""
    return _reduction(shape, dims, keepdim, "max")


def _reduction(shape, dims: Sequence[int], keepdim: bool, kind: str):
    shape = tuple(int(d) for d in shape)
    dims = sorted(_normalize_axis(int(d), len(shape)) for d in dims)
    x = te.placeholder(shape, _F32, name="x")
    axes = {d: te.reduce_axis((0, shape[d]), f"r{d}") for d in dims}
    kept = [a for a in range(len(shape)) if a not in axes]
    out_shape = tuple(1 if a in axes else shape[a] for a in range(len(shape))) if keepdim else tuple(shape[a] for a in kept)

    def source(*i):
        if keepdim:
            return tuple(axes[a] if a in axes else i[a] for a in range(len(shape)))
        it = iter(i)
        return tuple(axes[a] if a in axes else next(it) for a in range(len(shape)))

    if kind == "max":
        return [x, te.compute(out_shape, lambda *i: te.max(x[source(*i)], axis=list(axes.values())), name="y")]
    total = te.compute(out_shape, lambda *i: te.sum(x[source(*i)], axis=list(axes.values())), name="total")
    count = int(np.prod([shape[d] for d in dims]))
    y = te.compute(out_shape, lambda *i: total[i] / _f32(count), name="y")
    return [x, y]


@_builder
def softmax(shape, axis: int):
    """``main(x, y)``: ``exp(x - max) / sum(exp(x - max))`` along ``axis``."""
    x = te.placeholder(tuple(int(d) for d in shape), _F32, name="x")
    return [x, topi.nn.softmax(x, axis=_normalize_axis(axis, len(shape)))]


@_builder
def concat(shapes, axis: int):
    """``main(x0, x1, ..., y)``: concatenation along ``axis``."""
    inputs = [te.placeholder(tuple(int(d) for d in s), _F32, name=f"x{i}") for i, s in enumerate(shapes)]
    return inputs + [topi.concatenate(inputs, axis=_normalize_axis(axis, len(shapes[0])))]


@_builder
def slice_axis(shape, axis: int, start: int, end: int):
    """``main(x, y)``: ``y = x[..., start:end, ...]`` along ``axis`` (one output per thread)."""
    shape = tuple(int(d) for d in shape)
    axis = _normalize_axis(axis, len(shape))
    if not 0 <= start < end <= shape[axis]:
        raise ValueError(f"slice [{start}:{end}] outside axis {axis} of {shape}")
    x = te.placeholder(shape, _F32, name="x")
    out_shape = shape[:axis] + (end - start,) + shape[axis + 1:]
    y = te.compute(out_shape, lambda *i: x[i[:axis] + (i[axis] + start,) + i[axis + 1:]], name="y")
    return [x, y]


@_builder
def transpose(shape, dims: Sequence[int]):
    """``main(x, y)``: ``y = x.transpose(dims)``."""
    x = te.placeholder(tuple(int(d) for d in shape), _F32, name="x")
    return [x, topi.transpose(x, [int(d) for d in dims])]


# --------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------
@_builder
def matmul(a_shape, b_shape):
    """``main(a: f32[..., M, K], b: f32[..., K, N], y: f32[..., M, N])``: numpy ``matmul``
    (batch dimensions broadcast)."""
    a_shape, b_shape = tuple(int(d) for d in a_shape), tuple(int(d) for d in b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[-1] != b_shape[-2]:
        raise ValueError(f"cannot matmul {a_shape} @ {b_shape}")
    batch = tuple(int(d) for d in np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    out_shape = batch + (a_shape[-2], b_shape[-1])
    a = te.placeholder(a_shape, _F32, name="a")
    b = te.placeholder(b_shape, _F32, name="b")
    # K == 1 (attention over one position): one product, no reduction (whose extent-1 loop TVM
    # drops; dlight's GEMV rule then asserts)
    k = te.reduce_axis((0, a_shape[-1]), "k") if a_shape[-1] > 1 else None

    def value(*i):
        bi, m, n = i[:-2], i[-2], i[-1]
        ai = _broadcast_index(bi, a_shape[:-2], batch) if batch else ()
        bj = _broadcast_index(bi, b_shape[:-2], batch) if batch else ()
        if k is None:
            return a[ai + (m, 0)] * b[bj + (0, n)]
        return te.sum(a[ai + (m, k)] * b[bj + (k, n)], axis=k)

    return [a, b, te.compute(out_shape, value, name="y")]


@_builder
def layer_norm(shape, axis: int, eps: float):
    """``main(x, w: f32[shape[axis:]], b: f32[shape[axis:]], y)``: the interpreter's
    ``mean = sum(x) / D; d = x - mean; var = sum(d * d) / D; y = (d / sqrt(var + eps)) * w + b``."""
    shape = tuple(int(d) for d in shape)
    axis = _normalize_axis(axis, len(shape))
    lead, normalized = shape[:axis], shape[axis:]
    count = _f32(int(np.prod(normalized)))
    x = te.placeholder(shape, _F32, name="x")
    w = te.placeholder(normalized, _F32, name="w")
    b = te.placeholder(normalized, _F32, name="b")
    r1 = [te.reduce_axis((0, d), f"r{i}") for i, d in enumerate(normalized)]
    total = te.compute(lead or (1,), lambda *i: te.sum(x[(i if lead else ()) + tuple(r1)], axis=r1), name="total")
    mean = te.compute(lead or (1,), lambda *i: total[i] / count, name="mean")
    r2 = [te.reduce_axis((0, d), f"s{i}") for i, d in enumerate(normalized)]

    def sq(*i):
        d = x[(i if lead else ()) + tuple(r2)] - mean[i]
        return te.sum(d * d, axis=r2)

    squares = te.compute(lead or (1,), sq, name="squares")
    denom = te.compute(lead or (1,), lambda *i: tirx.sqrt(squares[i] / count + _f32(eps)), name="denom")

    def norm(*i):
        row = i[:axis] if lead else (0,)
        return ((x[i] - mean[row]) / denom[row]) * w[i[axis:]] + b[i[axis:]]

    return [x, w, b, te.compute(shape, norm, name="y")]


@_builder
def gelu(shape, approximate: str = "none"):
    """``main(x, y)``: ``(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`` (CUDA's erff), or the tanh form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    x = te.placeholder(tuple(int(d) for d in shape), _F32, name="x")

    def value(*i):
        v = x[i]
        if approximate == "tanh":
            t = tirx.tanh(_f32(0.7978845608028654) * (v + _f32(0.044715) * ((v * v) * v)))
        else:
            t = tirx.erf(v * _f32(0.7071067811865476))
        return (v * _f32(0.5)) * (_f32(1.0) + t)

    return [x, te.compute(x.shape, value, name="y")]
