"""Elementwise ops: broadcast binary ops, vectorized unary functions (exp, log, erf on the vector
units), channel affine maps and fused elementwise chains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as I

from .common import (
    _activation, _channel_view, F32, _f32, _flat, _fma, _for_each, _for_each_channel, _keeping_nan, _levels, prim_func, _prod,
    _round_to_int, _rounded)
from .quantizers import _emit_quantize, _emit_quantize_asymmetric
from .layout import _broadcast_index, _broadcast_strides, _coalesce, _row_major, _strided_index, _unravel


_BINARY = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "minimum": tirx.Min,
    "sub": lambda a, b: a - b,
    "div": lambda a, b: a / b,
}


def binary(op: str, a_shape, b_shape, out_shape) -> tirx.PrimFunc:
    """``y = op(a, b)`` with numpy broadcasting (``op`` in add / mul / minimum).

    Parameters: ``a: f32[a_shape], b: f32[b_shape], y: f32[out_shape]``.  Dimensions are
    coalesced first, so a full tensor, a per-channel ``[1,C,1,1]`` constant and a scalar all
    become a 2-D loop that is parallel over rows and vectorized along the contiguous one.
    """
    if op not in _BINARY:
        raise ValueError(f"binary op must be one of {sorted(_BINARY)}, got {op!r}")
    out_shape = tuple(int(s) for s in out_shape)
    strides = [_broadcast_strides(a_shape, out_shape), _broadcast_strides(b_shape, out_shape)]
    dims, (a_strides, b_strides) = _coalesce(out_shape, strides)
    rows, row_len = _prod(dims[:-1]), dims[-1]
    params = [("a", tuple(a_shape), F32), ("b", tuple(b_shape), F32), ("y", out_shape, F32)]

    def body(a, b, y):
        a_flat, b_flat, y_flat = _flat(a), _flat(b), _flat(y)

        def emit(row, col):
            value = _BINARY[op](a_flat[_strided_index(row, col, dims, a_strides)],
                                b_flat[_strided_index(row, col, dims, b_strides)])
            I.buffer_store(y_flat, value, [row * row_len + col])

        _for_each(rows, row_len, emit)

    return prim_func(params, body)


def select(c_shape, a_shape, b_shape, out_shape) -> tirx.PrimFunc:
    """``y = c != 0 ? a : b`` with numpy broadcasting (the branch not taken is not read into the
    result: inf or NaN there stays out).  Parameters: ``c, a, b: f32[...], y: f32[out_shape]``
    (coalesced like :func:`binary`)."""
    out_shape = tuple(int(s) for s in out_shape)
    shapes = [tuple(int(s) for s in shape) for shape in (c_shape, a_shape, b_shape)]
    dims, strides = _coalesce(out_shape, [_broadcast_strides(shape, out_shape) for shape in shapes])
    rows, row_len = _prod(dims[:-1]), dims[-1]
    params = [(name, shape, F32) for name, shape in zip("cab", shapes)] + [("y", out_shape, F32)]

    def body(c, a, b, y):
        c_flat, a_flat, b_flat, y_flat = _flat(c), _flat(a), _flat(b), _flat(y)

        def emit(row, col):
            c_v, a_v, b_v = (flat[_strided_index(row, col, dims, st)] for flat, st in
                             zip((c_flat, a_flat, b_flat), strides))
            I.buffer_store(y_flat, tirx.Select(c_v != tirx.const(0.0, F32), a_v, b_v), [row * row_len + col])

        _for_each(rows, row_len, emit)

    return prim_func(params, body)


def broadcast(in_shape, out_shape) -> tirx.PrimFunc:
    """``y = x`` broadcast (numpy rules) to ``out_shape``, e.g. a folded layer's per-channel
    constant ``[1,C,1,1]`` to its output shape.  Parameters: ``x: f32[in_shape], y: f32[out_shape]``
    (coalesced like :func:`binary`)."""
    out_shape = tuple(int(s) for s in out_shape)
    dims, (x_strides,) = _coalesce(out_shape, [_broadcast_strides(in_shape, out_shape)])
    rows, row_len = _prod(dims[:-1]), dims[-1]

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(rows, row_len, lambda row, col: I.buffer_store(
            y_flat, x_flat[_strided_index(row, col, dims, x_strides)], [row * row_len + col]))

    return prim_func([("x", tuple(in_shape), F32), ("y", out_shape, F32)], body)


# exp on the vector units: LLVM has no vector exp for x86 and calls libm's expf once per lane
# (16 calls a vector; an LSTM step's gates took 7.7 of its ~20 us). Cody-Waite reduction
# x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial of r in FMA steps, then 2^n in two
# exponent-field products (subnormal results round once). Within 1 ulp of the true exp (the
# coefficients of SLEEF's xexpf, a public minimax fit; tests/test_glue_llvm.py checks every
# result against float64's exp rounded to float32). numpy's float32 exp is itself up to 3 ulps
# off in places: float outputs are compared within tolerances, as with libm's.
_EXP_COEFFICIENTS = (0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
                     0.0416664853692054748535156, 0.166666671633720397949219, 0.5)


_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187045e-06  # ln 2 = hi + lo, hi with 12 zero low bits


def _exp(value):
    """float32 ``exp(value)`` without calls. ``value`` is clamped to [-104.5, 89], where 2^n
    itself gives 0 below exp's least subnormal and inf above its largest float; the clamp is two
    selects, which keep a NaN (``Min``/``Max`` would not; an ``isnan`` test stops TVM vectorizing
    the expression), and a NaN makes every step after it NaN. ``value``, its clamp, ``n`` and the
    reduced argument are each bound once (``Let``): written out, the expression repeats ``value``
    a few dozen times and TVM's passes walk every repeat (an LSTM's gates took seconds a kernel)."""
    v, x, r = (tirx.Var(name, F32) for name in ("exp_in", "exp_x", "exp_r"))
    n = tirx.Var("exp_n", "int32")
    poly = _f32(_EXP_COEFFICIENTS[0])
    for c in _EXP_COEFFICIENTS[1:]:
        poly = _fma(poly, r, _f32(c))
    u = _fma(poly, r * r, r) + _f32(1.0)
    half = n >> 1  # 2^n = 2^half * 2^(n - half): each factor a normal float32 for n in [-151, 129]

    def power_of_two(k):
        return tirx.reinterpret(F32, (k + 127) << 23)

    result = (u * power_of_two(half)) * power_of_two(n - half)
    nf = tirx.Cast(F32, n)
    result = tirx.Let(r, _fma(nf, _f32(-_LN2_LO), _fma(nf, _f32(-_LN2_HI), x)), result)
    result = tirx.Let(n, _round_to_int(x * _f32(1.4426950408889634)), result)
    high = tirx.Select(v > _f32(89.0), _f32(89.0), v)
    result = tirx.Let(x, tirx.Select(high < _f32(-104.5), _f32(-104.5), high), result)
    return tirx.Let(v, value, result)


# log on the vector units, for the same reason as exp (libm's logf once per lane otherwise):
# x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(x) = e ln2 + log(m), log(1 + f) by Cephes logf's
# public polynomial (f^3 times a degree-8 polynomial of f, plus f - f^2 / 2), ln 2 split in two.
# Within 1-2 ulps of the true log (tests/test_glue_llvm.py checks against float64's).
_LOG_COEFFICIENTS = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                     -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


_LOG_LN2_HI, _LOG_LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo


_FLT_MIN = 1.1754943508222875e-38  # the least normal float32: subnormals are scaled by 2^23 first


def _log(value):
    """float32 ``log(value)`` without calls: -inf at +-0, NaN below 0 and at NaN, inf at inf.
    ``value`` is bound once, as :func:`_exp`'s."""
    return _bound(value, "log_in", _log_of)


