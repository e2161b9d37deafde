"""pack_planes: 0/1 planes become uint32 words along the reduction axis (exact)."""
import numpy as np
import pytest

from csqc.bitplanes import unpack_planes
from csqc.passes import get_pass
from irbuild import assert_same_accumulators, assert_unchanged, quant_layer_graph, run, snapshot

pack_planes = get_pass("pack_planes")


@pytest.fixture(params=[("linear", 40), ("conv", 45), ("linear", 64)], ids=["K40", "conv-K45", "K64"])
def split_layer(request):
    kind, k = request.param
    g, x = quant_layer_graph(np.random.default_rng(0), kind=kind, k=k, active_bits=(5, 2, 1, 0))
    return get_pass("split_planes").run(g).graph, x


def test_planes_become_uint32_words_zero_padded_to_whole_words(split_layer):
    g, _ = split_layer
    out = pack_planes.run(g)
    assert out.changed
    node = out.graph.node("layer")
    planes = g.params["layer.weight"]
    words = out.graph.params["layer.weight"]
    p, o, k = planes.shape
    assert node.quant.packed_word == 32
    assert words.dtype == np.uint32 and words.shape == (p, o, -(-k // 32))
    assert np.array_equal(unpack_planes(words, k, 32), planes)
    full = unpack_planes(words, words.shape[-1] * 32, 32)
    assert not full[..., k:].any()  # padding bits are zero


def test_outputs_and_accumulators_are_bit_identical(split_layer):
    g, x = split_layer
    (before,), rec_before = run(g, x)
    (after,), rec_after = run(pack_planes.run(g).graph, x)
    assert np.array_equal(before, after)
    assert_same_accumulators(rec_before, rec_after)


def test_int_layers_are_left_alone():
    g, _ = quant_layer_graph(np.random.default_rng(1))
    out = pack_planes.run(g)
    assert not out.changed and out.graph is g


def test_pack_planes_needs_plane_encoded_layers(split_layer):
    (requirement,) = pack_planes.requires
    assert requirement.name == "split_planes"
    split = split_layer[0]
    assert requirement.unmet(split) == []
    as_int = split.replace(nodes=tuple(n.replace(quant=n.quant.replace(encoding="int", planes=(), zero_point=0))
                                       if n.quant else n for n in split.nodes))
    assert requirement.unmet(as_int) == [n.name for n in as_int.quant_layers()]


def test_second_run_reports_no_change(split_layer):
    once = pack_planes.run(split_layer[0]).graph
    again = pack_planes.run(once)
    assert not again.changed and again.graph is once


def test_input_graph_is_unchanged(split_layer):
    g, _ = split_layer
    snap = snapshot(g)
    pack_planes.run(g)
    assert_unchanged(g, snap)
