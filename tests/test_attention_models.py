"""Attention architectures: scaled_dot_product_attention, expand and repeat in capture, then
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and a small ViT end to end.

Tiers: each SDPA form (masks, causal, scale, grouped-query heads) and each float model is
captured and run by the interpreter against PyTorch; a float causal attention model and the
converted models (``csqc.convert(n_bits=4, act_bits=8)``, attention projections converted) are
saved, compiled for llvm and onnx and verified bit for bit.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import csqc
from csqc.attention import CSQMultiheadAttention
from csqc.capture import capture
from csqc.errors import UnsupportedOps
from csqc.models.transformer import vision_transformer
from irbuild import run

D_MODEL, HEADS = 32, 2


def _captured(module: nn.Module, examples, tmp_path, name="m"):
    path = csqc.save(module.eval(), tmp_path / f"{name}.pt", examples)
    return capture(csqc.load(path))


def _matches_torch(module: nn.Module, examples, tmp_path, rtol=1e-5):
    examples = examples if isinstance(examples, tuple) else (examples,)
    g = _captured(module, examples if len(examples) > 1 else examples[0], tmp_path)
    with torch.no_grad():
        want = module(*examples).numpy()
    (got,), _ = run(g, [x.numpy() for x in examples])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))
    return g


# -- scaled_dot_product_attention -----------------------------------------------------------------


class Attend(nn.Module):
    """``F.scaled_dot_product_attention`` of projections of one input, in a chosen form."""

    def __init__(self, mask: str = "none", gqa: bool = False, **sdpa):
        super().__init__()
        torch.manual_seed(3)
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 8 if gqa else 16)
        self.mask, self.gqa, self.sdpa = mask, gqa, sdpa
        self.register_buffer("allowed", torch.rand(5, 5) > 0.4)  # True = attend
        self.register_buffer("bias", torch.randn(1, 1, 5, 5))

    def _heads(self, x, heads):
        return x.reshape(x.shape[0], 5, heads, 4).transpose(1, 2)

    def forward(self, x):
        q, kv = self._heads(self.q(x), 4), self._heads(self.kv(x), 2 if self.gqa else 4)
        mask = {"none": None, "bool": self.allowed, "float": self.bias}[self.mask]
        return F.scaled_dot_product_attention(q, kv, kv * 0.5, attn_mask=mask, enable_gqa=self.gqa, **self.sdpa)


SDPA_FORMS = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool-mask": {"mask": "bool"},
    "float-mask": {"mask": "float"},
    "causal+bool-mask": {"mask": "bool", "is_causal": True},  # PyTorch adds both
    "scale": {"scale": 0.3},
    "grouped-query": {"gqa": True},
}


@pytest.mark.parametrize("form", sorted(SDPA_FORMS))
def test_sdpa_forms_capture_as_pytorch_computes_them(form, tmp_path):
    g = _matches_torch(Attend(**SDPA_FORMS[form]), torch.randn(2, 5, 8), tmp_path)
    ops = [n.op for n in g.nodes]
    assert ops.count("softmax") == 1 and ops.count("matmul") == 2
    masks = [v for k, v in g.params.items() if k.endswith("sdpa.mask")]
    assert len(masks) == ("mask" in form or "causal" in form)
    for mask in masks:  # finite: float32's lowest value stands for -inf
        assert np.isfinite(mask).all()
    if form == "causal":
        assert (masks[0][np.triu_indices(5, 1)] == np.finfo(np.float32).min).all() and not np.tril(masks[0]).any()


class RuntimeMask(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, mask):
        return F.scaled_dot_product_attention(q, q * 2.0, q, attn_mask=mask, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_with_a_float_mask_input(causal, tmp_path):
    q = torch.randn(2, 2, 5, 4)
    g = _matches_torch(RuntimeMask(causal), (q, torch.randn(2, 1, 5, 5)), tmp_path)
    assert [n.op for n in g.nodes].count("add") == 1 + causal


def test_sdpa_with_dropout_is_refused(tmp_path):
    class Dropping(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    with pytest.raises(UnsupportedOps, match=r"scaled_dot_product_attention.default \[dropout_p=0.1 "):
        _captured(Dropping(), torch.randn(2, 2, 5, 4), tmp_path)


class Tiled(nn.Module):
    """A class token expanded to the batch, expand_as, and repeat (rank kept and grown)."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.row = nn.Parameter(torch.randn(8))

    def forward(self, x):
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 5, 8]
        tiled = x.repeat(1, 2, 3)[:, 3:8, 8:16] + x[0].repeat(2, 1, 2, 2)[1, :, :5, 4:12]
        return tokens.repeat(1, 1, 1, 1)[0] * 2.0 + tiled + self.row.expand_as(tokens)


def test_expand_expand_as_and_repeat(tmp_path):
    g = _matches_torch(Tiled(), torch.randn(2, 4, 8), tmp_path)
    assert [n.op for n in g.nodes].count("expand") == 4


