"""Architectures of the CSQ reference code (``lawsonX/CSQ``) in its state-dict layout.

Ready factories for ``--model-factory``: every module name matches the reference's
checkpoint keys, quantized layers are csqc CSQ layers (the importer replaces them with the
checkpoint's bits), and the float parts (BatchNorm, shortcuts, PACT ``alpha``) load as they
are. Constructor arguments use the reference's names (``num_classes``, ``Nbits``,
``act_bit``) and defaults, so ``act_bit=0`` (the reference default and its README's CIFAR
command) means float activations. ``width`` scales channel counts for small tests without
changing any name.

What each mirror keeps from its reference file (facts read from the public code):

- ``resnet20`` (``cifar10/network/resnetcs20.py``): three stages of three blocks; each block
  quantizes after ``relu1`` and after ``relu2`` (ReLU6 for ``act_bit > 3``, else PACT); the
  first convolution's input and the float 1x1 ``downsample`` shortcuts are not quantized.
- ``vgg19bn`` (``cifar10/network/vgg.py``): eight two-convolution blocks, max-pooling after
  blocks 1, 2, 3_2, 4_2 and 5_2, one quantized ``fc``.
- ``vgg`` (the ImageNet ``imagenet/networks/vgg.py`` of the reference's history): the same
  blocks, then ``fc1``/``fc2``/``fc3`` with ``relu1``/``relu2`` (ReLU6 or PACT) between them.
- ``resnet18`` (``imagenet/networks/resnetcs18.py``): its ``layer4`` is built with
  ``act_bit=0`` whatever the argument (the reference does not pass it on), so it runs on float
  activations behind PACT clipping.
- ``resnet50`` (``imagenet/networks/resnetcs50.py``): blocks ``layerS_I``; ``conv1`` and ``fc``
  have 8 candidate bits; every block has a ``res`` shortcut (used only by the first block of a
  stage, which is strided, layer1 included) and unused ``relu1``/``relu2``; activations are
  plain ReLU, never quantized.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import PACT, ActQuant, CSQConv2d, CSQLinear

__all__ = ["resnet20", "resnet20_4bit", "resnet20_2bit", "vgg19bn", "vgg", "resnet18", "resnet50"]


def _clip(act_bit: int) -> nn.Module:
    return nn.ReLU6() if act_bit > 3 else PACT()


def _quant(act_bit: int) -> nn.Module:
    return ActQuant(act_bit) if act_bit else nn.Identity()


def _conv3x3(cin: int, cout: int, stride: int, n_bits: int) -> CSQConv2d:
    return CSQConv2d(cin, cout, 3, stride, 1, bias=False, n_bits=n_bits)


class BasicBlock(nn.Module):
    """conv-bn-clip-quant, conv-bn(+shortcut)-clip-quant; ``residual=False`` is the VGG block."""

    def __init__(self, cin: int, cout: int, stride: int, n_bits: int, act_bit: int, residual: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, n_bits)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout, 1, n_bits)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = _clip(act_bit), _clip(act_bit)
        self.quant1, self.quant2 = _quant(act_bit), _quant(act_bit)
        self.residual = residual
        self.downsample = None
        if residual and (stride != 1 or cin != cout):
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.quant1(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (self.downsample(x) if self.downsample is not None else x)
        return self.quant2(self.relu2(out))


class ResStage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, blocks: int, n_bits: int, act_bit: int):
        super().__init__()
        for i in range(blocks):
            self.add_module(f"block{i + 1}", BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                        n_bits, act_bit))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.children():
            x = block(x)
        return x


class ResNet20(nn.Module):
    def __init__(self, num_classes: int, n_bits: int, act_bit: int, width: int):
        super().__init__()
        w = width
        self.conv1 = _conv3x3(3, w, 1, n_bits)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = ResStage(w, w, 1, 3, n_bits, act_bit)
        self.layer2 = ResStage(w, 2 * w, 2, 3, n_bits, act_bit)
        self.layer3 = ResStage(2 * w, 4 * w, 2, 3, n_bits, act_bit)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = CSQLinear(4 * w, num_classes, bias=True, n_bits=n_bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


# (name, input channels, output channels) in units of ``width``; block1 reads the image
_VGG_BLOCKS = (("block1", 0, 1), ("block2", 1, 2), ("block3_1", 2, 4), ("block3_2", 4, 4),
               ("block4_1", 4, 8), ("block4_2", 8, 8), ("block5_1", 8, 8), ("block5_2", 8, 8))
_VGG_POOL_AFTER = frozenset({"block1", "block2", "block3_2", "block4_2", "block5_2"})


class _VGGFeatures(nn.Module):
    def _add_blocks(self, n_bits: int, act_bit: int, width: int) -> None:
        for name, cin, cout in _VGG_BLOCKS:
            self.add_module(name, BasicBlock(cin * width or 3, cout * width, 1, n_bits, act_bit, residual=False))
        self.maxpool = nn.MaxPool2d(2, 2)

    def features(self, x: Tensor) -> Tensor:
        for name, _, _ in _VGG_BLOCKS:
            x = getattr(self, name)(x)
            if name in _VGG_POOL_AFTER:
                x = self.maxpool(x)
        return x.flatten(1)


class VGG19bn(_VGGFeatures):
    def __init__(self, num_classes: int, n_bits: int, act_bit: int, width: int):
        super().__init__()
        self._add_blocks(n_bits, act_bit, width)
        self.fc = CSQLinear(8 * width, num_classes, bias=True, n_bits=n_bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class VGGImageNet(_VGGFeatures):
    def __init__(self, num_classes: int, n_bits: int, act_bit: int, width: int, image_size: int, hidden: int):
        super().__init__()
        self._add_blocks(n_bits, act_bit, width)
        self.fc1 = CSQLinear(8 * width * (image_size // 32) ** 2, hidden, bias=True, n_bits=n_bits)
        self.dropout1 = nn.Dropout(0.5)
        self.fc2 = CSQLinear(hidden, hidden, bias=True, n_bits=n_bits)
        self.dropout2 = nn.Dropout(0.5)
        self.fc3 = CSQLinear(hidden, num_classes, bias=True, n_bits=n_bits)
        self.relu1, self.relu2 = _clip(act_bit), _clip(act_bit)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout1(self.relu1(self.fc1(self.features(x))))
        x = self.dropout2(self.relu2(self.fc2(x)))
        return self.fc3(x)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, n_bits: int, act_bit: int, width: int):
        super().__init__()
        w = width
        self.conv1 = CSQConv2d(3, w, 7, 2, 3, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = ResStage(w, w, 1, 2, n_bits, act_bit)
        self.layer2 = ResStage(w, 2 * w, 2, 2, n_bits, act_bit)
        self.layer3 = ResStage(2 * w, 4 * w, 2, 2, n_bits, act_bit)
        self.layer4 = ResStage(4 * w, 8 * w, 2, 2, n_bits, 0)  # the reference builds layer4 with act_bit=0
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = CSQLinear(8 * w, num_classes, bias=True, n_bits=n_bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut: bool, n_bits: int, act_bit: int):
        super().__init__()
        self.conv1 = CSQConv2d(cin, mid, 1, bias=False, n_bits=n_bits)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = _conv3x3(mid, mid, stride, n_bits)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = CSQConv2d(mid, cout, 1, bias=False, n_bits=n_bits)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.res = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu1, self.relu2 = _clip(act_bit), _clip(act_bit)  # in the checkpoint, never called
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.res(x) if self.shortcut else x))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int, n_bits: int, act_bit: int, width: int):
        super().__init__()
        w = width
        self.conv1 = CSQConv2d(3, w, 7, 2, 3, bias=False, n_bits=8)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, self.block_names = w, []
        for stage, (blocks, mid) in enumerate(((3, w), (4, 2 * w), (6, 4 * w), (3, 8 * w)), start=1):
            for i in range(blocks):
                name = f"layer{stage}_{i}"
                self.add_module(name, Bottleneck(cin, mid, 4 * mid, 2 if i == 0 else 1, i == 0, n_bits, act_bit))
                self.block_names.append(name)
                cin = 4 * mid
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = CSQLinear(cin, num_classes, bias=True, n_bits=8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, Nbits: int = 8, act_bit: int = 0, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (reference ``ResNet``; default weight-only: float activations)."""
    return ResNet20(num_classes, Nbits, act_bit, width)


