"""Float reference generator architectures, built from transposed convolutions: a DCGAN image
generator (Radford et al. 2016: a 1x1 latent up to 64x64 by stride-2 4x4 transposed convs with
BatchNorm and ReLU, tanh out) and a HiFi-GAN-style vocoder (Kong et al. 2020: mel frames up to
audio samples by 1-D transposed convs, each followed by a residual block of dilated 1-D convs
with leaky ReLUs). Widths are knobs so tests and benchmarks can run them small; the forwards
export with ``torch.export.export`` as one graph.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["dcgan_generator", "VocoderResBlock", "Vocoder", "hifigan_generator"]


def dcgan_generator(latent: int = 100, width: int = 32, channels: int = 3) -> nn.Sequential:
    """DCGAN's generator: ``[N, latent, 1, 1] -> [N, channels, 64, 64]`` (``width``: its ngf)."""
    layers, c = [], latent
    for i, out in enumerate((width * 8, width * 4, width * 2, width)):
        stride, padding = (1, 0) if i == 0 else (2, 1)
        layers += [nn.ConvTranspose2d(c, out, 4, stride, padding, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
        c = out
    return nn.Sequential(*layers, nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh())


class VocoderResBlock(nn.Module):
    """HiFi-GAN's residual block: per dilation, ``x + conv(leaky(conv_dilated(leaky(x))))``."""

    def __init__(self, channels: int, kernel: int = 3, dilations=(1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dilated, conv in zip(self.convs1, self.convs2):
            x = x + conv(F.leaky_relu(dilated(F.leaky_relu(x, 0.1)), 0.1))
        return x


class Vocoder(nn.Module):
    """HiFi-GAN's generator: ``[N, mels, T] -> [N, 1, T * prod(rates)]``; each upsampling is a
    transposed conv of kernel ``2 * rate`` (HiFi-GAN V1's), halving the channels."""

    def __init__(self, mels: int = 80, width: int = 64, rates=(8, 8, 2), kernels=(16, 16, 4)):
        super().__init__()
        self.pre = nn.Conv1d(mels, width, 7, padding=3)
        self.ups, self.res = nn.ModuleList(), nn.ModuleList()
        c = width
        for rate, kernel in zip(rates, kernels):
            self.ups.append(nn.ConvTranspose1d(c, c // 2, kernel, rate, padding=(kernel - rate) // 2))
            c //= 2
            self.res.append(VocoderResBlock(c))
        self.post = nn.Conv1d(c, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for up, res in zip(self.ups, self.res):
            x = res(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.post(F.leaky_relu(x)))


def hifigan_generator(mels: int = 80, width: int = 64) -> Vocoder:
    """A HiFi-GAN-style vocoder of three upsampling stages (rates 8, 8, 2; V1 has a fourth of 2)
    and ``width`` initial channels (V1: 512; 64 by default, a small model's)."""
    return Vocoder(mels, width)
