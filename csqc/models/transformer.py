"""A small Transformer encoder (pre-LayerNorm) for csqc's sequence-model tests and demos.

Attention is written out with ``nn.Linear`` q/k/v/out projections, ``reshape``/``transpose``,
``torch.matmul`` and ``softmax`` (no ``F.scaled_dot_product_attention``), so ``torch.export``
gives plain aten ops that csqc captures, and ``csqc.convert`` turns every projection and MLP
layer into a CSQ layer.

Input: float ``[B, T, d_model]`` (already embedded tokens); output: ``[B, classes]`` logits from
the mean over ``T`` of the final LayerNorm's output.

:class:`VisionTransformer` is a small ViT that does use ``F.scaled_dot_product_attention``
(capture decomposes it) and a class token expanded to the batch: images ``[B, C, H, W]`` in,
``[B, classes]`` logits out.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SelfAttention", "EncoderBlock", "TransformerEncoder", "transformer_encoder", "PatchEmbedding",
           "ViTAttention", "ViTBlock", "VisionTransformer", "vision_transformer"]


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``softmax(q k^T / sqrt(d_head)) v``, then the output projection."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.d_head = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(self.d_head)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.d_head).transpose(1, 2)  # [B, H, T, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        context = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, Dh]
        return self.out(context.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (MLP: Linear, GELU, Linear)."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int = 4, gelu: str = "none"):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.act = nn.GELU(approximate=gelu)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TransformerEncoder(nn.Module):
    """``layers`` encoder blocks, a final LayerNorm, mean over the sequence, a linear head."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
                 classes: int = 10, gelu: str = "none"):
        super().__init__()
        self.blocks = nn.Sequential(*[EncoderBlock(d_model, heads, mlp_ratio, gelu) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def transformer_encoder(d_model: int = 64, heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
                        classes: int = 10, gelu: str = "none", seed: int | None = 0) -> TransformerEncoder:
    """A float encoder in eval mode (``gelu``: ``"none"`` for the exact erf form, ``"tanh"``);
    LayerNorm affine parameters are randomized around (1, 0) so tests exercise them."""
    if seed is not None:
        torch.manual_seed(seed)
    model = TransformerEncoder(d_model, heads, layers, mlp_ratio, classes, gelu)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model.eval()


# -- a small Vision Transformer ----------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each projected to ``dim`` (a strided convolution):
    ``[B, C, H, W]`` -> ``[B, (H / patch) * (W / patch), dim]``."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    """Self-attention with one packed q/k/v projection and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.d_head = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, Dh]
        return self.proj(context.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (Linear, GELU, Linear)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTransformer(nn.Module):
    """A ViT as in Dosovitskiy et al. (2021): patch embeddings, a learned class token prepended
    (expanded to the batch), learned position embeddings, pre-norm encoder blocks, a final
    LayerNorm and a linear head on the class token."""

    def __init__(self, image_size: int = 16, patch: int = 4, in_channels: int = 3, dim: int = 32,
                 depth: int = 2, heads: int = 2, mlp_ratio: int = 2, classes: int = 10):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch_embed = PatchEmbedding(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vision_transformer(image_size: int = 16, patch: int = 4, in_channels: int = 3, dim: int = 32, depth: int = 2,
                       heads: int = 2, mlp_ratio: int = 2, classes: int = 10, seed: int | None = 0) -> VisionTransformer:
    """A float ViT in eval mode; class token and position embeddings drawn like truncated-normal
    initialisations (std 0.02 would hide them in tests: std 0.5 here)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = VisionTransformer(image_size, patch, in_channels, dim, depth, heads, mlp_ratio, classes)
    with torch.no_grad():
        model.cls_token.normal_(0.0, 0.5)
        model.pos_embed.normal_(0.0, 0.5)
    return model.eval()
