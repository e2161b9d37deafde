"""The LLVM glue kernels (csqc.targets.llvm.glue) against the interpreter's semantics.

Exact where the interpreter is exact (quantize codes and scale, epilogue, max pooling,
elementwise ops, layout ops); float convolutions / linear layers within 1e-5 relative of a
float64 reference; averages within 1e-6.
"""
import math
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import pytest

from csqc.interpreter import HANDLERS, _quantize, conv2d_nchw
from csqc.ir import Node, TensorType
from csqc.targets.llvm import glue
from csqc.targets.llvm.kernels import build

RNG = np.random.default_rng(7)
F32 = np.float32


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(F32)


def node(op, out_shape, **attrs):
    return Node(name="n", op=op, inputs=("x",), type=TensorType(tuple(out_shape)), attrs=attrs)


def run_kernel(prim_func, *inputs, outputs):
    """Run a kernel whose last ``len(outputs)`` parameters are outputs ((shape, dtype) pairs)."""
    import tvm

    kernel = build(prim_func)
    dev = tvm.cpu()
    out_tensors = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in outputs]
    in_tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    kernel.executable(*in_tensors, *out_tensors)
    return [t.numpy() for t in out_tensors]


# ------------------------------------------------------------------------------------------
# Quantize / dequantize
# ------------------------------------------------------------------------------------------
def reference_quantize(x, bits, static_scale, signed):
    n = Node(name="q", op="quantize", inputs=("x",), type=TensorType(x.shape, qbits=bits, qsigned=signed),
             attrs={"bits": bits, "static_scale": static_scale})
    q = _quantize(n, x)
    return q.codes, q.scale


def check_quantize(x, bits, static_scale, signed):
    codes, scale = reference_quantize(x, bits, static_scale, signed)
    outputs = [((1,), "float32"), (x.shape, "uint8")] + ([(x.shape, "uint8")] if signed else [])
    got = run_kernel(glue.quantize(x.shape, bits, static_scale, signed), x, outputs=outputs)
    assert got[0][0] == scale and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[1].astype(np.int32), np.maximum(codes, 0))
    if signed:
        np.testing.assert_array_equal(got[2].astype(np.int32), np.maximum(-codes, 0))
    return got


@pytest.mark.parametrize("shape", [(3, 7), (1, 8, 33, 35), (2, 64, 30, 30)])
@pytest.mark.parametrize("signed", [False, True])
def test_quantize_dynamic_scale(shape, signed):
    x = rand(*shape, scale=3.0)
    if not signed:
        x = np.abs(x)
    check_quantize(x, 4, 0.0, signed)


def test_quantize_round_half_even_ties():
    # S = max|x| = 15 and L = 15: (|x| * 15) / 15 == |x| exactly, so .5 values are true ties.
    ties = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 14.5, -0.5, -1.5, -2.5, -13.5, 15.0, -0.0, 0.0, 7.49999], F32)
    x = np.tile(ties, 9)[:131]  # > 64 elements: exercises the two-stage max and the vector tail
    pos, neg = check_quantize(x, 4, 0.0, True)[1:]
    head = pos[:15].astype(int) - neg[:15].astype(int)
    assert head.tolist() == [0, 2, 2, 4, 4, 6, 14, 0, -2, -2, -14, 15, 0, 0, 7]


def test_quantize_zero_tensor_and_negative_zero():
    x = np.zeros((4, 37), F32)
    x[1, 3] = -0.0
    got = check_quantize(x, 3, 0.0, True)
    assert got[0][0] == 0 and not got[1].any() and not got[2].any()


@pytest.mark.parametrize("signed", [False, True])
def test_quantize_static_scale_clamps(signed):
    x = rand(2, 3, 17, 19, scale=2.0)
    if not signed:
        x = np.abs(x)
    got = check_quantize(x, 2, 0.75, signed)  # most |x| exceed the scale: clamped to L = 3
    assert got[1].max() == 3


@pytest.mark.parametrize("static, zero_point", [(0.0, 0), (2.5, 3)])
@pytest.mark.parametrize("bits", [2, 4, 7])
def test_asymmetric_quantize_offset_codes_are_u_less_zp_plus_levels(static, zero_point, bits):
    """``offset``: one buffer of ``u - zp + L`` (signed offset codes a padded conv reads in one
    pass), the interpreter's range, zero point and codes otherwise."""
    from csqc.interpreter import _quantize_asymmetric

    x = rand(2, 3, 5, 7, scale=2.0) + F32(0.3)
    x.reshape(-1)[:5] = [0.0, -0.0, x.max(), 9.0, -9.0]
    expected = _quantize_asymmetric(lambda: "q", x, bits, static, zero_point)
    levels = 2**bits - 1
    scale, zp, codes = run_kernel(glue.quantize_asymmetric(x.shape, bits, static, zero_point, offset=True), x,
                                  outputs=[((1,), "float32"), ((1,), "int32"), (x.shape, "uint8")])
    assert scale[0] == expected.scale and zp[0] == expected.zero_point
    np.testing.assert_array_equal(codes.astype(np.int32), expected.codes - expected.zero_point + levels)
    with pytest.raises(ValueError, match="7 bits"):
        glue.quantize_asymmetric(x.shape, 8, static, zero_point, offset=True)


@pytest.mark.parametrize("bits", [1, 8])
def test_quantize_bit_widths(bits):
    check_quantize(rand(5, 300), bits, 0.0, True)


