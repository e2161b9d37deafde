"""csqc.forced_codes: PyTorch run with the golden run's codes tells a code flipped at a rounding
tie from a model that computes something else (csqc verify's PyTorch pair)."""
import numpy as np
import pytest
import torch

import csqc
from csqc.forced_codes import TIE_SLACK, ForcedInterpreter, ForcedRun, code_problems
from csqc.interpreter import QValue, run as interpret
from csqc.verify import _Context, verify


def _q(codes, scale, bits=4, zero_point=0, asymmetric=False):
    return QValue(np.asarray(codes, np.int32), np.float32(scale), bits, zero_point, asymmetric)


def test_a_code_at_a_tie_may_round_either_way():
    # dynamic scale 1.5: x = 0.75 is 7.5 steps of 0.1, a tie; torch.round takes 8 (half to even)
    x = np.array([1.5, 0.75, -0.3, 0.0], np.float32)
    assert code_problems("q", x, _q([15, 8, -3, 0], 1.5), 0.0, 1e-4) == (0, [])
    assert code_problems("q", x, _q([15, 7, -3, 0], 1.5), 0.0, 1e-4) == (1, [])


def test_a_code_off_a_tie_or_a_wrong_scale_is_a_problem():
    x = np.array([1.5, 0.72, -0.3], np.float32)  # 7.2 steps: only 7 will do
    flips, problems = code_problems("layer.quant", x, _q([15, 8, -3], 1.5), 0.0, 1e-4)
    assert flips == 1 and len(problems) == 1 and problems[0].startswith("layer.quant: 1 code(s)")
    assert code_problems("q", x, _q([15, 7, 3], 1.5), 0.0, 1e-4)[1]  # the sign
    flips, problems = code_problems("q", x, _q([15, 7, -3], 1.5 * (1 + 1e-3)), 0.0, 1e-4)
    assert problems and "scale" in problems[0]
    # within half a step plus the slack: still a tie's other neighbour
    near = np.array([1.5, 0.1 * (7.5 - TIE_SLACK / 2)], np.float32)
    assert code_problems("q", near, _q([15, 8], 1.5), 0.0, 1e-4)[1] == []


def test_static_scales_clamp_and_asymmetric_zero_points():
    # static scale 1.0, 4 bits: 2.0 clamps to 15, as the quantizer does
    assert code_problems("q", np.array([2.0, -5.0, 0.5], np.float32), _q([15, -15, 8], 1.0), 1.0, 1e-4) == (0, [])
    # asymmetric, dynamic: range 1.5 - (-0.5) = 2, zero point 0.5 * 15 / 2 = 3.75 -> 4
    x = np.array([-0.5, 1.5, 0.0], np.float32)
    q = _q([0, 15, 4], 2.0, zero_point=4, asymmetric=True)
    assert code_problems("q", x, q, 0.0, 1e-4) == (0, [])
    far = _q([0, 15, 4], 2.0, zero_point=6, asymmetric=True)
    assert "zero point" in code_problems("q", x, far, 0.0, 1e-4)[1][0]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from csqc.models.vision import resnet20

    torch.manual_seed(1)
    model = csqc.finalize(csqc.convert(resnet20().eval(), n_bits=3, act_bits=4, quantize_first_input=False)).eval()
    path = tmp_path_factory.mktemp("forced") / "r20.pt"
    csqc.save(model, path, torch.zeros(1, 3, 32, 32))
    return csqc.load(path)


def _golden(model, seed=0):
    g = _Context(model, None).graph("integer", 1)
    x = np.random.default_rng(seed).random((1, 3, 32, 32), dtype=np.float32)
    record: dict = {}
    return g, x, interpret(g, [x], record=record), record


def test_pytorch_with_the_golden_codes_agrees_within_float_rounding(resnet):
    g, x, golden, record = _golden(resnet)
    run = ForcedRun.for_model(resnet.module, g, 1e-4)
    quantizers = sum(1 for n in g.nodes if n.op == "quantize")
    assert run is not None and len(run.names) == quantizers == 21  # 19 convs (2 read one input), the fc
    (out,) = run.run([x], record)
    peak = float(np.abs(golden[0]).max())
    assert np.abs(out - golden[0]).max() <= 1e-5 * max(peak, 1.0)
    assert run.problem_count == 0 and run.quantizers == quantizers
    assert run.codes == sum(record[name].codes.size for name in run.names.values())


