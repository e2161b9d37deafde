"""Pooling and reductions: max / average / adaptive pooling, mean, amax, softmax."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as I

from csqc.numerics import pool_output_size
from .common import (
    _channel_view, F32, _f32, _flat, LANES, _local, _pair, _parallel_or_serial, prim_func, _prod, _vector_span)
from .elementwise import _exp


def _pool_geometry(input_shape, kernel, stride, padding, dilation, ceil_mode: bool = False):
    n, c, h, w = (int(s) for s in input_shape)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel, stride, padding, dilation))
    # PyTorch's rule (csqc.numerics): ceil_mode adds a last window that starts inside the input
    # or its left padding; its taps past the input are skipped like padding taps
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"pooling output would be empty ({oh}x{ow})")
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow)


def _pool2d(kind: str, input_shape, kernel, stride, padding, dilation, finish: Callable,
            ceil_mode: bool = False) -> tirx.PrimFunc:
    """Window reduction (``kind`` max or sum) over NCHW, then ``finish(total, oh, ow)``.

    One parallel task per output row.  Out-of-range input rows are skipped (uniform test;
    -inf / 0 padding never changes a max / sum).  Output columns whose windows lie inside the
    row are computed 16 at a time: for stride ``s`` a contiguous ``16*s``-wide load is
    de-interleaved with a shuffle (a strided load would be 16 scalar loads).  The few border
    columns run scalar with per-tap tests.
    """
    (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _pool_geometry(
        input_shape, kernel, stride, padding, dilation, ceil_mode)
    combine = tirx.Max if kind == "max" else (lambda a, b: a + b)
    init = _f32(-np.inf) if kind == "max" else _f32(0.0)
    # Columns whose every tap, and the (s - 1) extra lanes the wide load reads, are in the row.
    first = -(-pw // sw)
    last = (w - sw + pw - (kw - 1) * dw) // sw
    interior = max(0, min(last, ow - 1) - first + 1)
    if interior == 0:
        first = ow  # everything is border

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)

        def tap_rows(out_row, emit_row):
            for ki in range(kh):
                ih = out_row * sh - ph + ki * dh
                with I.If(tirx.all(ih >= 0, ih < h)):
                    with I.Then():
                        emit_row(ih, ki)

        def vector_segment(plane, out_row, col0, width):
            acc = _local((width,))
            I.buffer_store(acc, tirx.Broadcast(init, width) if width > 1 else init,
                           [tirx.Ramp(0, 1, width)] if width > 1 else [0])

            def emit_row(ih, _ki):
                for kj in range(kw):
                    start = plane * (h * w) + ih * w + col0 * sw - pw + kj * dw
                    if sw == 1 or width == 1:
                        window = x_flat[tirx.Ramp(start, 1, width)] if width > 1 else x_flat[start]
                    else:
                        wide = x_flat[tirx.Ramp(start, 1, width * sw)]
                        window = tirx.Shuffle([wide], [tirx.IntImm("int32", lane * sw) for lane in range(width)])
                    index = [tirx.Ramp(0, 1, width)] if width > 1 else [0]
                    I.buffer_store(acc, combine(tirx.BufferLoad(acc, index), window), index)

            tap_rows(out_row, emit_row)
            with I.vectorized(0, width) as lane:
                out = (plane * oh + out_row) * ow + col0 + lane
                I.buffer_store(y_flat, finish(acc[lane], out_row, col0 + lane), [out])

        def scalar_column(plane, out_row, col):
            acc = _local((1,))
            I.buffer_store(acc, init, [0])

            def emit_row(ih, _ki):
                for kj in range(kw):
                    iw = col * sw - pw + kj * dw
                    with I.If(tirx.all(iw >= 0, iw < w)):
                        with I.Then():
                            I.buffer_store(acc, combine(acc[0], x_flat[plane * (h * w) + ih * w + iw]), [0])

            tap_rows(out_row, emit_row)
            I.buffer_store(y_flat, finish(acc[0], out_row, col), [(plane * oh + out_row) * ow + col])

        with _parallel_or_serial(n * c * oh, n * c * oh * ow * kh * kw) as task:
            plane, out_row = task // oh, task % oh
            if first > 0:
                with I.serial(0, first) as col:
                    scalar_column(plane, out_row, col)
            if interior:
                full, rest = divmod(interior, LANES)
                if full:
                    with I.serial(0, full) as v:
                        vector_segment(plane, out_row, first + v * LANES, LANES)
                if rest:
                    vector_segment(plane, out_row, first + full * LANES, rest)
            done = first + interior
            if done < ow:
                with I.serial(0, ow - done) as col:
                    scalar_column(plane, out_row, done + col)

    params = [("x", (n, c, h, w), F32), ("y", (n, c, oh, ow), F32)]
    return prim_func(params, body)


def max_pool2d(input_shape, kernel, stride, padding=(0, 0), dilation=(1, 1), ceil_mode: bool = False) -> tirx.PrimFunc:
    """Max pooling, padding with -inf (exact).  Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    return _pool2d("max", input_shape, kernel, stride, padding, dilation, lambda total, _r, _c: total, ceil_mode)


