"""The reference ONNX model: csqc IR -> an ONNX graph that ONNX Runtime runs integer-exactly.

``emit_reference(graph)`` takes a graph after the ``integer`` pipeline (or the ``none``
pipeline's captured graph, or any later one) and writes every op through a table of emitters
(``EMITTERS``), one per IR op. Quantized layers follow the IR's contract (``csqc.ir``):

* ``quantize`` becomes the CSQ-order activation quantization ``Abs -> ReduceMax -> Mul(L) ->
  Div(S) -> Round -> * Sign`` (``S == 0`` guarded exactly like the interpreter's
  ``_quantize``; a static scale clamps codes to ``L``); an asymmetric one computes the range,
  zero point and unsigned codes in the interpreter's float order, then carries the centered
  codes ``u - zp`` (exact in float32) like signed codes, so layers and dequantize need nothing new;
* the integer product is ``ConvInteger`` / ``MatMulInteger``: unsigned activation codes are one
  ``uint8`` tensor, signed codes are split into ``uint8`` positive and negative parts; weights
  are ``int8`` when ``|q| <= 127``, otherwise split into ``uint8`` base-256 digits ``P - N``
  (exact: ONNX Runtime's int32 accumulators are bit-exact, see shared/notes/onnx-ort.md);
* the epilogue is ``((float(acc) * S) / L) * mult + add`` and the fused activation, in exactly
  the interpreter's order.

With ``check_planes=True`` each layer instead multiplies by every weight bitplane separately
(the layer's own ``posneg``/``offset`` planes, or the signed-digit ``posneg`` planes of an
``int`` layer) and sums the planes with their signed power-of-two weights and the offset
correction, so ONNX Runtime checks the plane decomposition itself.

Every quantized layer exposes stably named tensors ``<layer>.xq`` (activation codes: uint8, or
int16 when signed), ``<layer>.acc`` (the integer accumulator in the spec's ``acc_dtype``;
multiply by ``2**acc_shift`` to compare with ``interpreter.run``'s record) and ``<layer>.out``
(its float output), plus the float tensor it quantized and the scale ``S``. One JSON row per
layer in ``metadata_props['csqc.layers']`` (``layer_table``) names them for verifiers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from csqc import numerics as num
from csqc.bitplanes import posneg_planes, unpack_planes
from csqc.errors import BadInput, CompileError
from csqc.interpreter import decode_weight
from csqc.ir import Graph, Node

__all__ = [
    "OPSET", "IR_VERSION", "LAYERS_KEY", "emit_reference", "unsupported_ops", "layer_table", "weight_terms", "EMITTERS",
    "GraphEmitter", "LayerTensors",
]

OPSET = 21  # ORT 1.31 runs default-domain opsets up to 25; 21 has everything this needs
IR_VERSION = 10  # onnx stamps 14 by default, which ORT 1.31 refuses
LAYERS_KEY = "csqc.layers"
INT32_MAX = 2**31 - 1

_F32 = np.float32
_ONNX_DTYPE = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}


# -- building blocks -------------------------------------------------------------------------


class _Builder:
    """Collects ONNX nodes and initializers under unique tensor names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.taken: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def available(self, base: str) -> str:
        """``base`` or ``base_1``, ``base_2``, ...: the first name not taken (not reserved)."""
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def fresh(self, base: str) -> str:
        name = self.available(base)
        self.taken.add(name)
        return name

    def const(self, base: str, array: np.ndarray, shared: bool = True) -> str:
        """An initializer named after ``base``; small ones are shared by value (levels, shapes,
        shifts) unless ``shared`` is False (a quantizer's own static scale or zero point, which
        verify and the calibration check find by name)."""
        array = np.asarray(array)
        shared = shared and array.size <= 16
        if shared:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if shared:
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], out: str, *, domain: str = "", exact_name: bool = False, **attrs) -> str:
        """Add one node; ``out`` is the output's base name (used as is with ``exact_name``)."""
        if exact_name:
            if out in self.taken:
                raise CompileError(f"ONNX tensor name {out!r} is used twice")
            self.taken.add(out)
            name = out
        else:
            name = self.fresh(out)
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{name}#{op_type}", domain=domain, **attrs))
        return name


@dataclass
class _QTensor:
    """A quantized activation in the ONNX graph: float-valued integer codes and the scale ``S``."""

    node: str  # the IR quantize node
    codes_f: str  # float32 tensor holding the signed integer codes
    scale: str  # float32 scalar
    bits: int
    signed: bool
    source: str  # the float tensor that was quantized
    asymmetric: bool = False  # codes_f then holds the centered codes u - zp (signed)
    cache: dict = field(default_factory=dict)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


@dataclass(frozen=True)
class LayerTensors:
    """Names of one quantized layer's exposed tensors (``None`` where the layer has none)."""

    name: str
    op: str
    input: str  # the float tensor quantized for (or fed to) the layer
    xq: str | None
    scale: str | None
    acc: str | None
    out: str
    acc_dtype: str | None
    acc_shift: int
    act_bits: int | None
    act_signed: bool
    quant_node: str | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