@pytest.mark.parametrize("signed", [False, True])
def test_dequantize(signed):
    shape, bits = (2, 5, 9, 11), 5
    x = rand(*shape) if signed else np.abs(rand(*shape))
    n = Node(name="q", op="quantize", inputs=("x",), type=TensorType(shape, qbits=bits, qsigned=signed),
             attrs={"bits": bits})
    q = _quantize(n, x)
    expected = HANDLERS["dequantize"](None, node("dequantize", shape), [q])
    scale = np.array([q.scale], F32)
    if signed:
        inputs = (np.maximum(q.codes, 0).astype(np.uint8), np.maximum(-q.codes, 0).astype(np.uint8), scale)
    else:
        inputs = (q.codes.astype(np.uint8), scale)
    (got,) = run_kernel(glue.dequantize(shape, bits, signed), *inputs, outputs=[(shape, "float32")])
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------
# Epilogue
# ------------------------------------------------------------------------------------------
def reference_epilogue(acc, acc_neg, scale, levels, mult, add, axis, act, lo, hi):
    view = [1] * acc.ndim
    view[axis] = -1
    if levels is None:
        y = acc
    else:
        a = acc.astype(np.int64) - (acc_neg.astype(np.int64) if acc_neg is not None else 0)
        y = (a.astype(F32) * F32(scale)) / F32(levels)
    y = y * mult.reshape(view)
    if add is not None:
        y = y + add.reshape(view)
    y = y.astype(F32)
    if act == "relu":
        return np.maximum(y, F32(0))
    if act == "clip":
        return np.clip(y, F32(lo), F32(hi)).astype(F32)
    return y


EPILOGUE_CASES = [
    # shape, axis, levels, act, has_add, acc_dtype, has_neg
    ((2, 8, 9, 9), 1, 15, "relu", True, "int32", False),
    ((1, 16, 20, 20), 1, 255, "clip", True, "int64", True),
    ((3, 40), -1, 7, "none", False, "int32", True),
    ((5, 24), 1, 3, "clip", True, "int32", False),
    ((1, 6, 5, 5), 1, None, "relu", True, "float32", False),
    ((4, 100), 1, None, "none", False, "float32", False),
]


@pytest.mark.parametrize("shape,axis,levels,act,has_add,acc_dtype,has_neg", EPILOGUE_CASES)
def test_epilogue_bit_exact(shape, axis, levels, act, has_add, acc_dtype, has_neg):
    channels = shape[axis]
    if levels is None:
        acc = rand(*shape, scale=50.0)
    else:
        acc = RNG.integers(-(2**22), 2**22, size=shape).astype(acc_dtype)
        if acc_dtype == "int64":
            acc *= 977  # beyond 2^24: the int -> float32 conversion rounds
    acc_neg = RNG.integers(0, 2**20, size=shape).astype(acc_dtype) if has_neg else None
    scale = F32(0.0371)
    mult, add = rand(channels, scale=0.01), rand(channels)
    lo, hi = -0.5, 0.75
    inputs = [acc] + ([acc_neg] if has_neg else []) + ([np.array([scale], F32)] if levels is not None else [])
    inputs += [mult] + ([add] if has_add else [])
    kernel = glue.epilogue(shape, axis, levels, act, lo, hi, has_add, acc_dtype if levels else "int32", has_neg)
    (got,) = run_kernel(kernel, *inputs, outputs=[(shape, "float32")])
    expected = reference_epilogue(acc, acc_neg, scale, levels, mult, add if has_add else None, axis % len(shape), act, lo, hi)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("options", [
    {},  # the float y
    {"has_neg": True},  # two sign passes, both stored narrow
    {"has_offset": True, "out_bits": 4, "out_scale": 0.0},  # dynamic codes from the extreme accumulators
    {"out_bits": 4, "out_scale": 1.75, "out_signed": True, "out_offset": True},  # calibrated: static codes
    {"has_residual": True, "post_act": "relu", "out_bits": 4, "out_scale": 0.0, "keep_y": True},  # ResNet block
])
def test_int16_stored_accumulators_give_what_int32_ones_give(options):
    """A conv whose outputs fit int16 stores them as int16 (``acc_storage``); the epilogue
    widens them as it reads, so every output equals the int32-stored epilogue's, extremes included."""
    shape = (1, 24, 16, 20)
    acc = RNG.integers(-(2**15), 2**15, size=shape)
    acc.reshape(-1)[:4] = [-(2**15), 2**15 - 1, 0, -1]
    neg = [RNG.integers(-(2**15), 2**15, size=shape)] if options.get("has_neg") else []
    inputs = neg + ([RNG.integers(-300, 300, size=24).astype("int32")] if options.get("has_offset") else [])
    inputs += [np.array([F32(0.0371)], F32), rand(24, scale=0.01), rand(24, scale=0.1)]
    if options.get("has_residual"):
        inputs.append(rand(*shape))
    outputs = ([(shape, "float32")] if "out_bits" not in options or options.get("keep_y") else [])
    if "out_bits" in options:
        outputs += [((1,), "float32"), (shape, "uint8")]
    results = []
    for storage in ("int32", "int16"):
        kernel = glue.epilogue(shape, 1, 15, "clip", -0.5, 0.75, True, "int32", acc_storage=storage, **options)
        stored = [a.astype(storage) for a in [acc] + inputs[:len(neg)]]
        results.append(run_kernel(kernel, *stored, *inputs[len(neg):], outputs=outputs))
    for narrow, wide in zip(*results):
        np.testing.assert_array_equal(narrow, wide)
    with pytest.raises(ValueError, match="stored as int16"):
        glue.epilogue(shape, 1, 15, "clip", -0.5, 0.75, True, "int64", acc_storage="int16")


@pytest.mark.parametrize("shape,axis,act,signed,offset", [
    ((1, 8, 9, 9), 1, "relu", False, False),  # NCHW, 81-pixel rows: vectors and a tail
    ((2, 3, 5, 4), 1, "clip", True, False),  # rows narrower than a vector: channel along the row
    ((3, 37), -1, "none", True, True),  # [M, C], offset codes
    ((2, 16, 17, 17), 1, "clip", True, False),  # rows of one channel: max|y| from the extreme accumulators
    ((1, 32, 24, 24), 1, "none", False, False),
    # y >= 0 after a relu: codes without the sign tests, also signed (negative codes all 0) or offset
    ((1, 16, 20, 20), 1, "relu", True, False),
    ((1, 16, 20, 20), 1, "relu", True, True),
])
def test_epilogue_dynamic_quantize_equals_epilogue_then_quantize(shape, axis, act, signed, offset):
    """A dynamic out_scale: S' = max|y| and the codes from one kernel that never writes y equal
    the float epilogue followed by the quantize kernel, bit for bit."""
    acc = RNG.integers(-(2**12), 2**12, size=shape).astype("int32")
    acc.reshape(-1)[:3] = 0
    mult, add = rand(shape[axis], scale=0.01), rand(shape[axis], scale=0.1)
    common = (np.array([F32(0.0371)], F32), mult, add)
    code_outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if signed and not offset else [])
    (y,) = run_kernel(glue.epilogue(shape, axis, 15, act, -0.5, 0.75, True), acc, *common, outputs=[(shape, "float32")])
    expected = run_kernel(glue.quantize(shape, 4, 0.0, signed, offset), y, outputs=code_outputs)
    fused = glue.epilogue(shape, axis, 15, act, -0.5, 0.75, True, out_bits=4, out_scale=0.0, out_signed=signed,
                          out_offset=offset)
    got = run_kernel(fused, acc, *common, outputs=code_outputs)
    assert got[0][0] == np.abs(y).max() > 0
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("split,storage,seed", [
    ("neg", "int32", 0), ("zero_point", "int32", 1), ("neg", "int32", 2), ("zero_point", "int32", 3),
    ("offset", "int32", 4), ("none", "int16", 5), ("offset", "int16", 6), ("zero_point", "int16", 7),
    ("neg", "int16", 8), ("offset", "int16", 9),
])
def test_dynamic_scale_from_extreme_accumulators_is_the_max_of_every_y(split, storage, seed):
    """max|y| of a channel taken at its smallest and largest accumulator (y is monotone in it;
    a negative mult turns it around) equals the max over every element, with the accumulator
    split by sign, less an offset, or less a zero point times the weight sums, and stored as
    int32 or int16 (scanned as stored, 32 lanes a vector); extremes placed at random, in the
    rows' last partial vector for odd seeds."""
    rng = np.random.default_rng(seed)
    shape = (1, 24, 13, 19)  # 247 a row: 7 vectors of 32 int16 lanes and 23 more
    top = 2**14 if storage == "int16" else 2**18
    acc = rng.integers(-(top >> 4), top >> 4, size=shape)
    mult, add = rand(24, scale=0.01), rand(24, scale=0.1)
    # the largest |y|: one channel's smallest accumulator (positive mult), or with a negative
    # mult its largest, at a random pixel
    channel, sign = int(rng.integers(24)), (-1 if seed % 2 else 1)
    mult[channel] = sign * abs(mult[channel]) + sign * F32(0.01)
    pixel = int(rng.integers(224, 247) if seed % 2 else rng.integers(247))
    acc[0, channel].flat[pixel] = -sign * top
    extra, options = [], {}
    if split == "neg":
        extra = [rng.integers(0, top >> 4, size=shape).astype(storage)]
        options = {"has_neg": True}
    elif split != "none":
        extra = [rng.integers(-300, 300, size=24).astype("int32")]
        options = {"has_offset": True, "has_zero_point": split == "zero_point"}
    common = [np.array([F32(0.0213)], F32)] + ([np.array([7], np.int32)] if split == "zero_point" else []) + [mult, add]
    kernel = glue.epilogue(shape, 1, 15, "none", 0.0, 0.0, True, **options)
    wide = [a.astype("int32") if a.shape == shape else a for a in extra]
    (y,) = run_kernel(kernel, acc.astype("int32"), *wide, *common, outputs=[(shape, "float32")])
    fused = glue.epilogue(shape, 1, 15, "none", 0.0, 0.0, True, out_bits=4, out_scale=0.0, out_signed=True,
                          acc_storage=storage, **options)
    outputs = [((1,), "float32"), (shape, "uint8"), (shape, "uint8")]
    got = run_kernel(fused, acc.astype(storage), *extra, *common, outputs=outputs)
    expected = run_kernel(glue.quantize(shape, 4, 0.0, True), y, outputs=outputs)
    assert got[0][0] == np.abs(y).max() > 0
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("shape,act,post_act,out_scale,signed,offset,keep_y", [
    ((1, 8, 9, 9), "none", "relu", 0.0, False, False, True),  # ResNet: add, relu, dynamic codes, y kept
    ((1, 8, 9, 9), "none", "relu", 2.5, False, False, False),  # calibrated: codes only
    ((1, 8, 9, 9), "relu", "relu", 0.0, True, False, False),  # dynamic codes only: y kept in a scratch buffer
    ((2, 32, 32, 32), "none", "relu", 0.0, False, False, True),  # parallel rows store y, the codes pass reads it
    ((2, 6, 5, 4), "relu", "clip", 1.5, True, True, True),  # clip after the add, offset codes
    ((1, 16, 4, 4), "none", "none", None, False, False, True),  # MobileNetV2: add, float y only
])
def test_epilogue_with_residual_equals_epilogue_add_activation_quantize(shape, act, post_act, out_scale, signed,
                                                                         offset, keep_y):
    """A residual add, the activation after it and the codes of its quantizer in the layer's
    epilogue equal the epilogue, binary add, unary and quantize kernels one after another."""
    acc = RNG.integers(-(2**12), 2**12, size=shape).astype("int32")
    mult, add = rand(shape[1], scale=0.01), rand(shape[1], scale=0.1)
    residual = rand(*shape)
    common = (np.array([F32(0.0371)], F32), mult, add)
    lo, hi = -0.25, 0.5
    (y,) = run_kernel(glue.epilogue(shape, 1, 15, act, lo, hi, True), acc, *common, outputs=[(shape, "float32")])
    (y,) = run_kernel(glue.binary("add", shape, shape, shape), y, residual, outputs=[(shape, "float32")])
    if post_act != "none":
        (y,) = run_kernel(glue.unary(post_act, shape, lo, hi), y, outputs=[(shape, "float32")])
    residual_options = {"has_residual": True, "post_act": post_act, "post_lo": lo, "post_hi": hi}
    if out_scale is None:
        fused = glue.epilogue(shape, 1, 15, act, lo, hi, True, **residual_options)
        (got,) = run_kernel(fused, acc, *common, residual, outputs=[(shape, "float32")])
        np.testing.assert_array_equal(got, y)
        return
    code_outputs = [((1,), "float32"), (shape, "uint8")] + ([(shape, "uint8")] if signed and not offset else [])
    expected = run_kernel(glue.quantize(shape, 4, out_scale, signed, offset), y, outputs=code_outputs)
    fused = glue.epilogue(shape, 1, 15, act, lo, hi, True, out_bits=4, out_scale=out_scale, out_signed=signed,
                          out_offset=offset, keep_y=keep_y, **residual_options)
    got = run_kernel(fused, acc, *common, residual, outputs=([(shape, "float32")] if keep_y else []) + code_outputs)
    if keep_y:
        np.testing.assert_array_equal(got.pop(0), y)
    assert expected[1].any()
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_post_activation_needs_a_residual():
    with pytest.raises(ValueError, match="residual"):
        glue.epilogue((1, 4, 4, 4), 1, 15, "none", 0.0, 0.0, True, post_act="relu")


# ------------------------------------------------------------------------------------------
# Float conv / linear
# ------------------------------------------------------------------------------------------
CONV_CASES = [
    # input, weight, stride, padding, dilation, groups, bias, act
    ((1, 3, 23, 21), (16, 3, 7, 7), 2, 3, 1, 1, True, "relu"),  # ResNet stem, small
    ((2, 3, 18, 34), (8, 3, 3, 3), 1, 1, 1, 1, False, "none"),
    ((1, 12, 15, 15), (12, 1, 3, 3), 2, 1, 1, 12, True, "clip"),  # MobileNetV2 depthwise /2
    ((1, 8, 14, 14), (8, 1, 3, 3), 1, 1, 1, 8, False, "relu"),  # depthwise /1
    ((1, 16, 9, 11), (24, 16, 1, 1), 1, 0, 1, 1, True, "none"),  # pointwise
    ((1, 16, 13, 13), (32, 16, 1, 1), 2, 0, 1, 1, False, "none"),  # ResNet shortcut
    ((1, 8, 12, 12), (6, 4, 3, 3), 1, 2, 2, 2, True, "none"),  # grouped, dilated
    ((1, 3, 21, 26), (24, 3, 3, 3), 2, 1, 1, 1, True, "clip"),  # MobileNetV2 stem: all 24 outputs in one tile
    # wide stride-2 rows: the phase split's shuffled vectors (inside the row) and per-lane edges
    ((1, 3, 9, 75), (32, 3, 3, 3), 2, 1, 1, 1, True, "clip"),  # 32 outputs: two tiles of 16
    ((1, 2, 8, 70), (8, 2, 7, 7), 2, 3, 1, 1, False, "none"),
]


def test_strided_stems_of_few_outputs_take_up_to_24_in_one_tile():
    """All outputs in one tile of 16 pixels, up to 24 of them (accumulators in registers):
    32 outputs take two tiles of 16 (conv2d_f32's largest divisor up to the knob). Below
    AVX-512, every conv takes 4 channels x 16 pixels (16 registers)."""
    from csqc.targets.llvm.kernels import cpu_target

    with cpu_target("cascadelake"):
        assert glue.default_conv_knobs(32, 27, (2, 2), 1) == glue.ConvKnobs(oc_block=24, segment=16)
        assert glue.default_conv_knobs(24, 27, (2, 2), 1) == glue.ConvKnobs(oc_block=24, segment=16)
        for args in [(64, 27, (2, 2), 1), (32, 27, (1, 1), 1), (64, 147, (2, 2), 1), (12, 9, (2, 2), 12)]:
            assert glue.default_conv_knobs(*args) == glue.ConvKnobs()  # more outputs, unstrided, 7x7, depthwise
    assert glue.common._largest_divisor(32, 24) == 16
    with cpu_target("haswell"):
        for args in [(32, 27, (2, 2), 1), (64, 576, (1, 1), 1)]:
            assert glue.default_conv_knobs(*args) == glue.ConvKnobs(oc_block=4, segment=16)


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,groups,has_bias,act", CONV_CASES)
def test_conv2d_f32(x_shape, w_shape, stride, padding, dilation, groups, has_bias, act):
    x, w, b = rand(*x_shape), rand(*w_shape, scale=0.3), rand(w_shape[0])
    pairs = [(s, s) for s in (stride, padding, dilation)]
    expected = conv2d_nchw(x.astype(np.float64), w.astype(np.float64), *pairs, groups)
    if has_bias:
        expected = expected + b.reshape(1, -1, 1, 1)
    if act == "relu":
        expected = np.maximum(expected, 0)
    if act == "clip":
        expected = np.clip(expected, -0.5, 0.5)
    prim = glue.conv2d_f32(x_shape, w_shape, stride, padding, dilation, groups, has_bias, act, -0.5, 0.5)
    inputs = (x, w, b) if has_bias else (x, w)
    (got,) = run_kernel(prim, *inputs, outputs=[(expected.shape, "float32")])
    scale = np.abs(x).max() * np.abs(w).sum(axis=(1, 2, 3)).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("tail", [
    dict(act="clip", clip_lo=0.0, clip_hi=6.0, has_add=True),  # the float y
    dict(act="clip", clip_lo=0.0, clip_hi=6.0, has_add=True, out_bits=4, out_scale=0.37),  # unsigned codes
    dict(has_add=True, out_bits=4, out_scale=0.21, out_signed=True, out_offset=True),  # offset codes
    dict(act="relu", out_bits=3, out_scale=2.0**-70, out_signed=True),  # sign parts; a scale off the fast range
])
@pytest.mark.parametrize("x_shape,w_shape,stride", [((1, 3, 21, 26), (24, 3, 3, 3), 2), ((2, 3, 9, 40), (8, 3, 3, 3), 1),
                                                    ((1, 3, 17, 30), (32, 3, 3, 3), 2)])
@pytest.mark.parametrize("channel_lanes", [False, True])
def test_conv2d_f32_with_its_float_tail_equals_the_conv_then_the_epilogue(tail, x_shape, w_shape, stride,
                                                                          channel_lanes):
    """A float-input layer's epilogue applied in the conv's registers: the same floats or codes, bit
    for bit, as the conv's sums stored and run through ``glue.epilogue`` (levels None); in both
    forms of the conv (pixels or output channels on the lanes)."""
    from csqc.artifact import channel_lanes_weight

    tail = glue.FloatTail(**tail)
    x, w = rand(*x_shape), rand(*w_shape, scale=0.4)
    channels = w_shape[0]
    mult, add = rand(channels) + 0.5, rand(channels)
    if tail.out_scale and tail.out_scale < 1e-10:  # sums of the scale's size: codes of several steps
        x = (x * np.float32(1e-21)).astype(np.float32)
    sums = run_kernel(glue.conv2d_f32(x_shape, w_shape, stride, 1, 1, 1, False), x, w,
                      outputs=[((x_shape[0], channels, *glue.conv_output_hw(x_shape[2:], w_shape[2:], stride, 1, 1)),
                                "float32")])[0]
    params = tail.params(channels, sums.shape)
    outputs = [(shape, dtype) for name, shape, dtype in params if name not in ("mult", "add")]
    inputs = [mult] + ([add] if tail.has_add else [])
    knobs = glue.ConvKnobs(row_block=5, col_vectors=2) if channel_lanes else None
    fused = run_kernel(glue.conv2d_f32(x_shape, w_shape, stride, 1, 1, 1, False, knobs=knobs, tail=tail),
                       x, channel_lanes_weight(w) if channel_lanes else w, *inputs, outputs=outputs)
    separate = run_kernel(glue.epilogue(sums.shape, 1, None, tail.act, tail.clip_lo, tail.clip_hi, tail.has_add,
                                        "float32", False, **({} if tail.out_bits is None else dict(
                                            out_bits=tail.out_bits, out_scale=tail.out_scale,
                                            out_signed=tail.out_signed, out_offset=tail.out_offset))),
                          sums, *inputs, outputs=outputs)
    for got, want in zip(fused, separate):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    if tail.out_bits is not None:
        assert len(np.unique(fused[1])) > 2  # codes of several steps


CHANNEL_LANES_CASES = [
    # input, weight, stride, padding, dilation, bias, act, row_block, col_vectors
    ((1, 24, 4, 4), (64, 24, 3, 3), 1, 1, 1, True, "relu", 4, 4),  # a ResNet's last stage, small
    ((1, 16, 7, 7), (48, 16, 3, 3), 1, 1, 1, False, "none", 5, 3),  # 49 positions in blocks of 5
    ((2, 8, 7, 9), (40, 8, 3, 3), 2, 1, 1, True, "clip", 6, 2),  # a batch of two; 40 outputs, 8 padding lanes
    ((1, 12, 13, 13), (32, 12, 1, 1), 2, 0, 1, False, "none", 4, 2),  # a strided 1x1 shortcut reads x itself
    ((1, 6, 9, 8), (16, 6, 3, 3), 1, 2, 2, True, "none", 4, 1),  # dilated, padded by 2
    ((1, 5, 6, 6), (20, 5, 2, 3), (2, 1), (1, 0), 1, False, "relu", 3, 4),  # 2x3 kernel, a stride and padding a side
]


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,has_bias,act,rows,vectors", CHANNEL_LANES_CASES)
def test_conv2d_f32_with_channels_on_the_lanes_gives_the_pixel_forms_bits(x_shape, w_shape, stride, padding,
                                                                          dilation, has_bias, act, rows, vectors):
    """Output channels on the lanes (weights in ``channel_lanes_weight``'s order, positions
    broadcast): the same float32 sums in the same order as the pixel form, so the same bits,
    whatever the tile, padding channels and position blocks past the end."""
    from csqc.artifact import channel_lanes_weight

    x, w, b = rand(*x_shape), rand(*w_shape, scale=0.3), rand(w_shape[0])
    out_shape = (x_shape[0], w_shape[0], *glue.conv_output_hw(x_shape[2:], w_shape[2:], stride, padding, dilation))
    inputs = (b,) if has_bias else ()
    pixels = run_kernel(glue.conv2d_f32(x_shape, w_shape, stride, padding, dilation, 1, has_bias, act, -0.5, 0.5),
                        x, w, *inputs, outputs=[(out_shape, "float32")])[0]
    knobs = glue.ConvKnobs(row_block=rows, col_vectors=vectors)
    channels = run_kernel(glue.conv2d_f32(x_shape, w_shape, stride, padding, dilation, 1, has_bias, act, -0.5, 0.5,
                                          knobs=knobs), x, channel_lanes_weight(w), *inputs,
                          outputs=[(out_shape, "float32")])[0]
    np.testing.assert_array_equal(channels.view(np.uint32), pixels.view(np.uint32))
    assert np.abs(channels).max() > 0


def test_float_conv_knobs_put_channels_on_the_lanes_where_rows_waste_lanes():
    """Channels on the lanes where they fill more of the vectors than an output row's pixels (not
    a multiple of 16) do, with one group and AVX-512; otherwise the pixel form's knobs."""
    from csqc.targets.llvm.kernels import cpu_target

    def knobs(x_shape, w_shape, stride=1, padding=1, groups=1, mcpu="cascadelake"):
        with cpu_target(mcpu):
            return glue.float_conv_knobs(x_shape, w_shape, stride, padding, 1, groups)

    assert knobs((1, 512, 4, 4), (512, 512, 3, 3)) == glue.ConvKnobs(row_block=4, col_vectors=4)
    assert knobs((1, 256, 14, 14), (256, 256, 3, 3), stride=2) == glue.ConvKnobs(row_block=5, col_vectors=4)  # 7x7 out
    assert knobs((1, 1024, 7, 7), (256, 1024, 1, 1), padding=0).row_block == 5  # 49 pixels: 3 vectors and a lane
    assert knobs((1, 64, 8, 8), (32, 64, 3, 3)) == glue.ConvKnobs(row_block=4, col_vectors=2)
    assert knobs((1, 16, 32, 32), (16, 16, 3, 3)) == glue.ConvKnobs()  # rows of 32: every lane used
    assert knobs((1, 2048, 4, 4), (512, 2048, 1, 1), padding=0) == glue.ConvKnobs()  # a 1x1 takes the whole plane
    assert knobs((1, 16, 7, 7), (20, 16, 3, 3)).row_block  # 20 of 32 lanes against 7 of 16
    assert knobs((1, 16, 7, 7), (4, 16, 3, 3)) == glue.ConvKnobs()  # 4 of 16 lanes against 7 of 16
    assert knobs((1, 64, 7, 7), (64, 1, 3, 3), groups=64) == glue.ConvKnobs()  # depthwise
    assert knobs((1, 3, 224, 224), (32, 3, 3, 3), stride=2) == glue.default_conv_knobs(32, 27, (2, 2), 1)  # a stem
    # AVX2: 16 registers, so no channels on the lanes: 4 channels x 16 pixels, 8 on rows of up to 8
    assert knobs((1, 512, 4, 4), (512, 512, 3, 3), mcpu="haswell") == glue.ConvKnobs(oc_block=8, segment=16)
    assert knobs((1, 64, 24, 24), (64, 64, 3, 3), stride=2, mcpu="haswell") == glue.ConvKnobs(oc_block=4, segment=16)


@pytest.mark.parametrize("post_act", ["none", "relu", "clip"])
@pytest.mark.parametrize("channel_lanes", [False, True])
def test_conv2d_f32_tail_with_a_residual_adds_it_to_the_rounded_y(post_act, channel_lanes):
    """A residual block's add and the activation after it in the float conv's tail: ``y`` rounded
    to float32, plus the residual, then ``post_act``, bit for bit as those ops run one by one."""
    from csqc.artifact import channel_lanes_weight

    x_shape, w_shape = (1, 8, 7, 7), (32, 8, 3, 3)
    x, w = rand(*x_shape), rand(*w_shape, scale=0.4)
    mult, add, residual = rand(32) + 0.5, rand(32), rand(1, 32, 7, 7)
    knobs = glue.ConvKnobs(row_block=5, col_vectors=2) if channel_lanes else None
    weights = channel_lanes_weight(w) if channel_lanes else w
    plain = glue.FloatTail("clip", 0.0, 6.0, True)
    (y,) = run_kernel(glue.conv2d_f32(x_shape, w_shape, 1, 1, 1, 1, False, knobs=knobs, tail=plain), x, weights,
                      mult, add, outputs=[(residual.shape, "float32")])
    tail = glue.FloatTail("clip", 0.0, 6.0, True, has_residual=True, post_act=post_act, post_lo=-1.0, post_hi=2.5)
    (got,) = run_kernel(glue.conv2d_f32(x_shape, w_shape, 1, 1, 1, 1, False, knobs=knobs, tail=tail), x, weights,
                        mult, add, residual, outputs=[(residual.shape, "float32")])
    want = y + residual
    want = {"none": want, "relu": np.maximum(want, 0), "clip": np.clip(want, np.float32(-1.0), np.float32(2.5))}[post_act]
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    with pytest.raises(ValueError, match="after a residual add"):
        glue.FloatTail(post_act="relu")


def test_conv2d_f32_small_tiles():
    """Other register tiles (remainder segments, odd channel blocks) give the same result."""
    x, w = rand(1, 4, 10, 59), rand(10, 4, 3, 3)  # row of 59 = 32 + 16 + 11
    expected = conv2d_nchw(x.astype(np.float64), w.astype(np.float64), (1, 1), (1, 1), (1, 1), 1)
    prim = glue.conv2d_f32(x.shape, w.shape, 1, 1, 1, 1, False, knobs=glue.ConvKnobs(oc_block=3, segment=32))
    (got,) = run_kernel(prim, x, w, outputs=[(expected.shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N,has_bias,act", [(1, 100, 10, True, "none"), (6, 64, 12, True, "relu"), (5, 7, 3, False, "clip")])
def test_linear_f32(M, K, N, has_bias, act):
    x, w, b = rand(M, K), rand(N, K), rand(N)
    expected = x.astype(np.float64) @ w.astype(np.float64).T + (b if has_bias else 0)
    if act == "relu":
        expected = np.maximum(expected, 0)
    if act == "clip":
        expected = np.clip(expected, -1.0, 1.0)
    inputs = (x, w, b) if has_bias else (x, w)
    (got,) = run_kernel(glue.linear_f32(M, K, N, has_bias, act, -1.0, 1.0), *inputs, outputs=[((M, N), "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(x).max() * np.abs(w).sum(axis=1).max())


# ------------------------------------------------------------------------------------------
# Elementwise
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["add", "mul", "minimum"])
@pytest.mark.parametrize("a_shape,b_shape", [
    ((2, 8, 9, 9), (2, 8, 9, 9)),
    ((2, 8, 9, 9), (1, 8, 1, 1)),
    ((1, 40000), (1,)),  # long row: parallel chunks with a remainder chunk
    ((3, 5, 7), (7,)),
    ((3, 1, 7), (1, 5, 1)),  # both operands broadcast
])
def test_binary(op, a_shape, b_shape):
    a, b = rand(*a_shape), rand(*b_shape)
    expected = HANDLERS[op](None, node(op, ()), [a, b])
    (got,) = run_kernel(glue.binary(op, a_shape, b_shape, expected.shape), a, b, outputs=[(expected.shape, "float32")])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("op", ["relu", "clip"])
def test_unary(op):
    x = rand(3, 4, 5, 7)
    expected = HANDLERS[op](None, node(op, x.shape, lo=-0.3, hi=0.6), [x])
    (got,) = run_kernel(glue.unary(op, x.shape, -0.3, 0.6), x, outputs=[(x.shape, "float32")])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("op", ["hardsigmoid", "hardswish"])
def test_hard_activations_bit_exact(op):
    x = rand(3, 4, 5, 7, scale=4.0)  # both clipped ends and the ramp between
    x.flat[:6] = [-3.0, 3.0, 0.0, -0.0, 1e-30, -1e-30]
    expected = HANDLERS[op](None, node(op, x.shape), [x])
    (got,) = run_kernel(glue.unary(op, x.shape), x, outputs=[(x.shape, "float32")])
    np.testing.assert_array_equal(got, expected)


def test_silu_within_an_ulp_of_exp():
    x = rand(3, 40, scale=6.0)
    expected = HANDLERS["silu"](None, node("silu", x.shape), [x])
    (got,) = run_kernel(glue.unary("silu", x.shape), x, outputs=[(x.shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 6, 9, 10), (4, 6)])
def test_channel_affine_bit_exact(shape):
    x, mul, add = rand(*shape, scale=10.0), rand(shape[1]), rand(shape[1])
    expected = HANDLERS["batch_norm"](None, node("batch_norm", shape), [x, mul, add])
    (got,) = run_kernel(glue.channel_affine(shape, 1), x, mul, add, outputs=[(shape, "float32")])
    np.testing.assert_array_equal(got, expected)


def test_copy_concat_transpose():
    x = rand(2, 3, 4, 5)
    (got,) = run_kernel(glue.copy(x.shape), x, outputs=[(x.shape, "float32")])
    np.testing.assert_array_equal(got, x)

    parts = [rand(2, 3, 4, 5), rand(2, 1, 4, 5), rand(2, 6, 4, 5)]
    expected = HANDLERS["cat"](None, node("cat", (), axis=1), parts)
    (got,) = run_kernel(glue.concat([p.shape for p in parts], 1), *parts, outputs=[(expected.shape, "float32")])
    np.testing.assert_array_equal(got, expected)

    for dims in [(0, 2, 3, 1), (3, 2, 1, 0), (0, 1, 3, 2)]:
        expected = HANDLERS["permute"](None, node("permute", (), dims=dims), [x])
        (got,) = run_kernel(glue.transpose(x.shape, dims), x, outputs=[(expected.shape, "float32")])
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", [(2, 3, 2, 3, 5, 37), (1, 2, 1, 8, 1, 33), (1, 4, 2, 2, 16, 16), (1, 6, 2, 2, 5, 5),
                                   (2, 2, 3, 2, 4, 9)])
def test_a_transposed_convs_phases_interleave(shape):
    # [N, C, sh, sw, Qh, Qw] -> [N, C, Qh, sh, Qw, sw]: each output row shuffles sw runs (the
    # interleave kernel), vectors of 16 columns (or of a shorter row) then a tail
    x = rand(*shape)
    dims = (0, 1, 4, 2, 5, 3)
    (got,) = run_kernel(glue.transpose(shape, dims), x, outputs=[(tuple(shape[d] for d in dims), "float32")])
    np.testing.assert_array_equal(got, x.transpose(dims))


# ------------------------------------------------------------------------------------------
# Pooling and reductions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", [
    ((1, 4, 36, 38), (3, 3), (2, 2), (1, 1), (1, 1)),  # ResNet stem pool
    ((2, 3, 9, 10), (2, 2), (2, 2), (0, 0), (1, 1)),
    ((1, 2, 11, 40), (3, 2), (1, 1), (1, 0), (2, 2)),
    ((1, 2, 5, 5), (3, 3), (3, 3), (1, 1), (1, 1)),  # every column on the border
])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool2d_exact(shape, kernel, stride, padding, dilation, ceil_mode):
    x = rand(*shape)
    n = node("max_pool2d", (), kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    expected = HANDLERS["max_pool2d"](None, n, [x])
    prim = glue.max_pool2d(shape, kernel, stride, padding, dilation, ceil_mode)
    (got,) = run_kernel(prim, x, outputs=[(expected.shape, "float32")])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape,kernel,stride,padding,count_include_pad,divisor", [
    ((1, 3, 20, 21), (3, 3), (2, 2), (1, 1), True, 0),
    ((1, 3, 20, 37), (3, 3), (1, 1), (1, 1), False, 0),
    ((2, 2, 8, 8), (2, 2), (2, 2), (0, 0), True, 3),
])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_avg_pool2d(shape, kernel, stride, padding, count_include_pad, divisor, ceil_mode):
    x = rand(*shape)
    n = node("avg_pool2d", (), kernel=kernel, stride=stride, padding=padding,
             count_include_pad=count_include_pad, divisor=divisor, ceil_mode=ceil_mode)
    expected = HANDLERS["avg_pool2d"](None, n, [x])
    prim = glue.avg_pool2d(shape, kernel, stride, padding, count_include_pad, divisor, ceil_mode)
    (got,) = run_kernel(prim, x, outputs=[(expected.shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,output_size", [((2, 5, 7, 7), (1, 1)), ((1, 3, 8, 12), (2, 3)), ((1, 4, 5, 37), (1, 1)),
                                               ((1, 3, 2, 2), (7, 7)), ((2, 3, 9, 11), (4, 3))])  # non-divisible
def test_adaptive_avg_pool2d(shape, output_size):
    x = rand(*shape)
    expected = HANDLERS["adaptive_avg_pool2d"](None, node("adaptive_avg_pool2d", (), output_size=output_size), [x])
    (got,) = run_kernel(glue.adaptive_avg_pool2d(shape, output_size), x, outputs=[(expected.shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,dims,keepdim", [((2, 3, 6, 7), (2, 3), True), ((2, 3, 6, 7), (2, 3), False),
                                                ((4, 5, 6), (1,), False), ((4, 5, 6), (0, 2), True)])
def test_mean(shape, dims, keepdim):
    x = rand(*shape)
    expected = HANDLERS["mean"](None, node("mean", (), dims=dims, keepdim=keepdim), [x])
    (got,) = run_kernel(glue.mean(shape, dims, keepdim), x, outputs=[(expected.shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((3, 37), -1), ((2, 1000), 1), ((2, 5, 20), 1), ((2, 6, 3), 1)])
def test_softmax(shape, axis):
    x = rand(*shape, scale=4.0)
    expected = HANDLERS["softmax"](None, node("softmax", (), axis=axis), [x])
    (got,) = run_kernel(glue.softmax(shape, axis), x, outputs=[(shape, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_builders_are_pure():
    """Same key, same function text: a planner may cache builds by the builder's arguments."""
    a = glue.conv2d_f32((1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True, "relu")
    b = glue.conv2d_f32((1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True, "relu")
    assert a.script() == b.script()


# ------------------------------------------------------------------------------------------
# exp on the vector units (sigmoid, tanh, softmax)
# ------------------------------------------------------------------------------------------
def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 steps between finite ``a`` and ``b`` of one sign."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def _vector_map(fn, x: np.ndarray) -> tuple[str, np.ndarray]:
    """``fn`` (a glue expression builder) over ``x`` (a multiple of 16 long), 16 lanes a vector:
    the kernel's call instructions and its result."""
    from tvm.script.ir_builder import tirx as I

    def body(xb, yb):
        with I.serial(0, x.size // 16) as v:
            with I.vectorized(0, 16) as lane:
                I.buffer_store(yb, fn(xb[v * 16 + lane]), [v * 16 + lane])

    func = glue.common.prim_func([("x", x.shape, "float32"), ("y", x.shape, "float32")], body)
    calls = " ".join(line for line in build(func).assembly().split("\n") if "call" in line)
    return calls, run_kernel(func, x, outputs=[(x.shape, "float32")])[0]


def test_exp_is_within_an_ulp_of_the_true_exp_and_makes_no_calls():
    x = np.concatenate([np.linspace(-110, 95, 1 << 20, dtype=np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 88.72283172607422, 88.72283935546875, -87.33654,
                                  -103.97, -104.0, np.nan, np.inf, -np.inf, 7.0, 2.5, -1.0, 1.0], np.float32)])
    calls, got = _vector_map(glue.elementwise._exp, x)
    assert "exp" not in calls
    with np.errstate(over="ignore"):
        true = np.exp(x.astype(np.float64)).astype(np.float32)  # the float32 nearest the true exp
    finite = np.isfinite(true)
    assert _ulps(got[finite], true[finite]).max() <= 1
    np.testing.assert_array_equal(got[~finite], true[~finite])  # inf above 88.7228..., NaN for NaN
    special = dict(zip(x[-16:].tolist(), got[-16:].tolist()))
    assert special[0.0] == 1.0 and special[-np.inf] == 0.0 and special[-104.0] == 0.0
    assert special[float(np.float32(-103.97))] > 0  # the least subnormal, rounded once


def test_log_is_within_two_ulps_of_the_true_log_and_makes_no_calls():
    tiny = np.float32(1.1754944e-38)  # the least normal float32
    x = np.concatenate([np.geomspace(1e-45, 3e38, 1 << 20).astype(np.float32),
                        np.linspace(0.5, 2.0, 1 << 16, dtype=np.float32),  # near 1: the polynomial's range
                        np.array([0.0, -0.0, -1.0, -1e-30, np.nan, np.inf, -np.inf, 1.0, 2.0, np.e, tiny,
                                  np.nextafter(tiny, np.float32(0)), 1e-45, 3.4028235e38, 0.70710677, 0.70710683],
                                 np.float32)])
    calls, got = _vector_map(glue.elementwise._log, x)
    assert "log" not in calls
    with np.errstate(divide="ignore", invalid="ignore"):
        true = np.log(x.astype(np.float64)).astype(np.float32)  # the float32 nearest the true log
    finite = np.isfinite(true)
    positive, negative = finite & (true > 0), finite & (true < 0)
    assert _ulps(got[positive], true[positive]).max() <= 2 and _ulps(got[negative], true[negative]).max() <= 2
    assert np.all(got[finite & (true == 0)] == 0)  # log(1)
    np.testing.assert_array_equal(got[~finite], true[~finite])  # -inf at +-0, NaN below 0 and at NaN, inf at inf


def test_erf_is_within_4e_7_of_the_true_erf_odd_bounded_and_makes_no_calls():
    x = np.concatenate([np.linspace(-6, 6, 1 << 20, dtype=np.float32),
                        np.geomspace(1e-38, 6, 1 << 16).astype(np.float32),
                        np.array([0.0, -0.0, 3.9999, 4.0, -4.0, 4.5, 1e30, -1e30, np.inf, -np.inf, np.nan, 1e-45, -1e-45,
                                  0.5, -0.5, 1.0], np.float32)])
    calls, got = _vector_map(glue.elementwise._erf, x)
    assert "erf" not in calls
    true = np.array([math.erf(v) for v in x.astype(np.float64)], np.float64)
    finite = ~np.isnan(x)
    assert np.abs(got[finite] - true[finite]).max() < 4e-7
    assert np.abs(got[finite]).max() == 1.0  # never past +-1 (the rational form rose an ulp above it near 4)
    small = finite & (np.abs(x) < 1e-3) & (np.abs(x) > 1e-30)  # (x * p underflows below ~1e-36)
    assert np.all(np.abs(got[small] / true[small] - 1) < 1e-6)  # relative precision near 0 (x * p / q)
    assert np.isnan(got[np.isnan(x)]).all()
    special = dict(zip(x[-16:-6].tolist(), got[-16:-6].tolist()))
    assert special[np.inf] == 1.0 and special[-np.inf] == -1.0 and special[4.0] == 1.0


def test_sin_and_cos_are_within_an_ulp_at_any_argument():
    """libm's range reduction: arguments of diffusion timesteps (~1000) and far beyond."""
    x = np.concatenate([np.linspace(-1000, 1000, 1 << 18, dtype=np.float32), np.geomspace(1, 3e38, 4096).astype(np.float32),
                        np.array([0.0, -0.0, 1e-30, np.pi, np.inf, -np.inf, np.nan], np.float32)])
    for op, true in (("sin", np.sin), ("cos", np.cos)):
        (got,) = run_kernel(glue.unary(op, x.shape), x, outputs=[(x.shape, "float32")])
        with np.errstate(invalid="ignore"):
            expected = true(x.astype(np.float64)).astype(np.float32)
        finite = np.isfinite(expected)
        assert np.abs(got[finite] - expected[finite]).max() <= 6e-8  # an ulp of values up to 1
        assert np.isnan(got[~finite]).all()  # +-inf and NaN