def avg_pool2d(input_shape, kernel, stride, padding=(0, 0), count_include_pad: bool = True,
               divisor: int = 0, ceil_mode: bool = False) -> tirx.PrimFunc:
    """Average pooling as the interpreter computes it: the window sum, then one division by
    ``divisor`` (or ``KH*KW``), or by the window's size clipped to the padded input (a
    ceil_mode window running past it) or, when padding is excluded, to the input.
    Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), _, _ = _pool_geometry(input_shape, kernel, stride, padding, (1, 1))
    if not divisor and (ceil_mode or (not count_include_pad and (ph or pw))):
        # the window's cells inside [lo, hi) of each axis (csqc.numerics._window_counts)
        pad_h, pad_w = (ph, pw) if count_include_pad else (0, 0)

        def finish(total, out_row, col):
            top, left = out_row * sh - ph, col * sw - pw
            rows = tirx.min(top + kh, h + pad_h) - tirx.max(top, -pad_h)
            cols = tirx.min(left + kw, w + pad_w) - tirx.max(left, -pad_w)
            return total / tirx.Cast(F32, rows * cols)
    else:
        def finish(total, _r, _c):
            return total / _f32(divisor or kh * kw)
    return _pool2d("sum", input_shape, kernel, stride, padding, (1, 1), finish, ceil_mode)


def _emit_row_mean(x_flat, y_flat, rows: int, row_len: int, count: int):
    """``y[r] = sum(x[r, :]) / count`` over contiguous rows: 16-lane partial sums, then a fold."""
    _emit_row_reduce(x_flat, y_flat, rows, row_len, *_REDUCTIONS["mean"](count))


# kind -> count -> (start, combine, finish) of a reduction
_REDUCTIONS = {
    "mean": lambda count: (_f32(0.0), lambda a, b: a + b, lambda total: total / _f32(count)),
    "max": lambda count: (_f32(float("-inf")), tirx.Max, lambda total: total),
}


def _emit_row_reduce(x_flat, y_flat, rows: int, row_len: int, start, combine: Callable, finish: Callable):
    """``y[r] = finish(combine(...combine(start, x[r, 0])..., x[r, -1]))`` over contiguous rows:
    16-lane partials, then a fold of the lanes and the row's tail, in that order."""
    full, tail = divmod(row_len, LANES)
    with _parallel_or_serial(rows, rows * row_len) as row:
        partial = _local((LANES,))
        total = _local((1,))
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(partial, start, [lane])
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(partial, combine(partial[lane], x_flat[row * row_len + v * LANES + lane]), [lane])
        I.buffer_store(total, start, [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(total, combine(total[0], partial[lane]), [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(total, combine(total[0], x_flat[row * row_len + full * LANES + t]), [0])
        I.buffer_store(y_flat, finish(total[0]), [row])


def _uneven_adaptive_avg_pool2d(n: int, c: int, h: int, w: int, oh: int, ow: int) -> tirx.PrimFunc:
    """Windows ``[floor(i*H/OH), ceil((i+1)*H/OH))`` of varying size: one task per output row,
    a scalar window sum (row by row), then one division by the window's size."""

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        with _parallel_or_serial(n * c * oh, n * c * h * w) as task:
            plane, i = task // oh, task % oh
            h0, h1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            with I.serial(0, ow) as j:
                w0, w1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                acc = _local((1,))
                I.buffer_store(acc, _f32(0.0), [0])
                with I.serial(0, h1 - h0) as r:
                    with I.serial(0, w1 - w0) as s:
                        I.buffer_store(acc, acc[0] + x_flat[plane * (h * w) + (h0 + r) * w + w0 + s], [0])
                I.buffer_store(y_flat, acc[0] / tirx.Cast(F32, (h1 - h0) * (w1 - w0)), [(plane * oh + i) * ow + j])

    return prim_func([("x", (n, c, h, w), F32), ("y", (n, c, oh, ow), F32)], body)


def adaptive_avg_pool2d(input_shape, output_size) -> tirx.PrimFunc:
    """Adaptive average pooling (float32 window sum / window size), PyTorch's windows.
    Parameters: ``x: f32[N,C,H,W], y: f32[N,C,OH,OW]``."""
    n, c, h, w = (int(s) for s in input_shape)
    oh, ow = _pair(output_size)
    if h % oh or w % ow:
        return _uneven_adaptive_avg_pool2d(n, c, h, w, oh, ow)
    if (oh, ow) != (1, 1):
        return avg_pool2d(input_shape, (h // oh, w // ow), (h // oh, w // ow), (0, 0), True, 0)

    def body(x, y):
        _emit_row_mean(_flat(x), _flat(y), n * c, h * w, h * w)

    return prim_func([("x", (n, c, h, w), F32), ("y", (n, c, 1, 1), F32)], body)


def mean(shape, dims: Sequence[int], keepdim: bool) -> tirx.PrimFunc:
    """``y = x.mean(dims, keepdims=keepdim)`` in float32 (sum, then divide by the count).
    Parameters: ``x: f32[shape], y: f32[out_shape]``.

    Trailing reduced dimensions (the usual ``mean((2, 3))``) are contiguous rows: vectorized
    partial sums.  Other layouts reduce with scalar loops per output element.
    """
    return _reduction(shape, dims, keepdim, "mean")


def amax(shape, dims: Sequence[int], keepdim: bool) -> tirx.PrimFunc:
    """``y = x.amax(dims, keepdims=keepdim)`` (max is exact in any order: every runtime's bits
    agree). Parameters and layouts as :func:`mean`'s."""
    return _reduction(shape, dims, keepdim, "max")


def _reduction(shape, dims: Sequence[int], keepdim: bool, kind: str) -> tirx.PrimFunc:
    """:func:`mean` (``kind`` "mean") or :func:`amax` ("max")."""
    shape = tuple(int(s) for s in shape)
    reduced = sorted({int(d) % len(shape) for d in dims})
    kept = [d for d in range(len(shape)) if d not in reduced]
    out_shape = tuple(1 if d in reduced else shape[d] for d in range(len(shape))) if keepdim else tuple(shape[d] for d in kept)
    count = _prod(shape[d] for d in reduced)
    n_out = _prod(shape[d] for d in kept)
    trailing = reduced == list(range(len(shape) - len(reduced), len(shape)))

    start, combine, finish = _REDUCTIONS[kind](count)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        if trailing:
            _emit_row_reduce(x_flat, y_flat, n_out, count, start, combine, finish)
            return
        in_strides = [_prod(shape[d + 1 :]) for d in range(len(shape))]
        with _parallel_or_serial(n_out, n_out * count) as out:
            base, rest = tirx.const(0, "int32"), out
            for d in reversed(kept):
                base = base + (rest % shape[d]) * in_strides[d]
                rest = rest // shape[d]
            total = _local((1,))
            I.buffer_store(total, start, [0])
            with I.serial(0, count) as r:
                offset, rest = base, r
                for d in reversed(reduced):
                    offset = offset + (rest % shape[d]) * in_strides[d]
                    rest = rest // shape[d]
                I.buffer_store(total, combine(total[0], x_flat[offset]), [0])
            I.buffer_store(y_flat, finish(total[0]), [out])

    return prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


def softmax(shape, axis: int) -> tirx.PrimFunc:
    """``e = exp(x - max(x, axis)); y = e / sum(e, axis)`` (the interpreter's order).
    Parameters: ``x: f32[shape], y: f32[shape]``.

    The tensor is viewed as ``[outer, A, inner]``.  With ``inner == 1`` (softmax over the last
    axis) each row is reduced with 16-lane vectors; otherwise 16 columns of ``inner`` are
    processed side by side, each lane its own softmax.  ``exp`` is LLVM's (libm) exp, so
    results can differ from numpy's in the last ulp.
    """
    shape = tuple(int(s) for s in shape)
    axis, outer, length, inner = _channel_view(shape, axis)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        if inner == 1:
            _emit_row_softmax(x_flat, y_flat, outer, length)
            return
        blocks = -(-inner // LANES)
        with _parallel_or_serial(outer * blocks, outer * length * inner) as task:
            row, block = task // blocks, task % blocks
            full, tail = divmod(inner, LANES)

            def columns(width):
                col0 = block * LANES
                peak, total = _local((width,)), _local((width,))
                with I.vectorized(0, width) as lane:
                    I.buffer_store(peak, _f32(-np.inf), [lane])
                    I.buffer_store(total, _f32(0.0), [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(peak, tirx.Max(peak[lane], x_flat[(row * length + a) * inner + col0 + lane]), [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        at = (row * length + a) * inner + col0 + lane
                        I.buffer_store(y_flat, _exp(x_flat[at] - peak[lane]), [at])
                        I.buffer_store(total, total[lane] + y_flat[at], [lane])
                with I.serial(0, length) as a:
                    with I.vectorized(0, width) as lane:
                        at = (row * length + a) * inner + col0 + lane
                        I.buffer_store(y_flat, y_flat[at] / total[lane], [at])

            if not tail:
                columns(LANES)
            elif not full:
                columns(tail)
            else:
                with I.If(block < full):
                    with I.Then():
                        columns(LANES)
                    with I.Else():
                        columns(tail)

    return prim_func([("x", shape, F32), ("y", shape, F32)], body)


def _emit_row_softmax(x_flat, y_flat, rows: int, length: int):
    full, tail = divmod(length, LANES)
    with _parallel_or_serial(rows, rows * length * 8) as row:
        peak, total = _local((LANES,)), _local((LANES,))
        row_max, row_sum = _local((1,)), _local((1,))
        base = row * length
        with I.vectorized(0, LANES) as lane:
            I.buffer_store(peak, _f32(-np.inf), [lane])
            I.buffer_store(total, _f32(0.0), [lane])
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(peak, tirx.Max(peak[lane], x_flat[base + v * LANES + lane]), [lane])
        I.buffer_store(row_max, _f32(-np.inf), [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(row_max, tirx.Max(row_max[0], peak[lane]), [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(row_max, tirx.Max(row_max[0], x_flat[base + full * LANES + t]), [0])

        def exp_and_sum(_row, col):
            I.buffer_store(y_flat, _exp(x_flat[base + col] - row_max[0]), [base + col])

        _vector_span(exp_and_sum, row, 0, length)
        if full:
            with I.serial(0, full) as v:
                with I.vectorized(0, LANES) as lane:
                    I.buffer_store(total, total[lane] + y_flat[base + v * LANES + lane], [lane])
        I.buffer_store(row_sum, _f32(0.0), [0])
        with I.unroll(0, LANES) as lane:
            I.buffer_store(row_sum, row_sum[0] + total[lane], [0])
        if tail:
            with I.serial(0, tail) as t:
                I.buffer_store(row_sum, row_sum[0] + y_flat[base + full * LANES + t], [0])
        _vector_span(lambda _r, col: I.buffer_store(y_flat, y_flat[base + col] / row_sum[0], [base + col]), row, 0, length)
