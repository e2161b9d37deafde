"""Models written the way users of the public CSQ reference code write them (test helper).

An independent implementation of the reference math, written for csqc's tests: bit layers
that hold ``pweight``/``nweight`` (bit axis last, most significant first), ``mask_weight``,
``scale``, ``exps``/``bexps``, the rewinding copies ``init_pweight``/``init_nweight`` and an
optional quantized bias (``pbias``/``nbias``/``biasscale``); blocks call ``conv(x, temp,
ticket)``; the top-level ``forward(x)`` reads ``self.temp`` and ``self.ticket``; activations
go through a function-level quantizer (an ``autograd.Function`` with a data-dependent
``if s == 0`` branch, which ``torch.export`` cannot trace).

The classes mirror the reference architectures' state-dict layout, so their checkpoints are
checkpoints "as the reference writes them", and they serve as ``--model-factory`` targets.
``width`` scales channel counts so tests stay small; module names do not change.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["BitConv2d", "BitLinear", "QuantizeAct", "ResNet", "VGG19bn", "ResNet18", "ResNet50", "VGGImageNet",
           "randomize_trained"]


def _bit_values(n_bits: int) -> Tensor:
    """2^(N-1-i) / (2^N - 1) for i = 0..N-1: bit i is worth this fraction of the scale."""
    return torch.tensor([2.0 ** (n_bits - 1 - i) for i in range(n_bits)]) / (2**n_bits - 1)


class _Bits(nn.Module):
    """Shared parameters of the bit layers; subclasses set ``weight_shape`` and ``_apply_op``."""

    def _make_bits(self, weight_shape: tuple[int, ...], out: int, n_bits: int, bias: bool) -> None:
        self.Nbits = n_bits
        shape = (*weight_shape, n_bits)
        self.pweight = nn.Parameter(torch.randn(shape))
        self.nweight = nn.Parameter(torch.randn(shape))
        self.mask_weight = nn.Parameter(torch.ones(n_bits))
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-d, as the reference's initialisation leaves it
        self.exps = nn.Parameter(_bit_values(n_bits))
        self.bexps = nn.Parameter(_bit_values(n_bits))
        self.init_pweight = nn.Parameter(torch.zeros(shape))
        self.init_nweight = nn.Parameter(torch.zeros(shape))
        if bias:
            self.pbias = nn.Parameter(torch.zeros(out, n_bits))
            self.nbias = nn.Parameter(torch.zeros(out, n_bits))
            self.biasscale = nn.Parameter(torch.tensor(1.0))
        else:
            self.pbias = self.nbias = self.biasscale = None

    def _weight(self, temp, ticket) -> Tensor:
        keep = (self.mask_weight > 0).float() if ticket else torch.sigmoid(temp * self.mask_weight)
        signed_bits = torch.sigmoid(temp * self.pweight) - torch.sigmoid(temp * self.nweight)
        return (signed_bits * self.exps * keep).sum(-1) * self.scale

    def _bias(self) -> Tensor | None:
        if self.pbias is None:
            return None
        b = ((self.pbias - self.nbias) * self.bexps).sum(-1).clamp(-1.0, 1.0)
        levels = 2**self.pbias.shape[-1] - 1
        return torch.round(b.abs() * levels) / levels * torch.sign(b) * self.biasscale


class BitConv2d(_Bits):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False, Nbits=8):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups
        self.kernel_size = (kernel_size,) * 2
        self.padding_mode = "zeros"
        self._make_bits((cout, cin // groups, kernel_size, kernel_size), cout, Nbits, bias)

    def forward(self, x, temp=1, ticket=False):
        return F.conv2d(x, self._weight(temp, ticket), self._bias(), self.stride, self.padding, self.dilation,
                        self.groups)


class BitLinear(_Bits):
    def __init__(self, cin, cout, Nbits=8, bias=True):
        super().__init__()
        self._make_bits((cout, cin), cout, Nbits, bias)

    def forward(self, x, temp=1, ticket=False):
        return F.linear(x, self._weight(temp, ticket), self._bias())


class QuantizeAct(torch.autograd.Function):
    """Max-abs a-bit activation quantizer, straight-through gradient; bit 0 = no quantization."""

    @staticmethod
    def forward(ctx, x, bit):
        if bit == 0:
            return x
        s = torch.max(torch.abs(x))
        if s == 0:  # data-dependent: torch.export cannot trace this branch
            return x * 0
        levels = 2**bit - 1
        return s * (torch.round(torch.abs(x) * levels / s) / levels) * torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ClipAct(torch.autograd.Function):
    """PACT-style clipping to [0, alpha] with a learned alpha."""

    @staticmethod
    def forward(ctx, x, alpha):
        return x.clamp(min=0.0).min(alpha)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LearnedClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return ClipAct.apply(x, self.alpha)


def _act(act_bit: int) -> nn.Module:
    return nn.ReLU6(inplace=True) if act_bit > 3 else LearnedClip()


class _Net(nn.Module):
    """What every reference network has: temperature and ticket flags read in forward."""

    def __init__(self):
        super().__init__()
        self.temp = 1
        self.ticket = False


class Block(nn.Module):
    """Two 3x3 bit convolutions with BatchNorm, clipping and activation quantization."""

    def __init__(self, cin, cout, stride=1, downsample=None, Nbits=8, act_bit=0, residual=True):
        super().__init__()
        self.conv1 = BitConv2d(cin, cout, 3, stride, 1, Nbits=Nbits)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = BitConv2d(cout, cout, 3, 1, 1, Nbits=Nbits)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = _act(act_bit), _act(act_bit)
        if residual:
            self.downsample = downsample
        self.residual = residual
        self.act_bit = act_bit

    def forward(self, x, temp, ticket=False):
        out = QuantizeAct.apply(self.relu1(self.bn1(self.conv1(x, temp, ticket))), self.act_bit)
        out = self.bn2(self.conv2(out, temp, ticket))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)
        return QuantizeAct.apply(self.relu2(out), self.act_bit)


class Stage(nn.Module):
    def __init__(self, cin, cout, stride, blocks, Nbits, act_bit):
        super().__init__()
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        for i in range(blocks):
            setattr(self, f"block{i + 1}", Block(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                 down if i == 0 else None, Nbits, act_bit))
        self.blocks = blocks

    def forward(self, x, temp, ticket):
        for i in range(self.blocks):
            x = getattr(self, f"block{i + 1}")(x, temp, ticket)
        return x


class ResNet(_Net):
    """CIFAR ResNet-20 (``cifar10/network/resnetcs20.py``'s layout)."""

    def __init__(self, num_classes=10, Nbits=8, act_bit=0, width=16):
        super().__init__()
        w = width
        self.conv1 = BitConv2d(3, w, 3, 1, 1, Nbits=Nbits)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = Stage(w, w, 1, 3, Nbits, act_bit)
        self.layer2 = Stage(w, 2 * w, 2, 3, Nbits, act_bit)
        self.layer3 = Stage(2 * w, 4 * w, 2, 3, Nbits, act_bit)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = BitLinear(4 * w, num_classes, Nbits=Nbits)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x, self.temp, self.ticket)))
        for stage in (self.layer1, self.layer2, self.layer3):
            x = stage(x, self.temp, self.ticket)
        return self.fc(self.avgpool(x).view(x.size(0), -1), self.temp, self.ticket)


