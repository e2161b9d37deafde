"""The budget regularizer prunes bits over budget and grows them back under budget."""
import torch
from torch import nn

import csqc
from csqc import layers


def _spread_masks(model, low, high):
    # distinct logits per position, as the task loss leaves them, so bits cross zero one by one
    for _, m in layers.csq_layers(model):
        with torch.no_grad():
            m.mask_weight.copy_(torch.linspace(low, high, m.n_bits))


def _step_masks(model, target, steps=300):
    reg = layers.BudgetRegularizer(model, target, strength=1.0)
    layers.set_temperature(model, 1.0)
    opt = torch.optim.SGD([m.mask_weight for _, m in layers.csq_layers(model)], lr=0.5)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        reg().backward()
        opt.step()
        history.append(layers.average_bits(model))
    return history


def test_over_budget_prunes_bits():
    model = csqc.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), n_bits=8)
    _spread_masks(model, 0.1, 3.0)
    assert layers.average_bits(model) == 8
    history = _step_masks(model, target=3.0)
    assert history[-1] < 8
    assert abs(history[-1] - 3.0) <= 1.0


def test_under_budget_grows_bits_back():
    model = csqc.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), n_bits=8)
    _spread_masks(model, -3.0, 0.1)  # one bit kept
    assert layers.average_bits(model) == 1
    history = _step_masks(model, target=5.0)
    assert history[-1] > 1
    assert abs(history[-1] - 5.0) <= 1.0


def test_budget_weights_layers_by_size():
    big, small = nn.Linear(64, 64), nn.Linear(64, 2)
    model = csqc.convert(nn.Sequential(big, small), n_bits=8)
    reg = layers.BudgetRegularizer(model, 2.0)
    reg().backward()
    g_big = model[0].mask_weight.grad.abs().sum()
    g_small = model[1].mask_weight.grad.abs().sum()
    assert g_big > 10 * g_small  # the large layer pays for most of the size


def test_enforce_guarantees_the_budget():
    model = csqc.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), n_bits=8)
    reg = layers.BudgetRegularizer(model, 2.5)
    dropped = reg.enforce()
    assert dropped and layers.average_bits(model) <= 2.5


def _collapse_pressure(allow_layer_pruning):
    """The mask optimizer of ``train_csq`` (SGD, momentum 0.9) under an absurd budget pressure."""
    model = csqc.convert(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)), n_bits=8)
    reg = layers.BudgetRegularizer(model, 1.0, strength=1e4, allow_layer_pruning=allow_layer_pruning)
    opt = torch.optim.SGD([m.mask_weight for m in reg.layers], lr=0.05, momentum=0.9)
    for step in range(50):
        layers.set_temperature(model, 1.0 + step)
        opt.zero_grad()
        reg().backward()
        opt.step()
        reg.keep_layers_alive()
    return model, reg


def test_budget_pressure_never_leaves_a_layer_without_bits():
    model, reg = _collapse_pressure(allow_layer_pruning=False)
    assert all(m.active_bits() for m in reg.layers)
    reg.enforce()
    assert all(len(m.active_bits()) == 1 for m in reg.layers)  # budget 1 bit: exactly the kept one


def test_layer_pruning_is_an_explicit_opt_in():
    model, reg = _collapse_pressure(allow_layer_pruning=True)
    assert not any(m.active_bits() for m in reg.layers)


def test_enforce_keeps_one_bit_per_layer_unless_layer_pruning_is_allowed():
    for allow, least in ((False, 1), (True, 0)):
        model = csqc.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), n_bits=8)
        layers.BudgetRegularizer(model, 0.01, allow_layer_pruning=allow).enforce()
        assert min(len(m.active_bits()) for _, m in layers.csq_layers(model)) == least


def test_train_csq_keeps_every_layer_alive_under_absurd_strength():
    from csqc.data import load_digits_split
    from csqc.models import digits_mlp

    torch.manual_seed(0)
    data = load_digits_split()
    model = csqc.convert(digits_mlp(), n_bits=8, act_bits=4)
    bits_per_epoch = []

    def record(epoch, stats):
        bits_per_epoch.append([len(m.active_bits()) for _, m in layers.csq_layers(model)])

    csqc.train_csq(model, data, epochs=3, reg_strength=1e4, target_bits=1.0, on_epoch=record)
    assert all(min(bits) >= 1 for bits in bits_per_epoch), bits_per_epoch  # during training, too
    assert all(row["active_bits"] for row in layers.layer_report(model))
