"""csqc.convert: subclasses, transformers' Conv1D and nn.MultiheadAttention are converted, every
module left float is reported with its reason, and the first layer is the first executed.

Float equality: a converted layer with all N bits kept is close to the float layer within the
quantization error; at n_bits=8 it equals (to float rounding) the float layer whose weights are
replaced by the dequantized CSQ weights.
"""
import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import csqc
from csqc.attention import CSQMultiheadAttention
from csqc.errors import BadInput


def _finalized(model: nn.Module) -> nn.Module:
    return csqc.finalize(model)  # the training form uses soft gates; compare the hard weights


def _close_within_quantization(got, want, rel=0.02):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= rel * want.abs().max()


# -- subclasses and transformers' Conv1D ---------------------------------------------------------


class SameAsLinear(nn.Linear):
    """Like timm's Linear: its own forward, the same computation."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class PadSameConv(nn.Conv2d):
    """A conv that pads itself at run time (timm's Conv2dSame style): not what CSQConv2d computes."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def test_linear_and_conv_subclasses_are_converted_when_they_compute_the_same():
    model = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 6), SameAsLinear(6, 5),
                          DoubledLinear(5, 3))
    csqc.convert(model, n_bits=4)
    assert isinstance(model[0], csqc.CSQLinear) and isinstance(model[1], csqc.CSQLinear)
    assert type(model[2]) is DoubledLinear
    report = csqc.conversion_report(model)
    assert [(n, a) for n, a, _ in report.converted] == [("0", "NonDynamicallyQuantizableLinear"), ("1", "SameAsLinear")]
    assert [(f.name, f.kind) for f in report.left_float] == [("2", "DoubledLinear")]
    assert "does not compute what nn.Linear does" in report.left_float[0].reason


def test_conv_that_pads_itself_stays_float_and_same_padding_converts():
    torch.manual_seed(0)
    model = nn.Sequential(PadSameConv(2, 4, 3), nn.Conv2d(4, 4, 3, padding="same", dilation=2))
    x = torch.randn(1, 2, 7, 7)
    want = model(x).detach()
    _finalized(csqc.convert(model, n_bits=8))
    assert type(model[0]) is PadSameConv and isinstance(model[1], csqc.CSQConv2d)
    assert model[1].padding == (2, 2)
    _close_within_quantization(model(x).detach(), want)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convs_of_every_padding_mode_convert_compile_and_verify(mode, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=2, dilation=2, padding_mode=mode)).eval()
    x = torch.randn(2, 3, 9, 9)
    want = model(x).detach()
    _finalized(csqc.convert(model, n_bits=8, act_bits=8, quantize_first_input=True))
    assert [(type(m), m.padding_mode, m.padding) for m in (model[0], model[2])] == [
        (csqc.CSQConv2d, mode, (1, 1)), (csqc.CSQConv2d, mode, (2, 2))]
    _close_within_quantization(model(x).detach(), want)
    path = csqc.save(model, tmp_path / "m.pt", x)
    g = csqc.capture(csqc.load(path))
    convs = [n for n in g.nodes if n.op == "qconv2d"]
    assert len(convs) == 2 and all(tuple(n.attr("padding")) == (0, 0) for n in convs)  # padded before
    for target, artifact in (("llvm", "m.so"), ("onnx", "m.onnx")):
        csqc.compile(path, target, tmp_path / artifact)
        report = csqc.verify(path, samples=2, artifact=str(tmp_path / artifact))
        assert report.ok and report.accumulators_exact, target


def test_conv_of_an_unknown_padding_mode_is_refused():
    with pytest.raises(BadInput, match="padding_mode must be one of zeros, reflect, replicate, circular"):
        csqc.CSQConv2d(3, 3, 3, padding=1, padding_mode="mirror")


def test_gpt2_conv1d_projections_are_converted_and_match_float():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    _finalized(csqc.convert(model, n_bits=8, act_bits=None, example_inputs=(ids,)))
    report = csqc.conversion_report(model)
    conv1d = [n for n, kind, _ in report.converted if kind == "Conv1D"]
    assert len(conv1d) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block: none left float
    assert report.first_layer == "transformer.h.0.attn.c_attn" and report.order == "execution"
    assert {f.name for f in report.left_float} == {"transformer.wte", "transformer.wpe"}
    assert any("lm_head" in note and "tied" in note for note in report.notes)
    with torch.no_grad():
        got = model(ids).logits
    _close_within_quantization(got, want)
    # the converted c_attn is exactly x @ W + b with its dequantized weight (W stored [in, out] by Conv1D)
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    assert torch.allclose(c_attn(x), x @ c_attn.weight.t() + c_attn.bias, atol=1e-6)


