"""Layout ops and the index helpers of broadcasting: copy, slice, concat, transpose, embedding, take."""

from __future__ import annotations

from typing import Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as I

from .common import _channel_view, F32, _flat, _for_each, LANES, _parallel_or_serial, prim_func, _prod


def _broadcast_strides(shape, out_shape) -> list[int]:
    """Element strides of a row-major ``shape`` aligned to ``out_shape`` (0 where broadcast)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > len(out_shape):
        raise ValueError(f"cannot broadcast {shape} to {tuple(out_shape)}")
    padded = (1,) * (len(out_shape) - len(shape)) + shape
    strides, step = [0] * len(out_shape), 1
    for d in reversed(range(len(out_shape))):
        if padded[d] == out_shape[d]:
            strides[d] = step if out_shape[d] > 1 else 0
        elif padded[d] != 1:
            raise ValueError(f"cannot broadcast {shape} to {tuple(out_shape)}")
        step *= padded[d]
    return strides


def _coalesce(out_shape, operand_strides) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dimensions that every operand walks contiguously (or all broadcast)."""
    dims, strides = [], [[] for _ in operand_strides]
    for d, size in enumerate(out_shape):
        if size == 1:
            continue
        if dims and all(st[-1] == s[d] * size for s, st in zip(operand_strides, strides)):
            dims[-1] *= size
            for s, st in zip(operand_strides, strides):
                st[-1] = s[d]
            continue
        dims.append(int(size))
        for s, st in zip(operand_strides, strides):
            st.append(s[d])
    if not dims:
        return [1], [[0] for _ in operand_strides]
    return dims, strides


def _strided_index(row, col, dims, strides):
    """Offset of element ``(row, col)`` of the coalesced space in an operand with ``strides``."""
    index = col * strides[-1] if strides[-1] else tirx.const(0, "int32")
    rest = row
    for size, stride in zip(reversed(dims[:-1]), reversed(strides[:-1])):
        if stride:
            index = index + (rest % size) * stride
        rest = rest // size
    return index


def embedding(rows: int, dim: int, ids_shape, ids_dtype: str) -> tirx.PrimFunc:
    """``y[..., d] = table[ids[...], d]``: one table row per id, copied in vectors of 16.

    Parameters: ``table: f32[rows, dim], ids: <ids_dtype>[ids_shape], y: f32[ids_shape + (dim,)]``.
    Ids are clamped into the table (memory safety); the runtime refuses ids outside it first.
    """
    ids_shape = tuple(int(s) for s in ids_shape)
    count, rows, dim = _prod(ids_shape), int(rows), int(dim)

    def body(table, ids, y):
        table_flat, ids_flat, y_flat = _flat(table), _flat(ids), _flat(y)

        def emit(i, d):
            row = tirx.Min(tirx.Max(ids_flat[i], tirx.const(0, ids_dtype)), tirx.const(rows - 1, ids_dtype))
            I.buffer_store(y_flat, table_flat[row.astype("int64") * dim + d], [i * dim + d])

        _for_each(count, dim, emit)

    return prim_func([("table", (rows, dim), F32), ("ids", ids_shape, ids_dtype),
                       ("y", ids_shape + (dim,), F32)], body)


