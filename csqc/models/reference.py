"""Architectures in the CSQ reference code's state-dict layout, for ``--model-factory``.

``resnet20`` mirrors ``cifar10/network/resnetcs20.py`` of the reference code: module names
match its checkpoints, quantized layers are csqc CSQ layers (replaced on import), the
downsample shortcuts stay float, and activations after each block's ReLU6 (or PACT when
``act_bits <= 3``) are quantized with the dynamic max-abs scale, as the reference's STE does.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..layers import PACT, ActQuant, CSQConv2d, CSQLinear

__all__ = ["resnet20", "resnet20_4bit", "resnet20_2bit"]


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, n_bits: int, act_bits: int):
        super().__init__()
        self.conv1 = CSQConv2d(inplanes, planes, 3, stride, 1, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = CSQConv2d(planes, planes, 3, 1, 1, bias=False, n_bits=n_bits)
        self.bn2 = nn.BatchNorm2d(planes)
        clip = (lambda: nn.ReLU6()) if act_bits > 3 else (lambda: PACT())
        self.relu1, self.relu2 = clip(), clip()
        self.quant1 = ActQuant(act_bits) if act_bits else nn.Identity()
        self.quant2 = ActQuant(act_bits) if act_bits else nn.Identity()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.quant1(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        out = out + (self.downsample(x) if self.downsample is not None else x)
        return self.quant2(self.relu2(out))


class ResStage(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, n_bits: int, act_bits: int):
        super().__init__()
        self.block1 = BasicBlock(inplanes, planes, stride, n_bits, act_bits)
        self.block2 = BasicBlock(planes, planes, 1, n_bits, act_bits)
        self.block3 = BasicBlock(planes, planes, 1, n_bits, act_bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(x)))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, n_bits: int = 8, act_bits: int = 4):
        super().__init__()
        self.conv1 = CSQConv2d(3, 16, 3, 1, 1, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = ResStage(16, 16, 1, n_bits, act_bits)
        self.layer2 = ResStage(16, 32, 2, n_bits, act_bits)
        self.layer3 = ResStage(32, 64, 2, n_bits, act_bits)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = CSQLinear(64, num_classes, bias=True, n_bits=n_bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


def resnet20(num_classes: int = 10, n_bits: int = 8, act_bits: int = 4) -> nn.Module:
    return ResNet20(num_classes, n_bits, act_bits)


def resnet20_4bit() -> nn.Module:
    """Factory for ``--model-factory csqc.models.reference:resnet20_4bit`` (ReLU6, 4-bit acts)."""
    return ResNet20(act_bits=4)


def resnet20_2bit() -> nn.Module:
    """Factory with PACT clipping and 2-bit activations (the reference's act_bit <= 3 branch)."""
    return ResNet20(act_bits=2)
