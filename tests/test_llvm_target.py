"""The llvm target end to end: compile -> artifact -> csqc.runtime, checked by csqc verify.

Kernels are tested one by one in test_kernels_llvm.py and test_glue_llvm.py; here whole models
go through the driver, and the artifact's integer accumulators must equal the interpreter's.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from cpus import AVX2_CPU, needs_avx512
from csqc import runtime
from csqc.cli import cli
from csqc.errors import BadInput
from csqc.verify import DEFAULT_RUNTIMES, verify
from modelcheck import one_channel_convs

DIGITS_BATCH = 50


def _assert_artifact_exact(report, name):
    assert report.ok, json.dumps({k: v for k, v in report.to_json().items() if k != "layers"}, indent=1)
    assert report.accumulators_exact
    assert f"artifact:{name}" in report.runtimes
    stats = [s for s in report.layers if s["runtime"] == f"artifact:{name}"]
    quantized = [s for s in stats if "acc" in s["checked"]]
    assert quantized, "the artifact exposed no accumulators to check"
    assert all(s["checked"]["acc"] > 0 and s["mismatched"]["acc"] == 0 for s in quantized)
    assert all(sum(s["mismatched"].values()) == 0 for s in stats)


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    """``compiled(recipe)`` -> (loaded model, artifact path) at batch 50, built once."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            _, _, _, path = trained(recipe)
            model = csqc.load(path)
            out = tmp_path_factory.mktemp("llvm") / f"{recipe}.so"
            result = csqc.compile(model, "llvm", out, batch=DIGITS_BATCH)
            assert result.output == out and out.is_file()
            cache[recipe] = (model, out, result)
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_digits_artifact_verifies_exactly_on_the_test_set(compiled, recipe):
    model, path, result = compiled(recipe)
    assert set(result.report["kernels"]) == {n.name for n in result.graph.quant_layers()}
    report = verify(model, dataset="digits", artifact=str(path), per_layer=True)
    _assert_artifact_exact(report, path.name)
    assert report.batch == DIGITS_BATCH and report.samples == 450
    assert report.accuracy[f"artifact:{path.name}"] == report.accuracy["interpreter:default"]


@pytest.mark.parametrize("kernel", ["bitserial", "bitparallel"])
def test_forced_kernels_are_exact_too(trained, tmp_path, kernel):
    _, _, _, path = trained("digits-cnn")
    model = csqc.load(path)
    out = tmp_path / f"{kernel}.so"
    result = csqc.compile(model, "llvm", out, batch=4, force_kernel=kernel)
    kinds = set(result.report["kernels"].values()) - {"float"}
    assert kinds == {kernel}
    _assert_artifact_exact(verify(model, samples=8, artifact=str(out), per_layer=True), out.name)


def test_resnet20_artifact_verifies(tmp_path):
    from csqc.models.vision import resnet20

    torch.manual_seed(0)
    net = csqc.finalize(csqc.convert(resnet20().eval(), n_bits=4, act_bits=4)).eval()
    csqc.save(net, tmp_path / "r20.pt", torch.zeros(2, 3, 32, 32))
    model = csqc.load(tmp_path / "r20.pt")
    out = tmp_path / "r20.so"
    csqc.compile(model, "llvm", out)
    _assert_artifact_exact(verify(model, samples=2, artifact=str(out), per_layer=True), out.name)


def test_a_model_of_small_layers_runs_on_one_thread_and_large_ones_are_not_capped(compiled, tmp_path):
    from cpus import HOST_TIER
    from csqc.targets.llvm.target import ONE_THREAD_LAYER_MACS, one_thread_layer_macs

    # the digits MLP's largest layer is far below the bound of every tier: one thread
    model, path, result = compiled("digits-mlp")
    largest = max(n.multiply_adds for n in csqc.optimize(model, batch=DIGITS_BATCH).quant_layers())
    assert largest < one_thread_layer_macs("avx2") < one_thread_layer_macs("avx512") == ONE_THREAD_LAYER_MACS
    assert one_thread_layer_macs(HOST_TIER) in (one_thread_layer_macs("avx2"), ONE_THREAD_LAYER_MACS)
    assert result.report["threads"] == 1 and runtime.load(path).threads == 1
    out = CliRunner().invoke(cli, ["inspect", str(path)])
    assert out.exit_code == 0 and "threads: at most 1 per call" in out.output, out.output
    assert json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).output)["threads"] == 1
    # one layer of 2048 x 2048 at batch 1 is just above it: no cap, TVM's pool decides
    torch.manual_seed(0)
    net = csqc.finalize(csqc.convert(torch.nn.Sequential(torch.nn.Linear(2048, 2048)).eval(), n_bits=2, act_bits=4))
    csqc.save(net.eval(), tmp_path / "wide.pt", torch.zeros(1, 2048))
    assert 2048 * 2048 >= ONE_THREAD_LAYER_MACS
    wide = csqc.compile(csqc.load(tmp_path / "wide.pt"), "llvm", tmp_path / "wide.so")
    assert wide.report["threads"] is None and runtime.load(tmp_path / "wide.so").threads is None
    assert "threads" not in runtime.load(tmp_path / "wide.so").plan
    # small layers whose kernels are all serial (an LSTM step's) get no cap: it would only cost
    from csqc.targets.llvm.target import thread_cap

    small = csqc.optimize(model, batch=DIGITS_BATCH)
    assert thread_cap(small) == 1 and thread_cap(small, {}) is None
    # AVX2's kernels take longer a multiply-add: a 1024 x 1024 layer runs on two threads there only
    csqc.save(csqc.finalize(csqc.convert(torch.nn.Sequential(torch.nn.Linear(1024, 1024)).eval(), n_bits=2,
                                         act_bits=4)).eval(), tmp_path / "mid.pt", torch.zeros(1, 1024))
    mid = csqc.optimize(csqc.load(tmp_path / "mid.pt"))
    assert thread_cap(mid, tier="avx512") == 1 and thread_cap(mid, tier="avx2") is None


