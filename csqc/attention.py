"""CSQ multi-head attention: ``nn.MultiheadAttention`` with CSQ q, k, v and output projections.

``csqc.convert`` replaces every ``nn.MultiheadAttention`` with :class:`CSQMultiheadAttention`.
The packed ``in_proj_weight`` (or the separate ``q/k/v_proj_weight`` when ``kdim``/``vdim``
differ from ``embed_dim``) is split into three :class:`~csqc.layers.CSQLinear` layers, so each
projection gets its own bits, mask and scale. These are the memory-bound layers of a batch-1
transformer, where bit-serial kernels pay most.

Attention is written out with ops csqc captures (``transpose``/``reshape``, ``matmul``, ``mul``
by the ``1/sqrt(head_dim)`` scale, ``add`` of float masks, ``softmax``, ``mean``) rather than
``F.scaled_dot_product_attention``::

    q, k, v = q_proj(query), k_proj(key), v_proj(value)          split into heads
    weights = softmax((q / sqrt(head_dim)) @ k^T + masks)        dropout in training
    output  = out_proj(weights @ v)                              heads joined

``forward`` has ``nn.MultiheadAttention.forward``'s signature and returns what it returns. The
module declares no packed projection (``_qkv_same_embed_dim`` False, ``in_proj_bias`` None), so
``nn.TransformerEncoderLayer``'s fused fast path, which would read the float packed weights,
declines and calls this forward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import BadInput
from .layers import ActQuant, CSQLinear

__all__ = ["CSQMultiheadAttention", "from_torch", "unsupported_reason"]


class CSQMultiheadAttention(nn.Module):
    """Multi-head attention whose four projections are CSQ layers (see the module docstring).

    Unsupported forms of ``nn.MultiheadAttention`` (``add_bias_kv``, ``add_zero_attn``) are
    refused by :func:`from_torch`; everything else (``batch_first`` both ways, ``kdim``/``vdim``,
    with or without bias, unbatched inputs, boolean or float masks) is supported.
    """

    # no packed float projection exists: fused kernels that read one must decline (see above)
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, n_bits: int = 8):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise BadInput(f"embed_dim {embed_dim} must be a positive multiple of num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        self.q_proj = CSQLinear(embed_dim, embed_dim, bias, n_bits)
        self.k_proj = CSQLinear(self.kdim, embed_dim, bias, n_bits)
        self.v_proj = CSQLinear(self.vdim, embed_dim, bias, n_bits)
        self.out_proj = CSQLinear(embed_dim, embed_dim, bias, n_bits)

    def _heads(self, x: Tensor) -> Tensor:
        """``[N, T, E]`` -> ``[N, H, T, head_dim]``."""
        n, t, _ = x.shape
        return x.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _additive_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, dtype) -> Tensor | None:
        """Both masks as one float mask broadcastable to ``[N, H, L, S]`` (True = not attended)."""
        mask = None
        if attn_mask is not None:
            mask = _as_float_mask(attn_mask, dtype)
            if mask.dim() == 3:  # [N * H, L, S]
                mask = mask.reshape(n, self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            padding = _as_float_mask(key_padding_mask, dtype).reshape(n, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention: the flag is only a hint
            raise BadInput("is_causal needs attn_mask (the causal mask itself), as in nn.MultiheadAttention")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [T, N, E] -> [N, T, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        q = self._heads(self.q_proj(query)) * (1.0 / math.sqrt(self.head_dim))
        k, v = self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1))  # [N, H, L, S]
        mask = self._additive_mask(attn_mask, key_padding_mask, n, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(torch.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(context)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


def _as_float_mask(mask: Tensor, dtype) -> Tensor:
    """A boolean mask (True = masked out) as ``-inf``/0; a float mask as it is (added)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise BadInput(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot become a :class:`CSQMultiheadAttention`, or None if it can."""
    if mha.bias_k is not None:
        return "add_bias_kv=True (learned key/value bias rows) is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


@torch.no_grad()
def from_torch(mha: nn.MultiheadAttention, n_bits: int = 8, act_bits: int | None = None, *,
               act_clip: str | None = None, act_mode: str = "dynamic",
               quantize_first_input: bool = True) -> CSQMultiheadAttention:
    """A :class:`CSQMultiheadAttention` with ``mha``'s weights, all ``n_bits`` positions active.

    With ``act_bits``, the output projection's input is quantized, and the q/k/v projections'
    inputs too unless ``quantize_first_input`` is False (attention is the model's first layer).
    """
    reason = unsupported_reason(mha)
    if reason is not None:
        raise BadInput(f"cannot convert nn.MultiheadAttention: {reason}")
    bias = mha.in_proj_bias is not None
    new = CSQMultiheadAttention(mha.embed_dim, mha.num_heads, mha.dropout, bias, mha.kdim, mha.vdim,
                                mha.batch_first, n_bits)
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.split(e)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.split(e) if bias else (None, None, None)
    projections = (new.q_proj, new.k_proj, new.v_proj)
    for proj, w, b in zip(projections, weights, biases):
        _load(proj, w, b)
        if act_bits is not None and quantize_first_input:
            proj.input_quant = ActQuant(act_bits, act_clip, act_mode)
    _load(new.out_proj, mha.out_proj.weight, mha.out_proj.bias)
    if act_bits is not None:
        new.out_proj.input_quant = ActQuant(act_bits, act_clip, act_mode)
    return new.train(mha.training)


def _load(proj: CSQLinear, weight: Tensor, bias: Tensor | None) -> None:
    proj.load_float_weight(weight.detach().float().cpu())
    if bias is not None:
        proj.bias.copy_(bias.detach())
