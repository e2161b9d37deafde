"""drop_dead_planes: all-zero planes go, common low zero bits move into mult (exact)."""
import numpy as np
import pytest

from csqc.bitplanes import offset_planes
from csqc.passes import get_pass
from irbuild import Builder, assert_same_accumulators, assert_unchanged, quant_layer_graph, random_q, run, snapshot

drop_dead_planes = get_pass("drop_dead_planes").run
split_planes = get_pass("split_planes").run


@pytest.fixture
def split_layer():
    """A posneg layer with masked positions 4, 1, 0 and lowest active position 2: q = 4 * q'."""
    rng = np.random.default_rng(0)
    g, x = quant_layer_graph(rng, kind="conv", n_bits=6, active_bits=(5, 3, 2), k=30)
    return split_planes(g).graph, x


def test_zero_planes_are_dropped_and_low_zero_bits_shifted_out(split_layer):
    g, _ = split_layer
    out = drop_dead_planes(g)
    assert out.changed
    spec = out.graph.node("layer").quant
    assert spec.planes == ((3, 1), (3, -1), (1, 1), (1, -1), (0, 1), (0, -1))  # positions 5, 3, 2 shifted by 2
    assert spec.low_shift == 2
    assert out.graph.params["layer.weight"].shape[0] == 6
    np.testing.assert_array_equal(out.graph.params["layer.mult"], g.params["layer.mult"] * np.float32(4))


def test_outputs_and_accumulators_are_bit_identical(split_layer):
    g, x = split_layer
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(drop_dead_planes(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_an_active_position_no_weight_uses_is_dropped():
    rng = np.random.default_rng(1)
    q = random_q(rng, (4, 20), 5, (4, 0))  # position 2 active in the mask but unused
    g, x = quant_layer_graph(rng, n_bits=5, active_bits=(4, 2, 0), k=20, out_ch=4, q=q)
    new = drop_dead_planes(split_planes(g).graph).graph
    assert [s for s, _ in new.node("layer").quant.planes] == [4, 4, 0, 0]
    assert np.array_equal(run(new, x)[0][0], run(g, x)[0][0])


def test_int_weights_are_shifted_without_splitting():
    rng = np.random.default_rng(2)
    g, x = quant_layer_graph(rng, n_bits=6, active_bits=(4, 1), act_bits=None)
    new = drop_dead_planes(g).graph
    node = new.node("layer")
    assert node.quant.encoding == "int" and node.quant.low_shift == 1
    assert np.array_equal(new.params["layer.weight"] * 2, g.params["layer.weight"])
    assert np.array_equal(run(new, x)[0][0], run(g, x)[0][0])


def test_all_one_offset_planes_fold_into_the_zero_point():
    rng = np.random.default_rng(3)
    q = random_q(rng, (3, 16), 4, (3, 2, 1, 0))
    planes, spec, z = offset_planes(q)
    ones = np.ones((1,) + planes.shape[1:], np.uint8)
    b = Builder()
    x = b.input("x", (2, 16))
    y = b.qlinear("fc", b.quantize(x, 4), np.zeros((3, 16), np.int16), n_bits=4, active_bits=(3, 2, 1, 0))
    g = b.build(y)
    fc = g.node("fc")
    spec_planes = ((5, 1),) + tuple(spec)  # an extra constant plane worth 32 and z + 32
    g = g.replace(nodes=(g.nodes[0], fc.replace(quant=fc.quant.replace(encoding="offset", planes=spec_planes, zero_point=z + 32))))
    g = g.with_params({"fc.weight": np.concatenate([ones, planes])})
    new = drop_dead_planes(g).graph
    assert new.node("fc").quant.planes == tuple(spec) and new.node("fc").quant.zero_point == z
    xs = [rng.standard_normal((2, 16)).astype(np.float32)]
    (before,), rec_before = run(g, xs)
    (after,), rec_after = run(new, xs)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_packed_layers_are_left_alone(split_layer):
    packed = get_pass("pack_planes").run(split_layer[0]).graph
    out = drop_dead_planes(packed)
    assert not out.changed and out.graph is packed


def test_second_run_reports_no_change(split_layer):
    once = drop_dead_planes(split_layer[0]).graph
    again = drop_dead_planes(once)
    assert not again.changed and again.graph is once


def test_input_graph_is_unchanged(split_layer):
    g, _ = split_layer
    snap = snapshot(g)
    drop_dead_planes(g)
    assert_unchanged(g, snap)