def test_the_thread_cap_holds_for_the_call_only_and_changes_no_result(compiled, monkeypatch):
    """TVM reads TVM_NUM_THREADS at each parallel launch: the runtime lowers it for a call of a
    capped model and restores it after; the kernels' results do not depend on the thread count."""
    _, path, _ = compiled("digits-cnn")  # at batch 50 its convs are large enough to run in parallel
    m = runtime.load(path)
    x = np.random.default_rng(1).random(m.inputs[0]["shape"], dtype=np.float32)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    m.threads = None
    free = m(x)
    m.threads = 1
    seen = []

    def on_call():
        with m._thread_limit():
            seen.append(os.environ.get("TVM_NUM_THREADS"))

    capped = m(x)
    assert np.array_equal(capped, free)
    on_call()
    assert seen == ["1"] and os.environ["TVM_NUM_THREADS"] == "2"
    monkeypatch.delenv("TVM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    on_call()
    assert seen[-1] == "1" and "TVM_NUM_THREADS" not in os.environ
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # already at the cap: left alone
    on_call()
    assert seen[-1] == "1" and os.environ["TVM_NUM_THREADS"] == "1"
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    m.threads = None  # uncapped: the pool's two threads
    on_call()
    assert seen[-1] == "2"
    m.threads = 2
    assert np.array_equal(m(x), capped)


def test_loading_a_model_gives_tvm_a_thread_per_physical_core_unless_told(compiled, monkeypatch):
    """TVM alone would take half the logical CPUs (one thread on a two-vCPU VM); loading a CPU
    model sets TVM_NUM_THREADS to the physical cores, unless it or OMP_NUM_THREADS is set."""
    _, path, _ = compiled("digits-cnn")
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    m = runtime.load(path)
    assert os.environ["TVM_NUM_THREADS"] == str(runtime.physical_cores()) and m.threads is None
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    runtime.load(path)
    assert os.environ["TVM_NUM_THREADS"] == "3"
    monkeypatch.delenv("TVM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runtime.load(path)
    assert "TVM_NUM_THREADS" not in os.environ


def test_physical_cores_count_hyperthread_siblings_once_within_the_cgroup_quota(tmp_path):
    def cpu(n, package, core):
        topology = tmp_path / f"devices/system/cpu/cpu{n}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")

    for n, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)]):
        cpu(n, package, core)  # cpu0/cpu2 and cpu1/cpu3 are siblings; package 1 has its own cores 0, 1
    assert runtime.physical_cores(range(4), tmp_path) == 2
    assert runtime.physical_cores([0, 2], tmp_path) == 1
    assert runtime.physical_cores(range(6), tmp_path) == 4
    assert runtime.physical_cores([0, 7, 8], tmp_path) == 3  # no topology for cpu7, cpu8: counted as cores
    (tmp_path / "fs/cgroup").mkdir(parents=True)
    (tmp_path / "fs/cgroup/cpu.max").write_text("250000 100000\n")  # 2.5 CPUs of time
    assert runtime.physical_cores(range(6), tmp_path) == 3
    (tmp_path / "fs/cgroup/cpu.max").write_text("max 100000\n")
    assert runtime.physical_cores(range(6), tmp_path) == 4
    assert 1 <= runtime.physical_cores() <= (os.cpu_count() or 1)


def test_capped_calls_in_several_threads_restore_the_thread_count_once_all_end(compiled, monkeypatch):
    import threading

    _, path, _ = compiled("digits-cnn")
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    models = [runtime.load(path) for _ in range(3)]  # one per thread: a model's buffers are its own
    x = np.random.default_rng(2).random(models[0].inputs[0]["shape"], dtype=np.float32)
    expected = models[0](x)
    results, during = [], set()

    def work(m):
        m.threads = 1
        for _ in range(15):
            results.append(np.array_equal(m(x), expected))
            with m._thread_limit():
                during.add(os.environ["TVM_NUM_THREADS"])

    workers = [threading.Thread(target=work, args=(m,)) for m in models]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 45 and all(results)
    assert during == {"1"} and os.environ["TVM_NUM_THREADS"] == "2"


