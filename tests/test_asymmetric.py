"""Asymmetric (zero-point) activation quantization: the quantizer, the IR checks, and exactness
of the llvm and onnx targets against the interpreter (``csqc verify``) on an MLP and a CNN."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import csqc
from csqc import ops
from csqc.capture import capture
from csqc.interpreter import run
from csqc.ir import IRError, Node, TensorType, verify as verify_ir
from csqc.layers import ActQuant, calibrate
from csqc.verify import verify

from irbuild import Builder

_F32 = np.float32


def _quantize(x: np.ndarray, bits: int, static: float = 0.0, zero_point: int = 0):
    node = Node("q", "quantize", ("x",), TensorType(x.shape, "int32", bits, False, True),
                {"bits": bits, "static_scale": static, "signed": False, "asymmetric": True, "zero_point": zero_point})
    from csqc.interpreter import HANDLERS
    return HANDLERS["quantize"](None, node, [x])


@settings(max_examples=60, deadline=None)
@given(arrays(_F32, st.integers(1, 40), elements=st.floats(-1e4, 1e4, width=32)), st.integers(1, 8))
def test_codes_in_range_zero_exact_and_values_within_half_a_step(x, bits):
    q = _quantize(x, bits)
    levels = 2**bits - 1
    assert q.codes.min() >= 0 and q.codes.max() <= levels and 0 <= q.zero_point <= levels
    if q.scale > 0:
        zero = _quantize(np.append(x, _F32(0)), bits)  # 0 never changes the range: it is always in it
        assert zero.codes[-1] == zero.zero_point
        step = float(q.scale) / levels
        err = np.abs(q.dequantize().astype(np.float64) - x.astype(np.float64))
        assert err.max() <= step / 2 * (1 + 1e-5) + 1e-6 * float(q.scale)
    else:
        assert not q.codes.any() and q.zero_point == 0
    codes, r, zp = ops.act_codes_asymmetric(torch.from_numpy(x), bits, 0.0, 0)  # PyTorch: the same codes
    assert (codes.numpy() == q.codes).all() and float(r) == q.scale and int(zp) == q.zero_point


def test_static_quantizer_clamps_and_keeps_its_zero_point():
    q = _quantize(np.array([-10.0, -0.5, 0.0, 0.5, 10.0], _F32), 4, static=2.0, zero_point=7)
    assert q.codes.tolist() == [0, 3, 7, 11, 15] and q.zero_point == 7


@pytest.mark.parametrize("attrs, qzero, message", [
    ({"zero_point": 3}, True, "computes its zero point"),  # dynamic with a zero point
    ({"zero_point": 16, "static_scale": 1.0}, True, "zero_point 16 outside 0..15"),
    ({"signed": True}, True, "unsigned codes"),
    ({"asymmetric": False, "zero_point": 2, "static_scale": 1.0}, False, "symmetric quantizer"),
    ({}, False, "must be asymmetric"),  # the type must say aq exactly when the node is asymmetric
])
def test_bad_asymmetric_attributes_are_refused(attrs, qzero, message):
    b = Builder()
    x = b.input("x", (2, 8))
    q = b.node("q", "quantize", [x], dtype="int32", qbits=4,
               attrs={"bits": 4, "static_scale": 0.0, "signed": False, "asymmetric": True, **attrs})
    b.nodes[-1] = b.nodes[-1].replace(type=TensorType((2, 8), "int32", 4, False, qzero))
    b.types[q] = b.nodes[-1].type
    g = b.build(b.node("y", "dequantize", [q]))
    with pytest.raises(IRError, match=message):
        verify_ir(g)


def _mlp():
    return nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


CASES = {"mlp": (_mlp, (4, 24)), "cnn": (_cnn, (2, 2, 6, 6))}


@pytest.mark.parametrize("case, bits, mode", [("mlp", 8, "dynamic"), ("mlp", 4, "static"), ("cnn", 8, "static"),
                                              ("cnn", 4, "dynamic")])
def test_asymmetric_models_verify_exactly_on_llvm_and_onnx(tmp_path, case, bits, mode):
    factory, shape = CASES[case]
    torch.manual_seed(1)
    model = csqc.convert(factory().eval(), n_bits=4, act_bits=bits, act_mode=mode, act_symmetric=False,
                         quantize_first_input=True)
    model = csqc.finalize(model).eval()
    x = torch.randn(*shape)
    if mode == "static":
        calibrate(model, [torch.randn(*shape) for _ in range(3)])
        quants = [m for m in model.modules() if isinstance(m, ActQuant)]
        assert any(q.zero_point > 0 for q in quants)
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", x))  # the model file keeps range and zero point
    g = capture(loaded)
    quants = [n for n in g.nodes if n.op == "quantize"]
    assert quants and all(n.attr("asymmetric") and n.type.qzero for n in quants)
    record = {}
    run(g, [x.numpy()], record=record)
    with torch.no_grad():  # the interpreter's codes are PyTorch's
        first = next(m for m in model.modules() if isinstance(m, ActQuant))
        static = first.static_scale if mode == "static" else 0.0
        codes, _, zp = ops.act_codes_asymmetric(x, bits, static, first.zero_point if mode == "static" else 0)
    assert (record[f"{quants[0].name}.codes"] == codes.numpy()).all()
    assert int(record[f"{quants[0].name}.zero_point"]) == int(zp)
    for target, suffix in (("llvm", ".so"), ("onnx", ".onnx")):
        out = tmp_path / f"m{suffix}"
        csqc.compile(loaded, target, out)
        report = verify(loaded, artifact=str(out), per_layer=True, samples=4)
        data = report.to_json()
        assert data["ok"] and report.accumulators_exact, (target, report.notes)
        checked = [s for s in report.layers if s["runtime"].startswith("artifact")]
        assert checked and all(s["mismatched"]["xq"] == 0 and s["mismatched"]["acc"] == 0 and s["checked"]["acc"] > 0
                               for s in checked), checked


def test_codes_of_a_float_computed_input_are_checked_against_the_runtimes_own_input(tmp_path):
    """An LSTM step: the head's input (sigmoid * tanh) differs from the golden run by float ulps in
    ONNX Runtime, so verify requantizes the runtime's own input and compares centered codes u - zp."""
    from csqc.models.char_lm import CharLM, CharLMStep, VOCAB

    torch.manual_seed(0)
    lm = csqc.convert(CharLM(16).eval(), n_bits=4, act_bits=8, quantize_first_input=True, act_symmetric=False)
    step = CharLMStep(csqc.finalize(lm)).eval()
    xs = (torch.rand(1, VOCAB), torch.rand(1, 16), torch.rand(1, 16))
    loaded = csqc.load(csqc.save(step, tmp_path / "step.pt", xs))
    report = verify(loaded, samples=8, runtimes=("pytorch", "onnxruntime"))
    assert report.to_json()["ok"] and report.accumulators_exact, report.to_json()["first_divergence"]