# -- float models: captured as PyTorch runs them -----------------------------------------------------


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed in_proj, batch_first) as self-attention."""

    def __init__(self, need_weights: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class BothAttentionPaths(nn.Module):
    """PyTorch's two paths: need_weights=False calls SDPA, need_weights=True writes it out."""

    def __init__(self):
        super().__init__()
        self.fused, self.weighted = SelfAttention(need_weights=False), SelfAttention(need_weights=True)

    def forward(self, x):
        return self.fused(x) + self.weighted(x)


def _encoder_layer(norm_first: bool, activation: str) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=64, dropout=0.0, activation=activation,
                                      batch_first=True, norm_first=norm_first)


ENCODER_FORMS = [(norm_first, act) for norm_first in (False, True) for act in ("relu", "gelu")]


def _encoder_stack(forms=ENCODER_FORMS) -> nn.Sequential:
    """Encoder layers of the given forms stacked: one capture or compile covers them all."""
    return nn.Sequential(*[_encoder_layer(*form) for form in forms]).eval()


def test_float_multihead_attention_captures(tmp_path):
    torch.manual_seed(0)
    g = _matches_torch(BothAttentionPaths().eval(), torch.randn(2, 6, D_MODEL), tmp_path)
    assert [n.op for n in g.nodes].count("softmax") == 2


def test_float_transformer_encoder_layers_capture(tmp_path):
    torch.manual_seed(0)
    g = _matches_torch(_encoder_stack(), torch.randn(2, 6, D_MODEL), tmp_path)
    ops = [n.op for n in g.nodes]
    assert ops.count("softmax") == 4 and ops.count("relu") == 2 and ops.count("gelu") == 2


def test_float_vit_captures(tmp_path):
    g = _matches_torch(vision_transformer(), torch.randn(2, 3, 16, 16), tmp_path)
    assert {"expand", "cat", "softmax", "conv2d"} <= {n.op for n in g.nodes}


# -- end to end: save, compile for llvm and onnx, verify bit for bit --------------------------------


def _compiles_and_verifies(model: nn.Module, example: torch.Tensor, folder, name: str,
                           targets=("llvm", "onnx")) -> None:
    """Saved, compiled for each target, verified exactly (every verify also runs ONNX Runtime)."""
    path = csqc.save(model, folder / f"{name}.pt", example)
    loaded = csqc.load(path)
    suffix = {"llvm": "so", "onnx": "onnx"}
    for target, artifact in ((t, f"{name}.{suffix[t]}") for t in targets):
        csqc.compile(loaded, target, folder / artifact)
        report = csqc.verify(loaded, samples=2, artifact=str(folder / artifact))
        assert report.ok and report.accumulators_exact and f"artifact:{artifact}" in report.runtimes, target


