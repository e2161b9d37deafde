"""Between two ReLU6 of dynamic scales, a depthwise conv first tries its codes at the clips' bounds.

Rules under test (``kernels.bitparallel_depthwise_saturated_codes``, ``lower``'s
``_saturated_forms``, ``code_thresholds.saturation_thresholds``): a dynamic scale ``S = max|y|``
of a clipped ``y`` is the clip's bound as soon as one value reaches it, and the codes are then
the static-scale codes at that bound. The speculative call runs where this call's input scale
is the input clip's bound, and is kept where a value reached the output bound (its saturation
threshold, found from the interpreter's float chain); otherwise the conv and its dynamic
epilogue run after it and write the layer's codes. Either way a compiled model computes what it
computes without the speculative call, bit for bit, and verifies exactly.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from cpus import needs_avx512
from csqc import runtime
from csqc.interpreter import _quantize_values, layer_output
from csqc.targets.llvm import glue, kernels
from csqc.targets.llvm.backend import CpuBackend
from csqc.targets.tvm.code_thresholds import code_form, code_tables, saturation_thresholds
from irbuild import Builder
from test_glue_llvm import run_kernel
from test_kernels_llvm import conv_reference, needs_vbmi

F32 = np.float32
IN_SCALE, IN_LEVELS = 6.0, 15


def test_saturation_thresholds_are_the_least_search_values_whose_y_reaches_the_bound():
    rng = np.random.default_rng(4)
    channels = 24
    b = Builder()
    x = b.input("x", (1, channels, 4, 4))
    codes = b.quantize(x, 4, signed=False)
    mult = (rng.standard_normal(channels) * 0.01).astype(F32)
    # flipped, constant either way, one reaching 6 below int16's range, one never within it
    mult[:5] = [-0.02, 0.0, -0.0, 1e-4, 1e-6]
    add = (rng.standard_normal(channels) * 2).astype(F32)
    add[1:5] = [1.0, -1.0, 100.0, 1.0]
    y = b.qconv2d("layer", codes, rng.integers(-3, 4, (channels, 1, 3, 3)), n_bits=2, active_bits=(1, 0),
                  mult=mult, add=add, act="clip", groups=channels, padding=(1, 1))
    g = b.build(y)
    n = g.node("layer")
    n = n.replace(attrs={**n.attrs, "clip_lo": 0.0, "clip_hi": 6.0})
    g = g.replace(nodes=tuple(n if m.name == "layer" else m for m in g.nodes))
    at = saturation_thresholds(g, n, IN_SCALE, IN_LEVELS, 6.0).astype(np.int64)
    flip = np.signbit(mult) & (mult != 0)

    def y_of(s):  # y of search value s in each channel
        acc = np.where(flip, ~s, s)[None, :, None, None]
        return layer_output(g, n, acc, IN_SCALE, IN_LEVELS)[0, :, 0, 0]

    inside = (at > -(2**15)) & (at < 2**15 - 1)
    assert inside.sum() >= channels - 5, at
    assert (y_of(np.where(inside, at, 0)) == F32(6))[inside].all()
    assert (y_of(np.where(inside, at - 1, 0)) < F32(6))[inside].all()
    assert at[3] == -(2**15) and (y_of(np.full(channels, -(2**15))) == F32(6))[at == -(2**15)].all()
    assert (at[1:3] == 2**15 - 1).all() and (y_of(np.full(channels, 2**15 - 1)) < F32(6))[at == 2**15 - 1].all()


def _depthwise_layer(rng, channels: int, hw: int, stride: int, gain: float, shift: float):
    """A 3x3 depthwise quantized conv with a ReLU6 and no output quantization (its dynamic
    quantizer follows it), ``mult`` around ``gain``, ``add`` around ``shift``."""
    b = Builder()
    x = b.input("x", (1, channels, hw, hw))
    codes = b.quantize(x, 4, signed=False)
    mult = rng.standard_normal(channels)
    mult = (np.sign(mult) * (np.abs(mult) + 0.5) * gain).astype(F32)  # every step within int16's range
    mult[:2] = [0.0, -gain]  # a constant channel, a flipped one
    add = (rng.standard_normal(channels) * 3 + shift).astype(F32)
    q = rng.integers(-3, 4, (channels, 1, 3, 3))
    y = b.qconv2d("layer", codes, q, n_bits=2, active_bits=(1, 0), mult=mult, add=add, act="clip",
                  groups=channels, padding=(1, 1), stride=stride)
    g = b.build(y)
    n = g.node("layer")
    n = n.replace(attrs={**n.attrs, "clip_lo": 0.0, "clip_hi": 6.0})
    return g.replace(nodes=tuple(n if m.name == "layer" else m for m in g.nodes)), n, q


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hw,stride,tap_pairs", [(14, 1, True), (14, 2, False), (7, 1, False), (28, 1, True)])
@needs_vbmi
def test_codes_at_the_bounds_are_the_dynamic_codes_where_a_value_reaches_the_bound(seed, hw, stride, tap_pairs):
    """The speculative kernel against the interpreter: the layer's float ``y``, then a dynamic
    4-bit quantizer (``S = max|y|``). Where ``max|y|`` is 6 the kernel is done and its codes and
    scale are the quantizer's; where not, it says so; at another input scale it does nothing."""
    rng = np.random.default_rng(seed)
    channels = 32
    for shift in (0.0, -12.0):  # some values reach 6 / none does
        for _ in range(8):  # a layer whose every channel has a fixed-point form (what lowering requires)
            g, n, q = _depthwise_layer(rng, channels, hw, stride, 0.03, shift)
            at_bounds = n.replace(quant=n.quant.__class__(**{**n.quant.__dict__, "out_bits": 4, "out_scale": 6.0}))
            tables = code_tables(g, at_bounds, IN_SCALE, IN_LEVELS)
            form = code_form(tables) if tables is not None else None
            if form is not None:
                break
        saturation_at = saturation_thresholds(g, n, IN_SCALE, IN_LEVELS, 6.0)
        assert form is not None and saturation_at is not None
        x = rng.integers(0, 16, (1, channels, hw, hw))
        acc = conv_reference(x, q, (stride, stride), (1, 1), (1, 1), channels)
        want = _quantize_values(lambda: "q", layer_output(g, n, acc, IN_SCALE, IN_LEVELS), 4, 0.0)
        kernel = kernels.bitparallel_depthwise_saturated_codes((1, channels, hw, hw), (channels, 1, 3, 3), stride, 1,
                                                               1, IN_SCALE, 6.0, tap_pairs)
        for in_scale in (IN_SCALE, 5.5):
            inputs = [x.astype(np.uint8), q.reshape(channels, 9).astype(np.int32), np.array([F32(in_scale)]),
                      form.reshape(-1), tables.base, tables.flip, saturation_at]
            scale, codes, done = run_kernel(kernel, *inputs, outputs=[((1,), "float32"), (acc.shape, "uint8"),
                                                                      ((1,), "int32")])
            saturated = in_scale == IN_SCALE and want.scale == F32(6)
            assert done[0] == int(saturated), (shift, in_scale, want.scale)
            if saturated:
                assert scale[0] == F32(6)
                np.testing.assert_array_equal(codes, want.codes)
            else:
                assert scale[0] == 0  # the scale is left to the dynamic epilogue