@pytest.mark.parametrize("call", ["general", "short"])
def test_a_capped_model_times_its_calls_on_the_cap_and_the_pool_and_results_do_not_change(compiled, monkeypatch, call):
    """The compiler's one-thread cap is checked by the calls themselves (csqc.call_choice):
    trials on the cap and on the pool (each on shared and on private memory, as the tests pool
    every plan), again once a period passed; setting ``threads`` ends the thread choice. The same
    through a small model's short call (outputs copied out, as outside the tests)."""
    import csqc.call_choice as call_choice
    import csqc.runtime as runtime_module

    _, path, _ = compiled("digits-mlp")
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    if call == "short":
        monkeypatch.setattr(runtime_module, "_FRESH_OUTPUT_MIN_BYTES", 1 << 17)
    m = runtime.load(path)
    assert (m._small_call is not None) == (call == "short")
    choice = m.call_choice
    assert choice is not None and choice.pool == 2 and m.threads == 1
    assert [s.threads for s in choice.settings] == [1, None] * (len(choice.settings) // 2)
    x = np.random.default_rng(3).random(m.inputs[0]["shape"], dtype=np.float32)
    capped_calls = []
    real_cap = runtime_module._cap_threads
    monkeypatch.setattr(runtime_module, "_cap_threads", lambda cap: (capped_calls.append(cap), real_cap(cap)))
    expected = m(x, record={})  # not timed: no trial call
    assert capped_calls == [1]
    trial_calls = choice.trial_calls
    for i in range(trial_calls):
        before = len(capped_calls)
        assert np.array_equal(m(x), expected)
        assert (len(capped_calls) > before) == ((i // call_choice.TRIAL_BLOCK_CALLS) % 2 == 0), i
    assert choice.trials == 1 and m.threads == choice.chosen.threads in (1, None)
    assert os.environ["TVM_NUM_THREADS"] == "2"
    # the next trial waits for both the period's calls and its seconds
    monkeypatch.setattr(call_choice, "TRIAL_PERIOD_CALLS", 3)
    choice._next_trial = 0.0
    for _ in range(3 + trial_calls):
        assert np.array_equal(m(x), expected)
    assert choice.trials == 2
    m.threads = 1
    assert m.threads == 1 and (m.call_choice is None or {s.threads for s in m.call_choice.settings} == {1})
    with pytest.raises(BadInput, match="threads must be"):
        m.threads = 0
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # the pool is no larger than the cap: nothing to try
    reloaded = runtime.load(path)
    assert reloaded.call_choice is None or {s.threads for s in reloaded.call_choice.settings} == {1}


def test_convs_whose_outputs_fit_int16_store_int16_accumulators_and_verify(tmp_path):
    """Half the accumulator bytes where every output fits int16 under any plane setting: the
    1x1 and the depthwise conv do, the 3x3 conv over 64 channels does not; all verify exactly."""
    from csqc.passes.accumulator_width import accumulator_bound

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 16, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    net = csqc.finalize(csqc.convert(net.eval(), n_bits=3, act_bits=4)).eval()
    csqc.save(net, tmp_path / "convs.pt", torch.zeros(2, 3, 16, 16))
    model = csqc.load(tmp_path / "convs.pt")
    out = tmp_path / "convs.so"
    result = csqc.compile(model, "llvm", out)
    buffers = runtime.load(out).plan["buffers"]
    graph = csqc.optimize(model)
    dtypes = {}
    for n in graph.quant_layers():
        if n.op == "qconv2d" and result.report["kernels"][n.name] == "bitparallel":
            dtypes[n.name] = buffers[f"{n.name}.acc"]["dtype"]
            assert (dtypes[n.name] == "int16") == (2 * accumulator_bound(graph, n) < 2**15), n.name
    assert sorted(set(dtypes.values())) == ["int16", "int32"], dtypes
    assert dtypes["6"] == "int16"  # the depthwise conv: int16 accumulation and int16 outputs
    _assert_artifact_exact(verify(model, samples=2, artifact=str(out), per_layer=True), out.name)


@pytest.mark.skipif("avx512vbmi" not in open("/proc/cpuinfo").read(), reason="tap pairs need AVX-512 VBMI")
def test_wide_depthwise_convs_take_tap_pairs_verify_and_refuse_weights_past_int8(tmp_path):
    """Depthwise convs with rows of 28 or more outputs multiply two taps at once (byte pairs):
    exact end to end, under the plane knob too; an artifact whose planes could form a weight
    beyond int8 for such a layer is refused before any kernel runs."""
    from test_artifact_integrity import _resealed, _split

    from csqc.artifact import PLAN, WEIGHTS

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU6(),
                              torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),  # 30 columns
                              torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16), torch.nn.ReLU6(),  # 15
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    net = csqc.finalize(csqc.convert(net.eval(), n_bits=3, act_bits=4)).eval()
    csqc.save(net, tmp_path / "dw.pt", torch.zeros(2, 3, 30, 30))
    model = csqc.load(tmp_path / "dw.pt")
    out = tmp_path / "dw.so"
    csqc.compile(model, "llvm", out)
    art = runtime.load(out)
    pairs = {name for name, info in art.plan["layers"].items() if info.get("tap_pairs")}
    assert pairs == {"2"}, pairs  # the stride-2 conv's 15-column rows keep one tap a multiply
    _assert_artifact_exact(verify(model, samples=2, artifact=str(out), per_layer=True), out.name)
    x = np.random.default_rng(0).random((2, 3, 30, 30), dtype=np.float32)
    graph = csqc.optimize(model)
    for skip in (1, 2):  # recombined weights: the interpreter's accumulators at the same plane setting
        record, golden = {}, {}
        art(x, skip_planes=skip, record=record)
        kept = {n: art._kept_planes(n, skip) for n in art.layers}
        csqc.interpreter.run(graph, [x], record=golden, planes_used=kept)
        tensors = art.layers["2"]["tensors"]
        assert art._kept_planes("2", skip) < art.layers["2"]["planes"]
        np.testing.assert_array_equal(record[tensors["acc"]].astype(np.int64) << tensors["acc_shift"], golden["2.acc"])
    cascade = tmp_path / "cascadelake.so"  # VNNI without VBMI: one tap a multiply, the same integers
    csqc.compile(model, "llvm", cascade, mcpu="cascadelake")
    assert not any(info.get("tap_pairs") for info in runtime.load(cascade).plan["layers"].values())
    _assert_artifact_exact(verify(model, samples=2, artifact=str(cascade), per_layer=True), cascade.name)
    library, members = _split(out)
    plan = json.loads(members[PLAN])
    plan["layers"]["2"]["plane_spec"][0][0] = 9  # the top plane worth 512: weights past int8
    bad = tmp_path / "bad.so"
    bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(BadInput, match="its tap-pair kernel reads int8"):
        runtime.load(bad)


def test_float_input_layers_combine_their_weights_from_planes_for_every_plane_setting(tmp_path):
    """A float-input layer (a CNN's stem) stores its bitplanes, not float weights: the runtime
    combines them into its float32 buffer, again for each plane setting, so the plane knob drops
    the stem's low positions as the interpreter does (every layer's accumulators and the outputs
    agree); planes that could form weights float32 cannot hold exactly are refused."""
    from test_artifact_integrity import _resealed, _split

    from csqc.artifact import PLAN, WEIGHTS

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5))
    net = csqc.finalize(csqc.convert(net.eval(), n_bits=4, act_bits=4, quantize_first_input=False)).eval()
    csqc.save(net, tmp_path / "stem.pt", torch.zeros(2, 3, 12, 12))
    model = csqc.load(tmp_path / "stem.pt")
    out = tmp_path / "stem.so"
    csqc.compile(model, "llvm", out)
    art = runtime.load(out)
    stem = art.layers["0"]
    assert stem["kernel"] == "float" and art.plan["buffers"][stem["float_buffer"]]["kind"] == "derived"
    assert "0.wf" not in art._weights and "0.bitplanes" in art._weights
    graph = csqc.optimize(model)
    x = np.random.default_rng(3).random((2, 3, 12, 12), dtype=np.float32) * 4
    outputs = set()
    for skip in (0, 2, 1, 0):  # and back: the float weights follow the plane setting
        record, golden = {}, {}
        y = art(x, skip_planes=skip, record=record)
        outputs.add(y.tobytes())
        kept = {n: art._kept_planes(n, skip) for n in art.layers}
        if skip:
            assert kept["0"] < stem["planes"]
        (expected,) = csqc.interpreter.run(graph, [x], record=golden, planes_used=kept)
        for name, info in art.layers.items():
            if isinstance(info["tensors"].get("acc"), str):
                acc = record[info["tensors"]["acc"]].astype(np.int64) << info["tensors"]["acc_shift"]
                np.testing.assert_array_equal(acc, golden[f"{name}.acc"], err_msg=f"{name} at skip {skip}")
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert len(outputs) == 3  # three plane settings, three different results
    library, members = _split(out)
    plan = json.loads(members[PLAN])
    plan["layers"]["0"]["plane_spec"][0][0] = 30  # weights past 2**24: float32 would round them
    bad = tmp_path / "bad.so"
    bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(BadInput, match="beyond float32's integers"):
        runtime.load(bad)


