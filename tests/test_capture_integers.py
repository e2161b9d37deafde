"""Integers computed from token ids (``csqc.capture.integers``): comparisons of ids looked up,
cumsum of masks, embeddings at computed positions (RoBERTa's position ids), each bounded under
2^24 or refused; checked against torch, the interpreter and ONNX Runtime, with padding tokens."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import csqc
from csqc import interpreter, runtime
from csqc.capture import capture
from csqc.errors import BadInput, UnsupportedOps

VOCAB, SEQ, DIM, PAD = 13, 8, 6, 1
# padding anywhere (RoBERTa counts positions over the real tokens only), and none at all
IDS = [[0, 5, 7, PAD, PAD, 9, 2, PAD], [4, 4, 4, 4, 4, 4, 4, 4], [PAD] * SEQ, [7, 12, 3, 7, 12, 0, 7, 1]]


class PaddedPositions(nn.Module):
    """RoBERTa's embeddings: positions counted over non-pad tokens, ``pad`` at padding."""

    def __init__(self, max_positions=SEQ + 2):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, DIM), nn.Embedding(max_positions, DIM)
        self.out = nn.Linear(DIM, 3)

    def forward(self, ids):
        mask = ids.ne(PAD).int()
        positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + PAD
        return self.out(self.tokens(ids) + self.positions(positions))


class SinusoidalPositions(nn.Module):
    """M2M100's positions: rows of a constant sinusoidal table by ``index_select`` at the
    computed positions (and at the ids themselves)."""

    def __init__(self):
        super().__init__()
        angles = torch.arange(SEQ + 2)[:, None] / 10.0 ** (torch.arange(DIM)[None, :] / DIM)
        self.register_buffer("table", torch.sin(angles))
        self.tokens = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        mask = ids.ne(PAD).int()
        positions = torch.cumsum(mask, dim=1).type_as(mask) * mask + PAD
        rows = self.table.index_select(0, positions.view(-1)).view(ids.shape[0], ids.shape[1], DIM)
        by_ids = self.tokens.weight.index_select(0, ids.view(-1)).view(ids.shape[0], ids.shape[1], DIM)
        return rows + by_ids


class Pooled(nn.Module):
    """CLIP's pooled outputs: the row at the greatest id, and at the first id equal to 7 (ties:
    torch's first maximum; none: position 0), ``argmax`` with ``keepdim`` along the batch too."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        h = self.tokens(ids)
        rows = torch.arange(ids.shape[0])
        greatest = h[rows, ids.argmax(dim=-1)]
        first_seven = h[rows, (ids.to(torch.int) == 7).int().argmax(dim=-1)]
        along_batch = ids.argmax(dim=0, keepdim=True).float()  # [1, SEQ]
        return torch.cat([greatest, first_seven, along_batch.expand(ids.shape[0], -1)], dim=1)


class Counts(nn.Module):
    """Comparisons of ids with numbers on either side (a float one rounded to float32 as torch
    compares it: ``ids < 3.0000001`` is ``ids < 3``), their logic, a cumsum along a leading axis
    and a float mask from them."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        small = (ids.int() < 5) & (3 <= ids)  # (numbers on the right and on the left; ids as int32)
        running = small.long().cumsum(0)  # along the batch: a permute on either side
        seen = (running >= 1).float() + (ids == 7).float() * 2.0 + (ids < 3.0000001).float()
        return self.tokens(ids) * seen.unsqueeze(-1)


def _saved(module, tmp_path, name, batch=1):
    torch.manual_seed(0)
    return csqc.save(module.eval(), tmp_path / f"{name}.pt", torch.tensor(IDS[:batch]))


@pytest.mark.parametrize("module", [PaddedPositions, SinusoidalPositions, Counts, Pooled],
                         ids=["positions", "index-select", "counts", "argmax"])
def test_integers_from_ids_match_torch_on_every_runtime(tmp_path, module):
    model = module()
    path = _saved(model, tmp_path, module.__name__, batch=2)
    loaded = csqc.load(path)
    graph = capture(loaded)
    assert all(v.type.dtype == "float32" for v in graph.nodes), "integers the model computes are float32 in the IR"
    onnx_path, so_path = tmp_path / "m.onnx", tmp_path / "m.so"
    csqc.compile(path, "onnx", onnx_path)
    csqc.compile(path, "llvm", so_path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path))
    artifact = runtime.load(so_path)
    for i, row in enumerate(IDS):  # every row beside another (batch 2: argmax along the batch too)
        x = torch.tensor([row, IDS[(i + 1) % len(IDS)]])
        expected = model(x).detach().numpy()
        got = {"interpreter": interpreter.run(graph, [x.numpy()])[0],
               "onnxruntime": session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
               "llvm": artifact(x.numpy())}
        for where, y in got.items():
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6, err_msg=f"{where} at ids {x.tolist()}")
    report = csqc.verify(path, samples=3, artifact=str(so_path))
    assert report.ok, report.notes


