"""csqc's IR: a typed graph of frozen nodes; quantized layers carry one validated QuantSpec.

Values are named. A value is a graph input, a node output or a parameter (a constant array in
``Graph.params``). Types are ``TensorType``; a quantized activation is a ``TensorType`` with
``qbits`` set: its runtime form is a pair (integer codes, float32 scalar ``S``), the value being
``(codes * S) / L`` with ``L = 2^bits - 1`` (``S`` is ``max|x|`` or the static scale). An
asymmetric activation (``qzero``, type text ``aq<bits>``) is a triple (unsigned codes ``u`` in
``[0, L]``, the range ``S = R``, an integer zero point ``zp`` in ``[0, L]``), the value being
``(float32(u - zp) * S) / L``; a layer reading it multiplies the centered codes ``u - zp``
(the quantizer's semantics are in ``csqc.interpreter``).

Quantized layers (``qconv2d``, ``qlinear``) compute, per output channel ``c``::

    float input:      y = op(x, float32(w)) * mult[c] + add[c]
    quantized input:  acc = op(codes, w)  (exact integers; codes - zp when asymmetric)
                      y = ((float32(acc) * S) / L) * mult[c] + add[c]
    then the fused activation (``attrs['act']``: none, relu, clip)

where ``w`` is the integer weight ``q`` (encoding ``int``) or its plane decomposition
(``posneg``/``offset``, see ``QuantSpec``). Every runtime repeats this order of float
operations; the interpreter (``csqc.interpreter``) is the golden model.

A quantized layer with fused output quantization (``QuantSpec.out_bits`` set, made by the
``fuse_requant`` pass) yields a quantized activation instead of ``y``: with the static scale
``S' = out_scale`` and ``L' = 2^out_bits - 1``, after the fused activation::

    code = sign(y) * min(round_half_even((|y| * L') / S'), L')     (float32, in this order)

exactly the codes of ``quantize(y) {bits=out_bits, static_scale=out_scale, signed=out_signed}``;
its type is ``{s,u}q<out_bits>`` and its runtime form the pair (codes, ``S'``). The float ``y``
is never stored.

The text form (``Graph.text()``) is stable and diffable; ``save``/``load`` use JSON + npz, never
pickle; ``verify`` checks shapes, dtypes and specs.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from .archive import npz_bytes, read_member, read_npz, unique_members
from .errors import UNREADABLE_ARCHIVE, BadInput, CsqcError
from .optable import OP_TABLE, ShapeError, attr_problems, expected_shape

__all__ = [
    "TensorType", "QuantSpec", "Node", "Value", "Graph", "IRError", "OPS", "ENCODINGS",
    "QUANT_LAYER_OPS", "LAYER_OPS", "LayerInputs", "layer_inputs", "save_graph", "load_graph", "verify", "nonfinite_params",
]

ENCODINGS = ("int", "posneg", "offset")
QUANT_LAYER_OPS = ("qconv2d", "qlinear")
FLOAT_DTYPES = ("float32",)
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint32", "uint64")


class IRError(CsqcError):
    """The IR is malformed (a verifier finding)."""


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "float32"
    qbits: int | None = None  # set: a quantized activation (codes + scale)
    qsigned: bool = False
    qzero: bool = False  # asymmetric: unsigned codes with a zero point (never qsigned)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise IRError(f"negative dimension in shape {list(self.shape)}")
        if self.dtype not in FLOAT_DTYPES + INT_DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}")
        if self.qbits is not None and not 1 <= self.qbits <= 8:
            raise IRError(f"quantized activation bits must be 1..8, got {self.qbits}")
        if self.qzero and (self.qbits is None or self.qsigned):
            raise IRError("an asymmetric (zero-point) activation is a quantized activation with unsigned codes")

    @property
    def quantized(self) -> bool:
        return self.qbits is not None

    def text(self) -> str:
        dims = "x".join(map(str, self.shape)) or "scalar"
        if self.quantized:
            kind = "a" if self.qzero else "s" if self.qsigned else "u"
            return f"{kind}q{self.qbits}[{dims}]"
        return f"{self.dtype}[{dims}]"

    def to_json(self) -> dict:
        d = {"shape": list(self.shape), "dtype": self.dtype, "qbits": self.qbits, "qsigned": self.qsigned}
        if self.qzero:  # written only when set: symmetric graphs keep their files byte for byte
            d["qzero"] = True
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorType":
        qzero = d.get("qzero", False)
        if not isinstance(qzero, bool):
            raise IRError(f"qzero must be a bool, got {qzero!r}")
        return cls(tuple(d["shape"]), d["dtype"], d.get("qbits"), d.get("qsigned", False), qzero)


@dataclass(frozen=True)
class QuantSpec:
    """Everything a target needs to know about one quantized layer's bits.

    ``n_bits``: candidate bits N of the CSQ layer. ``active_bits``: kept positions, highest
    first (non-contiguous allowed). ``weight_scale``: ``per_tensor`` or ``per_channel`` (the
    values live in the layer's ``mult`` parameter). ``encoding``: ``int`` (weights stored as
    integers ``q``), ``posneg`` (a +plane and a -plane per bit) or ``offset`` (planes of the
    unsigned ``q + zero_point``). ``planes``: ``(shift, sign)`` of each stored plane, most
    significant first, so ``q = sum sign * 2^shift * plane - zero_point``. ``low_shift``:
    common low zero bits moved into ``mult`` (``q = 2^low_shift * q'``). ``packed_word``: 0
    for one byte per bit, 32/64 when planes are packed into words along the reduction axis.
    ``act_*``: the input activation quantization (``act_bits`` None: float input);
    ``act_asymmetric``: unsigned codes with a zero point (``act_zero_point``, static mode only;
    a dynamic zero point is computed at run time with the scale).
    ``acc_dtype``: accumulator type proved safe by ``accumulator_width``.
    ``out_*``: fused output quantization (``out_bits`` None: the layer yields floats; see the
    module docstring): bits, the static scale, and whether codes are signed.
    """

    n_bits: int
    active_bits: tuple[int, ...]
    weight_scale: str = "per_tensor"
    encoding: str = "int"
    planes: tuple[tuple[int, int], ...] = ()
    zero_point: int = 0
    low_shift: int = 0
    packed_word: int = 0
    act_bits: int | None = None
    act_mode: str | None = None
    act_scale: float = 0.0
    act_signed: bool = False
    act_asymmetric: bool = False
    act_zero_point: int = 0
    acc_dtype: str = "int32"
    out_bits: int | None = None
    out_scale: float = 0.0
    out_signed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "active_bits", tuple(int(b) for b in self.active_bits))
        object.__setattr__(self, "planes", tuple((int(s), int(g)) for s, g in self.planes))
        errors = self.problems()
        if errors:
            raise IRError("invalid quantization spec: " + "; ".join(errors))

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.n_bits <= 15:
            out.append(f"n_bits {self.n_bits} not in 1..15")
        if list(self.active_bits) != sorted(set(self.active_bits), reverse=True):
            out.append(f"active_bits {self.active_bits} must be distinct and highest first")
        if any(not 0 <= b < self.n_bits for b in self.active_bits):
            out.append(f"active_bits {self.active_bits} outside 0..{self.n_bits - 1}")
        if self.weight_scale not in ("per_tensor", "per_channel"):
            out.append(f"weight_scale {self.weight_scale!r}")
        if self.encoding not in ENCODINGS:
            out.append(f"encoding {self.encoding!r} not one of {ENCODINGS}")
        if self.encoding == "int" and (self.planes or self.packed_word):
            out.append("encoding 'int' has no planes and is not packed")
        if self.encoding != "int" and any(g not in (1, -1) or s < 0 for s, g in self.planes):
            out.append(f"planes {self.planes}: signs must be +-1 and shifts >= 0")
        if self.encoding == "posneg" and self.zero_point:
            out.append("posneg encoding has no zero point")
        if self.encoding == "offset" and any(g != 1 for _, g in self.planes):
            out.append("offset planes are all positive")
        if self.packed_word not in (0, 32, 64):
            out.append(f"packed_word {self.packed_word} not in (0, 32, 64)")
        if self.act_bits is not None:
            if not 1 <= self.act_bits <= 8:
                out.append(f"act_bits {self.act_bits} not in 1..8")
            if self.act_mode not in ("dynamic", "static"):
                out.append(f"act_mode {self.act_mode!r}")
            if self.act_mode == "static" and not self.act_scale > 0:
                out.append("static activation scale must be positive")
            out += _asymmetric_problems(self.act_asymmetric, self.act_signed, self.act_zero_point,
                                        self.act_bits, self.act_mode == "static")
        elif self.act_mode is not None or self.act_asymmetric or self.act_zero_point:
            out.append("act_mode/act_asymmetric/act_zero_point set without act_bits")
        if self.acc_dtype not in ("int32", "int64"):
            out.append(f"acc_dtype {self.acc_dtype!r}")
        if self.out_bits is not None:
            if not 1 <= self.out_bits <= 8:
                out.append(f"out_bits {self.out_bits} not in 1..8")
            if not self.out_scale > 0:
                out.append("fused output quantization needs a positive static scale")
        elif self.out_scale or self.out_signed:
            out.append("out_scale/out_signed set without out_bits")
        return out

    @property
    def num_planes(self) -> int:
        return len(self.planes) if self.encoding != "int" else len(self.active_bits)

    def replace(self, **kw) -> "QuantSpec":
        return replace(self, **kw)

    def text(self) -> str:
        bits = ",".join(map(str, self.active_bits)) or "-"
        parts = [f"N={self.n_bits}", f"bits={{{bits}}}", f"enc={self.encoding}"]
        if self.encoding != "int":
            parts.append("planes=[" + ",".join(f"{'+' if g > 0 else '-'}{s}" for s, g in self.planes) + "]")
        if self.zero_point:
            parts.append(f"zp={self.zero_point}")
        if self.low_shift:
            parts.append(f"shift={self.low_shift}")
        if self.packed_word:
            parts.append(f"packed={self.packed_word}")
        parts.append(f"wscale={self.weight_scale}")
        if self.act_bits is not None:
            kind = "a" if self.act_asymmetric else "s" if self.act_signed else "u"
            act = f"act={kind}{self.act_bits}/{self.act_mode}"
            parts.append(act + (f"@{self.act_scale:.9g}" if self.act_mode == "static" else "")
                         + (f"zp{self.act_zero_point}" if self.act_asymmetric and self.act_mode == "static" else ""))
        if self.acc_dtype != "int32":
            parts.append(f"acc={self.acc_dtype}")
        if self.out_bits is not None:
            parts.append(f"out={'s' if self.out_signed else 'u'}{self.out_bits}/static@{self.out_scale:.9g}")
        return " ".join(parts)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["active_bits"], d["planes"] = list(self.active_bits), [list(p) for p in self.planes]
        if not self.act_asymmetric:  # symmetric specs keep their files byte for byte
            del d["act_asymmetric"], d["act_zero_point"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "QuantSpec":
        d = dict(d)
        d["planes"] = tuple(tuple(p) for p in d.get("planes", ()))
        d["active_bits"] = tuple(d.get("active_bits", ()))
        return cls(**d)


def _asymmetric_problems(asymmetric, signed, zero_point, bits: int, static: bool) -> list[str]:
    """Findings for an activation quantizer's zero-point settings (a quantize node or a spec)."""
    if not isinstance(asymmetric, bool) or not isinstance(zero_point, int) or isinstance(zero_point, bool):
        return [f"asymmetric={asymmetric!r} must be a bool and zero_point={zero_point!r} an int"]
    if not asymmetric:
        return [f"zero_point {zero_point} set on a symmetric quantizer"] if zero_point else []
    out = []
    if signed:
        out.append("an asymmetric quantizer has unsigned codes (signed must be False)")
    if not 0 <= zero_point <= 2**bits - 1:
        out.append(f"zero_point {zero_point} outside 0..{2**bits - 1}")
    if zero_point and not static:
        out.append("a dynamic asymmetric quantizer computes its zero point (zero_point must be 0)")
    return out


LAYER_OPS = QUANT_LAYER_OPS + ("conv2d", "linear")


@dataclass(frozen=True)
class LayerInputs:
    """A layer node's inputs by role instead of by position.

    Quantized layers (``qconv2d``, ``qlinear``) take ``x, weight, mult[, add]``; float layers
    (``conv2d``, ``linear``) take ``x, weight[, bias]`` (``bias`` is their ``add``, ``mult``
    is None). ``channel_axis`` is where the output channels are (1 for convolutions, -1 else).
    """

    x: str
    weight: str
    mult: str | None
    add: str | None
    channel_axis: int

    def with_add(self, add: str) -> tuple[str, ...]:
        """The node's inputs with ``add`` (a new or the same parameter name) in its place."""
        head = (self.x, self.weight) + ((self.mult,) if self.mult is not None else ())
        return head + (add,)


def layer_inputs(n: "Node") -> LayerInputs:
    if n.op not in LAYER_OPS:
        raise IRError(f"%{n.name} ({n.op}) is not a layer")
    axis = 1 if n.op in ("qconv2d", "conv2d") else -1
    if n.op in QUANT_LAYER_OPS:
        return LayerInputs(n.inputs[0], n.inputs[1], n.inputs[2], n.inputs[3] if len(n.inputs) == 4 else None, axis)
    return LayerInputs(n.inputs[0], n.inputs[1], None, n.inputs[2] if len(n.inputs) == 3 else None, axis)


def _freeze_attr(v):
    if isinstance(v, list):
        return tuple(_freeze_attr(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze_attr(x)) for k, x in v.items()))
    return v


