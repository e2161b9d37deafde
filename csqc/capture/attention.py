"""``scaled_dot_product_attention``: heads, scale, and masks that are constants of the model."""

from __future__ import annotations

import numpy as np
import torch

from .context import _arg, _base, _Ctx, _is_condition, _scalar, _shape_of, _type_of, _typed, _Unsupported


# float32's lowest finite value stands for -inf in masks: csqc refuses non-finite parameters,
# and softmax gives the same result either way: exp(lowest - row max) is 0 in float32 as
# exp(-inf) is, and score + lowest is lowest for any score below ~1e31 (half an ulp there).
# Only a row masked everywhere differs: -inf makes it NaN, lowest makes it uniform.
_MASKED = float(np.finfo(np.float32).min)


def _repeat_heads(ctx: _Ctx, fx: torch.fx.Node, xv: str, shape, groups: int, what: str) -> str:
    """``x.repeat_interleave(groups, dim=-3)`` (grouped-query attention) as reshape, expand, reshape."""
    lead, heads, tail = tuple(shape[:-3]), shape[-3], tuple(shape[-2:])
    grown = _typed(ctx, fx, "reshape", [xv], lead + (heads, 1) + tail, f"{what}.unsqueeze")
    spread = _typed(ctx, fx, "expand", [grown], lead + (heads, groups) + tail, f"{what}.expand")
    return _typed(ctx, fx, "reshape", [spread], lead + (heads * groups,) + tail, f"{what}.repeat")


def _constant_mask(mask: torch.Tensor | None, causal: bool, length: int, source: int) -> np.ndarray | None:
    """The additive float mask of a constant ``attn_mask`` and/or ``is_causal`` (True/1 = attend
    for a boolean mask, as in ``F.scaled_dot_product_attention``)."""
    bias = None
    if causal:  # attend to the diagonal and below
        bias = np.where(np.tril(np.ones((length, source), bool)), np.float32(0), np.float32(_MASKED))
    if mask is not None:
        m = mask.detach().cpu().numpy()
        m = (np.where(m, np.float32(0), np.float32(_MASKED)) if m.dtype == np.bool_
             else m.astype(np.float32))
        if bias is not None:  # both: PyTorch adds them; masked twice stays the lowest finite value
            with np.errstate(over="ignore"):
                m = np.maximum(bias + m, np.float32(_MASKED))
        bias = m
    return None if bias is None else bias.astype(np.float32)


def _sdpa(ctx: _Ctx, fx: torch.fx.Node) -> str:
    # scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=False,
    # scale=None, enable_gqa=False), in the order of PyTorch's documented reference:
    # softmax((q @ k^T) * scale + mask) @ v, scale = 1 / sqrt(E) unless given
    q, k, v = fx.args[:3]
    mask, dropout_p = _arg(fx, 3, "attn_mask"), float(_arg(fx, 4, "dropout_p", 0.0))
    causal, scale = bool(_arg(fx, 5, "is_causal", False)), _arg(fx, 6, "scale")
    if dropout_p != 0.0:  # the functional form drops at random even in eval mode
        raise _Unsupported(f"dropout_p={dropout_p} (random at inference; pass 0 outside training)")
    q_shape, k_shape, v_shape = (_shape_of(a) for a in (q, k, v))
    if min(len(q_shape), len(k_shape), len(v_shape)) < 2:
        raise _Unsupported("query, key and value need rank >= 2")
    kv, vv = ctx.value(k), ctx.value(v)
    if bool(_arg(fx, 7, "enable_gqa", False)) and len(q_shape) >= 3 and q_shape[-3] != k_shape[-3]:
        if q_shape[-3] % k_shape[-3] or q_shape[-3] % v_shape[-3]:
            raise _Unsupported(f"{q_shape[-3]} query heads are not a multiple of the key/value heads")
        kv = _repeat_heads(ctx, fx, kv, k_shape, q_shape[-3] // k_shape[-3], "sdpa.key")
        vv = _repeat_heads(ctx, fx, vv, v_shape, q_shape[-3] // v_shape[-3], "sdpa.value")
        k_shape = k_shape[:-3] + (q_shape[-3],) + k_shape[-2:]
    length, source = q_shape[-2], k_shape[-2]
    rank = len(k_shape)
    key_t = _typed(ctx, fx, "permute", [kv], k_shape[:-2] + (k_shape[-1], source), "sdpa.key_t",
                   {"dims": tuple(range(rank - 2)) + (rank - 1, rank - 2)})
    scores_shape = tuple(np.broadcast_shapes(q_shape[:-2], k_shape[:-2])) + (length, source)
    scores = _typed(ctx, fx, "matmul", [ctx.value(q), key_t], scores_shape, "sdpa.scores")
    factor = 1.0 / float(np.sqrt(q_shape[-1])) if scale is None else float(scale)
    scores = _typed(ctx, fx, "mul", [scores, _scalar(ctx, fx, factor, "sdpa.scale")], scores_shape, "sdpa.scaled")
    scores, scores_shape = _add_mask(ctx, fx, scores, scores_shape, mask, causal)
    weights = _typed(ctx, fx, "softmax", [scores], scores_shape, "sdpa.weights", {"axis": len(scores_shape) - 1})
    return ctx.emit(fx, "matmul", [weights, vv], base=_base(fx, "sdpa"))


def _add_mask(ctx: _Ctx, fx: torch.fx.Node, scores: str, shape, mask, causal: bool) -> tuple[str, tuple]:
    """``scores + mask`` and its shape: constant masks (and is_causal) folded into one float
    parameter; a float mask computed at runtime added; a boolean one computed at runtime (0.0 /
    1.0 in the IR) selects the score or ``_MASKED`` (a ``select`` op)."""
    runtime_mask = mask is not None and not ctx.is_const(mask)
    if runtime_mask:
        if _type_of(mask).dtype != "float32":
            raise _Unsupported(f"a {_type_of(mask).dtype} attn_mask computed by the model (pass a float mask)")
        shape = tuple(np.broadcast_shapes(tuple(shape), _shape_of(mask)))
        if _is_condition(mask):  # True = attend: the score, else the lowest value
            scores = _typed(ctx, fx, "select", [ctx.value(mask), scores, _scalar(ctx, fx, _MASKED, "sdpa.lowest")],
                            shape, "sdpa.masked")
        else:
            scores = _typed(ctx, fx, "add", [scores, ctx.value(mask)], shape, "sdpa.masked")
    bias = _constant_mask(None if runtime_mask or mask is None else ctx.tensor(mask), causal, shape[-2], shape[-1])
    if bias is None:
        return scores, shape
    shape = tuple(np.broadcast_shapes(tuple(shape), bias.shape))
    return _typed(ctx, fx, "add", [scores, ctx.param(_base(fx, "sdpa.mask"), bias)], shape, "sdpa.masked"), shape