def test_a_golden_code_pytorch_would_not_round_to_is_reported(resnet):
    g, x, _, record = _golden(resnet)
    name = "layer2.0.conv1.input_quant.quant"
    q = record[name]
    codes = q.codes.copy()
    i = np.unravel_index(int(np.argmax(codes)), codes.shape)
    codes[i] -= 2  # two steps: no tie explains it
    record[name] = QValue(codes, q.scale, q.bits, q.zero_point, q.asymmetric)
    run = ForcedRun.for_model(resnet.module, g, 1e-4)
    run.run([x], record)
    # (the layer it feeds then reads another input than PyTorch computed there: later problems follow)
    assert run.problem_count >= 1 and run.problems[0].startswith(f"{name}: 1 code(s) more than half a step")
    assert "not PyTorch's own" in run.summary()


def test_verify_passes_codes_flipped_at_ties_and_says_so(tmp_path):
    """A random-weight ResNet-18 on noise: BatchNorm folded (the interpreter) and not (PyTorch)
    round tied activations apart, the dynamic scales carry the flips to near-equal logits."""
    from csqc.models.vision import resnet18

    torch.manual_seed(1)
    model = csqc.finalize(csqc.convert(resnet18().eval(), n_bits=3, act_bits=4, quantize_first_input=False)).eval()
    csqc.save(model, tmp_path / "r18.pt", torch.zeros(1, 3, 64, 64))
    # min_top1_agreement above 1: the free-running pair always misses, the forced run decides
    report = verify(csqc.load(tmp_path / "r18.pt"), samples=2, runtimes=("pytorch", "interpreter:integer"),
                    min_top1_agreement=1.01)
    assert report.ok, report.notes
    free, forced = report.pairs[:2]
    assert (free.a, forced.a, forced.b) == ("pytorch", "pytorch (golden codes)", "interpreter:integer")
    assert forced.kind == "exact" and forced.ok and forced.within_tolerance and forced.max_rel_error < 1e-5
    (note,) = [n for n in report.notes if n.startswith("pytorch's outputs missed")]
    assert "agrees within the tolerance" in note and "20 quantizer(s)" in note


def test_verify_does_not_excuse_a_model_that_computes_something_else(resnet, monkeypatch):
    """A bias the capture got wrong by 0.02: every IR-chain pair stays exact; the forced run shows it."""
    capture = _Context._capture

    def wrong_bias(self, batch):
        g = capture(self, batch)
        name = next(k for k in g.params if k.endswith(".add"))
        return g.with_params({name: g.params[name] + np.float32(0.02)})  # (random BatchNorms: biases 0)

    monkeypatch.setattr(_Context, "_capture", wrong_bias)
    report = verify(resnet, samples=2, runtimes=("pytorch", "interpreter:integer"), min_top1_agreement=1.01)
    assert not report.ok
    forced = next(p for p in report.pairs if p.a == "pytorch (golden codes)")
    assert not forced.ok
    (note,) = [n for n in report.notes if n.startswith("pytorch's outputs missed")]
    assert "something else than PyTorch's" in note


def test_calibrated_verify_runs_pytorch_with_the_calibrated_scales(resnet):
    calibration = [np.random.default_rng(5).random((8, 3, 32, 32), dtype=np.float32)]
    report = verify(resnet, samples=2, runtimes=("pytorch", "interpreter:integer"), calibrate=calibration,
                    min_top1_agreement=1.01)
    assert report.ok, report.notes
    forced = next(p for p in report.pairs if p.a == "pytorch (golden codes)")
    assert forced.ok and forced.max_rel_error < 1e-5
    assert any("with the calibrated scales" in n and "the calibration's" in n for n in report.notes)


