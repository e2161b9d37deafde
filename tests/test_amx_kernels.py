"""Bit-parallel linear and conv layers on Intel AMX tiles (targets/llvm/amx.py): exact, chosen
where the CPU has them, refused clearly where it does not. Runs where this machine has AMX-INT8 (the Intel
Xeon CI machines); elsewhere only the checks that need no tile instruction run."""
import json

import numpy as np
import pytest
import torch

import csqc
from csqc import runtime
from csqc.targets.llvm import amx, kernels
from csqc.artifact import pack_conv_rows_weight
from csqc.targets.llvm.packing import pack_bitparallel_weight
from csqc.targets.tvm.geometry import conv_geometry
from csqc.verify import verify

needs_amx = pytest.mark.skipif(not amx.host_has_amx(), reason="this CPU has no AMX-INT8 tiles")


@needs_amx
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 64, 128), (16, 128, 64), (37, 192, 256), (50, 128, 128),
                                   (64, 1024, 1024)])  # from 32 rows 2 x 2 blocks: whole, + 16 rows, + a partial tile
def test_amx_dense_equals_the_integer_product(m, n, k):
    rng = np.random.default_rng(m)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    q = rng.integers(-128, 128, (n, k)).astype(np.int64)
    got = kernels.build(amx.amx_dense(m, n, k))(x, pack_bitparallel_weight(q))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ q.T)


@needs_amx
@pytest.mark.parametrize("m,n,k", [(8, 64, 64), (16, 128, 128), (37, 64, 192), (64, 256, 256)])
@pytest.mark.parametrize("options", [
    dict(levels=15, act="relu", has_add=True),
    dict(levels=15, has_offset=True),  # offset codes: acc - L * sum_k q
    dict(levels=255, act="clip", clip_lo=-0.5, clip_hi=2.0, has_add=True, has_offset=True, has_zero_point=True),
    dict(levels=1, has_add=True),  # one bit: no divide at all
])
@pytest.mark.parametrize("scale", [0.37, 2.0**-70])  # the divide-free quotient, and outside its range
def test_amx_dense_with_its_epilogue_equals_the_product_then_the_epilogue(m, n, k, options, scale):
    """The fused kernel's float outputs equal, bit for bit, ``amx_dense``'s accumulators run through
    ``glue.epilogue`` (rows: a partial tile only, one tile, 2 x 2 blocks + 1 + a partial tile, pairs)."""
    from csqc.targets.llvm import glue

    rng = np.random.default_rng(m + n)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    q = rng.integers(-8, 8, (n, k)).astype(np.int64)
    w = pack_bitparallel_weight(q)
    tail = glue.TileEpilogue(**options)
    named = {"acc_offset": rng.integers(-5000, 5000, n).astype(np.int32), "scale": np.float32([scale]),
             "zero_point": np.int32([7]), "mult": rng.standard_normal(n).astype(np.float32),
             "add": rng.standard_normal(n).astype(np.float32)}
    params = [named[name] for name, _, _ in tail.params(n)]
    fused = kernels.build(amx.amx_dense_epilogue(m, n, k, tail))(x, w, *params)
    acc = kernels.build(amx.amx_dense(m, n, k))(x, w)
    separate = glue.epilogue((m, n), 1, tail.levels, tail.act, tail.clip_lo, tail.clip_hi, tail.has_add, "int32",
                             False, has_offset=tail.has_offset, has_zero_point=tail.has_zero_point)
    expected = kernels.build(separate)(acc, *params)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    np.testing.assert_array_equal(fused.view(np.int32), expected.view(np.int32))