# -- nn.MultiheadAttention -----------------------------------------------------------------------


def _dequantized_twin(mha: nn.MultiheadAttention, csq: CSQMultiheadAttention) -> nn.MultiheadAttention:
    """``mha`` with the finalized CSQ weights (biases are float in both)."""
    ref = copy.deepcopy(mha)
    q, k, v = csq.q_proj.weight, csq.k_proj.weight, csq.v_proj.weight
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([q, k, v]))
        else:
            ref.q_proj_weight.copy_(q), ref.k_proj_weight.copy_(k), ref.v_proj_weight.copy_(v)
        ref.out_proj.weight.copy_(csq.out_proj.weight)
    return ref


def _attention_inputs(batch_first, kdim, n=3, length=5, source=7, embed=16):
    g = torch.Generator().manual_seed(1)
    shape = (lambda t, e: (n, t, e)) if batch_first else (lambda t, e: (t, n, e))
    q = torch.randn(shape(length, embed), generator=g)
    k = torch.randn(shape(source, kdim or embed), generator=g)
    v = torch.randn(shape(source, kdim or embed), generator=g)
    attn_mask = torch.rand(length, source, generator=g) < 0.3
    padding = torch.rand(n, source, generator=g) < 0.3
    attn_mask[:, 0] = padding[:, 0] = False  # every query attends to something
    return q, k, v, attn_mask, padding


MASKS = {
    "none": lambda am, kpm: {},
    "bool attn_mask, weights per head": lambda am, kpm: {"attn_mask": am, "average_attn_weights": False},
    "bool key_padding_mask": lambda am, kpm: {"key_padding_mask": kpm},
    "float masks, no weights": lambda am, kpm: {"attn_mask": torch.randn(3 * 4, *am.shape), "key_padding_mask": -3.0 * kpm.float(),
                                                "need_weights": False},
    "causal": lambda am, kpm: {"attn_mask": torch.triu(torch.ones(am.shape, dtype=torch.bool), 1), "is_causal": True},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (12, False)])
def test_multihead_attention_equals_float_attention(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    model = _finalized(csqc.convert(nn.ModuleDict({"attn": copy.deepcopy(mha)}), n_bits=8))
    csq = model["attn"]
    assert isinstance(csq, CSQMultiheadAttention) and (csq.kdim, csq.batch_first) == (kdim or 16, batch_first)
    assert all(isinstance(p, csqc.CSQLinear) for p in (csq.q_proj, csq.k_proj, csq.v_proj, csq.out_proj))
    assert (csq.q_proj.bias is None) == (not bias)
    ref = _dequantized_twin(mha, csq)
    q, k, v, attn_mask, padding = _attention_inputs(batch_first, kdim)
    for name, masks in MASKS.items():
        kwargs = masks(attn_mask, padding)
        with torch.no_grad():
            got, want, float_out = csq(q, k, v, **kwargs), ref(q, k, v, **kwargs), mha(q, k, v, **kwargs)
        assert torch.allclose(got[0], want[0], atol=1e-5), name
        assert (got[1] is None) == (want[1] is None), name
        if want[1] is not None:
            assert got[1].shape == want[1].shape and torch.allclose(got[1], want[1], atol=1e-6), name
        _close_within_quantization(got[0], float_out[0])


def test_unbatched_attention_and_the_causal_hint():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    csq = _finalized(csqc.convert(nn.Sequential(copy.deepcopy(mha)), n_bits=8))[0]
    ref = _dequantized_twin(mha, csq)
    x = torch.randn(5, 8)
    for kwargs in ({}, {"average_attn_weights": False}):
        got, want = csq(x, x, x, **kwargs), ref(x, x, x, **kwargs)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-6)
    with pytest.raises(BadInput, match="is_causal needs attn_mask"):
        csq(x, x, x, is_causal=True)


@pytest.mark.parametrize("option,message", [({"add_bias_kv": True}, "add_bias_kv"), ({"add_zero_attn": True}, "add_zero_attn")])
def test_unsupported_attention_is_refused_clearly(option, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, **option))
    with pytest.raises(BadInput, match=f"^1: cannot convert nn.MultiheadAttention: {message}.*list it in skip"):
        csqc.convert(model)
    assert type(model[0]) is nn.Linear


