"""accumulator_width: int64 exactly where a worst-case bound can exceed int32."""
import numpy as np
import pytest

from csqc.passes import get_pass
from csqc.passes.accumulator_width import accumulator_bound
from irbuild import Builder, assert_same_accumulators, assert_unchanged, quant_layer_graph, run, snapshot

accumulator_width = get_pass("accumulator_width").run
INT32_MAX = 2**31 - 1
K = 512


@pytest.fixture
def wide():
    """N=15, all bits set (|q| = 32767), K=512, 8-bit activations: 512 * 32767 * 255 > 2^31."""
    q = np.full((2, K), 2**15 - 1, np.int32)
    q[1, ::2] *= -1
    g, _ = quant_layer_graph(np.random.default_rng(0), n_bits=15, active_bits=tuple(range(14, -1, -1)),
                             k=K, out_ch=2, act_bits=8, q=q)
    x = np.ones((2, K), np.float32)  # every code at +255: the first output reaches the bound
    return g, [x]


@pytest.fixture
def normal():
    return quant_layer_graph(np.random.default_rng(1), n_bits=8, active_bits=(7, 3, 1, 0), k=64, act_bits=4)


def test_layer_that_could_overflow_int32_gets_int64(wide):
    g, _ = wide
    assert accumulator_bound(g, g.node("layer")) == K * 32767 * 255
    out = accumulator_width(g)
    assert out.changed and out.graph.node("layer").quant.acc_dtype == "int64"


def test_the_overflowing_accumulator_really_exceeds_int32(wide):
    g, x = wide
    _, rec = run(accumulator_width(g).graph, x)
    assert rec["layer.acc"].max() == K * 32767 * 255 > INT32_MAX


def test_normal_layer_keeps_int32(normal):
    out = accumulator_width(normal[0])
    assert not out.changed and out.graph.node("layer").quant.acc_dtype == "int32"


def test_float_input_layer_keeps_int32_even_with_huge_weights():
    q = np.full((2, K), 2**15 - 1, np.int32)
    g, _ = quant_layer_graph(np.random.default_rng(2), n_bits=15, active_bits=tuple(range(14, -1, -1)),
                             k=K, out_ch=2, act_bits=None, q=q)
    assert not accumulator_width(g).changed


def test_offset_correction_term_counts_even_when_the_weights_are_tiny():
    """q in {0, 1} stored as offset planes of q + 30000: the kernel's partial sums are large."""
    rng = np.random.default_rng(3)
    q = (rng.random((2, K)) < 0.5).astype(np.int64)
    u = q + 30000
    planes = np.stack([((u >> b) & 1).astype(np.uint8) for b in range(14, -1, -1)])
    spec_planes = tuple((b, 1) for b in range(14, -1, -1))
    b = Builder()
    x = b.input("x", (1, K))
    y = b.qlinear("fc", b.quantize(x, 8), np.zeros((2, K), np.int32), n_bits=15, active_bits=(0,))
    g = b.build(y)
    fc = g.node("fc")
    g = g.replace(nodes=(g.nodes[0], fc.replace(quant=fc.quant.replace(encoding="offset", planes=spec_planes, zero_point=30000))))
    g = g.with_params({"fc.weight": planes})
    assert int(np.abs(q).sum(axis=1).max()) * 255 < INT32_MAX
    assert accumulator_width(g).graph.node("fc").quant.acc_dtype == "int64"


def test_int64_layer_whose_bound_fits_goes_back_to_int32(normal):
    g, _ = normal
    layer = g.node("layer")
    g64 = g.replace(nodes=tuple(n.replace(quant=n.quant.replace(acc_dtype="int64")) if n is layer else n for n in g.nodes))
    out = accumulator_width(g64)
    assert out.changed and out.graph.node("layer").quant.acc_dtype == "int32"


def test_outputs_and_accumulators_are_bit_identical(wide, normal):
    for g, x in (wide, normal):
        (before,), rec_before = run(g, x)
        (after,), rec_after = run(accumulator_width(g).graph, x)
        assert np.array_equal(before, after)
        assert_same_accumulators(rec_before, rec_after)


def test_second_run_reports_no_change(wide):
    once = accumulator_width(wide[0]).graph
    again = accumulator_width(once)
    assert not again.changed and again.graph is once


def test_input_graph_is_unchanged(wide):
    g, _ = wide
    snap = snapshot(g)
    accumulator_width(g)
    assert_unchanged(g, snap)