class CausalAttention(nn.Module):
    """Float causal self-attention with a boolean window mask and an explicit scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.qkv = nn.Linear(8, 24)
        self.register_buffer("window", torch.ones(6, 6, dtype=torch.bool).triu(-2))  # at most 2 back

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], 6, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return causal + F.scaled_dot_product_attention(q, k, v, attn_mask=self.window, scale=0.7)


def test_float_causal_attention_masks_are_exact_in_every_runtime(tmp_path):
    _compiles_and_verifies(CausalAttention().eval(), torch.randn(1, 6, 8), tmp_path, "causal", targets=("llvm",))


class MaskedFillAttention(nn.Module):
    """nanoGPT's causal attention: ``att.masked_fill(self.bias[:, :, :T, :T] == 0, fill)`` on the
    model's scores, the mask a sliced buffer."""

    def __init__(self, fill: float, length: int = 8):
        super().__init__()
        self.qkv, self.out, self.fill = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL), fill
        self.register_buffer("bias", torch.tril(torch.ones(length, length)).view(1, 1, length, length))

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = (a.view(n, t, HEADS, c // HEADS).transpose(1, 2) for a in self.qkv(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (c // HEADS) ** 0.5)
        att = F.softmax(att.masked_fill(self.bias[:, :, :t, :t] == 0, self.fill), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, t, c))


@pytest.mark.parametrize("fill", [float("-inf"), -1e9])
def test_masked_fill_of_scores_by_a_constant_mask_is_exact(fill, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 6, D_MODEL)
    g = _matches_torch(MaskedFillAttention(fill).eval(), x, tmp_path)
    assert not any(n.op == "where" for n in g.nodes)
    model = csqc.finalize(csqc.convert(MaskedFillAttention(fill).eval(), n_bits=4, act_bits=8, example_inputs=x))
    _compiles_and_verifies(model, x, tmp_path, "masked")


def test_masked_fill_by_a_mask_the_model_computes_selects_exactly(tmp_path):
    class Thresholded(nn.Module):
        def forward(self, x):
            return x.masked_fill(x > 0.5, 0.0)

    x = torch.rand(2, 4)
    x[0, 0] = 0.5  # a tie: not masked
    g = capture(csqc.load(csqc.save(Thresholded(), tmp_path / "t.pt", x)))
    (out,), _ = run(g, [x.numpy()])
    np.testing.assert_array_equal(out, Thresholded()(x).numpy())


def _converted(model: nn.Module, example: torch.Tensor) -> csqc.conversion.ConversionReport:
    csqc.finalize(csqc.convert(model, n_bits=4, act_bits=8, example_inputs=example))
    report = csqc.conversion_report(model)
    print(report.summary())  # the converted and left-float layers, shown with pytest -s
    assert report.ops_checked and report.problems == []
    return report


def test_multihead_attention_converts_compiles_and_verifies(tmp_path):
    torch.manual_seed(0)
    model, x = SelfAttention().eval(), torch.randn(1, 6, D_MODEL)
    report = _converted(model, x)
    assert report.converted == [("attn", "MultiheadAttention", "CSQMultiheadAttention")]
    assert report.left_float == [] and isinstance(model.attn, CSQMultiheadAttention)
    _compiles_and_verifies(model, x, tmp_path, "mha")


def test_transformer_encoder_layers_convert_compile_and_verify(tmp_path):
    torch.manual_seed(0)
    # post-norm with relu, pre-norm with gelu: each setting both ways, in one compile per target
    forms = [(False, "relu"), (True, "gelu")]
    model, x = _encoder_stack(forms), torch.randn(1, 6, D_MODEL)
    report = _converted(model, x)
    converted = {name: new for name, _, new in report.converted}
    for i in range(len(forms)):
        assert converted[f"{i}.self_attn"] == "CSQMultiheadAttention"
        assert converted[f"{i}.linear1"] == converted[f"{i}.linear2"] == "CSQLinear"
    assert len(report.converted) == 3 * len(forms) and report.left_float == []
    _compiles_and_verifies(model, x, tmp_path, "encoder")


def test_vit_converts_compiles_and_verifies(tmp_path):
    model, x = vision_transformer(), torch.randn(1, 3, 16, 16)
    report = _converted(model, x)
    assert report.first_layer == "patch_embed.proj" and model.patch_embed.proj.input_quant is None
    converted = {name for name, _, _ in report.converted}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.0", "head"} <= converted
    assert len(converted) == 10
    assert [(f.name, f.reason.split(":")[0]) for f in report.left_float] == [
        ("<model>", "has float parameters csqc does not quantize")]
    _compiles_and_verifies(model, x, tmp_path, "vit")


class EinsumAttention(nn.Module):
    """Attention written with einsum and swapaxes, as torchvision's MaxViT writes it (capture
    turns each einsum into permute / reshape / matmul)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.einsum("B H I D, B H J D -> B H I J", q, k) * (D_MODEL // HEADS) ** -0.5
        out = torch.einsum("B H I J, B H J D -> B H I D", scores.softmax(-1), v)
        return self.proj(out.swapaxes(1, 2).reshape(b, n, D_MODEL))


def test_einsum_attention_converts_compiles_and_verifies(tmp_path):
    model, x = EinsumAttention().eval(), torch.randn(1, 6, D_MODEL)
    _matches_torch(model, x, tmp_path)
    report = _converted(model, x)
    assert {name for name, _, _ in report.converted} == {"qkv", "proj"}
    _compiles_and_verifies(model, x, tmp_path, "einsum")


class ShiftedWindowBlock(nn.Module):
    """Swin's shifted-window attention in miniature: pad to whole windows, roll, a window mask
    built from ``x.new_zeros`` and filled in place, attention per window, roll back, crop, and a
    patch merge by strided slices (capture: pad / roll / strided slices / folded mask)."""

    def __init__(self, window: int = 3, shift: int = 1):
        super().__init__()
        torch.manual_seed(11)
        self.window, self.shift = window, shift
        self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
        self.reduce = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x):  # x: [B, H, W, C]
        b, h, w, c = x.shape
        win, shift = self.window, self.shift
        x = F.pad(x, (0, 0, 0, (-w) % win, 0, (-h) % win))
        hp, wp = x.shape[1], x.shape[2]
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = x.new_zeros((hp, wp))
        for i, rows in enumerate(((0, -win), (-win, -shift), (-shift, None))):
            for j, cols in enumerate(((0, -win), (-win, -shift), (-shift, None))):
                mask[rows[0]:rows[1], cols[0]:cols[1]] = 3 * i + j
        mask = mask.view(hp // win, win, wp // win, win).permute(0, 2, 1, 3).reshape(-1, win * win)
        mask = (mask.unsqueeze(1) - mask.unsqueeze(2)).masked_fill((mask.unsqueeze(1) - mask.unsqueeze(2)) != 0, -100.0)
        windows = x.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) * c ** -0.5 + mask.repeat(b, 1, 1)
        out = self.proj(scores.softmax(-1) @ v)
        x = out.view(b, hp // win, wp // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))[:, :h, :w, :]
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduce(merged)


def test_shifted_window_attention_converts_compiles_and_verifies(tmp_path):
    model, x = ShiftedWindowBlock().eval(), torch.randn(1, 8, 8, D_MODEL)
    g = _matches_torch(model, x, tmp_path)
    assert {"slice", "cat", "expand"} <= {n.op for n in g.nodes}
    report = _converted(model, x)
    assert {name for name, _, _ in report.converted} == {"qkv", "proj", "reduce"}
    _compiles_and_verifies(model, x, tmp_path, "swin")
