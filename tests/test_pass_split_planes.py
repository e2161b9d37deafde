"""split_planes: int weights become a +plane and a -plane for each of the N candidate positions."""
import numpy as np
import pytest

from csqc.bitplanes import planes_to_q
from csqc.passes import get_pass
from irbuild import assert_same_accumulators, assert_unchanged, quant_layer_graph, run, snapshot

split_planes = get_pass("split_planes").run

ACTIVE = (5, 3, 2, 0)


@pytest.fixture(params=["linear", "conv"])
def layer(request):
    return quant_layer_graph(np.random.default_rng(0), kind=request.param, n_bits=6, active_bits=ACTIVE, k=45)


def test_layer_gets_posneg_planes_for_every_candidate_position(layer):
    g, _ = layer
    out = split_planes(g)
    assert out.changed
    node = out.graph.node("layer")
    assert node.quant.encoding == "posneg" and node.quant.zero_point == 0
    assert node.quant.planes == tuple((b, s) for b in (5, 4, 3, 2, 1, 0) for s in (1, -1))
    w = out.graph.params[node.inputs[1]]
    o = node.attr("weight_shape")[0]
    k = int(np.prod(node.attr("weight_shape")[1:]))
    assert w.dtype == np.uint8 and w.shape == (12, o, k) and set(np.unique(w)) <= {0, 1}


def test_masked_positions_get_all_zero_planes(layer):
    node_graph = split_planes(layer[0]).graph
    node = node_graph.node("layer")
    w = node_graph.params[node.inputs[1]]
    masked = [i for i, (shift, _) in enumerate(node.quant.planes) if shift not in ACTIVE]
    assert len(masked) == 4 and not w[masked].any()


def test_planes_reproduce_the_integer_weights(layer):
    g, _ = layer
    new = split_planes(g).graph
    node = new.node("layer")
    q = planes_to_q(new.params[node.inputs[1]], node.quant.planes)
    assert np.array_equal(q, g.params["layer.weight"].reshape(q.shape))


def test_outputs_and_accumulators_are_bit_identical(layer):
    g, x = layer
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(split_planes(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_float_input_layer_outputs_are_bit_identical():
    g, x = quant_layer_graph(np.random.default_rng(1), act_bits=None, active_bits=(4, 1), n_bits=5)
    assert np.array_equal(run(split_planes(g).graph, x)[0][0], run(g, x)[0][0])


def test_shifted_int_weights_are_split_relative_to_their_low_shift():
    g, x = quant_layer_graph(np.random.default_rng(2), active_bits=(5, 3, 1), n_bits=6)
    shifted = get_pass("drop_dead_planes").run(g).graph  # q even: low_shift 1, weights halved
    assert shifted.node("layer").quant.low_shift == 1
    split = split_planes(shifted).graph
    assert split.node("layer").quant.planes[0] == (4, 1) and split.node("layer").quant.planes[-1] == (0, -1)
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(split, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_second_run_reports_no_change(layer):
    once = split_planes(layer[0]).graph
    again = split_planes(once)
    assert not again.changed and again.graph is once


def test_input_graph_is_unchanged(layer):
    g, _ = layer
    snap = snapshot(g)
    split_planes(g)
    assert_unchanged(g, snap)
