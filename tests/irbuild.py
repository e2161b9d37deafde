"""Helpers for tests: build tiny IR graphs by hand, run them, and check pass purity.

Used by the IR and pass tests (``tests`` is on pytest's ``pythonpath``)::

    b = Builder()
    x = b.input("x", (2, 16))
    q = b.quantize(x, bits=4)
    y = b.qlinear("fc", q, random_q(rng, (3, 16), 6, (5, 2, 0)), n_bits=6, active_bits=(5, 2, 0))
    g = b.build(y)
"""
from __future__ import annotations

import numpy as np

from csqc import interpreter
from csqc.ir import Graph, Node, QuantSpec, TensorType, Value

__all__ = [
    "Builder", "random_q", "run", "accumulators", "snapshot", "assert_unchanged", "quant_layer_graph",
    "assert_same_accumulators",
]


def random_q(rng: np.random.Generator, shape, n_bits: int, active_bits, density: float = 0.5) -> np.ndarray:
    """Integer CSQ weights ``q = sum_b 2^b (p_b - n_b)`` over ``active_bits`` (random hard bits)."""
    q = np.zeros(shape, np.int64)
    for b in active_bits:
        p = rng.random(shape) < density
        n = rng.random(shape) < density
        q += (1 << b) * (p.astype(np.int64) - n.astype(np.int64))
    assert np.abs(q).max(initial=0) <= 2**n_bits - 1
    return q.astype(np.int16 if n_bits <= 14 else np.int32)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Builder:
    """Collects inputs, parameters and nodes; ``build`` returns a verified-shape ``Graph``."""

    def __init__(self, name: str = "t"):
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.types: dict[str, TensorType] = {}

    # values ---------------------------------------------------------------------------------
    def input(self, name: str, shape, dtype: str = "float32") -> str:
        t = TensorType(tuple(shape), dtype)
        self.inputs.append(Value(name, t))
        self.types[name] = t
        return name

    def param(self, name: str, array) -> str:
        a = np.asarray(array)
        self.params[name] = a
        self.types[name] = TensorType(a.shape, str(a.dtype))
        return name

    def node(self, name: str, op: str, inputs, shape=None, *, dtype: str = "float32", qbits=None,
             qsigned: bool = False, attrs=None, quant: QuantSpec | None = None) -> str:
        shape = self.types[inputs[0]].shape if shape is None else tuple(shape)
        t = TensorType(shape, dtype, qbits, qsigned)
        self.nodes.append(Node(name, op, tuple(inputs), t, attrs or {}, quant))
        self.types[name] = t
        return name

    # common ops -----------------------------------------------------------------------------
    def quantize(self, x: str, bits: int, *, signed: bool = True, static: float = 0.0, name: str | None = None) -> str:
        name = name or f"{x}.quant"
        return self.node(name, "quantize", [x], dtype="int32", qbits=bits, qsigned=signed,
                         attrs={"bits": bits, "static_scale": float(static), "signed": signed})

    def dequantize(self, q: str, name: str | None = None) -> str:
        return self.node(name or f"{q}.dequant", "dequantize", [q])

    def _layer_params(self, name, q, out_ch, mult, add):
        w = self.param(f"{name}.weight", np.asarray(q))
        mult = np.full(out_ch, 0.01, np.float32) if mult is None else np.asarray(mult, np.float32)
        m = self.param(f"{name}.mult", mult)
        inputs = [w, m]
        if add is not None:
            inputs.append(self.param(f"{name}.add", np.asarray(add, np.float32)))
        return inputs

    def _spec(self, x, n_bits, active_bits, spec_kw):
        t = self.types[x]
        kw = dict(spec_kw)
        if t.quantized:
            kw.setdefault("act_bits", t.qbits)
            kw.setdefault("act_mode", "dynamic")
            kw.setdefault("act_signed", t.qsigned)
        return QuantSpec(n_bits, tuple(active_bits), **kw)

    def qlinear(self, name: str, x: str, q, *, n_bits: int, active_bits, mult=None, add=None,
                act: str = "none", **spec_kw) -> str:
        """A quantized linear layer; a quantized ``x`` makes it read codes (act_bits from ``x``)."""
        q = np.asarray(q)
        shape = self.types[x].shape[:-1] + (q.shape[0],)
        inputs = [x] + self._layer_params(name, q, q.shape[0], mult, add)
        return self.node(name, "qlinear", inputs, shape, attrs={"weight_shape": q.shape, "act": act},
                         quant=self._spec(x, n_bits, active_bits, spec_kw))

    def qconv2d(self, name: str, x: str, q, *, n_bits: int, active_bits, stride=1, padding=0, dilation=1,
                groups: int = 1, mult=None, add=None, act: str = "none", **spec_kw) -> str:
        q = np.asarray(q)
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        b, _, h, w = self.types[x].shape
        o, _, kh, kw = q.shape
        oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        inputs = [x] + self._layer_params(name, q, o, mult, add)
        attrs = {"weight_shape": q.shape, "act": act, "stride": stride, "padding": padding,
                 "dilation": dilation, "groups": groups}
        return self.node(name, "qconv2d", inputs, (b, o, oh, ow), attrs=attrs,
                         quant=self._spec(x, n_bits, active_bits, spec_kw))

    def batch_norm(self, name: str, x: str, alpha, beta) -> str:
        return self.node(name, "batch_norm", [x, self.param(f"{name}.mul", np.asarray(alpha, np.float32)),
                                              self.param(f"{name}.add", np.asarray(beta, np.float32))])

    def build(self, *outputs: str) -> Graph:
        return Graph(tuple(self.inputs), tuple(self.nodes), tuple(outputs), self.params, self.name)