@needs_amx
@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation", [
    ((1, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1),  # one K tile of 4 channel groups, 16 outputs
    ((1, 64, 20, 20), (64, 64, 3, 3), 1, 1, 1),  # 64 channels: one full K tile; 20 = 16 + 4 columns
    ((2, 64, 15, 17), (96, 64, 3, 3), 2, 1, 1),  # stride 2 (four phases), odd rows, batch 2
    ((1, 128, 9, 9), (32, 128, 1, 1), 1, 0, 1),  # two K tiles, 1x1
    ((1, 3, 12, 12), (16, 3, 3, 3), 1, 1, 1),  # 3 channels: a partial channel group
    ((1, 8, 13, 13), (48, 8, 3, 3), 1, 2, 2),  # dilation 2; 48 outputs (16-channel blocks)
    ((1, 24, 11, 14), (32, 24, 5, 3), 2, (2, 1), 1),  # 5x3 kernel, 6 groups, one K tile
    ((1, 96, 9, 10), (32, 96, 1, 1), 1, 0, 1),  # 24 groups: two K tiles of 12
    ((1, 144, 7, 7), (16, 144, 3, 3), 2, 1, 1),  # 36 groups: three K tiles of 12, stride 2
    ((1, 158, 5, 6), (48, 158, 1, 1), 1, 0, 1),  # 40 groups (the last one partial): four K tiles of 10
    # pointwise over whole tile rows (_amx_pointwise_conv): the flattened plane, 32 pixels a block
    ((1, 64, 8, 8), (64, 64, 1, 1), 1, 0, 1),  # 64 pixels: two blocks, 32-channel blocks
    ((2, 144, 6, 8), (24, 144, 1, 1), 1, 0, 1),  # 48 pixels (the last block overlaps); 24 = 16 + 8 channels
    ((1, 96, 4, 20), (40, 96, 1, 1), 1, 0, 1),  # 80 pixels; 40 = 16 + 16 + 8 channels; two K tiles of 12
    ((1, 30, 16, 16), (16, 30, 1, 1), 1, 0, 1),  # 8 groups (the last one partial); several tasks a plane
])
def test_amx_conv2d_equals_the_integer_convolution(x_shape, w_shape, stride, padding, dilation):
    rng = np.random.default_rng(sum(x_shape))
    x = rng.integers(0, 256, x_shape).astype(np.uint8)
    q = rng.integers(-128, 128, w_shape).astype(np.int64)
    got = kernels.build(amx.amx_conv2d(x_shape, w_shape, stride, padding, dilation))(x, pack_conv_rows_weight(q))
    expected = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(q, dtype=torch.float64),
                                          stride=stride, padding=padding, dilation=dilation)
    np.testing.assert_array_equal(got, expected.numpy().astype(np.int64))  # exact: |sums| < 2^53


def test_amx_conv_takes_only_whole_tiles():
    assert amx.amx_conv_fits(conv_geometry((1, 64, 8, 8), (32, 64, 3, 3), 1, 1, 1, 1))
    assert not amx.amx_conv_fits(conv_geometry((1, 64, 8, 8), (24, 64, 3, 3), 1, 1, 1, 1))  # 24 outputs
    assert amx.amx_conv_fits(conv_geometry((1, 96, 8, 8), (32, 96, 1, 1), 1, 0, 1, 1))  # 24 groups: 2 K tiles of 12
    assert not amx.amx_conv_fits(conv_geometry((1, 68, 8, 8), (32, 68, 1, 1), 1, 0, 1, 1))  # 17 groups: no tiles
    assert not amx.amx_conv_fits(conv_geometry((1, 84, 8, 8), (32, 84, 1, 1), 1, 0, 1, 1))  # 21 = 3 x 7: below half
    assert not amx.amx_conv_fits(conv_geometry((1, 64, 8, 8), (64, 1, 3, 3), 1, 1, 1, 64))  # depthwise
    assert not amx.amx_conv_fits(conv_geometry((1, 16, 12, 12), (16, 16, 3, 3), 3, 1, 1, 1))  # stride 3
    # pointwise over planes of whole tile rows: 8 channels may end the last tile
    assert amx.amx_conv_fits(conv_geometry((1, 144, 8, 8), (24, 144, 1, 1), 1, 0, 1, 1))
    assert not amx.amx_conv_fits(conv_geometry((1, 144, 9, 9), (24, 144, 1, 1), 1, 0, 1, 1))  # 81 pixels
    assert not amx.amx_conv_fits(conv_geometry((1, 144, 8, 8), (20, 144, 1, 1), 1, 0, 1, 1))  # 20 outputs
    assert not amx.amx_conv_fits(conv_geometry((1, 144, 8, 8), (24, 144, 1, 1), 1, 1, 1, 1))  # padded
    assert not amx.amx_pointwise_codes_fits(conv_geometry((1, 144, 8, 8), (24, 144, 1, 1), 1, 0, 1, 1))
    with pytest.raises(ValueError, match="whole tiles of 16"):
        amx.amx_conv2d((1, 64, 8, 8), (24, 64, 3, 3), 1, 1, 1)


