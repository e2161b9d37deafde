"""The IR: frozen nodes, self-validating QuantSpecs, the verifier, the text form, save/load."""
import dataclasses
import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from csqc.errors import BadInput
from csqc.ir import Graph, IRError, Node, QuantSpec, TensorType, load_graph, save_graph, verify
from irbuild import Builder, quant_layer_graph, random_q, run


def _small():
    """quantize -> qlinear (reads codes) -> relu: a graph with params and a spec."""
    rng = np.random.default_rng(0)
    b = Builder("small")
    x = b.input("x", (2, 12))
    q = b.quantize(x, 4)
    y = b.qlinear("fc", q, random_q(rng, (3, 12), 6, (5, 2, 0)), n_bits=6, active_bits=(5, 2, 0),
                  add=np.zeros(3, np.float32))
    r = b.node("fc.relu", "relu", [y])
    return b.build(r), [rng.standard_normal((2, 12)).astype(np.float32)]


@pytest.fixture
def small():
    return _small()


# -- frozen nodes and graphs ---------------------------------------------------------------------

def test_node_fields_cannot_be_assigned(small):
    g, _ = small
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.nodes[0].op = "relu"


def test_node_attrs_cannot_be_mutated(small):
    g, _ = small
    with pytest.raises(TypeError):
        g.node("fc").attrs["act"] = "relu"


def test_node_list_attrs_are_frozen_into_tuples():
    n = Node("n", "permute", ("x",), TensorType((2, 3)), {"dims": [1, 0]})
    assert n.attr("dims") == (1, 0)


def test_graph_params_cannot_be_replaced_or_written(small):
    g, _ = small
    with pytest.raises(TypeError):
        g.params["fc.mult"] = np.ones(3, np.float32)
    with pytest.raises(ValueError):
        g.params["fc.mult"][0] = 5.0


def test_graph_copies_writable_params_so_the_caller_cannot_change_them():
    mult = np.ones(2, np.float32)
    g = Graph((), (), (), {"m": mult})
    mult[0] = 7.0
    assert g.params["m"][0] == 1.0


def test_replace_returns_a_new_node_and_leaves_the_old_one(small):
    g, _ = small
    old = g.node("fc")
    new = old.replace(attrs={**old.attrs, "act": "relu"})
    assert new.attr("act") == "relu" and old.attr("act") == "none"


# -- QuantSpec validation ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(n_bits=6, active_bits=(3, 3, 1)), "distinct and highest first"),
    (dict(n_bits=6, active_bits=(1, 3)), "distinct and highest first"),
    (dict(n_bits=6, active_bits=(6, 1)), "outside 0..5"),
    (dict(n_bits=0, active_bits=()), "n_bits 0"),
    (dict(n_bits=16, active_bits=()), "n_bits 16"),
    (dict(n_bits=6, active_bits=(1,), encoding="binary"), "encoding 'binary'"),
    (dict(n_bits=6, active_bits=(1,), encoding="posneg", planes=((1, 1),), zero_point=3), "no zero point"),
    (dict(n_bits=6, active_bits=(1,), encoding="offset", planes=((1, -1),)), "all positive"),
    (dict(n_bits=6, active_bits=(1,), encoding="posneg", planes=((1, 2),)), "signs must be"),
    (dict(n_bits=6, active_bits=(1,), encoding="int", planes=((1, 1),)), "no planes"),
    (dict(n_bits=6, active_bits=(1,), encoding="posneg", packed_word=16), "packed_word 16"),
    (dict(n_bits=6, active_bits=(1,), act_bits=4, act_mode="static"), "static activation scale"),
    (dict(n_bits=6, active_bits=(1,), act_bits=9, act_mode="dynamic"), "act_bits 9"),
    (dict(n_bits=6, active_bits=(1,), act_bits=4, act_mode="sometimes"), "act_mode"),
    (dict(n_bits=6, active_bits=(1,), act_mode="dynamic"), "without act_bits"),
    (dict(n_bits=6, active_bits=(1,), acc_dtype="int16"), "acc_dtype"),
    (dict(n_bits=6, active_bits=(1,), weight_scale="per_row"), "weight_scale"),
])
def test_quant_spec_rejects_invalid_specs(kwargs, message):
    with pytest.raises(IRError, match=message):
        QuantSpec(**kwargs)


def test_quant_spec_accepts_non_contiguous_and_empty_masks():
    assert QuantSpec(8, (7, 1, 0)).active_bits == (7, 1, 0)
    assert QuantSpec(8, ()).num_planes == 0


def test_quant_spec_replace_is_validated():
    spec = QuantSpec(6, (5, 0), encoding="posneg", planes=((5, 1), (5, -1)))
    with pytest.raises(IRError, match="no zero point"):
        spec.replace(zero_point=1)


