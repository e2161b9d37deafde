"""CPU artifacts run every kernel from one library function (``targets/tvm/whole_model.py``).

The whole-model function must compute exactly what the plan's steps compute one call at a
time, at every PrecisionBatching setting; artifacts without it (written before it existed, or
edited) still run through the steps; its plan entry is checked like the steps are.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import csqc
from csqc import runtime
from csqc.artifact import PLAN, WEIGHTS
from csqc.errors import BadInput, CsqcError
from csqc.targets.tvm.whole_model import WHOLE_MODEL_FUNC

from .test_artifact_integrity import _resealed, _split


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    """A small CNN with bit-serial and bit-parallel layers, several planes each."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    model = csqc.finalize(csqc.convert(net.eval(), n_bits=4, act_bits=4))
    folder = tmp_path_factory.mktemp("whole")
    path = csqc.save(model, folder / "cnn.pt", torch.zeros(1, 3, 8, 8))
    return csqc.compile(csqc.load(path), "llvm", folder / "cnn.so").output


def _by_steps(model: runtime.CompiledModel, x, skip_planes=0):
    """The model run one kernel call at a time, as artifacts without the function run."""
    np.copyto(model._in_views[0], x)
    skips = () if skip_planes == 0 else model._skips(skip_planes)
    model._combine_weights(skips)
    model._fill_acc_offsets(skips)
    model._prepared_for = skips
    for func, args in model._calls(skips):
        func(*args)
    return model._out_views[0].copy()


@pytest.mark.parametrize("skip_planes", [0, 1, 2, {"0": 1}])
def test_the_whole_model_function_computes_what_the_steps_compute(cnn_artifact, skip_planes):
    model = runtime.load(cnn_artifact)
    assert model.plan["entry"]["func"] == WHOLE_MODEL_FUNC
    layers = sorted(model.layers)
    if isinstance(skip_planes, dict):  # a per-layer setting: the first layer only
        skip_planes = {layers[0]: 1}
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8), dtype=np.float32)
    whole = model(x, skip_planes=skip_planes)
    stepwise = _by_steps(runtime.load(cnn_artifact), x, skip_planes)
    np.testing.assert_array_equal(whole, stepwise)


def test_an_artifact_without_the_function_runs_its_steps(cnn_artifact, tmp_path):
    library, members = _split(cnn_artifact)
    plan = json.loads(members[PLAN])
    del plan["entry"]
    path = tmp_path / "steps-only.so"
    path.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(runtime.load(path)(x), runtime.load(cnn_artifact)(x))


def test_a_plan_past_the_argument_limit_runs_its_steps_from_the_start(tmp_path, monkeypatch):
    """LLVM's build time grows with the square of the function's parameters: past
    ``MAX_ARGUMENTS`` the artifact has no whole-model function and its steps verify exactly."""
    from csqc.targets.tvm import whole_model

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 5))
    path = csqc.save(csqc.finalize(csqc.convert(net.eval(), n_bits=3, act_bits=4)), tmp_path / "m.pt",
                     torch.zeros(1, 3, 8, 8))
    full = csqc.compile(csqc.load(path), "llvm", tmp_path / "full.so").output
    monkeypatch.setattr(whole_model, "MAX_ARGUMENTS", len(runtime.load(full).plan["entry"]["args"]) - 1)
    result = csqc.compile(csqc.load(path), "llvm", tmp_path / "steps.so")
    stepwise = runtime.load(result.output)
    assert "entry" not in stepwise.plan and not any(WHOLE_MODEL_FUNC in s["func"] for s in stepwise.plan["steps"])
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(stepwise(x), runtime.load(full)(x))
    np.testing.assert_array_equal(stepwise(x, skip_planes=1), runtime.load(full)(x, skip_planes=1))
    assert csqc.verify(csqc.load(path), samples=2, artifact=str(result.output), per_layer=True).ok


