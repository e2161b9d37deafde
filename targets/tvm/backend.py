"""What a TVM backend gives the shared planner (``csqc.targets.tvm.lower``).

A backend is the per-device half of a TVM target: the TensorIR builders of the quantized
layers (``kernels``) and of everything else (``glue``), the weight packers matching those
kernels (``packing``), and the cost model that picks a kernel per quantized layer. The
planner is written against this protocol only; ``llvm``, ``aarch64`` and ``cuda`` implement it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

from csqc.ir import Node

__all__ = ["LayerChoice", "TvmBackend"]


@dataclass
class LayerChoice:
    kernel: str  # bitserial | bitparallel | lut (float input, x86) | float
    reason: str


@runtime_checkable
class TvmBackend(Protocol):
    name: str  # the target's name, for messages
    # builders, one per glue op (quantize, dequantize, epilogue, conv2d, pooling, ...): PrimFuncs
    glue: ModuleType
    # quantized-layer builders (bitserial_dense / _conv2d, bitparallel_dense / _conv2d) and knobs
    kernels: ModuleType
    # weight packers in the layouts ``kernels`` reads (pack_weight_planes, pack_bitparallel_weight, ...)
    packing: ModuleType
    # signed activations feeding only linear layers become one offset code buffer (code + L)
    offset_codes: bool
    # the glue's epilogue writes activation codes (fused output quantization, ``csqc.ir``);
    # else a layer with ``out_bits`` runs its float epilogue, then the quantize kernel
    fused_requant: bool
    # a residual add (and the relu/clip and quantize after it) runs in the epilogue of the integer
    # layer that feeds it (needs fused_requant and the glue epilogue's has_residual)
    fused_residual: bool
    # depthwise bit-parallel convs whose partial sums fit int16 accumulate in int16 (twice the lanes)
    int16_depthwise: bool
    # other bit-parallel convs whose outputs fit int16 store them as int16 (the kernel's
    # out_dtype, the epilogue's acc_storage)
    int16_conv_outputs: bool

    def choose_kernel(self, n: Node, rows: int, q: np.ndarray) -> LayerChoice:
        """The kernel for quantized layer ``n`` with ``rows`` output rows and integer weights ``q``."""
        ...
