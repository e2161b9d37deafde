"""sink_quantize: chain(dequantize(quantize(y))) becomes dequantize(quantize(chain(y))) for chains of
max pools, reshapes and permutes, bit for bit, so the layer after them reads codes."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.ir import Node, TensorType
from csqc.numerics import pool2d, pool_output_size
from csqc.passes import get_pass, run_passes
from csqc.passes.sink_quantize import window_reach
from irbuild import Builder, assert_unchanged, random_q, run, snapshot

sink_quantize = get_pass("sink_quantize").run


def _pool_attrs(kernel=2, stride=2, padding=0, dilation=1, ceil_mode=False):
    return {"kernel": (kernel, kernel), "stride": (stride, stride), "padding": (padding, padding),
            "dilation": (dilation, dilation), "ceil_mode": ceil_mode}


def _quantize(b: Builder, x: str, bits: int, *, signed: bool, static: float, asymmetric: bool, zero_point: int) -> str:
    if not asymmetric:
        return b.quantize(x, bits, signed=signed, static=static)
    t = TensorType(b.types[x].shape, "int32", bits, False, True)
    attrs = {"bits": bits, "static_scale": float(static), "signed": False, "asymmetric": True,
             "zero_point": zero_point}
    b.nodes.append(Node(f"{x}.quant", "quantize", (x,), t, attrs))
    b.types[f"{x}.quant"] = t
    return f"{x}.quant"


def _pooled_conv(rng, *, size=8, pool=None, bits=4, signed=False, static=0.0, asymmetric=False, zero_point=0,
                 relu=True, side_reader=False, conv_reader=True):
    """x -> [relu] -> quantize -> dequantize -> max_pool2d -> qconv2d (and a relu reading the pool)."""
    b = Builder()
    x = b.input("x", (2, 3, size, size))
    y = b.node("y", "relu", [x]) if relu else x
    d = b.dequantize(_quantize(b, y, bits, signed=signed, static=static, asymmetric=asymmetric,
                               zero_point=zero_point))
    attrs = _pool_attrs(**(pool or {}))
    out_hw = [pool_output_size(size, attrs["kernel"][i], attrs["stride"][i], attrs["padding"][i],
                               attrs["dilation"][i], attrs["ceil_mode"]) for i in range(2)]
    p = b.node("pool", "max_pool2d", [d], (2, 3, *out_hw), attrs=attrs)
    outs = []
    if conv_reader:
        w = random_q(rng, (4, 3, 1, 1), 4, (3, 1, 0))
        outs.append(b.qconv2d("conv", p, w, n_bits=4, active_bits=(3, 1, 0), add=rng.standard_normal(4)))
    if side_reader or not conv_reader:
        outs.append(b.node("side", "relu", [p]))
    data = (rng.standard_normal((2, 3, size, size)) * 3).astype(np.float32)
    return b.build(*outs), [data]


def _same_outputs(g, x):
    out = sink_quantize(g)
    before, rec_before = run(g, x)
    after, rec_after = run(out.graph, x)
    for a, b_ in zip(before, after):
        assert a.dtype == b_.dtype and np.array_equal(a, b_)
    return out


def test_the_pool_reads_the_float_and_its_output_is_quantized():
    g, x = _pooled_conv(np.random.default_rng(0))
    out = _same_outputs(g, x)
    assert out.changed
    new = out.graph
    assert new.node("pool").inputs == ("y",)
    assert new.node("pool.quant").inputs == ("pool",) and new.node("pool.quant").type.text() == "uq4[2x3x4x4]"
    assert new.node("conv").inputs[0] == "pool.dequant"
    assert "y.quant" not in {n.name for n in new.nodes}  # nothing reads the old quantizer now
    again = sink_quantize(new)
    assert not again.changed and again.graph is new


def test_the_layer_after_the_pool_then_reads_codes_in_the_pipeline():
    g, x = _pooled_conv(np.random.default_rng(1))
    new, _ = run_passes(g, "integer")
    conv = new.node("conv")
    assert conv.inputs[0] == "pool.quant" and conv.quant.act_bits == 4
    (after,), rec = run(new, x)
    codes = rec["pool.quant.codes"].astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= 15
    (before,), _ = run(g, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize("kw", [
    dict(signed=True, static=2.5, relu=False),  # static: any sign
    dict(asymmetric=True, static=4.0, zero_point=5, relu=False),
    dict(static=1.0, pool=dict(kernel=2, stride=3)),  # a static scale needs no coverage
    dict(pool=dict(kernel=3, stride=2, padding=1)),
    dict(pool=dict(kernel=3, stride=2, ceil_mode=True), size=9),
    dict(pool=dict(kernel=2, stride=1, dilation=2)),
    dict(bits=1),
    dict(asymmetric=True),  # a dynamic range of values >= 0 (after the relu): its zero point is 0
    dict(signed=True),  # signed codes of values the sign rule knows are >= 0
])
def test_moved_quantizers_give_the_same_values(kw):
    g, x = _pooled_conv(np.random.default_rng(2), **kw)
    assert _same_outputs(g, x).changed


@pytest.mark.parametrize("kw, why", [
    (dict(signed=True, relu=False), "a dynamic max|x| may be a negative value no window keeps"),
    (dict(asymmetric=True, relu=False), "a dynamic range reads the minimum"),
    (dict(pool=dict(kernel=2, stride=3)), "elements outside every window may hold the dynamic max"),
    (dict(pool=dict(kernel=2, stride=1, padding=1, dilation=3), size=2, static=1.0), "a window of padding only"),
    (dict(conv_reader=False), "no quantized layer reads the pool"),
])
def test_pools_it_cannot_or_need_not_move_are_left_alone(kw, why):
    g, _ = _pooled_conv(np.random.default_rng(3), **kw)
    snap = snapshot(g)
    out = sink_quantize(g)
    assert not out.changed and out.graph is g, why
    assert_unchanged(g, snap)


def test_signed_dynamic_codes_would_change_if_moved():
    """Why signed dynamic quantizers stay: the pooled max|x| is not the tensor's."""
    x = np.array([[[[-4.0, 1.0], [0.5, 0.25]]]], np.float32)
    assert np.abs(pool2d(x, "max", (2, 2), (2, 2), (0, 0))).max() == 1.0 != np.abs(x).max()


