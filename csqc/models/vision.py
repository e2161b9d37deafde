"""Float reference vision architectures: ResNet-18, MobileNetV2 (ImageNet) and ResNet-20 (CIFAR).

ResNet-18 and MobileNetV2 reproduce torchvision's architectures, module names (hence state-dict
keys) and default initialisation, so torchvision checkpoints load with ``load_state_dict`` without
depending on torchvision. All forwards are free of data-dependent control flow, so the models
export with ``torch.export.export`` as a single graph.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "InvertedResidual", "MobileNetV2", "resnet18", "mobilenet_v2", "resnet20"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
    # Projection (1x1 conv + BN) only where the shape changes; identity otherwise.
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (torchvision's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Static (construction-time) branch: export traces one path per module.
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(inplanes, planes, stride, _shortcut(inplanes, planes, stride))]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _init_resnet(model: nn.Module) -> None:
    # torchvision's ResNet init; Linear keeps PyTorch's default init, as in torchvision.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet with ``BasicBlock`` (7x7 stem, max-pool, four stages)."""

    def __init__(self, layers: List[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_stage(64, 64, layers[0], 1)
        self.layer2 = _make_stage(64, 128, layers[1], 2)
        self.layer3 = _make_stage(128, 256, layers[2], 2)
        self.layer4 = _make_stage(256, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        _init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class _CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem, three stages of 16/32/64 channels."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(16, 16, n, 1)
        self.layer2 = _make_stage(16, 32, n, 2)
        self.layer3 = _make_stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% below it (torchvision)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # Plain Sequential with torchvision's Conv2dNormActivation layout, so keys are `<i>.0/.1`.
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden_dim, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction, not data-dependent
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (``features`` + ``classifier``)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2) -> None:
        super().__init__()
        # t (expansion), c (channels), n (repeats), s (first stride)
        settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [_conv_bn_relu6(3, input_channel, stride=2)]
        for t, c, n, s in settings:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(_conv_bn_relu6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        # torchvision's MobileNetV2 init (note: kaiming default nonlinearity, not "relu").
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 for 3x224x224 input, torchvision-identical modules, keys and init."""
    return ResNet([2, 2, 2, 2], num_classes)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 3x224x224 input, torchvision-identical modules, keys and init."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (3x32x32 in): 3 stages x 3 BasicBlocks, 1x1 conv + BN projection shortcuts."""
    return _CifarResNet(3, num_classes)
