"""Quantized transposed convolutions (decoders, U-Nets, GAN generators): ``CSQConvTranspose2d``
through convert, capture (one qconv2d of its stacked phases, no stuffed zeros; dilated: the
stride-one qconv2d over the zero-stuffed input) and every runtime, exactly."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import csqc
from csqc import ops
from csqc.errors import BadInput
from csqc.layers import CSQConvTranspose1d, CSQConvTranspose2d
from csqc.models.generative import Vocoder, dcgan_generator

FORMS = [
    dict(kernel_size=4, stride=2, padding=1),  # a DCGAN generator's
    dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding=2),  # padding beyond d * (k - 1): the output is cropped
    dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), dilation=2, output_padding=(1, 2), bias=False),
]


def _twin(conv: nn.ConvTranspose2d, weight: torch.Tensor) -> nn.ConvTranspose2d:
    twin = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.output_padding, conv.groups, conv.bias is not None, conv.dilation)
    twin.weight.data.copy_(weight)
    if conv.bias is not None:
        twin.bias.data.copy_(conv.bias)
    return twin


@pytest.mark.parametrize("form", FORMS)
def test_a_converted_transposed_conv_computes_what_torch_computes_on_its_weight(form):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, **form).eval()
    model = csqc.convert(nn.Sequential(conv), n_bits=5, act_bits=None)
    layer = model[0]
    assert isinstance(layer, CSQConvTranspose2d) and layer.weight.shape == conv.weight.shape
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        np.testing.assert_allclose(layer(x), _twin(conv, layer.weight)(x), rtol=1e-5, atol=1e-5)
        finalized = csqc.finalize(model)[0]
        np.testing.assert_allclose(finalized(x), _twin(conv, finalized.weight)(x), rtol=1e-5, atol=1e-5)


def test_the_stored_weight_is_the_stride_one_convolutions():
    w = torch.randn(4, 3, 3, 2)  # [C_in, C_out / g, kh, kw], groups 2: C_out 6
    conv = ops.convolution_weight(w, 2)
    assert conv.shape == (6, 2, 3, 2) and torch.equal(ops.transposed_weight(conv, 2), w)
    x = torch.randn(1, 4, 5, 5)
    direct = nn.functional.conv_transpose2d(x, w, groups=2)
    as_conv = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 2, 2)), conv, groups=2)  # full padding d(k - 1)
    torch.testing.assert_close(direct, as_conv)


@settings(max_examples=60, deadline=None)
@given(st.tuples(st.integers(1, 6), st.integers(1, 6)), st.tuples(st.integers(1, 4), st.integers(1, 4)),
       st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3)),
       st.sampled_from([1, 2]), st.integers(0, 2**16))
def test_the_polyphase_form_is_the_transposed_convolution(kernel, stride, padding, extra, groups, seed):
    """One stride-one conv of :func:`ops.polyphase_weight` at capture's padding, its phases
    interleaved and cropped where capture crops: ``conv_transpose2d`` itself (float64)."""
    from csqc.capture.transposed import _phase_plan

    extra = tuple(e % s for e, s in zip(extra, stride))  # output_padding < stride
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 6 // groups, *kernel, generator=gen, dtype=torch.float64)  # [C_in, C_out/g, kh, kw]
    x = torch.randn(2, 4, 3, 4, generator=gen, dtype=torch.float64)
    try:
        want = nn.functional.conv_transpose2d(x, w, None, stride, padding, extra, groups)
    except RuntimeError:  # padding that leaves no output
        return
    pads, starts = _phase_plan(kernel, stride, padding, extra)
    phases = ops.polyphase_weight(ops.convolution_weight(w, groups), stride)
    assert phases.shape == (6 * stride[0] * stride[1], 4 // groups, -(-kernel[0] // stride[0]),
                            -(-kernel[1] // stride[1]))
    z = nn.functional.conv2d(x, phases, None, 1, pads, 1, groups)
    n, _, qh, qw = z.shape
    y = (z.reshape(n, 6, stride[0], stride[1], qh, qw).permute(0, 1, 4, 2, 5, 3)
         .reshape(n, 6, qh * stride[0], qw * stride[1]))
    h, w_out = want.shape[2:]
    torch.testing.assert_close(y[:, :, starts[0]:starts[0] + h, starts[1]:starts[1] + w_out], want)


def test_a_strided_layer_compiles_without_the_stuffed_zeros(tmp_path):
    # a DCGAN block: 4x4 kernel, stride 2: four phases of 2x2 taps, one quarter of the stuffed
    # form's products; its quantizer reads the input PyTorch's does
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1))
    x = torch.randn(1, 3, 6, 5)
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4, example_inputs=(x,)))
    csqc.save(model, tmp_path / "up.pt", example_inputs=(x,))
    graph = csqc.capture(csqc.load(tmp_path / "up.pt"))
    up = graph.node("2")
    assert up.op == "qconv2d" and up.attr("weight_shape") == (16, 8, 2, 2) and up.attr("padding") == (1, 1)
    assert up.attr("form") == "conv_transpose2d 8x4x4x4 stride 2x2"  # what inspect shows
    assert graph.type_of(up.inputs[0]).shape == (1, 8, 6, 5)
    assert graph.type_of(graph.outputs[0]).shape == (1, 4, 12, 10)


def test_inspect_counts_the_models_weights_not_the_phases_zero_taps(tmp_path):
    # 3x3 at stride 2: four phases of 2x2 taps store 16 weights per channel pair, 7 of them zeros
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3, 2, 1, 1))
    x = torch.randn(1, 3, 5, 5)
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4, example_inputs=(x,)))
    csqc.save(model, tmp_path / "up.pt", example_inputs=(x,))
    graph = csqc.capture(csqc.load(tmp_path / "up.pt"))
    assert graph.node("2").attr("weight_shape") == (16, 8, 2, 2) and graph.node("2").attr("form_weights") == 288
    row = next(r for r in csqc.inspect(csqc.load(tmp_path / "up.pt")).layers if r.name == "2")
    assert row.params == 8 * 4 * 3 * 3 and row.weight_bytes_fp32 == 4 * 288
    assert row.form == "conv_transpose2d 8x4x3x3 stride 2x2"


def test_bad_forms_are_refused_by_name():
    with pytest.raises(BadInput, match="output_padding"):
        CSQConvTranspose2d(2, 2, 3, stride=2, output_padding=2)
    with pytest.raises(BadInput, match="transposed convolution of weight shape"):
        CSQConvTranspose2d(2, 4, 3, weight=torch.randn(4, 2, 3, 3))


class Generator(nn.Module):
    """A small image decoder: a conv, then transposed convs of every form above, with BatchNorm,
    ReLU, tanh and SiLU between them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.Tanh(),
            nn.ConvTranspose2d(6, 4, 1, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(4, 4, 3, padding=2), nn.SiLU(),
            nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, dilation=2, output_padding=1))

    def forward(self, x):
        return self.body(x)