def test_positions_read_only_the_rows_their_range_spans(tmp_path):
    """A table of 500 rows: positions of 8 tokens lie in [1, 1 + 8], so the one-hot row spans 9."""
    graph = capture(csqc.load(_saved(PaddedPositions(max_positions=500), tmp_path, "wide")))
    (weight,) = [k for k in graph.params if k.endswith("positions.weight")]
    assert graph.params[weight].shape == (DIM, SEQ + 1)
    lookups = [n for n in graph.nodes if n.op == "embedding"]
    assert len(lookups) == 2 and graph.params[lookups[0].inputs[0]].shape == (VOCAB, 1)  # ids != pad, looked up


class _Refused(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form, self.tokens, self.positions = form, nn.Embedding(VOCAB, DIM), nn.Embedding(64, DIM)

    def forward(self, ids):
        h = self.tokens(ids)
        if self.form == "huge":  # 2^22 per token, 8 tokens: past 2^24
            return h + self.positions((ids.ne(PAD).long() * 4194304).cumsum(1) % 64)
        if self.form == "float-cumsum":
            return h.cumsum(1)
        if self.form == "truncation":  # float to integer: a rounding capture does not do
            return self.positions((h[..., 0] * 10).long().clamp(0, 63))
        counts = ids.ne(PAD).long().cumsum(1)  # in [0, 8]
        if self.form == "narrowing":  # torch wraps 800 to 32 in int8
            return h * (counts * 100).to(torch.int8).float().unsqueeze(-1)
        if self.form == "narrow-cumsum":  # torch.int8 holds 127
            return h * (ids >= 0).long().mul(100).cumsum(1, dtype=torch.int8).float().unsqueeze(-1)
        if self.form == "before-the-table":  # position -1 where the first token is a pad: torch raises
            return h + self.positions(counts - 1)
        if self.form == "past-the-table":
            return h + self.positions(counts * 8)  # (8 at all 8 tokens: row 64 of 64)
        if self.form == "float-argmax":  # (NaN leads torch's order)
            return self.positions(h[..., 0].argmax(dim=1))
        if self.form == "half":
            return h * counts.half().float().unsqueeze(-1)
        if self.form == "float64-number":  # torch compares integers with a 0-d float64 tensor in float64
            return h * (counts >= torch.tensor(2.00000001, dtype=torch.float64)).float().unsqueeze(-1)
        return h * (ids.float() > 3).unsqueeze(-1)  # "ids-as-float": a float view of the ids


@pytest.mark.parametrize("form, message", [
    ("huge", "past float32's exact 2^24"), ("float-cumsum", "cumsum of float values"),
    ("truncation", "conversion of a runtime value to int64"), ("ids-as-float", "conversion of a runtime value to float32"),
    ("narrowing", "[0, 800] converted to torch.int8, which wraps them"),
    ("narrow-cumsum", "past float32's exact 2^24 or its torch.int8"),
    ("before-the-table", "may reach [-1, 7], outside the table's 64 rows"),
    ("past-the-table", "may reach [0, 64], outside the table's 64 rows"),
    ("half", "float16 values"), ("float64-number", "float64 constant not exact in float32"),
    ("float-argmax", "argmax of float values"),
])
def test_integers_capture_cannot_keep_exact_are_refused_by_name(tmp_path, form, message):
    with pytest.raises(UnsupportedOps, match=re.escape(message)):  # (save captures the model to check it)
        _saved(_Refused(form), tmp_path, form)


@pytest.fixture(scope="module")
def positions_graph(tmp_path_factory):
    model = PaddedPositions().eval()
    path = _saved(model, tmp_path_factory.mktemp("positions"), "positions")
    return model, capture(csqc.load(path))


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, (1, SEQ), elements=st.integers(0, VOCAB - 1)))
def test_positions_of_any_ids_are_torchs(positions_graph, ids):
    """Any id row (pads drawn often: ids 0..12 with pad 1): the interpreter's output is torch's,
    so the positions looked up are torch's (a wrong position moves a row by a whole embedding)."""
    model, graph = positions_graph
    expected = model(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(interpreter.run(graph, [ids])[0], expected, rtol=1e-5, atol=1e-6)


class _CountsOut(nn.Module):
    """Returns the running count of non-pad tokens itself (int64)."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 1)

    def forward(self, ids):
        return ids.ne(PAD).long().cumsum(1), self.tokens(ids)


def test_an_integer_output_is_refused_as_a_boolean_one_is(tmp_path):
    with pytest.raises(BadInput, match="output 0 is torch.int64: csqc's runtimes return float32"):
        _saved(_CountsOut(), tmp_path, "int-out")
