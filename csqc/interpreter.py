"""Reference interpreter for the IR (numpy): the golden model every target is checked against.

Its integer path is exact: accumulators are computed with float64 BLAS on integer-valued
operands, which is exact while every partial sum stays below 2^53 (checked), then returned as
int64. Float operations follow the order the IR documents (``csqc.ir``), in float32.

Activation quantizers (``quantize``; ``L = 2^bits - 1``, float32, round half to even):

* symmetric (the CSQ reference): ``S = static_scale`` or ``max|x|``;
  ``code = sign(x) * round((|x| * L) / S)`` (clamped to ``L`` when static), 0 when ``S == 0``.
* asymmetric (``asymmetric=True``, ORT QDQ / torch.ao style): unsigned codes ``u`` in
  ``[0, L]`` with a zero point ``zp`` and the range ``R`` as the scale.  Dynamic:
  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``, ``R = hi - lo``,
  ``zp = round((-lo * L) / R)``; static: ``R = static_scale``, ``zp = zero_point`` (attribute).
  ``u = clamp(round((x * L) / R) + zp, 0, L)``; ``R == 0`` gives all codes 0 and ``zp = 0``.
  The value of a code is ``(float32(u - zp) * R) / L``; a quantized layer's accumulator is the
  exact ``sum((u - zp) * w)`` (runtimes may form it as ``sum(u * w) - zp * sum(w)`` per output
  channel) and its epilogue is the symmetric one with ``S = R``.  ``|u - zp| <= L``, so the
  accumulator bound is the symmetric one.  Overflow: ``R * L`` must be finite (dynamic), NaN
  and infinity are refused (static), exactly as for the symmetric quantizer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .bitplanes import kept_zero_point, unpack_planes
from .errors import BadInput, CsqcError
from . import numerics as num
from .ir import Graph, Node, QUANT_LAYER_OPS
from .numerics import conv2d_nchw
from .optable import OP_TABLE

__all__ = ["QValue", "run", "asymmetric_range", "asymmetric_zero_point", "decode_weight", "decode_weight_rows", "conv2d_nchw", "HANDLERS", "quantization_overflows",
           "largest_safe_scale", "scale_overflow",
           "overflow_error"]

_F32 = np.float32
_EXACT_LIMIT = 2.0**53


@dataclass(frozen=True)
class QValue:
    """A quantized activation at run time: integer codes and the float32 tensor scale ``S``
    (asymmetric: unsigned codes, the range ``R`` as ``scale`` and the zero point)."""

    codes: np.ndarray  # int32 codes in [-L, L] (or [0, L] when unsigned or asymmetric)
    scale: np.float32
    bits: int
    zero_point: int = 0
    asymmetric: bool = False

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def centered(self) -> np.ndarray:
        """The integers a quantized layer multiplies: ``codes - zero_point`` (int32)."""
        return self.codes - np.int32(self.zero_point) if self.zero_point else self.codes

    def dequantize(self) -> np.ndarray:
        return (self.centered().astype(_F32) * _F32(self.scale)) / _F32(self.levels)


def decode_weight(g: Graph, n: Node) -> np.ndarray:
    """The integer weight (int64, ``weight_shape``) a quantized layer multiplies with."""
    return decode_weight_rows(g, n, 0, n.attr("weight_shape")[0])


def decode_weight_rows(g: Graph, n: Node, start: int, end: int) -> np.ndarray:
    """Output rows ``start:end`` of ``decode_weight`` (int64), decoding only those rows."""
    spec, w = n.quant, g.params[n.layer.weight]
    shape = (end - start,) + tuple(n.attr("weight_shape"))[1:]
    if spec.encoding == "int":
        return w[start:end].astype(np.int64).reshape(shape)
    k = int(np.prod(shape[1:]))
    rows = w[:, start:end]
    planes = unpack_planes(rows, k, spec.packed_word) if spec.packed_word else rows
    q = np.zeros((shape[0], k), dtype=np.int64)
    for (shift, sign), plane in zip(spec.planes, planes):
        q += sign * (1 << shift) * plane.astype(np.int64)
    return (q - spec.zero_point).reshape(shape)


_channel = num.channel


def _activation(n: Node, y: np.ndarray) -> np.ndarray:
    return num.activation(n.attr("act", "none"), y, n.attr("clip_lo"), n.attr("clip_hi"))


def _quant_layer(g: Graph, n: Node, x, record: dict | None, planes_used: Mapping[str, int] | None):
    q = decode_weight(g, n)
    if planes_used and n.name in planes_used and n.quant.encoding != "int":
        q = _truncated_weight(g, n, planes_used[n.name])
    is_conv = n.op == "qconv2d"
    axis = 1 if is_conv else -1
    if isinstance(x, QValue):
        a = x.centered().astype(np.float64)
        bound = float(np.abs(q).sum(axis=tuple(range(1, q.ndim))).max(initial=0)) * x.levels
        if bound >= _EXACT_LIMIT:
            raise CsqcError(f"{n.name}: accumulator bound {bound:.3g} exceeds the exact range of the interpreter")
        if is_conv:
            acc = conv2d_nchw(a, q.astype(np.float64), n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups"))
        else:  # one 2-D product: numpy runs a stacked [..., M, K] one as a BLAS call per matrix
            acc = (a.reshape(-1, a.shape[-1]) @ q.astype(np.float64).T).reshape(*a.shape[:-1], q.shape[0])
        acc = acc.astype(np.int64)
        if record is not None:
            record[f"{n.name}.acc"] = acc << n.quant.low_shift  # comparable across plane-shift passes
        return layer_output(g, n, acc, x.scale, x.levels)
    xf = np.asarray(x, dtype=_F32)
    wf = q.astype(_F32)
    if is_conv:
        y = conv2d_nchw(xf, wf, n.attr("stride"), n.attr("padding"), n.attr("dilation"), n.attr("groups")).astype(_F32)
    else:
        y = (xf @ wf.T).astype(_F32)
    return _layer_tail(g, n, y, axis)


def layer_output(g: Graph, n: Node, acc: np.ndarray, scale, levels: int):
    """Quantized layer ``n``'s output from its integer accumulators ``acc`` (channels on axis 1
    of a conv's, the last axis of a linear layer's) and its input codes' scale and levels:
    ``y = ((f32(acc) * S) / L) * mult[c] + add[c]``, the activation, then the fused output
    quantization where the layer has one (a QValue) -- the float32 order every runtime follows."""
    y = (np.asarray(acc, np.int64).astype(_F32) * _F32(scale)) / _F32(levels)
    return _layer_tail(g, n, y, 1 if n.op == "qconv2d" else -1)


def _layer_tail(g: Graph, n: Node, y: np.ndarray, axis: int):
    parts = n.layer
    y = y * _channel(g.params[parts.mult], y.ndim, axis)
    if parts.add:
        y = y + _channel(g.params[parts.add], y.ndim, axis)
    y = _activation(n, y.astype(_F32))
    if n.quant.out_bits is not None:  # fused output quantization: exactly quantize(y) with its static scale
        return _quantize_values(lambda: n.name, y, n.quant.out_bits, n.quant.out_scale)
    return y


def _truncated_weight(g: Graph, n: Node, keep: int) -> np.ndarray:
    """PrecisionBatching's run-time knob: only the ``keep`` most significant planes count, with
    the zero point that goes with them (``bitplanes.kept_zero_point``)."""
    spec = n.quant
    zero_point = kept_zero_point(spec.zero_point, [shift for shift, _ in spec.planes], keep)
    sub = n.replace(quant=spec.replace(planes=spec.planes[:keep], zero_point=zero_point))
    weight = n.layer.weight
    tmp = g.with_params({weight + "#trunc": g.params[weight][:keep]})
    return decode_weight(tmp, sub.replace(inputs=tuple(weight + "#trunc" if i == weight else i for i in n.inputs)))


def quantization_overflows(scale, levels) -> bool:
    """Whether ``|x| * L`` overflows float32 for some ``|x| <= scale`` (or the scale is NaN).

    Every runtime computes ``(|x| * L) / S`` in float32; rounding is monotonic, so the
    largest ``|x|`` (the dynamic scale itself) decides: this is the exact bound.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return not np.isfinite(_F32(scale) * _F32(levels))


