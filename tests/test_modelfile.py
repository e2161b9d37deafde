"""Model files: round trip, safety against code-running pickles, clear errors on bad files."""
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc import modelfile
from csqc.errors import UnsupportedOps


def _small_model():
    torch.manual_seed(0)
    model = csqc.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)),
                         n_bits=6, act_bits=4)
    return csqc.finalize(model)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _small_model()
    path = csqc.save(model, tmp_path / "m.pt", torch.randn(1, 1, 8, 8))
    loaded = csqc.load(path)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        assert torch.equal(loaded(x), model(x))
    assert loaded.input_specs == [{"name": "input0", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert [l["active_bits"] for l in loaded.layers] == [list(range(5, -1, -1))] * 2
    ops = {str(n.target) for n in loaded.program.graph.nodes if n.op == "call_function"}
    assert {"csqc.quant_conv2d.default", "csqc.quant_linear.default", "csqc.act_quant.default"} <= ops


def test_save_finalizes_a_copy_and_leaves_the_training_model(tmp_path):
    model = csqc.convert(nn.Sequential(nn.Linear(4, 2)), n_bits=4)
    csqc.save(model, tmp_path / "m.pt", torch.randn(1, 4))
    assert not model[0].finalized
    assert csqc.load(tmp_path / "m.pt").layers[0]["n_bits"] == 4


class _MaskOfItsOutput(nn.Module):
    """``cumsum`` of computed float values: an op save's allow-list admits (capture folds it on
    constants and computes it on integers: positions), here a float running sum, which rounds in
    torch's order (the comparison and ``where`` run)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        y = self.linear(x)
        return torch.where(y > 0, y, torch.zeros_like(y)).cumsum(-1)


def test_save_refuses_what_capture_refuses_before_writing_a_file(tmp_path):
    model = csqc.convert(_MaskOfItsOutput().eval(), n_bits=3, act_bits=4)
    with pytest.raises(UnsupportedOps, match=r"aten\.cumsum\.default \[cumsum of float values"):
        csqc.save(model, tmp_path / "m.pt", torch.rand(2, 8))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch SENTINEL_PATH",))


def _hostile_pickle(tmp_path, name):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Boom()).replace(b"SENTINEL_PATH", str(sentinel).encode())
    return payload, sentinel


def test_torch_save_pickle_that_would_run_code_is_refused(tmp_path):
    payload, sentinel = _hostile_pickle(tmp_path, "x")
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:  # the layout torch.save uses
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")
    with pytest.raises(csqc.BadInput, match="does not unpickle"):
        csqc.load(path)
    assert not sentinel.exists()


def test_reference_import_refuses_code_running_pickle(tmp_path):
    payload, sentinel = _hostile_pickle(tmp_path, "x")
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/version", "3\n")
    with pytest.raises(csqc.BadInput, match="refused"):
        csqc.load(path, model_factory="csqc.models.reference:resnet20_4bit", input_shape=(1, 3, 32, 32))
    assert not sentinel.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    payload, sentinel = _hostile_pickle(tmp_path, "x")
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(csqc.BadInput, match="not a csqc model file"):
        csqc.load(path)
    assert not sentinel.exists()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(csqc.BadInput, match="no such file"):
        csqc.load(tmp_path / "missing.pt")
    with pytest.raises(csqc.BadInput, match="directory"):
        csqc.load(tmp_path)
    good = csqc.save(_small_model(), tmp_path / "m.pt", torch.randn(1, 1, 8, 8))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(csqc.BadInput):
        csqc.load(truncated)
    wrong = tmp_path / "wrong.pt"
    with zipfile.ZipFile(wrong, "w") as z:
        z.writestr("csqc-model.json", '{"format": "something-else"}')
    with pytest.raises(csqc.BadInput, match="wrong format"):
        csqc.load(wrong)


def test_failed_save_leaves_no_file(tmp_path):
    class Unexportable(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses
                return x
            return -x

    target = tmp_path / "m.pt"
    with pytest.raises(csqc.CsqcError, match="torch.export"):
        csqc.save(Unexportable(), target, torch.randn(1, 3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("example, match", [(torch.rand(1, 2, 8, 8), r"does not run on example_inputs.*\[1, 2, 8, 8\]"),
                                            (torch.rand(1, 1, 8, 8, dtype=torch.float64), r"does not run.*float64"),
                                            (torch.rand(0, 1, 8, 8), "at least one sample")])
def test_save_refuses_examples_the_model_cannot_run_clearly(tmp_path, example, match):
    """A wrong shape, dtype or an empty batch is the caller's error, named as such (it was a raw
    RuntimeError from inside the model, or torch's amax of an empty tensor)."""
    with pytest.raises(csqc.BadInput, match=match):
        csqc.save(_small_model(), tmp_path / "m.pt", example)
    assert not (tmp_path / "m.pt").exists()


def test_a_loaded_model_called_with_another_shape_says_which_it_takes(tmp_path):
    loaded = csqc.load(csqc.save(_small_model(), tmp_path / "m.pt", torch.randn(1, 1, 8, 8)))
    with pytest.raises(csqc.BadInput, match=r"saved with inputs of shapes \[\[1, 1, 8, 8\]\]"):
        loaded(torch.rand(1, 1, 8, 9))


@pytest.mark.parametrize("batch", ["4", 2.5, True])
def test_compile_refuses_a_batch_that_is_not_a_count(tmp_path, batch):
    loaded = csqc.load(csqc.save(_small_model(), tmp_path / "m.pt", torch.randn(1, 1, 8, 8)))
    with pytest.raises(csqc.BadInput, match="batch must be a whole number"):
        csqc.compile(loaded, "llvm", tmp_path / "m.so", batch=batch)
    assert not (tmp_path / "m.so").exists()


def test_compile_calibrates_on_a_torch_tensor_as_on_the_same_array(tmp_path):
    """A tensor is one array of samples (iterating it gave one array per sample: "takes 1 input(s), got 3")."""
    from csqc import runtime

    loaded = csqc.load(csqc.save(_small_model(), tmp_path / "m.pt", torch.randn(1, 1, 8, 8)))
    samples = torch.rand(3, 1, 8, 8)
    by_tensor = csqc.compile(loaded, "llvm", tmp_path / "t.so", calibrate=samples).output
    by_array = csqc.compile(loaded, "llvm", tmp_path / "a.so", calibrate=samples.numpy()).output
    assert runtime.load(by_tensor).calibration == runtime.load(by_array).calibration is not None


class _StackedHalves(nn.Module):
    """Two images run through one conv stacked on the batch axis, then split back (RAFT's encoder):
    torch.export writes the halves' size as FloorDiv, and the product of the halves rules out a batch
    of 1 under a symbolic batch."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, a, b):
        f1, f2 = torch.chunk(torch.relu(self.c(torch.cat([a, b], 0))), 2, 0)
        return self.d(f1 * f2)


def test_a_model_whose_symbolic_batch_excludes_its_example_saves_at_the_examples_shapes(tmp_path):
    torch.manual_seed(0)
    xs = (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    model = csqc.finalize(csqc.convert(_StackedHalves().eval(), n_bits=3, act_bits=4))
    path = csqc.save(model, tmp_path / "halves.pt", xs)
    loaded = csqc.load(path)
    art = csqc.compile(loaded, "llvm", tmp_path / "halves.so").output
    assert csqc.verify(loaded, artifact=str(art)).ok
    xs2 = (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))  # a batch of 2 takes the symbolic form
    assert csqc.verify(csqc.load(csqc.save(model, tmp_path / "halves2.pt", xs2))).ok


class _SideTable(nn.Module):
    """A batch-first input and one of fixed shape (a table, an RNN's [layers, N, H] state)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, table):
        return self.fc(x) + table.sum(0)


def test_an_input_whose_first_axis_is_not_the_batch_keeps_its_shape(tmp_path):
    """It was made symbolic with the batch: a batch of 4 turned a [3, 8] table into [4, 8] without a word."""
    from csqc import runtime

    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_SideTable().eval(), n_bits=4, act_bits=4))
    table = torch.rand(3, 8)
    loaded = csqc.load(csqc.save(model, tmp_path / "side.pt", (torch.rand(1, 8), table)))
    assert loaded.batched_inputs == [True, False]
    art = runtime.load(csqc.compile(loaded, "llvm", tmp_path / "side.so", batch=4).output)
    assert [i["shape"] for i in art.inputs] == [[4, 8], [3, 8]]
    x = torch.rand(4, 8)
    expected = loaded(x, table).numpy()
    assert np.abs(art(x.numpy(), table.numpy()) - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    with pytest.raises(csqc.BadInput, match=r"calibration runs samples .* input input1 \[3, 8\] has a fixed shape"):
        csqc.compile(loaded, "onnx", tmp_path / "side.onnx", calibrate=[np.zeros((4, 8), np.float32)] * 2)
    assert not (tmp_path / "side.onnx").exists()


def test_verify_and_bench_give_an_input_of_fixed_shape_one_value_a_batch(tmp_path):
    """Samples are cut along the batch-first inputs; the table takes a random value of its own
    shape each batch (or the one given, every batch), in every runtime and the artifact."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_SideTable().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "side.pt", (torch.rand(1, 8), torch.rand(3, 8))))
    artifact = str(csqc.compile(loaded, "llvm", tmp_path / "side.so", batch=2).output)
    report = csqc.verify(loaded, samples=6, artifact=artifact, per_layer=True)
    assert report.ok and report.accumulators_exact and report.samples == 6 and report.batch == 2
    x = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    assert csqc.verify(loaded, inputs=[x, np.ones((3, 8), np.float32)], artifact=artifact).ok
    with pytest.raises(csqc.BadInput, match=r"input input1 has a fixed shape \[3, 8\] .* got \[4, 8\]"):
        csqc.verify(loaded, inputs=[x, x])
    from csqc.verify import load_inputs

    np.savez(tmp_path / "x.npz", input0=x, input1=np.ones(8, np.float32))
    with pytest.raises(csqc.BadInput, match=r"array 'input1' has shape \[8\]; .* a fixed shape \[3, 8\]"):
        load_inputs(str(tmp_path / "x.npz"), loaded)  # (csqc verify --inputs x.npz)
    from csqc.bench import bench

    timed = bench(loaded, artifact=artifact, rounds=1, baselines=False, limits=False)
    assert {r.runtime for r in timed.results} == {"csqc"}
    # a symbolic batch would make the table's first axis symbolic too
    with pytest.raises(csqc.BadInput, match=r"--batch dynamic needs .* input1 \[3, 8\] has a fixed shape"):
        csqc.compile(loaded, "onnx", tmp_path / "side.onnx", batch="dynamic")
    assert not (tmp_path / "side.onnx").exists()


class _FixedProgram(nn.Module):
    """``x.reshape(2, 8)`` fixes the batch: torch.export fixes the whole program's shapes, and
    the state's batch is its second axis."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, state):
        return self.fc(x.reshape(2, 8)) + state.sum(0)


def test_a_program_of_fixed_shapes_verifies_in_its_batches(tmp_path):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_FixedProgram().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "fixed.pt", (torch.rand(2, 8), torch.rand(3, 2, 4))))
    assert loaded.batched_inputs == [False, False]
    report = csqc.verify(loaded, samples=5)
    assert report.ok and report.samples == 4 and report.batch == 2
    assert any("the last 1 sample(s) do not fill a batch of 2" in n for n in report.notes)
    with pytest.raises(csqc.BadInput, match="the model runs batches of 2 only"):
        csqc.verify(loaded, batch=4)


