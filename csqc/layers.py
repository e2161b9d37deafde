"""CSQ training layers: bi-level continuous sparsification of weight bits (arXiv 2212.02770).

A CSQ layer with ``N`` candidate bits keeps, per weight, logits of a positive and a negative
value for every bit position, and per layer logits of a bit-selection mask. Every logit is a
gate ``sigmoid(T * logit)``; as the temperature ``T`` grows the gates harden into 0/1 without a
straight-through estimator. ``finalize()`` hardens them for good:

    q = sum_b m_b * 2^b * (p_b - n_b)          W = scale * q / (2^N - 1)

Bit axes are stored least significant first (index ``b`` is worth ``2^b``); the reference
code's MSB-first order exists only in :mod:`csqc.reference`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import ops
from .errors import BadInput

__all__ = [
    "CSQLinear",
    "CSQConv2d",
    "CSQConv1d",
    "CSQConvTranspose2d",
    "CSQConvTranspose1d",
    "ActQuant",
    "TemperatureSchedule",
    "BudgetRegularizer",
    "convert",
    "csq_layers",
    "finalize",
    "set_temperature",
    "average_bits",
    "layer_report",
]

_INIT_LOGIT = 2.0  # |logit| of a bit initialised from float weights: sigmoid(2) = 0.88 at T=1
# A layer's last kept bit position is held at least this far above zero during training, so
# that the hard mask (logit > 0) never loses it to one noisy step: sigmoid(0.5) = 0.62 at T=1.
_KEPT_LOGIT_FLOOR = 0.5


_LOAD_CHUNK_ELEMENTS = 1 << 20  # bit logits per chunk of load_float_weight (4 MiB)


def _mask_to_int(mask: Iterable[bool]) -> int:
    return sum(1 << b for b, on in enumerate(mask) if on)


class _CSQMixin:
    """Shared state and math of CSQLinear and CSQConv2d (the subclasses define ``_run``)."""

    n_bits: int
    finalized: bool

    def _init_csq(self, weight_shape: tuple[int, ...], n_bits: int, bias: bool, weight: Tensor | None = None,
                  finalized: bool = False) -> None:
        """Bits from ``weight`` (else nn.Linear's default init); ``finalized``: the integer weight
        straight from ``weight``, without ever allocating the trainable bits (2N floats per weight)."""
        if not 1 <= n_bits <= 15:
            raise BadInput(f"n_bits must be between 1 and 15, got {n_bits}")
        if weight is not None and tuple(weight.shape) != tuple(weight_shape):
            raise BadInput(f"weight of shape {list(weight.shape)} for a layer of weight shape {list(weight_shape)}")
        if finalized and weight is None:
            raise BadInput("a finalized CSQ layer needs its float weight")
        self.n_bits = n_bits
        self.finalized = False
        self.temperature = 1.0
        if finalized:  # the state a finalized layer has: bias, then q and scale
            self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
            self.input_quant: ActQuant | None = None
            self._load_finalized(weight.detach().float())
            return
        shape = tuple(weight_shape) + (n_bits,)
        self.pweight = nn.Parameter(torch.zeros(shape))
        self.nweight = nn.Parameter(torch.zeros(shape))
        self.mask_weight = nn.Parameter(torch.full((n_bits,), _INIT_LOGIT))
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("exps", 2.0 ** torch.arange(n_bits, dtype=torch.float32) / (2**n_bits - 1))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.input_quant = None
        if weight is None:
            weight = torch.empty(weight_shape)  # nn.Linear's default init, then its bits
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.load_float_weight(weight.detach().float())

    @torch.no_grad()
    def _load_finalized(self, w: Tensor) -> None:
        """What ``load_float_weight`` then ``finalize`` give (every position kept), computed
        directly: ``q = sign(w) * round(|w| * L / max|w|)``."""
        levels = 2**self.n_bits - 1
        s = w.abs().max()
        if s == 0:
            s = torch.tensor(1.0)
        q = torch.round(w.abs() * levels / s).to(torch.int32) * torch.sign(w).to(torch.int32)
        self.register_buffer("q", q.to(torch.int16 if self.n_bits <= 14 else torch.int32))
        self.register_buffer("scale", s.reshape(1).clone())
        self.active_mask = (1 << self.n_bits) - 1
        self.finalized = True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape) if self.finalized else tuple(self.pweight.shape[:-1])

    @torch.no_grad()
    def load_float_weight(self, w: Tensor) -> None:
        """Initialise bits from a float weight: ``|w|`` rounded to N bits of ``max|w|``.

        Works through the output channels in chunks, so the temporaries stay a few MiB whatever
        the layer's size (converting a large model is bounded by the bit parameters themselves).
        """
        levels = 2**self.n_bits - 1
        s = w.abs().max()
        if s == 0:
            s = torch.tensor(1.0)
        exps = 2 ** torch.arange(self.n_bits, dtype=torch.int32)
        rows = max(1, _LOAD_CHUNK_ELEMENTS // max(1, w[0].numel() * self.n_bits))
        for start in range(0, w.shape[0], rows):
            part = w[start:start + rows]
            mag = torch.round(part.abs() * levels / s).to(torch.int32).unsqueeze(-1)
            bits = (mag & exps) > 0  # [rows, ..., N] bool
            pos = (part > 0).unsqueeze(-1)
            self.pweight[start:start + rows] = torch.where(bits & pos, _INIT_LOGIT, -_INIT_LOGIT)
            self.nweight[start:start + rows] = torch.where(bits & ~pos, _INIT_LOGIT, -_INIT_LOGIT)
        self.scale.fill_(float(s))
        self.mask_weight.fill_(_INIT_LOGIT)

    def mask_gate(self) -> Tensor:
        return torch.sigmoid(self.temperature * self.mask_weight)

    def active_bits(self) -> list[int]:
        """Active bit positions (0 = least significant), highest first."""
        if self.finalized:
            return [b for b in reversed(range(self.n_bits)) if self.active_mask >> b & 1]
        return [b for b in reversed(range(self.n_bits)) if self.mask_weight[b] > 0]

    def strongest_bit(self) -> int:
        """The bit position with the largest mask logit; exact ties go to the most significant.

        All logits start equal, so the tie rule picks the bit a layer keeps under budget pressure:
        the MSB keeps the layer's output at the scale of its float weights (the LSB alone would
        shrink it 2^(N-1) times), and the rule is the same on every CPU.
        """
        msb_first = torch.flip(self.mask_weight.detach(), [0])
        return self.n_bits - 1 - int(torch.argmax(msb_first))  # argmax returns the first maximum

    @torch.no_grad()
    def keep_one_bit(self, floor: float = _KEPT_LOGIT_FLOOR) -> int | None:
        """Raise the strongest mask logit to ``floor`` if it is below; returns the position raised.

        The projection step that keeps a training layer alive: at least one position stays active.
        """
        b = self.strongest_bit()
        if self.mask_weight[b] >= floor:
            return None
        self.mask_weight[b] = floor
        return b

    def soft_weight(self) -> Tensor:
        t = self.temperature
        bits = torch.sigmoid(t * self.pweight) - torch.sigmoid(t * self.nweight)
        return (bits * (self.mask_gate() * self.exps)).sum(-1) * self.scale

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """The hardened integer weight ``q`` (what ``finalize`` stores), int32."""
        if self.finalized:
            return self.q.clone()
        q = torch.zeros(self.pweight.shape[:-1], dtype=torch.int32)
        for b in self.active_bits():  # one bit plane at a time: temporaries stay one weight's size
            q += ((self.pweight[..., b] > 0).to(torch.int32) - (self.nweight[..., b] > 0).to(torch.int32)) << b
        return q

    @torch.no_grad()
    def finalize(self) -> None:
        """Harden bits and mask: from now on the layer computes ``scale * q / (2^N - 1)``."""
        if self.finalized:
            return
        q = self.integer_weight()
        self.active_mask = _mask_to_int(bool(v > 0) for v in self.mask_weight)
        scale = self.scale.detach().clone()
        del self.pweight, self.nweight, self.mask_weight, self.scale, self.exps
        self.register_buffer("q", q.to(torch.int16 if self.n_bits <= 14 else torch.int32))
        self.register_buffer("scale", scale)
        self.finalized = True

    _BITS = ("pweight", "nweight", "mask_weight", "scale")

    @torch.no_grad()
    def finalized_copy(self) -> nn.Module:
        """A finalized deep copy that never copies the bit parameters (2N floats per weight):
        saving a model in training form costs its integer weights, not a second set of bits."""
        if self.finalized:
            return copy.deepcopy(self)
        bits = {k: self._parameters.pop(k) for k in self._BITS}
        exps = self._buffers.pop("exps")
        try:
            twin = copy.deepcopy(self)
        finally:
            self._parameters.update(bits)
            self._buffers["exps"] = exps
        twin.register_buffer("q", self.integer_weight().to(torch.int16 if self.n_bits <= 14 else torch.int32))
        twin.register_buffer("scale", self.scale.detach().clone())
        twin.active_mask = _mask_to_int(bool(v > 0) for v in self.mask_weight)
        twin.finalized = True
        return twin

    def float_weight(self) -> Tensor:
        if self.finalized:
            return ops.dequantize_weight(self.q, self.scale, self.n_bits)
        return self.soft_weight()

    def forward(self, x: Tensor) -> Tensor:
        x = self._padded(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._run(x, None if self.finalized else self.soft_weight())

    def _padded(self, x: Tensor) -> Tensor:
        """The input with the padding the layer does not do itself (a conv's ``padding_mode``)."""
        return x


class CSQLinear(_CSQMixin, nn.Module):
    """Linear layer whose weights are CSQ bit sums."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n_bits: int = 8, *,
                 weight: Tensor | None = None, finalized: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_csq((out_features, in_features), n_bits, bias, weight, finalized)

    def _run(self, x: Tensor, soft_weight: Tensor | None) -> Tensor:
        if soft_weight is not None:
            return F.linear(x, soft_weight, self.bias)
        return ops.quant_linear(x, self.q, self.scale, self.bias, self.n_bits, self.active_mask)

    weight = property(lambda self: self.float_weight())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, n_bits={self.n_bits}"


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class CSQConv2d(_CSQMixin, nn.Module):
    """2-D convolution (stride, padding, dilation, groups incl. depthwise) with CSQ weights.

    ``padding_mode`` as ``nn.Conv2d``'s: other than ``zeros``, the input is padded before the
    input quantizer (``F.pad``; its copies leave a per-tensor scale unchanged, so the codes are
    those of quantizing after padding) and the convolution itself pads nothing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        n_bits: int = 8,
        *,
        weight: Tensor | None = None,
        finalized: bool = False,
        padding_mode: str = "zeros",
    ):
        nn.Module.__init__(self)
        pair = nn.modules.utils._pair
        if in_channels % groups or out_channels % groups:
            raise BadInput(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        if isinstance(padding, str):
            raise BadInput("CSQConv2d takes numeric padding, not padding='same'/'valid'")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        if padding_mode not in _PADDING_MODES:
            raise BadInput(f"padding_mode must be one of {', '.join(_PADDING_MODES)}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._init_csq((out_channels, in_channels // groups, *self.kernel_size), n_bits, bias, weight, finalized)

    def _spatial(self, name: str) -> tuple[int, int]:
        """The 2-D form of ``stride``, ``padding``, ... (a 1-D layer keeps 1-D ones, as torch's do)."""
        return getattr(self, name)

    def _padded(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros":
            return x
        (ph, pw) = self._spatial("padding")
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)

    def _run(self, x: Tensor, soft_weight: Tensor | None) -> Tensor:
        stride, dilation = self._spatial("stride"), self._spatial("dilation")
        padding = self._spatial("padding") if self.padding_mode == "zeros" else (0, 0)  # (padded by _padded)
        if soft_weight is not None:
            return F.conv2d(x, soft_weight, self.bias, stride, padding, dilation, self.groups)
        return ops.quant_conv2d(
            x, self.q, self.scale, self.bias, self.n_bits, self.active_mask,
            list(stride), list(padding), list(dilation), self.groups,
        )

    weight = property(lambda self: self.float_weight())

    def extra_repr(self) -> str:
        mode = f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{mode}, "
            f"bias={self.bias is not None}, n_bits={self.n_bits}"
        )


class _OverHeightOne:
    """A 1-D layer as its 2-D base over a height of one: ``[N, C, L]`` (or ``[C, L]``) input gains
    that height around the base's forward, and a 1-D weight gains it at axis 2. Its ``stride``,
    ``padding``, ``kernel_size``, ... are 1-D tuples, as ``nn.Conv1d``'s (code around a layer reads
    ``conv.stride[0]``); the base's forward takes their 2-D forms from ``_spatial``."""

    _HEIGHT = {"kernel_size": 1, "stride": 1, "padding": 0, "output_padding": 0, "dilation": 1}

    def _one_dimensional(self) -> None:
        """After the 2-D base's ``__init__``: keep the 1-D attributes only."""
        for name in self._HEIGHT:
            if hasattr(self, name):
                setattr(self, name, tuple(getattr(self, name)[1:]))

    def _spatial(self, name: str) -> tuple[int, int]:
        return (self._HEIGHT[name], *getattr(self, name))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3):
            raise BadInput(f"{type(self).__name__} takes [N, C, L] or [C, L] input, got shape {list(x.shape)}")
        return super().forward(x.unsqueeze(-2)).squeeze(-2)

    @staticmethod
    def _with_height(weight: Tensor | None, layout: str) -> Tensor | None:
        if weight is None:
            return None
        if weight.dim() != 3:
            raise BadInput(f"weight of shape {list(weight.shape)} for a 1-D convolution (want {layout})")
        return weight.unsqueeze(2)


