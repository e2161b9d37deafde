"""Capture: every supported op, captured from a saved model and run by the interpreter, matches PyTorch."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import csqc
from csqc.capture import capture
from csqc.errors import UnsupportedOps
from csqc.layers import PACT, ActQuant, CSQConv2d, CSQLinear
from irbuild import run


def _captured(module: nn.Module, shape, tmp_path, batch=None):
    torch.manual_seed(0)
    path = csqc.save(module.eval(), tmp_path / "m.pt", torch.randn(*shape))
    return capture(csqc.load(path), batch=batch)


def _compare(module, g, x, rtol=1e-5):
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max())))


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _masked(x):
    mask = x.new_zeros((4, 4))
    mask[1:3, :] = 2.0  # slice + fill_ on a constant: folded at capture
    mask[:, 3:].fill_(-1.0)
    mask[2:, :1].zero_()  # (torchvision's SwinV2 zeroes a slice of its qkv bias's copy)
    return x + mask


class TwoBranch(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.a(x), self.b(x))


def _csq(layer, n_bits=5):
    torch.manual_seed(1)
    return csqc.finalize(csqc.convert(nn.Sequential(layer), n_bits=n_bits))


def _quantized_pair(act_bits=4):
    """Quantized input -> CSQ conv -> ReLU -> float conv. The quantized value is the model input, so
    PyTorch and the interpreter quantize the same floats (no rounding-boundary flips)."""
    torch.manual_seed(2)
    model = csqc.convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()), n_bits=6, act_bits=act_bits,
                         quantize_first_input=True)
    return nn.Sequential(csqc.finalize(model), nn.Conv2d(6, 3, 1))


# (id, module factory, input shape, IR ops the capture must contain)
CASES = [
    ("conv-stride-padding", lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 9), {"conv2d"}),
    ("conv-dilation", lambda: nn.Conv2d(3, 4, 3, dilation=2, padding=2, bias=False), (1, 3, 8, 8), {"conv2d"}),
    ("conv-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), (1, 4, 6, 6), {"conv2d"}),
    ("conv-depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (1, 4, 6, 6), {"conv2d"}),
    ("csq-conv-stride-dilation", lambda: _csq(nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2)), (1, 3, 9, 9), {"qconv2d"}),
    ("csq-conv-depthwise", lambda: _csq(nn.Conv2d(4, 4, 3, groups=4, padding=1)), (1, 4, 6, 6), {"qconv2d"}),
    ("csq-conv-groups", lambda: _csq(nn.Conv2d(4, 6, 1, groups=2, bias=False)), (2, 4, 5, 5), {"qconv2d"}),
    ("linear", lambda: nn.Linear(7, 3), (2, 7), {"linear"}),
    ("csq-linear", lambda: _csq(nn.Linear(7, 3), n_bits=8), (2, 7), {"qlinear"}),
    ("csq-linear-3d", lambda: _csq(nn.Linear(7, 3, bias=False)), (2, 4, 7), {"qlinear"}),
    ("batch_norm-eval", lambda: nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), _bn(4)), (2, 3, 5, 5), {"batch_norm"}),
    ("relu", lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (3, 4), {"relu"}),
    ("relu6", lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU6()), (3, 4), {"clip"}),
    ("hardtanh", lambda: nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(-0.5, 0.75)), (3, 4), {"clip"}),
    ("clamp", lambda: Lambda(lambda x: torch.clamp(x, min=-0.2, max=0.3)), (3, 4), {"clip"}),
    ("clamp-min", lambda: Lambda(lambda x: torch.clamp(x, min=0.1)), (3, 4), {"clip"}),
    ("pact", lambda: nn.Sequential(nn.Linear(4, 4), PACT(0.4)), (3, 4), {"clip", "minimum"}),
    ("act-quant-signed", lambda: ActQuant(3), (2, 6), {"quantize", "dequantize"}),
    ("act-quant-relu6", lambda: ActQuant(4, clip="relu6"), (2, 6), {"quantize", "clip"}),
    ("act-quant-pact", lambda: ActQuant(2, clip="pact", pact_alpha=0.8), (2, 6), {"quantize", "minimum"}),
    ("quantized-layers", _quantized_pair, (1, 4, 5, 5), {"qconv2d", "quantize", "relu"}),
    ("add", lambda: TwoBranch(torch.add), (1, 4, 5, 5), {"add"}),
    ("mul", lambda: TwoBranch(torch.mul), (1, 4, 5, 5), {"mul"}),
    ("cat", lambda: TwoBranch(lambda a, b: torch.cat([a, b], dim=1)), (1, 4, 5, 5), {"cat"}),
    ("add-scalar", lambda: Lambda(lambda x: x * 0.5 + 1.0), (2, 3), {"add", "mul"}),
    ("max_pool", lambda: nn.MaxPool2d(3, stride=2, padding=1), (1, 2, 7, 7), {"max_pool2d"}),
    ("max_pool-dilation", lambda: nn.MaxPool2d(2, dilation=2), (1, 2, 7, 7), {"max_pool2d"}),
    ("avg_pool", lambda: nn.AvgPool2d(2), (1, 2, 6, 6), {"avg_pool2d"}),
    ("avg_pool-padding-exclude", lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 2, 7, 7), {"avg_pool2d"}),
    ("adaptive_avg_pool", lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 4, 4), {"adaptive_avg_pool2d"}),
    ("adaptive_avg_pool-2x2", lambda: nn.AdaptiveAvgPool2d((2, 2)), (1, 3, 4, 6), {"adaptive_avg_pool2d"}),
    ("max_pool-ceil_mode", lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True), (1, 2, 8, 8), {"max_pool2d"}),
    ("avg_pool-ceil_mode", lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 2, 8, 8), {"avg_pool2d"}),
    ("adaptive_avg_pool-uneven", lambda: nn.AdaptiveAvgPool2d((3, 2)), (1, 3, 7, 5), {"adaptive_avg_pool2d"}),
    ("hardswish", lambda: nn.Sequential(nn.Hardswish(), nn.Hardswish(inplace=True)), (3, 9), {"hardswish"}),
    ("hardsigmoid", lambda: nn.Sequential(nn.Hardsigmoid(), nn.Hardsigmoid(inplace=True)), (3, 9), {"hardsigmoid"}),
    ("silu", lambda: nn.Sequential(nn.SiLU(), nn.SiLU(inplace=True)), (3, 9), {"silu"}),
    ("mean", lambda: Lambda(lambda x: x.mean((2, 3))), (2, 3, 4, 4), {"mean"}),
    ("flatten", lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(48, 2)), (2, 2, 4, 4), {"reshape"}),
    ("view-reshape", lambda: Lambda(lambda x: x.view(x.shape[0], 4, 6).reshape(x.shape[0], 24)), (2, 2, 3, 4), {"reshape"}),
    ("permute", lambda: Lambda(lambda x: x.permute(0, 2, 3, 1)), (1, 2, 3, 4), {"permute"}),
    ("transpose", lambda: Lambda(lambda x: x.transpose(1, 2)), (1, 2, 3, 4), {"permute"}),
    ("swapaxes", lambda: Lambda(lambda x: x.swapaxes(1, 3).swapdims(0, 2)), (1, 2, 3, 4), {"permute"}),
    # einsum: permute / reshape / matmul (attention scores and values, torchvision's MaxViT spelling)
    ("einsum-scores", lambda: Lambda(lambda x: torch.einsum("bhid,bhjd->bhij", x, x + 1.0)), (2, 2, 3, 4),
     {"matmul", "permute", "reshape"}),
    ("einsum-spaced", lambda: Lambda(lambda x: torch.einsum("B G I D, B G D J -> B G I J", x, x.transpose(2, 3))),
     (1, 2, 3, 4), {"matmul"}),
    ("einsum-output-order", lambda: Lambda(lambda x: torch.einsum("bij,bkj->kbi", x, x * 2.0)), (2, 3, 4),
     {"matmul", "permute"}),
    ("einsum-implicit-output", lambda: Lambda(lambda x: torch.einsum("ij,kj", x, x - 0.5)), (3, 4), {"matmul"}),
    ("einsum-permutation", lambda: Lambda(lambda x: torch.einsum("abcd->dcab", x)), (1, 2, 3, 4), {"permute"}),
    ("einsum-ellipsis", lambda: Lambda(lambda x: torch.einsum("...ij,...kj->...ik", x, x + 1.0)), (2, 2, 3, 4),
     {"matmul"}),
    ("einsum-ellipsis-implicit", lambda: Lambda(lambda x: torch.einsum("i...,j...", x[0], x[1] * 2.0)), (2, 3, 4),
     {"matmul"}),  # the ellipsis leads the implicit output: "i...,j...->...ij"
    ("einsum-ellipsis-middle", lambda: Lambda(lambda x: torch.einsum("b...d,bd->b...", x, x[:, 0, 0] - 0.5)),
     (2, 3, 4, 5), {"matmul"}),
    ("einsum-ellipsis-one-side", lambda: Lambda(lambda x: torch.einsum("...ij,jk->...ik", x, x[0, 0].t() * 2.0)),
     (2, 3, 4, 4), {"matmul"}),
    # Swin's shifted windows: roll, pad to a multiple of the window, a mask filled in place (constants)
    ("roll", lambda: Lambda(lambda x: torch.roll(x, shifts=(-3, 2), dims=(2, 3))), (1, 4, 5, 6), {"slice", "cat"}),
    ("roll-flattened", lambda: Lambda(lambda x: torch.roll(x, 7)), (2, 3, 5), {"reshape", "slice", "cat"}),
    ("pad-constant", lambda: Lambda(lambda x: F.pad(x, (1, 2, 0, 3), value=0.5)), (1, 2, 3, 4), {"cat", "expand"}),
    ("constant-mask-filled-in-place", lambda: Lambda(_masked), (1, 2, 4, 4), {"add"}),
    ("strided-slices", lambda: Lambda(lambda x: torch.cat([x[:, 0::2, 1::2], x[:, 1::3, 0:5:2]], 1)), (2, 7, 6),
     {"slice", "reshape", "cat"}),
    ("softmax", lambda: nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=-1)), (3, 5), {"softmax"}),
    # layers composed of IR ops: normalization over groups, leaky units, shuffles, 1-D layers...
    ("group-norm", lambda: nn.GroupNorm(2, 6), (2, 6, 3, 4), {"layer_norm", "mul", "add"}),
    ("group-norm-plain", lambda: nn.GroupNorm(3, 6, affine=False), (2, 6, 5), {"layer_norm"}),
    ("instance-norm", lambda: nn.InstanceNorm2d(4, affine=True), (2, 4, 5, 5), {"layer_norm", "mul", "add"}),
    ("instance-norm-plain", lambda: nn.InstanceNorm2d(4), (2, 4, 5, 5), {"layer_norm"}),
    ("leaky-relu", lambda: nn.LeakyReLU(0.2), (2, 3, 4), {"relu", "minimum", "mul", "add"}),
    ("leaky-relu-steep", lambda: Lambda(lambda x: F.leaky_relu(x, 3.0)), (2, 3, 4), {"add"}),
    ("prelu-per-channel", lambda: nn.PReLU(3, init=0.3), (2, 3, 4, 4), {"add"}),
    ("prelu-shared", lambda: nn.PReLU(), (2, 3, 4), {"add"}),
    ("pixel-shuffle", lambda: nn.PixelShuffle(2), (2, 8, 3, 5), {"permute"}),
    ("pixel-unshuffle", lambda: nn.PixelUnshuffle(3), (1, 2, 6, 9), {"permute"}),
    ("repeat-interleave", lambda: Lambda(lambda x: x.repeat_interleave(3, dim=1)), (2, 3, 4), {"expand"}),
    ("tile", lambda: Lambda(lambda x: x.tile((2, 1))), (2, 3, 4), {"expand"}),
    ("narrow", lambda: Lambda(lambda x: x.narrow(2, -3, 2)), (2, 3, 5), {"slice"}),
    ("neg-square", lambda: Lambda(lambda x: torch.square(-x) + x), (2, 3), {"mul"}),
    ("dropout2d-eval", lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.Dropout2d(0.5)), (2, 2, 3, 3), {"conv2d"}),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 11), {"conv2d"}),
    ("pool1d", lambda: nn.Sequential(nn.MaxPool1d(3, 2, padding=1), nn.AvgPool1d(2, ceil_mode=True)), (2, 3, 10),
     {"max_pool2d", "avg_pool2d"}),
    ("adaptive-max-pool", lambda: nn.Sequential(nn.AdaptiveMaxPool2d((2, 3)), nn.AdaptiveMaxPool2d(1)),
     (2, 3, 4, 6), {"max_pool2d"}),
    ("sum", lambda: Lambda(lambda x: x.sum(dim=(2, 3)) + x.sum(-1, keepdim=True).mean(dim=(2, 3))), (2, 3, 4, 6),
     {"mean", "mul"}),
    # gathers at constant positions: runs of consecutive positions as slices
    ("index-channels", lambda: Lambda(lambda x: x[:, [2, 1, 0]] * 2.0), (2, 3, 4, 4), {"slice", "cat"}),
    ("index-select", lambda: Lambda(lambda x: x.index_select(1, torch.tensor([3, 1, 0, 7, 6]))), (2, 8, 3),
     {"slice", "cat"}),
    ("index-last-axis", lambda: Lambda(lambda x: x[..., [-1, 0, 1]]), (2, 3, 5), {"cat"}),
    ("flip", lambda: Lambda(lambda x: torch.flip(x, [1, 2])), (2, 8, 3), {"slice", "cat"}),
    # transposed convs: one conv of the stacked phases, interleaved and cropped (dilated: zeros
    # between the inputs, padding, a conv of the flipped weights)
    ("conv-transpose", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5),
     {"conv2d", "permute", "slice"}),
    ("conv-transpose-dilated", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, dilation=2), (2, 4, 5, 5),
     {"conv2d", "cat", "expand"}),
    ("conv-transpose-past-the-phases", lambda: nn.ConvTranspose2d(3, 2, 2, stride=2, output_padding=1), (1, 3, 4, 3),
     {"conv2d", "permute", "slice"}),
    ("conv-transpose-groups", lambda: nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2, bias=False), (1, 4, 5, 6),
     {"conv2d"}),
    ("conv-transpose-cropped", lambda: nn.ConvTranspose2d(4, 2, 3, 3, 2, dilation=2), (1, 4, 4, 5), {"slice"}),
    ("conv-transpose-uneven", lambda: nn.ConvTranspose2d(4, 4, (3, 5), (1, 2), (2, 0)), (1, 4, 6, 6), {"conv2d"}),
    ("conv-transpose-1d", lambda: nn.ConvTranspose1d(4, 6, 3, 2, 1, output_padding=1), (2, 4, 7), {"conv2d"}),
    ("dropout-eval", lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 2)), (3, 5), {"linear"}),
]


@pytest.mark.parametrize("factory, shape, ops", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_captured_op_matches_pytorch(factory, shape, ops, tmp_path):
    module = factory().eval()
    g = _captured(module, shape, tmp_path)
    assert ops <= {n.op for n in g.nodes}
    _compare(module, g, np.random.default_rng(0).standard_normal(shape).astype(np.float32))


def test_activation_codes_equal_pytorch_exactly(tmp_path):
    module = ActQuant(3).eval()
    g = _captured(module, (4, 9), tmp_path)
    x = np.random.default_rng(1).standard_normal((4, 9)).astype(np.float32)
    (out,), _ = run(g, [x])
    assert np.array_equal(out, module(torch.from_numpy(x)).numpy())


def test_dropout_leaves_no_node(tmp_path):
    g = _captured(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5)), (3, 5), tmp_path)
    assert [n.op for n in g.nodes] == ["linear"]


def test_quantized_layer_keeps_integer_weights_mask_and_scale(tmp_path):
    torch.manual_seed(0)
    model = csqc.convert(nn.Sequential(nn.Linear(6, 3)), n_bits=5)
    with torch.no_grad():
        model[0].mask_weight.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]))  # positions 4, 2, 0
    csqc.finalize(model)
    g = _captured(model, (1, 6), tmp_path)
    node = g.node("0")
    assert node.op == "qlinear" and node.quant.n_bits == 5 and node.quant.active_bits == (4, 2, 0)
    assert np.array_equal(g.params[node.inputs[1]], model[0].q.numpy())
    assert np.allclose(g.params[node.inputs[2]], float(model[0].scale) / 31)


def test_quantize_after_relu6_is_unsigned_and_before_is_signed(tmp_path):
    g = _captured(nn.Sequential(ActQuant(4), nn.Linear(3, 3), ActQuant(4, clip="relu6")), (2, 3), tmp_path)
    signs = [n.attr("signed") for n in g.nodes if n.op == "quantize"]
    assert signs == [True, False]


def test_quantize_after_pact_with_positive_alpha_is_unsigned(tmp_path):
    g = _captured(nn.Sequential(nn.Linear(3, 3), PACT(2.0), ActQuant(4)), (2, 3), tmp_path)
    assert [n.attr("signed") for n in g.nodes if n.op == "quantize"] == [False]


def test_minimum_with_a_negative_operand_quantizes_signed(tmp_path):
    """min(relu(x), c) is negative when c is: its quantization needs signed codes."""

    class MinNeg(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.tensor(-0.5))
            self.q = ActQuant(4)

        def forward(self, x):
            return self.q(torch.minimum(torch.relu(x), self.c))

    module = MinNeg().eval()
    g = _captured(module, (2, 3), tmp_path)
    assert [n.attr("signed") for n in g.nodes if n.op == "quantize"] == [True]
    _compare(module, g, np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32))


def test_clamp_with_a_negative_upper_bound_quantizes_signed(tmp_path):
    module = nn.Sequential(nn.ReLU(), Lambda(lambda x: torch.clamp(x, max=-0.25)), ActQuant(4)).eval()
    g = _captured(module, (2, 3), tmp_path)
    assert [n.attr("signed") for n in g.nodes if n.op == "quantize"] == [True]


def test_nodes_are_named_after_their_modules(tmp_path):
    g = _captured(nn.Sequential(nn.Conv2d(2, 3, 1), _bn(3), nn.ReLU()), (1, 2, 3, 3), tmp_path)
    assert [(n.name, n.op) for n in g.nodes] == [("0", "conv2d"), ("1", "batch_norm"), ("2", "relu")]
    assert "0.weight" in g.params


class _Atan(nn.Module):  # (exp, log and erf are IR ops now; sin, cos and cumsum fold on constants)
    def forward(self, x):
        return torch.atan(x)


class _Asinh(nn.Module):  # (expm1 and log1p compose of exp and log now)
    def forward(self, x):
        return torch.asinh(x)


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), _Atan())
        self.head = nn.Sequential(nn.Linear(4, 4), _Asinh())

    def forward(self, x):
        return self.head(self.encoder(x))


def test_unsupported_ops_are_all_listed_with_their_modules(tmp_path):
    with pytest.raises(UnsupportedOps) as e:
        _captured(_Unsupported(), (2, 4), tmp_path)
    found = dict((op, where) for op, where in e.value.unsupported)
    assert found == {"aten.atan.default": "encoder.1", "aten.asinh.default": "head.1"}
    message = str(e.value)
    assert "2 unsupported operator(s)" in message
    assert "aten.atan.default (at encoder.1)" in message and "aten.asinh.default (at head.1)" in message


@pytest.mark.parametrize("equation, shapes, why", [
    ("ii->i", [(3, 3)], "repeats a subscript"),
    ("ij,jk->i", [(3, 4), (4, 5)], "sums over one operand's own subscripts"),
    ("...ij,...jk->...ik", [(2, 3, 4), (3, 2, 4, 5)], "ellipsis over operands of different ranks"),
    ("bij,bjk->bik", [(2, 3, 4), (1, 4, 5)], "broadcast"),
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)], "of 3 operands (one or two are translated"),
])
def test_einsum_forms_it_does_not_translate_are_named(equation, shapes, why, tmp_path):
    class Einsum(nn.Module):
        def forward(self, x):  # (x[0]: the batch stays free for the model file's dynamic batch)
            return torch.einsum(equation, x[0], *[torch.ones(s) for s in shapes[1:]])

    with pytest.raises(UnsupportedOps) as e:
        _captured(Einsum(), (2, *shapes[0]), tmp_path)
    assert "aten.einsum.default" in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("pad", [
    nn.ReflectionPad2d((1, 2, 3, 0)),
    nn.ReplicationPad2d(2),
    nn.CircularPad2d((1, 3, 2, 0)),
    nn.ZeroPad2d((1, 0, 2, 1)),
    nn.ReflectionPad1d(2),
    Lambda(lambda x: F.pad(x, (-1, 2, 0, -2), value=0.5)),  # negative widths crop
    Lambda(lambda x: F.pad(x, (1, 1, 1, 1, 1, 0), mode="replicate")),  # three axes of a 4-D tensor
], ids=["reflect", "replicate", "circular", "zeros", "reflect-1d", "crop", "replicate-3-axes"])
def test_pad_modes_are_data_movement_matching_torch(pad, tmp_path):
    shape = (2, 3, 7) if isinstance(pad, nn.ReflectionPad1d) else (2, 3, 7, 6)
    g = _captured(pad, shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"slice", "cat", "expand"}
    _compare(pad, g, np.random.default_rng(0).standard_normal(shape).astype(np.float32), rtol=0)


@pytest.mark.parametrize("pad", [(-2, 1, 1, -1), (1, -2, 0, 2), (-1, 2, -2, 0)], ids=["a", "b", "c"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pads_with_negative_widths_crop_first_as_torch_does(pad, mode, tmp_path):
    module = Lambda(lambda x: F.pad(x, pad, mode=mode))
    g = _captured(module, (1, 2, 6, 5), tmp_path)
    _compare(module, g, np.random.default_rng(1).standard_normal((1, 2, 6, 5)).astype(np.float32), rtol=0)


@pytest.mark.parametrize("pad, why", [
    (lambda x: F.pad(x, (-3, -2)), "crops axis 2 to nothing"),
    (lambda x: x[:, [0, 1], [1, 0]], "advanced indexing on several axes"),
])
def test_pads_it_cannot_translate_are_named(pad, why, tmp_path):
    with pytest.raises(UnsupportedOps) as e:
        _captured(Lambda(pad), (1, 2, 5), tmp_path)
    assert why in str(e.value)


@pytest.mark.parametrize("up, shape", [
    (nn.Upsample(scale_factor=2), (2, 3, 5, 6)),
    (nn.Upsample(scale_factor=3, mode="nearest-exact"), (1, 2, 4, 3)),
    (Lambda(lambda x: F.interpolate(x, size=(10, 18))), (1, 3, 5, 6)),  # by size: factors 2 and 3
    (Lambda(lambda x: F.interpolate(x, scale_factor=(1, 4))), (1, 2, 3, 5)),
    (Lambda(lambda x: F.interpolate(x, scale_factor=3)), (2, 3, 7)),    # 1-D
    (Lambda(lambda x: F.interpolate(x, scale_factor=2)), (1, 2, 3, 4, 5)),  # 3-D
], ids=["2x", "3x-exact", "size", "rows-kept", "1d", "3d"])
def test_nearest_upsampling_by_whole_factors_repeats_exactly(up, shape, tmp_path):
    g = _captured(up, shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"reshape", "expand"}
    _compare(up, g, np.random.default_rng(2).standard_normal(shape).astype(np.float32), rtol=0)


@pytest.mark.parametrize("up, shape", [
    (nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 5, 6)),
    (Lambda(lambda x: F.interpolate(x, size=(32, 40), mode="bilinear")), (1, 2, 4, 5)),  # by size: 8x
    (Lambda(lambda x: F.interpolate(x, scale_factor=(3, 1), mode="bilinear")), (1, 2, 4, 7)),
    (Lambda(lambda x: F.interpolate(x, size=(6, 6), mode="bilinear")), (1, 4, 1, 1)),  # a pooled map spread
    (Lambda(lambda x: F.interpolate(x, scale_factor=4, mode="linear")), (1, 2, 9)),
    (Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="trilinear")), (1, 2, 3, 4, 5)),
], ids=["2x", "8x-size", "rows-3x", "from-1x1", "1d", "3d"])
def test_linear_upsampling_by_whole_factors_uses_torchs_weights(up, shape, tmp_path):
    g = _captured(up, shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"slice", "cat", "reshape", "mul", "add"}
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    # torch's kernel fuses one product into an FMA: a rounding apart at most, never more
    _compare(up, g, x, rtol=3e-7)


@pytest.mark.parametrize("up, shape", [
    (Lambda(lambda x: F.interpolate(x, size=(65, 33), mode="bilinear")), (1, 2, 33, 17)),  # LRASPP at 520
    (Lambda(lambda x: F.interpolate(x, size=(13, 26), mode="bilinear", align_corners=True)), (1, 2, 4, 13)),
    (Lambda(lambda x: F.interpolate(x, scale_factor=(0.6, 1.37), mode="bilinear")), (1, 3, 10, 7)),
    (Lambda(lambda x: F.interpolate(x, scale_factor=100, mode="linear")), (1, 2, 3)),  # past the phases' cat
    (Lambda(lambda x: F.interpolate(x, size=(5, 1, 9), mode="trilinear", align_corners=True)), (1, 2, 3, 4, 6)),
], ids=["lraspp-520", "aligned", "scales", "100x", "3d-aligned"])
def test_linear_resizing_to_any_size_uses_torchs_weights(up, shape, tmp_path):
    g = _captured(up, shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"slice", "cat", "reshape", "mul", "add", "take"}
    _compare(up, g, np.random.default_rng(4).standard_normal(shape).astype(np.float32), rtol=3e-7)


@pytest.mark.parametrize("up, shape", [
    (Lambda(lambda x: F.interpolate(x, scale_factor=1.5)), (1, 2, 4, 4)),
    (Lambda(lambda x: F.interpolate(x, size=(3, 20), mode="nearest-exact")), (1, 2, 7, 6)),
    (Lambda(lambda x: F.interpolate(x, scale_factor=(2.91, 1.11, 3.19))), (1, 2, 4, 7, 4)),  # moves a kept size
], ids=["1.5x", "exact-down-and-up", "3d"])
def test_nearest_resizing_to_any_size_reads_torchs_positions(up, shape, tmp_path):
    g = _captured(up, shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"slice", "cat", "take"}
    _compare(up, g, np.random.default_rng(5).standard_normal(shape).astype(np.float32), rtol=0)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_resizing_matches_torch_on_any_sizes(data, tmp_path_factory):
    rank = data.draw(st.integers(1, 3), "rank")
    shape = (1, 2) + tuple(data.draw(st.lists(st.integers(1, 24), min_size=rank, max_size=rank), "shape"))
    mode = data.draw(st.sampled_from(["nearest", "nearest-exact", ("linear", "bilinear", "trilinear")[rank - 1]]))
    kwargs = {"align_corners": data.draw(st.booleans(), "align_corners")} if "linear" in mode else {}
    if data.draw(st.booleans(), "by size"):
        kwargs["size"] = tuple(data.draw(st.lists(st.integers(1, 60), min_size=rank, max_size=rank), "size"))
    else:
        kwargs["scale_factor"] = tuple(data.draw(st.lists(st.floats(0.3, 4.5).map(lambda f: round(f, 2)),
                                                          min_size=rank, max_size=rank), "scales"))
    up = Lambda(lambda x: F.interpolate(x, mode=mode, **kwargs))
    try:
        up(torch.zeros(shape))
    except RuntimeError:  # torch refuses sizes that round to nothing
        return
    g = _captured(up, shape, tmp_path_factory.mktemp("resize"))
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    _compare(up, g, x, rtol=0 if "nearest" in mode else 3e-7)


def test_linear_resizing_rounds_the_half_pixel_position_as_this_torch_does(monkeypatch):
    """torch builds with FMA kernels round ``ratio * (i + 0.5) - 0.5`` once, others twice;
    capture reads which from torch's kernel (67 -> 40, position 38: 63.9875 fused)."""
    from csqc.capture import resampling

    one_hot = torch.zeros(1, 1, 67)
    one_hot[0, 0, 64] = 1.0
    torchs = F.interpolate(one_hot, size=40, mode="linear")[0, 0, 38].item()
    assert resampling._linear_weights(67, 40, None)[3][38] == np.float32(torchs)
    for fused, weight in ((True, 0.98749924), (False, 0.9874954)):
        monkeypatch.setattr(resampling, "_torch_fuses_source_index", lambda fused=fused: fused)
        assert resampling._linear_weights(67, 40, None)[3][38] == np.float32(weight)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_bicubic_resizing_matches_torch_on_any_sizes(data, tmp_path_factory):
    """torch's positions, and weights read off its kernel; its border taps clamped onto one
    position summed into one (a rounding apart from its separate products at most)."""
    shape = (1, 2) + tuple(data.draw(st.lists(st.integers(1, 20), min_size=2, max_size=2), "shape"))
    kwargs = {"align_corners": data.draw(st.booleans(), "align_corners")}
    if data.draw(st.booleans(), "by size"):
        kwargs["size"] = tuple(data.draw(st.lists(st.integers(1, 50), min_size=2, max_size=2), "size"))
    else:
        kwargs["scale_factor"] = tuple(data.draw(st.lists(st.floats(0.3, 4.5).map(lambda f: round(f, 2)),
                                                          min_size=2, max_size=2), "scales"))
    up = Lambda(lambda x: F.interpolate(x, mode="bicubic", **kwargs))
    try:
        up(torch.zeros(shape))
    except RuntimeError:  # torch refuses sizes that round to nothing
        return
    g = _captured(up, shape, tmp_path_factory.mktemp("bicubic"))
    assert {n.op for n in g.nodes} <= {"slice", "cat", "mul", "add", "take"}
    _compare(up, g, np.random.default_rng(7).standard_normal(shape).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("up, shape", [
    (Lambda(lambda x: F.interpolate(x, scale_factor=4, mode="bicubic")), (1, 3, 6, 5)),  # an SR net's skip
    (Lambda(lambda x: F.interpolate(x, scale_factor=(1.1, 1.0), mode="bicubic")), (1, 2, 7, 7)),  # kept sizes move
    (Lambda(lambda x: F.interpolate(x, size=(3, 9), mode="bicubic", align_corners=True)), (2, 2, 8, 4)),
], ids=["4x", "kept-size-scaled", "aligned-down-and-up"])
def test_bicubic_resizing_uses_torchs_positions_and_weights(up, shape, tmp_path):
    g = _captured(up, shape, tmp_path)
    _compare(up, g, np.random.default_rng(8).standard_normal(shape).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("up, why", [
    (lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), "upsample_bilinear2d_aa"),
    (lambda x: F.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True), "upsample_bicubic2d_aa"),
])
def test_upsampling_it_cannot_translate_is_named(up, why, tmp_path):
    with pytest.raises(UnsupportedOps) as e:
        _captured(Lambda(up), (1, 2, 4, 4), tmp_path)
    assert why in str(e.value)


