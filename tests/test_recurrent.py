"""Recurrent models: CSQ LSTM / GRU layers, their ops through every table, and the char-LM example.

Ops added for them (``sigmoid``, ``tanh``, ``sub``, ``slice``): the interpreter against
PyTorch, the LLVM glue against the interpreter, the CUDA computes on the CPU. Converted LSTM
and GRU models (random init, small) verify through ONNX Runtime and an llvm artifact with
exact accumulators, in the sequence and the one-step form; the one-step forms compile for CUDA.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc.interpreter import HANDLERS
from csqc.ir import Graph, IRError, Node, TensorType, Value, verify as verify_ir

RNG = np.random.default_rng(11)
F32 = np.float32
ROOT = Path(__file__).resolve().parents[1]


def rand(*shape, scale=3.0):
    return (RNG.standard_normal(shape) * scale).astype(F32)


def node(op, out_shape, inputs=("x",), **attrs):
    return Node(name="n", op=op, inputs=inputs, type=TensorType(tuple(out_shape)), attrs=attrs)


# ------------------------------------------------------------------------------------------
# The ops: interpreter vs PyTorch, LLVM glue vs interpreter, CUDA compute vs interpreter
# ------------------------------------------------------------------------------------------
UNARY = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_interpreter_matches_pytorch(op):
    x = rand(3, 37, scale=6.0)
    x[0, :4] = [0.0, -100.0, 100.0, 1e-6]  # overflow of exp(-x) and tiny values
    got = HANDLERS[op](None, node(op, x.shape), [x])
    assert got.dtype == F32
    np.testing.assert_allclose(got, UNARY[op](torch.from_numpy(x)).numpy(), rtol=2e-6, atol=2e-7)


def test_sub_and_slice_interpreter_match_pytorch():
    a, b = rand(2, 3, 8), rand(3, 1)
    np.testing.assert_array_equal(HANDLERS["sub"](None, node("sub", a.shape, ("a", "b")), [a, b]), a - b)
    got = HANDLERS["slice"](None, node("slice", (2, 3, 3), axis=2, start=4, end=7), [a])
    np.testing.assert_array_equal(got, torch.from_numpy(a)[..., 4:7].numpy())
    assert got.flags.c_contiguous


def test_ir_checks_slice_and_shapes():
    x = Value("x", TensorType((2, 8)))
    ok = Node("s", "slice", ("x",), TensorType((2, 3)), {"axis": 1, "start": 2, "end": 5})
    verify_ir(Graph((x,), (ok,), ("s",)))
    for bad in (ok.replace(attrs={"axis": 1, "start": 2, "end": 9}, type=TensorType((2, 7))),
                ok.replace(type=TensorType((2, 4))),
                Node("s", "tanh", ("x",), TensorType((2, 7))),
                Node("s", "sub", ("x", "x"), TensorType((2, 9)))):
        with pytest.raises(IRError):
            verify_ir(Graph((x,), (bad,), ("s",)))


def _llvm(func, *inputs, out_shape):
    import tvm

    from csqc.targets.llvm.kernels import build

    kernel = build(func)
    out = tvm.runtime.tensor(np.zeros(out_shape, F32), tvm.cpu())
    kernel.executable(*[tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in inputs], out)
    return out.numpy()


@pytest.mark.parametrize("op,shape", [("sigmoid", (1, 1024)), ("tanh", (1, 1024)), ("sigmoid", (3, 77)),
                                      ("tanh", (256, 520))])
def test_llvm_unary_matches_interpreter(op, shape):
    from csqc.targets.llvm import glue

    x = rand(*shape, scale=5.0)
    x.reshape(-1)[:3] = [-100.0, 100.0, 0.0]
    func = glue.unary(op, shape)
    script = func.script()
    assert "T.vectorized" in script and (x.size < 32768 or "T.parallel" in script)  # scheduled
    got = _llvm(func, x, out_shape=shape)
    np.testing.assert_allclose(got, HANDLERS[op](None, node(op, shape), [x]), rtol=1e-6, atol=3e-7)


def test_llvm_sub_and_slice_exact():
    from csqc.targets.llvm import glue

    a, b = rand(4, 3, 40), rand(3, 1)
    got = _llvm(glue.binary("sub", a.shape, b.shape, a.shape), a, b, out_shape=a.shape)
    np.testing.assert_array_equal(got, HANDLERS["sub"](None, node("sub", a.shape, ("a", "b")), [a, b]))
    for axis, start, end in ((2, 10, 37), (1, 1, 2), (0, 1, 4), (2, 0, 40)):
        n = node("slice", a[(slice(None),) * axis + (slice(start, end),)].shape, axis=axis, start=start, end=end)
        func = glue.slice_axis(a.shape, axis, start, end)
        assert "T.vectorized" in func.script()
        np.testing.assert_array_equal(_llvm(func, a, out_shape=n.type.shape), HANDLERS["slice"](None, n, [a]))


def test_cuda_computes_match_interpreter():
    import tvm

    from csqc.targets.cuda import glue as cuda_glue
    from csqc.targets.cuda import kernels

    def run(func, *inputs, out_shape=None):
        ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm.target.Target({"kind": "llvm"}))
        out = tvm.runtime.tensor(np.zeros(out_shape or inputs[0].shape, F32))
        ex(*[tvm.runtime.tensor(a) for a in inputs], out)
        return out.numpy()

    x = rand(2, 48)
    for op in ("sigmoid", "tanh"):
        got = run(cuda_glue.unary(op, x.shape, compute_only=True), x)
        np.testing.assert_allclose(got, HANDLERS[op](None, node(op, x.shape), [x]), rtol=1e-6, atol=3e-7)
    got = run(cuda_glue.slice_axis(x.shape, 1, 16, 32, compute_only=True), x, out_shape=(2, 16))
    np.testing.assert_array_equal(got, x[:, 16:32])
    b = rand(48)
    got = run(cuda_glue.binary("sub", x.shape, b.shape, x.shape, compute_only=True), x, b)
    np.testing.assert_array_equal(got, x - b)
    gpu = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    for func in (cuda_glue.unary("tanh", (1, 1024)), cuda_glue.slice_axis((1, 1024), 1, 256, 512),
                 cuda_glue.binary("sub", (1, 256), (1, 256), (1, 256))):
        assert kernels.verify_gpu(func, gpu)


# ------------------------------------------------------------------------------------------
# Layers: convert, equivalence with torch, export
# ------------------------------------------------------------------------------------------
class SeqModel(nn.Module):
    def __init__(self, kind, inp=6, hidden=16, out=5):
        super().__init__()
        self.rnn = kind(inp, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_convert_replaces_rnn_and_matches_float(kind):
    torch.manual_seed(0)
    model = SeqModel(kind)
    x = torch.randn(2, 5, 6)
    ref = model(x)
    model = csqc.convert(model, n_bits=8)  # float activations: only weight rounding differs
    assert type(model.rnn).__name__ == f"CSQ{kind.__name__}"
    names = [n for n, _ in csqc.layers.csq_layers(model)]
    assert names == ["rnn.ih.0", "rnn.hh.0", "head"]
    csqc.finalize(model)
    assert (model(x) - ref).abs().max() < 0.05
    # the one-step form reproduces the unrolled sequence
    step = csqc.one_step(model.rnn)
    h = torch.zeros(2, 16)
    state = (h, torch.zeros(2, 16)) if kind is nn.LSTM else (h,)
    for t in range(5):
        state = step(x[:, t], *state)
        state = state if isinstance(state, tuple) else (state,)
    seq_out, _ = model.rnn(x)
    torch.testing.assert_close(state[0], seq_out[:, -1])


@pytest.mark.parametrize("kind, options", [
    (nn.LSTM, dict(bidirectional=True, num_layers=2)), (nn.GRU, dict(bidirectional=True, num_layers=2)),
    (nn.LSTM, dict(proj_size=5, num_layers=2)), (nn.LSTM, dict(proj_size=5, bidirectional=True)),
    (nn.GRU, dict(batch_first=False)), (nn.LSTM, dict(batch_first=False, bidirectional=True)),
], ids=["bi_lstm", "bi_gru", "lstm_proj", "bi_lstm_proj", "gru_time_first", "bi_lstm_time_first"])
def test_every_form_of_torch_rnn_converts_and_matches_it(kind, options):
    """Bidirectional stacks (each layer both ways over the sequence, the next reading both),
    LSTM projections (``proj_size``: a CSQ ``hr`` per layer and direction) and time-first
    inputs: outputs and final states as torch's, up to 12-bit weight rounding."""
    torch.manual_seed(3)
    options = dict(options)
    rnn = kind(6, 12, batch_first=options.pop("batch_first", True), **options)
    x = torch.randn(3, 4, 6)
    want, want_state = rnn(x)
    twin = csqc.finalize(csqc.recurrent.from_torch(rnn, n_bits=12))
    got, state = twin(x)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    for a, b in zip(state if kind is nn.LSTM else (state,), want_state if kind is nn.LSTM else (want_state,)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    if options.get("bidirectional"):
        with pytest.raises(csqc.BadInput, match="no single-step form"):
            twin.step(x[:, 0], state[0] if kind is nn.LSTM else state)


def test_an_unbatched_sequence_is_refused_with_what_to_add():
    twin = csqc.finalize(csqc.recurrent.from_torch(nn.GRU(3, 4), n_bits=4))
    with pytest.raises(csqc.BadInput, match=r"\[T, B, input\]\) expected, got shape \[5, 3\]"):
        twin(torch.randn(5, 3))


class _BothWays(nn.Module):
    """A bidirectional two-layer LSTM with projections, then a time-first bidirectional GRU."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True, bidirectional=True, proj_size=8)
        self.gru = nn.GRU(16, 8, bidirectional=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y, _ = self.gru(self.lstm(x)[0].transpose(0, 1))
        return self.head(y.transpose(0, 1))


def test_bidirectional_and_projected_rnns_verify_exactly(tmp_path):
    torch.manual_seed(4)
    model = csqc.convert(_BothWays().eval(), n_bits=4, act_bits=8)
    names = {n for n, _ in csqc.layers.csq_layers(model)}
    assert {"lstm.ih_reverse.1", "lstm.hr.0", "lstm.hr_reverse.1", "gru.hh_reverse.0"} <= names
    loaded = csqc.load(csqc.save(model, tmp_path / "rnn.pt", torch.rand(2, 2, 6)))  # (two steps: a quick build)
    art = tmp_path / "rnn.so"
    csqc.compile(loaded, "llvm", art)
    report = csqc.verify(loaded, samples=4, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    assert "onnxruntime" in report.runtimes


def test_capture_handles_split_stack_rsub_and_zeros(tmp_path):
    class Ops(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=-1)
            z = x.new_zeros(x.shape[0], 4)
            parts = x.reshape(x.shape[0], 2, 4).unbind(1)
            return torch.stack([1.0 - torch.sigmoid(a), torch.tanh(b) - z, parts[1]], 1)

    from csqc.capture import capture
    from csqc.interpreter import run

    x = torch.randn(2, 8)
    m = csqc.load(csqc.save(Ops(), tmp_path / "ops.pt", x))
    g = capture(m)
    assert {"slice", "sigmoid", "tanh", "sub", "cat"} <= {n.op for n in g.nodes}
    np.testing.assert_allclose(run(g, [x.numpy()])[0], m(x).numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# End to end: verify with an llvm artifact (and ONNX Runtime), cuda compile
# ------------------------------------------------------------------------------------------
def _saved(tmp_path, kind, one_step_form):
    torch.manual_seed(1)
    model = csqc.convert(SeqModel(kind, hidden=32), n_bits=4, act_bits=8, quantize_first_input=True)
    if not one_step_form:
        return csqc.load(csqc.save(model, tmp_path / "seq.pt", torch.rand(2, 4, 6)))
    example = (torch.rand(1, 6), torch.rand(1, 32)) + ((torch.rand(1, 32),) if kind is nn.LSTM else ())
    return csqc.load(csqc.save(csqc.one_step(model.rnn), tmp_path / "step.pt", example))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("form", ["sequence", "step"])
def test_converted_rnn_verifies_with_llvm_artifact(tmp_path, kind, form):
    model = _saved(tmp_path, kind, form == "step")
    art = tmp_path / "model.so"
    csqc.compile(model, "llvm", art)
    report = csqc.verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    assert "onnxruntime" in report.runtimes and any(r.startswith("artifact:") for r in report.runtimes)
    assert {row["layer"] for row in report.layers} >= {"rnn.ih.0", "rnn.hh.0"}
    acc_checked = [row for row in report.layers if row["runtime"].startswith("artifact:") and "acc" in row["checked"]]
    assert acc_checked and all(row["mismatched"]["acc"] == 0 for row in acc_checked)
    if form == "step":  # several outputs (h', c') come back from every runtime
        from csqc import runtime

        outs = runtime.load(art)(*[np.random.rand(*s["shape"]).astype(F32) for s in model.input_specs])
        outs = outs if isinstance(outs, list) else [outs]
        assert [o.shape for o in outs] == [(1, 32)] * (2 if kind is nn.LSTM else 1)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_weight_only_rnn_verifies_per_layer(tmp_path, kind):
    """Float activations: the first step's recurrent layer reads the zero initial state, a
    constant the artifact does not record, so verify checks that layer without its input (it
    failed with a KeyError; found by csqc.differential)."""
    torch.manual_seed(2)
    model = csqc.convert(SeqModel(kind, hidden=16), n_bits=3, act_bits=None)
    model = csqc.load(csqc.save(model, tmp_path / "seq.pt", torch.rand(2, 3, 6)))
    art = tmp_path / "model.so"
    csqc.compile(model, "llvm", art)
    report = csqc.verify(model, samples=4, artifact=str(art), per_layer=True)
    assert report.ok, report.to_json()
    assert {row["layer"] for row in report.layers if row["runtime"].startswith("artifact:")} >= {"rnn.hh.0"}


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_one_step_compiles_for_cuda(tmp_path, kind):
    model = _saved(tmp_path, kind, True)
    result = csqc.compile(model, "cuda", tmp_path / "model.so", arch="sm_80")
    assert (tmp_path / "model.so").stat().st_size > 0
    assert result.report["target"] == "cuda"


def test_char_lm_example_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "char_lm.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "verify: ok=True accumulators_exact=True" in out, out[-3000:]
    assert "validation perplexity" in out and "onnxruntime-int8" in out
    assert (tmp_path / "char_lm_step.llvm.so").exists()
