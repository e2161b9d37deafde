"""Quantized 1-D convolutions (keyword spotting, time series): ``CSQConv1d`` through convert,
training, capture, the passes and every runtime, exactly."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import csqc
from csqc.data import Split
from csqc.errors import BadInput
from csqc.layers import CSQConv1d

CONV1D_FORMS = [
    dict(kernel_size=5, padding=2),
    dict(kernel_size=3, stride=2, padding=1, groups=4),
    dict(kernel_size=3, dilation=2, padding="same", padding_mode="reflect"),
    dict(kernel_size=4, padding=3, padding_mode="circular", bias=False),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("form", CONV1D_FORMS)
def test_a_converted_conv1d_computes_what_nn_conv1d_computes_on_its_weight(form):
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, **form).eval()
    model = csqc.convert(nn.Sequential(conv), n_bits=4, act_bits=None)
    layer = model[0]
    assert isinstance(layer, CSQConv1d) and layer.weight.shape == conv.weight.shape
    x = torch.randn(3, 8, 17)
    with torch.no_grad():
        want = nn.Conv1d.forward(_with_weight(conv, layer.weight), x)
        np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
        finalized = csqc.finalize(model)[0]
        np.testing.assert_allclose(finalized(x), nn.Conv1d.forward(_with_weight(conv, finalized.weight), x),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(finalized(x[0]), finalized(x[:1])[0])  # an unbatched [C, L] input


def _with_weight(conv: nn.Conv1d, weight: torch.Tensor) -> nn.Conv1d:
    twin = nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode)
    twin.weight.data.copy_(weight)
    if conv.bias is not None:
        twin.bias.data.copy_(conv.bias)
    return twin


@pytest.mark.parametrize("float_layer", [
    nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2),
    nn.ConvTranspose1d(4, 8, 3, stride=2, padding=1, output_padding=1),
])
def test_converted_1d_layers_keep_torchs_1d_attributes(float_layer):
    """Code around a layer reads them (Whisper's encoder checks its input length by ``conv.stride[0]``):
    the 2-D forms the layer runs on must not show."""
    layer = csqc.convert(nn.Sequential(float_layer), n_bits=4, act_bits=None)[0]
    names = ["kernel_size", "stride", "padding", "dilation"]
    for name in names + (["output_padding"] if isinstance(float_layer, nn.ConvTranspose1d) else []):
        assert getattr(layer, name) == getattr(float_layer, name), name
    x = torch.randn(2, 4, 9)
    assert layer(x).shape == float_layer(x).shape


def test_conversion_reports_no_conv1d_left_float():
    model = csqc.convert(nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)), n_bits=3,
                         act_bits=4, example_inputs=(torch.randn(1, 2, 8),))
    report = csqc.conversion_report(model)
    assert not report.left_float and ("0", "Conv1d", "CSQConv1d") in report.converted


def test_bad_shapes_are_refused_by_name():
    layer = CSQConv1d(2, 4, 3, n_bits=3)
    with pytest.raises(BadInput, match=r"\[N, C, L\] or \[C, L\]"):
        layer(torch.randn(1, 2, 1, 8))
    with pytest.raises(BadInput, match="1-D convolution"):
        CSQConv1d(2, 4, 3, n_bits=3, weight=torch.randn(4, 2, 1, 3))
    with pytest.raises(BadInput, match="numeric padding"):
        CSQConv1d(2, 4, 3, padding="same")


class KeywordSpotter(nn.Module):
    """A small keyword-spotting network: 1-D convs over feature frames, depthwise-separable
    blocks, a residual block, pools, a global average pool and a classifier."""

    def __init__(self, features: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(features, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU())
        self.separable = nn.Sequential(nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm1d(16),
                                       nn.ReLU(), nn.Conv1d(16, 24, 1), nn.BatchNorm1d(24), nn.ReLU6())
        self.residual = nn.Sequential(nn.Conv1d(24, 24, 3, dilation=2, padding="same", padding_mode="reflect"),
                                      nn.BatchNorm1d(24))
        self.head = nn.Sequential(nn.MaxPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(24, classes))

    def forward(self, x):
        y = self.separable(self.stem(x))
        return self.head(F.relu(self.residual(y) + y))


def _tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a tone of frequency k + 1 across 8 noisy feature channels of 32 frames."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    t = np.arange(32, dtype=np.float32) / 32
    phase = rng.uniform(0, 2 * np.pi, (n, 8, 1))
    x = np.sin(2 * np.pi * (labels[:, None, None] + 1) * t + phase) + 0.3 * rng.standard_normal((n, 8, 32))
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained_spotter(tmp_path_factory):
    """A keyword spotter trained to 3 bits on the tone task, saved as a model file."""
    torch.manual_seed(0)
    data = Split(*_tones(768, 0), *_tones(256, 1))
    net = KeywordSpotter()
    csqc.train_float(net, data, epochs=4, lr=1e-2)
    model = csqc.convert(net, n_bits=4, act_bits=4, example_inputs=(torch.from_numpy(data.x_test[:2]),))
    accuracy, _ = csqc.train_csq(model, data, epochs=4, target_bits=3.0)
    path = tmp_path_factory.mktemp("kws") / "kws.pt"
    csqc.save(model, path, example_inputs=(torch.from_numpy(data.x_test[:2]),))
    return path, (accuracy, csqc.layers.average_bits(model)), data


def test_a_keyword_spotter_trains_under_the_bit_budget(trained_spotter):
    _, (accuracy, bits), _ = trained_spotter
    assert accuracy > 0.6  # four classes: chance is 0.25
    assert bits <= 3.0 + 1e-6


def test_its_layers_meet_without_reshapes_and_with_batch_norms_folded(trained_spotter):
    graph = csqc.optimize(csqc.load(trained_spotter[0]))
    ops = [n.op for n in graph.nodes]
    assert "batch_norm" not in ops
    producers = graph.producers()
    convs = [n for n in graph.quant_layers() if n.op == "qconv2d"]
    assert len(convs) == 4
    for layer in convs[1:]:  # each conv's quantizer reads the previous layer's output, no reshape
        source = producers.get(graph.node(layer.inputs[0]).inputs[0]) if layer.inputs[0] in producers else None
        assert source is None or source.op != "reshape", layer.name


@pytest.mark.parametrize("calibrated", [False, True])
def test_it_verifies_exactly_on_llvm_and_onnx_runtime(trained_spotter, tmp_path, calibrated):
    path, _, data = trained_spotter
    model = csqc.load(path)
    calibrate = data.x_train[:64] if calibrated else None
    artifact = csqc.compile(model, "llvm", tmp_path / "kws.so", calibrate=calibrate).output
    report = csqc.verify(model, inputs=[data.x_test[:16]], artifact=str(artifact), per_layer=True,
                         calibrate=calibrate)
    assert report.ok and report.accumulators_exact, report
    onnx = csqc.compile(model, "onnx", tmp_path / "kws.onnx", calibrate=calibrate).output
    assert csqc.verify(model, inputs=[data.x_test[:16]], artifact=str(onnx), calibrate=calibrate).ok


class _RawAudioEncoder(nn.Module):
    """Wav2Vec2's feature encoder in small: strided convs over a raw signal of thousands of samples,
    whose staged rows (hundreds of columns, read at stride 2) are copied in runs of vectors."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv1d(1, 16, 10, stride=5, bias=False)
        self.c1 = nn.Conv1d(16, 16, 3, stride=2, padding=1, bias=False)
        self.c2 = nn.Conv1d(16, 12, 3, stride=2, bias=False)

    def forward(self, x):
        return F.gelu(self.c2(F.gelu(self.c1(F.gelu(self.c0(x))))))


def test_strided_convs_over_a_long_signal_verify_exactly(tmp_path):
    torch.manual_seed(3)
    x = torch.rand(1, 1, 3001) * 2 - 1  # staged rows of 300 and 150 columns: whole runs and an overlapping last one
    model = csqc.finalize(csqc.convert(_RawAudioEncoder().eval(), n_bits=3, act_bits=4, example_inputs=(x,)))
    path = csqc.save(model, tmp_path / "encoder.pt", x)
    artifact = csqc.compile(csqc.load(path), "llvm", tmp_path / "encoder.so").output
    report = csqc.verify(csqc.load(path), samples=3, artifact=str(artifact), per_layer=True)
    assert report.ok and report.accumulators_exact