def _generator(symmetric: bool, tmp_path):
    torch.manual_seed(1)
    net = Generator().eval()
    with torch.no_grad():
        bn = net.body[3]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 6)
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=5, act_symmetric=symmetric, example_inputs=(x,)))
    assert sum(isinstance(m, CSQConvTranspose2d) for m in model.modules()) == 5
    path = tmp_path / "generator.pt"
    csqc.save(model, path, example_inputs=(x,))
    return csqc.load(path)


def test_a_generators_transposed_convs_are_quantized_layers_reading_codes(tmp_path):
    graph = csqc.optimize(_generator(True, tmp_path))
    layers = graph.quant_layers()
    assert len(layers) == 6 and all(n.op == "qconv2d" for n in layers)
    assert all(n.quant.act_bits == 5 for n in layers[1:])  # each reads its quantizer's codes
    assert "batch_norm" not in {n.op for n in graph.nodes}


@pytest.mark.parametrize("symmetric, calibrated", [(True, False), (False, False), (True, True)])
def test_it_verifies_exactly_on_llvm_and_onnx_runtime(tmp_path, symmetric, calibrated):
    model = _generator(symmetric, tmp_path)
    inputs = np.random.default_rng(2).standard_normal((8, 3, 5, 6)).astype(np.float32)
    calibrate = inputs if calibrated else None
    artifact = csqc.compile(model, "llvm", tmp_path / "g.so", calibrate=calibrate).output
    report = csqc.verify(model, inputs=[inputs], artifact=str(artifact), per_layer=True, calibrate=calibrate)
    assert report.ok and report.accumulators_exact, report
    onnx = csqc.compile(model, "onnx", tmp_path / "g.onnx", calibrate=calibrate).output
    assert csqc.verify(model, inputs=[inputs], artifact=str(onnx), calibrate=calibrate).ok