@functools.lru_cache(maxsize=None)
def largest_safe_scale(levels: int) -> float:
    """The largest float32 ``S`` with ``S * L`` finite in float32, so that
    ``quantization_overflows(s, levels) == (not s <= largest_safe_scale(levels))`` for every
    float32 ``s`` (NaN included): one float comparison where a call is timed in microseconds."""
    lo, hi = 0, int(np.array(np.finfo(_F32).max, _F32).view(np.uint32))  # positive floats order like their bits
    while lo < hi:  # the largest bit pattern whose float does not overflow
        mid = (lo + hi + 1) // 2
        if quantization_overflows(np.array(mid, np.uint32).view(_F32), levels):
            hi = mid - 1
        else:
            lo = mid
    return float(np.array(lo, np.uint32).view(_F32))


def scale_overflow(quantize: str, scale, levels: int) -> str:
    """Where an overflow shows, for ``overflow_error``: a dynamic scale out of range."""
    if not np.isfinite(scale):
        return f"{quantize} quantizes NaN or infinite activations"
    return f"{quantize} quantizes activations up to {float(scale):.4g}, and {float(scale):.4g} * {levels} overflows"


def overflow_error(where: str) -> BadInput:
    """The one error every runtime raises for an input that leaves float32's range inside the model."""
    return BadInput(f"the input overflows float32 inside the model ({where}); csqc refuses inputs whose "
                    "activations leave float32's range: scale the input down")