def _log_of(value):
    i32 = "int32"
    small = tirx.abs(value) < _f32(_FLT_MIN)
    x = tirx.Select(small, value * _f32(8388608.0), value)  # 2^23
    bits = tirx.reinterpret(i32, x)
    exponent = ((bits >> 23) & tirx.const(0xFF, i32)) - tirx.const(126, i32) \
        - tirx.Select(small, tirx.const(23, i32), tirx.const(0, i32))
    m = tirx.reinterpret(F32, (bits & tirx.const(0x007FFFFF, i32)) | tirx.const(0x3F000000, i32))  # [0.5, 1)
    low = m < _f32(0.70710678118654752440)
    exponent = exponent - tirx.Select(low, tirx.const(1, i32), tirx.const(0, i32))
    f = tirx.Select(low, m + m, m) - _f32(1.0)
    z = f * f
    poly = _f32(_LOG_COEFFICIENTS[0])
    for c in _LOG_COEFFICIENTS[1:]:
        poly = _fma(poly, f, _f32(c))
    e = tirx.Cast(F32, exponent)
    y = _fma(e, _f32(_LOG_LN2_LO), poly * f * z)
    y = _fma(z, _f32(-0.5), y)
    y = _fma(e, _f32(_LOG_LN2_HI), f + y)
    # the special inputs by their bits (TVM's simplifier takes float compares to be NaN-free)
    raw = tirx.reinterpret(i32, value)
    magnitude = raw & tirx.const(0x7FFFFFFF, i32)
    y = tirx.Select(tirx.Or(magnitude > tirx.const(0x7F800000, i32), raw < tirx.const(0, i32)),
                    _f32(float("nan")), y)  # NaN, and below zero
    y = tirx.Select(raw == tirx.const(0x7F800000, i32), _f32(float("inf")), y)
    return tirx.Select(magnitude == tirx.const(0, i32), _f32(float("-inf")), y)  # +-0