@pytest.mark.parametrize("edit, error, match", [
    (lambda e: e["args"].append("no-such-buffer"), BadInput, "entry.*no buffer"),
    (lambda e: e.update(func="k999_missing"), CsqcError, "lacks"),
    (lambda e: e.update(args="b0"), BadInput, "entry needs a kernel name and a list"),
    (lambda e: e["args"].reverse(), BadInput, "arguments disagree with its steps"),
])
def test_an_edited_entry_is_refused(cnn_artifact, tmp_path, edit, error, match):
    library, members = _split(cnn_artifact)
    plan = json.loads(members[PLAN])
    edit(plan["entry"])
    path = tmp_path / "edited.so"
    path.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(error, match=match):
        runtime.load(path)


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([3.4e38, -3.4e38, 1e20, -1e20, 0.0]))


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64]), hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                    elements=_floats))
def test_the_fast_finiteness_check_agrees_with_isfinite(x):
    assert runtime._all_finite(x) == bool(np.isfinite(x).all())


def test_outputs_are_new_arrays_written_in_place(cnn_artifact):
    """A call hands each output's memory to the whole-model function instead of copying the
    output buffer out: every call returns new, aligned, writable arrays, and a returned array keeps
    its values through the next calls (the fixture poisons that memory: unwritten elements show)."""
    model = runtime.load(cnn_artifact)
    assert model._fresh_outputs is not None
    rng = np.random.default_rng(5)
    x1, x2 = (rng.standard_normal((1, 3, 8, 8), dtype=np.float32) for _ in range(2))
    first = model(x1)
    kept = first.copy()
    second = model(x2)
    assert not np.shares_memory(first, second) and first.flags.writeable
    assert first.ctypes.data % 64 == 0 and np.isfinite(second).all()
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(second, _by_steps(runtime.load(cnn_artifact), x2))
    np.testing.assert_array_equal(model(x1, record={}), kept)  # recording runs copy the output out


