"""fuse_act_quant: a quantized layer reading dequantize(quantize(x)) reads the codes instead."""
import numpy as np
import pytest

from csqc.passes import get_pass
from irbuild import Builder, assert_unchanged, random_q, run, snapshot

fuse_act_quant = get_pass("fuse_act_quant").run


def _captured(rng, *, signed=True, static=0.0, extra_user=False):
    """x -> quantize -> dequantize -> qlinear (as capture emits it)."""
    b = Builder()
    x = b.input("x", (4, 16))
    q = b.quantize(x, 4, signed=signed, static=static)
    d = b.dequantize(q)
    w = random_q(rng, (3, 16), 6, (5, 4, 0))
    y = b.qlinear("fc", d, w, n_bits=6, active_bits=(5, 4, 0), add=rng.standard_normal(3).astype(np.float32))
    outs = [y]
    if extra_user:
        outs.append(b.node("side", "relu", [d]))
    data = rng.standard_normal((4, 16)).astype(np.float32)
    return b.build(*outs), [np.abs(data) if not signed else data]


@pytest.fixture
def captured():
    return _captured(np.random.default_rng(0))


def test_layer_reads_the_quantize_output(captured):
    g, _ = captured
    out = fuse_act_quant(g)
    assert out.changed
    fc = out.graph.node("fc")
    assert fc.inputs[0] == "x.quant"
    assert [n.op for n in out.graph.nodes] == ["quantize", "dequantize", "qlinear"]  # dce removes the dequantize


def test_spec_records_dynamic_signed_activation_bits(captured):
    spec = fuse_act_quant(captured[0]).graph.node("fc").quant
    assert (spec.act_bits, spec.act_mode, spec.act_signed, spec.act_scale) == (4, "dynamic", True, 0.0)


def test_spec_records_a_static_unsigned_activation_scale():
    g, _ = _captured(np.random.default_rng(1), signed=False, static=2.5)
    spec = fuse_act_quant(g).graph.node("fc").quant
    assert (spec.act_bits, spec.act_mode, spec.act_signed, spec.act_scale) == (4, "static", False, 2.5)


def test_fused_layer_computes_exact_accumulators_and_close_outputs(captured):
    g, x = captured
    (before,), _ = run(g, x)
    (after,), rec = run(fuse_act_quant(g).graph, x)
    codes = rec["x.quant.codes"].astype(np.int64)
    assert np.array_equal(rec["fc.acc"], codes @ g.params["fc.weight"].astype(np.int64).T)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_static_scale_outputs_stay_close():
    g, x = _captured(np.random.default_rng(2), signed=False, static=1.5)
    (before,), _ = run(g, x)
    (after,), _ = run(fuse_act_quant(g).graph, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_dequantize_with_other_users_stays_and_keeps_them():
    g, x = _captured(np.random.default_rng(3), extra_user=True)
    new = fuse_act_quant(g).graph
    assert new.node("side").inputs == ("x.quant.dequant",)
    assert np.array_equal(run(new, x)[0][1], run(g, x)[0][1])


def test_layer_reading_plain_floats_is_left_alone():
    rng = np.random.default_rng(4)
    b = Builder()
    x = b.input("x", (2, 8))
    g = b.build(b.qlinear("fc", b.node("r", "relu", [x]), random_q(rng, (2, 8), 3, (2, 0)), n_bits=3, active_bits=(2, 0)))
    out = fuse_act_quant(g)
    assert not out.changed and out.graph is g


def test_second_run_reports_no_change(captured):
    once = fuse_act_quant(captured[0]).graph
    again = fuse_act_quant(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(captured):
    g, _ = captured
    snap = snapshot(g)
    fuse_act_quant(g)
    assert_unchanged(g, snap)