def test_convs_take_tiles_where_a_product_fills_a_tile_row():
    """At least 16 channel groups (taps x ceil(C/4)) per product: below that the VNNI kernel wins."""
    from csqc.targets.llvm.backend import tile_conv

    assert tile_conv(conv_geometry((1, 64, 14, 14), (384, 64, 1, 1), 1, 0, 1, 1))  # 16 groups
    assert tile_conv(conv_geometry((1, 16, 32, 32), (16, 16, 3, 3), 1, 1, 1, 1))  # 4 groups x 9 taps
    assert not tile_conv(conv_geometry((1, 16, 112, 112), (96, 16, 1, 1), 1, 0, 1, 1))  # 4 groups
    assert not tile_conv(conv_geometry((1, 3, 32, 32), (16, 3, 3, 3), 1, 1, 1, 1))  # 1 group x 9 taps
    assert not tile_conv(conv_geometry((1, 64, 14, 14), (64, 1, 3, 3), 1, 1, 1, 64))  # depthwise
    # MobileNetV2's 24-channel projections at 56x56: whole-line tiles, the last one 8 channels
    assert tile_conv(conv_geometry((1, 144, 56, 56), (24, 144, 1, 1), 1, 0, 1, 1))


def test_amx_dense_refuses_partial_tiles():
    assert not amx.amx_dense_fits(8, 48, 64) and not amx.amx_dense_fits(8, 64, 96)
    with pytest.raises(ValueError, match="N % 64"):
        amx.amx_dense(8, 48, 64)


def test_only_cpus_with_tiles_get_them():
    assert amx.target_has_amx(kernels.cpu_target("sapphirerapids"))
    assert not amx.target_has_amx(kernels.cpu_target("znver4"))
    assert not amx.target_has_amx(kernels.cpu_target("icelake-server"))
    # the detected host target carries them exactly where the host has them
    assert amx.target_has_amx(kernels.cpu_target()) == amx.host_has_amx()


def _linear_batch(tmp_path, rows: int):
    torch.manual_seed(1)
    model = csqc.convert(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).eval(),
                         n_bits=3, act_bits=4, quantize_first_input=True)
    x = torch.rand(rows, 256)
    return csqc.load(csqc.save(csqc.finalize(model).eval(), tmp_path / "m.pt", x)), x