def test_transformer_encoder_layer_runs_the_converted_attention_in_eval_no_grad():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        want = layer(x)
    _finalized(csqc.convert(layer, n_bits=8, example_inputs=x))
    assert isinstance(layer.self_attn, CSQMultiheadAttention)
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():  # the conditions of the fused fast path, which would skip self_attn's projections
        got = layer(x)
    assert calls == [1]
    _close_within_quantization(got, want)


# -- the report ----------------------------------------------------------------------------------


class OwnMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 4))
        self.scale = nn.Parameter(torch.ones(4))  # a vector: not a weight matrix, not reported

    def forward(self, x):
        return x @ self.proj * self.scale


def test_every_module_left_float_is_reported_once_with_its_reason(caplog):
    model = nn.ModuleDict({
        "embed": nn.Embedding(10, 4), "conv1d": nn.Conv1d(4, 4, 3), "conv3d_1x1": nn.Conv3d(2, 2, 1),
        "conv3d": nn.Conv3d(1, 2, 3),
        "deconv": nn.ConvTranspose3d(2, 2, 3), "mine": OwnMatrix(), "norm": nn.LayerNorm(4),
        "head": nn.Linear(4, 2),
    })
    with caplog.at_level(logging.WARNING, logger="csqc.conversion"):
        assert csqc.convert(model, n_bits=4) is model
    report = csqc.conversion_report(model)
    reasons = {f.name: f.reason for f in report.left_float}
    assert set(reasons) == {"embed", "conv3d_1x1", "conv3d", "deconv", "mine"}
    assert "lookup" in reasons["embed"] and "conv3d" in reasons["conv3d_1x1"] and "conv3d" in reasons["conv3d"]
    assert "transposed" in reasons["deconv"] and "proj [4, 4]" in reasons["mine"]
    assert report.converted == [("conv1d", "Conv1d", "CSQConv1d"), ("head", "Linear", "CSQLinear")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(name in warnings[0].getMessage() for name in reasons)
    assert report.to_json()["left_float"][0] == {"name": "embed", "kind": "Embedding", "reason": reasons["embed"]}


class ScaledBlock(nn.Module):
    """A layer with a float matrix of its own around a Linear (as ConvNeXt's CNBlock has its
    ``layer_scale [C, 1, 1]``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.layer_scale = nn.Parameter(torch.ones(4, 1))

    def forward(self, x):
        return self.fc(x) * self.layer_scale[:, 0]


def test_a_module_with_float_parameters_says_the_layers_inside_it_are_converted():
    model = nn.Sequential(ScaledBlock(), OwnMatrix())
    csqc.convert(model, n_bits=4)
    report = csqc.conversion_report(model)
    assert report.converted == [("0.fc", "Linear", "CSQLinear")]
    reasons = {f.name: f.reason for f in report.left_float}
    assert reasons["0"].endswith("layer_scale [4, 1] (they stay as they are; the 1 layer(s) inside it are converted)")
    assert reasons["1"].endswith("proj [4, 4]")  # (nothing inside it)


def test_a_model_never_converted_has_no_report():
    with pytest.raises(BadInput, match="call csqc.convert"):
        csqc.conversion_report(nn.Linear(2, 2))


# -- the first layer in execution order ----------------------------------------------------------


class HeadFirst(nn.Module):
    """Registers its classifier before its stem (as DenseNet, RegNet, ShuffleNet do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


def test_first_layer_is_the_first_executed_with_example_inputs():
    model = HeadFirst().train()
    model.body[0].eval()  # a mixed state that must survive the probing pass
    csqc.convert(model, n_bits=4, act_bits=4, example_inputs=torch.randn(2, 1, 6, 6))
    assert model.stem.input_quant is None
    assert model.fc.input_quant is not None and model.body[2].input_quant is not None
    report = csqc.conversion_report(model)
    assert (report.first_layer, report.order) == ("stem", "execution")
    assert model.training and model.fc.training and not model.body[0].training
    assert model.body[0].num_batches_tracked == 0  # the probing pass ran in eval mode


class _ReadsItsWeight(nn.Module):
    """Hugging Face's reference Mamba scan: ``dt_proj.weight`` used by hand, the layer never called."""

    def __init__(self):
        super().__init__()
        self.fc, self.dt_proj, self.unused = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)

    def forward(self, x):
        return self.out.forward(F.linear(self.fc(x), self.dt_proj.weight))  # (.forward: no hook sees it)


def test_a_layer_the_model_never_calls_is_reported_as_used_in_float():
    model = csqc.convert(_ReadsItsWeight(), n_bits=3, act_bits=4, example_inputs=torch.randn(2, 6))
    notes = csqc.conversion_report(model).notes
    assert [n.split(":")[0] for n in notes if "never calls it" in n] == ["dt_proj", "unused"]
    assert "forward" not in vars(model.out) and isinstance(model.out.input_quant, nn.Module)
    assert not any("never calls" in n for n in csqc.conversion_report(
        csqc.convert(HeadFirst(), n_bits=4, act_bits=4, example_inputs=torch.randn(2, 1, 6, 6))).notes)


def test_without_example_inputs_module_order_is_used_and_said():
    model = csqc.convert(HeadFirst(), n_bits=4, act_bits=4)
    assert model.fc.input_quant is None and model.stem.input_quant is not None
    report = csqc.conversion_report(model)
    assert (report.first_layer, report.order) == ("fc", "module")
    assert "module order: pass example_inputs" in report.summary()


def test_example_inputs_that_fail_are_bad_input():
    with pytest.raises(BadInput, match="failed on example_inputs"):
        csqc.convert(HeadFirst(), act_bits=4, example_inputs=torch.randn(2, 3, 6, 6))


# -- end to end ----------------------------------------------------------------------------------


def test_transformer_encoder_layer_compiles_and_verifies_exactly(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 6, 32)
    _finalized(csqc.convert(layer, n_bits=4, act_bits=8, example_inputs=x))
    path = csqc.save(layer, tmp_path / "encoder-layer.pt", x)
    model = csqc.load(path)
    for target, name in (("llvm", "encoder-layer.so"), ("onnx", "encoder-layer.onnx")):
        csqc.compile(model, target, tmp_path / name)
        report = csqc.verify(model, samples=2, artifact=str(tmp_path / name))
        assert report.ok and report.accumulators_exact and f"artifact:{name}" in report.runtimes, target


def test_convert_with_an_example_reports_operators_csqc_cannot_compile_before_training():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(torch.cumsum(self.fc(x), dim=1))  # cumsum: no IR op

    x = torch.randn(2, 8)
    report = csqc.conversion_report(csqc.convert(Net().eval(), n_bits=4, act_bits=8, example_inputs=x))
    assert report.ops_checked
    assert any("cumsum" in p and "at " in p for p in report.problems), report.problems
    assert "will not compile: unsupported operator" in report.summary()
    clean = csqc.conversion_report(csqc.convert(nn.Sequential(nn.Linear(8, 4)).eval(), n_bits=4, example_inputs=x))
    assert clean.ops_checked and clean.problems == []
    unchecked = csqc.conversion_report(csqc.convert(nn.Sequential(nn.Linear(8, 4)).eval(), n_bits=4))
    assert not unchecked.ops_checked and "operators not checked" in unchecked.summary()


def test_convert_finalize_gives_what_finalize_gives_without_trainable_bits():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    trained_form = csqc.finalize(csqc.convert(copy.deepcopy(float_model), n_bits=4, act_bits=4))
    direct = csqc.convert(copy.deepcopy(float_model), n_bits=4, act_bits=4, finalize=True)
    assert all(m.finalized and not hasattr(m, "pweight") for _, m in csqc.layers.csq_layers(direct))
    a, b = trained_form.state_dict(), direct.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(trained_form(x), direct(x))
    mha = csqc.convert(nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)), n_bits=4, finalize=True)
    assert all(m.finalized for _, m in csqc.layers.csq_layers(mha))


def test_act_bits_zero_keeps_activations_float_as_the_csq_reference_writes_it():
    """``act_bits=0`` is the CSQ reference's ``act_bit=0`` (float activations), as None; other
    widths outside 1..8 are refused once, before any layer, with what to pass instead."""
    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.MultiheadAttention(8, 2))

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net()

        def forward(self, x):
            h = self.body[1](self.body[0](x))
            return self.body[2](h, h, h, need_weights=False)[0]

    for bits in (0, None):
        model = csqc.convert(Attend(), n_bits=4, act_bits=bits)
        assert not any(isinstance(m, csqc.ActQuant) for m in model.modules())
    for bits in (9, -1, 2.5):
        with pytest.raises(BadInput, match=rf"^act_bits must be 1..8, or None \(0, as the CSQ reference writes it\) "
                                           rf"for float activations, got {bits}$"):
            csqc.convert(Attend(), n_bits=4, act_bits=bits)
