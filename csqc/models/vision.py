"""Float reference vision architectures: ResNet-18, MobileNetV2 (ImageNet) and ResNet-20 (CIFAR),
plus MobileNetV3-Small-, EfficientNet-B0- and SqueezeNet-1.1-style networks.

ResNet-18 and MobileNetV2 reproduce torchvision's architectures, module names (hence state-dict
keys) and default initialisation, so torchvision checkpoints load with ``load_state_dict`` without
depending on torchvision. The MobileNetV3, EfficientNet and SqueezeNet networks follow their
papers' structure (Howard et al. 2019, Tan & Le 2019, Iandola et al. 2016 / SqueezeNet v1.1) with
width (and for EfficientNet depth) knobs, so tests can run them tiny; they exercise hardswish,
hardsigmoid squeeze-excitation, SiLU and ceil_mode pooling. A U-Net (segmentation) upsamples by
transposed convolutions and concatenates skips. All forwards are free of
data-dependent control flow, so the models export with ``torch.export.export`` as a single graph.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "InvertedResidual", "MobileNetV2", "resnet18", "mobilenet_v2", "resnet20",
           "SqueezeExcitation", "MobileNetV3Small", "mobilenet_v3_small", "MBConv", "EfficientNetB0",
           "efficientnet_b0", "Fire", "SqueezeNet", "squeezenet1_1", "UNet", "unet"]


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

        _init_mobile(self)

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


# --------------------------------------------------------------------------------------------
# MobileNetV3-Small, EfficientNet-B0 and SqueezeNet 1.1 (from the papers' structure)
# --------------------------------------------------------------------------------------------
def _conv_bn_act(inp: int, oup: int, kernel_size: int, stride: int, groups: int, act: Optional[nn.Module]) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average, 1x1 reduce + activation, 1x1 expand + gate, rescale."""

    def __init__(self, channels: int, squeezed: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = act
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class _MobileNetV3Block(nn.Module):
    """Expansion 1x1 (unless expansion == input), depthwise kxk, optional SE, linear 1x1."""

    def __init__(self, inp: int, kernel: int, expanded: int, oup: int, use_se: bool, hardswish: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        layers: List[nn.Module] = []
        if expanded != inp:
            layers.append(_conv_bn_act(inp, expanded, 1, 1, 1, act(inplace=True)))
        layers.append(_conv_bn_act(expanded, expanded, kernel, stride, expanded, act(inplace=True)))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8), nn.ReLU(inplace=True),
                                            nn.Hardsigmoid(inplace=True)))
        layers.append(_conv_bn_act(expanded, oup, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small (Table 2 of the paper): hardswish stem, 11 bottlenecks, 1x1 head, MLP."""

    # kernel, expansion, output, squeeze-excite, hardswish, stride
    SETTINGS = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, last_channel: int = 1024,
                 dropout: float = 0.2, num_blocks: Optional[int] = None) -> None:
        super().__init__()
        width = lambda c: _make_divisible(c * width_mult, 8)  # noqa: E731
        inp = width(16)
        features: List[nn.Module] = [_conv_bn_act(3, inp, 3, 2, 1, nn.Hardswish(inplace=True))]
        for kernel, expanded, out, use_se, hardswish, stride in self.SETTINGS[:num_blocks]:
            features.append(_MobileNetV3Block(inp, kernel, width(expanded), width(out), use_se, hardswish, stride))
            inp = width(out)
        head = 6 * inp
        features.append(_conv_bn_act(inp, head, 1, 1, 1, nn.Hardswish(inplace=True)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(head, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))
        _init_mobile(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _init_mobile(model: nn.Module) -> None:
    """torchvision's init of its mobile networks (note: kaiming's default nonlinearity, not "relu")."""
    for m in model.modules():
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


class MBConv(nn.Module):
    """EfficientNet's mobile inverted bottleneck: 1x1 expansion (ratio > 1), depthwise kxk, SE
    squeezing to a quarter of the block's input channels, linear 1x1; SiLU throughout."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        expanded = inp * expand_ratio
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(inp, expanded, 1, 1, 1, nn.SiLU(inplace=True)))
        layers += [
            _conv_bn_act(expanded, expanded, kernel, stride, expanded, nn.SiLU(inplace=True)),
            SqueezeExcitation(expanded, max(1, inp // 4), nn.SiLU(inplace=True), nn.Sigmoid()),
            _conv_bn_act(expanded, oup, 1, 1, 1, None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == oup  # stochastic depth is the identity in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 (Table 1 of the paper): SiLU stem, seven MBConv stages, 1x1 head, linear."""

    # expansion, kernel, stride, output channels, repeats
    SETTINGS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        width = lambda c: _make_divisible(c * width_mult, 8)  # noqa: E731
        inp = width(32)
        features: List[nn.Module] = [_conv_bn_act(3, inp, 3, 2, 1, nn.SiLU(inplace=True))]
        for expand, kernel, stride, out, repeats in self.SETTINGS:
            stage = []
            for i in range(max(1, math.ceil(repeats * depth_mult))):
                stage.append(MBConv(inp, width(out), kernel, stride if i == 0 else 1, expand))
                inp = width(out)
            features.append(nn.Sequential(*stage))
        head = width(1280)
        features.append(_conv_bn_act(inp, head, 1, 1, 1, nn.SiLU(inplace=True)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(head, num_classes))
        _init_mobile(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, inp: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inp, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(s)), self.relu(self.expand3x3(s))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1: 3x3/2 stem, eight Fire modules between ceil_mode 3x3/2 max pools, and a
    1x1 convolution classifier averaged over the image."""

    # squeeze, expand (each of 1x1 and 3x3); "M" is a ceil_mode max pool
    SETTINGS = ["M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256), (64, 256)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        width = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        inp = width(64)
        features: List[nn.Module] = [nn.Conv2d(3, inp, 3, stride=2), nn.ReLU(inplace=True)]
        for entry in self.SETTINGS:
            if entry == "M":
                features.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            squeeze, expand = width(entry[0]), width(entry[1])
            features.append(Fire(inp, squeeze, expand, expand))
            inp = 2 * expand
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Conv2d(inp, num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0, last_channel: int = 1024,
                       num_blocks: Optional[int] = None) -> MobileNetV3Small:
    """MobileNetV3-Small for 3x224x224 input (hardswish, hardsigmoid-gated squeeze-excitation);
    ``num_blocks`` keeps only the first bottlenecks (tiny test networks; the fifth is the first
    hardswish block with a residual)."""
    return MobileNetV3Small(num_classes=num_classes, width_mult=width_mult, last_channel=last_channel,
                            num_blocks=num_blocks)


def efficientnet_b0(num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0) -> EfficientNetB0:
    """EfficientNet-B0 for 3x224x224 input (SiLU, MBConv + SE); ``depth_mult`` scales each
    stage's repeats (rounded up), ``width_mult`` the channels, as in the paper's compound scaling."""
    return EfficientNetB0(num_classes=num_classes, width_mult=width_mult, depth_mult=depth_mult)


def squeezenet1_1(num_classes: int = 1000, width_mult: float = 1.0) -> SqueezeNet:
    """SqueezeNet 1.1 for 3x224x224 input (Fire modules, ceil_mode max pools, cat)."""
    return SqueezeNet(num_classes=num_classes, width_mult=width_mult)


def _double_conv(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                         nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) for segmentation: ``levels`` poolings down, each level two
    3x3 conv + BatchNorm + ReLU, and back up by 2x2 stride-2 transposed convs whose outputs are
    concatenated with the skip of their level; a 1x1 conv to ``num_classes`` per pixel. The
    upsampled half of each concatenation is signed (no activation after the transposed conv)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 16, levels: int = 3):
        super().__init__()
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])] +
                                  [_double_conv(widths[i], widths[i + 1]) for i in range(levels)])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(levels)))
        self.merge = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(levels)))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


def unet(in_channels: int = 3, num_classes: int = 2, width: int = 16, levels: int = 3) -> UNet:
    """A U-Net of ``levels`` poolings (input sides must divide by ``2**levels``)."""
    return UNet(in_channels, num_classes, width, levels)