@needs_avx512
def test_the_conv_and_the_epilogue_skip_where_the_speculative_call_is_done():
    rng = np.random.default_rng(1)
    channels, hw = 32, (1, 32, 14, 14)
    x = rng.integers(0, 16, hw).astype(np.uint8)
    w = rng.integers(-3, 4, (channels, 9)).astype(np.int32)
    conv = kernels.bitparallel_conv2d(hw, (channels, 1, 3, 3), 1, 1, 1, channels, int16_depthwise=True,
                                      out_dtype="int16")
    skipping = kernels.bitparallel_conv2d(hw, (channels, 1, 3, 3), 1, 1, 1, channels, int16_depthwise=True,
                                          out_dtype="int16", skip_when_done=True)
    want, = run_kernel(conv, x, w, outputs=[(hw, "int16")])
    assert want.any()
    np.testing.assert_array_equal(_run_done(skipping, [x, w], [(hw, "int16")], 0)[0], want)
    assert not _run_done(skipping, [x, w], [(hw, "int16")], 1)[0].any()

    mult, add = (rng.random(channels) * 0.01).astype(F32), rng.standard_normal(channels).astype(F32)
    options = dict(out_bits=4, out_scale=0.0, acc_storage="int16")
    inputs = [want, np.array([F32(0.7)]), mult, add]
    outputs = [((1,), "float32"), (hw, "uint8")]
    plain = run_kernel(glue.epilogue(hw, 1, 15, "clip", 0.0, 6.0, True, **options), *inputs, outputs=outputs)
    skip = glue.epilogue(hw, 1, 15, "clip", 0.0, 6.0, True, skip_when_done=True, **options)
    for got, want_part in zip(_run_done(skip, inputs, outputs, 0), plain):
        np.testing.assert_array_equal(got, want_part)
    assert not any(part.any() for part in _run_done(skip, inputs, outputs, 1))


