"""Quantizer idioms of other QAT code bases become csqc activation codes (csqc.idioms).

Each model quantizes its input with one idiom, then a CSQ linear layer reads it. The model is
saved with ``csqc.save`` (the program check must accept the aten ops) and loaded again; the
captured IR must carry a quantize node of the expected bits, signedness and scale, named after
the idiom, and its codes must be PyTorch's: exactly where the float orders agree, else off by
at most one code on a counted few near-tie inputs.
"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import csqc
from csqc.capture import capture
from csqc.cli import cli
from csqc.errors import UnsupportedOps
from csqc.interpreter import run
from csqc.report import CSQC_ACT_QUANT, activation_rows


class FakeQuant(nn.Module):
    def __init__(self, scale, zero_point, qmin, qmax, as_buffers=False):
        super().__init__()
        self.grid = (qmin, qmax)
        if as_buffers:  # the tensor-qparams form a FakeQuantize module's buffers give
            self.register_buffer("scale", torch.tensor([scale]))
            self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int32))
        else:
            self.scale, self.zero_point = scale, zero_point

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, *self.grid)


class MaxAbsSTE(nn.Module):
    """The CSQ reference's quantizer as plain tensor code (no ``if S == 0``)."""

    def forward(self, x):
        s = x.abs().max()
        q = torch.round(x.abs() * 15 / s) / 15 * s * torch.sign(x)
        return x + (q - x).detach()


class Pact(nn.Module):
    def __init__(self, clamp_form=False):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(2.5))
        self.clamp_form = clamp_form

    def forward(self, x):
        y = torch.clamp(x, torch.zeros(()), self.alpha) if self.clamp_form else torch.min(torch.relu(x), self.alpha)
        q = torch.round(y * 15 / self.alpha) * self.alpha / 15
        return y + (q - y).detach()


class Relu6Quant(nn.Module):
    def __init__(self, reordered=False):
        super().__init__()
        self.reordered = reordered

    def forward(self, x):
        y = nn.functional.relu6(x)
        return torch.round(y / 6 * 7 if self.reordered else y * 7 / 6) * 6 / 7


# name -> (quantizer, idiom, bits, signed, static scale (0: dynamic), codes equal PyTorch's exactly)
IDIOMS = {
    "fq-signed": (lambda: FakeQuant(0.125, 0, -127, 127), "torch fake_quantize", 7, True, 0.125 * 127, True),
    "fq-unsigned": (lambda: FakeQuant(0.0625, 0, 0, 255, as_buffers=True), "torch fake_quantize", 8, False,
                    0.0625 * 255, True),
    "fq-scale-0.1": (lambda: FakeQuant(0.1, 0, -15, 15), "torch fake_quantize", 4, True, np.float32(0.1) * 15, False),
    "max-abs-ste": (MaxAbsSTE, "CSQ max-abs STE", 4, True, 0.0, True),
    "pact-min": (Pact, "PACT clip", 4, False, 2.5, True),
    "pact-clamp": (lambda: Pact(clamp_form=True), "PACT clip", 4, False, 2.5, True),
    "relu6": (Relu6Quant, "ReLU6 clip", 3, False, 6.0, True),
    "relu6-reordered": (lambda: Relu6Quant(reordered=True), "ReLU6 clip", 3, False, 6.0, False),  # v / 6 * 7
}


