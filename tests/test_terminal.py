"""Tables fit the terminal (never at the layer name's expense); progress bars stay off stdout."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import csqc
from csqc.cli import cli
from csqc.terminal import Column, fit_table, output_width

LONG = "encoder_block_with_a_long_name"


class _LongNames(nn.Module):
    """Layer names as long as a torchvision ResNet's (``layer3.1.downsample.0``) or longer."""

    def __init__(self):
        super().__init__()
        setattr(self, LONG, nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU()))
        self.classifier_head_projection = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier_head_projection(getattr(self, LONG)(x))


@pytest.fixture(scope="module")
def long_names_model(tmp_path_factory):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_LongNames(), n_bits=8, act_bits=4))
    return csqc.save(model, tmp_path_factory.mktemp("model") / "long.pt", torch.zeros(1, 64))


def _run(args, columns, **env):
    return CliRunner(env={"COLUMNS": str(columns), **env}).invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.mark.parametrize("columns", [80, 120])
def test_inspect_fits_the_width_and_keeps_every_layer_name(long_names_model, columns):
    out = _run(["inspect", long_names_model], columns)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert max(map(len, lines)) <= columns, "\n".join(l for l in lines if len(l) > columns)
    names = [l["name"] for l in json.loads(_run(["inspect", long_names_model, "--json"], columns).output)["layers"]]
    assert len(names) == 3 and all(LONG in n or "classifier" in n for n in names)
    for name in names:  # whole, on one line: not "enc..." nor folded
        assert any(name in line for line in lines), name
    header = next(line for line in lines if "┃ layer" in line)
    assert "bits" in header and "kernel" in header  # the essential columns stay
    if columns == 80:
        assert "zero % per plane" not in out.output  # a secondary column made room


def test_inspect_shows_every_column_when_there_is_room(long_names_model):
    out = _run(["inspect", long_names_model], 200)
    assert "zero % per plane" in out.output and "fp32" in out.output


def test_compile_table_wraps_the_reason_within_80_columns(long_names_model, tmp_path):
    out = _run(["compile", long_names_model, "-o", tmp_path / "m.so"], 80)
    assert out.exit_code == 0, out.output
    table = [line for line in out.output.splitlines() if line[:1] in "┏┃┡│└"]  # the summary line holds a path
    assert len(table) >= 6 and max(map(len, table)) <= 80
    assert any(f"{LONG}.0 " in line for line in table)


def test_a_key_wider_than_the_terminal_folds_instead_of_being_cut():
    from rich.console import Console

    key = "k" * 50
    table = fit_table("t", [Column("layer"), Column("extra", drop=1)], [(key, "x" * 30)], width=40)
    console = Console(width=40, record=True, file=open("/dev/null", "w"))
    console.print(table)
    text = console.export_text()
    assert "extra" not in text and max(map(len, text.splitlines())) <= 40
    assert "".join(line.strip("│ ") for line in text.splitlines() if "k" in line) == key


@pytest.mark.parametrize("value, expected", [("80", 80), ("nonsense", 100), ("", 100)])
def test_output_width_reads_columns_else_100_off_a_terminal(monkeypatch, value, expected):
    monkeypatch.setenv("COLUMNS", value)
    assert output_width() == expected  # pytest captures stdout: not a terminal


def test_verify_report_fits_80_columns_and_names_the_batch(long_names_model):
    out = _run(["verify", long_names_model, "--samples", "3"], 80)
    assert out.exit_code == 0, out.output
    table = [line for line in out.output.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) >= 5 and max(map(len, table)) <= 80


def test_every_accuracy_names_its_batch(capsys, monkeypatch):
    """Dynamic activation scales make accuracy depend on the batch: the report says which."""
    from csqc.cli_onnx import print_verify_report
    from csqc.verify import VerifyReport

    monkeypatch.setenv("COLUMNS", "80")
    print_verify_report(VerifyReport(ok=True, runtimes=["torch"], pairs=[], accumulators_exact=True,
                                     first_divergence=None, samples=450, batch=1, atol=1e-4, rtol=1e-4,
                                     accuracy={"torch": 0.9889}))
    assert "accuracy torch: 98.89% (batches of 1)" in capsys.readouterr().out


def test_progress_bars_never_reach_stdout_or_json(long_names_model):
    """Under CliRunner stderr is not a terminal: no bar at all, and --json stdout is one document."""
    out = CliRunner().invoke(cli, ["verify", str(long_names_model), "--samples", "3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["ok"] is True and out.stderr == ""
