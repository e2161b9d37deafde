"""Temporary buffers of disjoint lifetimes share memory (``targets/tvm/memory.py``).

Two buffers in one pool must never be alive at one step, nothing the runtime reads after the
kernels (outputs, checked scales) may share, and a model on shared memory must compute and
record exactly what it computes on memory of its own. (The suite's conftest makes every plan
share its temporaries, so every exactness test runs on pools; here both ways are compared.)
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import csqc
from csqc import runtime
from csqc.artifact import PLAN, WEIGHTS
from csqc.errors import BadInput
from csqc.targets.tvm import memory
from csqc.targets.tvm.memory import assign_pools, buffer_lifetimes, pooled_bytes
from csqc.verify import verify

from .test_artifact_integrity import _resealed, _split


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 8), st.integers(1, 5000)), min_size=1, max_size=40))
def test_pools_never_hold_two_live_buffers_and_are_as_few_as_the_most_alive_at_once(spans):
    lifetimes = {f"b{i}": (first, first + length) for i, (first, length, _) in enumerate(spans)}
    sizes = {f"b{i}": size for i, (_, _, size) in enumerate(spans)}
    pool_of, pool_sizes = assign_pools(lifetimes, sizes)
    assert set(pool_of) == set(lifetimes)
    for a in lifetimes:
        assert pool_sizes[pool_of[a]] >= sizes[a]
        for b in lifetimes:
            if a < b and pool_of[a] == pool_of[b]:
                (fa, la), (fb, lb) = lifetimes[a], lifetimes[b]
                assert la < fb or lb < fa, (a, b)
    # greedy placement in order of first use colours an interval graph optimally
    most_alive = max(sum(f <= step <= last for f, last in lifetimes.values())
                     for step in range(max(last for _, last in lifetimes.values()) + 1))
    assert len(pool_sizes) == most_alive
    assert sum(pool_sizes) <= sum(sizes.values())


def test_a_buffer_lives_from_the_first_to_the_last_step_naming_it_or_a_view_of_it():
    buffers = {"x": {"kind": "input"}, "a": {"kind": "temp"}, "a2d": {"kind": "temp", "alias": "a"},
               "b": {"kind": "temp"}, "y": {"kind": "output"}}
    steps = [{"args": ["x", "a"]}, {"args": ["a", "b"]}, {"args": ["b", {"int": 3}]}, {"args": ["a2d", "y"]}]
    assert buffer_lifetimes(steps, buffers) == {"x": (0, 0), "a": (0, 3), "b": (1, 2), "y": (3, 3)}


def _residual_cnn():
    """Convs with a residual add, a stride and a linear head: dynamic scales, several planes."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                            torch.nn.ReLU())
            self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                            torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
            self.down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(32 * 8 * 8, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.body(x))
            return self.head(self.down(x).flatten(1))

    torch.manual_seed(5)
    return csqc.finalize(csqc.convert(Net().eval(), n_bits=3, act_bits=4))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return csqc.save(_residual_cnn(), tmp_path_factory.mktemp("pools") / "cnn.pt", torch.zeros(1, 3, 16, 16))


def _compiled(path, folder, name: str, shared: bool, calibrate=None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "PRIVATE_MEMORY_MAX_BYTES", 0 if shared else 2**62)
        return csqc.compile(csqc.load(path), "llvm", folder / f"{name}.so", calibrate=calibrate).output