def _quantize(n: Node, x: np.ndarray) -> QValue:
    if n.attr("asymmetric", False):
        return _quantize_asymmetric(lambda: n.name, x, n.attr("bits"), n.attr("static_scale", 0.0),
                                    n.attr("zero_point", 0))
    return _quantize_values(lambda: n.name, x, n.attr("bits"), n.attr("static_scale", 0.0))


def asymmetric_range(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(lo, R)`` of the dynamic asymmetric quantizer: ``lo = min(min(x), 0)``, ``R = max(max(x), 0) - lo``."""
    lo = _F32(min(_F32(x.min(initial=0)), _F32(0)))
    hi = _F32(max(_F32(x.max(initial=0)), _F32(0)))
    return lo, _F32(hi - lo)


def asymmetric_zero_point(lo: np.float32, r: np.float32, levels: int) -> int:
    """``round((-lo * L) / R)``, 0 when ``R == 0`` (float32, half to even)."""
    return int(np.round((-lo * _F32(levels)) / r)) if r > 0 else 0


def _quantize_asymmetric(name: Callable[[], str], x: np.ndarray, bits: int, static: float, zero_point: int) -> QValue:
    """The asymmetric quantizer (module docstring): unsigned codes, range and zero point of ``x``."""
    levels = _F32(2**bits - 1)
    x = np.asarray(x, dtype=_F32)
    if static > 0:
        if not np.isfinite(x).all():
            raise overflow_error(f"{name()} quantizes NaN or infinite activations")
        r, zp = _F32(static), int(zero_point)
    else:
        if not np.isfinite(x).all():
            raise overflow_error(f"{name()} quantizes NaN or infinite activations")
        lo, r = asymmetric_range(x)
        if quantization_overflows(r, levels):
            raise overflow_error(scale_overflow(name(), r, int(levels)))
        zp = asymmetric_zero_point(lo, r, int(levels))
    if not r > 0:
        return QValue(np.zeros(x.shape, dtype=np.int32), r, bits, 0, True)
    codes = np.clip(np.round((x * levels) / r) + _F32(zp), _F32(0), levels)
    return QValue(codes.astype(np.int32), r, bits, zp, True)


def _quantize_values(name: Callable[[], str], x: np.ndarray, bits: int, static: float) -> QValue:
    """``quantize`` (and a layer's fused output quantization): codes and scale of ``x``;
    ``name()`` names the node in an overflow error (read only then)."""
    levels = _F32(2**bits - 1)
    x = np.asarray(x, dtype=_F32)
    s = _F32(static) if static > 0 else _F32(np.abs(x).max(initial=0))
    if static > 0 and not np.isfinite(x).all():  # a static scale clamps huge values, not NaN
        raise overflow_error(f"{name()} quantizes NaN or infinite activations")
    if static <= 0 and quantization_overflows(s, levels):
        raise overflow_error(scale_overflow(name(), s, int(levels)))
    if s > 0:
        mag = np.round((np.abs(x) * levels) / s)
        if static > 0:
            mag = np.minimum(mag, levels)
        codes = (np.sign(x) * mag).astype(np.int32)
    else:
        codes = np.zeros(x.shape, dtype=np.int32)
    return QValue(codes, s, bits)


def _float(v):
    return v.dequantize() if isinstance(v, QValue) else v


def _table_handler(evaluate: Callable) -> Callable:
    # float ops see quantized inputs as their float values
    return lambda g, n, a, **k: evaluate(n, [_float(v) for v in a])


# op -> handler(graph, node, inputs): the table's numpy semantics, plus the quantization ops
HANDLERS: dict[str, Callable] = {
    **{name: _table_handler(d.evaluate) for name, d in OP_TABLE.items() if d.evaluate is not None},
    "quantize": lambda g, n, a, **k: _quantize(n, _float(a[0])),
    "dequantize": lambda g, n, a, **k: a[0].dequantize(),
}


def _integer_input(name: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "iu" and not (x.dtype.kind == "f" and np.isfinite(x).all() and (x == np.round(x)).all()):
        raise BadInput(f"input {name}: expected integer ids, got {x.dtype} values that are not whole numbers")
    return x.astype(np.int64)


def run(g: Graph, inputs, *, record: dict | None = None, planes_used: Mapping[str, int] | None = None,
        codes_of: Callable[[Node, np.ndarray], QValue | None] | None = None) -> list[np.ndarray]:
    """Run ``g`` on ``inputs`` (a list of arrays, or a dict by input name).

    With ``record`` (a dict), every intermediate value is stored in it by name, plus each
    quantized layer's exact accumulator as ``<layer>.acc`` (scaled back by ``low_shift``) and
    each quantize node's codes and scale as ``<node>.codes`` / ``<node>.scale`` (and an
    asymmetric one's zero point as ``<node>.zero_point``).
    ``planes_used`` maps layer names to how many most-significant planes to accumulate.
    ``codes_of(node, x)``, where given, may replace a quantize node's output: it gets the node and
    its float input and returns the codes to use instead, or None for the node's own
    (``csqc.forced_codes``: another runtime's codes, checked against ``x``).
    """
    if isinstance(inputs, Mapping):
        inputs = [inputs[v.name] for v in g.inputs]
    if len(inputs) != len(g.inputs):
        raise BadInput(f"model takes {len(g.inputs)} input(s), got {len(inputs)}")
    env: dict = dict(g.params)
    for v, x in zip(g.inputs, inputs):
        x = np.asarray(x)
        if tuple(x.shape) != v.type.shape:
            raise BadInput(f"input {v.name}: expected shape {list(v.type.shape)}, got {list(x.shape)}")
        if v.type.dtype != "float32":  # token ids: kept integer for the embedding that reads them
            env[v.name] = _integer_input(v.name, x)
            continue
        if x.dtype != np.float32:
            if x.dtype.kind not in "fiu":
                raise BadInput(f"input {v.name}: expected float32 data, got {x.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: refused just below
                x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise BadInput(f"input {v.name} contains NaN or infinity")
        env[v.name] = x
    for n in g.nodes:
        args = [env[i] for i in n.inputs]
        # an overflow is refused where it matters (quantize, outputs), with one message
        with np.errstate(over="ignore", invalid="ignore"):
            if n.op in QUANT_LAYER_OPS:
                out = _quant_layer(g, n, args[0], record, planes_used)
            else:
                out = codes_of(n, args[0]) if codes_of is not None and n.op == "quantize" else None
                if out is None:
                    handler = HANDLERS.get(n.op)
                    if handler is None:
                        raise CsqcError(f"interpreter has no handler for op {n.op!r} ({n.name})")
                    out = handler(g, n, args)
        env[n.name] = out
        if record is not None:
            record[n.name] = out
            if isinstance(out, QValue):
                record[f"{n.name}.codes"] = out.codes
                record[f"{n.name}.scale"] = out.scale
                if out.asymmetric:
                    record[f"{n.name}.zero_point"] = np.int32(out.zero_point)
    outputs = [_float(env[o]) for o in g.outputs]
    for name, y in zip(g.outputs, outputs):
        if not np.isfinite(y).all():
            raise overflow_error(f"output {name} is NaN or infinite")
    return outputs