_VGG_BLOCKS = (("block1", 1, 1), ("block2", 1, 2), ("block3_1", 2, 4), ("block3_2", 4, 4),
               ("block4_1", 4, 8), ("block4_2", 8, 8), ("block5_1", 8, 8), ("block5_2", 8, 8))
_POOL_AFTER = {"block1", "block2", "block3_2", "block4_2", "block5_2"}


class _VGGFeatures(_Net):
    def _make_features(self, Nbits, act_bit, width):
        for name, cin, cout in _VGG_BLOCKS:
            setattr(self, name, Block(3 if name == "block1" else cin * width, cout * width, Nbits=Nbits,
                                      act_bit=act_bit, residual=False))
        self.maxpool = nn.MaxPool2d(2, 2)

    def _features(self, x, ticket):
        for name, _, _ in _VGG_BLOCKS:
            x = getattr(self, name)(x, self.temp, ticket)
            if name in _POOL_AFTER:
                x = self.maxpool(x)
        return x.view(x.size(0), -1)


class VGG19bn(_VGGFeatures):
    """CIFAR VGG (``cifar10/network/vgg.py``): eight conv blocks, one bit linear layer."""

    def __init__(self, num_classes=10, Nbits=8, act_bit=0, width=64):
        super().__init__()
        self._make_features(Nbits, act_bit, width)
        self.fc = BitLinear(8 * width, num_classes, Nbits=Nbits)

    def forward(self, x):
        return self.fc(self._features(x, self.ticket), self.temp, self.ticket)


