"""Fewer, leaner kernel calls for recurrent steps on the llvm target (issue 16 item 7).

* ``glue.elementwise_chain``: a run of elementwise ops (broadcasting binary ops, unary ops,
  slices) and the quantizers after them in one kernel, bit for bit what the unfused kernels
  give one by one.
* ``glue``'s tanh (one ``exp`` per element, both signs) is odd and as close to the true tanh as
  TVM's (two).
* ``kernels.bitparallel_dense_signed``: both sign passes of signed codes in one call (serial
  below a work threshold), exact against integer numpy, odd K and N included.
* End to end: LSTM and GRU step models compile to fewer calls, give the unfused build's
  outputs bit for bit, and verify against the interpreter and ONNX Runtime with exact
  accumulators.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from cpus import AVX2_CPU, CODE_LIMIT, code_limit_of
from csqc import runtime
from csqc.artifact import pack_bitparallel_weight
from csqc.targets.llvm import glue, isa, kernels
from csqc.targets.llvm.backend import CpuBackend

RNG = np.random.default_rng(5)
F32 = np.float32


def rand(*shape, scale=2.0):
    return (RNG.standard_normal(shape) * scale).astype(F32)


def run(prim_func, *inputs, outputs):
    """Run a built kernel; ``outputs`` are the (shape, dtype) of its trailing output parameters."""
    import tvm

    kernel = kernels.build(prim_func)
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in outputs]
    kernel.executable(*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs], *outs)
    return [t.numpy() for t in outs]


def one(prim_func, *inputs, shape):
    return run(prim_func, *inputs, outputs=[(shape, "float32")])[0]


# ------------------------------------------------------------------------------------------
# elementwise_chain vs the unfused kernels
# ------------------------------------------------------------------------------------------
def test_chain_with_broadcast_slices_and_quantizers_equals_unfused_kernels():
    # gates [2, 12] + per-column bias [12] -> slices (both rows, a middle and the last
    # block) -> sigmoid / tanh / clip, times a broadcast column [2, 1], a scalar minimum
    gates, bias, col, cap = rand(2, 12), rand(12), rand(2, 1), rand(1)
    s = glue.slice_axis
    total = one(glue.binary("add", (2, 12), (12,), (2, 12)), gates, bias, shape=(2, 12))
    a = one(s((2, 12), 1, 4, 8), total, shape=(2, 4))
    b = one(s((2, 12), 1, 8, 12), total, shape=(2, 4))
    sa = one(glue.unary("sigmoid", (2, 4)), a, shape=(2, 4))
    tb = one(glue.unary("tanh", (2, 4)), b, shape=(2, 4))
    prod = one(glue.binary("mul", (2, 4), (2, 4), (2, 4)), sa, tb, shape=(2, 4))
    scaled = one(glue.binary("mul", (2, 4), (2, 1), (2, 4)), prod, col, shape=(2, 4))
    summed = one(glue.binary("add", (2, 4), (2, 4), (2, 4)), scaled, prod, shape=(2, 4))  # FMA bait
    clipped = one(glue.unary("clip", (2, 4), -0.5, 0.25), summed, shape=(2, 4))
    low = one(glue.binary("minimum", (2, 4), (1,), (2, 4)), clipped, cap, shape=(2, 4))
    q_sym = run(glue.quantize((2, 4), 8, 0.0, True), low,
                outputs=[((1,), "float32"), ((2, 4), "uint8"), ((2, 4), "uint8")])
    q_asym = run(glue.quantize_asymmetric((2, 4), 4, 0.0, 0, False), summed,
                 outputs=[((1,), "float32"), ((1,), "int32"), ((2, 4), "uint8")])

    Op = glue.ChainOp
    ops = (Op("t0", "add", (2, 12), ("g", "bias")), Op("t1", "slice", (2, 4), ("t0",), (1, 4)),
           Op("t2", "slice", (2, 4), ("t0",), (1, 8)), Op("t3", "sigmoid", (2, 4), ("t1",)),
           Op("t4", "tanh", (2, 4), ("t2",)), Op("t5", "mul", (2, 4), ("t3", "t4")),
           Op("t6", "mul", (2, 4), ("t5", "col")), Op("t7", "add", (2, 4), ("t6", "t5")),
           Op("t8", "clip", (2, 4), ("t7",), (-0.5, 0.25)), Op("t9", "minimum", (2, 4), ("t8", "cap")))
    quantizers = (glue.ChainQuantize("t9", 8, 0.0, signed=True),
                  glue.ChainQuantize("t7", 4, 0.0, asymmetric=True))
    func = glue.elementwise_chain((("g", (2, 12)), ("bias", (12,)), ("col", (2, 1)), ("cap", (1,))), ops,
                                  ("t7", "t9"), quantizers)
    f32, u8 = "float32", "uint8"
    got = run(func, gates, bias, col, cap, outputs=[((2, 4), f32), ((2, 4), f32), ((1,), f32), ((2, 4), u8),
                                                    ((2, 4), u8), ((1,), f32), ((1,), "int32"), ((2, 4), u8)])
    for fused, unfused in zip(got, [summed, low, *q_sym, *q_asym]):
        np.testing.assert_array_equal(fused, unfused)


def test_nested_exp_ops_in_a_chain_equal_the_unfused_kernels():
    """An LSTM cell's shape of chain (tanh of a sum of sigmoid and tanh products, sigmoid of a
    tanh, silu): inner exp-based ops are computed into buffers first (the expressions would
    otherwise nest exponentially), bit for bit what the kernels one by one give."""
    x, c = rand(2, 48, scale=4.0), rand(2, 16)
    s = glue.slice_axis
    gates = [one(s((2, 48), 1, 16 * k, 16 * (k + 1)), x, shape=(2, 16)) for k in range(3)]
    i = one(glue.unary("sigmoid", (2, 16)), gates[0], shape=(2, 16))
    g = one(glue.unary("tanh", (2, 16)), gates[1], shape=(2, 16))
    ig = one(glue.binary("mul", (2, 16), (2, 16), (2, 16)), i, g, shape=(2, 16))
    c_new = one(glue.binary("add", (2, 16), (2, 16), (2, 16)), ig, c, shape=(2, 16))
    h = one(glue.unary("tanh", (2, 16)), c_new, shape=(2, 16))
    deep = one(glue.unary("silu", (2, 16)), one(glue.unary("sigmoid", (2, 16)), h, shape=(2, 16)), shape=(2, 16))
    Op = glue.ChainOp
    ops = (Op("t0", "slice", (2, 16), ("x",), (1, 0)), Op("t1", "slice", (2, 16), ("x",), (1, 16)),
           Op("t2", "sigmoid", (2, 16), ("t0",)), Op("t3", "tanh", (2, 16), ("t1",)),
           Op("t4", "mul", (2, 16), ("t2", "t3")), Op("t5", "add", (2, 16), ("t4", "c")),
           Op("t6", "tanh", (2, 16), ("t5",)), Op("t7", "sigmoid", (2, 16), ("t6",)),
           Op("t8", "silu", (2, 16), ("t7",)))
    got = run(glue.elementwise_chain((("x", (2, 48)), ("c", (2, 16))), ops, ("t5", "t6", "t8")), x, c,
              outputs=[((2, 16), "float32")] * 3)
    for fused, unfused in zip(got, [c_new, h, deep]):
        np.testing.assert_array_equal(fused, unfused)


def test_chain_refuses_what_it_cannot_fuse():
    op = glue.ChainOp("t0", "softmax", (4,), ("x",))
    with pytest.raises(ValueError, match="cannot fuse"):
        glue.elementwise_chain((("x", (4,)),), (op,), ("t0",))
    hidden = glue.ChainOp("t0", "relu", (4,), ("x",))
    with pytest.raises(ValueError, match="not an output"):
        glue.elementwise_chain((("x", (4,)),), (hidden, glue.ChainOp("t1", "tanh", (4,), ("t0",))), ("t1",),
                               (glue.ChainQuantize("t0", 8, 0.0),))


def test_one_exp_tanh_is_odd_and_within_rounding_of_the_true_tanh():
    """One ``exp(-2|x|)`` serves both signs: tanh(-x) is -tanh(x) exactly, and every value is
    within a few float32 roundings of the true tanh (the formula cancels near 0, absolutely)."""
    x = np.concatenate([RNG.standard_normal(4096) * s for s in (0.01, 1.0, 5.0, 30.0)]).astype(F32)
    x[:12] = [0.0, -0.0, 1e-30, -1e-30, 9.0, -9.0, 44.0, -44.0, 88.0, -88.0, np.inf, -np.inf]
    ours = one(glue.unary("tanh", x.shape), x, shape=x.shape)
    np.testing.assert_array_equal(one(glue.unary("tanh", x.shape), -x, shape=x.shape), -ours)
    assert np.abs(ours - np.tanh(x.astype(np.float64))).max() <= 2.5e-7
    assert ours[10] == 1.0 and ours[11] == -1.0


# ------------------------------------------------------------------------------------------
# bitparallel_dense_signed vs integer numpy
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 40, 98), (3, 37, 5), (2, 16, 3), (1, 20, 1), (4, 64, 32)])
@pytest.mark.parametrize("two_signs", [True, False])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("cpu", [None, AVX2_CPU])  # this CPU's tier (AVX-512: one product for both signs), AVX2
def test_small_dense_is_exact(m, n, k, two_signs, parallel, cpu):
    limit = code_limit_of(isa.tier(kernels.cpu_target(cpu)))
    q = RNG.integers(-128, 128, (n, k)).astype(np.int8)
    q[0, :2] = [-128, 127][:k]  # the int8 ends: -128 complemented is 127, 127 is -128
    neg = RNG.integers(0, limit, (m, k)).astype(np.uint8)
    pos = np.where(neg > 0, 0, RNG.integers(0, limit, (m, k))).astype(np.uint8)
    neg[0, :] = np.where(np.arange(k) % 3 == 0, limit - 1, neg[0, :])  # whole runs of the largest negative code
    pos[0, :] = np.where(neg[0, :] > 0, 0, pos[0, :])
    codes = [pos, neg] if two_signs else [pos]
    with kernels.cpu_target(cpu):
        func = kernels.bitparallel_dense_signed(m, n, k, two_signs, parallel)
        (got,) = run(func, *codes, pack_bitparallel_weight(q, "int8"), outputs=[((m, n), "int32")])
    signed = pos.astype(np.int64) - (neg.astype(np.int64) if two_signs else 0)
    np.testing.assert_array_equal(got, signed @ q.T.astype(np.int64))
    if isa.tier(kernels.cpu_target(cpu)) == isa.AVX512:  # both sign parts in one vpdpbusd a weight vector
        assert func.script().count("vpdpbusd") == min(4, -(-n // 16))  # (the tile's 4 column vectors)


@pytest.mark.parametrize("cpu", [None, AVX2_CPU])
def test_small_dense_takes_every_code_of_either_sign(cpu):
    """Every code value once as a negative part (row 0) and once as a positive one (row 1), and
    both signs interleaved (row 2): the one-product form's byte mask and the row's negative
    sum must see each value, 1 and the largest included."""
    limit = code_limit_of(isa.tier(kernels.cpu_target(cpu)))
    k, n = limit + 3, 20
    values = np.arange(1, limit)
    pos, neg = np.zeros((3, k), np.uint8), np.zeros((3, k), np.uint8)
    neg[0, :values.size], pos[1, :values.size] = values, values
    pos[2, 0::2], neg[2, 1::2] = values[:(k + 1) // 2], values[:k // 2]
    q = RNG.integers(-128, 128, (n, k)).astype(np.int8)
    with kernels.cpu_target(cpu):
        (got,) = run(kernels.bitparallel_dense_signed(3, n, k, True, False), pos, neg,
                     pack_bitparallel_weight(q, "int8"), outputs=[((3, n), "int32")])
    np.testing.assert_array_equal(got, (pos.astype(np.int64) - neg) @ q.T.astype(np.int64))


@pytest.mark.parametrize("max_code,max_weight", [(127, 128), (255, 63)])
def test_small_dense_one_product_on_avx2_is_exact_where_int16_holds_it(max_code, max_weight):
    """AVX2 takes both sign parts in one ``vpmaddubsw`` pair sum where codes times weights one
    larger in magnitude (the complement ``~w = -w - 1``) keep pairs within int16: 2 * 127 * 129
    just fits, so every int8 weight with codes below 128, or weights within 63 with any byte code.
    The largest codes meet the largest weights of either sign; every code value is once a
    negative and once a positive part; one multiply per weight vector where there were two."""
    assert isa.avx2_dot_exact(max_code, max_weight + 1) and not isa.avx2_dot_exact(max_code, max_weight + 2)
    k, n = max_code + 6, 40
    q = RNG.integers(-min(max_weight, 127), min(max_weight, 127) + 1, (n, k)).astype(np.int8)
    q[0], q[1], q[2] = min(max_weight, 127), -max_weight, np.where(np.arange(k) % 2, -max_weight, min(max_weight, 127))
    values = np.arange(1, max_code + 1)
    pos, neg = np.zeros((4, k), np.uint8), np.zeros((4, k), np.uint8)
    neg[0, :values.size], pos[1, :values.size] = values, values
    neg[2, :], pos[3, :] = max_code, max_code
    with kernels.cpu_target(AVX2_CPU):
        one = kernels.bitparallel_dense_signed(4, n, k, True, False, one_product=True)
        two = kernels.bitparallel_dense_signed(4, n, k, True, False)
        (got,) = run(one, pos, neg, pack_bitparallel_weight(q, "int8"), outputs=[((4, n), "int32")])
    np.testing.assert_array_equal(got, (pos.astype(np.int64) - neg) @ q.T.astype(np.int64))
    multiplies = [f.script().count("pmadd.ub.sw") for f in (one, two)]
    assert multiplies[0] > 0 and 2 * multiplies[0] == multiplies[1], multiplies


def test_an_avx2_lstm_step_takes_both_sign_parts_in_one_product(tmp_path):
    """A w4a8 LSTM step built for an AVX2 CPU (symmetric 8-bit codes of signed values: two parts):
    its small dense layers take the one-product form where K is whole groups of 4 (its 16-wide
    recurrent one), two products where not (its 6 inputs), and verify exactly."""
    model = _step_model(tmp_path, nn.LSTM)
    out = tmp_path / "avx2.so"
    csqc.compile(model, "llvm", out, mcpu=AVX2_CPU)
    plan = runtime.load(out).plan
    small = {step["layer"] for step in plan["steps"] if "bpdense_small" in step["func"]}
    one = {name: plan["layers"][name].get("one_product") for name in small}
    assert one == {name: plan["layers"][name]["k"] % 4 == 0 for name in small} and True in one.values() \
        and False in one.values(), one
    report = csqc.verify(model, samples=4, artifact=str(out), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()


# ------------------------------------------------------------------------------------------
# End to end: LSTM / GRU steps, fused against unfused, verify
# ------------------------------------------------------------------------------------------
def _step_model(tmp_path, kind, act_symmetric=True):
    torch.manual_seed(3)
    rnn = csqc.convert(nn.Sequential(kind(6, 16, batch_first=True)), n_bits=4, act_bits=8,
                       quantize_first_input=True, act_symmetric=act_symmetric)[0]
    example = (torch.rand(1, 6), torch.rand(1, 16)) + ((torch.rand(1, 16),) if kind is nn.LSTM else ())
    return csqc.load(csqc.save(csqc.one_step(csqc.finalize(rnn)), tmp_path / "step.pt", example))


@pytest.mark.parametrize("kind,act_symmetric", [(nn.LSTM, True), (nn.LSTM, False), (nn.GRU, True)])
def test_fused_step_equals_unfused_build_and_verifies(tmp_path, monkeypatch, kind, act_symmetric):
    model = _step_model(tmp_path, kind, act_symmetric)
    csqc.compile(model, "llvm", tmp_path / "fused.so")
    with monkeypatch.context() as patch:
        patch.setattr(CpuBackend, "fuse_elementwise", False)
        csqc.compile(model, "llvm", tmp_path / "unfused.so")
    fused, unfused = runtime.load(tmp_path / "fused.so"), runtime.load(tmp_path / "unfused.so")
    kinds = [step["func"].split("_", 1)[1] for step in fused.plan["steps"]]
    assert "chain" in kinds and not {"unary", "binary", "slice_axis"} & set(kinds), kinds
    assert len(fused.plan["steps"]) < len(unfused.plan["steps"]) - 8
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0, 30.0):  # saturated gates too
        xs = [(rng.standard_normal(s["shape"]) * scale).astype(F32) for s in model.input_specs]
        got, expected = fused(*xs), unfused(*xs)
        for a, b in zip(got if isinstance(got, list) else [got], expected if isinstance(expected, list) else [expected]):
            np.testing.assert_array_equal(a, b)
    report = csqc.verify(model, samples=4, artifact=str(tmp_path / "fused.so"), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()
    assert "onnxruntime" in report.runtimes
