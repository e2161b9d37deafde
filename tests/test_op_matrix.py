"""Every op of the op table on every runtime: interpreter, ONNX Runtime, llvm, aarch64, cuda.

One tiny case per op (and per op form that targets handle apart: ceil_mode pooling,
non-divisible adaptive pooling). Each target first says whether it can lower the case
(``Target.unsupported``): a case it cannot lower is a hole, and the test names it. The cases a
target can lower are built into ONE graph per target (one compile each), run, and compared
with the interpreter output by output. The interpreter itself is checked against the op
table's PyTorch form (quantization ops: against ``csqc.ops``, the layers capture reads).

``KNOWN_HOLES`` lists the holes not filled yet; they are strict xfails, so filling one fails
the test until its entry is removed.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from csqc import interpreter, ops
from csqc.bench import torch_runner
from csqc.ir import Graph, TensorType
from csqc.optable import OP_TABLE
from csqc.passes import run_passes
from csqc.targets.registry import get_target
from irbuild import Builder, random_q

RNG_SEED = 7
TARGETS = ("onnx", "llvm", "aarch64", "cuda")


def _rand(shape, lo=-2.0, hi=2.0, seed=0):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


# case id -> (op, builder(b, prefix) -> output value, {input name: array}); prefixes keep cases
# apart when they share one graph
def _unary(op, shape=(2, 3, 5), **attrs):
    def build(b, p):
        return b.node(f"{p}y", op, [b.input(f"{p}x", shape)], attrs=attrs)
    return op, build


def _unary_wide(op, shape=(2, 3, 7)):
    """``op(3 * x)``: inputs over [-6, 6] reach both clipped ends of hardswish / hardsigmoid."""
    def build(b, p):
        wide = b.node(f"{p}wide", "mul", [b.input(f"{p}x", shape), b.param(f"{p}three", np.full(1, 3, np.float32))],
                      shape)
        return b.node(f"{p}y", op, [wide])
    return op, build


def _sqrt(shape=(2, 3, 7)):
    """``sqrt(relu(x) * 7)``: nonnegative inputs (correctly rounded: every runtime's bits equal)."""
    def build(b, p):
        positive = b.node(f"{p}positive", "relu", [b.input(f"{p}x", shape)], shape)
        wide = b.node(f"{p}wide", "mul", [positive, b.param(f"{p}seven", np.full(1, 7, np.float32))], shape)
        return b.node(f"{p}y", "sqrt", [wide])
    return "sqrt", build


def _log(shape=(2, 3, 7)):
    """``log(relu(x) * 7 + 0.25)``: positive inputs from 0.25 to 14 (below 1 and above it)."""
    def build(b, p):
        positive = b.node(f"{p}positive", "relu", [b.input(f"{p}x", shape)], shape)
        wide = b.node(f"{p}wide", "mul", [positive, b.param(f"{p}seven", np.full(1, 7, np.float32))], shape)
        lifted = b.node(f"{p}lifted", "add", [wide, b.param(f"{p}quarter", np.full(1, 0.25, np.float32))], shape)
        return b.node(f"{p}y", "log", [lifted])
    return "log", build


def _binary(op, a_shape=(2, 3, 4), b_shape=(3, 1), positive_b=False):
    def build(b, p):
        other = b.param(f"{p}b", _rand(b_shape, 0.5 if positive_b else -2.0, 2.0, seed=3))
        x = b.input(f"{p}x", a_shape)
        return b.node(f"{p}y", op, [x, other], np.broadcast_shapes(a_shape, b_shape))
    return op, build


def _pool(op, shape, out, **attrs):
    def build(b, p):
        return b.node(f"{p}y", op, [b.input(f"{p}x", shape)], out, attrs=attrs)
    return op, build


def _quant_linear(b, p):
    q = b.quantize(b.input(f"{p}x", (2, 16)), bits=4, name=f"{p}xq")
    rng = np.random.default_rng(RNG_SEED)
    return b.qlinear(f"{p}fc", q, random_q(rng, (6, 16), 6, (5, 3, 0)), n_bits=6, active_bits=(5, 3, 0),
                     add=_rand(6, seed=4))


def _quant_conv(b, p):
    q = b.quantize(b.input(f"{p}x", (1, 3, 6, 6)), bits=3, name=f"{p}xq")
    rng = np.random.default_rng(RNG_SEED)
    return b.qconv2d(f"{p}conv", q, random_q(rng, (4, 3, 3, 3), 4, (3, 1)), n_bits=4, active_bits=(3, 1),
                     padding=1, add=_rand(4, seed=5))


def _float_conv(b, p):
    x = b.input(f"{p}x", (1, 3, 6, 6))
    w, bias = b.param(f"{p}w", _rand((4, 3, 3, 3), seed=1)), b.param(f"{p}bias", _rand(4, seed=2))
    return b.node(f"{p}y", "conv2d", [x, w, bias], (1, 4, 3, 3),
                  attrs={"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "act": "none"})


def _float_linear(b, p):
    x = b.input(f"{p}x", (2, 12))
    w, bias = b.param(f"{p}w", _rand((5, 12), seed=1)), b.param(f"{p}bias", _rand(5, seed=2))
    return b.node(f"{p}y", "linear", [x, w, bias], (2, 5), attrs={"act": "relu"})


def _quant_roundtrip(b, p):
    return b.dequantize(b.quantize(b.input(f"{p}x", (2, 8)), bits=4, name=f"{p}xq"), name=f"{p}y")


def _asymmetric_roundtrip(b, p):
    x = b.input(f"{p}x", (2, 8))
    b.node(f"{p}xq", "quantize", [x], dtype="int32", qbits=4,
           attrs={"bits": 4, "static_scale": 0.0, "signed": False, "asymmetric": True, "zero_point": 0})
    b.nodes[-1] = b.nodes[-1].replace(type=TensorType((2, 8), "int32", 4, False, True))
    b.types[f"{p}xq"] = b.nodes[-1].type
    return b.dequantize(f"{p}xq", name=f"{p}y")


def _with_params(op, x_shape, out_shape, params, **attrs):
    def build(b, p):
        names = [b.param(f"{p}{k}", v) for k, v in params.items()]
        return b.node(f"{p}y", op, [b.input(f"{p}x", x_shape)] + names, out_shape, attrs=attrs)
    return op, build


def _two_inputs(op, a_shape, b_shape, out_shape, **attrs):
    def build(b, p):
        return b.node(f"{p}y", op, [b.input(f"{p}a", a_shape), b.input(f"{p}b", b_shape)], out_shape, attrs=attrs)
    return op, build


def _embedding(b, p):
    table = b.param(f"{p}table", _rand((7, 5), seed=1))
    return b.node(f"{p}y", "embedding", [table, b.input(f"{p}ids", (2, 3), "int64")], (2, 3, 5))


def _take(x_shape, axis, index):
    """``take`` of an input along ``axis`` at a constant int32 ``index`` (repeats, reversals)."""
    index = np.asarray(index, np.int32)
    out_shape = x_shape[:axis] + index.shape + x_shape[axis + 1:]

    def build(b, p):
        return b.node(f"{p}y", "take", [b.input(f"{p}x", x_shape), b.param(f"{p}index", index)], out_shape,
                      attrs={"axis": axis})
    return "take", build


def _select(b, p):
    """``select(relu(c), a, b)``: a condition of zeros and other values, broadcast over ``a``; ``b`` a scalar."""
    condition = b.node(f"{p}condition", "relu", [b.input(f"{p}c", (2, 1, 5))], (2, 1, 5))
    return b.node(f"{p}y", "select", [condition, b.input(f"{p}a", (2, 3, 5)),
                                      b.param(f"{p}b", np.full(1, -0.75, np.float32))], (2, 3, 5))


def _input_array(v) -> np.ndarray:
    """Float inputs uniform in [-2, 2); integer ones (token ids) valid rows of a 7-row table."""
    seed = zlib.crc32(v.name.encode())
    if v.type.dtype != "float32":
        return np.random.default_rng(seed).integers(0, 7, v.type.shape).astype(v.type.dtype)
    return _rand(v.type.shape, seed=seed)


CASES = {
    "quantize": ("quantize", _quant_roundtrip),
    "quantize[asymmetric]": ("quantize", _asymmetric_roundtrip),
    "dequantize": ("dequantize", _quant_roundtrip),
    "qlinear": ("qlinear", _quant_linear),
    "qconv2d": ("qconv2d", _quant_conv),
    "conv2d": ("conv2d", _float_conv),
    "linear": ("linear", _float_linear),
    "batch_norm": _with_params("batch_norm", (1, 4, 3, 3), (1, 4, 3, 3),
                               {"mul": _rand(4, seed=1), "add": _rand(4, seed=2)}),
    "relu": _unary("relu"),
    "clip": _unary("clip", lo=-0.5, hi=1.0),
    "sigmoid": _unary("sigmoid"),
    "tanh": _unary("tanh"),
    "gelu": _unary("gelu", approximate="none"),
    "gelu[tanh]": _unary("gelu", approximate="tanh"),
    "hardsigmoid": _unary_wide("hardsigmoid"),
    "hardswish": _unary_wide("hardswish"),
    "silu": _unary("silu"),
    "sqrt": _sqrt(),
    "exp": _unary_wide("exp"),
    "log": _log(),
    "erf": _unary_wide("erf"),
    "sin": _unary_wide("sin"),
    "cos": _unary_wide("cos"),
    "add": _binary("add"),
    "sub": _binary("sub"),
    "mul": _binary("mul"),
    "div": _binary("div", positive_b=True),
    "minimum": _binary("minimum"),
    "expand": _pool("expand", (1, 4), (3, 4)),
    "max_pool2d": _pool("max_pool2d", (1, 2, 7, 7), (1, 2, 4, 4), kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    "max_pool2d[ceil_mode]": _pool("max_pool2d", (1, 2, 8, 8), (1, 2, 4, 4), kernel=(3, 3), stride=(2, 2),
                                   padding=(0, 0), ceil_mode=True),
    # the last windows reach a kernel's width past the input (ONNX Runtime refuses such pads)
    "max_pool2d[ceil_mode, dilated]": _pool("max_pool2d", (1, 2, 4, 22), (1, 2, 2, 8), kernel=(2, 2), stride=(3, 3),
                                            padding=(0, 0), dilation=(2, 2), ceil_mode=True),
    "avg_pool2d": _pool("avg_pool2d", (1, 2, 6, 6), (1, 2, 3, 3), kernel=(2, 2), stride=(2, 2), padding=(0, 0)),
    "avg_pool2d[ceil_mode]": _pool("avg_pool2d", (1, 2, 7, 7), (1, 2, 4, 4), kernel=(2, 2), stride=(2, 2),
                                   padding=(0, 0), ceil_mode=True),
    "adaptive_avg_pool2d": _pool("adaptive_avg_pool2d", (1, 2, 6, 4), (1, 2, 3, 2), output_size=(3, 2)),
    "adaptive_avg_pool2d[non-divisible]": _pool("adaptive_avg_pool2d", (1, 2, 7, 5), (1, 2, 3, 2),
                                                output_size=(3, 2)),
    "mean": _pool("mean", (2, 3, 4), (2, 4), dims=(1,), keepdim=False),
    "amax": _pool("amax", (2, 3, 4), (2, 4), dims=(1,), keepdim=False),
    "amax[rows]": _pool("amax", (2, 3, 37), (2, 3, 1), dims=(2,), keepdim=True),  # vector partials and a tail
    "softmax": _pool("softmax", (2, 3, 5), (2, 3, 5), axis=2),
    "layer_norm": _with_params("layer_norm", (2, 3, 8), (2, 3, 8),
                               {"w": _rand(8, seed=1), "b": _rand(8, seed=2)}, axis=2, eps=1e-5),
    "matmul": _two_inputs("matmul", (2, 3, 4), (2, 4, 5), (2, 3, 5)),
    "reshape": _pool("reshape", (2, 3, 4), (6, 4)),
    "permute": _pool("permute", (2, 3, 4), (4, 2, 3), dims=(2, 0, 1)),
    "cat": _two_inputs("cat", (2, 3), (2, 5), (2, 8), axis=1),
    "slice": _pool("slice", (2, 6, 3), (2, 3, 3), axis=1, start=2, end=5),
    "embedding": ("embedding", _embedding),
    "take": _take((2, 5, 3), 1, [[4, 0, 0], [3, 1, 2]]),
    "take[last axis]": _take((2, 3, 6), 2, [5, 4, 3, 2, 1, 0, 5]),
    "select": ("select", _select),
}

# (case, target) holes not filled yet: strict xfails, remove an entry once its hole is filled
KNOWN_HOLES: set[tuple[str, str]] = set()


def _case_graph(cases, name="ops") -> tuple[Graph, dict[str, np.ndarray], dict[str, str]]:
    """One graph holding ``cases`` side by side; returns it, its inputs and case -> output."""
    b = Builder(name)
    outputs = {}
    for i, case in enumerate(cases):
        outputs[case] = CASES[case][1](b, f"c{i}_")
    inputs = {v.name: _input_array(v) for v in b.inputs}
    return b.build(*outputs.values()), inputs, outputs


def test_every_op_has_a_case():
    covered = {op for op, _ in CASES.values()}
    assert covered == set(OP_TABLE), f"ops without a matrix case: {sorted(set(OP_TABLE) - covered)}"


def test_every_op_has_numpy_semantics_or_is_a_quantization_op():
    for name, d in OP_TABLE.items():
        assert (d.evaluate is None) == (name in ("quantize", "dequantize", "qconv2d", "qlinear")), name
        assert d.torch is not None or d.evaluate is None, f"{name}: no torch form for the bench baseline"


def _torch_reference(g: Graph, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph in PyTorch: the table's torch forms, the quantization ops from ``csqc.ops``."""
    env = {k: torch.from_numpy(np.array(v)) for k, v in g.params.items()}
    env.update({k: torch.from_numpy(v) for k, v in inputs.items()})
    for n in g.nodes:
        a = [env[i] for i in n.inputs]
        if n.op == "quantize" and n.attr("asymmetric", False):
            env[n.name] = ops.fake_quant_act_asymmetric(a[0], n.attr("bits"), n.attr("static_scale"),
                                                        n.attr("zero_point"))
        elif n.op == "quantize":
            env[n.name] = ops.fake_quant_act(a[0], n.attr("bits"), n.attr("static_scale"))
        elif n.op == "dequantize":
            env[n.name] = a[0]
        elif n.op in ("qlinear", "qconv2d"):
            w = a[1].to(torch.float32) * a[2].reshape((-1,) + (1,) * (a[1].dim() - 1))
            bias = a[3] if len(a) == 4 else None
            env[n.name] = (torch.nn.functional.linear(a[0], w, bias) if n.op == "qlinear" else
                           torch.nn.functional.conv2d(a[0], w, bias, n.attr("stride"), n.attr("padding"),
                                                      n.attr("dilation"), n.attr("groups")))
        else:
            env[n.name] = OP_TABLE[n.op].torch(n, a)
    return [env[o].numpy() for o in g.outputs]


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreter(case):
    g, inputs, _ = _case_graph([case])
    got = interpreter.run(g, inputs)
    want = _torch_reference(g, inputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _supported(target: str) -> list[str]:
    t = get_target(target)
    return [c for c in sorted(CASES) if not t.unsupported(run_passes(_case_graph([c])[0], t.pipeline)[0])]


@pytest.fixture(scope="module")
def target_runs(tmp_path_factory):
    """target -> (outputs by case or None where it only compiles, the cases it lowered)."""
    cache = {}

    def run(target: str):
        if target not in cache:
            cache[target] = _build_and_run(target, tmp_path_factory.mktemp(target))
        return cache[target]

    return run


def _build_and_run(target: str, folder):
    cases = _supported(target)
    g, inputs, outputs = _case_graph(cases)
    t = get_target(target)
    optimized = run_passes(g, t.pipeline)[0]
    path = folder / f"ops{t.suffix}"
    arrays = [inputs[v.name] for v in g.inputs]
    if target == "onnx":
        from csqc.targets.onnx.reference import emit_reference
        from csqc.targets.onnx.runner import make_session

        session = make_session(emit_reference(optimized), exact=True)
        got = session.run(None, {v.name: a for v, a in zip(g.inputs, arrays)})
    elif target == "llvm":
        from csqc.runtime import load
        from csqc.targets.llvm.target import emit_llvm

        emit_llvm(optimized, path)
        got = load(path)(*arrays)
    elif target == "aarch64":
        from csqc.targets.aarch64.target import emit_aarch64

        emit_aarch64(optimized, path)
        got = _run_emulated(path, arrays)
    else:
        from csqc.targets.cuda.target import emit_cuda

        emit_cuda(optimized, path, arch="sm_80")
        got = None  # no GPU here: compiled only
    if got is not None:
        got = dict(zip(outputs, got if isinstance(got, (list, tuple)) else [got]))
    expected = dict(zip(outputs, interpreter.run(g, inputs)))
    return got, expected, cases


def _run_emulated(path, arrays):
    from csqc.errors import BadInput
    from csqc.targets.aarch64 import emulation

    try:
        emulation.check_emulator()
    except BadInput:
        return None  # cross-compiled only; CI runs it under qemu-user
    return emulation.load_emulated(path)(*arrays)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_target(case, target, target_runs, request):
    if (case, target) in KNOWN_HOLES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known hole"))
    t = get_target(target)
    missing = t.unsupported(run_passes(_case_graph([case])[0], t.pipeline)[0])
    assert not missing, f"hole: the {target} target cannot lower {case}: {missing}"
    got, expected, cases = target_runs(target)
    assert case in cases
    if got is not None:
        np.testing.assert_allclose(got[case], expected[case], rtol=1e-5, atol=1e-5, err_msg=f"{case} on {target}")


def test_readme_operator_table_is_current():
    from pathlib import Path

    from csqc.targets.registry import support_table_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- generated by `csqc ops --markdown`")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- end of generated table -->")
    assert readme[start:end] == support_table_markdown(), "README operator table is stale: run `csqc ops --markdown`"