@dataclass(frozen=True)
class Node:
    """One operation. ``attrs`` is an immutable mapping of plain values (ints, floats, str, tuples)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    type: TensorType
    attrs: Mapping[str, Any] = field(default_factory=dict)
    quant: QuantSpec | None = None
    source: str = ""  # where the node came from (module path), for error messages

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "attrs", MappingProxyType({k: _freeze_attr(v) for k, v in sorted(dict(self.attrs).items())}))

    def replace(self, **kw) -> "Node":
        return replace(self, **kw)

    @property
    def layer(self) -> "LayerInputs":
        """This layer node's inputs by role (``IRError`` for a node that is not a layer)."""
        return layer_inputs(self)

    @property
    def multiply_adds(self) -> int:
        """A layer's multiply-adds per call: output elements x weight elements per output channel."""
        weight_shape = self.attrs["weight_shape"]
        return int(np.prod(self.type.shape, dtype=np.int64)) * int(np.prod(weight_shape[1:], dtype=np.int64))

    def attr(self, key: str, default=None):
        """The attribute, else ``default``, else the op table's default for it."""
        if key in self.attrs:
            return self.attrs[key]
        if default is None and self.op in OP_TABLE:
            return OP_TABLE[self.op].attr_defaults().get(key)
        return default

    def __hash__(self):
        return hash((self.name, self.op, self.inputs))

    def __eq__(self, other):
        return isinstance(other, Node) and self.text() == other.text()

    def text(self) -> str:
        attrs = ", ".join(f"{k}={_attr_text(v)}" for k, v in self.attrs.items())
        s = f"%{self.name}: {self.type.text()} = {self.op}({', '.join('%' + i for i in self.inputs)})"
        if attrs:
            s += f" {{{attrs}}}"
        if self.quant is not None:
            s += f" <{self.quant.text()}>"
        return s


