"""Schedule search per layer shape, cached on disk per CPU (targets/llvm/tuning.py, ``csqc compile --tune``)."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from csqc import runtime
from csqc.cli import cli
from cpus import CODE_LIMIT
from csqc.targets.llvm import kernels, packing, tuning
from csqc.targets.llvm.backend import has_table_lookup
from csqc.targets.llvm.tuning import TuningCache
from csqc.targets.tvm.geometry import conv_geometry
from test_kernels_llvm import conv_reference

RNG = np.random.default_rng(11)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test here tunes into its own cache file, never the user's."""
    path = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    return path


@pytest.mark.parametrize("shape,weight_shape,stride,padding,groups", [
    ((1, 8, 9, 11), (24, 8, 3, 3), 1, 1, 1),
    ((1, 16, 12, 12), (40, 8, 3, 3), 2, 1, 2),
    ((2, 12, 7, 7), (20, 12, 1, 1), 1, 0, 1),
    ((1, 64, 16, 16), (128, 64, 3, 3), 1, 1, 1),  # VGG's: 12-channel tiles of direct stores failed to build
])
def test_every_conv_candidate_is_exact(shape, weight_shape, stride, padding, groups):
    """A tuned schedule may be any candidate: each computes the reference's integers."""
    geo = conv_geometry(shape, weight_shape, stride, padding, 1, groups)
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, CODE_LIMIT, shape)
    expected = conv_reference(x, q, (stride, stride), (padding, padding), (1, 1), groups)
    w = packing.pack_bitparallel_conv_weight(q, groups)
    candidates = tuning._conv_candidates(geo)
    assert {c["conv_form"] for c in candidates} == {"pixels", "channels"}
    for knobs in candidates:
        kernel = kernels.build(kernels.bitparallel_conv2d(shape, weight_shape, stride, padding, 1, groups,
                                                          kernels.BitparallelKnobs(**knobs)))
        np.testing.assert_array_equal(kernel(x.astype(np.uint8), w), expected, err_msg=str(knobs))


def test_every_dense_candidate_is_exact():
    m, n, k = 11, 72, 36  # a partial row block and a partial 16-output tile
    q = RNG.integers(-128, 128, (n, k))
    x = RNG.integers(0, CODE_LIMIT, (m, k))
    candidates = tuning._dense_problem(m, n, k)[2]
    assert len(candidates) >= 6
    for knobs in candidates:
        kernel = kernels.build(kernels.bitparallel_dense(m, n, k, "int8", "int32", kernels.BitparallelKnobs(**knobs)))
        np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_weight(q)), x @ q.T,
                                      err_msg=str(knobs))


@pytest.mark.parametrize("m,act_bits,zero_point,table_lookup", [(1, 4, True, False), (3, 4, False, True),
                                                                 (2, 6, True, False)])
def test_every_bitserial_dense_candidate_is_exact(m, act_bits, zero_point, table_lookup):
    if table_lookup and not has_table_lookup(kernels.cpu_target()):
        pytest.skip("this CPU has no AVX-512 VBMI")
    n, k = 40, 100
    plane_spec = [(2, 1), (1, 1), (0, 1)] if zero_point else [(2, 1), (0, -1)]
    base = kernels.BitserialKnobs(table_lookup=table_lookup)
    factory, (x, planes, n_planes, z), candidates = tuning._bitserial_dense_problem(
        m, n, k, plane_spec, act_bits, zero_point, "int32", base)
    bits = RNG.integers(0, 2, (len(plane_spec), n, k)).astype(np.uint8)
    x = RNG.integers(0, 1 << act_bits, (m, k)).astype(np.uint8)
    q = sum(sign * (1 << shift) * bits[p].astype(np.int64) for p, (shift, sign) in enumerate(plane_spec))
    expected = x.astype(np.int64) @ (q - z * 1).T if zero_point else x.astype(np.int64) @ q.T
    w = packing.pack_weight_planes(bits, lanes=base.lanes)
    assert len(candidates) >= 6
    for knobs in [{}, *candidates]:
        kernel = kernels.build(factory(knobs))
        np.testing.assert_array_equal(kernel(x, w, n_planes, z), expected, err_msg=str(knobs))