class GraphEmitter:
    """Walks an IR graph in order and emits each node through a table of emitters.

    ``table`` maps IR ops to ``emit(emitter, node) -> value`` where the value is a tensor
    name or a ``_QTensor``; ``dynamic_batch`` names the leading dimension ``N`` (deployable
    models) instead of fixing the captured batch size.
    """

    def __init__(self, graph: Graph, table: Mapping[str, Callable], *, check_planes: bool = False,
                 dynamic_batch: bool = False):
        self.g = graph
        self.table = table
        self.check_planes = check_planes
        self.dynamic_batch = dynamic_batch
        self.b = _Builder()
        self.values: dict[str, str | _QTensor] = {}
        self.layers: list[LayerTensors] = []
        for v in graph.inputs:
            self.b.taken.add(v.name)
            self.values[v.name] = v.name

    # helpers -------------------------------------------------------------------------------
    def float_of(self, value: str) -> str:
        """The float tensor of an IR value (dequantizing a quantized one, once)."""
        if value in self.g.params:
            if value not in self.values:
                self.values[value] = self.b.const(value, self.g.params[value].astype(_F32))
            return self.values[value]
        v = self.values[value]
        if isinstance(v, _QTensor):
            if "float" not in v.cache:
                levels = self.b.const("levels", np.array(v.levels, _F32))
                scaled = self.b.op("Mul", [v.codes_f, v.scale], f"{v.node}.dequant.mul")
                v.cache["float"] = self.b.op("Div", [scaled, levels], f"{v.node}.dequant")
            return v.cache["float"]
        return v

    def channel_const(self, base: str, vec: np.ndarray, ndim: int, axis: int) -> str:
        shape = [1] * ndim
        shape[axis] = -1
        return self.b.const(base, np.asarray(vec, _F32).reshape(shape))

    def activation(self, n: Node, y: str, out: str) -> str:
        act = n.attr("act", "none")
        if act == "relu":
            return self.b.op("Relu", [y], out, exact_name=True)
        if act == "clip":
            lo = self.b.const("clip_lo", np.array(n.attr("clip_lo"), _F32))
            hi = self.b.const("clip_hi", np.array(n.attr("clip_hi"), _F32))
            return self.b.op("Clip", [y, lo, hi], out, exact_name=True)
        return self.b.op("Identity", [y], out, exact_name=True)

    def dims(self, shape) -> list:
        shape = list(shape)
        if self.dynamic_batch and shape:
            shape[0] = "N"
        return shape

    def emit(self, kind: str, extra_meta: Mapping[str, str] = (), domains: Mapping[str, int] = ()) -> onnx.ModelProto:
        unknown = sorted({n.op for n in self.g.nodes if n.op not in self.table})
        if unknown:
            raise CompileError(f"the ONNX target cannot emit op(s): {', '.join(unknown)}")
        for n in self.g.nodes:
            emitter = self.table.get(n.op)
            if emitter is None:
                raise CompileError(f"the ONNX target has no emitter for op {n.op!r} ({n.name})")
            self.values[n.name] = emitter(self, n)
        outputs = []
        for o in self.g.outputs:
            t = self.g.type_of(o)
            src = self.float_of(o)
            name = src
            if src != o or src in self.g.params or any(v.name == src for v in self.g.inputs):
                # graph outputs keep the IR's output names (a layer's own tensor is <layer>.out)
                name = self.b.op("Identity", [src], o if o not in self.b.taken else f"{o}.output")
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, self.dims(t.shape)))
        inputs = [helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(np.dtype(v.type.dtype)),
                                                self.dims(v.type.shape)) for v in self.g.inputs]
        graph = helper.make_graph(self.b.nodes, self.g.name or "model", inputs, outputs, self.b.initializers)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in dict(domains).items()]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="csqc",
                                  doc_string=f"csqc {kind} model")
        meta = {
            LAYERS_KEY: json.dumps([l.to_json() for l in self.layers]),
            "csqc.kind": kind,
            "csqc.outputs": json.dumps([o.name for o in outputs]),
            **dict(extra_meta),
        }
        helper.set_model_props(model, meta)
        return model


# -- quantization ----------------------------------------------------------------------------


def _emit_quantize(e: GraphEmitter, n: Node) -> _QTensor:
    if n.attr("asymmetric", False):
        return _quantize_asymmetric(e, n.name, e.float_of(n.inputs[0]), n.attr("bits"), n.attr("static_scale", 0.0),
                                    n.attr("zero_point", 0))
    return _quantize_tensor(e, n.name, e.float_of(n.inputs[0]), n.attr("bits"), n.attr("static_scale", 0.0),
                            bool(n.type.qsigned))


def _quantize_asymmetric(e: GraphEmitter, name: str, x: str, bits: int, static: float, zero_point: int) -> _QTensor:
    """The interpreter's asymmetric quantizer; the ``_QTensor`` holds the centered codes ``u - zp``."""
    levels = e.b.const("levels", np.array(2**bits - 1, _F32))
    zero, one = e.b.const("zero", np.array(0, _F32)), e.b.const("one", np.array(1, _F32))
    if static > 0:
        scale = e.b.op("Identity", [e.b.const(f"{name}.static_scale", np.array(static, _F32), shared=False)],
                       f"{name}.scale", exact_name=True)
        divisor = scale
        # named like the dynamic one (verify reads it)
        zp = e.b.op("Identity", [e.b.const(f"{name}.static_zero_point", np.array(zero_point, _F32), shared=False)],
                    f"{name}.zero_point_f", exact_name=True)
    else:
        lo = e.b.op("Min", [e.b.op("ReduceMin", [x], f"{name}.min", keepdims=0), zero], f"{name}.lo")
        hi = e.b.op("Max", [e.b.op("ReduceMax", [x], f"{name}.max", keepdims=0), zero], f"{name}.hi")
        scale = e.b.op("Sub", [hi, lo], f"{name}.scale", exact_name=True)
        # R == 0 means every x is 0 (and lo too): dividing by 1 gives the interpreter's zero codes and zp
        positive = e.b.op("Greater", [scale, zero], f"{name}.scale_positive")
        divisor = e.b.op("Where", [positive, scale, one], f"{name}.safe_scale")
        neg_lo = e.b.op("Mul", [e.b.op("Neg", [lo], f"{name}.neg_lo"), levels], f"{name}.neg_lo_levels")
        zp = e.b.op("Round", [e.b.op("Div", [neg_lo, divisor], f"{name}.zp_div")], f"{name}.zero_point_f")
    scaled = e.b.op("Div", [e.b.op("Mul", [x, levels], f"{name}.mul_levels"), divisor], f"{name}.div_scale")
    shifted = e.b.op("Add", [e.b.op("Round", [scaled], f"{name}.rounded"), zp], f"{name}.shifted")
    codes = e.b.op("Clip", [shifted, zero, levels], f"{name}.codes_u")
    centered = e.b.op("Sub", [codes, zp], f"{name}.codes_f")
    return _QTensor(name, centered, scale, bits, True, x, asymmetric=True)


def _quantize_tensor(e: GraphEmitter, name: str, x: str, bits: int, static: float, signed: bool) -> _QTensor:
    """The codes and scale of float tensor ``x`` (a ``quantize`` node, or a layer's fused output quantization)."""
    levels = e.b.const("levels", np.array(2**bits - 1, _F32))
    absx = e.b.op("Abs", [x], f"{name}.abs")
    if static > 0:
        scale = e.b.op("Identity", [e.b.const(f"{name}.static_scale", np.array(static, _F32), shared=False)],
                       f"{name}.scale", exact_name=True)
        divisor = scale
    else:
        scale = e.b.op("ReduceMax", [absx], f"{name}.scale", exact_name=True, keepdims=0)
        # S == 0 means every |x| is 0: divide by 1 instead, which yields the interpreter's zero codes
        zero, one = e.b.const("zero", np.array(0, _F32)), e.b.const("one", np.array(1, _F32))
        positive = e.b.op("Greater", [scale, zero], f"{name}.scale_positive")
        divisor = e.b.op("Where", [positive, scale, one], f"{name}.safe_scale")
    scaled = e.b.op("Mul", [absx, levels], f"{name}.mul_levels")  # CSQ order: (|x| * L) / S
    mag = e.b.op("Round", [e.b.op("Div", [scaled, divisor], f"{name}.div_scale")], f"{name}.magnitude")
    if static > 0:
        mag = e.b.op("Min", [mag, levels], f"{name}.clamped")
    sign = e.b.op("Sign", [x], f"{name}.sign")
    codes_f = e.b.op("Mul", [sign, mag], f"{name}.codes_f")
    return _QTensor(name, codes_f, scale, bits, signed, x)


def _emit_dequantize(e: GraphEmitter, n: Node) -> str:
    return e.float_of(n.inputs[0])


def _codes_exposed(e: GraphEmitter, q: _QTensor) -> str:
    """The codes as an integer tensor (uint8 unsigned, int16 signed), once per quantize node."""
    if "codes" not in q.cache:
        to = TensorProto.INT16 if q.signed else TensorProto.UINT8
        q.cache["codes"] = e.b.op("Cast", [q.codes_f], f"{q.node}.codes", exact_name=True, to=to)
    return q.cache["codes"]


def _activation_parts(e: GraphEmitter, q: _QTensor) -> list[tuple[str, int]]:
    """``uint8`` tensors and signs whose signed sum is the codes (one part when unsigned)."""
    if "parts" not in q.cache:
        if not q.signed:
            q.cache["parts"] = [(e.b.op("Cast", [q.codes_f], f"{q.node}.u8", to=TensorProto.UINT8), 1)]
        else:
            pos = e.b.op("Relu", [q.codes_f], f"{q.node}.pos_f")
            neg = e.b.op("Relu", [e.b.op("Neg", [q.codes_f], f"{q.node}.neg_codes")], f"{q.node}.neg_f")
            q.cache["parts"] = [(e.b.op("Cast", [pos], f"{q.node}.pos_u8", to=TensorProto.UINT8), 1),
                                (e.b.op("Cast", [neg], f"{q.node}.neg_u8", to=TensorProto.UINT8), -1)]
    return q.cache["parts"]


# -- quantized layers ------------------------------------------------------------------------


# ONNX Runtime's u8 x s8 integer products on x86 CPUs without VNNI (AVX2) sum two products in
# int16 with saturation (vpmaddubsw): exact only while two of them stay within int16
_U8S8_PAIR_LIMIT = 2**15 - 1


