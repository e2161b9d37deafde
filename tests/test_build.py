"""Building a plan (``targets/tvm/build.py``): its functions compiled as several modules on
threads side by side, linked into one library whose whole-model function reaches every kernel."""
import hashlib
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import csqc
from csqc import runtime
from csqc.cli import cli
from csqc.errors import BadInput, CompileError
from csqc.targets.tvm import build
from csqc.targets.tvm.lower import Plan
from csqc.targets.tvm.whole_model import WHOLE_MODEL_FUNC

from .test_whole_model_function import _by_steps


@pytest.fixture(scope="module")
def repeated_layers(tmp_path_factory):
    """Three convolutions of one shape: one kernel (and one epilogue) serves several steps."""
    torch.manual_seed(3)
    convs = [torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(),
                              *(m for conv in convs for m in (conv, torch.nn.ReLU())),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    model = csqc.finalize(csqc.convert(net.eval(), n_bits=3, act_bits=4))
    return csqc.save(model, tmp_path_factory.mktemp("build") / "repeated.pt", torch.zeros(1, 3, 6, 6))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_steps_that_share_a_kernel_each_reach_it_through_the_link(repeated_layers, tmp_path):
    """Each call site of the whole-model function is its own symbol: a kernel called from several
    steps (a name TVM would declare again, and LLVM rename to an undefined one) runs every time."""
    path = csqc.compile(csqc.load(repeated_layers), "llvm", tmp_path / "m.so").output
    model = runtime.load(path)
    calls = Counter(step["func"] for step in model.plan["steps"])
    assert max(calls.values()) >= 3 and model.plan["entry"]["func"] == WHOLE_MODEL_FUNC
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6), dtype=np.float32)
    np.testing.assert_array_equal(model(x), _by_steps(runtime.load(path), x))
    assert csqc.verify(csqc.load(repeated_layers), samples=2, artifact=str(path)).ok


def test_the_library_is_the_same_bytes_on_one_build_thread_or_several(repeated_layers, tmp_path, monkeypatch):
    digests = set()
    for threads in ("1", "3"):
        monkeypatch.setenv(build.BUILD_THREADS_ENV, threads)
        digests.add(_sha(csqc.compile(csqc.load(repeated_layers), "llvm", tmp_path / f"t{threads}.so").output))
    assert len(digests) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_a_bad_thread_count_is_refused_before_building(repeated_layers, tmp_path, monkeypatch, value):
    monkeypatch.setenv(build.BUILD_THREADS_ENV, value)
    with pytest.raises(BadInput, match=build.BUILD_THREADS_ENV):
        build.build_threads()
    result = CliRunner().invoke(cli, ["compile", str(repeated_layers), "-o", str(tmp_path / "m.so")])
    assert result.exit_code == 2 and build.BUILD_THREADS_ENV in result.output
    assert not list(tmp_path.iterdir())


def test_the_thread_count_comes_from_the_environment_or_the_cpus(monkeypatch):
    monkeypatch.setenv(build.BUILD_THREADS_ENV, " 3 ")
    assert build.build_threads() == 3
    monkeypatch.delenv(build.BUILD_THREADS_ENV)
    assert build.build_threads() >= 1


@settings(max_examples=50, deadline=None)
@given(kernels=st.integers(0, 40), whole_model=st.booleans())
def test_every_function_is_in_one_module_and_the_whole_model_function_alone_first(kernels, whole_model):
    funcs = {f"k{i}_conv": None for i in range(kernels)} | ({WHOLE_MODEL_FUNC: None} if whole_model else {})
    parts = build._parts(funcs)
    assert sorted(name for part in parts for name in part) == sorted(funcs)
    assert all(0 < len(part) <= build.KERNELS_PER_MODULE for part in parts)
    if whole_model:
        assert parts[0] == [WHOLE_MODEL_FUNC]


def test_side_by_side_keeps_the_order_and_raises_the_first_failure_after_the_work_in_flight():
    assert build.side_by_side(lambda i: i * i, range(7), 3) == [i * i for i in range(7)]
    started, finished = threading.Event(), threading.Event()

    def work(i):
        if i == 0:
            started.wait(10)
            raise ValueError("part 0 failed")
        started.set()
        time.sleep(0.2)  # in flight when part 0 fails: waited for, so nothing outlives the call
        finished.set()

    with pytest.raises(ValueError, match="part 0"):
        build.side_by_side(work, range(2), 2)
    assert finished.is_set()


def test_a_call_to_a_kernel_the_plan_lacks_is_a_compile_error():
    plan = Plan(calls={"csqc_step0": "k7_missing"})
    with pytest.raises(CompileError, match="k7_missing"):
        build.build_plan(plan, "llvm", threads=1)


def test_an_interrupt_while_building_leaves_nothing_behind(repeated_layers, tmp_path, monkeypatch):
    """Ctrl-C reaching one module's build: the other builds stop or finish, no file is written."""
    import tvm

    real_compile = tvm.compile

    def compile_or_interrupt(mod, *args, **kwargs):
        if WHOLE_MODEL_FUNC in [gv.name_hint for gv in mod.get_global_vars()]:
            raise KeyboardInterrupt
        return real_compile(mod, *args, **kwargs)

    monkeypatch.setattr(tvm, "compile", compile_or_interrupt)
    monkeypatch.setenv(build.BUILD_THREADS_ENV, "2")
    with pytest.raises(KeyboardInterrupt):
        csqc.compile(csqc.load(repeated_layers), "llvm", tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []
