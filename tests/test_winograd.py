"""The LLVM target's Winograd F(2x2, 3x3) float conv (``glue/winograd.py``) and its weight layout."""
from __future__ import annotations

import numpy as np
import pytest

from csqc.artifact import winograd_shape, winograd_weight
from csqc.interpreter import conv2d_nchw
from csqc.targets.llvm import glue
from csqc.targets.llvm.kernels import cpu_target
from test_glue_llvm import rand, run_kernel

WINOGRAD_CASES = [
    # input, weight, padding, bias, act, block, vectors
    ((1, 64, 7, 7), (64, 64, 3, 3), 1, False, "none", 24, 1),  # a ResNet's last stage: 16 tiles, 8 padding channels
    ((2, 16, 9, 11), (40, 16, 3, 3), 0, True, "relu", 8, 2),  # a batch of two, odd planes, no padding
    ((1, 8, 40, 37), (16, 8, 3, 3), 1, False, "clip", 8, 2),  # tile rows of 19: a row's last vector spills over
    ((1, 20, 5, 5), (24, 20, 3, 3), 2, True, "none", 12, 1),  # padded by 2: a 7x7 output of 16 tiles
]


def _direct(x, w, b, padding, act):
    y = conv2d_nchw(x.astype(np.float64), w.astype(np.float64), (1, 1), (padding, padding), (1, 1), 1)
    if b is not None:
        y = y + b.astype(np.float64)[None, :, None, None]
    return {"none": y, "relu": np.maximum(y, 0), "clip": np.clip(y, -0.5, 0.5)}[act]


@pytest.mark.parametrize("x_shape,w_shape,padding,has_bias,act,block,vectors", WINOGRAD_CASES)
def test_winograd_conv_is_the_conv_within_float32_rounding(x_shape, w_shape, padding, has_bias, act, block, vectors):
    """Every output of the F(2x2, 3x3) kernel within float32 rounding of the exact conv (float64),
    whatever the tiling: batches, odd planes, padding, channels past the last block, tile rows
    longer than a vector."""
    x, w, b = rand(*x_shape), rand(*w_shape, scale=0.3), rand(w_shape[0])
    want = _direct(x, w, b if has_bias else None, padding, act)
    knobs = glue.ConvKnobs(winograd_block=block, winograd_vectors=vectors)
    prim = glue.conv2d_f32(x_shape, w_shape, 1, padding, 1, 1, has_bias, act, -0.5, 0.5, knobs=knobs)
    (got,) = run_kernel(prim, x, winograd_weight(w, block), *((b,) if has_bias else ()),
                        outputs=[(want.shape, "float32")])
    scale = np.abs(_direct(x, w, b if has_bias else None, padding, "none")).max()  # before a clip
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    assert scale > 0.5


def test_winograd_conv_with_avx2s_tile_is_the_conv_within_float32_rounding():
    """The AVX2 build (4 channels x 1 vector of tiles, 16-lane vectors in halves) computes the same
    conv within float32 rounding."""
    x_shape, w_shape = (1, 16, 30, 19), (20, 16, 3, 3)
    x, w = rand(*x_shape), rand(*w_shape, scale=0.3)
    want = _direct(x, w, None, 1, "none")
    with cpu_target("haswell"):
        prim = glue.conv2d_f32(x_shape, w_shape, 1, 1, 1, 1, False,
                               knobs=glue.ConvKnobs(winograd_block=4, winograd_vectors=1))
        (got,) = run_kernel(prim, x, winograd_weight(w, 4), outputs=[(want.shape, "float32")])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("tail", [dict(act="relu", has_add=True),
                                  dict(act="clip", clip_hi=6.0, has_add=True, has_residual=True, post_act="relu"),
                                  dict(act="relu", out_bits=4, out_scale=3.0)])