def resnet20_4bit() -> nn.Module:
    """Factory for ``--model-factory csqc.models.reference:resnet20_4bit`` (ReLU6, 4-bit acts)."""
    return resnet20(act_bit=4)


def resnet20_2bit() -> nn.Module:
    """Factory with PACT clipping and 2-bit activations (the reference's act_bit <= 3 branch)."""
    return resnet20(act_bit=2)


def vgg19bn(num_classes: int = 10, Nbits: int = 8, act_bit: int = 0, width: int = 64) -> nn.Module:
    """CIFAR VGG (reference ``VGG19bn``)."""
    return VGG19bn(num_classes, Nbits, act_bit, width)


def vgg(num_classes: int = 1000, Nbits: int = 8, act_bit: int = 0, width: int = 64, image_size: int = 224,
        hidden: int = 4096) -> nn.Module:
    """ImageNet VGG with three quantized linear layers; ``image_size`` sets ``fc1``'s inputs."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    return VGGImageNet(num_classes, Nbits, act_bit, width, image_size, hidden)


def resnet18(num_classes: int = 1000, Nbits: int = 8, act_bit: int = 0, width: int = 64) -> nn.Module:
    """ImageNet ResNet-18 (reference ``ResNet18``)."""
    return ResNet18(num_classes, Nbits, act_bit, width)


def resnet50(num_classes: int = 1000, Nbits: int = 6, act_bit: int = 0, width: int = 64) -> nn.Module:
    """ImageNet ResNet-50 (reference ``ResNet50``)."""
    return ResNet50(num_classes, Nbits, act_bit, width)
