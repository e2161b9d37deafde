"""Small float models for scikit-learn's digits data set (the demo and CI-sized tests)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["digits_mlp", "digits_cnn"]


def digits_mlp(hidden: int = 128) -> nn.Module:
    """64-128-10 MLP on flattened 8x8 digits."""
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, hidden), relu1=nn.ReLU(), fc2=nn.Linear(hidden, 10)))


def digits_cnn() -> nn.Module:
    """Three 3x3 convolutions with BatchNorm, one max-pool and a linear classifier (1x8x8 in)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        conv3=nn.Conv2d(32, 32, 3, padding=1, bias=False), bn3=nn.BatchNorm2d(32), relu3=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=nn.Linear(32 * 4 * 4, 10),
    ))