def _sigmoid(value):
    """The interpreter's ``1 / (1 + exp(-x))`` (float32; :func:`_exp` may differ from numpy's by an ulp)."""
    return _f32(1.0) / (_f32(1.0) + _exp(-value))


def _tanh(value):
    """TVM's llvm tanh formula with one ``exp`` instead of two: TVM evaluates both
    ``(1 - exp(-2x)) / (1 + exp(-2x))`` (taken for ``x >= 0``) and ``(exp(2x) - 1) / (exp(2x) + 1)``
    in every lane; the second is exactly the negated first at ``-x`` (IEEE negation and rounding
    are symmetric), so ``exp(-2|x|)`` serves both: tanh is odd (``tests/test_step_fusion.py``
    checks). The exp is :func:`_exp`, not libm's, so values may differ from TVM's by an ulp."""
    def of(v):
        def signed(e):
            magnitude = (_f32(1.0) - e) / (_f32(1.0) + e)
            # 0 - m, not -m: where exp(2x) rounds to 1 (tiny negative x) TVM's form gives +0
            return tirx.Select(v >= _f32(0.0), magnitude, _f32(0.0) - magnitude)

        return _bound(_exp(_f32(-2.0) * tirx.abs(v)), "tanh_exp", signed)

    return _bound(value, "tanh_in", of)


def _relu6(value):
    return _keeping_nan(value, tirx.Min(tirx.Max(value, _f32(0.0)), _f32(6.0)))


_UNARY = {
    "relu": lambda v, lo, hi: _activation(v, "relu", lo, hi),
    "clip": lambda v, lo, hi: _activation(v, "clip", lo, hi),
    "sigmoid": lambda v, lo, hi: _sigmoid(v),
    "tanh": lambda v, lo, hi: _tanh(v),  # TVM's exp-based tanh: within ~1e-7 of numpy's
    # vision activations, in csqc.numerics' float32 order (no multiply-add to contract)
    "hardsigmoid": lambda v, lo, hi: _relu6(v + _f32(3.0)) / _f32(6.0),
    "hardswish": lambda v, lo, hi: _bound(v, "hardswish_in", lambda x: (x * _relu6(x + _f32(3.0))) / _f32(6.0)),
    "silu": lambda v, lo, hi: _bound(v, "silu_in", lambda x: x * _sigmoid(x)),
    "sqrt": lambda v, lo, hi: tirx.sqrt(v),  # llvm.sqrt: vsqrtps, correctly rounded
    "exp": lambda v, lo, hi: _exp(v),
    "log": lambda v, lo, hi: _log(v),
    "erf": lambda v, lo, hi: _erf(v),  # gelu's rational form: within a few ulps of the true erf
    # libm's sinf / cosf, a call a lane: within an ulp at any argument (their full range
    # reduction); these ops run on embeddings of a few hundred values, where calls cost nothing
    "sin": lambda v, lo, hi: tirx.sin(v),
    "cos": lambda v, lo, hi: tirx.cos(v),
}


