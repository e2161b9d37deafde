"""sink_reshapes: reshapes move below elementwise and per-channel ops and cancel (exact)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.passes import get_pass, run_passes
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

sink_reshapes = get_pass("sink_reshapes").run


def _conv1d(b: Builder, name: str, x3: str, q, rng, **kw) -> str:
    """Capture's form of a CSQ 1-D convolution: ``[N, C, L] -> [N, C, 1, L]``, qconv2d, back."""
    n, c, length = b.types[x3].shape
    x4 = b.node(f"{name}.reshape", "reshape", [x3], (n, c, 1, length))
    y4 = b.qconv2d(name, b.quantize(x4, 4, signed=False), q, n_bits=4, active_bits=(3, 1, 0),
                   padding=(0, 1), add=rng.standard_normal(q.shape[0]).astype(np.float32), **kw)
    return b.node(f"{name}.reshape_1", "reshape", [y4], (n, q.shape[0], b.types[y4].shape[3]))


@pytest.fixture
def sequence_net():
    """conv1d -> batch_norm -> relu -> conv1d -> residual add (+ a one-element bias) -> clip."""
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", (2, 3, 9))
    y = _conv1d(b, "c1", x, random_q(rng, (4, 3, 1, 3), 4, (3, 1, 0)), rng)
    y = b.node("relu1", "relu", [b.batch_norm("bn1", y, rng.uniform(0.5, 2, 4), rng.standard_normal(4))])
    z = _conv1d(b, "c2", y, random_q(rng, (4, 4, 1, 3), 4, (3, 1, 0)), rng)
    s = b.node("res", "add", [z, y])
    s = b.node("bias", "add", [s, b.param("bias.value", np.array([0.25], np.float32))])
    out = b.node("out", "clip", [s], attrs={"lo": 0.0, "hi": 6.0})
    return b.build(out), [rng.standard_normal((2, 3, 9)).astype(np.float32)]


def test_the_reshapes_between_layers_cancel(sequence_net):
    g, _ = sequence_net
    result = sink_reshapes(g)
    assert result.changed
    ops = [n.op for n in result.graph.nodes]
    # one reshape in (the graph's [N, C, L] input), one out (its [N, C, L] output), none between
    assert ops.count("reshape") == 2 and ops[1] == "quantize" and ops[-1] == "reshape"
    assert result.graph.outputs == ("out",) and result.graph.node("out").type.shape == (2, 4, 9)
    producers = result.graph.producers()
    assert producers[result.graph.node("bn1.unreshaped").inputs[0]].op == "qconv2d"