def _attr_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.9g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_attr_text(x) for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class Value:
    name: str
    type: TensorType


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Graph:
    inputs: tuple[Value, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    params: Mapping[str, np.ndarray] = field(default_factory=dict)
    name: str = "model"

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "params", MappingProxyType({k: _readonly(v) for k, v in dict(self.params).items()}))

    def __eq__(self, other):
        # the generated dataclass __eq__ compares numpy arrays with ``==`` and raises
        if not isinstance(other, Graph):
            return NotImplemented
        return (
            (self.name, self.inputs, self.nodes, self.outputs) == (other.name, other.inputs, other.nodes, other.outputs)
            and self.params.keys() == other.params.keys()
            and all(a.dtype == other.params[k].dtype and a.shape == other.params[k].shape
                    and np.array_equal(a, other.params[k]) for k, a in self.params.items())
        )

    def __hash__(self):
        return hash((self.name, self.inputs, self.nodes, self.outputs))

    # -- queries ---------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producers(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def type_of(self, value: str) -> TensorType:
        for v in self.inputs:
            if v.name == value:
                return v.type
        if value in self.params:
            p = self.params[value]
            return TensorType(p.shape, str(p.dtype))
        return self.node(value).type

    def quant_layers(self) -> list[Node]:
        return [n for n in self.nodes if n.op in QUANT_LAYER_OPS]

    # -- rewriting (returns new graphs) ----------------------------------------------------
    def replace(self, **kw) -> "Graph":
        return replace(self, **kw)

    def with_params(self, updates: Mapping[str, np.ndarray], remove: Iterable[str] = ()) -> "Graph":
        params = {k: v for k, v in self.params.items() if k not in set(remove)}
        params.update(updates)
        return self.replace(params=params)

    def fresh_name(self, base: str) -> str:
        taken = {n.name for n in self.nodes} | set(self.params) | {v.name for v in self.inputs}
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    # -- text form -------------------------------------------------------------------------
    def text(self, params: bool = True) -> str:
        lines = [f"graph {self.name}("]
        lines += [f"  %{v.name}: {v.type.text()}," for v in self.inputs]
        lines.append(") {")
        if params:
            for k in sorted(self.params):
                a = self.params[k]
                digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]
                lines.append(f"  param %{k}: {a.dtype}[{'x'.join(map(str, a.shape)) or 'scalar'}] sha256:{digest}")
        lines += ["  " + n.text() for n in self.nodes]
        lines.append("  return " + ", ".join("%" + o for o in self.outputs))
        lines.append("}")
        return "\n".join(lines) + "\n"

    __str__ = text


