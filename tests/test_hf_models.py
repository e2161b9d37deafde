"""Coverage: Hugging Face transformers models, built from small configs (no downloads).

Each model is converted (``csqc.convert(n_bits=4, act_bits=8)``: the attention and MLP
projections, GPT-2's ``Conv1D`` included; the embeddings stay float and are reported), saved,
compiled for llvm and onnx, and verified exactly against the interpreter on random token ids.
Attention uses the eager implementation, and PyTorch's ``scaled_dot_product_attention`` (the
``sdpa`` implementation, transformers' default) in a second, llvm-only check.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import csqc
from csqc.verify import DEFAULT_RUNTIMES
from csqc.capture import capture

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 8


def _bert(attn="eager"):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return transformers.BertModel(config)


def _distilbert(attn="eager"):
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64, attn_implementation=attn)
    return transformers.DistilBertModel(config)


def _gpt2(attn="eager"):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     use_cache=False, attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama(attn="eager"):
    # RMSNorm (rsqrt), rotary position tables (cos / sin of positions: folded), grouped-query
    # attention, SiLU-gated MLP: the layout of Llama, Mistral and Qwen
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False, attn_implementation=attn)
    return transformers.LlamaForCausalLM(config)


# model -> (factory, its named outputs, layers convert must quantize, module of an embedding)
MODELS = {
    "bert": (_bert, ["last_hidden_state", "pooler_output"],
             [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]
             + ["encoder.layer.0.attention.output.dense", "pooler.dense"], "embeddings.word_embeddings"),
    "distilbert": (_distilbert, ["last_hidden_state"],
                   [f"transformer.layer.{i}.attention.{p}_lin" for i in range(2) for p in ("q", "k", "v", "out")],
                   "embeddings.word_embeddings"),
    "gpt2": (_gpt2, ["logits"], [f"transformer.h.{i}.{p}" for i in range(2)
                                 for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"],
             "transformer.wte"),
    "llama": (_llama, ["logits"], [f"model.layers.{i}.{p}" for i in range(2)
                                   for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
              + ["lm_head"], "model.embed_tokens"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """(name, the converted model in PyTorch, its model file, example ids)."""
    name = request.param
    factory = MODELS[name][0]
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    model = csqc.convert(factory().eval(), n_bits=4, act_bits=8, example_inputs=ids)
    report = csqc.conversion_report(model)
    assert report.ops_checked and not report.problems, report.summary()
    assert MODELS[name][3] in {f.name for f in report.left_float}  # the embedding: float, and said so
    model = csqc.finalize(model)
    path = csqc.save(model, tmp_path_factory.mktemp(name) / f"{name}.pt", ids)
    return name, model, csqc.load(path), ids


def test_outputs_are_flattened_and_named(saved):
    name, model, loaded, ids = saved
    expected = MODELS[name][1]
    assert [o["name"] for o in loaded.manifest["outputs"]] == expected
    assert loaded.input_specs[0]["dtype"] == "int64"
    with torch.no_grad():
        want = model(ids)
        got = loaded(ids)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for key, tensor in zip(expected, got):
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-5)


def test_capture_folds_masks_and_keeps_ids_for_the_embedding(saved):
    name, _, loaded, _ = saved
    g = capture(loaded)
    assert list(g.outputs) == MODELS[name][1]  # the IR (and every report) uses the model's names
    embeddings = [n for n in g.nodes if n.op == "embedding"]
    assert embeddings and embeddings[0].source == MODELS[name][3]
    assert g.params[embeddings[0].inputs[0]].dtype == np.float32  # the table stays float
    assert g.inputs[0].type.dtype == "int64"
    converted = {n.source for n in g.quant_layers()}
    assert set(MODELS[name][2]) <= converted, f"not quantized: {set(MODELS[name][2]) - converted}"
    # masks, positions and token types were computed at capture: no integer value reaches a runtime op
    assert {n.op for n in g.nodes} <= {"embedding", "add", "mul", "sub", "div", "layer_norm", "linear", "qlinear",
                                       "quantize", "dequantize", "reshape", "permute", "slice", "matmul",
                                       "softmax", "gelu", "tanh", "silu", "sqrt", "mean", "expand", "cat"}


# llvm: the whole chain (PyTorch, both interpreters, ONNX Runtime, the artifact); onnx: the
# artifact against the interpreter it is compared with (the rest ran for llvm already)
@pytest.mark.parametrize("target,suffix,runtimes", [("llvm", ".so", DEFAULT_RUNTIMES),
                                                    ("onnx", ".onnx", ("interpreter:default",))])
def test_compiles_and_verifies_exactly(saved, target, suffix, runtimes, tmp_path):
    name, _, loaded, _ = saved
    artifact = tmp_path / f"{name}{suffix}"
    csqc.compile(loaded, target=target, output=artifact)
    report = csqc.verify(loaded, artifact=str(artifact), samples=2, batch=1, runtimes=runtimes)
    assert report.ok and report.accumulators_exact, report.to_json()
    assert any(r.startswith("artifact:") for r in report.runtimes)
    exact = [p for p in report.pairs if p.kind == "exact"]
    assert exact and all(p.within_tolerance for p in exact)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_attention_captures_and_verifies_exactly(name, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    model = csqc.finalize(csqc.convert(MODELS[name][0]("sdpa").eval(), n_bits=4, act_bits=8, example_inputs=ids))
    loaded = csqc.load(csqc.save(model, tmp_path / f"{name}.pt", ids))
    targets = {str(n.target) for n in loaded.program.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" in targets  # the sdpa path, not eager
    artifact = csqc.compile(loaded, "llvm", tmp_path / f"{name}.llvm.so").output
    report = csqc.verify(loaded, artifact=str(artifact), samples=4)
    assert report.ok and report.accumulators_exact, report.to_json()


def test_a_view_export_traced_as_free_at_two_rows_runs_at_one(tmp_path):
    """Data2VecVision's ``permute(...).contiguous().view(...)`` after SDPA: at the 2 rows save
    traces with, the permuted tensor was contiguous and torch.export dropped ``contiguous()``; at
    1 row its strides differ and the bare ``view`` failed (``csqc.save`` refused the model). Saved
    programs read views as reshapes (``modelfile._views_as_reshapes``)."""
    config = transformers.Data2VecVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8,
                                               use_relative_position_bias=True, use_mean_pooling=True)
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_Pixels(transformers.Data2VecVisionModel(config).eval()), n_bits=3,
                                       act_bits=4)).eval()
    path = csqc.save(model, tmp_path / "d2v.pt", torch.randn(1, 3, 32, 32))
    assert not any(n.target == torch.ops.aten.view.default for n in csqc.load(path).program.graph.nodes)
    report = csqc.verify(path, samples=2)
    assert report.ok and report.accumulators_exact, report.notes


class _Pixels(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


class _Masked(torch.nn.Module):
    """A model called as deployments call it: token ids and an attention mask (1 keep, 0 pad)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _padded(seed):
    """Two rows, the second padded on the right from a drawn position (the first from the other end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, int(torch.randint(2, SEQ, (1,), generator=g)):] = 0
    mask[0, :int(torch.randint(1, SEQ - 1, (1,), generator=g))] = 0
    return ids, mask


@pytest.mark.parametrize("factory, attn", [(_bert, "sdpa"), (_gpt2, "eager")], ids=["bert-sdpa", "gpt2-eager"])
def test_an_attention_mask_input_is_honoured_exactly(tmp_path, factory, attn):
    """transformers builds the mask from the input (``mask.to(bool)``, then
    ``mask[batch_idx, kv_idx]``): the input's declared range bounds it (a lookup of ``!= 0`` per
    value), constant index arrays on leading axes are one ``take``. The artifact computes torch's
    output for padded rows, and verify's random masks agree exactly across runtimes."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_Masked(factory(attn).eval()), n_bits=4, act_bits=8)).eval()
    ids, mask = _padded(0)
    with pytest.raises(csqc.errors.UnsupportedOps, match="declare their range"):
        csqc.save(model, tmp_path / "undeclared.pt", (ids, mask))
    path = csqc.save(model, tmp_path / "m.pt", (ids, mask), input_ranges={"input1": (0, 2)})
    csqc.compile(path, "llvm", tmp_path / "m.so")
    from csqc import runtime

    artifact, reference = runtime.load(tmp_path / "m.so"), csqc.load(path)
    for seed in range(3):
        ids, mask = _padded(seed)
        np.testing.assert_allclose(artifact(ids.numpy(), mask.numpy()), reference(ids, mask).numpy(),
                                   rtol=1e-4, atol=1e-4)
    report = csqc.verify(path, samples=4, artifact=str(tmp_path / "m.so"))
    assert report.ok and report.accumulators_exact, report.notes
