"""The deployable ONNX model: compact QDQ weights, static activation scales, MatMulNBits.

``emit_deploy(graph, calibration_inputs)`` writes what a user would ship (opset 21, any batch
size where the graph allows it):

* convolutions (and linear layers that MatMulNBits cannot hold) as QDQ: per-channel ``int8``
  weights, ``int4`` where every channel's integers fit, with the layer's per-channel ``mult``
  as the weight scale, so CSQ's integers are stored as they are; activations get static
  ``uint8`` scales calibrated by running the interpreter on ``calibration_inputs``. With
  ``int8`` weights ORT fuses ``DQ -> Conv -> Q`` into ``QLinearConv``; ``int4`` weights are
  dequantized at run time (smaller file, slower, shared/notes/onnx-ort.md);
* linear layers whose integers fit 2, 4 or 8 bits as ``com.microsoft::MatMulNBits`` at
  ``accuracy_level`` 0 (fp32 compute, exact dequantized weights);
* everything else as in the reference model (``csqc.targets.onnx.reference.EMITTERS``).

It is an approximation of the CSQ model (static instead of dynamic activation scales, 8-bit
activation grid); the caller measures the cost (``accuracy_cost``) and fills the report.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from csqc import interpreter
from csqc.bitplanes import trailing_zero_bits
from csqc.errors import BadInput, CompileError
from csqc.interpreter import decode_weight
from csqc.ir import Graph, Node

from .reference import EMITTERS, GraphEmitter, OPSET

__all__ = ["emit_deploy", "emit_float", "calibrate", "accuracy_cost", "MATMULNBITS_BITS"]

MATMULNBITS_BITS = (2, 4, 8)  # the only widths ORT's MatMulNBits accepts
_F32 = np.float32
_MS_DOMAIN = "com.microsoft"


# -- calibration -------------------------------------------------------------------------------


def _batches(graph: Graph, calibration_inputs) -> list[list[np.ndarray]]:
    """Cut the calibration samples into batches of the graph's size (the last one topped up by repeats).

    ``calibration_inputs``: arrays of samples (any leading size) for a one-input graph, or
    tuples with one array per input.
    """
    items = [calibration_inputs] if isinstance(calibration_inputs, np.ndarray) else list(calibration_inputs or ())
    if not items:
        raise BadInput("deploy needs calibration inputs (a few batches of typical data)")
    items = [(a,) if isinstance(a, np.ndarray) else tuple(a) for a in items]
    if any(len(it) != len(graph.inputs) for it in items):
        raise BadInput(f"calibration items must hold {len(graph.inputs)} array(s) each, one per model input")
    stacked = [np.concatenate([np.asarray(it[i], _F32).reshape((-1,) + spec.type.shape[1:]) for it in items])
               for i, spec in enumerate(graph.inputs)]
    batch, n = graph.inputs[0].type.shape[0], len(stacked[0])
    return [[x[np.arange(start, start + batch) % n] for x in stacked] for start in range(0, n, batch)]


def calibrate(graph: Graph, calibration_inputs) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of every float value of ``graph`` over the calibration batches."""
    ranges: dict[str, tuple[float, float]] = {}
    for batch in _batches(graph, calibration_inputs):
        record: dict = {}
        interpreter.run(graph, batch, record=record)
        record.update({v.name: x for v, x in zip(graph.inputs, batch)})
        for name, value in record.items():
            if isinstance(value, np.ndarray) and value.dtype == _F32 and value.size:
                lo, hi = float(value.min()), float(value.max())
                old = ranges.get(name)
                ranges[name] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
    return ranges


def _uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an asymmetric uint8 grid that holds [lo, hi] and 0 exactly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return _F32(1.0), np.uint8(0)
    scale = _F32((hi - lo) / 255.0)
    zero_point = np.uint8(np.clip(round(-lo / float(scale)), 0, 255))
    return scale, zero_point


# -- weights ------------------------------------------------------------------------------------


