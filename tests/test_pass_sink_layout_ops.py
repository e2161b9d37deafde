"""sink_layout_ops: reshapes, permutes and crops move below elementwise and per-channel ops, and
reshapes cancel (exact)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.passes import get_pass, run_passes
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot

sink_layout_ops = get_pass("sink_layout_ops").run


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
    result = sink_layout_ops(g)
    assert result.changed
    ops = [n.op for n in result.graph.nodes]
    # one reshape in (the graph's [N, C, L] input), one out (its [N, C, L] output), none between
    assert ops.count("reshape") == 2 and ops[1] == "quantize" and ops[-1] == "reshape"
    assert result.graph.outputs == ("out",) and result.graph.node("out").type.shape == (2, 4, 9)
    producers = result.graph.producers()
    assert producers[result.graph.node("bn1.moved").inputs[0]].op == "qconv2d"


def test_outputs_and_accumulators_are_bit_identical(sequence_net):
    g, x = sequence_net
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(sink_layout_ops(g).graph, x)
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
    for to in ((2, 4, 6), (2, 12, 2), (3, 2, 8)):  # channels 6 -> 4 or 12, or the batch axis moved
        b = Builder()
        flat = b.node("flat", "reshape", [b.input("x", (2, 6, 4))], to)
        g = b.build(b.batch_norm("bn", flat, rng.uniform(0.5, 2, to[1]), rng.standard_normal(to[1])))
        assert not sink_layout_ops(g).changed


def test_batch_norm_moves_above_a_reshape_that_splits_its_channels():
    # [2, 6, 4] -> [2, 3, 8]: source channel c is channel c // 2, so each parameter serves two
    rng = np.random.default_rng(1)
    b = Builder()
    flat = b.node("flat", "reshape", [b.input("x", (2, 6, 4))], (2, 3, 8))
    g = b.build(b.batch_norm("bn", flat, rng.uniform(0.5, 2, 3), rng.standard_normal(3)))
    result = sink_layout_ops(g)
    assert result.changed and [n.op for n in result.graph.nodes] == ["batch_norm", "reshape"]
    moved = result.graph.nodes[0]
    assert moved.inputs[0] == "x" and result.graph.params[moved.inputs[1]].shape == (6,)
    xs = [rng.standard_normal((2, 6, 4)).astype(np.float32)]
    assert np.array_equal(run(g, xs)[0][0], run(result.graph, xs)[0][0])


def _phases_net(rng, extra_reader: bool = False):
    """A transposed convolution as capture writes it: the stacked phases' qconv2d, reshape,
    permute, reshape, two crops; then batch_norm, relu and a quantizer."""
    b = Builder()
    x = b.input("x", (2, 3, 4, 5))
    q = random_q(rng, (4 * 4, 3, 2, 2), 4, (3, 1, 0))
    z = b.qconv2d("up", b.quantize(x, 4), q, n_bits=4, active_bits=(3, 1, 0), padding=(1, 1))
    v = b.node("up.phases", "reshape", [z], (2, 4, 2, 2, 5, 6))
    v = b.node("up.interleave", "permute", [v], (2, 4, 5, 2, 6, 2), attrs={"dims": (0, 1, 4, 2, 5, 3)})
    v = b.node("up.merged", "reshape", [v], (2, 4, 10, 12))
    v = b.node("up.crop_h", "slice", [v], (2, 4, 8, 12), attrs={"axis": 2, "start": 1, "end": 9})
    v = b.node("up.crop_w", "slice", [v], (2, 4, 8, 10), attrs={"axis": 3, "start": 1, "end": 11})
    y = b.node("relu", "relu", [b.batch_norm("bn", v, rng.uniform(0.5, 2, 4), rng.standard_normal(4))])
    outs = [b.quantize(y, 4, signed=False)]
    if extra_reader:
        outs.append(b.node("side", "sigmoid", ["up.interleave"]))
    return b.build(*outs), [rng.standard_normal((2, 3, 4, 5)).astype(np.float32)]


def test_a_transposed_convs_batch_norm_and_relu_reach_the_layer_and_fold():
    rng = np.random.default_rng(3)
    g, xs = _phases_net(rng)
    result = sink_layout_ops(g)
    producers = result.graph.producers()
    bn = next(n for n in result.graph.nodes if n.op == "batch_norm")
    assert producers[bn.inputs[0]].op == "qconv2d" and result.graph.params[bn.inputs[1]].shape == (16,)
    assert [n.op for n in result.graph.nodes][-6:] == ["reshape", "permute", "reshape", "slice", "slice",
                                                       "quantize"]
    (before,), rec_before = run(g, xs)
    (after,), rec_after = run(result.graph, xs)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)
    folded, _ = run_passes(g, "integer")
    assert "batch_norm" not in {n.op for n in folded.nodes} and folded.node("up").attr("act") == "relu"
    # fold_bn rounds the scales it merges: a code may land one step over
    assert np.abs(run(folded, xs)[0][0].astype(np.int64) - before).max() <= 1


def test_a_permute_read_elsewhere_too_stays():
    g, xs = _phases_net(np.random.default_rng(4), extra_reader=True)
    out = sink_layout_ops(g).graph
    assert [n.op for n in out.nodes].count("permute") == 1  # not copied for the batch_norm's side
    assert all(np.array_equal(a, b) for a, b in zip(run(g, xs)[0], run(out, xs)[0]))


def test_batch_norm_stays_below_a_crop_of_its_channels():
    rng = np.random.default_rng(5)
    b = Builder()
    crop = b.node("crop", "slice", [b.input("x", (2, 6, 4))], (2, 3, 4), attrs={"axis": 1, "start": 1, "end": 4})
    g = b.build(b.batch_norm("bn", crop, rng.uniform(0.5, 2, 3), rng.standard_normal(3)))
    assert not sink_layout_ops(g).changed


def test_a_binary_op_with_a_broadcast_parameter_stays():
    b = Builder()
    x = b.input("x", (2, 3, 1, 5))
    r = b.node("r", "reshape", [x], (2, 3, 5))
    g = b.build(b.node("m", "mul", [r, b.param("scale", np.ones((3, 1), np.float32))]))
    assert not sink_layout_ops(g).changed


def test_a_one_element_parameter_with_more_axes_than_the_source_stays():
    # found by the differential runs (a group norm's affine over a reshaped [1, 2, 1, 220]):
    # a [1, 1, 1, 1] scalar broadcasts a [2, 1, 220] source up to four axes
    b = Builder()
    x = b.input("x", (2, 1, 220))
    r = b.node("r", "reshape", [x], (1, 2, 1, 220))
    g = b.build(b.node("m", "mul", [r, b.param("s", np.full((1, 1, 1, 1), 2.0, np.float32))]))
    assert not sink_layout_ops(g).changed
    b = Builder()
    x = b.input("x", (1, 2, 1, 220))
    r = b.node("r", "reshape", [x], (2, 1, 220))
    g = b.build(b.node("m", "mul", [r, b.param("s", np.full((1, 1, 1), 2.0, np.float32))]))
    assert sink_layout_ops(g).changed  # three axes into four: fine


def test_a_reshape_back_to_a_graph_input_that_is_an_output_stays():
    b = Builder()
    x = b.input("x", (2, 3, 5))
    r = b.node("r", "reshape", [x], (2, 3, 1, 5))
    g = b.build(b.node("back", "reshape", [r], (2, 3, 5)))
    out = sink_layout_ops(g).graph
    assert out.outputs == ("back",) and out.node("back").inputs == ("x",)


def test_two_outputs_stay_two_values():
    # y and y.view(...).view(y.shape) both returned: renaming the second to the first would list
    # one value twice among the outputs (ONNX refuses duplicate output names)
    b = Builder()
    x = b.input("x", (2, 3, 5))
    y = b.node("y", "relu", [x])
    r = b.node("r", "reshape", [y], (2, 15))
    g = b.build(y, b.node("back", "reshape", [r], (2, 3, 5)))
    out = sink_layout_ops(g).graph
    assert out.outputs == ("y", "back") and out.node("back").inputs == ("y",)


def test_second_run_reports_no_change(sequence_net):
    once = sink_layout_ops(sequence_net[0]).graph
    again = sink_layout_ops(once)
    assert not again.changed and again.graph.text() == once.text()


def test_input_graph_is_unchanged(sequence_net):
    g, _ = sequence_net
    snap = snapshot(g)
    sink_layout_ops(g)
    assert_unchanged(g, snap)


_CHAIN_OPS = ["relu", "sigmoid", "tanh", "hardswish", "clip", "bn", "add_self", "add_scalar", "reshape_back",
              "reshape_flat", "permute", "crop", "split_channels"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(_CHAIN_OPS), min_size=1, max_size=8), st.integers(0, 2**16))
def test_any_chain_after_a_reshape_computes_the_same(ops, seed):
    """Random chains of elementwise, per-channel and layout ops after a unit-axis reshape: the
    pass never changes a value, and leaves no more nodes than it found."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", (2, 3, 1, 5))
    v = b.node("in", "reshape", [x], (2, 3, 5))
    for i, op in enumerate(ops):
        shape = b.types[v].shape
        if op == "bn" and len(shape) >= 2:
            v = b.batch_norm(f"n{i}", v, rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1]))
        elif op == "permute" and len(shape) >= 3:  # swap the last two axes, or move the channels
            dims = tuple(range(len(shape) - 2)) + (len(shape) - 1, len(shape) - 2)
            dims = dims if rng.integers(2) else (0,) + tuple(range(2, len(shape))) + (1,)
            v = b.node(f"n{i}", "permute", [v], tuple(shape[d] for d in dims), attrs={"dims": dims})
        elif op == "crop" and shape[-1] > 1:
            axis = int(rng.integers(1, len(shape)))
            start = int(rng.integers(0, shape[axis]))
            out = shape[:axis] + (shape[axis] - start,) + shape[axis + 1:]
            v = b.node(f"n{i}", "slice", [v], out, attrs={"axis": axis, "start": start, "end": shape[axis]})
        elif op == "split_channels" and len(shape) >= 3 and shape[1] % 3 == 0 and shape[1] > 1:
            v = b.node(f"n{i}", "reshape", [v], (shape[0], shape[1] // 3, 3 * shape[2]) + shape[3:])
        elif op == "clip":
            v = b.node(f"n{i}", "clip", [v], attrs={"lo": -0.5, "hi": 0.75})
        elif op == "add_self":
            v = b.node(f"n{i}", "add", [v, v])
        elif op == "add_scalar":
            v = b.node(f"n{i}", "add", [v, b.param(f"n{i}.c", np.array([0.5], np.float32))])
        elif op == "reshape_back" and len(shape) in (3, 4):  # a unit axis 2 added, or dropped
            back = shape[:2] + (1,) + shape[2:] if len(shape) == 3 else shape[:2] + shape[3:]
            v = b.node(f"n{i}", "reshape", [v], back) if np.prod(back) == np.prod(shape) else v
        elif op == "reshape_flat":
            v = b.node(f"n{i}", "reshape", [v], (shape[0], int(np.prod(shape[1:]))))
        elif op in ("relu", "sigmoid", "tanh", "hardswish"):
            v = b.node(f"n{i}", op, [v])
    g = b.build(v)
    xs = [rng.standard_normal((2, 3, 1, 5)).astype(np.float32)]
    out = sink_layout_ops(g).graph
    assert np.array_equal(run(g, xs)[0][0], run(out, xs)[0][0])
    assert len(out.nodes) <= len(g.nodes) and out.type_of(out.outputs[0]) == g.node(v).type
