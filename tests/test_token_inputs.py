"""Token-id models without transformers: constant folding in capture, the embedding op with its
integer input, named dict outputs at save, valid ids for ``verify``'s random samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import interpreter
from csqc.capture import capture
from csqc.errors import BadInput
from csqc.ir import IRError, verify as verify_ir
from csqc.verify import _Context, _id_range
from irbuild import Builder

VOCAB, SEQ, DIM = 11, 6, 8


class _TinyLM(nn.Module):
    """Token + position embeddings, a causal mask built from constants, a dict of two outputs."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)
        self.positions = nn.Embedding(SEQ, DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # arange: folded
        h = self.tokens(ids) + self.positions(positions)
        causal = torch.ones(SEQ, SEQ).tril() > 0  # a mask of constants: folded
        mask = torch.where(causal, torch.zeros(()), torch.full((), -1e9))
        scores = torch.matmul(h, h.transpose(1, 2)) + mask
        h = torch.matmul(torch.softmax(scores, -1), self.proj(h))
        return {"hidden": h, "cube": h.pow(3)}


def _ids(seed=0, low=0, high=VOCAB):
    return torch.randint(low, high, (1, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = _TinyLM().eval()
    path = csqc.save(model, tmp_path_factory.mktemp("tiny") / "tiny.pt", _ids())
    return model, csqc.load(path)


def test_constants_fold_and_ids_reach_only_the_embedding(tiny):
    model, loaded = tiny
    g = capture(loaded)
    ops = [n.op for n in g.nodes]
    assert ops.count("embedding") == 1  # the position embedding of a constant arange was folded
    assert not {"arange", "where", "ge"} & set(ops)
    assert [o["name"] for o in loaded.manifest["outputs"]] == ["hidden", "cube"]
    assert list(g.outputs) == ["hidden", "cube"]
    ids = _ids(seed=3)
    got = interpreter.run(g, [ids.numpy()])
    with torch.no_grad():
        want = model(ids)
    np.testing.assert_allclose(got[0], want["hidden"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want["cube"].numpy(), rtol=1e-5, atol=1e-5)


def test_ids_outside_the_table_are_refused(tiny, tmp_path):
    _, loaded = tiny
    g = capture(loaded)
    bad = _ids().numpy().copy()
    bad[0, 2] = VOCAB
    with pytest.raises(BadInput, match="token id out of range"):
        interpreter.run(g, [bad])
    artifact = tmp_path / "tiny.so"
    csqc.compile(loaded, target="llvm", output=artifact)
    run = csqc.runtime.load(artifact)
    # float matmuls: within rounding of the interpreter (verify judges the quantized models exactly)
    np.testing.assert_allclose(run(_ids().numpy())[0], interpreter.run(g, [_ids().numpy()])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput, match="token id out of range"):
        run(bad)
    with pytest.raises(BadInput, match="not whole numbers"):
        run(_ids().numpy() + 0.5)


def test_verify_samples_valid_ids(tiny, tmp_path):
    _, loaded = tiny
    ctx = _Context(loaded, None)
    assert _id_range(ctx, 0) == (0, VOCAB)  # from the embedding the ids index
    report = csqc.verify(loaded, samples=3)
    assert report.ok, report.to_json()


def test_declared_input_ranges_are_stored_and_checked(tmp_path):
    model = _TinyLM().eval()
    path = csqc.save(model, tmp_path / "ranged.pt", _ids(high=4), input_ranges={"input0": (0, 4)})
    loaded = csqc.load(path)
    assert loaded.input_specs[0]["range"] == [0, 4]
    assert _id_range(_Context(loaded, None), 0) == (0, 4)
    with pytest.raises(BadInput, match="model's inputs are"):
        csqc.save(model, tmp_path / "x.pt", _ids(), input_ranges={"ids": (0, 4)})
    with pytest.raises(BadInput, match="low < high"):
        csqc.save(model, tmp_path / "x.pt", _ids(), input_ranges={"input0": (4, 4)})
    with pytest.raises(BadInput, match="only integer inputs"):
        csqc.save(nn.Linear(3, 3), tmp_path / "x.pt", torch.zeros(1, 3), input_ranges={"input0": (0, 4)})
    assert not (tmp_path / "x.pt").exists()


class _WithCache(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "cache": object()}


def test_non_tensor_outputs_are_refused_by_name(tmp_path):
    with pytest.raises(BadInput, match="model output 'cache' is a object, not tensors"):
        csqc.save(_WithCache(), tmp_path / "m.pt", torch.zeros(1, 3))
    assert not (tmp_path / "m.pt").exists()


class _InfiniteConstant(nn.Module):
    def forward(self, x):
        return x + torch.full((3,), 3e38) * 10  # overflows float32 when folded


def test_a_non_finite_folded_constant_is_refused(tmp_path):
    with pytest.raises(BadInput, match="NaN or infinite"):  # at save, which captures before it writes
        csqc.save(_InfiniteConstant(), tmp_path / "m.pt", torch.zeros(1, 3))
    assert not (tmp_path / "m.pt").exists()


def test_integer_inputs_may_only_be_embedding_ids():
    b = Builder("ids")
    ids = b.input("ids", (1, 4), "int64")
    table = b.param("table", np.zeros((5, 3), np.float32))
    rows = b.node("rows", "embedding", [table, ids], (1, 4, 3))
    b.node("bad", "mul", [ids, b.param("two", np.float32(2))], (1, 4))
    with pytest.raises(IRError, match="integer input %ids may only be an embedding's ids"):
        verify_ir(b.build(rows))
    ok = Builder("ids")
    ok_ids = ok.input("ids", (1, 4), "int64")
    verify_ir(ok.build(ok.node("rows", "embedding", [ok.param("table", np.zeros((5, 3), np.float32)), ok_ids],
                               (1, 4, 3))))


def test_bench_feeds_valid_ids_and_profiles_every_kernel_call(tiny):
    """``csqc bench`` times token models on valid ids (as verify draws them) against the baselines,
    and ``profile=True`` times each kernel call of the artifact."""
    from csqc.bench import bench
    from csqc.verify import random_inputs

    _, loaded = tiny
    ids = random_inputs(loaded, 1)[0]
    assert ids.dtype == np.int64 and ids.shape == (1, SEQ) and 0 <= ids.min() and ids.max() < VOCAB
    report = bench(loaded, rounds=1, limits=False, profile=True)
    assert {"csqc", "onnxruntime-fp32"} <= {r.runtime for r in report.results}
    assert all(r.median_us > 0 for r in report.results)
    kinds = {p["kind"] for p in report.profile}
    assert "embedding" in kinds and all(p["median_us"] > 0 for p in report.profile)
    assert [p["index"] for p in report.profile] == list(range(len(report.profile)))
    assert report.to_json()["profile"] == report.profile
