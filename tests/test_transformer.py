"""Transformer encoder support: matmul, layer_norm, gelu and div through every table, then a
small CSQ encoder (csqc.models.transformer) end to end (llvm exact, onnx reference, cuda compile).

Tiers: per-op interpreter vs PyTorch; LLVM glue and CUDA computes (built for the CPU) vs the
interpreter; capture of each aten op; the whole encoder through csqc.verify.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import onnx
import pytest
import torch
import tvm
from torch.nn import functional as F

import csqc
from csqc.interpreter import HANDLERS, run as interpret
from csqc.ir import Graph, IRError, Node, TensorType, Value, verify as verify_ir
from csqc.models.transformer import transformer_encoder
from csqc.targets.llvm import glue
from csqc.targets.llvm.kernels import build

RNG = np.random.default_rng(11)
F32 = np.float32


def rand(*shape, scale=1.0, shift=0.0):
    return (RNG.standard_normal(shape) * scale + shift).astype(F32)


def node(op, out_shape, inputs=("x",), **attrs):
    return Node(name="n", op=op, inputs=tuple(inputs), type=TensorType(tuple(out_shape)), attrs=attrs)


def interp(op, out_shape, *args, **attrs):
    return HANDLERS[op](None, node(op, out_shape, tuple(f"i{k}" for k in range(len(args))), **attrs), list(args))


def run_kernel(prim_func, *inputs, out_shape):
    kernel = build(prim_func)
    out = tvm.runtime.tensor(np.zeros(out_shape, F32), tvm.cpu())
    kernel.executable(*[tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in inputs], out)
    return out.numpy()


def run_compute_on_cpu(func, *inputs, out_shape):
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(out_shape, F32))
    ex(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], out)
    return out.numpy()


MATMULS = [((1, 4, 16, 16), (1, 4, 16, 16)), ((3, 5, 7), (7, 70)), ((2, 1, 5, 33), (3, 33, 19)), ((17, 100), (100, 130))]
NORMS = [((1, 16, 64), 2), ((3, 5, 37), 1), ((2, 100), 1)]


def gelu_input(n=3000):
    x = rand(n, scale=3.0)
    x[:16] = [0.0, -0.0, 1e-30, -1e-30, 100, -100, 5, -5, 4, -4, 3.9, -3.9, 1e-3, -1e-3, 0.5, -0.5]
    return x


# ------------------------------------------------------------------------------------------
# Interpreter vs PyTorch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape,b_shape", MATMULS)
def test_matmul_interpreter_matches_torch(a_shape, b_shape):
    a, b = rand(*a_shape), rand(*b_shape)
    want = torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = interp("matmul", want.shape, a, b)
    assert got.dtype == F32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", NORMS)
def test_layer_norm_interpreter_matches_torch(shape, axis):
    x, w, b = rand(*shape, scale=3.0, shift=1.0), rand(*shape[axis:]), rand(*shape[axis:])
    want = F.layer_norm(torch.from_numpy(x), shape[axis:], torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    got = interp("layer_norm", shape, x, w, b, axis=axis, eps=1e-5)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_interpreter_matches_torch(approximate):
    x = gelu_input()
    want = F.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    got = interp("gelu", x.shape, x, approximate=approximate)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_div_interpreter_matches_torch():
    a, b = rand(4, 8), rand(8, shift=3.0)
    np.testing.assert_array_equal(interp("div", (4, 8), a, b), (torch.from_numpy(a) / torch.from_numpy(b)).numpy())


# ------------------------------------------------------------------------------------------
# LLVM glue vs the interpreter; CUDA computes (on the CPU) vs the interpreter
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape,b_shape", MATMULS)
def test_matmul_glue_matches_interpreter(a_shape, b_shape):
    a, b = rand(*a_shape), rand(*b_shape)
    want = interp("matmul", np.matmul(a, b).shape, a, b)
    got = run_kernel(glue.matmul(a_shape, b_shape), a, b, out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape,axis", NORMS)
def test_layer_norm_glue_matches_interpreter(shape, axis):
    x, w, b = rand(*shape, scale=3.0, shift=1.0), rand(*shape[axis:]), rand(*shape[axis:])
    want = interp("layer_norm", shape, x, w, b, axis=axis, eps=1e-5)
    got = run_kernel(glue.layer_norm(shape, axis, 1e-5), x, w, b, out_shape=shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_glue_matches_interpreter(approximate):
    x = gelu_input()
    want = interp("gelu", x.shape, x, approximate=approximate)
    got = run_kernel(glue.gelu(x.shape, approximate), x, out_shape=x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_div_glue_is_exact():
    a, b = rand(2, 3, 40), rand(3, 1, shift=3.0)
    got = run_kernel(glue.binary("div", a.shape, b.shape, a.shape), a, b, out_shape=a.shape)
    np.testing.assert_array_equal(got, interp("div", a.shape, a, b))


def test_cuda_computes_match_interpreter():
    from csqc.targets.cuda import glue as cuda_glue

    a, b = rand(2, 1, 5, 33), rand(3, 33, 19)
    want = interp("matmul", (2, 3, 5, 19), a, b)
    got = run_compute_on_cpu(cuda_glue.matmul(a.shape, b.shape, compute_only=True), a, b, out_shape=want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    x, w, bias = rand(3, 5, 37, scale=3.0, shift=1.0), rand(37), rand(37)
    want = interp("layer_norm", x.shape, x, w, bias, axis=2, eps=1e-5)
    got = run_compute_on_cpu(cuda_glue.layer_norm(x.shape, 2, 1e-5, compute_only=True), x, w, bias, out_shape=x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    x = gelu_input()
    for approximate in ("none", "tanh"):
        want = interp("gelu", x.shape, x, approximate=approximate)
        got = run_compute_on_cpu(cuda_glue.gelu(x.shape, approximate, compute_only=True), x, out_shape=x.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# IR checks and capture
# ------------------------------------------------------------------------------------------
def test_ir_checks_matmul_and_layer_norm_shapes():
    inputs = (Value("a", TensorType((2, 3, 4))), Value("b", TensorType((4, 5))))
    ok = Node("y", "matmul", ("a", "b"), TensorType((2, 3, 5)))
    verify_ir(Graph(inputs, (ok,), ("y",)))
    with pytest.raises(IRError, match="should be"):
        verify_ir(Graph(inputs, (ok.replace(type=TensorType((2, 3, 4))),), ("y",)))
    params = {"w": np.ones(4, F32), "b": np.zeros(3, F32)}
    ln = Node("y", "layer_norm", ("a", "w", "b"), TensorType((2, 3, 4)), {"axis": 2, "eps": 1e-5})
    with pytest.raises(IRError, match="layer_norm bias is"):
        verify_ir(Graph(inputs, (ln,), ("y",), params))


class _Ops(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)
        self.ln_plain = torch.nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x):
        h = F.gelu(self.ln(x)) + F.gelu(self.ln_plain(x), approximate="tanh")
        s = torch.matmul(h, h.transpose(-2, -1)) / 4.0
        return torch.bmm(torch.softmax(s, dim=-1), h)


def test_capture_covers_the_new_ops(tmp_path):
    x = torch.randn(2, 6, 8)
    path = csqc.save(_Ops().eval(), tmp_path / "ops.pt", x)
    g = csqc.capture(csqc.load(path))
    ops = [n.op for n in g.nodes]
    for op in ("layer_norm", "gelu", "matmul", "div"):
        assert op in ops, g.text(params=False)
    assert {n.attr("approximate") for n in g.nodes if n.op == "gelu"} == {"none", "tanh"}
    with torch.no_grad():
        want = csqc.load(path).module(x).numpy()
    np.testing.assert_allclose(interpret(g, [x.numpy()])[0], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# The encoder end to end
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    model = csqc.convert(transformer_encoder(), n_bits=4, act_bits=4).eval()
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    csqc.save(model, path, torch.randn(1, 16, 64))
    return csqc.load(path), path.parent


def test_encoder_captures_quantized_attention_and_mlp(encoder):
    model, _ = encoder
    g = csqc.capture(model)
    layers = {n.name: n for n in g.quant_layers()}
    assert len(layers) == 13  # 2 x (q, k, v, out, fc1, fc2) + head
    assert layers["blocks.0.attn.q"].quant.act_bits is None  # quantize nodes carry the input bits
    assert sum(n.op == "quantize" for n in g.nodes) == 12
    assert g.type_of("blocks.0.fc1").shape == (1, 16, 256)
    assert [n.op for n in g.nodes].count("matmul") == 4


def test_encoder_verifies_exactly_on_llvm(encoder):
    model, out = encoder
    so = out / "encoder.so"
    csqc.compile(model, "llvm", so)
    report = csqc.verify(model, samples=2, artifact=str(so))
    assert report.ok and report.accumulators_exact, report
    assert "artifact:encoder.so" in report.runtimes and "onnxruntime" in report.runtimes


def test_encoder_onnx_reference(encoder):
    model, out = encoder
    path = out / "encoder.onnx"
    csqc.compile(model, "onnx", path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    used = {n.op_type for n in proto.graph.node}
    assert {"LayerNormalization", "Gelu", "MatMul", "MatMulInteger"} <= used
    report = csqc.verify(model, samples=2, artifact=str(path), runtimes=("interpreter:integer",))
    assert report.ok and report.accumulators_exact, report
    assert "artifact:encoder.onnx" in report.runtimes


def test_encoder_compiles_for_cuda(encoder):
    model, out = encoder
    result = csqc.compile(model, "cuda", out / "encoder_cuda.so", arch="sm_80")
    assert (out / "encoder_cuda.so").stat().st_size > 0
    assert result.report["device_code"]["entries"]