def take(shape, axis: int, index_shape) -> tirx.PrimFunc:
    """``y = take(x, index, axis)``: along ``axis``, the positions ``index`` holds (int32, any
    shape), each copying its run of ``inner`` elements; runs shorter than a vector are gathered
    a vector of picks at a time (a resize along the last axis: 2.5x faster than one element a task).

    Parameters: ``x: f32[shape], index: int32[index_shape], y: f32[shape[:axis] + index_shape +
    shape[axis + 1:]]``. Positions are clamped into the axis (memory safety); the IR verifier
    refuses an index outside it first.
    """
    shape, index_shape = tuple(int(s) for s in shape), tuple(int(s) for s in index_shape)
    axis, outer, size, inner = _channel_view(shape, axis)
    picks = _prod(index_shape)

    def body(x, index, y):
        x_flat, index_flat, y_flat = _flat(x), _flat(index), _flat(y)

        def position(k):
            return tirx.Min(tirx.Max(index_flat[k], tirx.const(0, "int32")), tirx.const(size - 1, "int32"))

        def emit(row, col):  # row: (outer position, pick); col: within the run
            o, k = row // picks, row % picks
            I.buffer_store(y_flat, x_flat[(o * size + position(k)) * inner + col], [row * inner + col])

        def emit_row(o, col):  # col: (pick, within its run) along one outer position's output
            k, j = (col // inner, col % inner) if inner > 1 else (col, 0)
            I.buffer_store(y_flat, x_flat[(o * size + position(k)) * inner + j], [o * picks * inner + col])

        if inner >= LANES:
            _for_each(outer * picks, inner, emit)
        else:  # runs shorter than a vector (a resize along the last axis): vectors of picks, gathered
            _for_each(outer, picks * inner, emit_row)

    out_shape = shape[:axis] + index_shape + shape[axis + 1:]
    return prim_func([("x", shape, F32), ("index", index_shape, "int32"), ("y", out_shape, F32)], body)


def _unravel(flat, shape) -> list:
    """Row-major indices of ``flat`` in ``shape`` (one expression per dimension)."""
    index = []
    for size in reversed(shape):
        index.append(flat % size if size > 1 else tirx.const(0, "int32"))
        flat = flat // size
    return index[::-1]


def _row_major(index, shape):
    """Flat offset of ``index`` in a row-major ``shape`` (size-1 dimensions add nothing)."""
    offset, stride = tirx.const(0, "int32"), 1
    for i, size in zip(reversed(index), reversed(shape)):
        if size > 1:
            offset = offset + i * stride
        stride *= size
    return offset


def _broadcast_index(index, shape) -> list:
    """``index`` of a broadcast result, read in an operand of ``shape`` (numpy rules)."""
    aligned = index[len(index) - len(shape):] if shape else []
    return [i if size > 1 else tirx.const(0, "int32") for i, size in zip(aligned, shape)]


def copy(shape) -> tirx.PrimFunc:
    """``y = x`` (also a reshape: the planner gives ``y`` the new shape of the same data).

    Parameters: ``x: f32[shape], y: f32[shape]``."""
    shape = tuple(int(s) for s in shape)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, x_flat[i], [i]))

    return prim_func([("x", shape, F32), ("y", shape, F32)], body)


def slice_axis(shape, axis: int, start: int, end: int) -> tirx.PrimFunc:
    """``y = x[..., start:end, ...]`` along ``axis`` (step 1).  Parameters: ``x: f32[shape], y``.

    Viewed as ``[outer, A, inner]``: each of the ``outer`` rows copies one contiguous run of
    ``(end - start) * inner`` elements (parallel over rows, vectorized along the run).
    """
    shape = tuple(int(s) for s in shape)
    axis, outer, size, inner = _channel_view(shape, axis)
    if not 0 <= start < end <= size:
        raise ValueError(f"slice [{start}:{end}] outside axis {axis} of {shape}")
    out_shape = shape[:axis] + (end - start,) + shape[axis + 1 :]
    run = (end - start) * inner

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(outer, run, lambda row, col: I.buffer_store(
            y_flat, x_flat[row * (size * inner) + start * inner + col], [row * run + col]))

    return prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