def test_the_search_keeps_the_heuristic_unless_a_candidate_wins_clearly(monkeypatch):
    """Times are whatever the (noisy) machine gives; the rule is what is tested: a candidate
    replaces the heuristic only when it is MIN_GAIN faster in both rounds."""
    timings = iter([100.0, 99.0, 60.0, 100.0, 90.0])  # default, cand 1, cand 2, default again, cand 2 again
    monkeypatch.setattr(tuning, "_time_us", lambda kernel, inputs: next(timings))
    factory, inputs, _ = tuning._dense_problem(4, 32, 32)
    knobs, default_us, best_us = tuning._search(factory, inputs, [{"row_block": 1}, {"row_block": 2}],
                                                kernels.cpu_target())
    assert knobs == {"row_block": 2} and default_us == 100.0 and best_us == 90.0
    timings = iter([100.0, 99.0, 60.0, 100.0, 97.0])  # the second round says it was noise
    assert tuning._search(factory, inputs, [{"row_block": 1}, {"row_block": 2}], kernels.cpu_target())[0] == {}


def test_a_candidate_that_does_not_build_is_skipped_with_a_warning(monkeypatch, caplog):
    """One bad schedule must not stop a compile: the search times the others."""
    timings = iter([100.0, 60.0, 100.0, 60.0])  # default, the good candidate, both again
    monkeypatch.setattr(tuning, "_time_us", lambda kernel, inputs: next(timings))
    factory, inputs, _ = tuning._dense_problem(4, 32, 32)

    def failing(knobs):
        if knobs.get("row_block") == 1:
            raise RuntimeError("Check failed: a schedule the kernel cannot build")
        return factory(knobs)

    with caplog.at_level("WARNING", logger=tuning.__name__):
        knobs, _, best_us = tuning._search(failing, inputs, [{"row_block": 1}, {"row_block": 2}], kernels.cpu_target())
    assert knobs == {"row_block": 2} and best_us == 60.0
    assert "candidate {'row_block': 1} did not build" in caplog.text