def _run_done(prim_func, inputs, outputs, done: int) -> list[np.ndarray]:
    """Run a kernel whose parameters are ``inputs``, ``outputs`` (zeroed) and a last ``done``."""
    import tvm

    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in outputs]
    kernels.build(prim_func).executable(*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs], *outs,
                                        tvm.runtime.tensor(np.array([done], np.int32), dev))
    return [t.numpy() for t in outs]


def _block(dw_gain: float = 1.0) -> nn.Module:
    """MobileNetV2's inverted residual shape (ReLU6 after the expansion and the depthwise conv),
    BatchNorm statistics from random images; ``dw_gain`` scales the depthwise conv's BatchNorm
    (small: its outputs stay below 6 where its inputs saturate)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                      nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.ReLU6(),
                      nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48), nn.ReLU6(),
                      nn.Conv2d(48, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    _with_batch_statistics(m)
    with torch.no_grad():
        m[7].weight.mul_(dw_gain)
        m[7].bias.mul_(dw_gain)
    return csqc.finalize(csqc.convert(m.eval(), n_bits=3, act_bits=4))


def _with_batch_statistics(m: nn.Module) -> None:
    """BatchNorm statistics from four train-mode passes over random 32x32 images."""
    for module in m.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(torch.rand(8, 3, 32, 32))


def _compiled_both_ways(model: nn.Module, folder, name: str):
    """``(model file, artifact with saturated scales, artifact without)``."""
    path = csqc.save(model, folder / f"{name}.pt", torch.zeros(1, 3, 32, 32))
    with_them = csqc.compile(csqc.load(path), "llvm", folder / f"{name}.saturated.so").output
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CpuBackend, "saturated_scales", False)
        plain = csqc.compile(csqc.load(path), "llvm", folder / f"{name}.plain.so").output
    return path, runtime.load(with_them), runtime.load(plain)


@pytest.fixture(scope="module", params=[1.0, 0.2], ids=["saturating", "quiet-depthwise"])
def both_ways(request, tmp_path_factory):
    return (request.param, *_compiled_both_ways(_block(request.param), tmp_path_factory.mktemp("saturated"), "block"))


@needs_avx512
def test_a_speculating_model_computes_what_the_plain_one_does_on_both_branches(both_ways):
    gain, _, speculating, plain = both_ways
    layer = "6"  # the depthwise conv
    assert speculating.layers[layer]["saturated"] == {"in": 6.0, "out": 6.0}
    assert "saturated" not in plain.layers[layer]
    kinds = [s["func"].split("_", 1)[1] for s in speculating.plan["steps"] if s.get("layer") == layer]
    assert kinds == ["dwsaturated", "bpconv", "epilogue"], kinds
    done = {}
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    for mul in (0.01, 1.0, 3.0, 20.0):
        got, want = {}, {}
        np.testing.assert_array_equal(speculating(x * F32(mul), record=got), plain(x * F32(mul), record=want))
        np.testing.assert_array_equal(speculating(x * F32(mul)), plain(x * F32(mul)))
        for name in want:
            if name.endswith((".codes", ".scale")):  # every quantizer's codes and scale
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} at x * {mul}")
        done[mul] = int(got[f"{layer}.saturated"][0])
        assert float(got["6.input_quant.quant.scale"][0]) == 6.0 or not done[mul]
    # small inputs: no scale reaches its bound, so the call returns at once; large ones saturate
    # the expansion (the depthwise conv's input: the call runs), and its own outputs where its
    # gain allows (else the conv and the epilogue run after the call, on the same codes buffer)
    assert float(got["6.input_quant.quant.scale"][0]) == 6.0
    assert float(got["9.input_quant.quant.scale"][0]) == 6.0 if gain == 1.0 else 0 < got["9.input_quant.quant.scale"][0] < 6
    assert done[0.01] == 0 and done[20.0] == (1 if gain == 1.0 else 0), done


@needs_avx512
def test_a_speculating_model_verifies_exactly_layer_by_layer(both_ways):
    _, path, speculating, _ = both_ways
    x = np.random.default_rng(5).random((1, 3, 32, 32), dtype=np.float32)
    batch = np.concatenate([x * F32(20), x, x * F32(0.01)])
    report = csqc.verify(csqc.load(path), artifact=str(speculating.path), per_layer=True, inputs=[batch])
    assert report.ok and report.accumulators_exact, (report.first_divergence, report.notes)


@needs_avx512
def test_bench_says_how_many_depthwise_convs_kept_their_codes(both_ways):
    _, path, speculating, _ = both_ways
    from csqc.bench import bench

    report = bench(path, artifact=str(speculating.path), baselines=False, limits=False, rounds=2)
    said = [n for n in report.notes if "between two ReLU6 of dynamic scales" in n]
    assert len(said) == 1 and " of its 1 depthwise convs " in said[0], report.notes


@needs_avx512
def test_inspect_counts_the_depthwise_convs_that_try_saturated_scales(both_ways):
    from click.testing import CliRunner

    from csqc.cli import cli
    from csqc.compiler import inspect_artifact

    _, _, speculating, plain = both_ways
    assert inspect_artifact(speculating.path)["saturated_scales"] == 1
    assert inspect_artifact(plain.path)["saturated_scales"] == 0
    shown = CliRunner().invoke(cli, ["inspect", str(speculating.path)])
    assert shown.exit_code == 0 and "saturated scales: 1 depthwise convs" in " ".join(shown.output.split())


# -- regular convs between two clips: the dynamic epilogue's codes at the bounds -------------

def _reference_net(kind: str) -> nn.Module:
    """A CSQ reference architecture (4-bit ReLU6 activations where the reference quantizes them),
    narrow, with BatchNorm statistics from random images (its scales then saturate at 6)."""
    from csqc.models import reference

    torch.manual_seed(1)
    m = reference.resnet20(Nbits=4, act_bit=4, width=4) if kind == "resnet20" else \
        reference.vgg19bn(Nbits=4, act_bit=4, width=4)
    _with_batch_statistics(m)
    return csqc.finalize(m.eval())


@pytest.fixture(scope="module", params=["resnet20", "vgg19bn"])
def bounded_epilogues(request, tmp_path_factory):
    return (request.param, *_compiled_both_ways(_reference_net(request.param), tmp_path_factory.mktemp("bounded"),
                                                request.param))


@needs_avx512
def test_convs_between_two_clips_compute_what_the_dynamic_pass_does_on_both_branches(bounded_epilogues):
    """Where the input scale and the output's max|y| are the clips' bounds the epilogue runs the
    codes of the static scales (6, 6); elsewhere the dynamic pass: the same codes either way."""
    kind, _, with_forms, plain = bounded_epilogues
    bounded = [name for name, layer in with_forms.layers.items() if layer.get("saturated_epilogue")]
    assert len(bounded) >= (8 if kind == "resnet20" else 3), bounded  # ResNet-20: every block's first conv
    assert all(with_forms.layers[name]["saturated_epilogue"] == {"in": 6.0, "out": 6.0} for name in bounded)
    assert not any(layer.get("saturated_epilogue") for layer in plain.layers.values())
    x = np.random.default_rng(7).random((1, 3, 32, 32), dtype=np.float32)
    saturated = {}
    for mul in (0.01, 1.0, 20.0):
        got, want = {}, {}
        np.testing.assert_array_equal(with_forms(x * F32(mul), record=got), plain(x * F32(mul), record=want))
        for name in want:
            if name.endswith((".codes", ".scale", ".acc")):
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} at x * {mul}")
        saturated[mul] = sum(float(value[0]) == 6.0 for name, value in want.items() if name.endswith(".scale"))
    assert saturated[20.0] > saturated[0.01], saturated  # both branches ran


@needs_avx512
def test_inspect_counts_the_convs_whose_epilogue_tries_the_bounds(bounded_epilogues):
    from click.testing import CliRunner

    from csqc.cli import cli
    from csqc.compiler import inspect_artifact

    _, _, with_forms, plain = bounded_epilogues
    count = sum("saturated_epilogue" in layer for layer in with_forms.layers.values())
    assert count and inspect_artifact(with_forms.path)["saturated_epilogues"] == count
    assert inspect_artifact(plain.path)["saturated_epilogues"] == 0
    shown = " ".join(CliRunner().invoke(cli, ["inspect", str(with_forms.path)]).output.split())
    assert f"saturated epilogues: {count} convs between two clips" in shown


@needs_avx512
def test_convs_between_two_clips_verify_exactly(bounded_epilogues):
    _, path, with_forms, _ = bounded_epilogues
    x = np.random.default_rng(8).random((1, 3, 32, 32), dtype=np.float32)
    report = csqc.verify(csqc.load(path), artifact=str(with_forms.path), per_layer=True,
                         inputs=[np.concatenate([x * F32(20), x, x * F32(0.01)])])
    assert report.ok and report.accumulators_exact, (report.first_divergence, report.notes)