def test_an_old_dequantize_with_another_reader_stays():
    rng = np.random.default_rng(4)
    b = Builder()
    x = b.input("x", (1, 2, 4, 4))
    d = b.dequantize(b.quantize(b.node("y", "relu", [x]), 4, signed=False))
    p = b.node("pool", "max_pool2d", [d], (1, 2, 2, 2), attrs=_pool_attrs())
    conv = b.qconv2d("conv", p, random_q(rng, (3, 2, 1, 1), 4, (2, 0)), n_bits=4, active_bits=(2, 0))
    g = b.build(conv, b.node("side", "relu", [d]))
    data = [np.abs(rng.standard_normal((1, 2, 4, 4))).astype(np.float32)]
    new = _same_outputs(g, data).graph
    assert new.node("side").inputs == ("y.quant.dequant",)
    assert new.node("y.quant.dequant").inputs == ("y.quant",)


def test_the_pool_as_a_graph_output_reads_the_new_dequantize():
    g, x = _pooled_conv(np.random.default_rng(5))
    g = g.replace(outputs=g.outputs + ("pool",))
    new = _same_outputs(g, x).graph
    assert new.outputs[-1] == "pool.dequant"


def test_a_static_clamped_code_pools_like_its_value():
    """Values above a static scale clamp to L; the pool of clamped codes is still the clamp of the pool."""
    g, x = _pooled_conv(np.random.default_rng(6), static=0.5)
    assert _same_outputs(g, x).changed


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(1, 3), st.booleans())
def test_window_reach_matches_the_pool_itself(size, kernel, stride, padding, dilation, ceil_mode):
    if 2 * padding > kernel or size + 2 * padding - dilation * (kernel - 1) - 1 < 0:
        return
    out = pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    if out < 1:
        return
    every_window, covers = window_reach(size, kernel, stride, padding, dilation, ceil_mode)
    # pool an index ramp: a window of padding only gives -inf; an index no window takes is missing
    ramp = np.arange(size, dtype=np.float32).reshape(1, 1, 1, size)
    pooled = pool2d(ramp, "max", (1, kernel), (1, stride), (0, padding), (1, dilation), ceil_mode)
    assert every_window == bool(np.isfinite(pooled).all())
    seen = set()
    for j in range(out):
        taps = [j * stride - padding + t * dilation for t in range(kernel)]
        seen |= {t for t in taps if 0 <= t < size}
    assert covers == (seen == set(range(size)))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.booleans(), st.sampled_from(["dynamic", "static", "asym", "asym-dynamic"]),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 2), st.booleans(), st.integers(3, 9))