@pytest.fixture
def small_search(monkeypatch):
    """Two candidates per kernel kind: the tests below check what is cached and used, not which
    schedule wins, and a full search builds a dozen kernels per shape (every candidate's
    exactness is checked above)."""
    conv_candidates, dense_problem = tuning._conv_candidates, tuning._dense_problem
    monkeypatch.setattr(tuning, "_conv_candidates", lambda geo: [
        next(c for c in conv_candidates(geo) if c["conv_form"] == form) for form in ("pixels", "channels")])
    monkeypatch.setattr(tuning, "_dense_problem", lambda m, n, k: (*dense_problem(m, n, k)[:2], [
        {"row_block": 1, "col_vectors": 1}, {"row_block": min(m, 4), "col_vectors": 1}]))
    bitserial_problem = tuning._bitserial_dense_problem
    monkeypatch.setattr(tuning, "_bitserial_dense_problem", lambda *args: (*bitserial_problem(*args)[:2], [
        {"word_unroll": 1}, {"pack_chunk": 32, "rows_per_task": 1}]))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """No layer fits AMX tiles (24 outputs; 864 inputs), which --tune does not search: the same
    tuned shapes on every CPU."""
    torch.manual_seed(5)
    float_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(24 * 6 * 6, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    model = csqc.convert(float_model.eval(), n_bits=3, act_bits=4, quantize_first_input=True)
    x = torch.rand(8, 3, 12, 12)
    return csqc.save(csqc.finalize(model).eval(), tmp_path_factory.mktemp("tuning") / "m.pt", x), x


def _tuned(path, out, **kw):
    return csqc.compile(path, "llvm", out, tune=True, force_kernel="bitparallel", **kw)


def test_compile_tune_searches_once_then_reads_the_cache(tmp_path, private_cache, small_search, model_file):
    path, x = model_file
    searched = []
    first = _tuned(path, tmp_path / "a.so", on_tune=searched.append)
    tuned = first.report["tuning"]
    assert tuned["searched"] == len(tuned["shapes"]) == len(searched) >= 3 and private_cache.exists()
    assert {s["key"].split(":")[0] for s in tuned["shapes"]} == {"bpconv", "bpdense"}
    second = _tuned(path, tmp_path / "b.so")
    assert second.report["tuning"]["searched"] == 0
    assert [s["knobs"] for s in second.report["tuning"]["shapes"]] == [s["knobs"] for s in tuned["shapes"]]
    # a tuned build is exact: verify checks it against the interpreter layer by layer
    report = csqc.verify(csqc.load(path), artifact=str(tmp_path / "a.so"), inputs=[x.numpy()], per_layer=True)
    assert report.ok and report.accumulators_exact
    np.testing.assert_array_equal(runtime.load(tmp_path / "b.so")(x.numpy()), runtime.load(tmp_path / "a.so")(x.numpy()))


def test_bitserial_layers_are_tuned_and_exact(tmp_path, small_search, model_file):
    path, x = model_file
    result = csqc.compile(path, "llvm", tmp_path / "s.so", tune=True, force_kernel="bitserial")
    kinds = {s["key"].split(":")[0] for s in result.report["tuning"]["shapes"]}
    assert "bsdense" in kinds and "bpconv" not in kinds  # bit-serial convs keep their schedule
    report = csqc.verify(csqc.load(path), artifact=str(tmp_path / "s.so"), inputs=[x.numpy()], per_layer=True)
    assert report.ok and report.accumulators_exact


def test_a_cache_for_another_cpu_is_not_used(tmp_path, private_cache, good_cache, model_file, monkeypatch):
    path, _ = model_file
    data = json.loads(json.dumps(good_cache[0]))
    (cpu, entries), = data["cpus"].items()
    data["cpus"] = {"znver9:avx512f": entries}  # same shapes, another CPU
    private_cache.parent.mkdir()
    private_cache.write_text(json.dumps(data))
    _default_schedules_only(monkeypatch)
    again = _tuned(path, tmp_path / "b.so")
    assert again.report["tuning"]["searched"] == len(entries)
    assert set(json.loads(private_cache.read_text())["cpus"]) == {"znver9:avx512f", cpu}  # both kept


def test_candidates_are_timed_on_the_threads_the_artifact_runs_on(tmp_path, private_cache, model_file, monkeypatch):
    """With no thread variable set TVM takes half the logical CPUs, not what a loaded model runs
    on (one thread per core): the search sets the pool to the artifact's count while it times,
    restores the environment after, and files the schedules under that count, so a search on
    other threads does not reuse them."""
    path, _ = model_file
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _default_schedules_only(monkeypatch)
    seen, time_us = [], tuning._time_us

    def timed(kernel, inputs, budget_us=2000.0):
        seen.append(os.environ.get("TVM_NUM_THREADS"))
        return time_us(kernel, inputs, budget_us)

    monkeypatch.setattr(tuning, "_time_us", timed)
    first = _tuned(path, tmp_path / "a.so")
    cores = runtime.physical_cores()
    assert first.report["tuning"]["threads"] == cores and seen and set(seen) == {str(cores)}
    assert "TVM_NUM_THREADS" not in os.environ
    (cpu,) = json.loads(private_cache.read_text())["cpus"]
    assert cpu.endswith(f":{cores} threads")
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 1))  # what a user's pool setting says wins
    seen.clear()
    again = _tuned(path, tmp_path / "b.so")
    assert again.report["tuning"]["threads"] == cores + 1 and set(seen) == {str(cores + 1)}
    assert again.report["tuning"]["searched"] == len(again.report["tuning"]["shapes"])  # not the other count's
    assert len(json.loads(private_cache.read_text())["cpus"]) == 2


_DENSE = tuning._dense_problem


