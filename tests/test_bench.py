"""Benchmark plumbing (not timings): baselines must not disturb each other in one process."""
import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from csqc.bench import _OrtRunner, _ort_session, _time_interleaved


def _matmul_model() -> bytes:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def test_ort_sessions_stop_spinning_unless_timed_alone():
    # a spinning ORT pool keeps both cores busy between runs and would slow whatever is timed next
    quiet = _ort_session(_matmul_model(), 2)
    assert quiet.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    spinning = _ort_session(_matmul_model(), 2, spinning=True)
    with pytest.raises(RuntimeError):  # not set: ORT's default, spinning between runs
        spinning.get_session_options().get_session_config_entry("session.force_spinning_stop")


def test_ort_runner_and_its_spinning_twin_compute_the_same():
    runner = _OrtRunner(_matmul_model(), ["x"], 1, "CPUExecutionProvider")
    x = np.ones((1, 4), np.float32)
    expected = x @ np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(runner(x), expected)
    np.testing.assert_array_equal(runner.spinning()(x), expected)


def test_interleaved_timing_gives_each_runtime_its_share_of_a_round():
    calls = {"fast": 0, "slow": 0}

    def make(key, seconds):
        def f():
            calls[key] += 1
            time.sleep(seconds)
        return f

    medians = _time_interleaved({"fast": make("fast", 0.001), "slow": make("slow", 0.004)}, rounds=2,
                                round_seconds=0.02)
    assert medians["slow"] > medians["fast"] > 900
    # turns are sized by time: the fast runtime makes about 4x as many calls as the slow one
    assert calls["fast"] > 2.5 * calls["slow"]
