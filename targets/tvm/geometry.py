"""Convolution geometry shared by the TVM backends' kernels and glue (plain Python, no TVM)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "conv_geometry", "is_depthwise_layer"]


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of an NCHW conv2d (weights ``[O, C/groups, kh, kw]``)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def padded_h(self) -> int:
        return self.height + 2 * self.padding[0]

    @property
    def padded_w(self) -> int:
        return self.width + 2 * self.padding[1]

    @property
    def out_h(self) -> int:
        return (self.padded_h - self.dilation[0] * (self.kernel_h - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.padded_w - self.dilation[1] * (self.kernel_w - 1) - 1) // self.stride[1] + 1

    @property
    def reduction(self) -> int:
        """K of the implicit GEMM per group."""
        return self.in_per_group * self.kernel_h * self.kernel_w

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group: K = kh*kw, served by the direct int32 kernel."""
        return self.in_per_group == 1


def is_depthwise_layer(op: str, weight_shape) -> bool:
    """Whether a quantized layer runs on the depthwise kernels: a conv with one input channel
    per group (``weight_shape[1] == 1``), whatever ``groups`` is. The kernels decide with
    :attr:`ConvGeometry.is_depthwise`; the planner, packers and cost models must agree with them
    (a 1-channel conv with ``groups == 1`` is one group of C/groups == 1, i.e. depthwise)."""
    return op == "qconv2d" and int(weight_shape[1]) == 1


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def conv_geometry(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Validated :class:`ConvGeometry` from NCHW input and OIHW weight shapes."""
    batch, channels, height, width = map(int, input_shape)
    out_channels, in_per_group, kernel_h, kernel_w = map(int, weight_shape)
    if channels % groups or out_channels % groups or channels // groups != in_per_group:
        raise ValueError(f"inconsistent groups={groups} for input {input_shape} and weight {weight_shape}")
    geometry = ConvGeometry(batch, channels, height, width, out_channels, kernel_h, kernel_w,
                            _pair(stride), _pair(padding), _pair(dilation), int(groups))
    if geometry.out_h <= 0 or geometry.out_w <= 0:
        raise ValueError("convolution output is empty")
    return geometry