def test_outputs_and_accumulators_are_bit_identical(sequence_net):
    g, x = sequence_net
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(sink_reshapes(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_the_default_pipeline_folds_and_fuses_through_them(sequence_net):
    g, x = sequence_net
    out, _records = run_passes(g, "integer")
    assert "batch_norm" not in {n.op for n in out.nodes}
    assert out.node("c1").attr("act") == "relu"  # bn1 folded into c1, then its relu fused
    np.testing.assert_allclose(run(out, x)[0][0], run(g, x)[0][0], rtol=1e-5, atol=1e-5)  # fold_bn rounds


def test_batch_norm_stays_below_a_reshape_that_moves_its_channel_axis():
    rng = np.random.default_rng(1)
    b = Builder()
    x = b.input("x", (2, 6, 4))
    flat = b.node("flat", "reshape", [x], (2, 3, 8))  # channels 6 -> 3: BN's axis 1 means another thing
    g = b.build(b.batch_norm("bn", flat, rng.uniform(0.5, 2, 3), rng.standard_normal(3)))
    assert not sink_reshapes(g).changed


def test_a_binary_op_with_a_broadcast_parameter_stays():
    b = Builder()
    x = b.input("x", (2, 3, 1, 5))
    r = b.node("r", "reshape", [x], (2, 3, 5))
    g = b.build(b.node("m", "mul", [r, b.param("scale", np.ones((3, 1), np.float32))]))
    assert not sink_reshapes(g).changed


def test_a_one_element_parameter_with_more_axes_than_the_source_stays():
    # found by the differential runs (a group norm's affine over a reshaped [1, 2, 1, 220]):
    # a [1, 1, 1, 1] scalar broadcasts a [2, 1, 220] source up to four axes
    b = Builder()
    x = b.input("x", (2, 1, 220))
    r = b.node("r", "reshape", [x], (1, 2, 1, 220))
    g = b.build(b.node("m", "mul", [r, b.param("s", np.full((1, 1, 1, 1), 2.0, np.float32))]))
    assert not sink_reshapes(g).changed
    b = Builder()
    x = b.input("x", (1, 2, 1, 220))
    r = b.node("r", "reshape", [x], (2, 1, 220))
    g = b.build(b.node("m", "mul", [r, b.param("s", np.full((1, 1, 1), 2.0, np.float32))]))
    assert sink_reshapes(g).changed  # three axes into four: fine


def test_a_reshape_back_to_a_graph_input_that_is_an_output_stays():
    b = Builder()
    x = b.input("x", (2, 3, 5))
    r = b.node("r", "reshape", [x], (2, 3, 1, 5))
    g = b.build(b.node("back", "reshape", [r], (2, 3, 5)))
    out = sink_reshapes(g).graph
    assert out.outputs == ("back",) and out.node("back").inputs == ("x",)


def test_two_outputs_stay_two_values():
    # y and y.view(...).view(y.shape) both returned: renaming the second to the first would list
    # one value twice among the outputs (ONNX refuses duplicate output names)
    b = Builder()
    x = b.input("x", (2, 3, 5))
    y = b.node("y", "relu", [x])
    r = b.node("r", "reshape", [y], (2, 15))
    g = b.build(y, b.node("back", "reshape", [r], (2, 3, 5)))
    out = sink_reshapes(g).graph
    assert out.outputs == ("y", "back") and out.node("back").inputs == ("y",)


def test_second_run_reports_no_change(sequence_net):
    once = sink_reshapes(sequence_net[0]).graph
    again = sink_reshapes(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(sequence_net):
    g, _ = sequence_net
    snap = snapshot(g)
    sink_reshapes(g)
    assert_unchanged(g, snap)


_CHAIN_OPS = ["relu", "sigmoid", "tanh", "hardswish", "clip", "bn", "add_self", "add_scalar", "reshape_back",
              "reshape_flat"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(_CHAIN_OPS), min_size=1, max_size=8), st.integers(0, 2**16))
def test_any_chain_after_a_reshape_computes_the_same(ops, seed):
    """Random chains of elementwise, per-channel and reshape ops after a unit-axis reshape: the
    pass never changes a value, and leaves no more nodes than it found."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", (2, 3, 1, 5))
    v = b.node("in", "reshape", [x], (2, 3, 5))
    for i, op in enumerate(ops):
        shape = b.types[v].shape
        if op == "bn" and len(shape) >= 2 and shape[1] == 3:
            v = b.batch_norm(f"n{i}", v, rng.uniform(0.5, 2, 3), rng.standard_normal(3))
        elif op == "clip":
            v = b.node(f"n{i}", "clip", [v], attrs={"lo": -0.5, "hi": 0.75})
        elif op == "add_self":
            v = b.node(f"n{i}", "add", [v, v])
        elif op == "add_scalar":
            v = b.node(f"n{i}", "add", [v, b.param(f"n{i}.c", np.array([0.5], np.float32))])
        elif op == "reshape_back":
            v = b.node(f"n{i}", "reshape", [v], (2, 3, 1, 5) if len(shape) == 3 else (2, 3, 5))
        elif op == "reshape_flat":
            v = b.node(f"n{i}", "reshape", [v], (2, 15))
        elif op in ("relu", "sigmoid", "tanh", "hardswish"):
            v = b.node(f"n{i}", op, [v])
    g = b.build(v)
    xs = [rng.standard_normal((2, 3, 1, 5)).astype(np.float32)]
    out = sink_reshapes(g).graph
    assert np.array_equal(run(g, xs)[0][0], run(out, xs)[0][0])
    assert len(out.nodes) <= len(g.nodes) and out.type_of(out.outputs[0]) == g.node(v).type