def test_winograd_tail_is_the_epilogue_of_its_own_sums(tail):
    """A float-input layer's epilogue (bias, activation, residual add, codes) in the Winograd
    kernel: bit for bit the epilogue applied to the kernel's sums, stored."""
    x_shape, w_shape = (1, 16, 11, 11), (32, 16, 3, 3)
    x, w = rand(*x_shape), rand(*w_shape, scale=0.4)
    knobs = glue.ConvKnobs(winograd_block=8, winograd_vectors=2)
    u = winograd_weight(w, 8)
    out_shape = (1, 32, 11, 11)
    (sums,) = run_kernel(glue.conv2d_f32(x_shape, w_shape, 1, 1, 1, 1, False, knobs=knobs), x, u,
                         outputs=[(out_shape, "float32")])
    tail = glue.FloatTail(**tail)
    mult, add, residual = rand(32) + 0.5, rand(32), rand(*out_shape)
    inputs = [mult] + ([add] if tail.has_add else []) + ([residual] if tail.has_residual else [])
    outputs = [(shape, dtype) for name, shape, dtype in tail.params(32, out_shape)
               if name not in ("mult", "add", "residual")]
    fused = run_kernel(glue.conv2d_f32(x_shape, w_shape, 1, 1, 1, 1, False, knobs=knobs, tail=tail), x, u, *inputs,
                       outputs=outputs)
    epilogue = glue.epilogue(out_shape, 1, None, tail.act, tail.clip_lo, tail.clip_hi, tail.has_add, "float32",
                             has_residual=tail.has_residual, post_act=tail.post_act,
                             **({} if tail.out_bits is None else dict(out_bits=4, out_scale=3.0)))
    separate = run_kernel(epilogue, sums, *inputs, outputs=outputs)
    for got, want in zip(fused, separate):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert len(np.unique(fused[-1])) > 2


def test_winograd_weights_are_exact_for_integer_weights():
    """``U = G g G^T`` for integer weights: quarters, computed exactly (the float64 product of the
    transform matrices), in the kernel's block layout with zero padding channels."""
    q = np.random.default_rng(0).integers(-2**20, 2**20 + 1, (20, 3, 3, 3)).astype(np.float32)
    u = winograd_weight(q, 8)
    assert u.shape == winograd_shape(q.shape, 8) == (16, 3, 3, 8)
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    exact = np.einsum("ik,ockl,jl->ijco", g, q.astype(np.float64), g).reshape(16, 3, 20)
    got = u.transpose(0, 2, 1, 3).reshape(16, 3, 24)
    np.testing.assert_array_equal(got[..., :20], exact)
    assert not got[..., 20:].any()
    with pytest.raises(ValueError, match="3x3 weights"):
        winograd_shape((8, 3, 5, 5), 8)


def test_winograd_is_chosen_for_large_3x3_convs():
    """F(2x2, 3x3) where it pays: stride 1, no dilation, one group, a vector of tiles and 32 MiB
    of transformed tensors, and with AVX-512 at least 64 channels a side and 12 M multiply-adds
    (with AVX2 16 channels and 2 M); elsewhere the direct forms."""

    def knobs(x_shape, w_shape, stride=1, dilation=1, groups=1, mcpu="cascadelake"):
        with cpu_target(mcpu):
            return glue.float_conv_knobs(x_shape, w_shape, stride, 1, dilation, groups)

    wide = glue.ConvKnobs(winograd_block=8, winograd_vectors=2)
    assert knobs((1, 64, 56, 56), (64, 64, 3, 3)) == wide  # ResNet-50's first stage: 784 tiles
    assert knobs((1, 256, 14, 14), (256, 256, 3, 3)) == wide
    assert knobs((1, 512, 7, 7), (512, 512, 3, 3)) == glue.ConvKnobs(winograd_block=16, winograd_vectors=1)
    assert knobs((1, 256, 7, 7), (120, 256, 3, 3)) == glue.ConvKnobs(winograd_block=24, winograd_vectors=1)
    assert knobs((1, 32, 32, 32), (32, 32, 3, 3)).winograd_block == 0  # 32 channels
    assert knobs((1, 64, 16, 16), (64, 64, 3, 3)).winograd_block == 0  # 9.4 M multiply-adds
    assert knobs((1, 512, 4, 4), (512, 512, 3, 3)).row_block  # 4 tiles: channels on the lanes
    assert knobs((1, 64, 224, 224), (64, 64, 3, 3)).winograd_block == 0  # 102 MB of transformed tensors
    assert knobs((1, 128, 28, 28), (128, 128, 3, 3), stride=2).winograd_block == 0
    assert knobs((1, 128, 28, 28), (128, 128, 3, 3), dilation=2).winograd_block == 0
    avx2 = glue.ConvKnobs(winograd_block=4, winograd_vectors=1)  # 16 registers: 4 channels x 1 vector
    assert knobs((1, 128, 28, 28), (128, 128, 3, 3), mcpu="haswell") == avx2
    assert knobs((1, 16, 32, 32), (16, 16, 3, 3), mcpu="haswell") == avx2  # its direct form's narrow rows lose more
    assert knobs((1, 8, 32, 32), (16, 8, 3, 3), mcpu="haswell").winograd_block == 0
    assert knobs((1, 512, 4, 4), (512, 512, 3, 3), mcpu="haswell").winograd_block == 0
    with pytest.raises(ValueError, match="stride 1"):
        glue.conv2d_f32((1, 64, 8, 8), (64, 64, 3, 3), 2, 1, 1, 1, False, knobs=wide)