def test_inputs_that_take_samples_must_hold_as_many_each(tmp_path):
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_VarArgs().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "two.pt", (torch.rand(2, 8), torch.rand(2, 4))))
    with pytest.raises(csqc.BadInput, match="must hold as many each: input0 6, input1 4"):
        csqc.verify(loaded, inputs=[np.zeros((6, 8), np.float32), np.zeros((4, 4), np.float32)])


class _VarArgs(nn.Module):
    """A generic wrapper's ``forward(self, *args)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, *args):
        return self.fc(args[0]) + args[1]


class _OneThenVarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, *rest):
        return self.fc(x)


@pytest.mark.parametrize("module, examples", [
    (_VarArgs, (torch.rand(1, 8), torch.rand(1, 4))),
    (_OneThenVarArgs, (torch.rand(1, 8),)),  # nothing for *rest
])
def test_a_forward_of_star_args_keeps_its_batch_symbolic(tmp_path, module, examples):
    model = csqc.finalize(csqc.convert(module().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "varargs.pt", examples))
    assert loaded.batched_inputs == [True] * len(examples)
    assert csqc.verify(loaded, batch=3, samples=6).ok


class _DeadPooling(nn.Module):
    """As CLIP's text model: a pooled output by ``argmax`` (here of float values, which csqc does
    not compile: NaN leads torch's order), computed whether or not it is returned, and read from a
    buffer only it uses."""

    def __init__(self, returned: bool):
        super().__init__()
        self.emb, self.fc, self.returned = nn.Embedding(20, 8), nn.Linear(8, 8), returned
        self.register_buffer("pool_bias", torch.ones(8))

    def forward(self, ids):
        h = self.fc(self.emb(ids))
        pooled = h[torch.arange(h.shape[0]), h[..., 0].argmax(-1)] + self.pool_bias
        return (h, pooled) if self.returned else h


def test_values_no_output_depends_on_are_left_out_of_the_file(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (1, 6))
    q = csqc.finalize(csqc.convert(_DeadPooling(returned=False).eval(), n_bits=3, act_bits=4, example_inputs=(ids,)))
    path = csqc.save(q, tmp_path / "m.pt", (ids,), input_ranges={"input0": (0, 20)})
    model = csqc.load(path)
    assert not any("argmax" in str(n.target) for n in model.program.graph.nodes)
    with torch.no_grad():
        np.testing.assert_array_equal(model(ids).numpy(), q(ids).numpy())
    artifact = csqc.compile(model, "llvm", tmp_path / "m.so").output
    assert csqc.verify(model, samples=3, artifact=str(artifact)).ok
    with pytest.raises(UnsupportedOps, match="argmax"):  # where the model returns it, it is needed
        live = csqc.finalize(csqc.convert(_DeadPooling(returned=True).eval(), n_bits=3, act_bits=4,
                                          example_inputs=(ids,)))
        csqc.save(live, tmp_path / "live.pt", (ids,), input_ranges={"input0": (0, 20)})


class _DeadProjection(nn.Module):
    """A quantized layer whose output nothing returned depends on (CLIP's text projection when
    only the hidden states are returned)."""

    def __init__(self):
        super().__init__()
        self.fc, self.projection = nn.Linear(8, 8), nn.Linear(8, 32)

    def forward(self, x):
        self.projection(x)
        return self.fc(x)


def test_a_layer_left_out_as_dead_code_is_no_layer_of_the_file(tmp_path):
    torch.manual_seed(0)
    q = csqc.convert(_DeadProjection().eval(), n_bits=4, act_bits=4)
    with torch.no_grad():  # two bits (another width: the average would tell)
        q.projection.mask_weight[2:] = -1.0
    model = csqc.load(csqc.save(csqc.finalize(q), tmp_path / "m.pt", torch.rand(1, 8)))
    assert [row["name"] for row in model.layers] == ["fc"] and model.avg_bits == 4.0
    again = csqc.load(csqc.save(model, tmp_path / "again.pt"))
    assert again.layers == model.layers and again.avg_bits == 4.0


class _PositionsFromIds(nn.Module):
    """RoBERTa's position ids: ``cumsum(ids != pad).type_as(mask) * mask + pad``, from the input."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(20, 8), nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, ids):
        mask = ids.ne(1).int()
        return self.fc(self.tok(ids) + self.pos(torch.cumsum(mask, dim=1).type_as(mask) * mask + 1))