class VGGImageNet(_VGGFeatures):
    """ImageNet VGG (the reference's former ``imagenet/networks/vgg.py``): three bit linear layers.

    Its blocks were called without ``ticket``, so the mask stays a sigmoid gate.
    """

    def __init__(self, num_classes=1000, Nbits=8, act_bit=0, width=64, image_size=224, hidden=4096):
        super().__init__()
        self._make_features(Nbits, act_bit, width)
        self.fc1 = BitLinear(8 * width * (image_size // 32) ** 2, hidden, Nbits=Nbits)
        self.dropout1 = nn.Dropout(0.5)
        self.fc2 = BitLinear(hidden, hidden, Nbits=Nbits)
        self.dropout2 = nn.Dropout(0.5)
        self.fc3 = BitLinear(hidden, num_classes, Nbits=Nbits)
        self.relu1, self.relu2 = _act(act_bit), _act(act_bit)

    def forward(self, x):
        x = self._features(x, False)
        x = self.dropout1(self.relu1(self.fc1(x, self.temp)))
        x = self.dropout2(self.relu2(self.fc2(x, self.temp)))
        return self.fc3(x, self.temp)


class ResNet18(_Net):
    """ImageNet ResNet-18 (``imagenet/networks/resnetcs18.py``); its last stage is built with
    ``act_bit=0`` whatever the argument (the reference does not pass it on)."""

    def __init__(self, num_classes=1000, Nbits=8, act_bit=0, width=64):
        super().__init__()
        w = width
        self.conv1 = BitConv2d(3, w, 7, 2, 3, Nbits=Nbits)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Stage(w, w, 1, 2, Nbits, act_bit)
        self.layer2 = Stage(w, 2 * w, 2, 2, Nbits, act_bit)
        self.layer3 = Stage(2 * w, 4 * w, 2, 2, Nbits, act_bit)
        self.layer4 = Stage(4 * w, 8 * w, 2, 2, Nbits, 0)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = BitLinear(8 * w, num_classes, Nbits=Nbits)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x, self.temp, self.ticket))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x, self.temp, self.ticket)
        return self.fc(torch.flatten(self.avgpool(x), 1), self.temp, self.ticket)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with float ReLU activations; ``res`` exists in every block."""

    def __init__(self, cin, mid, cout, stride, downsample, Nbits, act_bit):
        super().__init__()
        self.conv1 = BitConv2d(cin, mid, 1, Nbits=Nbits)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = BitConv2d(mid, mid, 3, stride, 1, Nbits=Nbits)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = BitConv2d(mid, cout, 1, Nbits=Nbits)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.res = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu1, self.relu2 = _act(act_bit), _act(act_bit)  # built, never called
        self.downsample = downsample

    def forward(self, x, temp, ticket):
        out = self.relu(self.bn1(self.conv1(x, temp, ticket)))
        out = self.relu(self.bn2(self.conv2(out, temp, ticket)))
        out = self.bn3(self.conv3(out, temp, ticket))
        out += self.res(x) if self.downsample else x
        return self.relu(out)


class ResNet50(_Net):
    """ImageNet ResNet-50 (``imagenet/networks/resnetcs50.py``): first and last layer 8 bits,
    blocks named ``layerS_I``, the first block of every stage strided (layer1 included)."""

    def __init__(self, num_classes=1000, Nbits=6, act_bit=0, width=64):
        super().__init__()
        w = width
        self.conv1 = BitConv2d(3, w, 7, 2, 3, Nbits=8)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.names = []
        cin = w
        for stage, (blocks, mid) in enumerate(((3, w), (4, 2 * w), (6, 4 * w), (3, 8 * w)), start=1):
            for i in range(blocks):
                name = f"layer{stage}_{i}"
                setattr(self, name, Bottleneck(cin, mid, 4 * mid, 2 if i == 0 else 1, i == 0, Nbits, act_bit))
                self.names.append(name)
                cin = 4 * mid
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = BitLinear(cin, num_classes, Nbits=8)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x, self.temp, self.ticket))))
        for name in self.names:
            x = getattr(self, name)(x, self.temp, self.ticket)
        return self.fc(torch.flatten(self.avgpool(x), 1), self.temp, self.ticket)


@torch.no_grad()
def randomize_trained(model: nn.Module, seed: int = 0, temp: float = 200.0, dead_layer: str | None = None) -> None:
    """Give ``model`` the state of a finished CSQ run: bit logits far from 0 (saturated gates at
    ``temp``), random masks with at least one kept position (none in ``dead_layer``), random
    scales, quantized biases, BatchNorm statistics and PACT alphas; ticket mode on."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, _Bits):
            for p in (m.pweight, m.nweight):
                p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.4, 1.0, -1.0))
            m.init_pweight.copy_(torch.randn(m.init_pweight.shape, generator=g))
            m.init_nweight.copy_(torch.randn(m.init_nweight.shape, generator=g))
            mask = torch.where(torch.rand(m.Nbits, generator=g) < 0.5, 1.0, -1.0)
            mask[int(torch.randint(m.Nbits, (1,), generator=g))] = 1.0
            m.mask_weight.copy_(-torch.ones(m.Nbits) if name == dead_layer else mask)
            m.scale.fill_(float(torch.rand(1, generator=g)) * 0.5 + 0.2)
            if m.pbias is not None:
                m.pbias.copy_((torch.rand(m.pbias.shape, generator=g) < 0.3).float())
                m.nbias.copy_((torch.rand(m.nbias.shape, generator=g) < 0.3).float())
                m.biasscale.fill_(0.3)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1 + 0.1)
        elif isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
        elif isinstance(m, LearnedClip):
            m.alpha.fill_(float(torch.rand(1, generator=g)) * 2 + 1)
    model.temp, model.ticket = temp, True
    model.eval()