def test_tensor_type_rejects_unknown_dtype_and_bad_qbits():
    with pytest.raises(IRError, match="dtype"):
        TensorType((2,), "float16")
    with pytest.raises(IRError, match="1..8"):
        TensorType((2,), "int32", qbits=9)


# -- verifier ------------------------------------------------------------------------------------

def test_verifier_accepts_a_well_formed_graph(small):
    verify(small[0])


def test_verifier_reports_an_undefined_input(small):
    g, _ = small
    bad = g.replace(nodes=(g.nodes[0].replace(inputs=("nowhere",)),) + g.nodes[1:])
    with pytest.raises(IRError, match="input %nowhere is not defined before use"):
        verify(bad)


def test_verifier_reports_use_before_definition(small):
    g, _ = small
    with pytest.raises(IRError, match="not defined before use"):
        verify(g.replace(nodes=tuple(reversed(g.nodes))))


def test_verifier_reports_a_wrong_mult_shape(small):
    g, _ = small
    with pytest.raises(IRError, match=r"mult must be float32\[3\]"):
        verify(g.with_params({"fc.mult": np.ones(4, np.float32)}))


def test_verifier_reports_a_wrong_weight_shape(small):
    g, _ = small
    with pytest.raises(IRError, match="int weights must be integer"):
        verify(g.with_params({"fc.weight": np.ones((3, 11), np.int16)}))


def test_verifier_reports_float_weights_for_int_encoding(small):
    g, _ = small
    with pytest.raises(IRError, match="int weights must be integer"):
        verify(g.with_params({"fc.weight": np.ones((3, 12), np.float32)}))


def test_verifier_reports_wrong_plane_shape():
    rng = np.random.default_rng(1)
    g, _ = quant_layer_graph(rng, k=8, out_ch=2, active_bits=(1,), n_bits=2)
    layer = g.node("layer")
    spec = layer.quant.replace(encoding="posneg", planes=((1, 1), (1, -1)))
    bad = g.replace(nodes=(g.nodes[0], layer.replace(quant=spec))).with_params({"layer.weight": np.zeros((2, 2, 7), np.uint8)})
    with pytest.raises(IRError, match=r"planes must be uint8\[2,2,8\]"):
        verify(bad)


def test_verifier_reports_quantized_input_without_act_bits(small):
    g, _ = small
    fc = g.node("fc")
    spec = fc.quant.replace(act_bits=None, act_mode=None, act_signed=False)
    bad = g.replace(nodes=tuple(n.replace(quant=spec) if n.name == "fc" else n for n in g.nodes))
    with pytest.raises(IRError, match="quantized input but spec has no act_bits"):
        verify(bad)


def test_verifier_reports_act_bits_that_disagree_with_the_input(small):
    g, _ = small
    fc = g.node("fc")
    bad = g.replace(nodes=tuple(n.replace(quant=fc.quant.replace(act_bits=3)) if n.name == "fc" else n for n in g.nodes))
    with pytest.raises(IRError, match="spec says act 3 bits"):
        verify(bad)


def test_verifier_reports_a_quantized_layer_with_too_few_inputs(small):
    g, _ = small
    fc = g.node("fc")
    bad = g.replace(nodes=tuple(n.replace(inputs=fc.inputs[:1]) if n.name == "fc" else n for n in g.nodes))
    with pytest.raises(IRError, match="takes 3..4 inputs, has 1"):
        verify(bad)


def test_verifier_reports_unknown_ops_duplicate_names_and_missing_outputs(small):
    g, _ = small
    nodes = g.nodes + (Node("fc", "frobnicate", ("x",), TensorType((2, 12))),)
    with pytest.raises(IRError) as e:
        verify(g.replace(nodes=nodes, outputs=("fc.relu", "ghost")))
    text = str(e.value)
    assert "unknown op" in text and "name defined twice" in text and "output %ghost is not defined" in text


def test_verifier_reports_a_float_op_claiming_a_quantized_result():
    b = Builder()
    x = b.input("x", (2, 3))
    b.node("r", "relu", [x], qbits=4, dtype="int32")
    with pytest.raises(IRError, match="only quantize"):
        verify(b.build("r"))


# -- text form -----------------------------------------------------------------------------------

def test_text_form_is_identical_for_separately_built_equal_graphs():
    (a, _), (b, _) = _small(), _small()
    assert a is not b and a.text() == b.text()


