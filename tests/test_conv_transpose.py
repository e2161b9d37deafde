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
from csqc.layers import CSQConvTranspose2d

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