# op -> (minimum inputs, maximum inputs); every op is defined once in ``csqc.optable``
OPS = MappingProxyType({name: d.arity for name, d in OP_TABLE.items()})


def verify(g: Graph) -> None:
    """Check that ``g`` is well formed: names, topological order, types, specs, parameters."""
    problems: list[str] = []
    defined = {v.name for v in g.inputs} | set(g.params)
    seen_names = set(defined)
    for v in g.inputs:
        if v.name in g.params:
            problems.append(f"input %{v.name} shadows a parameter")
    for n in g.nodes:
        where = f"%{n.name} ({n.op})"
        if n.name in seen_names:
            problems.append(f"{where}: name defined twice")
        seen_names.add(n.name)
        arity_ok = False
        if n.op not in OPS:
            problems.append(f"{where}: unknown op")
        else:
            lo, hi = OPS[n.op]
            arity_ok = lo <= len(n.inputs) <= hi
            if not arity_ok:
                problems.append(f"{where}: takes {lo}..{hi} inputs, has {len(n.inputs)}")
        for i in n.inputs:
            if i not in defined:
                problems.append(f"{where}: input %{i} is not defined before use")
        defined.add(n.name)
        if arity_ok:  # the node checks index inputs by position
            problems += [f"{where}: {p}" for p in _check_node(g, n)]
    for o in g.outputs:
        if o not in defined:
            problems.append(f"output %{o} is not defined")
    problems += _integer_input_problems(g)
    problems += [f"param %{p} contains NaN or infinity" for p in nonfinite_params(g)]
    if problems:
        raise IRError("IR verification failed:\n  " + "\n  ".join(problems[:30]))