def _channel_integers(q: np.ndarray, mult: np.ndarray, lo: int, hi: int):
    """Per output channel: integers in [lo, hi] and float scales with ``ints * scale == q * mult``.

    Each channel may flip its sign and shift out common low zero bits (both exact); a
    channel that still does not fit is rounded to fewer bits (``exact`` False).
    """
    out_ch = q.shape[0]
    rows = q.reshape(out_ch, -1).astype(np.int64)
    ints = np.zeros_like(rows)
    scales = np.ones(out_ch, _F32)
    exact = True
    for c in range(out_ch):
        row, m = rows[c], float(mult[c])
        if m == 0 or not row.any():
            continue  # a dead channel: zero integers, scale 1
        shift = trailing_zero_bits(row)
        row = row >> shift
        sign = -1 if m < 0 else 1
        if not (lo <= (sign * row).min() and (sign * row).max() <= hi):
            if lo <= (-sign * row).min() and (-sign * row).max() <= hi:
                sign = -sign  # the other sign fits (e.g. [-1, 2] into 2 bits as [-2, 1])
        row = sign * row
        while row.min() < lo or row.max() > hi:
            row, shift, exact = np.round(row / 2).astype(np.int64), shift + 1, False
        ints[c] = row
        scales[c] = _F32(abs(m) * 2.0**shift) * _F32(sign * np.sign(m))
    return ints.reshape(q.shape), scales, exact


def _float_integers(w: np.ndarray):
    """Symmetric per-channel int8 of a float weight (float layers csqc did not quantize)."""
    rows = w.reshape(w.shape[0], -1)
    scales = (np.abs(rows).max(axis=1) / 127.0).astype(_F32)
    scales[scales == 0] = 1.0
    ints = np.clip(np.round(rows / scales[:, None]), -127, 127).astype(np.int64)
    return ints.reshape(w.shape), scales