def _inputs(static: float, levels: int) -> torch.Tensor:
    """Random values plus exact rounding ties of the grid and their float32 neighbours."""
    g = torch.Generator().manual_seed(0)
    step = (static or 4.0) / levels
    ties = (torch.arange(-levels, levels, dtype=torch.float32) + 0.5) * step
    near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    x = torch.cat([torch.randn(4 * 16 * 16 - near.numel() % 16, generator=g) * 2, near])
    return x[: x.numel() // 16 * 16].reshape(-1, 16)


def _model(quantizer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(quantizer, nn.Linear(16, 8))
    return csqc.finalize(csqc.convert(net, n_bits=4)).eval()  # weights only: the idiom quantizes


def _saved(tmp_path, quantizer, x) -> tuple[nn.Module, csqc.CsqcModel]:
    model = _model(quantizer)
    path = csqc.save(model, tmp_path / "m.pt", x)
    return model, csqc.load(path)  # the program check accepts the idiom's aten ops


@pytest.mark.parametrize("name", list(IDIOMS))
def test_idiom_becomes_csqc_codes_equal_to_pytorch(tmp_path, name):
    make, idiom, bits, signed, static, exact = IDIOMS[name]
    levels = 2**bits - 1
    x = _inputs(float(static), levels)
    model, loaded = _saved(tmp_path, make(), x)
    g = capture(loaded)
    (quant,) = [n for n in g.nodes if n.op == "quantize"]
    assert (quant.attr("bits"), quant.attr("signed")) == (bits, signed)
    assert quant.attr("static_scale") == pytest.approx(float(static), rel=1e-7)
    assert quant.attr("idiom").startswith(idiom)
    assert ("can differ by one" in quant.attr("idiom")) == (not exact)  # the report says when codes may differ
    record = {}
    out = run(g, [x.numpy()], record=record)[0]
    codes = record[f"{quant.name}.codes"].astype(np.int64)
    with torch.no_grad():
        q = model[0](x).double()
        s = float(static) if static else float(x.abs().max())
        theirs = torch.round(q * levels / s).numpy().astype(np.int64)
        expected = model(x).numpy()
    differ = int((codes != theirs).sum())
    assert np.abs(codes - theirs).max() <= 1
    if exact:
        assert differ == 0, f"{differ} codes differ"
    else:
        assert differ <= codes.size // 100, f"{differ} of {codes.size} codes differ (near-tie inputs only)"
    if differ == 0:  # same codes: the outputs differ only in float rounding
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    # no float leftovers of the idiom: the graph is quantize -> (relu) -> qlinear
    assert not any(n.op in ("div", "mul", "sub") for n in g.nodes)


@pytest.mark.parametrize("scale, exact", [(0.125, True), (0.1, False)])
def test_asymmetric_fake_quantize_becomes_the_static_zero_point_quantizer(tmp_path, scale, exact):
    x = _inputs(0.0, 15)
    model, loaded = _saved(tmp_path, FakeQuant(scale, 3, 0, 255), x)
    g = capture(loaded)
    (quant,) = [n for n in g.nodes if n.op == "quantize"]
    assert quant.attr("asymmetric") and quant.attr("zero_point") == 3 and quant.type.qzero
    assert quant.attr("static_scale") == pytest.approx(scale * 255, rel=1e-7)
    assert ("can differ by one" in quant.attr("idiom")) == (not exact)
    record = {}
    run(g, [x.numpy()], record=record)
    codes = record[f"{quant.name}.codes"].astype(np.int64)
    theirs = np.clip(np.round(x.numpy().astype(np.float64) / scale) + 3, 0, 255)  # torch's grid
    differ = int((codes != theirs).sum())
    assert np.abs(codes - theirs).max() <= 1 and differ <= (0 if exact else codes.size // 100)
    assert int(record[f"{quant.name}.zero_point"]) == 3
    (row,) = activation_rows(g)  # inspect lists it as unsigned codes with their range and zero point
    assert row.asymmetric and row.zero_point == 3 and float(row.scale) == pytest.approx(scale * 255, rel=1e-6)
    res = CliRunner().invoke(cli, ["inspect", str(loaded.source)])
    assert res.exit_code == 0 and f"a8 R {row.scale} zp 3" in res.output, res.output


def test_signed_grid_with_a_zero_point_is_left_float_and_reported(tmp_path):
    x = _inputs(0.0, 15)
    model, loaded = _saved(tmp_path, FakeQuant(0.1, 3, -128, 127), x)
    g = capture(loaded)
    assert not [n for n in g.nodes if n.op == "quantize"]
    (row,) = activation_rows(g)
    assert row.bits is None and "left float: zero_point 3 with grid -128..127" in row.idiom


def test_other_grids_are_left_float_with_their_reason(tmp_path):
    x = _inputs(0.0, 15)
    for grid, reason in (((-128, 127), "csqc's signed grid is symmetric (-127..127)"),
                         ((-100, 100), "is not csqc's")):
        _, loaded = _saved(tmp_path, FakeQuant(0.1, 0, *grid), x)
        (row,) = activation_rows(capture(loaded))
        assert row.bits is None and reason in row.idiom, row.idiom


def test_rounding_that_is_no_known_quantizer_still_fails_capture_by_name(tmp_path):
    class Rounds(nn.Module):
        def forward(self, x):
            return torch.round(x * 3)

    with pytest.raises(UnsupportedOps, match="round"):  # at save, which captures before it writes
        _saved(tmp_path, Rounds(), _inputs(0.0, 15))
    assert not (tmp_path / "m.pt").exists()


class Mixed(nn.Module):
    """Three idioms and three CSQ layers: what the compile and inspect reports list."""

    def __init__(self):
        super().__init__()
        self.fq, self.ste, self.pact = FakeQuant(0.125, 0, -127, 127), MaxAbsSTE(), Pact()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc3(self.pact(self.fc2(self.ste(self.fc1(self.fq(x))))))


def test_mixed_idioms_compile_llvm_verify_exactly_and_inspect_lists_them(tmp_path):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(Mixed(), n_bits=4)).eval()
    path = csqc.save(model, tmp_path / "mixed.pt", torch.randn(4, 16))
    so = tmp_path / "mixed.so"
    result = csqc.compile(path, "llvm", so)
    rows = {r["input_of"][0]: r for r in result.report["activations"]}
    assert {k: (v["idiom"].split(" (")[0], v["bits"], v["signed"]) for k, v in rows.items()} == {
        "fc1": ("torch fake_quantize", 7, True), "fc2": ("CSQ max-abs STE", 4, True), "fc3": ("PACT clip", 4, False)}
    # every CSQ layer reads the idiom's codes, not floats
    assert {n.name: n.quant.act_bits for n in result.graph.quant_layers()} == {"fc1": 7, "fc2": 4, "fc3": 4}
    report = csqc.verify(csqc.load(path), samples=8, artifact=str(so))
    data = report.to_json()
    assert report.ok and report.accumulators_exact, json.dumps({k: v for k, v in data.items() if k != "layers"})
    exact = [p for p in data["pairs"] if p["kind"] == "exact"]  # interpreters, ONNX Runtime, the artifact
    assert f"artifact:{so.name}" in report.runtimes and len(exact) >= 3
    assert all(p["ok"] and p["max_abs_error"] == 0 for p in exact), exact
    res = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    listed = {r["input_of"][0]: r["idiom"].split(" (")[0] for r in json.loads(res.output)["activations"]}
    assert listed == {"fc1": "torch fake_quantize", "fc2": "CSQ max-abs STE", "fc3": "PACT clip"}
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 0 and "activation quantizers" in res.output and "PACT clip" in res.output


def test_csqc_own_quantizer_is_listed_as_csqc_actquant(tiny_mlp):
    rows = activation_rows(capture(csqc.load(tiny_mlp)))
    assert rows and all(r.idiom == CSQC_ACT_QUANT for r in rows)