# inputs over every branch: below -88 (exp underflows), tiny, around the softplus thresholds, large
_ACTIVATION_INPUT = np.concatenate([np.linspace(-120, 120, 601), [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 4.99, 5.0,
                                                                  5.01, 19.99, 20.0, 20.01, 10.0]]).astype(np.float32)


@pytest.mark.parametrize("act, ops", [
    (lambda x: torch.exp(torch.clamp(x, max=80.0)), {"clip", "exp"}),
    (lambda x: torch.log(torch.abs(x) + 0.5), {"minimum", "mul", "sub", "add", "log"}),  # abs: x - 2 min(x, 0)
    (lambda x: torch.abs(x), {"minimum", "mul", "sub"}),
    (nn.ELU(), {"relu", "minimum", "exp", "sub", "mul", "add"}),
    (lambda x: F.elu(x, alpha=0.7), {"relu", "minimum", "exp", "sub", "mul", "add"}),
    (nn.CELU(1.3), {"relu", "minimum", "mul", "exp", "sub", "add"}),
    (nn.SELU(), {"relu", "mul", "minimum", "exp", "sub", "add"}),
    (nn.Softplus(), {"sub", "relu", "mul", "minimum", "exp", "add", "log", "div"}),
    (nn.Softplus(beta=2.0, threshold=10.0), {"mul", "sub", "relu", "minimum", "exp", "add", "log", "div"}),
    (nn.Softplus(beta=0.5, threshold=5.0), {"mul", "sub", "relu", "minimum", "exp", "add", "log", "div"}),
    (nn.Mish(), {"minimum", "exp", "add", "sub", "log", "div", "tanh", "mul"}),
])
def test_exp_log_activations_match_pytorch(act, ops, tmp_path):
    module = Lambda(act) if not isinstance(act, nn.Module) else act
    x = _ACTIVATION_INPUT.reshape(1, -1)
    g = _captured(module, x.shape, tmp_path)
    assert {n.op for n in g.nodes} == ops
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    # an ulp or two of exp / log (ELU's exp(x) - 1 where torch takes expm1: below 1.2e-7 absolute)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2e-7)