def _pack_nbits(ints: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, int]:
    """``[N, K]`` signed ints -> MatMulNBits ``B [N, blocks, block*bits/8]`` (default zero point)."""
    n, k = ints.shape
    blocks = -(-k // block)
    zero_point = 1 << (bits - 1)
    unsigned = np.full((n, blocks * block), zero_point, np.int64)  # padding dequantizes to 0
    unsigned[:, :k] = ints + zero_point
    per_byte = 8 // bits
    packed = np.zeros((n, blocks * block // per_byte), np.uint8)
    for i in range(per_byte):  # lowest bits hold the first value
        packed |= (unsigned[:, i::per_byte] << (bits * i)).astype(np.uint8)
    return packed.reshape(n, blocks, block * bits // 8), blocks


# -- emitters -----------------------------------------------------------------------------------


class _DeployEmitter(GraphEmitter):
    def __init__(self, graph: Graph, ranges, *, float_weights: bool, int4: bool, dynamic_batch: bool):
        super().__init__(graph, DEPLOY_EMITTERS, dynamic_batch=dynamic_batch)
        self.ranges = ranges
        self.float_weights = float_weights
        self.int4 = int4
        self.qdq: dict[str, str] = {}  # float tensor -> its QDQ'd version
        self.formats: list[dict] = []

    def qdq_of(self, tensor: str, value: str) -> str:
        """``tensor`` through QuantizeLinear/DequantizeLinear with the calibrated uint8 grid of ``value``."""
        if self.float_weights:
            return tensor
        if tensor not in self.qdq:
            lo, hi = self.ranges.get(value, (0.0, 0.0))
            scale, zp = _uint8_params(lo, hi)
            s = self.b.const(f"{value}.act_scale", np.array(scale, _F32))
            z = self.b.const(f"{value}.act_zero_point", np.array(zp, np.uint8))
            q = self.b.op("QuantizeLinear", [tensor, s, z], f"{value}.q")
            self.qdq[tensor] = self.b.op("DequantizeLinear", [q, s, z], f"{value}.dq")
        return self.qdq[tensor]

    def weight(self, n: Node, ints: np.ndarray, scales: np.ndarray, axis: int) -> tuple[str, str]:
        """A DequantizeLinear of per-channel ``ints`` (int4 when they fit and allowed, else int8)."""
        use4 = self.int4 and ints.min(initial=0) >= -8 and ints.max(initial=0) <= 7
        if use4:
            w = helper.make_tensor(f"{n.name}.weight_int4", TensorProto.INT4, ints.shape, ints.reshape(-1).tolist())
            zp = helper.make_tensor(f"{n.name}.weight_zero_point", TensorProto.INT4, [len(scales)], [0] * len(scales))
            self.b.taken.update({w.name, zp.name})
            self.b.initializers += [w, zp]
            w_name, zp_name = w.name, zp.name
        else:
            w_name = self.b.const(f"{n.name}.weight_int8", ints.astype(np.int8))
            zp_name = self.b.const(f"{n.name}.weight_zero_point", np.zeros(len(scales), np.int8))
        s_name = self.b.const(f"{n.name}.weight_scale", scales.astype(_F32))
        deq = self.b.op("DequantizeLinear", [w_name, s_name, zp_name], f"{n.name}.weight", axis=axis)
        return deq, "int4" if use4 else "int8"


def _emit_deploy_layer(e: _DeployEmitter, n: Node) -> str:
    is_conv = n.op in ("qconv2d", "conv2d")
    quantized = n.op in ("qconv2d", "qlinear")
    ndim = len(n.type.shape)
    x = e.float_of(n.inputs[0])
    if quantized:  # CSQ integers and their per-channel scale: W = q * mult
        q, mult = decode_weight(e.g, n), e.g.params[n.inputs[2]]
        wf = q.astype(_F32) * mult.reshape((-1,) + (1,) * (q.ndim - 1))
        bias = e.g.params[n.inputs[3]] if len(n.inputs) == 4 else None
    else:
        wf = e.g.params[n.inputs[1]].astype(_F32)
        bias = e.g.params[n.inputs[2]] if len(n.inputs) == 3 else None
    fmt: dict = {"name": n.name, "op": n.op}
    if e.float_weights:
        w = e.b.const(f"{n.name}.weight", wf if is_conv else np.ascontiguousarray(wf.T))
        fmt.update(format="float32", exact_weights=True)
    elif not is_conv and quantized and (y := _matmul_nbits(e, n, x, q, mult, fmt)) is not None:
        w = None
    else:
        if quantized:
            ints, scales, exact = _channel_integers(q, mult, -128, 127)
        else:
            (ints, scales), exact = _float_integers(wf), False
        x = e.qdq_of(x, _calibration_name(e, n.inputs[0]))
        if not is_conv:  # MatMul reads the weight as [K, N]: per-channel along axis 1
            ints = np.ascontiguousarray(ints.T)
        w, kind = e.weight(n, ints, scales, axis=0 if is_conv else 1)
        fmt.update(format=f"{kind}-qdq", exact_weights=bool(quantized and exact))
    if w is not None and is_conv:
        ph, pw = n.attr("padding")
        inputs = [x, w] + ([e.b.const(f"{n.name}.bias", bias.astype(_F32))] if bias is not None else [])
        y = e.b.op("Conv", inputs, f"{n.name}.conv", kernel_shape=list(wf.shape[2:]), strides=list(n.attr("stride")),
                   pads=[ph, pw, ph, pw], dilations=list(n.attr("dilation")), group=int(n.attr("groups")))
        bias = None
    elif w is not None:
        y = e.b.op("MatMul", [x, w], f"{n.name}.matmul")
    if bias is not None:
        y = e.b.op("Add", [y, e.b.const(f"{n.name}.bias", bias.astype(_F32))], f"{n.name}.add_bias")
    out = e.activation(n, y, e.b.available(n.name))
    e.formats.append(fmt)
    if n.name in e.g.outputs or e.float_weights:
        return out
    return e.qdq_of(out, n.name)  # a Q after the layer lets ORT fuse DQ -> Conv -> Q into QLinearConv


def _matmul_nbits(e: _DeployEmitter, n: Node, x: str, q: np.ndarray, mult: np.ndarray, fmt: dict) -> str | None:
    """The layer as MatMulNBits when its integers fit 2, 4 or 8 bits exactly (else None)."""
    for bits in MATMULNBITS_BITS:
        ints, scales, exact = _channel_integers(q, mult, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        if exact:
            break
    else:
        return None
    out_ch, k = ints.shape
    block = int(min(128, max(16, 1 << (k - 1).bit_length())))  # a power of two >= 16
    packed, blocks = _pack_nbits(ints, bits, block)
    b = e.b.const(f"{n.name}.weight_nbits", packed)
    s = e.b.const(f"{n.name}.weight_scale", np.repeat(scales, blocks).astype(_F32))
    fmt.update(format=f"matmulnbits-{bits}", exact_weights=True, block_size=block)
    return e.b.op("MatMulNBits", [x, b, s], f"{n.name}.matmul", domain=_MS_DOMAIN, K=k, N=out_ch, bits=bits,
                  block_size=block, accuracy_level=0)


def _calibration_name(e: _DeployEmitter, value: str) -> str:
    """The IR value whose calibrated range describes ``value``'s float tensor."""
    producer = e.g.producers().get(value)
    while producer is not None and producer.op in ("quantize", "dequantize"):
        value = producer.inputs[0]
        producer = e.g.producers().get(value)
    return value


def _emit_deploy_quantize(e: _DeployEmitter, n: Node) -> str:
    # CSQ's dynamic a-bit quantization becomes a static uint8 grid calibrated on its input
    x = e.float_of(n.inputs[0])
    return e.qdq_of(x, _calibration_name(e, n.inputs[0]))


DEPLOY_EMITTERS = {
    **EMITTERS,
    "quantize": _emit_deploy_quantize,
    "dequantize": lambda e, n: e.float_of(n.inputs[0]),
    "qconv2d": _emit_deploy_layer,
    "qlinear": _emit_deploy_layer,
    "conv2d": _emit_deploy_layer,
    "linear": _emit_deploy_layer,
}


def _build(graph: Graph, ranges, *, float_weights: bool, int4: bool,
           dynamic_batch: bool | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    kind = "float32" if float_weights else "deploy"
    # a shippable model takes any batch size unless a reshape forbids it; True: it must
    for dynamic in (True, False) if dynamic_batch is None else (dynamic_batch,):
        emitter = _DeployEmitter(graph, ranges, float_weights=float_weights, int4=int4, dynamic_batch=dynamic)
        try:
            model = emitter.emit(kind, {"csqc.dynamic_batch": str(dynamic).lower()},
                                 domains={} if float_weights else {_MS_DOMAIN: 1})
        except CompileError as err:
            if dynamic and dynamic_batch is None and "batch" in str(err):
                continue
            raise
        onnx.checker.check_model(model, full_check=True)
        return model, emitter.formats
    raise AssertionError("unreachable")


def emit_float(graph: Graph) -> onnx.ModelProto:
    """The same network with plain fp32 weights (the size baseline of ``emit_deploy``)."""
    return _build(graph, {}, float_weights=True, int4=False)[0]


def emit_deploy(graph: Graph, calibration_inputs: Sequence[np.ndarray], *, int4: bool = True,
                dynamic_batch: bool | None = None) -> tuple[onnx.ModelProto, dict]:
    """The deployable model and its report (see module docstring).

    ``calibration_inputs``: arrays of samples (leading axis) for the graph's input, or one
    list of arrays per sample batch for multi-input graphs; they are cut into batches of the
    graph's batch size. ``int4=False`` keeps every QDQ weight int8 (fused, faster kernels).
    ``dynamic_batch``: None gives a symbolic batch dimension where the graph allows it, True
    requires one (``CompileError`` otherwise), False keeps the graph's batch size.
    Report: ``size_bytes``, ``fp32_size_bytes``, ``compression``, ``layers`` (weight format of
    each layer), and the accuracy-cost fields ``accuracy``, ``reference_accuracy``,
    ``accuracy_drop``, ``top1_agreement``, ``max_abs_error`` left ``None`` for the caller
    (``accuracy_cost`` fills them).
    """
    ranges = calibrate(graph, calibration_inputs)
    model, formats = _build(graph, ranges, float_weights=False, int4=int4, dynamic_batch=dynamic_batch)
    fp32 = emit_float(graph)
    size, fp32_size = model.ByteSize(), fp32.ByteSize()
    report = {
        "size_bytes": size,
        "fp32_size_bytes": fp32_size,
        "compression": round(fp32_size / size, 3) if size else None,
        "opset": OPSET,
        "layers": formats,
        "calibration_batches": len(_batches(graph, calibration_inputs)),
        "accuracy": None,
        "reference_accuracy": None,
        "accuracy_drop": None,
        "top1_agreement": None,
        "max_abs_error": None,
    }
    return model, report


def accuracy_cost(report: dict, deploy_outputs: np.ndarray, reference_outputs: np.ndarray,
                  labels: np.ndarray | None = None) -> dict:
    """Fill ``report``'s accuracy-cost fields from outputs of the deploy model and the reference."""
    deploy_outputs, reference_outputs = np.asarray(deploy_outputs), np.asarray(reference_outputs)
    if deploy_outputs.shape != reference_outputs.shape:
        raise BadInput(f"output shapes differ: {deploy_outputs.shape} vs {reference_outputs.shape}")
    report = dict(report)
    report["max_abs_error"] = float(np.abs(deploy_outputs - reference_outputs).max(initial=0))
    if deploy_outputs.ndim == 2:
        top_d, top_r = deploy_outputs.argmax(-1), reference_outputs.argmax(-1)
        report["top1_agreement"] = float((top_d == top_r).mean())
        if labels is not None:
            labels = np.asarray(labels)
            report["accuracy"] = float((top_d == labels).mean())
            report["reference_accuracy"] = float((top_r == labels).mean())
            report["accuracy_drop"] = report["reference_accuracy"] - report["accuracy"]
    return report
