"""The pass manager: named pipelines, IR dumps, verification after each pass, clear failures."""
import numpy as np
import pytest

from csqc.errors import BadInput
from csqc.ir import Graph, IRError
from csqc.passes import PIPELINES, PassFailure, PassResult, register, registered_passes, run_passes
from csqc.passes import registry
from irbuild import Builder, assert_same_accumulators, assert_unchanged, random_q, run, snapshot


@pytest.fixture
def captured():
    """As capture emits it: quantize -> dequantize -> qconv2d -> batch_norm -> relu -> reshape -> qlinear."""
    rng = np.random.default_rng(0)
    b = Builder("net")
    x = b.input("x", (2, 2, 4, 4))
    d = b.dequantize(b.quantize(x, 4))
    y = b.qconv2d("conv", d, random_q(rng, (3, 2, 3, 3), 6, (5, 3, 2)), n_bits=6, active_bits=(5, 3, 2), padding=1)
    y = b.batch_norm("bn", y, rng.random(3) + 0.5, rng.standard_normal(3))
    r = b.node("relu", "relu", [y])
    f = b.node("flat", "reshape", [r], (2, 48))
    d2 = b.dequantize(b.quantize(f, 3, signed=False))
    z = b.qlinear("fc", d2, random_q(rng, (4, 48), 4, (3, 1, 0)), n_bits=4, active_bits=(3, 1, 0),
                  add=np.zeros(4, np.float32))
    return b.build(z), [rng.standard_normal((2, 2, 4, 4)).astype(np.float32)]


@pytest.fixture
def broken_pass():
    """Registers a pass named ``broken`` that leaves an input undefined; removed afterwards."""

    def broken(g: Graph) -> PassResult:
        first = g.nodes[0]
        return PassResult(g.replace(nodes=(first.replace(inputs=("nowhere",)),) + g.nodes[1:]), True)

    broken.__module__ = "csqc.passes.broken"  # the registry names a pass after its module
    register()(broken)
    yield "broken"
    registry._REGISTRY.pop("broken")


def test_default_pipeline_runs_every_pass_in_order(captured):
    g, _ = captured
    _, records = run_passes(g, "default")
    assert [r.name for r in records] == list(PIPELINES["default"])


def test_default_pipeline_leaves_only_fused_packed_layers(captured):
    g, _ = captured
    new, _ = run_passes(g, "default")
    assert [n.op for n in new.nodes] == ["quantize", "qconv2d", "reshape", "quantize", "qlinear"]
    for n in new.quant_layers():
        assert n.quant.act_bits is not None and n.quant.packed_word == 32
    assert new.node("conv").attr("act") == "relu"


def test_default_and_integer_pipelines_give_identical_accumulators_and_outputs(captured):
    g, x = captured
    (a,), rec_a = run(run_passes(g, "default")[0], x)
    (b,), rec_b = run(run_passes(g, "integer")[0], x)
    assert_same_accumulators(rec_a, rec_b)
    assert np.array_equal(a, b)


def test_pipeline_can_be_a_list_or_a_comma_separated_string(captured):
    g, _ = captured
    _, records = run_passes(g, ["fold_bn", "dce"])
    assert [(r.name, r.changed) for r in records] == [("fold_bn", True), ("dce", True)]
    _, records = run_passes(g, "fold_bn, dce")
    assert [r.name for r in records] == ["fold_bn", "dce"]


def test_none_pipeline_returns_the_graph_unchanged(captured):
    g, _ = captured
    new, records = run_passes(g, "none")
    assert new is g and records == []


def test_run_passes_does_not_change_its_input(captured):
    g, _ = captured
    snap = snapshot(g)
    run_passes(g, "default")
    assert_unchanged(g, snap)


def test_dump_dir_gets_the_captured_ir_and_one_file_per_pass(captured, tmp_path):
    g, _ = captured
    final, _ = run_passes(g, ["fold_bn", "fuse_activation", "dce"], dump_dir=tmp_path / "dump")
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00-captured.ir", "01-fold_bn.ir", "02-fuse_activation.ir", "03-dce.ir"]
    assert (tmp_path / "dump" / "00-captured.ir").read_text() == g.text()
    assert (tmp_path / "dump" / "03-dce.ir").read_text() == final.text()
    assert "batch_norm" not in (tmp_path / "dump" / "01-fold_bn.ir").read_text()


def test_on_pass_sees_each_intermediate_graph(captured):
    g, _ = captured
    seen = []
    run_passes(g, ["fold_bn", "dce"], on_pass=lambda name, graph: seen.append((name, len(graph.nodes))))
    assert seen == [("fold_bn", len(g.nodes) - 1), ("dce", len(g.nodes) - 1)]


def test_a_pass_that_breaks_the_ir_fails_naming_it_and_the_passes_before(captured, broken_pass):
    g, _ = captured
    with pytest.raises(PassFailure) as e:
        run_passes(g, ["fold_bn", "dce", broken_pass, "split_planes"])
    assert e.value.pass_name == "broken" and e.value.ran == ("fold_bn", "dce")
    assert "pass broken failed" in str(e.value) and "passes that ran before it: fold_bn, dce" in str(e.value)
    assert "input %nowhere is not defined" in str(e.value)


def test_unknown_pass_name_is_bad_input_before_any_pass_runs(captured, tmp_path):
    g, _ = captured
    with pytest.raises(BadInput, match="unknown pass 'fold_everything'"):
        run_passes(g, ["fold_bn", "fold_everything"], dump_dir=tmp_path / "dump")
    assert not (tmp_path / "dump").exists()


def test_missing_required_pass_fails_with_the_requirement(captured):
    g, _ = captured
    with pytest.raises(PassFailure, match="requires split_planes to run first"):
        run_passes(g, ["fold_bn", "pack_planes"])


def test_an_invalid_input_graph_is_rejected_before_the_first_pass(captured):
    g, _ = captured
    with pytest.raises(IRError, match="IR verification failed"):
        run_passes(g.with_params({"fc.mult": np.ones(7, np.float32)}), "default")


def test_every_registered_pass_has_a_docstring():
    for info in registered_passes().values():
        assert info.doc, info.name


def test_a_requirement_is_a_property_of_the_graph_not_a_pass_name(captured):
    # the requirement holds for a graph split in an earlier run, whatever ran in this one
    g, _ = captured
    split, _ = run_passes(g, ["fold_bn", "split_planes"])
    packed, records = run_passes(split, ["pack_planes"])  # split in an earlier run: met
    assert records[0].changed and all(n.quant.packed_word for n in packed.quant_layers())