def _integer_input_problems(g: Graph) -> list[str]:
    """Integer graph inputs (token ids) feed only an embedding's ids, whose table is float32[rows, dim]:
    every other op and every target computes in float32."""
    out = []
    integer_inputs = {v.name for v in g.inputs if v.type.dtype in INT_DTYPES}
    for n in g.nodes:
        for i, v in enumerate(n.inputs):
            if v in integer_inputs and (n.op, i) != ("embedding", 1):
                out.append(f"%{n.name} ({n.op}): integer input %{v} may only be an embedding's ids")
        if n.op == "embedding":
            table = g.params.get(n.inputs[0])
            if n.inputs[1] not in integer_inputs:
                out.append(f"%{n.name} (embedding): ids %{n.inputs[1]} must be an integer graph input")
            if table is not None and table.dtype != np.float32:
                out.append(f"%{n.name} (embedding): table must be float32, is {table.dtype}")
    for o in g.outputs:
        if o in integer_inputs:
            out.append(f"output %{o} is an integer input; outputs are float32")
    return out


def nonfinite_params(g: Graph) -> list[str]:
    """Float parameters holding NaN or infinity (no runtime can agree on those bit for bit)."""
    return [k for k, a in g.params.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]


def _take_index_problems(g: Graph, n: Node) -> list[str]:
    """A take's index must be an int32 parameter inside the axis it picks from (the kernels read
    the input at it)."""
    index, x_t = g.params.get(n.inputs[1]), _safe_type(g, n.inputs[0])
    axis = n.attrs.get("axis")
    if index is None or x_t is None or not isinstance(axis, int) or not 0 <= axis < len(x_t.shape):
        return []  # the parameter, type and attribute checks report these
    if index.dtype != np.int32 or index.ndim == 0:
        return [f"index must be an int32 array, is {index.dtype}{list(index.shape)}"]
    size = x_t.shape[axis]
    if index.size and (int(index.min()) < 0 or int(index.max()) >= size):
        return [f"index holds positions outside [0, {size}) of axis {axis}"]
    elements = max(int(np.prod(x_t.shape, dtype=np.int64)), int(np.prod(n.type.shape, dtype=np.int64)))
    if elements >= 2**31:
        return ["a take of 2^31 elements or more (its kernels index in int32)"]
    return []


