"""fold_bn: inference BatchNorms fold into the producing layer's mult/add (or float weights)."""
import numpy as np
import pytest

from csqc.passes import get_pass
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

fold_bn = get_pass("fold_bn").run


def _bn_params(rng, c):
    return (rng.random(c) + 0.5).astype(np.float32), rng.standard_normal(c).astype(np.float32)


@pytest.fixture
def qconv_bn():
    """quantize -> qconv2d (reads codes, no add) -> batch_norm."""
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", (2, 3, 6, 6))
    q = b.quantize(x, 4)
    y = b.qconv2d("conv", q, random_q(rng, (4, 3, 3, 3), 6, (5, 2, 1)), n_bits=6, active_bits=(5, 2, 1), padding=1)
    bn = b.batch_norm("bn", y, *_bn_params(rng, 4))
    return b.build(bn), [rng.standard_normal((2, 3, 6, 6)).astype(np.float32)]


@pytest.fixture
def float_conv_bn():
    rng = np.random.default_rng(1)
    b = Builder()
    x = b.input("x", (1, 2, 5, 5))
    w = b.param("conv.weight", rng.standard_normal((3, 2, 3, 3)).astype(np.float32))
    y = b.node("conv", "conv2d", [x, w], (1, 3, 5, 5),
               attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "act": "none"})
    bn = b.batch_norm("bn", y, *_bn_params(rng, 3))
    return b.build(bn), [rng.standard_normal((1, 2, 5, 5)).astype(np.float32)]


def test_batch_norm_after_quantized_conv_is_removed(qconv_bn):
    g, _ = qconv_bn
    out = fold_bn(g)
    assert out.changed
    assert [n.op for n in out.graph.nodes] == ["quantize", "qconv2d"]
    assert out.graph.outputs == ("conv",)


def test_quantized_conv_absorbs_the_scale_into_mult_and_the_shift_into_a_new_add(qconv_bn):
    g, _ = qconv_bn
    new = fold_bn(g).graph
    conv = new.node("conv")
    alpha, beta = g.params["bn.mul"], g.params["bn.add"]
    assert len(conv.inputs) == 4
    assert np.array_equal(new.params[conv.inputs[2]], (g.params["conv.mult"] * alpha).astype(np.float32))
    assert np.array_equal(new.params[conv.inputs[3]], beta)
    assert conv.quant == g.node("conv").quant  # integer weights and spec untouched
    assert np.array_equal(new.params["conv.weight"], g.params["conv.weight"])


def test_accumulators_are_exact_and_outputs_close_after_folding_into_a_quantized_conv(qconv_bn):
    g, x = qconv_bn
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(fold_bn(g).graph, x)
    assert_same_accumulators(rec_before, rec_after)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_existing_add_of_a_quantized_linear_is_scaled_and_shifted():
    rng = np.random.default_rng(2)
    b = Builder()
    x = b.input("x", (3, 8))
    add = rng.standard_normal(2).astype(np.float32)
    y = b.qlinear("fc", x, random_q(rng, (2, 8), 4, (3, 0)), n_bits=4, active_bits=(3, 0), add=add)
    alpha, beta = _bn_params(rng, 2)
    g = b.build(b.batch_norm("bn", y, alpha, beta))
    new = fold_bn(g).graph
    assert np.array_equal(new.params["fc.add"], (add * alpha + beta).astype(np.float32))
    xs = [rng.standard_normal((3, 8)).astype(np.float32)]
    np.testing.assert_allclose(run(new, xs)[0][0], run(g, xs)[0][0], rtol=1e-5, atol=1e-6)


def test_float_conv_folds_into_its_weights_and_a_new_bias(float_conv_bn):
    g, x = float_conv_bn
    new = fold_bn(g).graph
    assert [n.op for n in new.nodes] == ["conv2d"]
    assert len(new.node("conv").inputs) == 3
    (before,), _ = run(g, x)
    (after,), _ = run(new, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_float_linear_folds_into_its_weights_and_bias():
    # a generator's first transposed conv (a 1x1 latent) is captured as a linear layer
    rng = np.random.default_rng(2)
    b = Builder()
    x = b.input("x", (2, 5))
    w = b.param("fc.weight", rng.standard_normal((6, 5)).astype(np.float32))
    y = b.node("fc", "linear", [x, w, b.param("fc.bias", rng.standard_normal(6).astype(np.float32))], (2, 6),
               attrs={"act": "none"})
    g = b.build(b.batch_norm("bn", y, *_bn_params(rng, 6)))
    new = fold_bn(g).graph
    assert [n.op for n in new.nodes] == ["linear"]
    xs = [rng.standard_normal((2, 5)).astype(np.float32)]
    (before,), _ = run(g, xs)
    (after,), _ = run(new, xs)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_batch_norm_is_kept_when_the_layer_has_another_user(qconv_bn):
    g, _ = qconv_bn
    relu = g.nodes[2].replace(name="side", op="relu", inputs=("conv",))
    g2 = g.replace(nodes=g.nodes + (relu,), outputs=("bn", "side"))
    result = fold_bn(g2)
    assert not result.changed and result.graph is g2


def test_batch_norm_is_kept_after_a_layer_with_a_fused_activation(qconv_bn):
    g, _ = qconv_bn
    conv = g.node("conv")
    g2 = g.replace(nodes=tuple(n.replace(attrs={**n.attrs, "act": "relu"}) if n is conv else n for n in g.nodes))
    assert not fold_bn(g2).changed


def test_second_run_reports_no_change(qconv_bn):
    g, _ = qconv_bn
    once = fold_bn(g).graph
    again = fold_bn(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(qconv_bn, float_conv_bn):
    for g, _ in (qconv_bn, float_conv_bn):
        snap = snapshot(g)
        fold_bn(g)
        assert_unchanged(g, snap)
