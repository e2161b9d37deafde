"""Quantized transposed convolutions (decoders, U-Nets, GAN generators): ``CSQConvTranspose2d``
through convert, capture (the stride-one qconv2d over the zero-stuffed input) and every runtime,
exactly."""
import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import ops
from csqc.errors import BadInput
from csqc.layers import CSQConvTranspose1d, CSQConvTranspose2d

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


class Vocoder(nn.Module):
    """A HiFi-GAN-style generator: mel frames up to samples by 1-D transposed convs, each followed
    by a residual block of dilated 1-D convs with leaky ReLUs; tanh out."""

    def __init__(self, mels: int = 8, width: int = 16):
        super().__init__()
        self.pre = nn.Conv1d(mels, width, 7, padding=3)
        self.ups = nn.ModuleList([nn.ConvTranspose1d(width, width // 2, 8, 4, padding=2),
                                  nn.ConvTranspose1d(width // 2, width // 4, 4, 2, padding=1)])
        self.res = nn.ModuleList([nn.ModuleList(nn.Conv1d(c, c, 3, dilation=d, padding=d) for d in (1, 3))
                                  for c in (width // 2, width // 4)])
        self.post = nn.Conv1d(width // 4, 1, 7, padding=3)

    def forward(self, x):
        x = self.pre(x)
        for up, block in zip(self.ups, self.res):
            x = up(nn.functional.leaky_relu(x, 0.1))
            for conv in block:
                x = x + conv(nn.functional.leaky_relu(x, 0.1))
        return torch.tanh(self.post(nn.functional.leaky_relu(x)))


def test_a_vocoder_verifies_exactly_on_llvm_and_onnx_runtime(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6)
    model = csqc.finalize(csqc.convert(Vocoder().eval(), n_bits=4, act_bits=8, example_inputs=(x,)))
    assert sum(isinstance(m, CSQConvTranspose1d) for m in model.modules()) == 2
    csqc.save(model, tmp_path / "vocoder.pt", example_inputs=(x,))
    model = csqc.load(tmp_path / "vocoder.pt")
    inputs = np.random.default_rng(4).standard_normal((4, 8, 6)).astype(np.float32)
    artifact = csqc.compile(model, "llvm", tmp_path / "v.so").output
    report = csqc.verify(model, inputs=[inputs], artifact=str(artifact), per_layer=True)
    assert report.ok and report.accumulators_exact, report
    assert csqc.verify(model, inputs=[inputs], artifact=str(csqc.compile(model, "onnx", tmp_path / "v.onnx").output)).ok