def weight_terms(g: Graph, n: Node, check_planes: bool, max_code: int = 255) -> list[tuple[np.ndarray, int]]:
    """Integer weight arrays (``weight_shape``, int8/uint8) and coefficients summing to ``q``.

    ``q = sum coef * array`` exactly. Without ``check_planes``: one ``int8`` array when
    ``|q| <= 127`` and two products of codes up to ``max_code`` fit int16 (else ORT's AVX2
    kernels could saturate), else ``uint8`` base-256 digits of the positive and negative parts
    (u8 x u8 products, which ORT widens to int16 first). With it: one 0/1 ``uint8`` array per
    bitplane with coefficient ``sign * 2^shift``, plus an all-ones array with coefficient
    ``-zero_point`` for the offset encoding.
    """
    spec, shape = n.quant, tuple(n.attr("weight_shape"))
    if not check_planes:
        q = decode_weight(g, n)
        largest = int(np.abs(q).max(initial=0))
        if largest <= 127 and 2 * max_code * largest <= _U8S8_PAIR_LIMIT:
            return [(q.astype(np.int8), 1)]
        terms = []
        for part, sign in ((np.maximum(q, 0), 1), (np.maximum(-q, 0), -1)):
            for k in range(int(part.max(initial=0)).bit_length() // 8 + 1):
                digit = ((part >> (8 * k)) & 255).astype(np.uint8)
                if digit.any():
                    terms.append((digit, sign * 256**k))
        return terms
    k = int(np.prod(shape[1:]))
    if spec.encoding == "int":
        # the signed-digit planes split_planes would make (positions refer to the unshifted q)
        q = decode_weight(g, n).reshape(shape[0], k) << spec.low_shift
        planes, plane_spec = posneg_planes(q, spec.active_bits, spec.active_bits)
        plane_spec = [(s - spec.low_shift, sg) for s, sg in plane_spec]
        if any(s < 0 and p.any() for p, (s, _) in zip(planes, plane_spec)):
            raise CompileError(f"{n.name}: a plane below low_shift {spec.low_shift} is in use")
        zero_point = 0
    else:
        w = g.params[n.inputs[1]]
        planes = unpack_planes(w, k, spec.packed_word) if spec.packed_word else w
        plane_spec, zero_point = spec.planes, spec.zero_point
    terms = [(p.reshape(shape).astype(np.uint8), sign * 2**shift)
             for p, (shift, sign) in zip(planes, plane_spec) if shift >= 0 and p.any()]
    if zero_point:
        terms.append((np.ones(shape, np.uint8), -zero_point))
    return terms


def _integer_product(e: GraphEmitter, n: Node, x_parts: list[tuple[str, int]], terms, levels: int) -> str:
    """``sum sign * coef * product(x_part, term)`` as the layer's accumulator ``<layer>.acc``."""
    acc_dtype = n.quant.acc_dtype
    is_conv = n.op == "qconv2d"
    out_ch = n.attr("weight_shape")[0]
    # worst cases: one product must fit ONNX's int32 output; the running sum picks its width
    worst_total = 0
    products: list[tuple[str, int]] = []
    for i, (w, coef) in enumerate(terms):
        row_bound = int(np.abs(w.astype(np.int64)).reshape(out_ch, -1).sum(axis=1).max(initial=0)) * levels
        if row_bound > INT32_MAX:
            raise CompileError(f"{n.name}: one integer product can reach {row_bound}, beyond ONNX's int32 accumulator")
        worst_total += row_bound * abs(coef) * len(x_parts)
        if is_conv:
            w_name = e.b.const(f"{n.name}.w{i}", w)
        else:
            w_name = e.b.const(f"{n.name}.w{i}", np.ascontiguousarray(w.T))  # MatMulInteger wants [K, O]
        for part, sign in x_parts:
            if is_conv:
                kh, kw = w.shape[2:]
                ph, pw = n.attr("padding")
                prod = e.b.op("ConvInteger", [part, w_name], f"{n.name}.product", kernel_shape=[kh, kw],
                              strides=list(n.attr("stride")), pads=[ph, pw, ph, pw],
                              dilations=list(n.attr("dilation")), group=int(n.attr("groups")))
            else:
                prod = e.b.op("MatMulInteger", [part, w_name], f"{n.name}.product")
            products.append((prod, sign * coef))
    # combine in int64 when a partial sum could leave int32 (the final value fits acc_dtype)
    work = "int64" if worst_total > INT32_MAX or acc_dtype == "int64" else "int32"
    acc = None
    for prod, coef in products:
        if work == "int64":
            prod = e.b.op("Cast", [prod], f"{n.name}.product64", to=TensorProto.INT64)
        if abs(coef) != 1:
            prod = e.b.op("Mul", [prod, e.b.const(f"{n.name}.coef", np.array(abs(coef), work))], f"{n.name}.scaled")
        if acc is None:
            acc = prod if coef > 0 else e.b.op("Neg", [prod], f"{n.name}.neg")
        else:
            acc = e.b.op("Add" if coef > 0 else "Sub", [acc, prod], f"{n.name}.sum")
    if acc is None:  # every weight is zero
        raise CompileError(f"{n.name}: layer has no nonzero weights; run the dce/drop passes or keep one weight")
    if work != acc_dtype:
        acc = e.b.op("Cast", [acc], f"{n.name}.acc_cast", to=_ONNX_DTYPE[acc_dtype])
    return e.b.op("Identity", [acc], f"{n.name}.acc", exact_name=True)


def _emit_quant_layer(e: GraphEmitter, n: Node) -> str:
    spec = n.quant
    is_conv = n.op == "qconv2d"
    ndim = len(n.type.shape)
    axis = 1 if is_conv else ndim - 1
    src = e.values.get(n.inputs[0]) if n.inputs[0] not in e.g.params else None
    mult = e.channel_const(f"{n.name}.mult", e.g.params[n.inputs[2]], ndim, axis)
    if isinstance(src, _QTensor):
        if spec.act_bits != src.bits or spec.act_asymmetric != src.asymmetric or (
                not src.asymmetric and spec.act_signed != src.signed):
            raise CompileError(f"{n.name}: spec says {spec.act_bits}-bit input, its quantize node gives {src.bits}")
        xq = e.b.op("Identity", [_codes_exposed(e, src)], f"{n.name}.xq", exact_name=True)
        terms = weight_terms(e.g, n, e.check_planes, src.levels)
        acc = _integer_product(e, n, _activation_parts(e, src), terms, src.levels)
        levels = e.b.const("levels", np.array(src.levels, _F32))
        accf = e.b.op("Cast", [acc], f"{n.name}.acc_f", to=TensorProto.FLOAT)
        y = e.b.op("Div", [e.b.op("Mul", [accf, src.scale], f"{n.name}.mul_scale"), levels], f"{n.name}.div_levels")
        tensors = dict(input=src.source, xq=xq, scale=src.scale, acc=acc, acc_dtype=spec.acc_dtype,
                       act_bits=src.bits, act_signed=src.signed, quant_node=src.node)
    else:
        # float input: the float product on float32(q), then the same epilogue
        x = e.float_of(n.inputs[0])
        wf = decode_weight(e.g, n).astype(_F32)
        if is_conv:
            ph, pw = n.attr("padding")
            y = e.b.op("Conv", [x, e.b.const(f"{n.name}.weight_f", wf)], f"{n.name}.conv",
                       kernel_shape=list(wf.shape[2:]), strides=list(n.attr("stride")), pads=[ph, pw, ph, pw],
                       dilations=list(n.attr("dilation")), group=int(n.attr("groups")))
        else:
            wt = e.b.const(f"{n.name}.weight_t", np.ascontiguousarray(wf.T))
            y = e.b.op("MatMul", [x, wt], f"{n.name}.matmul")
        tensors = dict(input=x, xq=None, scale=None, acc=None, acc_dtype=None, act_bits=None, act_signed=False,
                       quant_node=None)
    y = e.b.op("Mul", [y, mult], f"{n.name}.mul_mult")
    if len(n.inputs) == 4:
        y = e.b.op("Add", [y, e.channel_const(f"{n.name}.add", e.g.params[n.inputs[3]], ndim, axis)], f"{n.name}.add_bias")
    out = e.activation(n, y, f"{n.name}.out")
    e.layers.append(LayerTensors(name=n.name, op=n.op, out=out, acc_shift=spec.low_shift, **tensors))
    if spec.out_bits is not None:  # fused output quantization: exactly quantize(out) with the static scale
        return _quantize_tensor(e, n.name, out, spec.out_bits, spec.out_scale, spec.out_signed)
    return out


# -- float ops ---------------------------------------------------------------------------------


def _emit_float_layer(e: GraphEmitter, n: Node) -> str:
    x = e.float_of(n.inputs[0])
    w = e.g.params[n.inputs[1]].astype(_F32)
    has_bias = len(n.inputs) == 3
    if n.op == "conv2d":
        ph, pw = n.attr("padding")
        y = e.b.op("Conv", [x, e.b.const(n.inputs[1], w)], f"{n.name}.conv", kernel_shape=list(w.shape[2:]),
                   strides=list(n.attr("stride")), pads=[ph, pw, ph, pw], dilations=list(n.attr("dilation")),
                   group=int(n.attr("groups")))
        if has_bias:
            y = e.b.op("Add", [y, e.channel_const(n.inputs[2], e.g.params[n.inputs[2]], 4, 1)], f"{n.name}.bias")
    else:
        y = e.b.op("MatMul", [x, e.b.const(f"{n.inputs[1]}_t", np.ascontiguousarray(w.T))], f"{n.name}.matmul")
        if has_bias:
            y = e.b.op("Add", [y, e.float_of(n.inputs[2])], f"{n.name}.bias")
    return e.activation(n, y, _name(e, n))


def _name(e: GraphEmitter, n: Node) -> str:
    """The ONNX name of an IR value: its own name unless that is taken."""
    return e.b.available(n.name)


def _simple(op_type: str):
    """An elementwise op whose ONNX twin takes the same (float) inputs."""

    def emit(e: GraphEmitter, n: Node) -> str:
        return e.b.op(op_type, [e.float_of(i) for i in n.inputs], _name(e, n), exact_name=True)

    return emit


def _emit_batch_norm(e: GraphEmitter, n: Node) -> str:
    ndim = len(n.type.shape)
    x = e.float_of(n.inputs[0])
    mul = e.channel_const(n.inputs[1], e.g.params[n.inputs[1]], ndim, 1)
    add = e.channel_const(n.inputs[2], e.g.params[n.inputs[2]], ndim, 1)
    return e.b.op("Add", [e.b.op("Mul", [x, mul], f"{n.name}.mul"), add], _name(e, n), exact_name=True)


def _emit_clip(e: GraphEmitter, n: Node) -> str:
    lo = e.b.const("clip_lo", np.array(n.attr("lo"), _F32))
    hi = e.b.const("clip_hi", np.array(n.attr("hi"), _F32))
    return e.b.op("Clip", [e.float_of(n.inputs[0]), lo, hi], _name(e, n), exact_name=True)


def _emit_pool(e: GraphEmitter, n: Node) -> str:
    if n.attr("ceil_mode", False):
        return _emit_ceil_pool(e, n)
    x = e.float_of(n.inputs[0])
    kh, kw = n.attr("kernel")
    ph, pw = n.attr("padding")
    common = dict(kernel_shape=[kh, kw], strides=list(n.attr("stride")), pads=[ph, pw, ph, pw])
    if n.op == "max_pool2d":
        return e.b.op("MaxPool", [x], _name(e, n), exact_name=True, dilations=list(n.attr("dilation", (1, 1))), **common)
    divisor = n.attr("divisor", 0)
    if divisor and divisor != kh * kw:
        # a divisor override: sum the window (mean * count), then divide like the interpreter
        mean = e.b.op("AveragePool", [x], f"{n.name}.mean", count_include_pad=1, **common)
        total = e.b.op("Mul", [mean, e.b.const("window", np.array(kh * kw, _F32))], f"{n.name}.sum")
        return e.b.op("Div", [total, e.b.const("divisor", np.array(divisor, _F32))], _name(e, n), exact_name=True)
    return e.b.op("AveragePool", [x], _name(e, n), exact_name=True,
                  count_include_pad=int(n.attr("count_include_pad", True)), **common)


def _extra_padding(n: Node, size_hw) -> list[int]:
    """Cells past the bottom/right padding that ceil_mode windows reach (never counted)."""
    out_hw = n.type.shape[2:]
    k, st, p, d = n.attr("kernel"), n.attr("stride"), n.attr("padding"), n.attr("dilation", (1, 1))
    return [max(0, (out_hw[i] - 1) * st[i] + d[i] * (k[i] - 1) + 1 - (size_hw[i] + 2 * p[i])) for i in range(2)]


def _emit_ceil_pool(e: GraphEmitter, n: Node) -> str:
    """ceil_mode pooling with the interpreter's output size and divisors: the last windows get
    explicit extra padding past the input's own; a max ignores it (MaxPool pads with -inf), an
    average is a window sum (a depthwise Conv with ones) divided by a constant count array."""
    x = e.float_of(n.inputs[0])
    c, h, w = e.g.type_of(n.inputs[0]).shape[1:]
    (kh, kw), (ph, pw), stride = n.attr("kernel"), n.attr("padding"), list(n.attr("stride"))
    eh, ew = _extra_padding(n, (h, w))
    pads = [ph, pw, ph + eh, pw + ew]
    if n.op == "max_pool2d":
        if max(ph + eh, ph) >= kh or max(pw + ew, pw) >= kw:
            # ONNX Runtime refuses a pad as wide as the kernel (a stride past the kernel leaves
            # that much to the last window): pad with -inf first, as MaxPool's own padding reads
            x = e.b.op("Pad", [x, e.b.const(f"{n.name}.pads", np.array([0, 0, ph, pw, 0, 0, ph + eh, pw + ew], np.int64)),
                               e.b.const(f"{n.name}.pad_value", np.array(-np.inf, _F32))], f"{n.name}.padded")
            pads = [0, 0, 0, 0]
        return e.b.op("MaxPool", [x], _name(e, n), exact_name=True, kernel_shape=[kh, kw], strides=stride, pads=pads,
                      dilations=list(n.attr("dilation", (1, 1))))
    ones = e.b.const(f"{n.name}.ones", np.ones((c, 1, kh, kw), _F32))
    total = e.b.op("Conv", [x, ones], f"{n.name}.sum", kernel_shape=[kh, kw], strides=stride, pads=pads, group=c)
    divisor = n.attr("divisor", 0)
    counts = (np.array(divisor, _F32) if divisor else
              num.avg_pool_counts((h, w), (kh, kw), stride, (ph, pw), True, bool(n.attr("count_include_pad", True))))
    return e.b.op("Div", [total, e.b.const(f"{n.name}.counts", counts)], _name(e, n), exact_name=True)


def _emit_uneven_adaptive_avg(e: GraphEmitter, n: Node) -> str:
    """Non-divisible adaptive pooling: window sums as 0/1 MatMuls over W, then H, divided by
    the constant window sizes (the interpreter's sum / count)."""
    x = e.float_of(n.inputs[0])
    (h, w), (oh, ow) = e.g.type_of(n.inputs[0]).shape[2:], n.attr("output_size")

    def selector(size: int, out: int) -> np.ndarray:
        m = np.zeros((out, size), _F32)
        for i, (a, b) in enumerate(num.adaptive_bounds(size, out)):
            m[i, a:b] = 1
        return m

    cols = e.b.op("MatMul", [x, e.b.const(f"{n.name}.cols", selector(w, ow).T.copy())], f"{n.name}.col_sums")
    total = e.b.op("MatMul", [e.b.const(f"{n.name}.rows", selector(h, oh)), cols], f"{n.name}.sum")
    counts = e.b.const(f"{n.name}.counts", num.adaptive_counts((h, w), (oh, ow)))
    return e.b.op("Div", [total, counts], _name(e, n), exact_name=True)


def _emit_adaptive_avg(e: GraphEmitter, n: Node) -> str:
    x = e.float_of(n.inputs[0])
    oh, ow = n.attr("output_size")
    h, w = e.g.type_of(n.inputs[0]).shape[2:]
    if h % oh or w % ow:
        return _emit_uneven_adaptive_avg(e, n)
    if (oh, ow) == (1, 1):
        return e.b.op("GlobalAveragePool", [x], _name(e, n), exact_name=True)
    k = [h // oh, w // ow]
    return e.b.op("AveragePool", [x], _name(e, n), exact_name=True, kernel_shape=k, strides=k)


def _emit_reduce(op_type: str):
    def emit(e: GraphEmitter, n: Node) -> str:
        axes = e.b.const("axes", np.array(n.attr("dims"), np.int64))
        return e.b.op(op_type, [e.float_of(n.inputs[0]), axes], _name(e, n), exact_name=True,
                      keepdims=int(bool(n.attr("keepdim"))))
    return emit


def _emit_reshape(e: GraphEmitter, n: Node) -> str:
    target = list(n.type.shape)
    if e.dynamic_batch:
        if e.g.type_of(n.inputs[0]).shape[:1] != n.type.shape[:1]:
            raise CompileError(f"{n.name}: reshape moves the batch dimension; it needs a fixed batch size")
        target[0] = 0  # ONNX Reshape: 0 copies the input's (batch) dimension
    shape = e.b.const("shape", np.array(target, np.int64))
    return e.b.op("Reshape", [e.float_of(n.inputs[0]), shape], _name(e, n), exact_name=True)


def _emit_cat(e: GraphEmitter, n: Node) -> str:
    return e.b.op("Concat", [e.float_of(i) for i in n.inputs], _name(e, n), exact_name=True, axis=int(n.attr("axis")))


def _emit_slice(e: GraphEmitter, n: Node) -> str:
    axis = int(n.attr("axis"))
    if axis == 0 and e.dynamic_batch:
        raise CompileError(f"{n.name}: a slice of the batch dimension needs a fixed batch size")
    starts = e.b.const("starts", np.array([n.attr("start")], np.int64))
    ends = e.b.const("ends", np.array([n.attr("end")], np.int64))
    axes = e.b.const("axes", np.array([axis], np.int64))
    return e.b.op("Slice", [e.float_of(n.inputs[0]), starts, ends, axes], _name(e, n), exact_name=True)


def _emit_select(e: GraphEmitter, n: Node) -> str:
    c, a, b = (e.float_of(i) for i in n.inputs)
    condition = e.b.op("Cast", [c], f"{n.name}.condition", to=TensorProto.BOOL)  # nonzero: true
    return e.b.op("Where", [condition, a, b], _name(e, n), exact_name=True)


def _emit_take(e: GraphEmitter, n: Node) -> str:
    axis = int(n.attr("axis"))
    if axis == 0 and e.dynamic_batch:
        raise CompileError(f"{n.name}: a take along the batch dimension needs a fixed batch size")
    index = e.b.const(n.inputs[1], e.g.params[n.inputs[1]].astype(np.int64))
    return e.b.op("Gather", [e.float_of(n.inputs[0]), index], _name(e, n), exact_name=True, axis=axis)


def _emit_layer_norm(e: GraphEmitter, n: Node) -> str:
    axis = int(n.attr("axis"))
    if axis == 0 and e.dynamic_batch:
        raise CompileError(f"{n.name}: a layer norm over the batch dimension needs a fixed batch size")
    return e.b.op("LayerNormalization", [e.float_of(i) for i in n.inputs], _name(e, n), exact_name=True,
                  axis=axis, epsilon=float(n.attr("eps")))


def _emit_expand(e: GraphEmitter, n: Node) -> str:
    target = list(n.type.shape)
    if e.dynamic_batch and target:
        x_shape = e.g.type_of(n.inputs[0]).shape
        if n.inputs[0] in e.g.params and len(x_shape) == len(target) and x_shape[0] != 1:
            raise CompileError(f"{n.name}: a constant that spans the batch dimension needs a fixed batch size")
        # every graph input leads with the batch dimension N: take it from the first one
        batch = e.b.op("Shape", [e.g.inputs[0].name], f"{n.name}.batch", start=0, end=1)
        shape = e.b.op("Concat", [batch, e.b.const("shape", np.array(target[1:], np.int64))], f"{n.name}.shape", axis=0)
    else:
        shape = e.b.const("shape", np.array(target, np.int64))
    return e.b.op("Expand", [e.float_of(n.inputs[0]), shape], _name(e, n), exact_name=True)


def _relu6_plus3(e: GraphEmitter, n: Node, x: str) -> str:
    three = e.b.const("three", np.array(3, _F32))
    lo, hi = e.b.const("zero", np.array(0, _F32)), e.b.const("six", np.array(6, _F32))
    return e.b.op("Clip", [e.b.op("Add", [x, three], f"{n.name}.plus3"), lo, hi], f"{n.name}.relu6")


def _emit_hardsigmoid(e: GraphEmitter, n: Node) -> str:
    """``min(max(x + 3, 0), 6) / 6`` op by op (ONNX HardSigmoid computes ``x/6 + 0.5``)."""
    r = _relu6_plus3(e, n, e.float_of(n.inputs[0]))
    return e.b.op("Div", [r, e.b.const("six", np.array(6, _F32))], _name(e, n), exact_name=True)


def _emit_hardswish(e: GraphEmitter, n: Node) -> str:
    """``(x * min(max(x + 3, 0), 6)) / 6`` op by op, the interpreter's float32 order."""
    x = e.float_of(n.inputs[0])
    product = e.b.op("Mul", [x, _relu6_plus3(e, n, x)], f"{n.name}.mul")
    return e.b.op("Div", [product, e.b.const("six", np.array(6, _F32))], _name(e, n), exact_name=True)


def _emit_silu(e: GraphEmitter, n: Node) -> str:
    x = e.float_of(n.inputs[0])
    return e.b.op("Mul", [x, e.b.op("Sigmoid", [x], f"{n.name}.sigmoid")], _name(e, n), exact_name=True)


EMITTERS: dict[str, Callable[[GraphEmitter, Node], object]] = {
    "quantize": _emit_quantize,
    "dequantize": _emit_dequantize,
    "qconv2d": _emit_quant_layer,
    "qlinear": _emit_quant_layer,
    "conv2d": _emit_float_layer,
    "linear": _emit_float_layer,
    "batch_norm": _emit_batch_norm,
    "relu": _simple("Relu"),
    "clip": _emit_clip,
    "minimum": _simple("Min"),
    "add": _simple("Add"),
    "mul": _simple("Mul"),
    "cat": _emit_cat,
    "max_pool2d": _emit_pool,
    "avg_pool2d": _emit_pool,
    "adaptive_avg_pool2d": _emit_adaptive_avg,
    "mean": _emit_reduce("ReduceMean"),
    "amax": _emit_reduce("ReduceMax"),
    "reshape": _emit_reshape,
    "permute": lambda e, n: e.b.op("Transpose", [e.float_of(n.inputs[0])], _name(e, n), exact_name=True,
                                   perm=list(n.attr("dims"))),
    "softmax": lambda e, n: e.b.op("Softmax", [e.float_of(n.inputs[0])], _name(e, n), exact_name=True,
                                   axis=int(n.attr("axis"))),
    "sigmoid": _simple("Sigmoid"),
    "tanh": _simple("Tanh"),
    "sqrt": _simple("Sqrt"),
    "exp": _simple("Exp"),
    "log": _simple("Log"),
    "erf": _simple("Erf"),
    "sin": _simple("Sin"),
    "cos": _simple("Cos"),
    "sub": _simple("Sub"),
    "slice": _emit_slice,
    "take": _emit_take,
    "select": _emit_select,
    "matmul": _simple("MatMul"),
    "layer_norm": _emit_layer_norm,
    "gelu": lambda e, n: e.b.op("Gelu", [e.float_of(n.inputs[0])], _name(e, n), exact_name=True,
                                approximate=str(n.attr("approximate", "none"))),
    "div": _simple("Div"),
    "expand": _emit_expand,
    "hardsigmoid": _emit_hardsigmoid,
    "hardswish": _emit_hardswish,
    "silu": _emit_silu,
    # token embeddings: rows of the table (a float32 initializer) picked by the integer ids input
    "embedding": lambda e, n: e.b.op("Gather", [e.float_of(n.inputs[0]), n.inputs[1]], _name(e, n),
                                     exact_name=True, axis=0),
}


def unsupported_ops(g: Graph) -> list[tuple[str, str]]:
    """``(op, node)`` for every node the reference model has no emitter for, or whose form it
    cannot emit yet (in brackets)."""
    out = []
    for n in g.nodes:
        if n.op not in EMITTERS:
            out.append((n.op, n.name))
    return out


def emit_reference(graph: Graph, *, check_planes: bool = False, dynamic_batch: bool = False) -> onnx.ModelProto:
    """Translate ``graph`` into the integer-exact reference ONNX model (see module docstring).

    The model uses default-domain opset 21 and IR version 10 and passes
    ``onnx.checker.check_model(full_check=True)``. Run it with optimizations off
    (``csqc.targets.onnx.runner``) for bit-exact results. ``dynamic_batch``: the leading
    dimension of every input and output is the symbol ``N`` (any batch size; each batch is
    exactly what the interpreter computes on the graph captured at that batch size), and a
    graph that mixes samples across the batch is a ``CompileError`` naming the node.
    """
    emitter = GraphEmitter(graph, EMITTERS, check_planes=check_planes, dynamic_batch=dynamic_batch)
    model = emitter.emit("reference", {"csqc.check_planes": json.dumps(check_planes),
                                       "csqc.dynamic_batch": json.dumps(dynamic_batch)})
    onnx.checker.check_model(model, full_check=True)
    return model


def layer_table(model: onnx.ModelProto) -> list[dict]:
    """The ``csqc.layers`` metadata of a model written by csqc (empty for other models); the file is
    untrusted, so every row is checked (``BadInput``)."""
    for prop in model.metadata_props:
        if prop.key == LAYERS_KEY:
            try:
                rows = json.loads(prop.value)
            except (ValueError, RecursionError):
                raise BadInput(f"the model's {LAYERS_KEY} metadata is not JSON; csqc writes it") from None
            if not isinstance(rows, list) or not all(_layer_row_ok(r) for r in rows):
                raise BadInput(f"the model's {LAYERS_KEY} metadata is not a table of layers csqc writes")
            return rows
    return []


def _layer_row_ok(row) -> bool:
    names = ("name", "input", "out")
    optional = ("xq", "scale", "acc", "quant_node", "op", "acc_dtype")
    return (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in names)
            and all(row.get(k) is None or isinstance(row[k], str) for k in optional)
            and type(row.get("acc_shift", 0)) is int and 0 <= row.get("acc_shift", 0) < 63)
