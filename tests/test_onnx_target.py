"""ONNX target: the reference model is integer-exact in ONNX Runtime; the deploy model is compact."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import csqc
from csqc import interpreter
from csqc.capture import capture
from csqc.data import load_digits_split
from csqc.passes import run_passes
from csqc.targets.onnx import emit_deploy, emit_reference, layer_table, make_session, run, run_with_intermediates
from csqc.targets.onnx.deploy import accuracy_cost
from csqc.targets.onnx.reference import IR_VERSION, OPSET
from csqc.targets.onnx.runner import load_onnx, save_onnx


def _layer_tensors(model):
    return [row[k] for row in layer_table(model) for k in ("xq", "scale", "acc", "out") if row[k]]


def _ort_vs_interpreter(graph, x, check_planes=False):
    """Run the reference ONNX of ``graph`` and the interpreter; return both records per layer."""
    model = emit_reference(graph, check_planes=check_planes)
    record = {}
    golden = interpreter.run(graph, [x], record=record)
    outs, tensors = run_with_intermediates(model, [x], _layer_tensors(model))
    return model, record, golden, outs, tensors


def _assert_exact(model, record, tensors):
    rows = [r for r in layer_table(model) if r["acc"]]
    assert rows, "no integer layers"
    for row in rows:
        acc = tensors[row["acc"]]
        assert acc.dtype == np.dtype(row["acc_dtype"])
        np.testing.assert_array_equal(acc.astype(np.int64) << row["acc_shift"], record[f"{row['name']}.acc"])
        np.testing.assert_array_equal(tensors[row["xq"]].astype(np.int64), record[f"{row['quant_node']}.codes"])
        if np.float32(tensors[row["scale"]]) == record[f"{row['quant_node']}.scale"]:
            np.testing.assert_array_equal(tensors[row["out"]], record[row["name"]])  # the same epilogue order
        else:  # float ops before the quantizer (pooling) summed in another order: S differs by an ulp
            np.testing.assert_allclose(tensors[row["out"]], record[row["name"]], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def digits_graphs(trained):
    """Integer-pipeline graphs (batch 16) of the digits MLP and CNN, and test inputs."""
    out = {}
    for recipe in ("digits-mlp", "digits-cnn"):
        _, _, _, path = trained(recipe)
        g = capture(csqc.load(path), batch=16)
        split = load_digits_split(image=recipe == "digits-cnn")
        out[recipe] = (g, split.x_test[:16])
    return out


@pytest.fixture(scope="module")
def resnet20_model(tmp_path_factory):
    from csqc.models.vision import resnet20

    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(resnet20().eval(), n_bits=4, act_bits=4)).eval()
    path = tmp_path_factory.mktemp("r20") / "r20.pt"
    csqc.save(model, path, torch.zeros(2, 3, 32, 32))
    return csqc.load(path)


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_reference_passes_checker_and_is_exact(digits_graphs, recipe):
    g, x = digits_graphs[recipe]
    graph = run_passes(g, "integer")[0]
    model, record, golden, outs, tensors = _ort_vs_interpreter(graph, x)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    ops = {n.op_type for n in model.graph.node}
    assert ("ConvInteger" in ops) == (recipe == "digits-cnn") and "MatMulInteger" in ops
    _assert_exact(model, record, tensors)
    np.testing.assert_array_equal(outs[0], golden[0])


def test_resnet20_accumulators_exact(resnet20_model):
    graph = run_passes(capture(resnet20_model, batch=2), "integer")[0]
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    model, record, golden, outs, tensors = _ort_vs_interpreter(graph, x)
    assert len([r for r in layer_table(model) if r["acc"]]) == len(graph.quant_layers()) - 1  # first conv: float input
    _assert_exact(model, record, tensors)
    np.testing.assert_allclose(outs[0], golden[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pipeline", ["integer", "default"])
def test_check_planes_gives_identical_accumulators(digits_graphs, pipeline):
    g, x = digits_graphs["digits-cnn"]
    graph = run_passes(g, pipeline)[0]
    if pipeline == "default":  # the packed plane encodings the bit-serial targets use
        assert {n.quant.encoding for n in graph.quant_layers()} - {"int"}
    plain = emit_reference(graph)
    planes, record, _, outs, tensors = _ort_vs_interpreter(graph, x, check_planes=True)
    n_products = lambda m: sum(n.op_type in ("ConvInteger", "MatMulInteger") for n in m.graph.node)  # noqa: E731
    assert n_products(planes) > n_products(plain)
    _assert_exact(planes, record, tensors)
    _, plain_tensors = run_with_intermediates(plain, [x], _layer_tensors(plain))
    for row in layer_table(planes):
        if row["acc"]:
            np.testing.assert_array_equal(tensors[row["acc"]], plain_tensors[row["acc"]])


def test_none_pipeline_has_float_input_layers(digits_graphs):
    g, x = digits_graphs["digits-cnn"]
    model = emit_reference(g)  # captured graph: quantize -> dequantize -> layer on floats
    assert not any(row["acc"] for row in layer_table(model))
    np.testing.assert_allclose(run(model, [x])[0], interpreter.run(g, [x])[0], rtol=1e-4, atol=1e-4)


def test_rounding_ties_are_half_to_even_in_csq_order(tmp_path):
    """max|x| = 15 with 4 bits: (|x| * 15) / 15 lands exactly on .5 for x = k + 0.5."""
    torch.manual_seed(0)
    model = csqc.convert(nn.Sequential(nn.Linear(12, 3)), n_bits=4, act_bits=4, quantize_first_input=True)
    csqc.save(csqc.finalize(model).eval(), tmp_path / "tie.pt", torch.zeros(1, 12))
    cm = csqc.load(tmp_path / "tie.pt")
    x = np.array([[0.5, 1.5, 2.5, 3.5, 4.5, 6.5, -0.5, -1.5, -2.5, -7.5, 15.0, 0.0]], np.float32)
    expected = np.array([[0, 2, 2, 4, 4, 6, 0, -2, -2, -8, 15, 0]])
    assert not np.array_equal(expected, np.sign(x) * np.floor(np.abs(x) + 0.5))  # the ties matter

    codes, scale = csqc.ops.act_codes(torch.from_numpy(x), 4, 0.0)  # PyTorch's CSQ order
    np.testing.assert_array_equal(codes.numpy(), expected)
    graph = run_passes(capture(cm, batch=1), "integer")[0]
    model, record, golden, outs, tensors = _ort_vs_interpreter(graph, x)
    (row,) = layer_table(model)
    np.testing.assert_array_equal(record[f"{row['quant_node']}.codes"], expected)  # interpreter
    np.testing.assert_array_equal(tensors[row["xq"]], expected)  # ONNX Runtime (signed: int16 codes)
    assert tensors[row["xq"]].dtype == np.int16
    _assert_exact(model, record, tensors)
    # PyTorch multiplies dequantized floats; the same codes give the same output up to float rounding
    np.testing.assert_allclose(outs[0], cm(x).numpy(), rtol=1e-5, atol=1e-5)


def test_reference_model_saves_atomically_and_reloads(digits_graphs, tmp_path):
    g, x = digits_graphs["digits-mlp"]
    model = emit_reference(run_passes(g, "integer")[0])
    path = tmp_path / "m.onnx"
    save_onnx(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind
    reloaded = load_onnx(path)
    assert layer_table(reloaded) == layer_table(model)
    np.testing.assert_array_equal(run(reloaded, [x])[0], run(model, [x])[0])
    with pytest.raises(csqc.BadInput):
        save_onnx(model, tmp_path / "no" / "such" / "dir.onnx")


def test_deploy_keeps_accuracy_and_is_small(trained):
    model, result, _, path = trained("digits-cnn")
    cm = csqc.load(path)
    graph = run_passes(capture(cm, batch=1), "integer")[0]
    split = load_digits_split(image=True)
    deploy, report = emit_deploy(graph, [split.x_train[:200]])
    onnx.checker.check_model(deploy, full_check=True)
    ops = {n.op_type for n in deploy.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMulNBits"} <= ops
    formats = {row["name"]: row["format"] for row in report["layers"]}
    assert formats["fc"].startswith("matmulnbits-")
    assert set(formats.values()) <= {"int8-qdq", "int4-qdq", "matmulnbits-2", "matmulnbits-4", "matmulnbits-8"}
    assert report["size_bytes"] * 3 < report["fp32_size_bytes"]
    # any batch size: the deploy model's batch dimension is symbolic
    outputs = run(make_session(deploy, exact=False), [split.x_test])[0]
    report = accuracy_cost(report, outputs, cm(split.x_test).numpy(), split.y_test)
    # the cost is a drop: 8-bit static activations may also do better than CSQ's 4-bit dynamic ones
    assert report["accuracy"] >= report["reference_accuracy"] - 0.005, report
    assert report["top1_agreement"] > 0.97


def test_static_scale_clamps_and_wide_weights_split(tmp_path):
    """Static activation scales clamp codes to L; 8-bit masks (|q| up to 255) need the P - N split."""
    from csqc.layers import calibrate
    from csqc.models import digits_mlp

    torch.manual_seed(0)
    model = csqc.convert(digits_mlp(), n_bits=8, act_bits=4, act_mode="static", quantize_first_input=True)
    calib = torch.rand(32, 64)
    calibrate(model, [calib])
    csqc.save(csqc.finalize(model).eval(), tmp_path / "static.pt", torch.zeros(4, 64))
    graph = run_passes(capture(csqc.load(tmp_path / "static.pt")), "integer")[0]
    assert {n.quant.act_mode for n in graph.quant_layers()} == {"static"}
    x = 2 * np.random.default_rng(0).random((4, 64), dtype=np.float32)  # beyond the calibrated range
    model, record, golden, outs, tensors = _ort_vs_interpreter(graph, x)
    levels = 15
    assert any((np.abs(record[f"{r['quant_node']}.codes"]) == levels).any() for r in layer_table(model))
    wide = [n for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1].endswith(".w1")]
    assert wide, "expected a layer split into positive and negative uint8 weights"
    _assert_exact(model, record, tensors)
    np.testing.assert_array_equal(outs[0], golden[0])


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_dynamic_batch_reference_is_exact_at_every_batch_size(trained, tmp_path, recipe):
    """``compile -t onnx --batch dynamic``: one file, symbolic batch N, and at each batch size it is
    exactly the interpreter on the graph captured at that size (accumulators, codes and outputs)."""
    _, _, _, path = trained(recipe)
    out = tmp_path / "m.onnx"
    result = csqc.compile(csqc.load(path), "onnx", out, batch="dynamic")
    assert result.report["dynamic_batch"] is True
    model = load_onnx(out)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "N"
    x_all = load_digits_split(image=recipe == "digits-cnn").x_test
    for batch in (1, 3, 8):
        x = x_all[10 : 10 + batch]
        graph = run_passes(capture(csqc.load(path), batch=batch), "integer")[0]
        record = {}
        golden = interpreter.run(graph, [x], record=record)
        outs, tensors = run_with_intermediates(model, [x], _layer_tensors(model))
        assert outs[0].shape[0] == batch
        _assert_exact(model, record, tensors)
        np.testing.assert_array_equal(outs[0], golden[0])


def test_dynamic_batch_is_refused_for_tvm_targets(trained, tmp_path):
    from click.testing import CliRunner

    from csqc.cli import cli
    from csqc.errors import BadInput

    _, _, _, path = trained("digits-mlp")
    with pytest.raises(BadInput, match="--batch dynamic is for --target onnx"):
        csqc.compile(csqc.load(path), "llvm", tmp_path / "m.llvm.so", batch="dynamic")
    out = CliRunner().invoke(cli, ["compile", str(path), "-t", "llvm", "--batch", "dynamic", "-o", str(tmp_path / "m.so")])
    assert out.exit_code == 2 and "--batch dynamic is for --target onnx" in out.output
    assert not (tmp_path / "m.so").exists()
    out = CliRunner().invoke(cli, ["compile", str(path), "-t", "onnx", "--batch", "lots"])
    assert out.exit_code == 2 and "neither a batch size nor 'dynamic'" in out.output


def test_dynamic_batch_from_the_command_line_verifies(trained, tmp_path, monkeypatch):
    """The CLI writes the dynamic model under the default name; verify runs it at a batch it was not captured at."""
    import json

    from click.testing import CliRunner

    from csqc.cli import cli

    _, _, _, path = trained("digits-mlp")
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, ["compile", str(path), "-t", "onnx", "--batch", "dynamic", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["batch"] == "dynamic" and data["output"] == "digits-mlp.onnx"
    out = CliRunner().invoke(cli, ["verify", str(path), "--artifact", "digits-mlp.onnx", "--samples", "6",
                                   "--batch", "3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["accumulators_exact"]
