"""Transformer blocks: batched matmul and layer norm."""

from __future__ import annotations

from typing import Callable

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import tirx as I

from .common import F32, _f32, _flat, LANES, _local, _parallel_or_serial, prim_func, _prod, _rounded, _vector_span
from .float_layers import _row_tiles
from .layout import _broadcast_strides


def matmul(a_shape, b_shape) -> tirx.PrimFunc:
    """``y = a @ b`` (numpy ``matmul`` of two float tensors of rank >= 2, batch dims broadcast).

    Parameters: ``a: f32[..., M, K], b: f32[..., K, N], y: f32[..., M, N]``.

    Schedule: one task per output row (parallel when the product is large enough), the row
    cut into column tiles of up to 64 (4 vectors); per tile, a register accumulator takes
    ``a[m, k] * b[k, tile]`` (one broadcast, contiguous vector loads of ``b``) for every ``k``.
    """
    a_shape, b_shape = tuple(int(s) for s in a_shape), tuple(int(s) for s in b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[-1] != b_shape[-2]:
        raise ValueError(f"cannot matmul {a_shape} @ {b_shape}")
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = tuple(int(s) for s in np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    out_shape = batch + (m, n)
    a_strides = [s * m * k for s in _broadcast_strides(a_shape[:-2], batch)] if batch else []
    b_strides = [s * k * n for s in _broadcast_strides(b_shape[:-2], batch)] if batch else []
    batches = _prod(batch)
    tiles = _row_tiles(n, 4 * LANES)

    def batch_offset(index, strides):
        offset, rest = tirx.const(0, "int32"), index
        for size, stride in zip(reversed(batch), reversed(strides)):
            if stride:
                offset = offset + (rest % size) * stride
            rest = rest // size
        return offset

    def body(a, b, y):
        a_flat, b_flat, y_flat = _flat(a), _flat(b), _flat(y)
        with _parallel_or_serial(batches * m, batches * m * n * k) as task:
            bi, row = task // m, task % m
            a_row = batch_offset(bi, a_strides) + row * k
            b_base = batch_offset(bi, b_strides)
            start = 0
            for count, width in tiles:
                acc = _local((width,))
                with I.serial(0, count) as t:
                    col0 = start + t * width
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(acc, _f32(0.0), [lane])
                    with I.serial(0, k) as kk:
                        with I.vectorized(0, width) as lane:
                            product = a_flat[a_row + kk] * b_flat[b_base + kk * n + col0 + lane]
                            I.buffer_store(acc, acc[lane] + product, [lane])
                    with I.vectorized(0, width) as lane:
                        I.buffer_store(y_flat, acc[lane], [task * n + col0 + lane])
                start += count * width

    return prim_func([("a", a_shape, F32), ("b", b_shape, F32), ("y", out_shape, F32)], body)


def _emit_row_sum(value: Callable, length: int, total):
    """``total[0] = sum(value(i) for i in range(length))``: 16-lane partial sums, then a fold."""
    full, tail = divmod(length, LANES)
    partial = _local((LANES,))
    with I.vectorized(0, LANES) as lane:
        I.buffer_store(partial, _f32(0.0), [lane])
    if full:
        with I.serial(0, full) as v:
            with I.vectorized(0, LANES) as lane:
                I.buffer_store(partial, partial[lane] + value(v * LANES + lane), [lane])
    I.buffer_store(total, _f32(0.0), [0])
    with I.unroll(0, LANES) as lane:
        I.buffer_store(total, total[0] + partial[lane], [0])
    if tail:
        with I.serial(0, tail) as t:
            I.buffer_store(total, total[0] + value(full * LANES + t), [0])


def layer_norm(shape, axis: int, eps: float) -> tirx.PrimFunc:
    """Layer norm over the trailing axes from ``axis`` (the interpreter's order, float32):
    ``mean = sum(x) / D; d = x - mean; var = sum(d * d) / D; y = (d / sqrt(var + eps)) * w + b``.

    Parameters: ``x: f32[shape], w: f32[shape[axis:]], b: f32[shape[axis:]], y: f32[shape]``.
    One task per row of ``D`` elements (parallel when large): two vectorized reductions, then
    a vectorized normalize (the product by ``w`` rounded before ``+ b``: no FMA).
    """
    shape = tuple(int(s) for s in shape)
    axis = axis % len(shape)
    rows, length = _prod(shape[:axis]), _prod(shape[axis:])
    normalized = shape[axis:]

    def body(x, w, b, y):
        x_flat, y_flat, w_flat, b_flat = _flat(x), _flat(y), _flat(w), _flat(b)
        with _parallel_or_serial(rows, rows * length * 4) as row:
            base = row * length
            total, mean, denom = _local((1,)), _local((1,)), _local((1,))
            _emit_row_sum(lambda i: x_flat[base + i], length, total)
            I.buffer_store(mean, total[0] / _f32(length), [0])
            _emit_row_sum(lambda i: (x_flat[base + i] - mean[0]) * (x_flat[base + i] - mean[0]), length, total)
            I.buffer_store(denom, tirx.sqrt(total[0] / _f32(length) + _f32(eps)), [0])

            def emit(_row, col):
                scaled = _rounded(((x_flat[base + col] - mean[0]) / denom[0]) * w_flat[col])
                I.buffer_store(y_flat, scaled + b_flat[col], [base + col])

            _vector_span(emit, row, 0, length)

    return prim_func([("x", shape, F32), ("w", normalized, F32), ("b", normalized, F32), ("y", shape, F32)], body)