def _check_node(g: Graph, n: Node) -> list[str]:
    out = []
    if n.op in QUANT_LAYER_OPS:
        q = n.quant
        if q is None:
            return ["quantized layer without a QuantSpec"]
        x_t = _safe_type(g, n.inputs[0])
        w_name, mult_name = n.inputs[1], n.inputs[2]
        if w_name not in g.params or mult_name not in g.params:
            return ["weight and mult must be parameters"]
        w, mult = g.params[w_name], g.params[mult_name]
        out_ch = n.type.shape[1] if n.op == "qconv2d" else n.type.shape[-1]
        if mult.dtype != np.float32 or mult.shape != (out_ch,):
            out.append(f"mult must be float32[{out_ch}], is {mult.dtype}{list(mult.shape)}")
        if len(n.inputs) == 4:
            add = g.params.get(n.inputs[3])
            if add is None or add.dtype != np.float32 or add.shape != (out_ch,):
                out.append(f"add must be a float32[{out_ch}] parameter")
        wshape = tuple(n.attr("weight_shape", ()))
        if not wshape or wshape[0] != out_ch:
            out.append(f"weight_shape {wshape} does not match {out_ch} output channels")
        if q.encoding == "int":
            if w.dtype.kind != "i" or w.shape != wshape:
                out.append(f"int weights must be integer {list(wshape)}, are {w.dtype}{list(w.shape)}")
        else:
            k = int(np.prod(wshape[1:])) if wshape else 0
            if q.packed_word:
                words = -(-k // q.packed_word)
                expect = (q.num_planes, out_ch, words)
                if w.dtype != np.dtype(f"uint{q.packed_word}") or w.shape != expect:
                    out.append(f"packed planes must be uint{q.packed_word}{list(expect)}, are {w.dtype}{list(w.shape)}")
            elif w.dtype != np.uint8 or w.shape != (q.num_planes, out_ch, k):
                out.append(f"planes must be uint8[{q.num_planes},{out_ch},{k}], are {w.dtype}{list(w.shape)}")
        if x_t is not None:
            if q.act_bits is not None and (x_t.qbits != q.act_bits or x_t.qsigned != q.act_signed
                                           or x_t.qzero != q.act_asymmetric):
                out.append(f"input is {x_t.text()} but spec says act {q.act_bits} bits")
            if q.act_bits is None and x_t.quantized:
                out.append("quantized input but spec has no act_bits")
        if (n.type.qbits, n.type.qsigned, n.type.qzero) != (q.out_bits, q.out_signed if q.out_bits else False, False):
            out.append(f"output type {n.type.text()} does not match the spec's output quantization")
    elif n.op in ("quantize",):
        bits = n.attr("bits")
        if n.type.qbits != bits:
            out.append("quantize output type must carry its bits")
        asymmetric = n.attr("asymmetric", False)
        static = n.attr("static_scale", 0.0)
        if isinstance(bits, int) and 1 <= bits <= 8 and isinstance(static, (int, float)):
            out += _asymmetric_problems(asymmetric, n.attr("signed", False), n.attr("zero_point", 0), bits, static > 0)
        if n.type.qzero != asymmetric:
            out.append("quantize output type must be asymmetric (aq) exactly when the quantizer is")
    elif n.type.quantized and n.op not in ("quantize", "qconv2d", "qlinear"):
        out.append("only quantize (or a quantized layer with fused output quantization) yields quantized values")
    elif n.op == "take":
        out += _take_index_problems(g, n)
    out += attr_problems(n)
    params_needed = OP_TABLE[n.op].param_inputs
    out += [f"input {i} (%{v}) must be a parameter" for i, v in enumerate(n.inputs)
            if i in params_needed and v not in g.params]
    if not out:  # the shape rule reads the attributes
        out += _shape_problems(g, n)
    return out


def _shape_problems(g: Graph, n: Node) -> list[str]:
    """The node's type must be the shape its op's rule gives for its inputs and attributes."""
    types = [_safe_type(g, i) for i in n.inputs]
    if any(t is None for t in types):
        return []  # an undefined input is reported by verify
    try:
        expect = expected_shape(n, [t.shape for t in types])
    except ShapeError as e:
        return [str(e)]
    if expect != n.type.shape:
        return [f"output shape {list(n.type.shape)} should be {list(expect)}"]
    return []


def _safe_type(g: Graph, name: str) -> TensorType | None:
    try:
        return g.type_of(name)
    except KeyError:
        return None


# -- serialization: JSON + npz, never pickle --------------------------------------------------

IR_FORMAT, IR_VERSION = "csqc-ir", 1


def graph_to_json(g: Graph) -> dict:
    return {
        "format": IR_FORMAT,
        "version": IR_VERSION,
        "name": g.name,
        "inputs": [{"name": v.name, "type": v.type.to_json()} for v in g.inputs],
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": list(n.inputs), "type": n.type.to_json(),
             "attrs": {k: _attr_json(v) for k, v in n.attrs.items()},
             "quant": n.quant.to_json() if n.quant else None, "source": n.source}
            for n in g.nodes
        ],
        "outputs": list(g.outputs),
    }