@pytest.mark.parametrize("act", [
    F.logsigmoid, lambda x: F.glu(x, -1), lambda x: F.glu(x.reshape(-1, 6, 11), 1), F.hardshrink, lambda x: F.hardshrink(x, 2.0),
    F.softshrink, lambda x: F.threshold(x, 0.1, 20.0), lambda x: F.threshold(x, 0.5, 0.0),
    lambda x: F.rrelu(x, training=False), lambda x: torch.abs(x).pow(0.5), lambda x: torch.abs(x).add(1).pow(-0.5),
    lambda x: torch.abs(x).add(1).pow(-1), lambda x: torch.abs(x).add(1).pow(-2), lambda x: torch.abs(x).add(1).reciprocal(),
    lambda x: x / x.norm(dim=-1, keepdim=True), lambda x: F.normalize(x, dim=0), lambda x: torch.maximum(x, x * 0.5 + 1),
], ids=["logsigmoid", "glu", "glu_middle_axis", "hardshrink", "hardshrink2", "softshrink", "threshold", "threshold_to_0",
        "rrelu_eval", "pow_half", "pow_minus_half", "pow_minus_1", "pow_minus_2", "reciprocal", "norm", "normalize",
        "maximum"])
def test_more_activations_match_pytorch(act, tmp_path):
    x = np.concatenate([np.linspace(-30, 30, 118), [0.0, -0.0, 0.5, -0.5, 0.50001, 0.1, 2.0, -2.0, 1e-30, -1e-30,
                                                   100.0, -100.0, 2.0000002, -2.0000002]]).astype(np.float32).reshape(2, -1)
    g = _captured(Lambda(act), x.shape, tmp_path)
    with torch.no_grad():
        expected = act(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    # the branch-picking ones (shrinks, threshold) are exact; exp, log, sigmoid and sqrt within an ulp or two
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("f, ops", [
    (lambda x: F.log_softmax(x, -1), {"amax", "sub", "exp", "mean", "mul", "log"}),
    (lambda x: F.log_softmax(x, 1), {"amax", "sub", "exp", "mean", "mul", "log"}),
    (lambda x: x.amax(dim=(1, 2)), {"amax"}),
    (lambda x: x.amax(dim=-1, keepdim=True) - x.max(dim=1).values.unsqueeze(1), {"amax", "reshape", "sub"}),
])
def test_max_reductions_and_log_softmax_match_pytorch(f, ops, tmp_path):
    x = (np.random.default_rng(0).standard_normal((2, 5, 7)) * 30).astype(np.float32)
    x[0, 0] = [-200.0, 0.0, 1.0, 2.0, 3.0, 500.0, -1e30]  # one exp far below the max: finite as torch's
    g = _captured(Lambda(f), x.shape, tmp_path)
    assert {n.op for n in g.nodes} == ops
    with torch.no_grad():
        expected = f(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    np.testing.assert_allclose(out, expected, rtol=3e-7, atol=0)  # the max is exact; the sum one rounding off


@pytest.mark.parametrize("f", [
    lambda x: x.var(1, keepdim=True),
    lambda x: x.var(dim=(1, 2), unbiased=False),
    lambda x: x.std(dim=-1),
    lambda x: torch.var(x, dim=2, correction=2, keepdim=True),
    lambda x: (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-5).sqrt(),  # a hand-written norm
], ids=["var", "var_biased", "std", "var_correction2", "norm"])
def test_variances_match_pytorch(f, tmp_path):
    x = (np.random.default_rng(1).standard_normal((2, 5, 7)) * 3 + 1).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    assert {n.op for n in g.nodes} <= {"mean", "sub", "mul", "sqrt", "add", "div"}
    _compare(Lambda(f), g, x, rtol=3e-6)


@pytest.mark.parametrize("f, why", [(lambda x: x.var(), "a variance to a scalar"),
                                    (lambda x: x[:, :1].var(1), r"a variance of 1 element\(s\) with correction 1")])
def test_variances_without_a_value_are_refused(f, why, tmp_path):
    with pytest.raises(UnsupportedOps, match=why):
        _captured(Lambda(f), (2, 5), tmp_path)


@pytest.mark.parametrize("f, ops", [
    (lambda x: x * 0.5 * (1.0 + torch.erf(x / 1.4142135623730951)), {"mul", "div", "erf", "add"}),  # BERT's gelu
    (torch.erf, {"erf"}),
    (torch.sign, {"relu", "mul", "minimum", "sub"}),
    (lambda x: torch.sgn(x) * x, {"relu", "mul", "minimum", "sub"}),
    (lambda x: x.norm(p=1, dim=1), {"minimum", "mul", "sub", "mean"}),
    (lambda x: F.normalize(x, p=1, dim=-1), {"minimum", "mul", "sub", "mean", "clip", "expand", "div"}),
    (lambda x: torch.linalg.vector_norm(x, float("inf"), dim=(1, 2), keepdim=True), {"minimum", "mul", "sub", "amax"}),
    (lambda x: torch.linalg.vector_norm(x, float("-inf"), dim=2), {"minimum", "mul", "sub", "amax"}),
    (lambda x: F.cosine_similarity(x, x.flip(2) + 1, dim=2), {"slice", "cat", "add", "mul", "mean", "sqrt", "clip",
                                                              "div"}),
    (lambda x: F.cosine_similarity(x, x[:, :1] * 2, dim=1, eps=1e-3), {"slice", "mul", "expand", "mean", "sqrt",
                                                                        "clip", "div"}),
], ids=["gelu_by_erf", "erf", "sign", "sgn", "norm_1", "normalize_1", "norm_inf", "norm_minus_inf", "cosine",
        "cosine_broadcast"])
def test_erf_sign_norms_and_cosine_similarity_match_pytorch(f, ops, tmp_path):
    x = (np.random.default_rng(2).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    x[0, 0] = [0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 1e-3]  # sign's zeros and tiny values, erf's tails
    x[1, 1] = 0.0  # a zero vector: cosine similarity's clamp at eps
    g = _captured(Lambda(f), x.shape, tmp_path)
    assert {n.op for n in g.nodes} == ops
    with torch.no_grad():
        expected = f(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    # sign and the inf norms exactly; 1 + erf(x) near x = -4 cancels to an ulp of erf's (torch's
    # erf is not correctly rounded there): absolutely, relative to the largest output
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("f", [
    lambda x: x[0].T, lambda x: x.mT, lambda x: x.mH, lambda x: x.adjoint(), lambda x: x[1].H,
    lambda x: x.movedim(2, 0), lambda x: x[:, None].movedim((1, 3), (3, 0)), lambda x: torch.moveaxis(x, 0, -1),
    lambda x: x.view_as(x.mT.mT), lambda x: x[:, :1].reshape_as(torch.zeros(2, 7)), lambda x: x[:, :1].squeeze(),
    lambda x: x[:, :1, None].squeeze((1, 2)), lambda x: x[:, :1].broadcast_to(2, 5, 7),
    lambda x: x.tensor_split(3, 2)[0][..., :2] + x.tensor_split(3, 2)[2],
    lambda x: torch.cat(x.tensor_split([1, -2], 1)[::-1], 1),
    lambda x: x.triu(), lambda x: x.tril(-1), lambda x: x.triu(2),
    lambda x: x.tensor_split([7], 2)[0],
    lambda x: x.amin(1), lambda x: x.min(dim=2, keepdim=True).values - x, lambda x: x.amin((0, 2), keepdim=True),
    lambda x: x.amin(), lambda x: x[0, 0].min(0).values, lambda x: (x - x.amin()) / (x.amax() - x.amin()),
], ids=["T", "mT", "mH", "adjoint", "H", "movedim", "movedim_list", "moveaxis", "view_as", "reshape_as", "squeeze",
        "squeeze_dims", "broadcast_to", "tensor_split", "tensor_split_indices", "triu", "tril_below", "triu_above",
        "tensor_split_unread_empty_piece", "amin", "min_dim", "amin_keepdim", "amin_scalar", "min_dim_scalar",
        "min_max_normalized"])
def test_views_and_selections_torch_export_keeps_as_ops_are_exact(f, tmp_path):
    """Views, triangles and minima torch.export keeps as their own ops: composed of the IR's
    permutes, reshapes, slices, masks and maxima, bit for bit torch's (a minimum's sign of zero
    too; a triangle's masked zeros may be -0)."""
    x = (np.random.default_rng(3).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    x[1, :, 3] = -0.0  # a column whose minimum is -0
    x[1, 2, :] = np.abs(x[1, 2, :])
    x[1, 2, 3] = -0.0  # a row whose minimum is -0
    g = _captured(Lambda(f), x.shape, tmp_path)
    with torch.no_grad():
        expected = f(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    np.testing.assert_array_equal(out, expected)
    if "min" in str(g.nodes):
        np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


def test_broadcast_to_of_a_constant_stays_an_op(tmp_path):
    """A class token broadcast to the batch is one token and an expand, not a folded constant the
    batch's size (as ``expand`` of one)."""

    class Token(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 1, 7))

        def forward(self, x):
            return torch.cat([self.token.broadcast_to(x.shape[0], 1, 7), x], 1)

    g = _captured(Token(), (2, 5, 7), tmp_path, batch=64)
    assert "expand" in {n.op for n in g.nodes} and max(p.size for p in g.params.values()) == 7


@pytest.mark.parametrize("f", [
    lambda x: torch.diff(x), lambda x: torch.diff(x, n=2, dim=1), lambda x: torch.outer(x[0, 0], x[1, 2]),
    lambda x: torch.lerp(x, x.flip(2), 0.25), lambda x: torch.lerp(x, x * 3 - 1, 0.75),
    lambda x: torch.addcmul(x, x, x.flip(1), value=0.5), lambda x: torch.addcdiv(x, x, x.abs() + 1, value=-2),
    lambda x: torch.logsumexp(x, 2), lambda x: torch.logsumexp(x, (1, 2), keepdim=True),
    lambda x: torch.logsumexp(x, (0, 1, 2)),
    lambda x: torch.var_mean(x, 2)[0] + torch.var_mean(x, 2)[1],
    lambda x: torch.std_mean(x, (1, 2), keepdim=True, correction=0)[1] * torch.std_mean(x, 1, keepdim=True)[0],
], ids=["diff", "diff2", "outer", "lerp", "lerp_past_half", "addcmul", "addcdiv", "logsumexp", "logsumexp_keepdim",
        "logsumexp_scalar", "var_mean", "std_mean"])
def test_arithmetic_torch_export_keeps_as_ops_matches_pytorch(f, tmp_path):
    """Differences, lerps, products and reductions as IR arithmetic: in torch's order (lerp's
    two forms), sums as mean times count (one rounding more)."""
    x = (np.random.default_rng(4).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    _compare(Lambda(f), g, x, rtol=3e-6)


@pytest.mark.parametrize("f, why", [
    (lambda x: x.min(dim=1).indices.float(), r"min\(dim\) indices are used \(argmin\)"),
    (lambda x: torch.diff(x, dim=1, prepend=x[:, :1]), "diff with prepend or append"),
    (lambda x: x.tensor_split([7], 2)[1] + 1, "tensor_split with an empty piece"),
], ids=["argmin", "diff_prepend", "empty_piece"])
def test_forms_of_those_ops_it_does_not_translate_are_named(f, why, tmp_path):
    with pytest.raises(UnsupportedOps, match=why):
        _captured(Lambda(f), (2, 5, 7), tmp_path)


def test_vector_norms_of_other_orders_are_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match=r"a vector norm of order 3 \(only 1, 2, inf and -inf\)"):
        _captured(Lambda(lambda x: x.norm(p=3, dim=1)), (2, 5), tmp_path)


def test_argmax_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match=r"max\(dim\) indices are used"):
        _captured(Lambda(lambda x: x.max(dim=1).indices.float()), (2, 5), tmp_path)


@pytest.mark.parametrize("threshold, x", [
    (10.0, [10.5, 11.0, 60.0, 1e30, 3e38]),  # torch returns x itself, not log1p(exp(x)) (4.5e-5 away at 10)
    (0.0, [1e-45, 1e-40, 1e-38, 0.5]),       # past a threshold of 0 by the least subnormal: still x
])
def test_softplus_takes_torch_branch_exactly_past_its_threshold(threshold, x, tmp_path):
    x = np.array([x], np.float32)
    g = _captured(nn.Softplus(beta=1.0, threshold=threshold), x.shape, tmp_path)
    (out,), _ = run(g, [x])
    np.testing.assert_array_equal(out, x)
    with torch.no_grad():
        np.testing.assert_array_equal(nn.Softplus(beta=1.0, threshold=threshold)(torch.from_numpy(x)).numpy(), x)


def test_sin_and_cos_of_computed_values_are_ops_and_of_constants_fold(tmp_path):
    """A sinusoidal embedding of the input (diffusion timesteps, Fourier features) runs as sin /
    cos ops; of constants alone (rotary tables: tests/test_hf_models.py's Llama) they fold."""
    def embed(x):
        freqs = torch.exp(torch.arange(4.0) * -0.5)
        angles = x[:, :1] * 250.0 * freqs  # arguments up to ~1000
        return torch.cat([torch.sin(angles), torch.cos(angles), x + torch.cos(torch.arange(3.0))], dim=1)

    x = np.array([[0.0, 1.0, 2.0], [3.999, -0.5, 1e-3], [-4.0, 2.5, 0.25]], np.float32)
    g = _captured(Lambda(embed), x.shape, tmp_path)
    assert [n.op for n in g.nodes].count("sin") == 1 and [n.op for n in g.nodes].count("cos") == 1
    _compare(Lambda(embed), g, x, rtol=1e-6)


def _position_table(kind: str, length: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)
    if kind == "log_buckets":  # DeBERTa-v2
        return torch.ceil(pos / 3.0) - torch.floor(pos / 4.0) + torch.round(pos / 5.0) + torch.trunc(pos / 6.0)
    if kind == "alibi":  # BLOOM's slopes: a power of two tensors
        return torch.pow(torch.tensor(0.5), pos)
    if kind == "relative_index":  # BEiT: meshgrid, copied into a table
        a, b = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        table = torch.zeros(length, length)
        table.copy_(a - b)
        return table[0] + torch.div(pos, 2, rounding_mode="floor") + torch.remainder(pos, 3) + pos.log2().clamp(0)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["log_buckets", "alibi", "relative_index"])
def test_position_tables_a_model_computes_in_forward_fold(kind, tmp_path):
    """Ops that only ever read constants there (rounding, powers, meshgrid, in-place copies,
    integer division) fold at capture into the table: one add of a constant."""
    f = Lambda(lambda x: x + _position_table(kind, x.shape[-1]))
    x = np.random.default_rng(5).standard_normal((2, 3, 6)).astype(np.float32)
    g = _captured(f, x.shape, tmp_path)
    assert [n.op for n in g.nodes] == ["add"]
    _compare(f, g, x, rtol=0)


def test_unsupported_ops_are_bad_input():
    assert issubclass(UnsupportedOps, csqc.BadInput)


def test_capture_at_a_different_batch_size(tmp_path):
    module = _quantized_pair()
    g = _captured(module, (1, 4, 5, 5), tmp_path, batch=3)
    assert g.inputs[0].type.shape == (3, 4, 5, 5)
    assert all(n.type.shape[0] == 3 for n in g.nodes)
    _compare(module, g, np.random.default_rng(3).standard_normal((3, 4, 5, 5)).astype(np.float32))


def test_capture_rejects_a_batch_below_one(tmp_path):
    torch.manual_seed(0)
    path = csqc.save(nn.Linear(2, 2), tmp_path / "m.pt", torch.randn(1, 2))
    with pytest.raises(csqc.BadInput, match="batch must be at least 1"):
        capture(csqc.load(path), batch=0)


_CAUSAL = torch.tril(torch.ones(5, 7)).bool()


def _exact_with_finite_fills(f, x, tmp_path):
    """``f`` captured and run by the interpreter equals torch bit for bit, an infinite fill
    standing as the largest finite float32 of its sign (as attention masks do)."""
    g = _captured(Lambda(f), x.shape, tmp_path)
    with torch.no_grad():
        expected = f(torch.from_numpy(x)).numpy()
    expected = np.where(np.isneginf(expected), -np.finfo(np.float32).max, expected)
    (out,), _ = run(g, [x])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("f", [
    lambda x: torch.max(x, torch.tensor(0.3)), lambda x: x.max(torch.linspace(-1, 1, 7)),
    lambda x: F.adaptive_max_pool1d(x, 7), lambda x: F.adaptive_max_pool1d(x, 3),
    lambda x: F.adaptive_max_pool1d(x, 1), lambda x: F.adaptive_max_pool2d(x[None], (2, 3)),
    lambda x: F.adaptive_max_pool2d(x[None], (5, 3)), lambda x: F.adaptive_max_pool2d(x[None], (1, 7)),
    lambda x: torch.where(_CAUSAL, x, torch.full([], -3.4e38)), lambda x: torch.where(_CAUSAL, 0.5, x),
    lambda x: torch.where(_CAUSAL, x, x.flip(2) * 2), lambda x: torch.where(_CAUSAL[0], x, float("-inf")),
    lambda x: x.masked_fill(~_CAUSAL, torch.tensor(-1.5)),
], ids=["max_scalar_tensor", "max_tensor", "adaptive_max_1d_whole", "adaptive_max_1d_overlapping",
        "adaptive_max_1d_global", "adaptive_max_2d_overlapping", "adaptive_max_2d_one_axis", "adaptive_max_2d_rows",
        "where_causal", "where_scalar_self", "where_two_values", "where_minus_inf", "masked_fill_tensor"])
def test_maxima_and_selections_over_constant_masks_are_exact(f, tmp_path):
    """Maxima against constants, adaptive max pools whose windows overlap (separable: slices,
    amax, cat) and ``where`` over a constant condition: bit for bit torch's (an infinite fill
    as the largest finite float32, as attention masks are)."""
    x = (np.random.default_rng(5).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    _exact_with_finite_fills(f, x, tmp_path)


@pytest.mark.parametrize("f", [
    lambda x: torch.baddbmm(x[:, :, :5], x, x.mT), lambda x: torch.baddbmm(x[:, :, :5], x, x.mT, beta=0.5, alpha=2),
    lambda x: torch.baddbmm(x[:, :1, :5], x, x.mT, beta=0.0, alpha=0.125),
    lambda x: torch.addmm(x[0, 0, :5], x[0], x[1].T, beta=2.0), lambda x: torch.exp2(x),
    lambda x: torch.expm1(x), lambda x: torch.log1p(x.abs() * 10 - 0.9), lambda x: torch.log1p(x * 1e-9),
], ids=["baddbmm", "baddbmm_scaled", "baddbmm_no_input", "addmm_scaled", "exp2", "expm1", "log1p", "log1p_tiny"])
def test_scaled_products_and_exponentials_match_pytorch(f, tmp_path):
    """baddbmm and addmm with their scales, exp2 / expm1 / log1p of computed values: composed of
    matmul, mul, add, exp and log, within float tolerance of torch (log1p keeps tiny values'
    relative precision)."""
    x = (np.random.default_rng(6).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    _compare(Lambda(f), g, x, rtol=3e-6)


def test_log1p_keeps_relative_precision_near_zero_and_minus_one(tmp_path):
    x = np.array([[-1.0 + 2**-24, -1.0 + 2**-20, 0.0, -0.5, 1e-30, -3e-8, 2e-7, 1e30]], np.float32)
    g = _captured(Lambda(torch.log1p), x.shape, tmp_path)
    (out,), _ = run(g, [x])
    np.testing.assert_allclose(out, torch.log1p(torch.from_numpy(x)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape, affine, eps", [(7, True, None), ((5, 7), False, 1e-3), (7, True, 1e-6)],
                         ids=["last_axis", "two_axes_no_weight", "eps"])
def test_rms_norm_matches_pytorch(shape, affine, eps, tmp_path):
    """``nn.RMSNorm`` (torch's ``rms_norm``) as x * 1 / sqrt(mean(x * x) + eps) * weight."""
    norm = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    x = (np.random.default_rng(7).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    x[0, 0] = 0.0  # a zero row: eps alone under the root
    g = _captured(norm, x.shape, tmp_path)
    assert {n.op for n in g.nodes} == {"mul", "mean", "add", "sqrt", "div"}
    _compare(norm, g, x, rtol=3e-6)


_POSITIONS = torch.from_numpy(np.random.default_rng(8).integers(0, 5, (6, 7)))


@pytest.mark.parametrize("f, shape", [
    (lambda x: x.flip(2).repeat(1, 1, 20).flip(2), (1, 2, 5)),
    (lambda x: x[:, torch.tensor([[0, 4, 4], [3, 1, 2]])] * 2, (2, 5, 7)),
    (lambda x: x.mean(0)[torch.tensor([4, 0, 3, 3, 1, 2, 0, 4, 2, 1, 3, 0])], (2, 5, 7)),
    (lambda x: torch.gather(x, 2, _POSITIONS[None, :5].expand(2, 5, 7)), (2, 5, 7)),
    (lambda x: torch.gather(x, 1, _POSITIONS[None, :4, :6].expand(2, 4, 6)), (2, 5, 7)),
    (lambda x: torch.gather(x, 1, torch.stack([_POSITIONS[:4], _POSITIONS[2:]])), (2, 5, 7)),
    (lambda x: torch.gather(x, 0, _POSITIONS[:2, :5].remainder(2)[..., None].expand(2, 5, 7)), (2, 5, 7)),
], ids=["long_reversal", "index_of_two_dims", "table_lookup", "gather_rows", "gather_smaller_index",
        "gather_per_sample", "gather_batch_axis"])
def test_gathers_at_constant_positions_take_once_and_are_exact(f, shape, tmp_path):
    """A gather of many runs, an index of several dimensions, ``torch.gather`` at a constant
    index: one ``take`` each (the positions an int32 parameter), bit for bit torch's."""
    x = (np.random.default_rng(9).standard_normal(shape) * 3).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    assert [n.op for n in g.nodes].count("take") == 1
    with torch.no_grad():
        expected = f(torch.from_numpy(x)).numpy()
    (out,), _ = run(g, [x])
    np.testing.assert_array_equal(out, expected)


def test_a_take_outside_its_axis_is_refused_by_the_verifier(tmp_path):
    """An IR file is untrusted: a take's index must be int32 and inside the axis it reads."""
    from csqc.ir import IRError, verify as verify_ir
    g = _captured(Lambda(lambda x: x[:, torch.tensor([[0, 4, 4], [3, 1, 2]])]), (2, 5, 7), tmp_path)
    take = next(n for n in g.nodes if n.op == "take")
    for bad, why in ((np.array([[0, 5, 4], [3, 1, 2]], np.int32), r"outside \[0, 5\) of axis 1"),
                     (np.array([[0, -1, 4], [3, 1, 2]], np.int32), "outside"),
                     (np.array([[0, 4, 4], [3, 1, 2]], np.int64), "must be an int32 array")):
        with pytest.raises(IRError, match=why):
            verify_ir(g.with_params({take.inputs[1]: bad}))


@pytest.mark.parametrize("f", [
    lambda x: torch.where(x > 0, x, 0.1 * x), lambda x: x * (x.abs() < 1.5), lambda x: (x >= x.flip(2)).float(),
    lambda x: (x <= 0.5).to(torch.float32) + (x == x.flip(2)) - (x != 0).float(),
    lambda x: torch.where(x < x.mean(-1, keepdim=True), 1.0, x),
    lambda x: torch.where((x > 0) & ~(x > 2) | (x < -2) ^ (x < -3), x, -x),
    lambda x: torch.where(torch.logical_and(x > 0, _CAUSAL), x, torch.logical_or(x < 0, ~_CAUSAL).float()),
    lambda x: torch.where(x > 0, x, float("-inf")).amax(-1),
], ids=["leaky_where", "mask_product", "ge_float", "le_eq_ne", "where_scalar", "logic", "logic_with_constants",
        "where_minus_inf"])
def test_comparisons_and_conditions_of_computed_values_are_exact(f, tmp_path):
    """Comparisons of the model's values (exact 0 / 1 indicators of a - b), logic of them, and
    where / masked_fill / SDPA masks selecting by them: bit for bit torch's (infinite fills as
    the largest finite float32); ties and subnormal differences included."""
    x = np.round(np.random.default_rng(10).standard_normal((2, 5, 7)) * 3, 1).astype(np.float32)
    x[0, 0, :4] = [0.0, 1e-45, -1e-45, 0.5]  # ties with the constants, subnormals either side of 0
    x[1, 1] = x[1, 1, ::-1]  # a palindrome row: x == x.flip(2) at its middle
    _exact_with_finite_fills(f, x, tmp_path)


@pytest.mark.parametrize("f", [
    lambda x: x.masked_fill(x.abs() < 0.5, float("-inf")).softmax(-1),
    lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=x[:, :, :5] > -1.0),
], ids=["masked_fill_softmax", "sdpa_bool_mask"])
def test_masks_the_model_computes_select_before_a_softmax(f, tmp_path):
    """A computed boolean mask before a softmax (masked_fill by -inf, SDPA's attn_mask): the masked
    weights exactly 0, the rest within softmax's float tolerance of torch's."""
    x = (np.random.default_rng(11).standard_normal((2, 5, 7)) * 2).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    _compare(Lambda(f), g, x, rtol=1e-6)


def test_a_boolean_model_input_is_refused_with_what_to_pass(tmp_path):
    class Masked(nn.Module):
        def forward(self, x, mask):
            return x.masked_fill(mask, 0.0)

    with pytest.raises(csqc.errors.BadInput, match="input 1 is boolean.*float 0.0 / 1.0"):
        csqc.save(Masked(), tmp_path / "m.pt", (torch.randn(2, 3), torch.rand(2, 3) > 0.5))


def test_logic_of_values_that_are_not_conditions_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match="logical and of values that are not boolean"):
        _captured(Lambda(lambda x: torch.logical_and(x, x.flip(1)).float()), (2, 5), tmp_path)


@pytest.mark.parametrize("f, shape", [
    (lambda x: x.unfold(2, 3, 2), (2, 3, 8)), (lambda x: x.unfold(1, 2, 1) * 2, (2, 3, 8)),
    (lambda x: x.unfold(2, 4, 4), (2, 3, 8)), (lambda x: x.unfold(-1, 3, 3), (2, 3, 8)),
    (lambda x: F.unfold(x, (2, 3), padding=1, stride=2), (2, 3, 5, 6)),
    (lambda x: F.unfold(x, 2, dilation=(2, 1)), (1, 2, 5, 4)),
    (lambda x: F.unfold(x, 2, stride=2), (2, 3, 4, 6)),
    (lambda x: F.fold(F.unfold(x, 2, stride=2) * 3, (4, 6), 2, stride=2), (2, 3, 4, 6)),
    (lambda x: F.fold(F.unfold(x, (2, 3), padding=1, stride=(2, 3)), (5, 6), (2, 3), padding=1, stride=(2, 3)),
     (1, 2, 5, 6)),
    (lambda x: F.fold(F.unfold(x, 2, stride=3), (6, 7), 2, stride=3), (1, 2, 6, 7)),
], ids=["unfold", "unfold_step_one", "unfold_tiles", "unfold_last_tiles", "im2col_padded", "im2col_dilated",
        "im2col_tiles", "fold_tiles", "fold_padded", "fold_with_gaps"])
def test_sliding_windows_are_takes_and_exact(f, shape, tmp_path):
    """Tensor.unfold, F.unfold (im2col) and F.fold (col2im) of patches that do not overlap: data
    movement (takes, a reshape, a permute, zero padding), bit for bit torch's."""
    x = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
    _exact_with_finite_fills(f, x, tmp_path)


def test_folding_overlapping_patches_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match=r"col2im of overlapping patches \(they sum\)"):
        _captured(Lambda(lambda x: F.fold(F.unfold(x, 3, padding=1), (4, 4), 3, padding=1)), (1, 2, 4, 4), tmp_path)


@pytest.mark.parametrize("f", [
    lambda x: x - x.mean(), lambda x: x / x.abs().sum(), lambda x: x.mean([]) * x, lambda x: x.sum() - x.amax(),
], ids=["mean", "sum", "mean_empty_dims", "sum_minus_max"])
def test_reductions_to_a_single_number_match_pytorch(f, tmp_path):
    x = (np.random.default_rng(13).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    _compare(Lambda(f), g, x, rtol=3e-6)


def test_arithmetic_with_a_constant_on_a_single_number_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match=r"arithmetic on a value reduced to a single number \(reduce with "
                                             r"keepdim=True\)"):
        _captured(Lambda(lambda x: x * (x.amax() + 1)), (2, 5), tmp_path)


@pytest.mark.parametrize("f", [
    lambda x: x * x.bool(), lambda x: x.masked_fill(x.to(torch.bool), 7.0),
    lambda x: ((x > 0) + (x > 1)).float() * 3, lambda x: x * ((x > 0) + True),
    lambda x: x.masked_fill(x > 0, -1.5)[:1] + x[:1].masked_fill(x > 1, 2.0),
    lambda x: torch.index_select(x, 1, torch.tensor(2)), lambda x: x[:, torch.tensor(3)] * 2,
], ids=["to_bool", "bool_mask", "bool_sum_is_or", "bool_plus_true", "masked_fill_broadcast", "index_select_0d",
        "index_0d"])
def test_conversions_to_bool_and_bool_arithmetic_follow_torch(f, tmp_path):
    """``x.bool()`` is ``x != 0``; ``c + d`` of conditions is ``c or d``, as torch's bool arithmetic;
    a computed mask broadcasts as torch broadcasts it; a 0-d index as torch reads it."""
    x = np.array([[0.0, 0.5, -2.0, 3.0, -0.0], [1.0, 0.0, 2.0, -1e-45, 1.5]], np.float32)
    _exact_with_finite_fills(f, x, tmp_path)


@pytest.mark.parametrize("f, why", [
    (lambda x: x > 0, "output 0 is boolean"),
    (lambda x: (x > torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)).float(), "a float64 constant not exact"),
], ids=["bool_output", "float64_constant"])
def test_boolean_outputs_and_float64_comparisons_are_refused_by_name(f, why, tmp_path):
    with pytest.raises((UnsupportedOps, csqc.errors.BadInput), match=why):
        _captured(Lambda(f), (2, 3), tmp_path)


@pytest.mark.parametrize("f", [
    lambda x: torch.where(x > 0, torch.log(x), 0.0), lambda x: torch.where(x != 0, 1 / x, torch.zeros_like(x)),
    lambda x: torch.sqrt(x).masked_fill(x <= 0, 0.0),
], ids=["guarded_log", "guarded_reciprocal", "guarded_sqrt"])
def test_a_computed_condition_never_reads_the_branch_it_does_not_take(f, tmp_path):
    """The guard idioms: where the condition is false the other branch is -inf, inf or NaN, and
    the result is still torch's (a select op, not a product by 0)."""
    x = np.array([[-1.0, 0.0, 2.0, 1e-30, -0.0, 7.5]], np.float32)
    g = _captured(Lambda(f), x.shape, tmp_path)
    assert "select" in {n.op for n in g.nodes}
    (out,), _ = run(g, [x])
    with torch.no_grad():
        np.testing.assert_array_equal(out, f(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("f", [
    lambda x: torch.cat([x[..., :7] * 2, x[..., 7:]], -1), lambda x: torch.cat([x[:, 5:], x, x[:, :0]], 1) + 1,
    lambda x: torch.multiply(x, x.flip(1)) - torch.subtract(x, 1.5) + torch.divide(x, 4.0),
], ids=["empty_rotary_rest", "empty_pieces", "aliases"])
def test_empty_slices_concatenated_and_arithmetic_aliases(f, tmp_path):
    """Phi-3's rotary split at the full width leaves an empty slice that cat leaves out;
    ``torch.multiply`` / ``subtract`` / ``divide`` are ``*``, ``-``, ``/`` (ConvBERT)."""
    x = (np.random.default_rng(14).standard_normal((2, 5, 7)) * 3).astype(np.float32)
    _exact_with_finite_fills(f, x, tmp_path)


def test_an_empty_slice_read_by_another_op_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedOps, match="a tensor of no elements read by an op other than cat"):
        _captured(Lambda(lambda x: (x[:, :0].mT @ x).sum(0, keepdim=True) + x), (2, 5), tmp_path)