# running and comparing -----------------------------------------------------------------------

def run(g: Graph, inputs) -> tuple[list[np.ndarray], dict]:
    """Interpreter outputs and the full record (values, ``.acc``, ``.codes``)."""
    record: dict = {}
    out = interpreter.run(g, inputs, record=record)
    return out, record


def accumulators(record: dict) -> dict[str, np.ndarray]:
    return {k: v for k, v in record.items() if k.endswith(".acc")}


def assert_same_accumulators(rec_a: dict, rec_b: dict) -> None:
    a, b = accumulators(rec_a), accumulators(rec_b)
    assert a.keys() == b.keys() and a, f"accumulators differ in layers: {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert a[k].dtype == b[k].dtype == np.int64
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def snapshot(g: Graph) -> tuple[str, dict[str, np.ndarray]]:
    """What a pure pass must leave unchanged: the text form and a copy of every parameter."""
    return g.text(), {k: np.array(v, copy=True) for k, v in g.params.items()}


def assert_unchanged(g: Graph, snap) -> None:
    text, params = snap
    assert g.text() == text
    assert g.params.keys() == params.keys()
    for k, v in params.items():
        assert g.params[k].dtype == v.dtype and np.array_equal(g.params[k], v), k


def quant_layer_graph(rng: np.random.Generator, *, kind: str = "linear", n_bits: int = 6, active_bits=(5, 3, 2, 0),
                      k: int = 40, out_ch: int = 5, act_bits: int | None = 4, batch: int = 2,
                      signed: bool = True, fused: bool = True, q=None) -> tuple[Graph, list[np.ndarray]]:
    """One quantized layer (linear or 3x3 conv) on random data; returns the graph and an input.

    ``fused``: the layer reads activation codes (the form after ``fuse_act_quant``); otherwise
    it reads ``dequantize(quantize(x))`` as captured. ``act_bits=None``: float input.
    """
    b = Builder()
    if kind == "linear":
        x = b.input("x", (batch, k))
        wshape = (out_ch, k)
    else:
        c = max(1, k // 9)
        x = b.input("x", (batch, c, 5, 6))
        wshape = (out_ch, c, 3, 3)
    data = rng.standard_normal(b.types[x].shape).astype(np.float32)
    if not signed:
        data = np.abs(data)
    src = x
    if act_bits is not None:
        src = b.quantize(x, act_bits, signed=signed)
        if not fused:
            src = b.dequantize(src)
    if q is None:
        q = random_q(rng, wshape, n_bits, active_bits)
    mult = (rng.random(out_ch) + 0.5).astype(np.float32) / np.float32(2**n_bits - 1)
    add = rng.standard_normal(out_ch).astype(np.float32) * np.float32(0.1)
    if kind == "linear":
        y = b.qlinear("layer", src, q, n_bits=n_bits, active_bits=active_bits, mult=mult, add=add)
    else:
        y = b.qconv2d("layer", src, q, n_bits=n_bits, active_bits=active_bits, padding=1, mult=mult, add=add)
    return b.build(y), [data]