class CSQConv1d(_OverHeightOne, CSQConv2d):
    """1-D convolution (audio, time series) with CSQ weights: a :class:`CSQConv2d` over a height
    of one. Its input ``[N, C, L]`` (or ``[C, L]``) gains that height around the 2-D layer, so
    its bits, scale and integer weight (``[O, C/groups, 1, K]``) are the 2-D layer's, and capture,
    passes and every target run it as a 2-D convolution; ``weight`` is ``[O, C/groups, K]`` as
    ``nn.Conv1d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        n_bits: int = 8,
        *,
        weight: Tensor | None = None,
        finalized: bool = False,
        padding_mode: str = "zeros",
    ):
        single = nn.modules.utils._single
        if isinstance(padding, str):
            raise BadInput("CSQConv1d takes numeric padding, not padding='same'/'valid'")
        (k,), (s,), (p,), (d,) = single(kernel_size), single(stride), single(padding), single(dilation)
        super().__init__(in_channels, out_channels, (1, k), (1, s), (0, p), (1, d), groups, bias, n_bits,
                         weight=self._with_height(weight, "[O, C/groups, K]"), finalized=finalized,
                         padding_mode=padding_mode)
        self._one_dimensional()

    weight = property(lambda self: self.float_weight().squeeze(2))

    def extra_repr(self) -> str:
        mode = f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{mode}, "
            f"bias={self.bias is not None}, n_bits={self.n_bits}"
        )


class CSQConvTranspose2d(_CSQMixin, nn.Module):
    """2-D transposed convolution (decoders, U-Nets, GAN generators) with CSQ weights.

    The integer weight is kept as that of the stride-one convolution the transposed one equals on
    its zero-stuffed, padded input (``[C_out, C_in/groups, kh, kw]``, kernel flipped:
    :func:`csqc.ops.convolution_weight`), so its rows are output channels as in every CSQ layer;
    capture compiles it as that convolution's polyphase form, which skips the stuffed zeros
    (:func:`csqc.ops.polyphase_weight`). ``weight`` is ``nn.ConvTranspose2d``'s layout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        n_bits: int = 8,
        *,
        weight: Tensor | None = None,
        finalized: bool = False,
    ):
        nn.Module.__init__(self)
        pair = nn.modules.utils._pair
        if in_channels % groups or out_channels % groups:
            raise BadInput(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        self.output_padding, self.dilation = pair(output_padding), pair(dilation)
        if any(e >= max(s, d) for e, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise BadInput(f"output_padding {self.output_padding} must be smaller than the stride or the dilation")
        if weight is not None:
            want = (in_channels, out_channels // groups, *self.kernel_size)
            if tuple(weight.shape) != want:
                raise BadInput(f"weight of shape {list(weight.shape)} for a transposed convolution of weight "
                               f"shape {list(want)}")
            weight = ops.convolution_weight(weight, groups)
        self._init_csq((out_channels, in_channels // groups, *self.kernel_size), n_bits, bias, weight, finalized)

    def _spatial(self, name: str) -> tuple[int, int]:
        """The 2-D form of ``stride``, ``padding``, ... (a 1-D layer keeps 1-D ones, as torch's do)."""
        return getattr(self, name)

    def _run(self, x: Tensor, soft_weight: Tensor | None) -> Tensor:
        stride, padding, extra, dilation = (self._spatial(n) for n in ("stride", "padding", "output_padding", "dilation"))
        if soft_weight is not None:
            return F.conv_transpose2d(x, ops.transposed_weight(soft_weight, self.groups), self.bias, stride,
                                      padding, extra, self.groups, dilation)
        return ops.quant_conv_transpose2d(
            x, self.q, self.scale, self.bias, self.n_bits, self.active_mask, list(stride), list(padding),
            list(extra), list(dilation), self.groups,
        )

    weight = property(lambda self: ops.transposed_weight(self.float_weight(), self.groups))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, n_bits={self.n_bits}"
        )


class CSQConvTranspose1d(_OverHeightOne, CSQConvTranspose2d):
    """1-D transposed convolution (vocoders such as HiFi-GAN, sequence decoders) with CSQ weights:
    a :class:`CSQConvTranspose2d` over a height of one, as :class:`CSQConv1d` is a
    :class:`CSQConv2d`; ``weight`` is ``nn.ConvTranspose1d``'s ``[C_in, C_out/groups, K]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        n_bits: int = 8,
        *,
        weight: Tensor | None = None,
        finalized: bool = False,
    ):
        single = nn.modules.utils._single
        (k,), (s,), (p,), (e,), (d,) = (single(v) for v in (kernel_size, stride, padding, output_padding, dilation))
        super().__init__(in_channels, out_channels, (1, k), (1, s), (0, p), (0, e), groups, bias, (1, d), n_bits,
                         weight=self._with_height(weight, "[C_in, C_out/groups, K]"), finalized=finalized)
        self._one_dimensional()

    weight = property(lambda self: ops.transposed_weight(self.float_weight(), self.groups).squeeze(2))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, n_bits={self.n_bits}"
        )


class _RoundSTE(torch.autograd.Function):
    """Forward: activation fake-quantization; backward: identity (inside the clip range)."""

    @staticmethod
    def forward(ctx, x, bits, static_scale):
        return ops.fake_quant_act(x, bits, static_scale)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _AsymmetricRoundSTE(torch.autograd.Function):
    """Forward: asymmetric fake-quantization; backward: identity."""

    @staticmethod
    def forward(ctx, x, bits, static_range, zero_point):
        return ops.fake_quant_act_asymmetric(x, bits, static_range, zero_point)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


class ActQuant(nn.Module):
    """Activation quantizer: optional ReLU6 or PACT clip, then a-bit quantization.

    ``mode='dynamic'`` uses the reference's per-tensor ``max|x|`` scale on every call;
    ``mode='static'`` uses ``static_scale``, which ``calibrate`` sets from data (the max seen).
    ``symmetric=False``: unsigned codes with a zero point (``csqc.ops``), what ORT's QDQ and
    torch.ao use, so 8-bit codes fit one byte; dynamic: the range ``max(x, 0) - min(x, 0)`` of
    each call; static: ``calibrate`` records the lowest and highest value seen and sets
    ``static_scale`` to that range and ``zero_point`` to ``round((-lo * L) / range)``.
    """

    def __init__(self, bits: int, clip: str | None = None, mode: str = "dynamic", pact_alpha: float = 10.0,
                 symmetric: bool = True):
        super().__init__()
        if not 1 <= bits <= 8:
            raise BadInput(f"activation bits must be between 1 and 8, got {bits}")
        if clip not in (None, "relu6", "pact"):
            raise BadInput(f"unknown activation clip {clip!r}: use relu6, pact or none")
        if mode not in ("dynamic", "static"):
            raise BadInput(f"unknown activation scale mode {mode!r}: use dynamic or static")
        self.bits, self.clip, self.mode, self.symmetric = bits, clip, mode, bool(symmetric)
        self.alpha = nn.Parameter(torch.tensor(float(pact_alpha))) if clip == "pact" else None
        self.static_scale = 0.0
        self.zero_point = 0  # asymmetric static mode
        self.calibrated_range = (0.0, 0.0)  # (lo, hi) seen by calibrate, asymmetric only
        self.calibrating = False

    def _calibrate(self, x: Tensor) -> None:
        if self.symmetric:
            self.static_scale = max(self.static_scale, float(x.detach().abs().max()))
            return
        lo = min(self.calibrated_range[0], float(x.detach().min()))
        hi = max(self.calibrated_range[1], float(x.detach().max()))
        self.calibrated_range = (lo, hi)
        # the dynamic quantizer's own float32 formulas, on the calibration range
        from .interpreter import asymmetric_zero_point

        r = np.float32(np.float32(hi) - np.float32(lo))
        self.static_scale = float(r)
        self.zero_point = asymmetric_zero_point(np.float32(lo), r, 2**self.bits - 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.clip == "relu6":
            x = F.hardtanh(x, 0.0, 6.0)
        elif self.clip == "pact":
            x = torch.minimum(torch.clamp(x, min=0.0), self.alpha)
        if self.calibrating:
            self._calibrate(x)
            return x
        scale = self.static_scale if self.mode == "static" else 0.0
        if self.mode == "static" and scale <= 0:
            raise BadInput("static activation scale is not calibrated: run csqc.layers.calibrate first")
        if not self.symmetric:
            zero_point = self.zero_point if self.mode == "static" else 0
            if self.training:
                return _AsymmetricRoundSTE.apply(x, self.bits, scale, zero_point)
            return ops.act_quant_asymmetric(x, self.bits, scale, zero_point)
        if self.training:
            return _RoundSTE.apply(x, self.bits, scale)
        return ops.act_quant(x, self.bits, scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip}, mode={self.mode}" + ("" if self.symmetric else ", symmetric=False")


@dataclass
class TemperatureSchedule:
    """``T = t_max ** (epoch_in_round / epochs_per_round)``, restarted each round (reference)."""

    epochs: int
    t_max: float = 200.0
    rounds: int = 1

    def __call__(self, epoch: int) -> float:
        per_round = max(1, self.epochs // self.rounds)
        pos = min(epoch % per_round if epoch < per_round * self.rounds else per_round - 1, per_round - 1)
        return float(self.t_max ** ((pos + 1) / per_round))


def csq_layers(model: nn.Module) -> Iterator[tuple[str, _CSQMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, _CSQMixin):
            yield name, m


def set_temperature(model: nn.Module, t: float) -> None:
    for _, m in csq_layers(model):
        m.temperature = t


def finalize(model: nn.Module) -> nn.Module:
    """Finalize every CSQ layer of ``model`` in place and return it in eval mode."""
    for _, m in csq_layers(model):
        m.finalize()
    return model.eval()


def _weight_count(m: _CSQMixin) -> int:
    return math.prod(m.weight_shape)


def average_bits(model: nn.Module) -> float:
    """Parameter-weighted average number of active bit positions over all CSQ layers."""
    total = bits = 0
    for _, m in csq_layers(model):
        n = _weight_count(m)
        total += n
        bits += n * len(m.active_bits())
    return bits / total if total else 0.0


def layer_report(model: nn.Module) -> list[dict]:
    """Per-layer bit allocation: name, op, weight shape, active bit positions."""
    rows = []
    for name, m in csq_layers(model):
        rows.append({
            "name": name,
            "op": "linear" if isinstance(m, CSQLinear) else "conv2d",
            "shape": list(m.weight_shape),
            "n_bits": m.n_bits,
            "active_bits": m.active_bits(),
            "params": _weight_count(m),
            "act_bits": m.input_quant.bits if m.input_quant is not None else None,
        })
    return rows


class BudgetRegularizer:
    """Budget-aware bit regularizer (paper Eq. 4) on total model size.

    ``loss = strength * (r - r_target) * sum_l (P_l / P) * sum_b gate(m_lb)`` where ``r`` is the
    current (hard) size-weighted ratio of kept bits and ``P_l`` the layer's parameter count.
    Over budget the term pushes mask logits down (prunes bits); under budget its sign flips
    and bits grow back.

    Unless ``allow_layer_pruning``, a layer's strongest position is left out of the sum (one bit
    per layer is a fixed cost, not something the budget can buy back) and ``keep_layers_alive``
    holds it active after every mask step. Why: the budget gradient is the same for every
    position of a layer and largest for the largest layer, so all positions of that layer cross
    zero in the same step; after a BatchNorm the task loss cannot resist (the output does not
    depend on the weight's scale), and whether a bit ever grows back was up to float noise.
    """

    def __init__(self, model: nn.Module, target_bits: float, strength: float = 0.5, *,
                 allow_layer_pruning: bool = False):
        self.layers = [m for _, m in csq_layers(model)]
        if not self.layers:
            raise BadInput("model has no CSQ layers: call csqc.convert first")
        self.target_bits = float(target_bits)
        self.strength = strength
        self.allow_layer_pruning = allow_layer_pruning
        total = sum(_weight_count(m) for m in self.layers)
        self.weights = [_weight_count(m) / total for m in self.layers]
        self.n_max = max(m.n_bits for m in self.layers)

    def ratio(self) -> float:
        with torch.no_grad():
            return sum(w * float((m.mask_weight > 0).sum()) for w, m in zip(self.weights, self.layers)) / self.n_max

    def _prunable_gates(self, m: _CSQMixin) -> Tensor:
        gates = m.mask_gate()
        if self.allow_layer_pruning:
            return gates.sum()
        return gates.sum() - gates[m.strongest_bit()]

    def __call__(self) -> Tensor:
        r_target = self.target_bits / self.n_max
        r = self.ratio()
        soft = sum(w * self._prunable_gates(m) for w, m in zip(self.weights, self.layers))
        return self.strength * (r - r_target) * soft

    @torch.no_grad()
    def keep_layers_alive(self) -> list[tuple[int, int]]:
        """Hold each layer's strongest mask logit active (call after every mask step).

        Returns ``(layer index, position)`` of every logit raised; nothing with ``allow_layer_pruning``.
        """
        if self.allow_layer_pruning:
            return []
        raised = []
        for i, m in enumerate(self.layers):
            b = m.keep_one_bit()
            if b is not None:
                raised.append((i, b))
        return raised

    @torch.no_grad()
    def enforce(self) -> list[tuple[int, int]]:
        """Drop the weakest active bits until the hard budget holds; returns what was dropped.

        The regularizer steers toward the budget; this guarantees it at the end of training.
        A layer's last bit is dropped only with ``allow_layer_pruning``.
        """
        min_bits = 0 if self.allow_layer_pruning else 1
        dropped = []
        while self.ratio() * self.n_max > self.target_bits + 1e-9:
            best = None
            for i, (w, m) in enumerate(zip(self.weights, self.layers)):
                if (m.mask_weight > 0).sum() <= min_bits:
                    continue
                for b in range(m.n_bits):
                    if m.mask_weight[b] > 0:
                        cost = float(m.mask_weight[b]) * (1 + b) / w  # weak, low and small-layer bits first
                        key = (cost, i, b)
                        if best is None or key < best[0]:
                            best = (key, m, b)
            if best is None:
                break
            (_, layer_index, _), m, b = best
            m.mask_weight[b] = -abs(float(m.mask_weight[b])) - 1e-3
            dropped.append((layer_index, b))
        return dropped


def convert(model: nn.Module, n_bits: int = 8, act_bits: int | None = None, **options) -> nn.Module:
    """:func:`csqc.conversion.convert` (CSQ layers in place of Linear, Conv2d, attention, LSTM,
    GRU; a report of what stayed float), kept here for code that imports it from ``layers``."""
    from .conversion import convert as convert_model

    return convert_model(model, n_bits, act_bits, **options)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Set the static scale of every static ActQuant to the max |x| seen on ``batches`` (an
    asymmetric one: the range and zero point of the values seen, 0 included)."""
    quants = [m for m in model.modules() if isinstance(m, ActQuant) and m.mode == "static"]
    for q in quants:
        q.calibrating, q.static_scale, q.zero_point, q.calibrated_range = True, 0.0, 0, (0.0, 0.0)
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for q in quants:
            q.calibrating = False
        model.train(was_training)


__all__.append("calibrate")


class PACT(nn.Module):
    """PACT clipping ``min(max(x, 0), alpha)`` with a learned ``alpha`` (reference layout)."""

    def __init__(self, alpha: float = 10.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.clamp(x, min=0.0), self.alpha)


__all__.append("PACT")