# the unary ops built on _exp (and _log, _erf: as long, their operand repeated)
_EXP_OPS = ("sigmoid", "tanh", "silu", "exp", "log", "erf")


def unary(op: str, shape, lo: float = 0.0, hi: float = 0.0) -> tirx.PrimFunc:
    """``y = op(x)``: relu, clip (to ``[lo, hi]``), sigmoid, tanh, hardsigmoid, hardswish or silu.
    Parameters: ``x: f32[shape], y: f32[shape]`` (parallel chunks, 16-lane vectors)."""
    if op not in _UNARY:
        raise ValueError(f"unary op must be one of {sorted(_UNARY)}, got {op!r}")
    shape = tuple(int(s) for s in shape)
    fn = _UNARY[op]

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, fn(x_flat[i], lo, hi), [i]))

    return prim_func([("x", shape, F32), ("y", shape, F32)], body)


@dataclass(frozen=True)
class ChainOp:
    """One elementwise node of :func:`elementwise_chain`: ``op`` (a :func:`unary` or :func:`binary`
    op, or ``slice``) of ``args`` (names of chain inputs or earlier ops) with output ``shape``;
    ``attrs`` are ``(lo, hi)`` of clip, ``(axis, start)`` of a slice, else empty."""

    name: str
    op: str
    shape: tuple
    args: tuple
    attrs: tuple = ()


@dataclass(frozen=True)
class ChainQuantize:
    """A quantizer at the end of :func:`elementwise_chain`, reading chain input or output ``source``:
    :func:`quantize`'s (``asymmetric`` False) or :func:`quantize_asymmetric`'s options."""

    source: str
    bits: int
    static_scale: float
    signed: bool = False
    offset: bool = False
    asymmetric: bool = False
    zero_point: int = 0
    centered: bool = False

    def params(self, shape) -> list[tuple[str, tuple, str]]:
        """Its output buffers, in :func:`quantize` / :func:`quantize_asymmetric`'s order."""
        out = [("scale", (1,), F32)] + ([("zero_point", (1,), "int32")] if self.asymmetric else [])
        out.append(("codes_pos", shape, "uint8"))
        if (self.centered if self.asymmetric else self.signed and not self.offset):
            out.append(("codes_neg", shape, "uint8"))
        return out


# the ops elementwise_chain fuses (quantizers apart)
CHAIN_OPS = frozenset(_UNARY) | frozenset(_BINARY) | {"slice"}