def _saved_with_statistics(net, batch_norms, input_shape, path):
    """``net`` with random BatchNorm statistics, finalized, saved and loaded back."""
    for bn in batch_norms:
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    csqc.save(csqc.finalize(net).eval(), path, torch.zeros(*input_shape))
    return csqc.load(path)


@pytest.mark.skipif("avx512_vnni" not in open("/proc/cpuinfo").read(),
                    reason="the channels-on-lanes float conv is AVX-512's (32 registers)")
def test_weight_only_convs_on_small_planes_put_channels_on_the_lanes(tmp_path, monkeypatch):
    """Float-activation convs on a 7x7 plane (the CSQ reference's default ``act_bit=0``; rows of 7
    pixels) run with output channels on the lanes: the quantized ones on float weights the
    runtime combines from the planes in that order for every plane setting, a float conv on
    weights stored in it. The outputs are bit for bit those of the same model built with the pixel
    form only; a layout the runtime does not know is refused."""
    from test_artifact_integrity import _resealed, _split

    from csqc.artifact import PLAN, WEIGHTS
    from csqc.targets.llvm import glue

    torch.manual_seed(4)
    net = torch.nn.Sequential(
        csqc.CSQConv2d(3, 32, 3, 2, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.ReLU(),
        csqc.CSQConv2d(48, 40, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(40), torch.nn.ReLU(),
        csqc.CSQConv2d(40, 64, 3, 1, 1, bias=False, n_bits=4), torch.nn.Flatten(), torch.nn.Linear(64 * 49, 10))
    model = _saved_with_statistics(net, (net[1], net[6]), (1, 3, 14, 14), tmp_path / "wo.pt")
    csqc.compile(model, "llvm", tmp_path / "lanes.so")
    monkeypatch.setattr(glue, "float_conv_knobs", lambda x, w, stride, padding, dilation, groups:
                        glue.default_conv_knobs(w[0], w[1] * w[2] * w[3], glue.common._pair(stride), groups))
    csqc.compile(model, "llvm", tmp_path / "pixels.so")
    lanes, pixels = runtime.load(tmp_path / "lanes.so"), runtime.load(tmp_path / "pixels.so")
    on_lanes = sorted(n for n, info in lanes.layers.items() if info.get("float_layout") == "channel_lanes")
    assert on_lanes == ["5", "8"] and lanes.layers["0"]["kernel"] == "float"  # the stem keeps its pixel tile
    assert "3.wl" in lanes._weights and "3.wl" not in pixels._weights  # the float conv's weights, reordered
    assert not any("float_layout" in info for info in pixels.layers.values())
    graph = csqc.optimize(model)
    x = np.random.default_rng(5).random((1, 3, 14, 14), dtype=np.float32)
    results = set()
    for skip in (0, 2, 0):
        y = lanes(x, skip_planes=skip)
        np.testing.assert_array_equal(y.view(np.uint32), pixels(x, skip_planes=skip).view(np.uint32))
        kept = {n: lanes._kept_planes(n, skip) for n in lanes.layers}
        (expected,) = csqc.interpreter.run(graph, [x], planes_used=kept)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        results.add(y.tobytes())
    assert len(results) == 2
    library, members = _split(tmp_path / "lanes.so")
    for layout, message in (("rows", "has float layout 'rows'"), (None, "derived float32 buffer of shape")):
        plan = json.loads(members[PLAN])
        info = plan["layers"]["5"]
        if layout is None:
            del info["float_layout"]
        else:
            info["float_layout"] = layout
        bad = tmp_path / "bad.so"
        bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
        with pytest.raises(BadInput, match=message):
            runtime.load(bad)


@pytest.mark.skipif(" avx2" not in open("/proc/cpuinfo").read(),
                    reason="the Winograd float conv is x86's (AVX2, AVX-512)")
def test_weight_only_3x3_convs_of_many_channels_run_by_winograd(tmp_path):
    """Float-activation 3x3 convs of 64 channels on a 24x24 plane (21 M multiply-adds) run by
    Winograd F(2x2, 3x3): a quantized one on transformed weights the runtime derives from its
    planes for every plane setting, a float conv on transformed weights stored. The outputs are
    the interpreter's within float rounding at every plane setting, verify passes layer by layer,
    and a Winograd block the kernel was not built for is refused."""
    from test_artifact_integrity import _resealed, _split

    from csqc.artifact import PLAN, WEIGHTS
    from csqc.compiler import inspect_artifact
    from csqc.targets.llvm import glue

    torch.manual_seed(7)
    net = torch.nn.Sequential(
        csqc.CSQConv2d(8, 64, 3, 1, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        csqc.CSQConv2d(64, 64, 3, 1, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, 10))
    model = _saved_with_statistics(net, (net[1], net[4]), (1, 8, 24, 24), tmp_path / "wo.pt")
    csqc.compile(model, "llvm", tmp_path / "wino.so")
    art = runtime.load(tmp_path / "wino.so")
    block = glue.float_conv_knobs((1, 64, 24, 24), (64, 64, 3, 3), 1, 1, 1, 1).winograd_block  # by this CPU's tier
    assert art.layers["3"]["float_layout"] == "winograd" and art.layers["3"]["float_block"] == block > 0
    assert art.layers["0"].get("float_layout") != "winograd"  # 8 input channels: a direct form
    assert "6.wl" in art._weights and art._weights["6.wl"].shape == (16, 64 // block, 64, block)  # the float conv's U
    layouts = inspect_artifact(tmp_path / "wino.so")["float_layouts"]
    assert layouts.get("winograd") == 1 and sum(layouts.values()) == 1 + ("float_layout" in art.layers["0"])
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "wino.so")])
    assert shown.exit_code == 0 and "1 by Winograd F(2x2, 3x3)" in " ".join(shown.output.split())  # (wrapped)
    graph = csqc.optimize(model)
    x = np.random.default_rng(8).random((1, 8, 24, 24), dtype=np.float32)
    results = set()
    for skip in (0, 2, 0):
        y = art(x, skip_planes=skip)
        kept = {n: art._kept_planes(n, skip) for n in art.layers}
        (expected,) = csqc.interpreter.run(graph, [x], planes_used=kept)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        results.add(y.tobytes())
    assert len(results) == 2
    report = verify(model, samples=2, artifact=str(tmp_path / "wino.so"), per_layer=True)
    assert report.ok, report.summary()
    library, members = _split(tmp_path / "wino.so")
    for tampered, message in ((2 * block, "derived float32 buffer of shape"), (0, "Winograd layout of block 0")):
        plan = json.loads(members[PLAN])
        plan["layers"]["3"]["float_block"] = tampered
        bad = tmp_path / "bad.so"
        bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
        with pytest.raises(BadInput, match=message):
            runtime.load(bad)


def test_a_weight_only_residual_blocks_add_runs_in_its_last_convs_kernel(tmp_path):
    """A float-activation residual block (ResNet-50's, the CSQ reference's: activations never
    quantized): the last conv's kernel adds the shortcut and applies the ReLU, no separate
    elementwise step, the block's output as the interpreter computes it (verify, per layer)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = csqc.CSQConv2d(16, 16, 3, 1, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(16)
            self.conv2, self.bn2 = csqc.CSQConv2d(16, 16, 3, 1, 1, bias=False, n_bits=4), torch.nn.BatchNorm2d(16)
            self.fc = csqc.CSQLinear(16 * 36, 4, n_bits=4)

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.relu(y + x).flatten(1))

    torch.manual_seed(6)
    net = csqc.finalize(Block()).eval()
    csqc.save(net, tmp_path / "block.pt", torch.zeros(1, 16, 6, 6))
    model = csqc.load(tmp_path / "block.pt")
    csqc.compile(model, "llvm", tmp_path / "block.so")
    art = runtime.load(tmp_path / "block.so")
    kernels = [step["func"] for step in art.plan["steps"]]
    assert sum("conv2d_f32" in k for k in kernels) == 2 and not any("chain" in k or "binary" in k for k in kernels)
    assert art.layers["conv2"]["tensors"]["out"] is None and art.layers["conv2"]["tensors"]["residual"]
    report = verify(model, samples=3, artifact=str(tmp_path / "block.so"), per_layer=True)
    assert report.ok
    fc = next(s for s in report.layers if s["runtime"] == "artifact:block.so" and s["layer"] == "fc")
    assert fc["checked"]["in"] == 3 * 16 * 36 and fc["mismatched"]["in"] == 0  # the block's output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_imagenet_shaped_artifacts_verify(tmp_path, arch):
    from csqc.models import vision

    torch.manual_seed(0)
    net = csqc.finalize(csqc.convert(getattr(vision, arch)().eval(), n_bits=3, act_bits=4)).eval()
    csqc.save(net, tmp_path / "m.pt", torch.zeros(1, 3, 224, 224))
    model = csqc.load(tmp_path / "m.pt")
    out = tmp_path / f"{arch}.so"
    result = csqc.compile(model, "llvm", out)
    assert {"bitserial", "bitparallel"} & set(result.report["kernels"].values())
    report = verify(model, samples=1, artifact=str(out), per_layer=True)
    _assert_artifact_exact(report, out.name)
    # every default runtime agrees too (ImageNet-sized: verify's own ResNet-18 check is this one)
    assert set(DEFAULT_RUNTIMES) <= set(report.runtimes) and report.first_divergence is None


def test_reference_checkpoint_artifact_verifies(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_csqc_llvm_reference", Path(__file__).with_name("test_reference.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers._reference_checkpoint(tmp_path / "ckpt.pth")
    model = csqc.load(tmp_path / "ckpt.pth", model_factory="csqc.models.reference:resnet20_4bit",
                      input_shape=(2, 3, 32, 32))
    out = tmp_path / "ref.so"
    csqc.compile(model, "llvm", out)
    _assert_artifact_exact(verify(model, samples=2, artifact=str(out), per_layer=True), out.name)


def test_runtime_call_contract(compiled):
    _, path, _ = compiled("digits-mlp")
    m = runtime.load(path)
    x = np.random.default_rng(0).random((DIGITS_BATCH, 64), dtype=np.float32)
    y = m(x)
    assert y.shape == (DIGITS_BATCH, 10) and y.dtype == np.float32
    assert np.array_equal(m(x.astype(np.float64)), y)  # numeric dtypes are converted
    assert np.array_equal(m([x]), y)
    with pytest.raises(BadInput, match="expected shape"):
        m(x[:3])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(BadInput, match="NaN"):
        m(bad)
    with pytest.raises(BadInput, match="takes 1 input"):
        m(x, x)
    assert np.array_equal(m(torch.from_numpy(x).requires_grad_()), y)  # (np.asarray refuses such a tensor)
    with pytest.raises(BadInput, match="repeat must be"):
        m.time_us(x, repeat=0)


def test_skip_planes_trades_exactness_without_recompiling(compiled):
    model, path, _ = compiled("digits-cnn")
    m = runtime.load(path)
    from csqc.data import load_digits_split

    data = load_digits_split(image=True)
    xs = data.x_test[: 8 * DIGITS_BATCH].reshape(8, DIGITS_BATCH, 1, 8, 8)
    labels = data.y_test[: 8 * DIGITS_BATCH]
    exact = np.concatenate([m(x) for x in xs])
    assert np.array_equal(np.concatenate([m(x, skip_planes=0) for x in xs]), exact)
    skipped = np.concatenate([m(x, skip_planes=1) for x in xs])
    assert not np.array_equal(skipped, exact)  # the knob reaches the kernels
    assert np.array_equal(np.concatenate([m(x) for x in xs]), exact)  # and is undone on the next call
    # one bit position fewer in every layer (each keeps its top one): coarser, still far from chance
    assert (skipped.argmax(1) == exact.argmax(1)).mean() > 0.3
    assert (exact.argmax(1) == labels).mean() > 0.9
    one_layer = next(iter(m.layers))
    assert m(xs[0], skip_planes={one_layer: 0}).shape == exact[:DIGITS_BATCH].shape
    with pytest.raises(BadInput, match="unknown layers"):
        m(xs[0], skip_planes={"no_such_layer": 1})
    with pytest.raises(BadInput, match=">= 0"):
        m(xs[0], skip_planes=-1)
    with pytest.raises(BadInput, match=rf"skip_planes\[{one_layer!r}\] must be >= 0"):
        m(xs[0], skip_planes={one_layer: -1})
    for bad in (None, 1.5, "1", True):  # refused, not rounded, parsed or taken as 1
        with pytest.raises(BadInput, match="must be an integer"):
            m(xs[0], skip_planes=bad)
    assert np.array_equal(m(xs[0], skip_planes=np.int64(1)), skipped[:DIGITS_BATCH])


def test_skip_planes_keeps_the_zero_weights_of_offset_planes(compiled):
    """Offset planes hold ``u = q + z``, ``z = 2^(t-1)`` (offset binary): dropping their low
    planes rounds each weight down to the kept grid, so zero weights, most of a CSQ layer's,
    stay zero. With ``z = -min q`` (odd) kept whole every zero weight moved to -1, and this MLP
    fell to 12.7% of the digits at one position fewer (chance: 10%)."""
    from csqc.data import load_digits_split

    _, path, _ = compiled("digits-mlp")
    m = runtime.load(path)
    offset = {name: info for name, info in m.layers.items() if info.get("zero_point")}
    assert offset
    data = load_digits_split()
    batches = len(data.x_test) // DIGITS_BATCH
    xs = data.x_test[: batches * DIGITS_BATCH].reshape(batches, DIGITS_BATCH, 64)
    labels = data.y_test[: batches * DIGITS_BATCH]
    accuracy, weights = {}, {}
    for skip in (0, 1):
        accuracy[skip] = (np.concatenate([m(x, skip_planes=skip) for x in xs]).argmax(1) == labels).mean()
        weights[skip] = {name: m.buffers[info["float_buffer"]].numpy() for name, info in offset.items()
                         if "float_buffer" in info}  # (the float-input layer's, combined for this setting)
    assert accuracy[0] > 0.9 and accuracy[1] > 0.25, accuracy  # (55-89% on three trained models; 12.7% before)
    assert weights[0]
    for name, full in weights[0].items():
        assert not weights[1][name][full == 0].any() and (weights[1][name] != full).any(), name


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_inspect_names_the_kernel_compile_chooses(compiled, recipe):
    """`csqc inspect` asks the backend `csqc compile` lowers with (this CPU's tier, table
    lookups, tiles), so each layer's kernel there is the artifact's (it named bit-parallel
    where the VBMI table-lookup bit-serial kernel runs)."""
    model, path, _ = compiled(recipe)
    report = csqc.inspect(model, batch=DIGITS_BATCH)
    built = {name: info["kernel"] for name, info in runtime.load(path).layers.items()}
    shown = {row.name: row.kernel for row in report.layers if row.name in built}
    assert shown and shown == {name: built[name] for name in shown}


def test_runtime_needs_neither_torch_nor_the_compiler(compiled, tmp_path):
    _, path, _ = compiled("digits-mlp")
    x = np.random.default_rng(2).random((DIGITS_BATCH, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = runtime.load(path)(x)
    script = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'onnxruntime', 'csqc.compiler', 'csqc.capture'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "import numpy as np, tvm, csqc.runtime\n"
        "assert tvm.base._RUNTIME_ONLY  # TVM's compiler library is not loaded\n"
        f"y = csqc.runtime.load({str(path)!r})(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
    )
    # a deployment may install TVM's runtime alone (TVM's runtime-only mode: no TVMScript)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)


def test_loading_an_artifact_leaves_torch_unloaded(compiled, tmp_path):
    """TVM's FFI imports torch when it can (~2 s and 200 MB at a deployment's start): the
    runtime imports TVM without it, and torch still imports afterwards."""
    _, path, _ = compiled("digits-mlp")
    script = (
        "import sys, numpy as np, csqc.runtime\n"
        f"m = csqc.runtime.load({str(path)!r})\n"
        "m(np.zeros(m.inputs[0]['shape'], np.float32))\n"
        "assert 'torch' not in sys.modules, 'loading an artifact imported torch'\n"
        "import torch\n"
        "assert torch.ones(2).sum().item() == 2\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_not_an_artifact_is_bad_input(tmp_path):
    for content in (b"", b"\x7fELF not really", b"PK\x03\x04 truncated zip"):
        p = tmp_path / "fake.so"
        p.write_bytes(content)
        with pytest.raises(BadInput, match="not a csqc artifact"):
            runtime.load(p)
    with pytest.raises(BadInput, match="no such artifact"):
        runtime.load(tmp_path / "missing.so")


# -- the command line over the same flow ------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_compile_run_verify(trained, tmp_path):
    _, _, _, path = trained("digits-mlp")
    art = tmp_path / "mlp.so"
    out = _cli("compile", path, "--target", "llvm", "-o", art, "--batch", 3, "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["ok"] and data["target"] == "llvm" and set(data["kernels"]) and art.is_file()
    x = np.random.default_rng(3).random((3, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = _cli("run", art, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert out.exit_code == 0, out.output
    assert np.array_equal(np.load(tmp_path / "y.npy"), runtime.load(art)(x))
    out = _cli("verify", path, "--artifact", art, "--samples", 6, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["ok"] and report["accumulators_exact"] and "artifact:mlp.so" in report["runtimes"]
    # a CUDA artifact, or any .so, on a machine that cannot run it: a failure, not a crash
    out = _cli("run", art, "--input", tmp_path / "missing.npy")
    assert out.exit_code == 2 and "Traceback" not in out.output


def test_cli_bench_json_and_plane_sweep(compiled):
    model, path, _ = compiled("digits-mlp")
    out = _cli("bench", model.source, "--artifact", path, "--rounds", 2, "--sweep-planes", "--dataset", "digits", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    runtimes = {r["runtime"] for r in data["results"]}
    assert {"csqc", "pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "onnxruntime-int8-dynamic",
            "onnxruntime-matmulnbits-4b"} <= runtimes
    assert all(r["median_us"] > 0 and "weight_bytes" in r for r in data["results"])
    assert all(r["spread"] >= 0 and r["unreliable"] == (r["spread"] > 0.25) for r in data["results"])
    limits = data["limits"]  # the machine's limits, measured in the same run, and csqc's fractions of them
    assert limits["machine"]["dram_gb_per_s"] > 0 and limits["machine"]["int_peak_gmac_per_s"] > 0
    assert limits["machine"]["fork_join_us"] > 0  # two threads: a launch of the pool has a cost
    assert limits["weight_fraction_of_dram"] > 0 and limits["int_macs"] > 0 and limits["int_fraction_of_peak"] > 0
    # its layers are small (a one-thread plan): the report says what the thread trials found
    assert any("caps a call at 1 of the 2 threads" in note and "trial(s)" in note for note in data["notes"]), data["notes"]
    sweep = data["sweep_planes"]
    assert sweep[0]["skip_planes"] == 0 and len(sweep) >= 2
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in sweep)


def test_cli_bench_profile_lists_the_slowest_kernel_calls_and_the_share_per_kind(compiled):
    model, path, _ = compiled("digits-mlp")
    out = _cli("bench", model.source, "--artifact", path, "--rounds", 1, "--no-baselines", "--no-limits", "--profile")
    assert out.exit_code == 0, out.output
    assert "kernel calls timed one by one" in out.output
    assert "all epilogue" in out.output and "fc1" in out.output  # per-kind totals and the layers by name


def test_ops_without_lowering_are_listed_in_one_error_before_lowering():
    """Coverage is checked up front: one error names every op the planner cannot lower (and
    where), and nothing is built (a graph the IR verifier would refuse, so no pass or target
    ever sees it; the check is what a newly added IR op without an ``op_*`` meets)."""
    from dataclasses import replace

    from irbuild import Builder

    from csqc.errors import CompileError
    from csqc.targets.llvm.backend import CpuBackend
    from csqc.targets.tvm.lower import lower_graph, unsupported_ops

    b = Builder()
    x = b.input("x", (1, 8))
    g = b.build(b.node("r2", "relu", [b.node("r1", "relu", [b.node("r0", "relu", [x])])]))
    renamed = {"r0": "frobnicate", "r1": "twiddle", "r2": "frobnicate"}
    g = replace(g, nodes=[replace(n, op=renamed[n.name]) for n in g.nodes])
    assert unsupported_ops(g) == [("frobnicate", "r0"), ("twiddle", "r1"), ("frobnicate", "r2")]
    lowered = []
    listed = r"llvm target cannot lower op\(s\): frobnicate \(at r0, r2\); twiddle \(at r1\)"
    with pytest.raises(CompileError, match=listed):
        lower_graph(g, backend=CpuBackend(), on_layer=lowered.append)
    assert lowered == []



@pytest.mark.parametrize("kernel", ["bitserial", "bitparallel"])
def test_one_input_channel_convs_run_and_verify(tmp_path, kernel):
    model = csqc.load(one_channel_convs(tmp_path))
    out = tmp_path / f"one-channel-{kernel}.so"
    result = csqc.compile(model, "llvm", out, force_kernel=kernel)
    assert result.report["kernels"]["0"] == kernel and result.report["kernels"]["2"] == kernel
    _assert_artifact_exact(verify(model, samples=4, artifact=str(out), per_layer=True), out.name)


def test_table_lookup_only_where_the_cpu_has_byte_permutes():
    from csqc.targets.aarch64.target import Aarch64Backend
    from csqc.targets.llvm.backend import CpuBackend, has_table_lookup
    from csqc.targets.llvm.kernels import cpu_target

    assert has_table_lookup(cpu_target("sapphirerapids")) and has_table_lookup(cpu_target("znver4"))
    assert not has_table_lookup(cpu_target("cascadelake"))  # VNNI without VBMI
    assert CpuBackend(table_lookup=True).bitserial_knobs().table_lookup
    assert not CpuBackend().bitserial_knobs().table_lookup
    assert not Aarch64Backend().bitserial_knobs().table_lookup  # x86 instructions


@pytest.mark.parametrize("active_bits,act_bits,lookup,kernel", [
    ((3, 2, 1, 0), 4, True, "bitserial"),     # 4 planes x 4 bits: 16 pairs, but table lookups are flat in bits
    ((3, 2, 1, 0), 4, False, "bitparallel"),  # popcount: 16 pairs cost more than int8
    ((3, 2, 1, 0), 5, True, "bitparallel"),   # offset codes would need 6 bits: no table lookups
    ((5, 4, 3, 2, 1, 0), 4, True, "bitparallel"),  # 6 planes stream nearly int8's bytes
])
def test_one_row_cost_model_with_table_lookups(active_bits, act_bits, lookup, kernel):
    from irbuild import quant_layer_graph

    from csqc.targets.llvm.backend import choose_kernel

    g, _ = quant_layer_graph(np.random.default_rng(0), n_bits=max(active_bits) + 1, active_bits=active_bits,
                             act_bits=act_bits, batch=1)
    layer = next(n for n in g.nodes if n.op == "qlinear")
    q = g.params[layer.inputs[1]]
    assert choose_kernel(layer, 1, q, table_lookup=lookup).kernel == kernel


def _a8_linear_and_bitserial(tmp_path, k: int, n: int, n_bits: int, x, act_symmetric: bool, mcpu=None):
    """A one-layer linear model with 8-bit activations, its default llvm build and one forced
    bit-serial: (loaded model, default artifact path, default and bit-serial loaded artifacts)."""
    model = csqc.convert(torch.nn.Sequential(torch.nn.Linear(k, n)).eval(), n_bits=n_bits, act_bits=8,
                         quantize_first_input=True, act_symmetric=act_symmetric)
    loaded = csqc.load(csqc.save(csqc.finalize(model).eval(), tmp_path / "m.pt", x))
    default, serial = tmp_path / "default.so", tmp_path / "serial.so"
    csqc.compile(loaded, "llvm", default, mcpu=mcpu)
    csqc.compile(loaded, "llvm", serial, force_kernel="bitserial", mcpu=mcpu)
    return loaded, default, runtime.load(default), runtime.load(serial)


def _splits_sign_parts(model) -> bool:
    """Whether a loaded artifact runs some layer once per sign part (an ``acc_neg`` buffer)."""
    return any("acc_neg" in a for step in model.plan["steps"] for a in step["args"] if isinstance(a, str))


@pytest.mark.parametrize("rows,one_pass", [(1, True), (2, True), (4, False)])
@needs_avx512
def test_w7a8_linear_takes_both_sign_parts_in_one_pass_exactly(tmp_path, rows, one_pass):
    """A w7a8 linear layer (int8 weights, too wide for nibbles) with symmetric 8-bit codes runs
    the int8 dense kernel once for both sign parts at one or two rows (one accumulator), once a
    part at four; it verifies exactly either way, and its skip_planes results are those of the
    bit-serial kernel."""
    torch.manual_seed(5)
    x = torch.rand(rows, 512) - 0.5
    loaded, dense, m, reference = _a8_linear_and_bitserial(tmp_path, 512, 2048, 7, x, act_symmetric=True)
    (layer,) = m.layers.values()
    assert (layer["kernel"], layer["pack"]) == ("bitparallel", "dense")
    assert _splits_sign_parts(m) != one_pass
    _assert_artifact_exact(verify(loaded, artifact=str(dense), per_layer=True, samples=4), dense.name)
    for skip in (0, 2, 5):
        np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))


@pytest.mark.parametrize("n_bits,rows,one_pass", [(4, 1, True), (4, 2, True), (4, 4, False), (6, 1, False)])
def test_avx2_linear_takes_both_sign_parts_in_one_pass_where_int16_holds(tmp_path, n_bits, rows, one_pass):
    """Built for AVX2, a linear layer with symmetric 8-bit codes takes both sign parts in one
    pass at one or two rows where a pair of codes times the complemented weights fits
    vpmaddubsw's int16 (4-bit weights: 2 x 255 x 17), else one call a part (6-bit weights reach
    64 under some plane setting: 2 x 255 x 65 could saturate); exact either way, at every plane
    setting."""
    torch.manual_seed(6)
    x = torch.rand(rows, 512) - 0.5
    loaded, dense, m, reference = _a8_linear_and_bitserial(tmp_path, 512, 1024, n_bits, x, True, mcpu=AVX2_CPU)
    (layer,) = m.layers.values()
    assert (layer["kernel"], layer["pack"]) == ("bitparallel", "dense")
    assert _splits_sign_parts(m) != one_pass
    _assert_artifact_exact(verify(loaded, artifact=str(dense), per_layer=True, samples=4), dense.name)
    for skip in (0, 2):
        np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))


@pytest.mark.parametrize("act_symmetric", [True, False])
@needs_avx512
def test_w4a8_linear_runs_on_nibble_weights_exactly(tmp_path, act_symmetric):
    """A batch-1 w4a8 linear layer takes the nibble-packed kernel (both sign parts of symmetric
    8-bit codes in one call), verifies exactly, and its skip_planes results are those of the
    bit-serial kernel, which drops planes itself; a plan whose planes overflow the layout is refused."""
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    torch.manual_seed(3)
    x = torch.rand(1, 512)
    loaded, nibble, m, reference = _a8_linear_and_bitserial(tmp_path, 512, 1024, 4, x, act_symmetric)
    (layer,) = m.layers.values()
    assert (layer["kernel"], layer["pack"], layer["nibble_high"]) == ("bitparallel", "nibble", -16)
    assert not _splits_sign_parts(m)
    _assert_artifact_exact(verify(loaded, artifact=str(nibble), per_layer=True, samples=4), nibble.name)
    for skip in (0, 1, 3):
        np.testing.assert_array_equal(m(x.numpy(), skip_planes=skip), reference(x.numpy(), skip_planes=skip))

    library, members = _split(nibble)
    plan = json.loads(members[PLAN])
    plan["layers"]["0"]["nibble_high"] = 0  # [0, 15] cannot hold these weights
    bad = tmp_path / "bad.so"
    bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(csqc.errors.CsqcError, match="nibble layer '0'"):
        runtime.load(bad)