def test_positions_from_ids_save_compile_and_verify_exactly(tmp_path):
    """(Refused by name until capture computed integers of token ids: ``capture.integers``.)"""
    ids = torch.randint(2, 20, (1, 6))
    q = csqc.finalize(csqc.convert(_PositionsFromIds().eval(), n_bits=3, act_bits=4, example_inputs=(ids,)))
    path = csqc.save(q, tmp_path / "m.pt", (ids,), input_ranges={"input0": (0, 20)})
    csqc.compile(path, "llvm", tmp_path / "m.so")
    report = csqc.verify(path, samples=3, artifact=str(tmp_path / "m.so"))
    assert report.ok and report.accumulators_exact, report.notes


class _HashedIds(_PositionsFromIds):
    """CANINE-style hashing of ids: integer arithmetic on the ids themselves, then a cast."""

    def forward(self, ids):
        mask = ids.ne(1).int()
        return self.fc(self.tok(ids) + self.pos(torch.remainder(ids * 7, 20).type_as(mask)))


def test_a_refusal_names_the_op_that_needs_the_input_not_a_cast_beside_it(tmp_path):
    ids = torch.randint(2, 20, (1, 6))
    q = csqc.finalize(csqc.convert(_HashedIds().eval(), n_bits=3, act_bits=4, example_inputs=(ids,)))
    with pytest.raises(UnsupportedOps, match=r"aten\.mul\.Tensor \[torch\.int64 arithmetic on the token ids") as refused:
        csqc.save(q, tmp_path / "m.pt", (ids,), input_ranges={"input0": (0, 20)})
    assert "type_as" not in str(refused.value) and "remainder" not in str(refused.value)