def test_the_interpreter_with_its_own_codes_reproduces_its_outputs_and_a_wrong_code_is_reported(resnet):
    from csqc.verify import interpreter_tensors

    g, x, golden, record = _golden(resnet)
    tensors = interpreter_tensors(g, record, {g.inputs[0].name: x})
    run = ForcedInterpreter.for_graph(g, "onnxruntime", 1e-4)
    assert run is not None and len(run.static) == 21
    (out,) = run.run(g, [x], tensors)
    assert np.array_equal(out, golden[0]) and run.problem_count == 0 and run.flips == 0 and run.quantizers == 21
    codes = tensors["layer3.0.conv2.xq"].copy()
    codes.flat[int(np.argmax(codes))] -= 2
    run = ForcedInterpreter.for_graph(g, "onnxruntime", 1e-4)
    run.run(g, [x], {**tensors, "layer3.0.conv2.xq": codes})
    assert run.problem_count >= 1 and run.problems[0].startswith("layer3.0.conv2.input_quant.quant: 1 code(s)")
    assert "onnxruntime's codes are not the interpreter's own" in run.summary()


def _reference_onnx(model, path, scale_first_residual: float = 1.0):
    import onnx
    from onnx import helper, numpy_helper

    from csqc.capture import capture
    from csqc.passes import run_passes
    from csqc.targets.onnx import emit_reference, save_onnx

    reference = emit_reference(run_passes(capture(model, batch=1), "integer")[0])
    if scale_first_residual != 1.0:
        # a float op between layers computes something else: the first residual add, scaled
        (add,) = [n for n in reference.graph.node if n.name == "layer1.0.add#Add"]
        wanted = add.output[0]
        add.output[0] = wanted + ".unscaled"
        factor = numpy_helper.from_array(np.array(scale_first_residual, np.float32), "test.residual_factor")
        reference.graph.initializer.append(factor)
        index = list(reference.graph.node).index(add)
        reference.graph.node.insert(index + 1, helper.make_node("Mul", [add.output[0], factor.name], [wanted]))
        onnx.checker.check_model(reference)
    save_onnx(reference, path)
    return str(path)


def test_an_onnx_model_whose_float_layer_is_wrong_is_not_excused(resnet, tmp_path):
    """Its quantized layers are exact on their own inputs (the per-layer check passes), its codes
    leave the golden run after a residual add that scales by 1.02: forced into the interpreter,
    they are not ties. (Judged on top-1 agreement, it passed.)"""
    bad = _reference_onnx(resnet, tmp_path / "bad.onnx", scale_first_residual=1.02)
    report = verify(resnet, samples=2, artifact=bad, runtimes=("interpreter:integer", "interpreter:default"),
                    per_layer=True)
    assert report.accumulators_exact and not report.ok
    pair = next(p for p in report.pairs if p.b == "artifact:bad.onnx")
    forced = report.pairs[report.pairs.index(pair) + 1]
    assert forced.a == "interpreter:integer (artifact:bad.onnx's codes)" and not forced.ok and not pair.ok
    (note,) = [n for n in report.notes if n.startswith("artifact:bad.onnx: activation codes first left")]
    assert "codes are not the interpreter's own at a rounding tie" in note
    good = _reference_onnx(resnet, tmp_path / "good.onnx")
    assert verify(resnet, samples=2, artifact=good, runtimes=("interpreter:integer", "interpreter:default")).ok


