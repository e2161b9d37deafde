"""fold_scales: constant channel-wise mul/add after a quantized layer fold into its mult/add."""
import numpy as np
import pytest

from csqc.passes import get_pass
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

fold_scales = get_pass("fold_scales").run


@pytest.fixture
def linear_mul_add():
    """quantize -> qlinear -> mul(per-channel [1, O]) -> add(scalar)."""
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", (3, 10))
    q = b.quantize(x, 4)
    y = b.qlinear("fc", q, random_q(rng, (4, 10), 5, (4, 3, 1)), n_bits=5, active_bits=(4, 3, 1))
    c = b.param("scale", (rng.random((1, 4)) + 0.5).astype(np.float32))
    m = b.node("fc.mul", "mul", [y, c])
    s = b.param("shift", np.array(0.25, np.float32))
    a = b.node("fc.addc", "add", [m, s])
    return b.build(a), [rng.standard_normal((3, 10)).astype(np.float32)]


@pytest.fixture
def conv_mul():
    rng = np.random.default_rng(1)
    b = Builder()
    x = b.input("x", (1, 2, 4, 3))  # W == C: a [C] constant broadcasts along W
    y = b.qconv2d("conv", b.quantize(x, 3), random_q(rng, (3, 2, 3, 3), 4, (3, 1, 0)), n_bits=4,
                  active_bits=(3, 1, 0), padding=1, add=np.ones(3, np.float32))
    c = b.param("c", (rng.random((1, 3, 1, 1)) + 0.5).astype(np.float32))
    return b.build(b.node("conv.mul", "mul", [c, y], (1, 3, 4, 3))), [rng.standard_normal((1, 2, 4, 3)).astype(np.float32)]


def test_mul_and_add_after_a_quantized_linear_are_removed(linear_mul_add):
    g, _ = linear_mul_add
    out = fold_scales(g)
    assert out.changed
    assert [n.op for n in out.graph.nodes] == ["quantize", "qlinear"]
    assert out.graph.outputs == ("fc",)


def test_scale_lands_in_mult_and_shift_in_a_new_add(linear_mul_add):
    g, _ = linear_mul_add
    new = fold_scales(g).graph
    fc = new.node("fc")
    assert np.array_equal(new.params[fc.inputs[2]], (g.params["fc.mult"] * g.params["scale"].reshape(4)).astype(np.float32))
    assert np.array_equal(new.params[fc.inputs[3]], np.full(4, 0.25, np.float32))


def test_accumulators_are_exact_and_outputs_close(linear_mul_add, conv_mul):
    for g, x in (linear_mul_add, conv_mul):
        (before,), rec_before = run(g, x)
        (after,), rec_after = run(fold_scales(g).graph, x)
        assert_same_accumulators(rec_before, rec_after)
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_constant_as_first_operand_with_an_existing_add_is_folded(conv_mul):
    g, _ = conv_mul
    new = fold_scales(g).graph
    c = g.params["c"].reshape(3)
    assert [n.op for n in new.nodes] == ["quantize", "qconv2d"]
    assert np.array_equal(new.params["conv.add"], (np.ones(3, np.float32) * c).astype(np.float32))


def test_constant_that_broadcasts_along_width_is_not_folded(conv_mul):
    g, _ = conv_mul
    g2 = g.with_params({"c": np.array([1.0, 2.0, 3.0], np.float32)})  # [C] broadcasts along W, not channels
    run(g2, [np.ones((1, 2, 4, 3), np.float32)])  # a valid graph
    assert not fold_scales(g2).changed


def test_mul_is_kept_after_a_layer_with_a_fused_activation(linear_mul_add):
    g, _ = linear_mul_add
    nodes = tuple(n.replace(attrs={**n.attrs, "act": "relu"}) if n.name == "fc" else n for n in g.nodes)
    assert not fold_scales(g.replace(nodes=nodes)).changed


def test_second_run_reports_no_change(linear_mul_add):
    once = fold_scales(linear_mul_add[0]).graph
    again = fold_scales(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(linear_mul_add, conv_mul):
    for g, _ in (linear_mul_add, conv_mul):
        snap = snapshot(g)
        fold_scales(g)
        assert_unchanged(g, snap)
