"""fuse_activation: relu / clip after a layer become the layer's epilogue (exact)."""
import numpy as np
import pytest

from csqc.passes import get_pass
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

fuse_activation = get_pass("fuse_activation").run


@pytest.fixture
def chain():
    """quantize -> qconv2d -> clip(0, 6) -> quantize -> qlinear... plus a float linear -> relu."""
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", (2, 2, 4, 4))
    y = b.qconv2d("conv", b.quantize(x, 4), random_q(rng, (3, 2, 3, 3), 5, (4, 2, 0)), n_bits=5,
                  active_bits=(4, 2, 0), padding=1, mult=np.full(3, 0.05, np.float32),
                  add=rng.standard_normal(3).astype(np.float32))
    c = b.node("conv.clip", "clip", [y], attrs={"lo": 0.0, "hi": 0.5})
    f = b.node("flat", "reshape", [c], (2, 48))
    z = b.qlinear("fc", b.quantize(f, 3, signed=False), random_q(rng, (5, 48), 4, (3, 1)), n_bits=4,
                  active_bits=(3, 1), add=rng.standard_normal(5).astype(np.float32))
    r = b.node("fc.relu", "relu", [z])
    w = b.param("head.weight", rng.standard_normal((2, 5)).astype(np.float32))
    h = b.node("head", "linear", [r, w], (2, 2), attrs={"act": "none"})
    out = b.node("head.relu", "relu", [h])
    return b.build(out), [rng.standard_normal((2, 2, 4, 4)).astype(np.float32)]


def test_relu_and_clip_nodes_disappear_into_layer_attributes(chain):
    g, _ = chain
    out = fuse_activation(g)
    assert out.changed
    new = out.graph
    assert [n.op for n in new.nodes] == ["quantize", "qconv2d", "reshape", "quantize", "qlinear", "linear"]
    assert (new.node("conv").attr("act"), new.node("conv").attr("clip_lo"), new.node("conv").attr("clip_hi")) == ("clip", 0.0, 0.5)
    assert new.node("fc").attr("act") == "relu" and new.node("head").attr("act") == "relu"
    assert new.node("flat").inputs == ("conv",) and new.outputs == ("head",)


def test_outputs_and_accumulators_are_bit_identical(chain):
    g, x = chain
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(fuse_activation(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_activation_is_not_fused_when_the_layer_output_is_also_a_graph_output(chain):
    g, _ = chain
    g2 = g.replace(outputs=("head.relu", "head"))
    new = fuse_activation(g2).graph
    assert new.node("head").attr("act") == "none" and "head.relu" in {n.name for n in new.nodes}


def test_activation_is_not_fused_into_a_layer_with_another_user(chain):
    g, _ = chain
    side = g.node("fc.relu").replace(name="side", op="relu")
    g2 = g.replace(nodes=g.nodes + (side,), outputs=("head.relu", "side"))
    assert fuse_activation(g2).graph.node("fc").attr("act") == "none"


def test_activation_is_not_fused_into_a_layer_that_already_has_one():
    rng = np.random.default_rng(1)
    b = Builder()
    x = b.input("x", (2, 4))
    y = b.qlinear("fc", x, random_q(rng, (3, 4), 3, (2, 1)), n_bits=3, active_bits=(2, 1), act="relu")
    g = b.build(b.node("fc.clip", "clip", [y], attrs={"lo": 0.0, "hi": 1.0}))
    out = fuse_activation(g)
    assert not out.changed and out.graph is g


def test_second_run_reports_no_change(chain):
    once = fuse_activation(chain[0]).graph
    again = fuse_activation(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(chain):
    g, _ = chain
    snap = snapshot(g)
    fuse_activation(g)
    assert_unchanged(g, snap)