def concat(shapes: Sequence[Sequence[int]], axis: int) -> tirx.PrimFunc:
    """``y = concatenate(xs, axis)``.  Parameters: ``x0, x1, ..., y`` (float32)."""
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    axis = axis % len(shapes[0])
    out_shape = list(shapes[0])
    out_shape[axis] = sum(shape[axis] for shape in shapes)
    out_shape = tuple(out_shape)
    outer, inner = _prod(out_shape[:axis]), _prod(out_shape[axis + 1 :])
    out_row = out_shape[axis] * inner
    params = [(f"x{i}", shape, F32) for i, shape in enumerate(shapes)] + [("y", out_shape, F32)]

    def body(*buffers):
        *inputs, y = buffers
        y_flat = _flat(y)
        offset = 0
        for x, shape in zip(inputs, shapes):
            x_flat, in_row = _flat(x), shape[axis] * inner

            def emit(row, col, x_flat=x_flat, in_row=in_row, offset=offset):
                I.buffer_store(y_flat, x_flat[row * in_row + col], [row * out_row + offset + col])

            _for_each(outer, in_row, emit)
            offset += in_row

    return prim_func(params, body)


def transpose(shape, dims: Sequence[int]) -> tirx.PrimFunc:
    """``y = x.transpose(dims)`` (contiguous result).  Parameters: ``x: f32[shape], y``.

    Vectorized along the output's last dimension (a strided gather when that dimension is not
    the input's last one)."""
    shape = tuple(int(s) for s in shape)
    dims = tuple(int(d) % len(shape) for d in dims)
    if sorted(dims) != list(range(len(shape))):
        raise ValueError(f"{dims} is not a permutation of {len(shape)} dimensions")
    out_shape = tuple(shape[d] for d in dims)
    in_strides = [_prod(shape[d + 1 :]) for d in range(len(shape))]
    strides = [in_strides[d] for d in dims]
    row_len = out_shape[-1] if out_shape else 1
    rows = _prod(out_shape[:-1])
    out_dims = list(out_shape) or [1]
    if len(dims) >= 2 and dims[-2] == len(shape) - 1 and 2 <= row_len <= _MAX_INTERLEAVED and out_shape[-2] >= 4:
        return _interleave(shape, out_shape, strides)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)

        def emit(row, col):
            source = _strided_index(row, col, out_dims, strides or [0])
            I.buffer_store(y_flat, x_flat[source], [row * row_len + col])

        _for_each(rows, row_len, emit)

    return prim_func([("x", shape, F32), ("y", out_shape, F32)], body)


_MAX_INTERLEAVED = 8  # vectors one shuffle interleaves (a stride-8 transposed conv's phases)


def _interleave(shape, out_shape, strides) -> tirx.PrimFunc:
    """A transpose whose output's last axis is short (``r`` <= 8) and whose next-to-last is the
    input's contiguous one: each output row interleaves ``r`` contiguous input runs, as a
    transposed convolution's stacked phases become its output rows (``[.., sw, .., qw] -> [..,
    qw, sw]``). The generic kernel would vectorize along rows of ``r`` elements, gathering; here
    ``r`` vector loads of 16 (or of a shorter row's length) are shuffled into ``16 r``
    consecutive outputs."""
    r, length = out_shape[-1], out_shape[-2]
    rows, row_len = _prod(out_shape[:-2]), length * r
    lead_dims, lead_strides, phase_stride = list(out_shape[:-2]) or [1], list(strides[:-2]) or [0], strides[-1]
    width = min(LANES, length)
    interleaved = [tirx.const((j % r) * width + j // r, "int32") for j in range(width * r)]
    full = length // width

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        with _parallel_or_serial(rows, rows * row_len) as row:
            base = _strided_index(row, tirx.const(0, "int32"), lead_dims + [1], lead_strides + [0])
            if full:
                with I.serial(0, full) as v:
                    runs = [x_flat[tirx.Ramp(base + k * phase_stride + v * width, 1, width)] for k in range(r)]
                    I.buffer_store(y_flat, tirx.Shuffle(runs, interleaved),
                                   [tirx.Ramp(row * row_len + v * (width * r), 1, width * r)])
            if length % width:
                with I.vectorized(0, (length % width) * r) as j:
                    column = full * width + j // r
                    I.buffer_store(y_flat, x_flat[base + (j % r) * phase_stride + column],
                                   [row * row_len + full * width * r + j])

    return prim_func([("x", shape, F32), ("y", out_shape, F32)], body)
