"""Model files are data: nothing in one may run code, exhaust memory or crash the loader.

torch's program deserializer ``exec``s ``guards_code`` and ``sympify``s ``expr_str``; each attack
here would create a marker file if any of it reached torch. The marker must never appear, and
every command must refuse the file with a one-line error and exit code 2.
"""
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc.programcheck import ProgramRefused, parse_size_expr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)).eval()
    folder = tmp_path_factory.mktemp("security")
    return csqc.save(csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4)), folder / "model.pt", torch.zeros(1, 8))


def _members(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _write(path, members, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def _edited(saved, out, edit_program=None, edit_tensors=None, extra=()):
    """A copy of ``saved`` with its program JSON and/or its arrays changed."""
    members = []
    for name, data in _members(saved):
        if name == "program.json" and edit_program:
            doc = json.loads(data)
            edit_program(doc)
            data = json.dumps(doc).encode()
        if name == "tensors.npz" and edit_tensors:
            with np.load(io.BytesIO(data)) as npz:
                arrays = {k: npz[k] for k in npz.files}
            edit_tensors(arrays)
            data = _npz(arrays)
        members.append((name, data))
    return _write(out, members + list(extra))


def _npz(arrays) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for key, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, a)
            z.writestr(f"{key}.npy", member.getvalue())
    return buf.getvalue()


def _touch(marker) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _add_guard(marker):
    def edit(doc):
        doc["guards_code"] = [f"{_touch(marker)} is None"]
    return edit


def _evil_expr(marker):
    def edit(doc):
        values = doc["graph_module"]["graph"]["tensor_values"]
        for meta in values.values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = _touch(marker)
    return edit


ATTACKS = {"guards_code": _add_guard, "expr_str": _evil_expr}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_code_in_the_program_never_runs_on_load(saved, tmp_path, attack):
    marker = tmp_path / "MARK"
    path = _edited(saved, tmp_path / "evil.pt", ATTACKS[attack](marker))
    with pytest.raises(csqc.BadInput, match="the captured program"):
        csqc.load(path)(torch.zeros(2, 8))
    assert not marker.exists()


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("command", [["inspect"], ["compile", "-t", "onnx", "-o", "out.onnx"], ["verify"]])
def test_code_in_the_program_never_runs_from_the_cli(saved, tmp_path, attack, command):
    marker = tmp_path / "MARK"
    _edited(saved, tmp_path / "evil.pt", ATTACKS[attack](marker))
    done = subprocess.run([sys.executable, "-m", "csqc", command[0], "evil.pt", *command[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "the captured program" in done.stderr
    assert not marker.exists() and not (tmp_path / "out.onnx").exists()


def _set_target(target):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target
    return edit


def _first_node_input(arg):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = arg
    return edit


def _set_spec(spec):
    def edit(doc):
        for entry in doc["graph_module"]["module_call_graph"]:
            if entry["signature"]:
                entry["signature"]["in_spec"] = json.dumps([1, spec])
    return edit


def _set(*keys, value):
    def edit(doc):
        target = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


def _node_meta(key, value):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["metadata"][key] = value
    return edit


def _range_key(marker):
    def edit(doc):
        doc["range_constraints"][_touch(marker)] = {"min_val": 2, "max_val": None}
    return edit


# Every other field torch evaluates, resolves or imports by name: each is refused before torch reads it.
def _field_attacks(marker) -> dict:
    return {
        "os.system as target": _set_target("torch.os.system"),
        "torch.load as target": _set_target("torch.load"),
        "aten.from_file (creates files)": _set_target("torch.ops.aten.from_file.default"),
        "extension op": _set_target("#evil:op"),
        "operator argument": _first_node_input({"as_operator": "torch.os.system"}),
        "subgraph argument": _first_node_input({"as_graph": {"name": "g", "graph": {}}}),
        "custom object argument": _first_node_input({"as_custom_obj": {"name": "obj", "class_fqn": "x"}}),
        "defaultdict treespec imports": _set_spec({"type": "collections.defaultdict", "context": json.dumps(
            {"default_factory_module": "antigravity", "default_factory_name": "x", "dict_context": []}),
            "children_spec": []}),
        "enum treespec imports": _set_spec({"type": "builtins.dict", "context": json.dumps(
            [{"__enum__": True, "fqn": "antigravity:x", "name": "y"}]), "children_spec": []}),
        "source_fn_stack getattr": _node_meta("source_fn_stack", "x,torch.os.system"),
        "custom metadata": _node_meta("custom", "{}"),
        "non-ASCII module path": _node_meta("nn_module_stack", "L__self__,,torch.nn.Sequential;k,\u00e9,x.Y"),
        "symbol assumptions": _set_symbol("Symbol('s1', commutative=False)"),
        "sympify in a symbol name": _set_symbol(f"Symbol({_touch(marker)!r}, positive=True, integer=True)"),
        "range constraint name": _range_key(marker),
        "custom_obj_values": _set("graph_module", "graph", "custom_obj_values", value={"x": {"class_fqn": "a"}}),
        "unknown field": _set("graph_module", "graph", "nodes", 0, "evil", value=1),
        "unknown verifier": _set("verifiers", value=["EVIL"]),
        "namedtuple fields": _set("graph_module", "treespec_namedtuple_fields", value={"x": {"field_names": []}}),
        "module metadata": _set("graph_module", "metadata", value={"custom": "{}"}),
        "cuda device": _set_device({"type": "cuda", "index": 0}),
    }


def _set_symbol(text):
    def edit(doc):
        for meta in doc["graph_module"]["graph"]["tensor_values"].values():
            for size in meta["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = text
    return edit


def _set_device(device):
    def edit(doc):
        next(iter(doc["graph_module"]["graph"]["tensor_values"].values()))["device"] = device
    return edit


def test_every_field_torch_evaluates_is_checked(saved, tmp_path):
    marker = tmp_path / "MARK"
    for name, edit in _field_attacks(marker).items():
        path = _edited(saved, tmp_path / "evil.pt", edit)
        with pytest.raises(csqc.BadInput) as e:
            csqc.load(path)
        assert "\n" not in str(e.value), name
        assert not marker.exists(), name


@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)", "Symbol('s3', integer=True, positive=True)",
    "Mul(Integer(32), Symbol('s77', positive=True, integer=True))",
    "Max(Integer(2), Add(Integer(-1), Symbol('s0', positive=True, integer=True)))",
    "FloorDiv(Add(Symbol('s1', positive=True, integer=True), Integer(1)), Integer(2))",
])
def test_size_grammar_accepts_what_csqc_writes(text):
    assert parse_size_expr(text).replace("integer=True, positive=True", "positive=True, integer=True") == \
        text.replace("integer=True, positive=True", "positive=True, integer=True")


@pytest.mark.parametrize("text", [
    "__import__('os').system('x')", "Symbol('s1')", "s1 + 1", "Symbol('x', positive=True, integer=True)",
    "Integer(1.5)", "Mul(Integer(2))", "Pow(Integer(2), Integer(3))", "Integer(1))", "Integer(" * 40,
    "Symbol('s1', positive=True, integer=True, real=True)", "Lambda(x, x)", "",
    "FloorDiv(Integer(4))", "FloorDiv(Integer(4), Integer(2), Integer(1))",
])
def test_size_grammar_refuses_everything_else(text):
    with pytest.raises(ProgramRefused):
        parse_size_expr(text)


def test_torch_guards_are_stripped_on_save_and_the_model_still_checks_shapes(tmp_path):
    class TwoInputs(nn.Module):  # torch adds the guard "L['x'].size()[0] == L['h'].size()[0]"
        def forward(self, x, h):
            return x + h

    path = csqc.save(TwoInputs(), tmp_path / "two.pt", (torch.zeros(1, 3), torch.zeros(1, 3)))
    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("program.json"))["guards_code"] == []
    model = csqc.load(path)
    assert torch.equal(model(torch.ones(3, 3), torch.ones(3, 3)), torch.full((3, 3), 2.0))


def test_real_captures_still_load(tmp_path):
    from csqc.models.digits import digits_mlp
    from csqc.recurrent import one_step

    torch.manual_seed(0)
    mlp = csqc.finalize(csqc.convert(digits_mlp(), n_bits=4, act_bits=4))
    x = torch.rand(3, 64)
    assert torch.equal(csqc.load(csqc.save(mlp, tmp_path / "mlp.pt", torch.zeros(1, 64)))(x), mlp(x))
    rnn = csqc.finalize(csqc.convert(nn.Sequential(nn.LSTM(6, 8, batch_first=True)), n_bits=4, act_bits=8))[0]
    step = one_step(rnn)
    example = (torch.rand(2, 6), torch.rand(2, 8), torch.rand(2, 8))
    loaded = csqc.load(csqc.save(step, tmp_path / "step.pt", example))
    for got, want in zip(loaded(*example), step(*example)):
        assert torch.equal(got, want)


# -- resources and values ---------------------------------------------------------------------

def _tensors_member(saved, data: bytes, out, compress=zipfile.ZIP_DEFLATED):
    return _write(out, [(n, data if n == "tensors.npz" else d) for n, d in _members(saved)], compress)


def test_an_inflating_tensor_archive_is_refused_before_it_is_read(saved, tmp_path):
    zeros = bytes(64 << 20)  # 64 MiB of zeros deflate to ~64 KB: far more than the model declares
    path = _tensors_member(saved, zeros, tmp_path / "bomb.pt")
    assert path.stat().st_size < 200_000
    with pytest.raises(csqc.BadInput, match="claims .* bytes, more than"):
        csqc.load(path)


def _npz_with_junk(saved, junk: bytes, compress=zipfile.ZIP_STORED) -> bytes:
    arrays = dict(np.load(io.BytesIO(dict(_members(saved))["tensors.npz"])))
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", compress) as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a)
            z.writestr(f"{key}.npy", buf.getvalue())
        z.writestr("state_dict/junk.npy", junk)
    return inner.getvalue()


def test_a_nested_bomb_in_the_arrays_is_refused(saved, tmp_path):
    bomb = _npz_with_junk(saved, bytes(8 << 20), zipfile.ZIP_DEFLATED)  # compressed twice: ~8 KB inside for 8 MiB
    with pytest.raises(csqc.BadInput, match="is compressed; csqc writes tensors uncompressed"):
        csqc.load(_tensors_member(saved, bomb, tmp_path / "nested.pt"))
    stored = _npz_with_junk(saved, bytes(32 << 20))  # compressed once: ~30 KB of file for 32 MiB
    with pytest.raises(csqc.BadInput, match="claims .* bytes, more than"):
        csqc.load(_tensors_member(saved, stored, tmp_path / "once.pt"))
    small = _npz_with_junk(saved, bytes(100))  # within the size budget: refused by name before it is read
    with pytest.raises(csqc.BadInput, match="holds tensor 'state_dict/junk', which the model does not use"):
        csqc.load(_tensors_member(saved, small, tmp_path / "junk.pt"))


def test_an_array_declaring_more_than_its_member_holds_is_refused(saved, tmp_path):
    with np.load(io.BytesIO(dict(_members(saved))["tensors.npz"])) as npz:
        arrays = {k: npz[k] for k in npz.files}
    data = _npz(arrays)
    members = _members(io.BytesIO(data))
    header = b"'shape': (1, 8), }"
    lying = [(n, d.replace(header, header.replace(b"(1, 8)", b"(9, 8)")) if n == "example_inputs/0.npy" else d)
             for n, d in members]
    assert lying != members
    with pytest.raises(csqc.BadInput, match=r"declares float32\[9, 8\] \(288 bytes\) but its member holds 32"):
        csqc.load(_tensors_member(saved, _write(io.BytesIO(), lying, zipfile.ZIP_STORED).getvalue(),
                                  tmp_path / "lying.pt"))


def test_duplicate_members_are_refused(saved, tmp_path):
    members = _members(saved)
    manifest = dict(members)["csqc-model.json"]
    with pytest.warns(UserWarning):
        path = _write(tmp_path / "dup.pt", members + [("csqc-model.json", manifest)])
    with pytest.raises(csqc.BadInput, match="two members named 'csqc-model.json'"):
        csqc.load(path)
    npz = dict(members)["tensors.npz"]
    first = _members(io.BytesIO(npz))[0]
    with pytest.warns(UserWarning):
        doubled = _write(io.BytesIO(), _members(io.BytesIO(npz)) + [first], zipfile.ZIP_STORED).getvalue()
    with pytest.raises(csqc.BadInput, match="two members named"):
        csqc.load(_tensors_member(saved, doubled, tmp_path / "dup-npz.pt"))


def test_long_double_and_non_ascii_tensors_are_one_line_errors(saved, tmp_path):
    def widen(arrays):
        arrays["example_inputs/0"] = arrays["example_inputs/0"].astype(np.longdouble)

    def rename(arrays):
        arrays["state_dict/0.bi\u00e4s"] = arrays.pop("state_dict/0.bias")

    if np.dtype(np.longdouble).itemsize > 8:  # on platforms where long double is double, nothing to test
        with pytest.raises(csqc.BadInput, match="wider than any tensor"):
            csqc.load(_edited(saved, tmp_path / "wide.pt", edit_tensors=widen))
    with pytest.raises(csqc.BadInput, match="does not use"):
        csqc.load(_edited(saved, tmp_path / "name.pt", edit_tensors=rename))

    def rename_in_program(doc):
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            if "parameter" in spec:
                spec["parameter"]["parameter_name"] += "\u00e9"

    with pytest.raises(csqc.BadInput, match="not ASCII"):
        csqc.load(_edited(saved, tmp_path / "program-name.pt", rename_in_program))


def test_weights_too_large_for_n_are_refused_at_load(saved, tmp_path):
    def overflow(arrays):
        q = arrays["state_dict/0.q"].copy()
        q.flat[0] = 2**4  # N = 4: codes must stay within +-15
        arrays["state_dict/0.q"] = q

    with pytest.raises(csqc.BadInput, match=r"weight code 16 .* does not fit N=4 bits"):
        csqc.load(_edited(saved, tmp_path / "wide.pt", edit_tensors=overflow))


@pytest.mark.parametrize("tensor", ["state_dict/0.scale", "state_dict/1.running_var", "state_dict/1.weight",
                                    "state_dict/3.bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, tmp_path, tensor, value):
    def poison(arrays):
        a = arrays[tensor].copy()
        a.flat[0] = value
        arrays[tensor] = a

    with pytest.raises(csqc.BadInput, match=f"tensor '{tensor}' holds NaN or infinite"):
        csqc.load(_edited(saved, tmp_path / "nan.pt", edit_tensors=poison))