def _attr_json(v):
    return [_attr_json(x) for x in v] if isinstance(v, tuple) else v


def save_graph(g: Graph, path) -> None:
    """Write ``g`` as a zip of ``graph.json`` and ``params.npz`` (atomically)."""
    from .outputs import atomic_write

    def write(tmp):
        params = npz_bytes({k: np.asarray(v) for k, v in g.params.items()})  # stored members, any names
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("graph.json", json.dumps(graph_to_json(g), indent=1))
            z.writestr("params.npz", params)

    atomic_write(path, write)


# a missing member (KeyError) or an array claiming terabytes (MemoryError) is damage too
_UNREADABLE = UNREADABLE_ARCHIVE + (KeyError, MemoryError)
_MAX_IR_JSON_BYTES = 64 << 20  # as a model file's program: a ResNet-20 graph is ~100 KB
_MAX_IR_TENSOR_BYTES = 8 << 30  # as a model file's tensors


def load_graph(path) -> Graph:
    """Read a graph written by ``save_graph``; refuses anything else with ``BadInput``."""
    try:
        with zipfile.ZipFile(path) as z:
            # zipfile would silently read the last of two same-named members; sizes are checked before
            # reading, and params.npz's members must be stored: no zip bomb nested in another
            members = unique_members(z, str(path))
            meta = json.loads(read_member(z, members["graph.json"], str(path), _MAX_IR_JSON_BYTES))
            raw = read_member(z, members["params.npz"], str(path), _MAX_IR_TENSOR_BYTES + (1 << 20))
        params = read_npz(raw, f"{path}: params.npz", limit_bytes=_MAX_IR_TENSOR_BYTES, stored_only=True)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except _UNREADABLE as e:
        reason = (str(e).splitlines() or [""])[0][:120]
        raise BadInput(f"{path}: not a csqc IR file or a damaged one ({type(e).__name__}: {reason}); "
                       "write it again with csqc.ir.save_graph") from None
    return graph_from_json(meta, params, str(path))