def _aligned_copy(x: np.ndarray, misalign: int = 0) -> np.ndarray:
    """``x`` copied into memory at ``misalign`` bytes past a 64-byte boundary."""
    memory = runtime._output_memory(x.nbytes + 64)
    out = memory[misalign:misalign + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


@pytest.fixture
def direct_inputs(monkeypatch):
    """Inputs of every size read in place (where aligned), not only large ones."""
    monkeypatch.setattr(runtime, "_DIRECT_INPUT_MIN_BYTES", 0)


def _lstm_artifact(folder):
    torch.manual_seed(2)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.LSTM(6, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x, h, c):
            y, (h2, c2) = self.cell(x, (h, c))
            return self.head(y[:, -1]), h2, c2

    model = csqc.finalize(csqc.convert(Step().eval(), n_bits=4, act_bits=4))
    example = (torch.zeros(1, 3, 6), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    return csqc.compile(csqc.load(csqc.save(model, folder / "lstm.pt", example)), "llvm", folder / "lstm.so").output


@pytest.mark.usefixtures("direct_inputs")
@pytest.mark.parametrize("which", ["cnn", "lstm"])
def test_aligned_inputs_are_read_in_place_and_left_as_they_were(cnn_artifact, tmp_path, which):
    """An aligned, contiguous input is handed to the whole-model function instead of copied in:
    the outputs are those of the copying call (an unaligned array, or a recording run), the
    caller's arrays keep their values, and later calls do not read a stale copy."""
    path = cnn_artifact if which == "cnn" else _lstm_artifact(tmp_path)
    model, copying = runtime.load(path), runtime.load(path)
    copying._direct_inputs = None
    assert model._direct_inputs is not None and all(b is not None for b in model._direct_inputs)
    rng = np.random.default_rng(7)
    for _ in range(2):
        xs = [rng.standard_normal(s["shape"], dtype=np.float32) for s in model.inputs]
        aligned = [_aligned_copy(x) for x in xs]
        assert all(model._readable_in_place(i, x) for i, x in enumerate(aligned))
        want = copying(*xs)
        got = model(*aligned)
        for w, g in zip(want if isinstance(want, list) else [want], got if isinstance(got, list) else [got]):
            np.testing.assert_array_equal(g, w)
        for x, a in zip(xs, aligned):
            np.testing.assert_array_equal(a, x)
        unaligned = [_aligned_copy(x, misalign=16) for x in xs]
        assert not any(model._readable_in_place(i, x) for i, x in enumerate(unaligned))
        for w, g in zip(want if isinstance(want, list) else [want],
                        (lambda r: r if isinstance(r, list) else [r])(model(*unaligned))):
            np.testing.assert_array_equal(g, w)
        recorded = {}
        for w, g in zip(want if isinstance(want, list) else [want],
                        (lambda r: r if isinstance(r, list) else [r])(model(*aligned, record=recorded))):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(recorded[model.inputs[0]["name"]], xs[0])  # the recording saw the input


@pytest.mark.usefixtures("direct_inputs")
def test_an_input_read_in_place_is_checked_for_nan(cnn_artifact):
    model = runtime.load(cnn_artifact)
    x = _aligned_copy(np.random.default_rng(8).standard_normal((1, 3, 8, 8), dtype=np.float32))
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(BadInput, match="NaN or infinity"):
        model(x)


def test_small_inputs_are_copied_in(cnn_artifact):
    """Below ``_DIRECT_INPUT_MIN_BYTES`` copying is the cheaper call: no input is bound."""
    model = runtime.load(cnn_artifact)
    assert model._direct_inputs == [None]


def test_aligned_array_copies_into_memory_the_kernels_read_in_place(cnn_artifact, monkeypatch):
    monkeypatch.setattr(runtime, "_DIRECT_INPUT_MIN_BYTES", 0)
    model = runtime.load(cnn_artifact)
    x = np.random.default_rng(9).standard_normal((1, 3, 8, 8), dtype=np.float32)
    unaligned = _aligned_copy(x, misalign=16)
    aligned = csqc.aligned_array(unaligned)
    assert aligned.ctypes.data % 64 == 0 and aligned.flags.c_contiguous and not np.shares_memory(aligned, unaligned)
    np.testing.assert_array_equal(aligned, x)
    assert model._readable_in_place(0, aligned) and not model._readable_in_place(0, unaligned)
    np.testing.assert_array_equal(model(aligned), model(unaligned))
    strided = csqc.aligned_array(np.arange(12, dtype=np.int64).reshape(3, 4).T)  # any layout in, C order out
    assert strided.flags.c_contiguous and strided.ctypes.data % 64 == 0 and strided.tolist()[1] == [1, 5, 9]


@pytest.mark.usefixtures("direct_inputs")
def test_profiling_steps_times_them_on_the_callers_input(cnn_artifact):
    """The steps read the model's input buffer: profile_steps fills it even from an array a
    call would read in place."""
    model = runtime.load(cnn_artifact)
    x = _aligned_copy(np.random.default_rng(10).standard_normal((1, 3, 8, 8), dtype=np.float32))
    assert model._readable_in_place(0, x)
    runtime.profile_steps(model, x, repeat=1)
    np.testing.assert_array_equal(model._in_views[0], x)


def test_small_inputs_and_outputs_are_checked_for_nan_in_one_block(two_io_artifact):
    """Small float inputs share one block of memory, as do small float outputs, so that one scan
    checks each side: a NaN or infinity anywhere in it is still refused, naming the input (or
    output) it is in, and a refused call leaves nothing behind for the next one."""
    model = runtime.load(two_io_artifact)
    assert set(model._io_blocks) == {"input", "output"}  # the path this test is about
    rng = np.random.default_rng(4)
    x, h = rng.standard_normal((1, 16), dtype=np.float32), rng.standard_normal((1, 12), dtype=np.float32)
    want = runtime.load(two_io_artifact)(x, h)
    for name, bad in (("input0", (np.where(np.arange(16) == 7, np.inf, x), h)),
                      ("input1", (x, np.where(np.arange(12) == 11, np.nan, h)))):
        with pytest.raises(BadInput, match=f"input {name} contains NaN or infinity"):
            model(*bad)
        for got, expected in zip(model(x, h), want):
            np.testing.assert_array_equal(got, expected)
    with pytest.raises(BadInput, match=r"output \S+ is NaN or infinite"):
        model(x * 1e4, h * 1e4)  # exp overflows; the first output stays finite


@pytest.fixture
def small_calls(monkeypatch):
    """Outputs below the runtime's own threshold copied out, not written in place, as outside the
    tests (conftest has every output written in place): the condition for the short call."""
    monkeypatch.setattr(runtime, "_FRESH_OUTPUT_MIN_BYTES", 1 << 17)


def _as_list(result):
    return result if isinstance(result, list) else [result]


@pytest.mark.usefixtures("small_calls")
@pytest.mark.parametrize("which", ["cnn", "two_io", "lstm"])
def test_small_models_take_the_short_call_and_it_computes_what_the_general_call_does(
        cnn_artifact, two_io_artifact, tmp_path, which):
    """A model of small float inputs and outputs runs its common call (all planes, nothing
    recorded) through ``_call_small``: the same outputs as the general call, bit for bit, in new
    arrays; any other call (other planes, a recording, other dtypes, a list) takes the general
    path and leaves the short one right for the next call; a NaN is still refused by name."""
    path = {"cnn": cnn_artifact, "two_io": two_io_artifact}.get(which) or _lstm_artifact(tmp_path)
    model, general = runtime.load(path), runtime.load(path)
    assert model._small_call is not None
    general._small_call = None
    assert bool(model._io_blocks) == (which != "cnn")  # one scan per block, or one per array
    short_calls = []
    call_small = model._call_small
    model._call_small = lambda *a: short_calls.append(1) or call_small(*a)
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(s["shape"], dtype=np.float32) for s in model.inputs]
    want = _as_list(general(*xs))
    first = _as_list(model(*xs))
    assert len(short_calls) == 1
    for got, expected in zip(first, want):
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable and not any(np.shares_memory(got, v) for v in model._out_views)
    kept = [y.copy() for y in first]
    other = [rng.standard_normal(s["shape"], dtype=np.float32) for s in model.inputs]
    for got, expected in zip(_as_list(model(*other)), _as_list(general(*other))):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(first, kept):  # the next call left the returned arrays alone
        np.testing.assert_array_equal(got, expected)
    calls = len(short_calls)
    for got, expected in zip(_as_list(model(*xs, skip_planes=1)), _as_list(general(*xs, skip_planes=1))):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(_as_list(model(*[x.astype(np.float64) for x in xs], record={})), want):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(_as_list(model([x.astype(np.float64) for x in xs])), want):
        np.testing.assert_array_equal(got, expected)
    assert len(short_calls) == calls + 1  # (the float64 call tried it, and went on to the general path)
    for got, expected in zip(_as_list(model(*xs)), want):  # all planes again, after the skipping call
        np.testing.assert_array_equal(got, expected)
    model.threads = 1
    for got, expected in zip(_as_list(model(*xs)), want):
        np.testing.assert_array_equal(got, expected)
    assert len(short_calls) == calls + 3
    spec = model.inputs[-1]
    with pytest.raises(BadInput, match=f"input {spec['name']}: expected shape"):
        model(*xs[:-1], np.zeros((2, *spec["shape"]), np.float32))
    bad = xs[-1].copy()
    bad.reshape(-1)[-1] = np.nan
    with pytest.raises(BadInput, match=f"input {spec['name']} contains NaN or infinity"):
        model(*xs[:-1], bad)
    for got, expected in zip(_as_list(model(*xs)), want):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.usefixtures("small_calls")
def test_the_short_call_refuses_an_output_that_overflows(two_io_artifact):
    """exp of a large layer output overflows: the short call's output scan refuses it, naming the output."""
    model = runtime.load(two_io_artifact)
    assert model._small_call is not None
    rng = np.random.default_rng(4)
    x, h = rng.standard_normal((1, 16), dtype=np.float32), rng.standard_normal((1, 12), dtype=np.float32)
    with pytest.raises(BadInput, match=r"output \S+ is NaN or infinite"):
        model(x * 1e4, h * 1e4)