def elementwise_chain(inputs: Sequence[tuple[str, Sequence[int]]], ops: Sequence[ChainOp],
                      outputs: Sequence[str], quantizers: Sequence[ChainQuantize] = ()) -> tirx.PrimFunc:
    """Many elementwise ops in one kernel: the values nothing outside reads stay in registers.

    Parameters: the float32 ``inputs`` (name, shape), then ``y: float32`` for each op named in
    ``outputs``, then each quantizer's outputs (scale[, zero_point], codes_pos[, codes_neg]).
    Every element of an output is computed from the inputs by composing the ops' expressions
    (a slice shifts the index, a broadcast operand drops or zeroes it): the float32 operations
    of the unfused kernels in the same order, each op's result rounded (``_rounded``: no FMA
    across ops), so the outputs are bit for bit those of :func:`unary` / :func:`binary` /
    :func:`slice_axis` kernels run one by one. An op read by several outputs of one shape is
    one expression for LLVM to share. Outputs of one shape share a loop; the quantizers run
    last, on their (materialized) source buffers, as :func:`quantize` / :func:`quantize_asymmetric`.
    """
    shapes = {name: tuple(int(d) for d in shape) for name, shape in inputs}
    by_name = {}
    for op in ops:
        if op.op not in _UNARY and op.op not in _BINARY and op.op != "slice":
            raise ValueError(f"elementwise_chain cannot fuse op {op.op!r}")
        if any(a not in shapes for a in op.args) or op.name in shapes:
            raise ValueError(f"chain op {op.name} reads an unknown value or repeats a name")
        shapes[op.name] = tuple(int(d) for d in op.shape)
        by_name[op.name] = op
    if any(o not in by_name for o in outputs) or any(q.source not in shapes for q in quantizers):
        raise ValueError("chain outputs must be ops and quantizer sources inputs or outputs of the chain")
    if any(q.source in by_name and q.source not in outputs for q in quantizers):
        raise ValueError("a quantizer reads an op of the chain that is not an output")
    params = [(name, shapes[name], F32) for name, _ in inputs] + [(o, shapes[o], F32) for o in outputs]
    for q in quantizers:
        params += q.params(shapes[q.source])

    def exp_ops_under(name: str, stop: set) -> set:
        """The exp-based ops (``_EXP_OPS``) value ``name``'s expression contains, not looking
        past them or past the values in ``stop``."""
        if name not in by_name or name in stop:
            return set()
        op = by_name[name]
        if op.op in _EXP_OPS:
            return {name}
        return set().union(*(exp_ops_under(a, stop) for a in op.args))

    # An exp-based op inside another's operand is computed first into a buffer of its own: each
    # binds its operand once (Let), but TVM's passes still expand a Let nested in another's
    # value, so nesting them grows exponentially (a GRU cell's chain: 0.2 s to build staged,
    # 20 s not; minutes for an LSTM cell's tanh of its gates). In operand order, inner ones first.
    staged: list[str] = []
    for op in ops:
        if op.op in _EXP_OPS:
            for inner in sorted(exp_ops_under(op.args[0], set(staged)), key=[o.name for o in ops].index):
                staged.append(inner)

    def body(*buffers):
        flats = {name: _flat(b) for (name, _, _), b in zip(params, buffers[:len(inputs) + len(outputs)])}
        input_names = {name for name, _ in inputs}
        for name in staged:
            if name not in flats:
                flats[name] = I.alloc_buffer((_prod(shapes[name]),), F32, scope="global")
        ready: set[str] = set()  # staged values already in their buffers

        def value(name: str, index: list):
            """Element ``index`` (one expression per dimension of its shape) of value ``name``."""
            if name in input_names or name in ready:
                return flats[name][_row_major(index, shapes[name])]
            op = by_name[name]
            if op.op == "slice":
                axis, start = op.attrs
                shifted = list(index)
                shifted[axis] = shifted[axis] + start
                return value(op.args[0], shifted)
            operands = [value(a, _broadcast_index(index, shapes[a])) for a in op.args]
            if op.op in _UNARY:
                lo, hi = op.attrs or (0.0, 0.0)
                result = _UNARY[op.op](operands[0], lo, hi)
            else:
                result = _BINARY[op.op](*operands)
            return _rounded(result)

        def compute(group, shape):
            rows, row_len = _prod(shape[:-1]), int(shape[-1]) if shape else 1

            def emit(row, col):
                index = _unravel(row, shape[:-1]) + ([col] if shape else [])
                for o in group:
                    I.buffer_store(flats[o], value(o, index), [row * row_len + col])

            _for_each(rows, row_len, emit)

        for name in staged:
            compute([name], shapes[name])
            ready.add(name)
        rest_outputs = [o for o in outputs if o not in ready]
        for shape in dict.fromkeys(shapes[o] for o in rest_outputs):
            compute([o for o in rest_outputs if shapes[o] == shape], shape)
        rest = list(buffers[len(inputs) + len(outputs):])
        for q in quantizers:
            outs = [rest.pop(0) for _ in q.params(shapes[q.source])]
            source, n = flats[q.source], _prod(shapes[q.source])
            if q.asymmetric:
                _emit_quantize_asymmetric(source, n, _levels(q.bits), q.static_scale, q.zero_point, *outs,
                                          offset=q.offset)
            else:
                _emit_quantize(source, n, _levels(q.bits), q.static_scale, q.offset, *outs)

    return prim_func(params, body)