@pytest.fixture(scope="module", params=["dynamic", "calibrated"])
def both_ways(request, model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    calibrate = [np.random.default_rng(2).random((16, 3, 16, 16), dtype=np.float32)] \
        if request.param == "calibrated" else None
    return (runtime.load(_compiled(model_file, folder, "shared", True, calibrate)),
            runtime.load(_compiled(model_file, folder, "private", False, calibrate)))


def test_a_plan_shares_only_temporaries_that_nothing_reads_after_the_kernels(both_ways):
    shared, private = both_ways
    plan = shared.plan
    buffers = plan["buffers"]
    assert plan["pools"] and "pools" not in private.plan
    assert all("pool" not in b for b in private.plan["buffers"].values())
    pooled = {name for name, b in buffers.items() if "pool" in b}
    assert pooled and all(buffers[n]["kind"] == "temp" and "alias" not in buffers[n] for n in pooled)

    def root(name):
        return buffers[name].get("alias", name)

    kept = {root(o["name"]) for o in plan["outputs"]} | {root(i["name"]) for i in plan["inputs"]}
    kept |= {root(s["args"][s.get("scale_arg", 1)]) for s in plan["steps"] if "levels" in s}
    kept |= {root(o["finite_below"]["scale"]) for o in plan["outputs"] if "finite_below" in o}
    assert not kept & pooled
    for step in plan["steps"]:  # a kernel's arguments never share memory
        pools = [buffers[root(a)]["pool"] for a in step["args"] if isinstance(a, str) and "pool" in buffers[root(a)]]
        assert len(pools) == len(set(pools)), step["func"]
    assert pooled_bytes(buffers, plan["pools"]) < pooled_bytes(private.plan["buffers"], {})


@pytest.mark.parametrize("skip_planes", [0, 1])
def test_shared_memory_computes_and_records_what_memory_of_its_own_does(both_ways, skip_planes):
    shared, private = both_ways
    for seed in (0, 1):  # twice: the second call starts from pools the first one left
        x = np.random.default_rng(seed).random((1, 3, 16, 16), dtype=np.float32)
        np.testing.assert_array_equal(shared(x, skip_planes=skip_planes), private(x, skip_planes=skip_planes))
    got, want = {}, {}
    np.testing.assert_array_equal(shared(x, skip_planes=skip_planes, record=got),
                                  private(x, skip_planes=skip_planes, record=want))
    assert got.keys() == want.keys()
    for name in want:  # every intermediate as its step left it, though a later step reused its memory
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_recording_of_named_buffers_holds_those_as_the_full_one_does(both_ways):
    """``record_names``: only those buffers copied (verify reads a few of a large model's), each
    as the full recording has it, pooled ones included; none with an empty list."""
    shared, _ = both_ways
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    full = {}
    shared(x, record=full)
    pooled = [n for n, b in shared.plan["buffers"].items() if "pool" in b or "alias" in b]
    names = sorted(full)[::3] + pooled[:2] + ["not a buffer"]
    some = {}
    np.testing.assert_array_equal(shared(x, record=some, record_names=names), shared(x))
    assert set(some) == set(names) & set(full) and set(pooled[:2]) <= set(some)
    for name in some:
        np.testing.assert_array_equal(some[name], full[name], err_msg=name)
    nothing = {}
    shared(x, record=nothing, record_names=())
    assert nothing == {}


def test_calls_are_timed_on_the_pools_and_on_private_memory_with_the_same_results(both_ways, monkeypatch):
    """Which of shared pools and private memory is faster is the machine's state (csqc.call_choice):
    a trial runs the common call both ways. Private memory is other memory than the pools,
    poisoned as they are (conftest), so every setting computes the same bits from scratch; calls
    with planes skipped or recorded run on the pools whatever was chosen."""
    from csqc.call_choice import CallSetting

    shared, private = both_ways
    choice = shared.call_choice
    assert choice.settings[0].shared_memory and {s.shared_memory for s in choice.settings} == {True, False}
    assert private.call_choice is None or {s.shared_memory for s in private.call_choice.settings} == {True}
    threads = choice.settings[0].threads
    on_pools, = shared._calls_on(CallSetting(threads, True), ())
    on_private, = shared._calls_on(CallSetting(threads, False), ())
    pooled = {i for i, a in enumerate(shared.plan["entry"]["args"])
              if isinstance(a, str) and "pool" in shared.plan["buffers"][shared._root(a)]}
    assert pooled

    def address(tensor):
        return np.from_dlpack(tensor).ctypes.data

    pool_memory = {address(on_pools[1][i]) for i in pooled}
    assert all(address(on_private[1][i]) not in pool_memory for i in pooled)
    assert [address(a) for i, a in enumerate(on_private[1]) if i not in pooled and not isinstance(a, int)] == \
        [address(a) for i, a in enumerate(on_pools[1]) if i not in pooled and not isinstance(a, int)]

    called = []
    real = shared._calls_on
    monkeypatch.setattr(shared, "_calls_on", lambda setting, skips: (called.append((setting, skips)), real(setting, skips))[1])
    choice._trial_call, choice._next_trial = 0, 0.0  # a trial now
    for seed in range(choice.trial_calls):
        x = np.random.default_rng(seed).random((1, 3, 16, 16), dtype=np.float32)
        np.testing.assert_array_equal(shared(x), private(x), err_msg=str(called[-1]))
    assert {setting for setting, _ in called} == set(choice.settings) and choice.trials >= 1
    choice.chosen = next(s for s in choice.settings if not s.shared_memory)
    for skip_planes in (0, 1):
        got, want = {}, {}
        np.testing.assert_array_equal(shared(x, skip_planes=skip_planes, record=got),
                                      private(x, skip_planes=skip_planes, record=want))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    np.testing.assert_array_equal(shared(x, skip_planes=1), private(x, skip_planes=1))
    np.testing.assert_array_equal(shared(x), private(x))


def test_setting_shared_memory_ends_the_memory_trials(both_ways):
    """``shared_memory`` fixes the memory of the common call (False: private, allocated then;
    True: the pools, the private memory freed); the thread choice goes on."""
    shared, private = both_ways
    m = runtime.load(shared.path)
    assert m.shared_memory is True and private.shared_memory is False  # (no pools: never shared)
    x = np.random.default_rng(11).random((1, 3, 16, 16), dtype=np.float32)
    want = private(x)
    m.shared_memory = False
    assert m.shared_memory is False and m._private_calls is None
    settings = m.call_choice.settings if m.call_choice is not None else (m._fixed,)
    assert {s.shared_memory for s in settings} == {False}
    assert {s.threads for s in settings} == ({s.threads for s in shared.call_choice.settings})
    for _ in range(3):
        np.testing.assert_array_equal(m(x), want)
    assert m._private_calls is not None
    m.shared_memory = True
    assert m.shared_memory is True and m._private_calls is None
    np.testing.assert_array_equal(m(x), want)
    with pytest.raises(BadInput, match="shared_memory must be"):
        m.shared_memory = 1


def test_inspect_reports_an_artifacts_tensors_layers_and_memory(both_ways):
    """``csqc inspect model.so`` reads the plan only: inputs, outputs, layers by kernel, calls,
    and the memory a loaded model takes, its pools against the same plan unshared."""
    from click.testing import CliRunner

    from csqc.artifact import read_artifact
    from csqc.cli import cli
    from csqc.compiler import inspect_artifact

    shared, private = both_ways
    info, info_private = inspect_artifact(shared.path), inspect_artifact(private.path)
    assert info["inputs"] == [{"name": shared.inputs[0]["name"], "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert [(o["shape"], o["dtype"]) for o in info["outputs"]] == [([1, 10], "float32")]
    kernels = [layer["kernel"] for layer in shared.layers.values()]
    assert info["layers"] == {k: kernels.count(k) for k in set(kernels)} and sum(info["layers"].values()) == 5
    assert info["kernel_calls"] == len(shared.plan["steps"]) and info["whole_model_function"] is True
    assert info["cpu"] == shared.plan["target"]["mcpu"] and info["bytes"] == shared.path.stat().st_size
    memory, memory_private = info["memory"], info_private["memory"]
    assert memory["weights"] == sum(w.nbytes for w in read_artifact(shared.path).weights.values()) > 0
    assert memory["pools"] == len(shared.plan["pools"]) > 0 and memory_private["pools"] == 0
    assert memory["intermediates"] < memory["intermediates_unshared"] == memory_private["intermediates"] \
        == memory_private["intermediates_unshared"]
    out = CliRunner().invoke(cli, ["inspect", str(shared.path)])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())  # (the console wraps long lines)
    assert "float32[1,3,16,16]" in text and "float32[1,10]" in text
    assert f"{memory['pools']} shared pools" in text and f"{info['kernel_calls']} kernel calls" in text
    assert json.loads(CliRunner().invoke(cli, ["inspect", str(shared.path), "--json"]).output)["memory"] == memory


def test_inspect_reports_an_onnx_artifacts_tensors_and_operators(model_file, tmp_path):
    import onnx
    from click.testing import CliRunner

    from csqc.cli import cli

    path = csqc.compile(csqc.load(model_file), "onnx", tmp_path / "cnn.onnx").output
    out = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    graph = onnx.load(str(path)).graph
    assert [i["name"] for i in info["inputs"]] == [i.name for i in graph.input]
    assert info["inputs"][0]["shape"] == [1, 3, 16, 16] and info["inputs"][0]["dtype"] == "float32"
    assert sum(info["operators"].values()) == len(graph.node) and "layers" not in info
    text = " ".join(CliRunner().invoke(cli, ["inspect", str(path)]).output.split())
    assert "operators: " in text and "float32[1,3,16,16]" in text


def test_verify_finds_every_accumulator_exact_on_shared_memory(model_file, tmp_path):
    artifact = _compiled(model_file, tmp_path, "shared", True)
    report = verify(csqc.load(model_file), artifact=str(artifact), samples=2, per_layer=True)
    assert report.ok and report.accumulators_exact, report.to_json()


def test_a_plan_whose_temporaries_fit_the_caches_keeps_them_apart(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "PRIVATE_MEMORY_MAX_BYTES", 2 * 2**20)  # the default
    plan = runtime.load(csqc.compile(csqc.load(model_file), "llvm", tmp_path / "small.so").output).plan
    assert "pools" not in plan  # ~100 KiB of temporaries


def _edited(artifact, folder, edit):
    library, members = _split(artifact)
    plan = json.loads(members[PLAN])
    edit(plan)
    path = folder / "edited.so"
    path.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    return path


def _first_pooled(plan):
    return next(b for b in plan["buffers"].values() if "pool" in b)


@pytest.mark.parametrize("edit", [
    lambda p: p["pools"].update({_first_pooled(p)["pool"]: 1}),
    lambda p: _first_pooled(p).update(pool="no-such-pool"),
    lambda p: _first_pooled(p).update(kind="output"),
    lambda p: p.update(pools={"pool0": -4}),
])
def test_an_edited_pool_is_refused(both_ways, tmp_path, edit):
    shared, _ = both_ways
    with pytest.raises(BadInput, match="pool"):
        runtime.load(_edited(shared.path, tmp_path, edit))


def test_an_artifact_without_pools_gives_each_buffer_its_memory(both_ways, tmp_path):
    shared, _ = both_ways

    def drop(plan):
        del plan["pools"]
        for b in plan["buffers"].values():
            b.pop("pool", None)

    x = np.random.default_rng(7).random((1, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(runtime.load(_edited(shared.path, tmp_path, drop))(x), shared(x))


@pytest.mark.parametrize("skip_planes", [0, 1])
def test_calls_from_several_threads_take_turns_and_compute_what_each_computes_alone(both_ways, skip_planes):
    """A model's buffers (pools, or memory of their own) serve one call at a time: threads calling
    one model wait for each other, so each gets its own input's outputs (two at once mixed their
    intermediates: wrong outputs and spurious overflow errors)."""
    import sys
    import threading

    switch = sys.getswitchinterval()
    shared, _ = both_ways
    xs = [np.random.default_rng(10 + i).random((1, 3, 16, 16), dtype=np.float32) for i in range(4)]
    alone = [shared(x, skip_planes=skip_planes) for x in xs]
    start, wrong, errors = threading.Barrier(len(xs)), [], []

    def calls(i):
        start.wait()
        try:
            for k in range(60):
                got = shared(xs[i], skip_planes=skip_planes, record={} if k % 20 == 19 else None)
                if not np.array_equal(got, alone[i]):
                    wrong.append(i)
        except Exception as e:  # noqa: BLE001 (reported below, with the thread's input)
            errors.append(f"input {i}: {e!r}")

    sys.setswitchinterval(1e-6)  # threads switch inside calls, between their kernels
    try:
        threads = [threading.Thread(target=calls, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors and not wrong, (errors[:3], len(wrong))
