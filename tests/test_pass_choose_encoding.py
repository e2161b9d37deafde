"""choose_encoding: a posneg layer switches to offset-binary planes when that needs fewer."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.bitplanes import planes_to_q
from csqc.passes import get_pass
from irbuild import assert_same_accumulators, assert_unchanged, quant_layer_graph, run, snapshot

choose_encoding = get_pass("choose_encoding").run


def _posneg(seed, active_bits, n_bits=6, **kw):
    g, x = quant_layer_graph(np.random.default_rng(seed), n_bits=n_bits, active_bits=active_bits, **kw)
    g = get_pass("split_planes").run(g).graph
    return get_pass("drop_dead_planes").run(g).graph, x


@pytest.fixture
def dense():
    """Six active positions: up to 12 posneg planes, at most 7 offset planes."""
    return _posneg(0, (5, 4, 3, 2, 1, 0), kind="conv", k=36)


def test_dense_layer_switches_to_fewer_offset_planes(dense):
    g, _ = dense
    out = choose_encoding(g)
    assert out.changed
    before, after = g.node("layer").quant, out.graph.node("layer").quant
    assert after.encoding == "offset" and len(after.planes) < len(before.planes)
    assert all(sign == 1 for _, sign in after.planes)
    assert out.graph.params["layer.weight"].shape[0] == len(after.planes)


def test_offset_planes_and_zero_point_reproduce_the_weights(dense):
    g, _ = dense
    new = choose_encoding(g).graph
    spec = new.node("layer").quant
    q = planes_to_q(new.params["layer.weight"], spec.planes, spec.zero_point)
    assert np.array_equal(q, planes_to_q(g.params["layer.weight"], g.node("layer").quant.planes))


def test_outputs_and_accumulators_are_bit_identical(dense):
    g, x = dense
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(choose_encoding(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_single_position_layer_keeps_posneg_on_a_tie():
    g, _ = _posneg(1, (3,))  # posneg: 2 planes; offset of {-8, 0, 8} + 8: also 2 planes
    assert len(g.node("layer").quant.planes) == 2
    out = choose_encoding(g)
    assert not out.changed and out.graph is g


def test_int_and_packed_layers_are_left_alone(dense):
    g_int, _ = quant_layer_graph(np.random.default_rng(2))
    assert not choose_encoding(g_int).changed
    packed = get_pass("pack_planes").run(dense[0]).graph
    assert not choose_encoding(packed).changed


def test_second_run_reports_no_change(dense):
    once = choose_encoding(dense[0]).graph
    again = choose_encoding(once)
    assert not again.changed and again.graph is once


def test_input_graph_is_unchanged(dense):
    g, _ = dense
    snap = snapshot(g)
    choose_encoding(g)
    assert_unchanged(g, snap)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**32 - 1), st.sampled_from(["random", "equal", "zero", "shifted"]))
def test_row_block_planes_equal_offset_planes(rows, k, seed, kind):
    from csqc.bitplanes import offset_planes
    from csqc.passes.choose_encoding import offset_plane_spec, offset_planes_from_spec

    rng = np.random.default_rng(seed)
    q = {"random": rng.integers(-20, 20, (rows, k)), "equal": np.full((rows, k), 5), "zero": np.zeros((rows, k), int),
         "shifted": rng.integers(3, 9, (rows, k)) * 4}[kind].astype(np.int64)
    want_planes, want_spec, want_z = offset_planes(q)
    get = lambda s, e: q[s:e]  # noqa: E731
    spec, z, base = offset_plane_spec(get, rows, block=2)
    assert (spec, z) == (want_spec, want_z)
    np.testing.assert_array_equal(offset_planes_from_spec(get, rows, k, spec, base, block=2), want_planes)