def channel_affine(shape, axis: int = 1) -> tirx.PrimFunc:
    """Unfused batch norm: ``y = x * mul[c] + add[c]`` (product rounded before the add).

    Parameters: ``x: f32[shape], mul: f32[C], add: f32[C], y: f32[shape]``.
    """
    shape = tuple(int(s) for s in shape)
    _, _, channels, _ = _channel_view(shape, axis)

    def body(x, mul, add, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each_channel(shape, axis, lambda i, c: I.buffer_store(y_flat, _rounded(x_flat[i] * mul[c]) + add[c], [i]))

    return prim_func([("x", shape, F32), ("mul", (channels,), F32), ("add", (channels,), F32), ("y", shape, F32)], body)


# Rational approximation of erf on [-4, 4] (Eigen's / TVM's fast_erf; |error| < 1e-6 there, and
# erf(x) rounds to +-1 in float32 beyond): vectorizes, where LLVM would call libm's scalar erff.
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)


def _bound(value, name: str, body):  # float32 values only
    """``body(v)`` with ``v`` bound once to ``value`` (``Let``): the expressions below read their
    operand many times, and TVM's passes walk every repeat of a written-out operand (nested
    exp-based ops grew exponentially)."""
    v = tirx.Var(name, F32)
    return tirx.Let(v, value, body(v))


_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)


def _erf(value):
    """float32 ``erf(value)``, within 4e-7 of the true one: clamps by selects, as :func:`_exp`'s,
    so a NaN stays NaN, and the rational form's result kept in [-1, 1] (near 4 it rose above 1 by
    an ulp). Each value is bound once (``Let``): written out, the clamps and the polynomials
    repeated ``value`` ~340 times and TVM took 3 s to simplify one gelu kernel (same code after)."""
    v, x, x2, y = (tirx.Var(name, F32) for name in ("erf_in", "erf_x", "erf_x2", "erf_y"))
    p = _f32(_ERF_ALPHA[0])
    for c in _ERF_ALPHA[1:]:
        p = p * x2 + _f32(c)
    q = _f32(_ERF_BETA[0])
    for c in _ERF_BETA[1:]:
        q = q * x2 + _f32(c)
    clamped_high = tirx.Select(v > _f32(4.0), _f32(4.0), v)
    at_most_one = tirx.Select(y > _f32(1.0), _f32(1.0), y)
    result = tirx.Let(y, (x * p) / q, tirx.Select(at_most_one < _f32(-1.0), _f32(-1.0), at_most_one))
    result = tirx.Let(x2, x * x, result)
    result = tirx.Let(x, tirx.Select(clamped_high < _f32(-4.0), _f32(-4.0), clamped_high), result)
    return tirx.Let(v, value, result)


def _gelu(value, approximate: str):
    """The interpreter's ``(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`` or its tanh form."""
    v = tirx.Var("gelu_in", F32)
    if approximate == "tanh":
        inner = _f32(0.7978845608028654) * (v + _f32(0.044715) * ((v * v) * v))
        t = tirx.tanh(inner)
    else:
        t = _erf(v * _f32(0.7071067811865476))
    return tirx.Let(v, value, (v * _f32(0.5)) * (_f32(1.0) + t))


def gelu(shape, approximate: str = "none") -> tirx.PrimFunc:
    """``y = gelu(x)`` (``approximate``: ``none``, the erf form, or ``tanh``).
    Parameters: ``x: f32[shape], y: f32[shape]`` (parallel chunks, 16-lane vectors)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    shape = tuple(int(s) for s in shape)

    def body(x, y):
        x_flat, y_flat = _flat(x), _flat(y)
        _for_each(1, _prod(shape), lambda _r, i: I.buffer_store(y_flat, _gelu(x_flat[i], approximate), [i]))

    return prim_func([("x", shape, F32), ("y", shape, F32)], body)
