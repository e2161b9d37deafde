"""Properties of the bit-level algebra and of the exact passes (hypothesis)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.artifact import combine_planes, prefix_weight_range
from csqc.bitplanes import (kept_zero_point, offset_planes, pack_planes, planes_to_q, posneg_planes, signed_digits,
                             unpack_planes)
from csqc.passes import get_pass, registered_passes
from irbuild import Builder, random_q, run

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def weights(draw, max_n=8):
    """(q, n_bits, active_bits): random hard CSQ bits over a random (possibly empty) mask."""
    n_bits = draw(st.integers(1, max_n))
    active = tuple(sorted(draw(st.sets(st.integers(0, n_bits - 1))), reverse=True))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 70)))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]))
    q = random_q(np.random.default_rng(seed), shape, n_bits, active, density).astype(np.int64)
    return q, n_bits, active


@SETTINGS
@given(weights())
def test_signed_digits_reproduce_q(w):
    q, _, active = w
    d = signed_digits(q, active)
    assert d.shape == (len(active),) + q.shape
    assert set(np.unique(d)) <= {-1, 0, 1}
    total = sum(d[i].astype(np.int64) << b for i, b in enumerate(active)) if active else np.zeros_like(q)
    assert np.array_equal(total, q)


@SETTINGS
@given(weights(), st.sampled_from([32, 64]))
def test_posneg_split_pack_unpack_reproduces_q(w, word):
    q, n_bits, active = w
    planes, spec = posneg_planes(q, active, list(reversed(range(n_bits))))
    assert planes.shape == (2 * n_bits,) + q.shape and planes.dtype == np.uint8
    words = pack_planes(planes, word)
    assert words.dtype == np.dtype(f"uint{word}") and words.shape[-1] == -(-q.shape[1] // word)
    assert np.array_equal(planes_to_q(unpack_planes(words, q.shape[1], word), spec), q)


@SETTINGS
@given(weights(), st.sampled_from([32, 64]))
def test_offset_split_pack_unpack_reproduces_q(w, word):
    q, _, _ = w
    planes, spec, z = offset_planes(q)
    assert all(sign == 1 for _, sign in spec)
    # no zero or constant planes survive, except the one plane all-equal nonzero weights keep
    assert all(p.any() and not p.all() for p in planes) or (len(planes) == 1 and planes[0].all())
    assert len(planes) >= 1 or not q.any()  # targets need a plane for every nonzero layer
    back = unpack_planes(pack_planes(planes, word), q.shape[1], word)  # zero planes when q is constant
    assert np.array_equal(planes_to_q(back, spec, z), q)


@SETTINGS
@given(weights(), st.booleans())
def test_dropping_low_planes_keeps_zero_and_signs_and_moves_weights_less_than_a_kept_step(w, offset):
    """The run-time plane knob (a most significant prefix of the planes, with the zero point
    ``kept_zero_point`` gives it): zero weights stay zero, no weight changes sign, each moves by
    less than the lowest kept position's power of two, and ``prefix_weight_range`` bounds every
    prefix."""
    q, n_bits, active = w
    if offset:
        planes, spec, z = offset_planes(q)
    else:
        planes, spec = posneg_planes(q, active, list(reversed(range(n_bits))))
        z = 0
    low, high = prefix_weight_range(planes, spec, z)
    # the knob keeps whole positions (a position's + and - planes go together)
    for kept in [k for k in range(1, len(spec) + 1) if k == len(spec) or spec[k][0] != spec[k - 1][0]]:
        got = combine_planes(planes, spec, z, kept)
        step = 1 << min(shift for shift, _ in spec[:kept])
        assert kept_zero_point(z, [s for s, _ in spec], kept) == (z if kept == len(spec) else z // step * step)
        assert not got[q == 0].any()
        assert np.all(got * np.sign(q) >= 0)
        assert np.all(np.abs(got - q) < step)
        assert low <= got.min() and got.max() <= high
    if spec:
        assert np.array_equal(combine_planes(planes, spec, z), q)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_packed_padding_bits_are_zero(rows, k, seed):
    planes = (np.random.default_rng(seed).random((rows, k)) < 0.5).astype(np.uint8)
    words = pack_planes(planes, 32)
    assert not unpack_planes(words, words.shape[-1] * 32, 32)[:, k:].any()


# -- passes ----------------------------------------------------------------------------------

EXACT_CHAIN = ("sink_layout_ops", "sink_quantize", "fuse_activation", "fold_zero_layers", "fuse_requant", "split_planes", "drop_dead_planes",
               "choose_encoding", "pack_planes", "accumulator_width", "dce")


@st.composite
def layer_graphs(draw):
    """quantize -> qlinear/qconv2d (reads codes, or floats) -> relu, random masks, K, act bits."""
    q, n_bits, active = draw(weights())
    out_ch, k = q.shape
    kind = draw(st.sampled_from(["linear", "conv"]))
    act_bits = draw(st.one_of(st.none(), st.integers(1, 8)))
    signed = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = Builder()
    if kind == "linear":
        x = b.input("x", (2, k))
        wq = q
    else:
        c = max(1, k // 9)
        x = b.input("x", (1, c, 4, 5))
        wq = np.resize(q, (out_ch, c, 3, 3))
    data = rng.standard_normal(b.types[x].shape).astype(np.float32)
    src = x if act_bits is None else b.quantize(x, act_bits, signed=signed)
    if not signed:
        data = np.abs(data)
    mult = (rng.random(out_ch) + 0.5).astype(np.float32) / np.float32(2**n_bits - 1)
    add = rng.standard_normal(out_ch).astype(np.float32)
    if kind == "linear":
        y = b.qlinear("layer", src, wq.astype(np.int16), n_bits=n_bits, active_bits=active, mult=mult, add=add)
    else:
        y = b.qconv2d("layer", src, wq.astype(np.int16), n_bits=n_bits, active_bits=active, padding=1, mult=mult, add=add)
    return b.build(b.node("relu", "relu", [y])), [data]


def test_exact_chain_covers_every_pass_registered_as_exact():
    assert {name for name, info in registered_passes().items() if info.exact} == set(EXACT_CHAIN)


@settings(max_examples=80, deadline=None)
@given(layer_graphs())
def test_every_exact_pass_preserves_outputs_and_accumulators_bit_for_bit(case):
    g, x = case
    (expected,), rec = run(g, x)
    for name in EXACT_CHAIN:
        g = get_pass(name).run(g).graph
        (out,), rec_after = run(g, x)
        assert np.array_equal(out, expected), name
        for key in (k for k in rec if k.endswith(".acc")):
            if g.node(key.removesuffix(".acc")).op == "expand":
                continue  # folded to a constant (all weights zero): the output check covers it
            assert np.array_equal(rec_after[key], rec[key]), (name, key)


@settings(max_examples=50, deadline=None)
@given(layer_graphs())
def test_running_any_pass_twice_reports_no_change_the_second_time(case):
    g, _ = case
    for name in ("fold_bn", "fold_scales", "fuse_act_quant") + EXACT_CHAIN:
        once = get_pass(name).run(g).graph
        again = get_pass(name).run(once)
        assert not again.changed and again.graph.text() == once.text(), name
        g = once
