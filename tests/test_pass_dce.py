"""dce: nodes and parameters no output depends on are removed (exact)."""
import numpy as np
import pytest

from csqc.passes import get_pass
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

dce = get_pass("dce").run


@pytest.fixture
def with_dead_code():
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", (2, 6))
    q = b.quantize(x, 4)
    b.dequantize(q)  # dead: nothing reads it
    y = b.qlinear("fc", q, random_q(rng, (3, 6), 4, (3, 2, 0)), n_bits=4, active_bits=(3, 2, 0))
    b.node("dead.relu", "relu", [y])  # dead branch off a live node
    b.param("unused", np.ones(4, np.float32))
    b.batch_norm("dead.bn", x, np.ones(6), np.zeros(6))  # dead node with its own params
    return b.build(y), [rng.standard_normal((2, 6)).astype(np.float32)]


def test_dead_nodes_and_their_parameters_are_removed(with_dead_code):
    g, _ = with_dead_code
    out = dce(g)
    assert out.changed
    assert [n.name for n in out.graph.nodes] == ["x.quant", "fc"]
    assert sorted(out.graph.params) == ["fc.mult", "fc.weight"]


def test_outputs_and_accumulators_are_bit_identical(with_dead_code):
    g, x = with_dead_code
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(dce(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_a_graph_without_dead_code_is_returned_as_is(with_dead_code):
    once = dce(with_dead_code[0]).graph
    again = dce(once)
    assert not again.changed and again.graph is once


def test_a_parameter_that_is_a_graph_output_is_kept():
    b = Builder()
    x = b.input("x", (1, 2))
    b.param("table", np.arange(3, dtype=np.float32))
    g = b.build(b.node("r", "relu", [x]), "table")
    assert not dce(g).changed


def test_input_graph_is_unchanged(with_dead_code):
    g, _ = with_dead_code
    snap = snapshot(g)
    dce(g)
    assert_unchanged(g, snap)