# -- 1-D: vocoders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [dict(kernel_size=16, stride=8, padding=4), dict(kernel_size=3, output_padding=1,
                                                                                stride=2, groups=2, dilation=2)])
def test_a_converted_1d_transposed_conv_computes_what_torch_computes(form):
    torch.manual_seed(0)
    conv = nn.ConvTranspose1d(4, 6, **form).eval()
    layer = csqc.convert(nn.Sequential(conv), n_bits=5, act_bits=None)[0]
    assert isinstance(layer, CSQConvTranspose1d) and layer.weight.shape == conv.weight.shape
    twin = nn.ConvTranspose1d(4, 6, **form)
    x = torch.randn(2, 4, 9)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(conv.bias)
        np.testing.assert_allclose(layer(x), twin(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x[0]), layer(x[:1])[0])  # an unbatched [C, L] input


def test_a_vocoder_verifies_exactly_on_llvm_and_onnx_runtime(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6)
    vocoder = Vocoder(mels=8, width=16, rates=(4, 2), kernels=(8, 4)).eval()
    model = csqc.finalize(csqc.convert(vocoder, n_bits=4, act_bits=8, example_inputs=(x,)))
    assert sum(isinstance(m, CSQConvTranspose1d) for m in model.modules()) == 2
    csqc.save(model, tmp_path / "vocoder.pt", example_inputs=(x,))
    model = csqc.load(tmp_path / "vocoder.pt")
    inputs = np.random.default_rng(4).standard_normal((4, 8, 6)).astype(np.float32)
    forms = {r.name: r.form for r in csqc.inspect(model).layers}  # as written, not as compiled
    assert forms["ups.0"] == "conv_transpose1d 16x8x8 stride 4" and forms["pre"] == "conv1d 16x8x7"
    artifact = csqc.compile(model, "llvm", tmp_path / "v.so").output
    report = csqc.verify(model, inputs=[inputs], artifact=str(artifact), per_layer=True)
    assert report.ok and report.accumulators_exact, report
    assert csqc.verify(model, inputs=[inputs], artifact=str(csqc.compile(model, "onnx", tmp_path / "v.onnx").output)).ok


def test_a_dcgan_generator_verifies_exactly_with_its_batch_norms_folded(tmp_path):
    # its first layer reads a 1x1 latent (a linear layer); the others' BatchNorms and ReLUs move
    # above the phases' interleave into the layer
    torch.manual_seed(5)
    net = dcgan_generator(latent=16, width=4).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 16, 1, 1)
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4, example_inputs=(x,)))
    csqc.save(model, tmp_path / "dcgan.pt", example_inputs=(x,))
    model = csqc.load(tmp_path / "dcgan.pt")
    graph = csqc.optimize(model)
    assert "batch_norm" not in {n.op for n in graph.nodes} and graph.node("0").op == "qlinear"
    assert [n.attr("act") for n in graph.quant_layers()][:4] == ["relu"] * 4
    inputs = np.random.default_rng(6).standard_normal((3, 16, 1, 1)).astype(np.float32)
    for calibrate in (None, inputs):
        artifact = csqc.compile(model, "llvm", tmp_path / "g.so", calibrate=calibrate).output
        report = csqc.verify(model, inputs=[inputs], artifact=str(artifact), per_layer=True, calibrate=calibrate)
        assert report.ok and report.accumulators_exact, report
    assert csqc.verify(model, inputs=[inputs], artifact=str(csqc.compile(model, "onnx", tmp_path / "g.onnx").output)).ok
