"""fold_zero_layers: a quantized layer with no nonzero weights becomes its constant output, exactly."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.bitplanes import offset_planes, planes_to_q
from csqc.interpreter import decode_weight
from csqc.passes import get_pass, run_passes
from csqc.passes.fold_zero_layers import folded_layers
from csqc.report import inspect_graph
from irbuild import Builder, assert_unchanged, random_q, run, snapshot

PASS = get_pass("fold_zero_layers")


def _conv_then_linear(rng, conv_q, *, n_bits=4, active=(3, 2, 1, 0), act="relu", mult_sign=1.0, add=True):
    """quantize -> qconv2d(conv_q) [act] -> reshape -> quantize -> qlinear (nonzero weights)."""
    b = Builder()
    x = b.input("x", (2, 3, 5, 5))
    out_ch = conv_q.shape[0]
    mult = mult_sign * (rng.random(out_ch) + 0.5).astype(np.float32) / np.float32(15)
    bias = rng.standard_normal(out_ch).astype(np.float32) if add else None
    conv = b.qconv2d("conv", b.quantize(x, 4), conv_q, n_bits=n_bits, active_bits=active, padding=1,
                     mult=mult, add=bias, act=act)
    flat = b.node("flat", "reshape", [conv], (2, out_ch * 25))
    q_fc = random_q(rng, (4, out_ch * 25), 4, (3, 1))
    fc = b.qlinear("fc", b.quantize(flat, 4, signed=act == "none"), q_fc, n_bits=4, active_bits=(3, 1),
                   add=np.zeros(4, np.float32))
    data = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    return b.build(fc), [data]


@pytest.mark.parametrize("act", ["relu", "none"])
def test_zero_plane_conv_becomes_expand_of_its_constant_output(act):
    rng = np.random.default_rng(0)
    g, x = _conv_then_linear(rng, np.zeros((6, 3, 3, 3), np.int16), active=(), act=act)
    snap = snapshot(g)
    (before,), rec = run(g, x)
    result = PASS.run(g)
    assert_unchanged(g, snap)  # pure: the input graph is untouched
    assert result.changed
    after = result.graph
    node = after.node("conv")
    assert node.op == "expand" and node.quant is None and node.type.shape == (2, 6, 5, 5)
    assert dict(node.attrs) == {"folded_layer": "qconv2d", "weight_shape": (6, 3, 3, 3), "n_bits": 4}
    const = after.params[node.inputs[0]]
    assert const.shape == (1, 6, 1, 1) and const.dtype == np.float32
    assert [n.name for n in folded_layers(after)] == ["conv"]
    assert [n.op for n in after.quant_layers()] == ["qlinear"]
    (out,), rec_after = run(after, x)
    assert np.array_equal(out, before)
    assert np.array_equal(rec_after["conv"], rec["conv"])  # the constant, broadcast, bit for bit
    assert np.array_equal(rec_after["fc.acc"], rec["fc.acc"])
    second = PASS.run(after)
    assert not second.changed and second.graph.text() == after.text()


def test_constant_is_bias_through_multiplier_or_zeros():
    rng = np.random.default_rng(1)
    g, _ = _conv_then_linear(rng, np.zeros((6, 3, 3, 3), np.int16), act="none")
    add = g.params["conv.add"]
    assert np.array_equal(PASS.run(g).graph.params["conv.constant"].reshape(-1), add)
    g, x = _conv_then_linear(rng, np.zeros((6, 3, 3, 3), np.int16), act="none", mult_sign=-1.0, add=False)
    folded = PASS.run(g).graph
    assert not folded.params["conv.constant"].any()
    assert np.array_equal(run(folded, x)[0][0], run(g, x)[0][0])


def test_layers_with_a_nonzero_weight_are_left_alone():
    rng = np.random.default_rng(2)
    one = np.zeros((6, 3, 3, 3), np.int16)
    one[5, 2, 2, 2] = -1
    for q in (one, np.full((6, 3, 3, 3), 4, np.int16)):
        g, _ = _conv_then_linear(rng, q)
        result = PASS.run(g)
        assert not result.changed and result.graph is g


def test_pipelines_fold_and_drop_the_dead_quantizer():
    rng = np.random.default_rng(3)
    g, x = _conv_then_linear(rng, np.zeros((6, 3, 3, 3), np.int16), active=())
    (expected,), _ = run(g, x)
    for pipeline in ("default", "integer"):
        opt, records = run_passes(g, pipeline)
        assert any(r.name == "fold_zero_layers" and r.changed for r in records)
        assert "x.quant" not in {n.name for n in opt.nodes}  # only the folded layer read it
        assert np.array_equal(run(opt, x)[0][0], expected), pipeline


def test_inspect_lists_the_folded_layer_with_zero_bits():
    rng = np.random.default_rng(4)
    g, _ = _conv_then_linear(rng, np.zeros((6, 3, 3, 3), np.int16), active=())
    report = inspect_graph(run_passes(g, "default")[0], captured=g)
    row = {r.name: r for r in report.layers}["conv"]
    assert (row.active_bits, row.planes, row.encoding, row.kernel, row.weight_bytes_packed) == ([], 0, "constant", "constant", 0)
    assert [r.name for r in report.layers] == ["conv", "fc"]


def test_all_equal_weights_keep_one_plane():
    q = np.full((3, 20), -6, np.int64)
    planes, spec, z = offset_planes(q)
    assert len(spec) == 1 and planes[0].all()
    assert np.array_equal(planes_to_q(planes, spec, z), q)
    rng = np.random.default_rng(5)
    g, x = _conv_then_linear(rng, np.full((6, 3, 3, 3), 4, np.int16))
    opt, _ = run_passes(g, "default")
    assert all(n.quant.num_planes >= 1 for n in opt.quant_layers())
    assert np.array_equal(run(opt, x)[0][0], run(g, x)[0][0])


# -- property: layers with 0 active planes or all-equal weights, through whole pipelines --------


@st.composite
def degenerate_layers(draw):
    """quantize -> qlinear/qconv2d -> relu -> qlinear, the first layer degenerate: no active
    bit position, bits that are all zero, or every weight the same value."""
    n_bits = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["mask0", "zero", "equal"]))
    active = () if kind == "mask0" else tuple(sorted(draw(st.sets(st.integers(0, n_bits - 1), min_size=1)), reverse=True))
    out_ch, k = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    if kind == "equal":
        value = sum(draw(st.sampled_from([-1, 0, 1])) << b for b in active) or (1 << active[-1])
        q = np.full((out_ch, k), value, np.int16)
    else:
        q = np.zeros((out_ch, k), np.int16)
    conv = draw(st.booleans())
    act_bits = draw(st.one_of(st.none(), st.integers(1, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = Builder()
    if conv:
        c = max(1, k // 9)
        x = b.input("x", (2, c, 4, 4))
        q = np.resize(q, (out_ch, c, 3, 3))
    else:
        x = b.input("x", (2, k))
    src = x if act_bits is None else b.quantize(x, act_bits)
    mult = ((rng.random(out_ch) - 0.5) / 2**n_bits).astype(np.float32)
    add = rng.standard_normal(out_ch).astype(np.float32) if draw(st.booleans()) else None
    act = draw(st.sampled_from(["none", "relu"]))
    if conv:
        y = b.qconv2d("layer", src, q, n_bits=n_bits, active_bits=active, padding=1, mult=mult, add=add, act=act)
        y = b.node("flat", "reshape", [y], (2, out_ch * 16))
    else:
        y = b.qlinear("layer", src, q, n_bits=n_bits, active_bits=active, mult=mult, add=add, act=act)
    width = b.types[y].shape[-1]
    head_q = np.array(random_q(rng, (3, width), 4, (3, 0)))
    if not head_q.any():  # a zero head would be folded too and leave the layer dead: keep it live
        head_q[0, 0] = 1
    head = b.qlinear("head", b.quantize(y, 4), head_q, n_bits=4, active_bits=(3, 0))
    data = rng.standard_normal(b.types[x].shape).astype(np.float32)
    return b.build(head), [data], kind


@settings(max_examples=60, deadline=None)
@given(degenerate_layers())
def test_pipelines_on_degenerate_layers_equal_the_unoptimized_interpreter(case):
    g, x, kind = case
    (expected,), _ = run(g, x)
    for pipeline in ("default", "integer"):
        opt, _ = run_passes(g, pipeline)
        (out,), _ = run(opt, x)
        assert np.array_equal(out, expected), pipeline
        layer = opt.node("layer")
        if kind == "equal":
            assert layer.op in ("qlinear", "qconv2d") and decode_weight(opt, layer).any()
            assert layer.quant.num_planes >= 1
        else:
            assert layer.op == "expand"