@needs_amx
def test_a_batch_of_rows_runs_on_tiles_and_verifies_exactly(tmp_path):
    """Batch 16: both linear layers take AMX tiles, verify exactly, and every plane setting
    matches the VNNI kernel's results (the runtime rebuilds the same int8 weights)."""
    model, x = _linear_batch(tmp_path, 16)
    tiles, vnni = tmp_path / "tiles.so", tmp_path / "vnni.so"
    csqc.compile(model, "llvm", tiles)
    csqc.compile(model, "llvm", vnni, mcpu="icelake-server")  # VNNI, no tiles: the same results
    m, reference = runtime.load(tiles), runtime.load(vnni)
    assert [info.get("tiles") for info in m.layers.values()] == ["amx", "amx"]
    kinds = [runtime._kernel_kind(s["func"]) for s in m.plan["steps"]]
    # the first layer's epilogue also writes the second's input codes; the second's float output,
    # the model's, comes from the tile kernel itself (its accumulators never stored)
    assert kinds.count("amxdense") == 1 and kinds.count("amxdense_epilogue") == 1, kinds
    last = m.layers[sorted(m.layers)[-1]]
    assert last["epilogue"] == "in the tile kernel" and last["tensors"]["acc"] is None
    assert not any(info.get("tiles") for info in reference.layers.values())
    report = verify(model, inputs=[np.random.default_rng(2).random((32, 256), dtype=np.float32)],
                    artifact=str(tiles), per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]
    for skip in (0, 1, 2):
        np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))


def test_a_plan_with_unknown_tiles_is_refused(tmp_path):
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    model, _ = _linear_batch(tmp_path, 16)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu="sapphirerapids")  # tiles in the plan, whichever CPU this is
    library, members = _split(art)
    plan = json.loads(members[PLAN])
    assert [info.get("tiles") for info in plan["layers"].values() if info["kernel"] == "bitparallel"] == ["amx", "amx"]
    for layer, value in (("0", "tpu"), ("0", None), ("0", "amx")):
        if value == "amx":
            plan["layers"][layer]["pack"] = "conv"  # tiles read only the dense and conv_rows layouts
        plan["layers"][layer]["tiles"] = value
        bad = tmp_path / "bad.so"
        bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
        with pytest.raises(csqc.errors.CsqcError, match="tiles"):
            runtime.load(bad)


def _small_cnn(tmp_path):
    torch.manual_seed(2)
    float_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 24, 1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(24, 5)).eval()
    model = csqc.finalize(csqc.convert(float_model, n_bits=4, act_bits=4, quantize_first_input=True))
    x = torch.rand(2, 3, 16, 16)
    return csqc.load(csqc.save(model, tmp_path / "m.pt", x)), x


@needs_amx
def test_a_cnn_runs_its_convolutions_on_tiles_and_verifies_exactly(tmp_path):
    """Convolutions whose channels fill tiles take AMX (the 24-output 1x1 too: whole tile rows of
    8x8 pixels, 16 + 8 channels), verify exactly with dynamic and calibrated scales, and every
    plane setting matches the VNNI artifact."""
    model, x = _small_cnn(tmp_path)
    for calib in (None, [np.random.default_rng(3).random((8, 3, 16, 16), dtype=np.float32)]):
        tiles, vnni = tmp_path / "tiles.so", tmp_path / "vnni.so"
        csqc.compile(model, "llvm", tiles, calibrate=calib)
        csqc.compile(model, "llvm", vnni, mcpu="icelake-server", calibrate=calib)
        m, reference = runtime.load(tiles), runtime.load(vnni)
        packs = {name: (info.get("pack"), info.get("tiles")) for name, info in m.layers.items()}
        assert packs["2"] == packs["4"] == packs["6"] == ("conv_rows", "amx"), packs
        assert packs["0"] == ("conv", None), packs  # 3 channels x 9 taps: less than one tile row
        report = verify(model, inputs=[np.random.default_rng(4).random((4, 3, 16, 16), dtype=np.float32)],
                        artifact=str(tiles), per_layer=True, calibrate=calib)
        assert report.ok and report.accumulators_exact, report.to_json()["first_divergence"]
        for skip in (0, 1, 3):
            np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))


@pytest.mark.skipif(amx.host_has_amx(), reason="needs a CPU without AMX")
def test_a_tile_artifact_on_a_cpu_without_tiles_is_bad_input(tmp_path):
    model, _ = _linear_batch(tmp_path, 16)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu="sapphirerapids")
    with pytest.raises(csqc.errors.BadInput, match="uses .*amx-int8.* which this CPU lacks"):
        runtime.load(art)
