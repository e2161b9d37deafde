"""``csqc.train_csq`` takes what PyTorch users have: a DataLoader, a pair of tensors or arrays, a Split."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import csqc
from csqc.data import load_digits_split
from csqc.train import train_float


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def _warm_mlp(digits):
    """A small float MLP trained briefly, then converted: a couple of CSQ epochs keep it accurate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train_float(model, digits, epochs=8)
    return csqc.convert(model, n_bits=8, act_bits=4)


def _loader(x, y, batch_size, shuffle=False):
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size, shuffle=shuffle)


def test_dataloader_with_an_evaluation_loader(digits):
    train = _loader(digits.x_train, digits.y_train, 64, shuffle=True)
    held_out = _loader(digits.x_test, digits.y_test, 150)
    model = _warm_mlp(digits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval_data given: no training-accuracy warning
        accuracy, _ = csqc.train_csq(model, train, eval_data=held_out, epochs=2, target_bits=4.0)
    # the accuracy is the held-out one, batch by batch as the loader gives it
    with torch.no_grad():
        expected = sum(int((model.eval()(x).argmax(1) == y).sum()) for x, y in held_out) / len(digits.y_test)
    assert accuracy == pytest.approx(expected)
    assert accuracy > 0.85


def test_tensor_pair_evaluates_on_training_data_with_a_warning(digits):
    model = _warm_mlp(digits)
    pair = (torch.from_numpy(digits.x_train), digits.y_train)  # a tensor and an array mix too
    with pytest.warns(UserWarning, match="measured on the training data"):
        accuracy, _ = csqc.train_csq(model, pair, epochs=2, target_bits=4.0)
    assert accuracy == pytest.approx(csqc.evaluate(model, digits.x_train, digits.y_train))
    assert accuracy > 0.85


@pytest.mark.parametrize("data, message", [
    (42, "got int"),
    ("digits", "got str"),
    (np.zeros((4, 64), np.float32), "got ndarray"),
    (iter([]), "one-shot iterator"),
    ((np.zeros((4, 64), np.float32), np.zeros(3, np.int64)), "4 inputs and 3 labels"),
    ((np.zeros((4, 64), np.float32), np.zeros(4, np.float32)), "integer class indices"),
    ([np.zeros((4, 64), np.float32)], "every batch must be an \\(inputs, labels\\) pair"),
])
def test_anything_else_is_bad_input(digits, data, message):
    model = csqc.convert(nn.Sequential(nn.Linear(64, 10)), n_bits=8, act_bits=4)
    with pytest.raises(csqc.BadInput, match=message):
        csqc.train_csq(model, data, epochs=1)
