"""CSQ layers: the finalized integer formula, soft/hard agreement, convert, activation rounding."""
import math

import pytest
import torch
from torch import nn

import csqc
from csqc import layers, ops


def _random_bits(layer: layers._CSQMixin, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.pweight.copy_(torch.randn(layer.pweight.shape, generator=g))
        layer.nweight.copy_(torch.randn(layer.nweight.shape, generator=g))
        layer.mask_weight.copy_(torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0][: layer.n_bits]))
        layer.scale.fill_(0.37)


def _q_by_hand(p, n, m):
    """q = sum_b m_b 2^b (p_b - n_b), bit axis last, LSB first."""
    q = torch.zeros(p.shape[:-1], dtype=torch.int64)
    for b in range(p.shape[-1]):
        q += int(m[b] > 0) * 2**b * ((p[..., b] > 0).long() - (n[..., b] > 0).long())
    return q


@pytest.mark.parametrize("make", [
    lambda: layers.CSQLinear(13, 7, bias=True, n_bits=6),
    lambda: layers.CSQConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, n_bits=6),
    lambda: layers.CSQConv2d(6, 6, 3, padding=2, dilation=2, groups=6, bias=True, n_bits=6),
])
def test_finalized_layer_equals_integer_formula(make):
    layer = make()
    _random_bits(layer)
    expected_q = _q_by_hand(layer.pweight, layer.nweight, layer.mask_weight)
    layer.finalize()
    assert torch.equal(layer.q.long(), expected_q)
    assert layer.active_bits() == [5, 3, 2, 0]  # non-contiguous mask survives
    w = (expected_q.float() * 0.37) / (2**6 - 1)
    x = torch.randn(2, 13) if isinstance(layer, layers.CSQLinear) else torch.randn(2, layer.in_channels, 9, 9)
    ref = (nn.functional.linear(x, w, layer.bias) if isinstance(layer, layers.CSQLinear) else
           nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    assert torch.equal(layer(x), ref)


def test_soft_weight_hardens_at_high_temperature():
    layer = layers.CSQLinear(8, 4, n_bits=5)
    _random_bits(layer)
    layer.temperature = 1e6
    soft = layer.soft_weight().detach()
    hard = ops.dequantize_weight(layer.integer_weight(), layer.scale.detach(), 5)
    assert torch.allclose(soft, hard, atol=1e-6)


def test_convert_keeps_float_outputs_within_quantization_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(4, 3, 6, 6)
    ref = model(x).detach()
    q = csqc.convert(model, n_bits=8)
    assert isinstance(q[0], csqc.CSQConv2d) and isinstance(q[3], csqc.CSQLinear)
    assert q[0].active_bits() == list(range(7, -1, -1))  # all positions active after convert
    csqc.finalize(q)
    # 8-bit weights: relative error well under 1%
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.01


def test_convert_quantizes_activations_except_first_layer():
    model = csqc.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), act_bits=4)
    assert model[0].input_quant is None
    assert model[2].input_quant.bits == 4


def test_activation_rounding_is_half_to_even_in_csq_order():
    # max|x| = 15 and 4 bits: |x| * 15 / 15 = |x|, so .5 values are exact ties
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 15.0])
    codes, s = ops.act_codes(x, 4, 0.0)
    assert codes.tolist() == [0.0, 2.0, 2.0, -2.0, 15.0]
    assert float(s) == 15.0
    # static scale clamps codes to the top level
    codes, _ = ops.act_codes(torch.tensor([1.0, 30.0]), 4, 15.0)
    assert codes.tolist() == [1.0, 15.0]
    # an all-zero tensor quantizes to zeros, not NaN
    assert torch.equal(ops.fake_quant_act(torch.zeros(3), 4, 0.0), torch.zeros(3))


def test_static_activation_scale_calibrates():
    model = csqc.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), act_bits=4, act_mode="static")
    data = [torch.randn(8, 4) for _ in range(3)]
    layers.calibrate(model, data)
    scale = model[2].input_quant.static_scale
    assert scale == pytest.approx(max(float(torch.relu(model[0](d)).abs().max().detach()) for d in data), rel=1e-6)


def test_temperature_schedule_grows_to_t_max_each_round():
    s = layers.TemperatureSchedule(epochs=10, t_max=200, rounds=2)
    values = [s(e) for e in range(10)]
    assert values[4] == pytest.approx(200) and values[9] == pytest.approx(200)
    assert values[5] < values[4] and all(a < b for a, b in zip(values[:4], values[1:5]))


def test_bad_layer_arguments_are_clear_errors():
    with pytest.raises(csqc.BadInput, match="n_bits"):
        layers.CSQLinear(4, 4, n_bits=0)
    with pytest.raises(csqc.BadInput, match="groups"):
        layers.CSQConv2d(3, 4, 3, groups=2)
    with pytest.raises(csqc.BadInput, match="activation bits"):
        layers.ActQuant(9)