@torch.library.custom_op("csqc_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return _twice(self.fc(x))


def test_a_model_calling_an_op_of_its_own_is_refused_for_what_it_is(tmp_path):
    """At save the program is torch.export's own of the user's model: the refusal names the op, not
    a damaged file."""
    model = csqc.finalize(csqc.convert(_CustomOp().eval(), n_bits=4, act_bits=4))
    with pytest.raises(csqc.BadInput, match=r"calls 'torch.ops.csqc_test.twice.default', which is not an operator "
                                            r"csqc compiles: csqc saves programs of the operators it compiles") as e:
        csqc.save(model, tmp_path / "m.pt", torch.rand(1, 8))
    assert "damaged" not in str(e.value) and not (tmp_path / "m.pt").exists()


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x.contiguous(memory_format=torch.channels_last))
        return y.contiguous(memory_format=torch.contiguous_format)


def test_a_memory_format_argument_is_taken(tmp_path):
    """``x.contiguous(memory_format=torch.channels_last)``: a layout, no value changes (was refused
    as a damaged file at save)."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_ChannelsLast().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(1, 3, 8, 8)))
    assert csqc.verify(loaded, samples=2).ok


class _CachedBias(nn.Module):
    """A module caching a tensor autograd computed (LeViT's ``attention_bias_cache``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bias, self.cache = nn.Linear(8, 8), nn.Parameter(torch.randn(8)), {}

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        return self.fc(x) + self.cache["bias"]


def test_a_model_caching_a_computed_tensor_saves_from_its_training_form(tmp_path):
    """Saving finalizes a copy of the model; ``copy.deepcopy`` refuses a tensor with a grad_fn."""
    torch.manual_seed(0)
    model = csqc.convert(_CachedBias().eval(), n_bits=4, act_bits=4)  # training form: saved as a finalized copy
    x = torch.rand(1, 8)
    model(x)
    assert model.cache["bias"].grad_fn is not None
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", x))
    assert csqc.verify(loaded, samples=2).ok


class _NoGradPositions(nn.Module):
    """A position embedding whose forward turns gradients off itself (Speech2Text's sinusoids)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            positions = torch.sin(torch.arange(8.0) * 0.5)
        return self.fc(x) + positions


def test_a_forward_that_turns_gradients_off_is_saved(tmp_path):
    """Exported under no_grad, it has no grad-mode region (an op csqc does not compile)."""
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(_NoGradPositions().eval(), n_bits=4, act_bits=4))
    loaded = csqc.load(csqc.save(model, tmp_path / "m.pt", torch.rand(1, 8)))
    assert csqc.verify(loaded, samples=2).ok