def test_text_form_shows_types_ops_attrs_and_specs(small):
    text = small[0].text()
    assert text.startswith("graph small(\n  %x: float32[2x12],\n) {\n")
    assert "%x.quant: sq4[2x12] = quantize(%x) {bits=4, signed=True, static_scale=0}" in text
    assert ("%fc: float32[2x3] = qlinear(%x.quant, %fc.weight, %fc.mult, %fc.add) {act=none, weight_shape=[3,12]}"
            " <N=6 bits={5,2,0} enc=int wscale=per_tensor act=s4/dynamic>") in text
    assert "param %fc.weight: int16[3x12] sha256:" in text
    assert text.endswith("  return %fc.relu\n}\n")


def test_text_form_changes_when_a_parameter_value_changes(small):
    g, _ = small
    assert g.text() != g.with_params({"fc.add": np.ones(3, np.float32)}).text()
    assert g.text(params=False) == g.with_params({"fc.add": np.ones(3, np.float32)}).text(params=False)


def test_text_form_of_a_plane_spec():
    spec = QuantSpec(6, (5, 0), encoding="offset", planes=((6, 1), (1, 1)), zero_point=33, low_shift=1,
                     packed_word=32, act_bits=2, act_mode="static", act_scale=0.5, acc_dtype="int64")
    assert spec.text() == ("N=6 bits={5,0} enc=offset planes=[+6,+1] zp=33 shift=1 packed=32 wscale=per_tensor "
                           "act=u2/static@0.5 acc=int64")


# -- save / load ---------------------------------------------------------------------------------

def test_save_load_round_trip_gives_an_equal_graph(small, tmp_path):
    g, _ = small
    save_graph(g, tmp_path / "g.csqcir")
    back = load_graph(tmp_path / "g.csqcir")
    assert back == g
    assert back.text() == g.text()
    assert all(back.params[k].dtype == v.dtype for k, v in g.params.items())


def test_graphs_with_different_params_are_not_equal(small):
    g, _ = small
    assert g != g.with_params({"fc.add": np.ones(3, np.float32)})


def test_save_load_round_trip_gives_identical_interpreter_outputs(tmp_path):
    rng = np.random.default_rng(3)
    g, x = quant_layer_graph(rng, kind="conv", k=27, act_bits=3)
    save_graph(g, tmp_path / "g.csqcir")
    (a,), rec_a = run(g, x)
    (b,), rec_b = run(load_graph(tmp_path / "g.csqcir"), x)
    assert np.array_equal(a, b) and np.array_equal(rec_a["layer.acc"], rec_b["layer.acc"])


def test_save_load_keeps_infinite_clip_bounds(tmp_path):
    b = Builder()
    x = b.input("x", (1, 4))
    b.node("c", "clip", [x], attrs={"lo": 0.0, "hi": float("inf")})
    g = b.build("c")
    save_graph(g, tmp_path / "g")
    assert load_graph(tmp_path / "g").node("c").attr("hi") == float("inf")


def test_loading_a_file_that_is_not_a_zip_is_bad_input(tmp_path):
    (tmp_path / "x.ir").write_text("graph model() {}")
    with pytest.raises(BadInput, match="not a csqc IR file"):
        load_graph(tmp_path / "x.ir")


def test_loading_a_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_graph(tmp_path / "missing.ir")


def test_loading_a_torch_style_pickle_zip_is_bad_input(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    with pytest.raises(BadInput, match="not a csqc IR file"):
        load_graph(path)


def test_loading_params_that_hold_a_pickle_is_refused_without_unpickling(small, tmp_path):
    g, _ = small
    path = tmp_path / "g.csqcir"
    save_graph(g, path)
    with zipfile.ZipFile(path) as z:
        meta = z.read("graph.json")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in g.params.items()}, evil=np.array([object()], dtype=object))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("graph.json", meta)
        z.writestr("params.npz", buf.getvalue())
    with pytest.raises(BadInput, match="tensor 'evil': dtype object is not a plain number type"):
        load_graph(path)


def test_loading_a_zip_with_a_wrong_format_tag_is_bad_input(small, tmp_path):
    g, _ = small
    path = tmp_path / "g.csqcir"
    save_graph(g, path)
    with zipfile.ZipFile(path) as z:
        meta, params = json.loads(z.read("graph.json")), z.read("params.npz")
    meta["format"] = "onnx"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("graph.json", json.dumps(meta))
        z.writestr("params.npz", params)
    with pytest.raises(BadInput, match="not a csqc IR file of version"):
        load_graph(path)


def test_loading_an_ir_that_fails_verification_is_bad_input(small, tmp_path):
    g, _ = small
    path = tmp_path / "g.csqcir"
    save_graph(g.with_params({"fc.mult": np.ones(5, np.float32)}), path)
    with pytest.raises(BadInput, match="IR verification failed"):
        load_graph(path)