def test_asymmetric_codes_are_forced_with_each_runtime_s_zero_point(tmp_path):
    """ONNX Runtime and the llvm artifact expose an asymmetric quantizer's zero point next to its
    centered codes; the golden graph run with them reproduces its outputs, a wrong zero point is
    reported."""
    from torch import nn

    from csqc import runtime
    from csqc.verify import RUNTIMES, interpreter_tensors, tvm_artifact_runtime

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    model = csqc.finalize(csqc.convert(model, n_bits=4, act_bits=8, quantize_first_input=True, act_symmetric=False))
    model = csqc.load(csqc.save(model, tmp_path / "asym.pt", torch.randn(3, 12)))
    g = _Context(model, None).graph("integer", 3)
    x = np.random.default_rng(4).standard_normal((3, 12)).astype(np.float32)
    record: dict = {}
    golden = interpret(g, [x], record=record)
    own = interpreter_tensors(g, record, {g.inputs[0].name: x})
    points = {k: v for k, v in own.items() if k.endswith(".zero_point")}
    assert len(points) == 2
    csqc.compile(model, "llvm", tmp_path / "asym.so")
    runs = {"onnxruntime": RUNTIMES["onnxruntime"](_Context(model, None), 3).run([x]),
            "artifact": tvm_artifact_runtime("artifact", runtime.load(tmp_path / "asym.so")).run([x])}
    for name, result in runs.items():
        exposed = {k: int(v) for k, v in result.tensors.items() if k.endswith(".zero_point")}
        assert exposed == {k: int(v) for k, v in points.items()}, name
        # (its tanh may round apart by an ulp, and so its range: the forced run follows its codes and scales)
        run = ForcedInterpreter.for_graph(g, name, 1e-4)
        (out,) = run.run(g, [x], result.tensors)
        assert np.allclose(out, result.outputs[0], rtol=1e-6, atol=1e-7) and run.problem_count == 0, run.problems
    run = ForcedInterpreter.for_graph(g, "interpreter", 1e-4)
    (out,) = run.run(g, [x], own)
    assert np.array_equal(out, golden[0]) and run.problem_count == 0 and run.flips == 0
    key = next(iter(points))
    run = ForcedInterpreter.for_graph(g, "onnxruntime", 1e-4)
    xq = key.replace(".zero_point", ".xq")
    run.run(g, [x], {**own, key: np.int32(points[key] + 2), xq: own[xq] - 2})  # the same codes u, another zero point
    assert run.problem_count >= 1 and "zero point" in run.problems[0]
    run = ForcedInterpreter.for_graph(g, "onnxruntime", 1e-4)
    run.run(g, [x], {k: v for k, v in own.items() if k != key})
    assert run.problem_count == 1 and run.problems[0].endswith("onnxruntime exposes no zero point")


def test_static_zero_points_are_exposed_even_where_they_equal_another_constant(tmp_path):
    """Calibrated asymmetric quantizers of values >= 0 get zero point 0, the value of a constant the
    ONNX graph already shares (differential seed 33032: ONNX Runtime's codes could not be forced,
    and verify failed a model both runtimes computed right)."""
    from torch import nn

    from csqc.verify import RUNTIMES

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    model = csqc.finalize(csqc.convert(model, n_bits=4, act_bits=6, quantize_first_input=True, act_symmetric=False))
    model = csqc.load(csqc.save(model, tmp_path / "asym.pt", torch.rand(3, 12)))
    ctx = _Context(model, None, calibration=[np.random.default_rng(1).random((16, 12), dtype=np.float32)])
    g = ctx.graph("integer", 3)
    static = {n.name: n.attr("zero_point") for n in g.nodes if n.op == "quantize"}
    assert len(static) == 2 and set(static.values()) == {0}  # inputs and ReLU outputs: lo = 0
    x = np.random.default_rng(4).random((3, 12), dtype=np.float32)
    result = RUNTIMES["onnxruntime"](ctx, 3).run([x])
    exposed = {k: int(v) for k, v in result.tensors.items() if k.endswith(".zero_point")}
    assert len(exposed) == 2 and set(exposed.values()) == {0}
    run = ForcedInterpreter.for_graph(g, "onnxruntime", 1e-4)
    (out,) = run.run(g, [x], result.tensors)
    assert np.allclose(out, result.outputs[0], rtol=1e-6, atol=1e-7) and run.problem_count == 0, run.problems


def test_a_quantizer_captured_on_another_view_of_its_tensor_is_forced_in_pytorchs_shape(tmp_path):
    # a decoder's 1x1 latent: its transposed conv compiles as a qlinear, its quantizer on the
    # [N, C] view of PyTorch's [N, C, 1, 1] tensor (the same elements, so the same codes)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 4, 4, 1, 0),
                              torch.nn.ReLU(), torch.nn.ConvTranspose2d(4, 2, 4, 2, 1)).eval()
    x = torch.randn(2, 6, 1, 1)
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4, example_inputs=(x,)))
    csqc.save(model, tmp_path / "decoder.pt", example_inputs=(x,))
    model = csqc.load(tmp_path / "decoder.pt")
    g = csqc.capture(model)
    assert g.node("2").op == "qlinear" and g.type_of(g.node("2").inputs[0]).shape == (2, 8)
    run = ForcedRun.for_model(model.module, g, 1e-4)
    assert run is not None and len(run.names) == 2
    record: dict = {}
    golden = interpret(g, [x.numpy()], record=record)
    (out,) = run.run([x.numpy()], record)
    assert np.abs(out - golden[0]).max() <= 1e-5 * max(float(np.abs(golden[0]).max()), 1.0)
    assert run.problem_count == 0