def _default_schedules_only(mp):
    """A search that times the default schedule only: these tests check what is cached and
    trusted, not which schedule wins."""
    mp.setattr(tuning, "_conv_candidates", lambda geo: [])
    mp.setattr(tuning, "_dense_problem", lambda m, n, k: (*_DENSE(m, n, k)[:2], []))


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory, model_file):
    """A cache file from a real (small) search, written once for the tests that spoil it."""
    path = tmp_path_factory.mktemp("good-cache") / "tuning.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tuning.CACHE_ENV, str(path))
        _default_schedules_only(mp)
        _tuned(model_file[0], path.parent / "a.so")
    return json.loads(path.read_text()), path.parent / "a.so"


@pytest.mark.parametrize("content", [
    "not json", json.dumps([1, 2]), json.dumps({"format": "csqc-tuning", "version": 99, "cpus": {}}), "\ud800",
])
def test_a_cache_that_is_not_a_tuning_file_is_ignored(private_cache, good_cache, content):
    (cpu, entries), = good_cache[0]["cpus"].items()
    private_cache.parent.mkdir()
    private_cache.write_text(content, errors="surrogatepass")
    assert TuningCache.load(private_cache, cpu).entries == {}
    private_cache.write_text(json.dumps(good_cache[0]))  # the same CPU's good file is read
    assert TuningCache.load(private_cache, cpu).entries == entries


def test_bad_cache_entries_are_searched_again_not_trusted(tmp_path, private_cache, good_cache, model_file,
                                                          monkeypatch):
    """The cache is a file anybody could have written: nothing in it reaches a kernel builder
    unchecked, and a bad entry costs a search, never a failed or wrong build. One compile with
    a different spoiled entry per layer shape; a cache that is not a tuning file at all costs
    the same (above: it loads empty)."""
    path, x = model_file
    data, built = json.loads(json.dumps(good_cache[0])), good_cache[1]
    (cpu, entries), = data["cpus"].items()
    convs, dense = sorted(k for k in entries if k.startswith("bpconv")), next(k for k in entries if k.startswith("bpdense"))
    spoiled = {convs[0]: {"knobs": {"unroll_everything": 1}}, convs[1]: {"knobs": {"conv_rows": 1 << 40}},
               dense: {"knobs": {"row_block": True}}}
    for key, edit in spoiled.items():
        entries[key].update(edit)
    entries["exec:" + dense] = good_cache[0]["cpus"][cpu][dense]  # a kind csqc does not have
    private_cache.parent.mkdir()
    private_cache.write_text(json.dumps(data))
    assert TuningCache.load(private_cache, cpu).entries.keys() == entries.keys() - {*spoiled, "exec:" + dense}
    _default_schedules_only(monkeypatch)
    again = _tuned(path, tmp_path / "b.so")
    searched = {s["key"] for s in again.report["tuning"]["shapes"] if s["source"] == "searched"}
    assert searched == set(spoiled)
    np.testing.assert_array_equal(runtime.load(tmp_path / "b.so")(x.numpy()), runtime.load(built)(x.numpy()))


def test_cli_tune_reports_and_refuses_what_it_cannot_time(tmp_path, private_cache, small_search, model_file):
    path, _ = model_file
    result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "a.so"), "--tune"])
    assert result.exit_code == 0, result.output
    assert "tuned" in result.output and str(private_cache) in result.output
    for args in (["--target", "onnx"], ["--target", "cuda"], ["--mcpu", "cascadelake"]):
        out = tmp_path / "x.out"
        result = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--tune", *args])
        assert result.exit_code == 2 and "--tune" in result.output and not out.exists(), result.output


def test_conv_candidates_include_the_rows_that_compute_fewest_positions():
    # ResNet-18's 56x56 3x3 conv: 14 rows (4 tasks a channel block) besides tasks of ~128 / ~512 positions
    geo = conv_geometry((1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1)
    rows = {c["conv_rows"] for c in tuning._conv_candidates(geo)
            if c["conv_form"] == "pixels" and (c["conv_channels"], c["conv_vectors"]) == (8, 2)}
    assert rows == {2, 9, kernels.task_rows(geo, 58, 2, 8)} and kernels.task_rows(geo, 58, 2, 8) == 14