def _name(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _names(values, what: str) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise TypeError(f"{what} must be a list of names, got {type(values).__name__}")
    return tuple(_name(v, what) for v in values)


def graph_from_json(meta: dict, params: dict, where: str = "IR") -> Graph:
    try:
        if meta.get("format") != IR_FORMAT or meta.get("version") != IR_VERSION:
            raise BadInput(f"{where}: not a csqc IR file of version {IR_VERSION}")
        g = Graph(
            inputs=tuple(Value(_name(v["name"], "input name"), TensorType.from_json(v["type"])) for v in meta["inputs"]),
            nodes=tuple(
                Node(_name(n["name"], "node name"), _name(n["op"], "op"), _names(n["inputs"], "node inputs"),
                     TensorType.from_json(n["type"]), n.get("attrs", {}),
                     QuantSpec.from_json(n["quant"]) if n.get("quant") else None, _name(n.get("source", ""), "source"))
                for n in meta["nodes"]
            ),
            outputs=_names(meta["outputs"], "outputs"),
            params=params,
            name=_name(meta.get("name", "model"), "graph name"),
        )
    except BadInput:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError, IRError) as e:
        raise BadInput(f"{where}: malformed IR ({type(e).__name__}: {e})") from None
    try:
        verify(g)
    except IRError as e:  # one line: the first problem, and how many more
        problems = [line.strip() for line in str(e).splitlines() if line.strip()]
        more = f" (and {len(problems) - 2} more problems)" if len(problems) > 2 else ""
        raise BadInput(f"{where}: {' '.join(problems[:2])}{more}") from None
    return g