def test_moving_never_changes_a_value(seed, bits, relu, mode, kernel, stride, padding, dilation, ceil_mode, size):
    """Whatever the pool and quantizer, a rewritten graph computes every output bit for bit."""
    if 2 * padding > kernel or size + 2 * padding - dilation * (kernel - 1) - 1 < 0:
        return
    rng = np.random.default_rng(seed)
    static = {"static": float(rng.uniform(0.1, 4)), "asym": float(rng.uniform(0.5, 6))}.get(mode, 0.0)
    g, x = _pooled_conv(rng, size=size, bits=bits, relu=relu, signed=not relu, static=static,
                        asymmetric=mode.startswith("asym"),
                        zero_point=int(rng.integers(0, 2**bits)) if mode == "asym" else 0,
                        pool=dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode),
                        side_reader=True)
    if mode == "asym":
        x = [np.clip(x[0], -static / 2, static / 2)]  # inside the static range, so no NaN or clamp questions
    _same_outputs(g, x)


def _flattened(rng, *, pool: bool, signed: bool, permute: bool = False, inner_reader: bool = False):
    """x -> [relu] -> quantize -> dequantize -> [max_pool2d] -> [permute] -> reshape -> qlinear (a classifier)."""
    b = Builder()
    x = b.input("x", (2, 4, 4, 4))
    y = x if signed else b.node("y", "relu", [x])
    v = b.dequantize(b.quantize(y, 3, signed=signed))
    if pool:
        v = b.node("pool", "max_pool2d", [v], (2, 4, 2, 2), attrs=_pool_attrs())
    if permute:
        shape = b.types[v]
        v = b.node("perm", "permute", [v], (shape.shape[0], shape.shape[2], shape.shape[3], shape.shape[1]),
                   attrs={"dims": (0, 2, 3, 1)})
    features = int(np.prod(b.types[v].shape[1:]))
    flat = b.node("flat", "reshape", [v], (2, features))
    fc = b.qlinear("fc", flat, random_q(rng, (5, features), 4, (3, 2, 0)), n_bits=4, active_bits=(3, 2, 0),
                   add=rng.standard_normal(5).astype(np.float32))
    outs = [fc] + ([b.node("side", "relu", [v])] if inner_reader else [])
    return b.build(*outs), [(rng.standard_normal((2, 4, 4, 4)) * 2).astype(np.float32)]


@pytest.mark.parametrize("pool,signed,permute", [(False, True, False), (False, False, True), (True, False, False),
                                                  (True, False, True)])
def test_a_classifier_after_a_flatten_reads_codes(pool, signed, permute):
    """A reshape or permute moves values and keeps max|x|: any quantizer moves below it."""
    g, x = _flattened(np.random.default_rng(7), pool=pool, signed=signed, permute=permute)
    new = _same_outputs(g, x).graph
    assert new.node("flat.quant").inputs == ("flat",) and new.node("fc").inputs[0] == "flat.dequant"
    fused, _ = run_passes(g, "integer")
    assert fused.node("fc").inputs[0] == "flat.quant" and fused.node("fc").quant.act_bits == 3


def test_a_signed_dynamic_quantizer_stays_before_a_pool_in_a_chain():
    g, _ = _flattened(np.random.default_rng(8), pool=True, signed=True)
    assert not sink_quantize(g).changed


def test_a_chain_whose_inner_value_is_read_elsewhere_is_left_alone():
    """Its inner values would change (they carry y's floats once the quantizer moves)."""
    g, _ = _flattened(np.random.default_rng(9), pool=True, signed=False, inner_reader=True)
    assert not sink_quantize(g).changed
