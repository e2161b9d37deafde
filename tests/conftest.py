"""Shared fixtures: trained digits models are built once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")
# torch's OpenMP threads otherwise spin after every op and take the cores from TVM's kernels and
# from the other test worker (pytest-xdist); set before torch loads (csqc.bench does the same)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import tvm  # noqa: F401  (imported before pytest's faulthandler is enabled: see below)

torch.set_num_threads(2)

# TVM installs its own SIGSEGV handler on import; it prints a native backtrace to file
# descriptor 2, which pytest captures during a test and loses when the process dies. Imported
# here, before the faulthandler plugin's pytest_configure, TVM's handler is the one replaced: a
# crash in a kernel or a library then names its test and Python frames on the real stderr.


@pytest.fixture(autouse=True)
def poisoned_output_memory(monkeypatch):
    """Every test runs artifacts with their outputs written in place, whatever their size, into
    memory that starts as 0xFF bytes (NaN floats, -1 integers), not whatever the allocator
    returns: a kernel that leaves an output element unwritten then fails the test that ran it,
    every time (``csqc.runtime`` hands that memory to the kernels)."""
    from csqc import runtime
    from csqc.targets.tvm import memory as memory_plan

    monkeypatch.setattr(runtime, "_FRESH_OUTPUT_MIN_BYTES", 0)
    # every plan shares its temporaries' memory (pools start poisoned too): a kernel reading a
    # buffer before writing it reads another layer's values and fails its exactness test
    monkeypatch.setattr(memory_plan, "PRIVATE_MEMORY_MAX_BYTES", 0)

    fresh = runtime._output_memory

    def poisoned(nbytes: int):
        memory = fresh(nbytes)
        memory.fill(0xFF)
        return memory

    monkeypatch.setattr(runtime, "_output_memory", poisoned)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(recipe)`` -> (finalized model, TrainResult, example input, saved path)."""
    from csqc import save, train_recipe

    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            model, result, example = train_recipe(recipe)
            path = tmp_path_factory.mktemp("models") / f"{recipe}.pt"
            save(model, path, example)
            cache[recipe] = (model, result, example, path)
        return cache[recipe]

    return get


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory):
    """A saved 8-6-4 CSQ MLP (4-bit weights and activations, batch 2): quick to compile."""
    import csqc

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    model = csqc.finalize(csqc.convert(net, n_bits=4, act_bits=4))
    return csqc.save(model, tmp_path_factory.mktemp("tiny") / "mlp.pt", torch.zeros(2, 8))


@pytest.fixture(scope="session")
def tiny_mlp_artifact(tiny_mlp, tmp_path_factory):
    """``tiny_mlp`` compiled for this CPU (llvm); tests copy it before editing."""
    import csqc

    return csqc.compile(csqc.load(tiny_mlp), "llvm", tmp_path_factory.mktemp("tiny-art") / "mlp.so").output


class TwoInTwoOut(torch.nn.Module):
    """Two inputs, two outputs, one of them exp of a layer's output (it overflows on large inputs)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(12, 8)

    def forward(self, x, h):
        y = self.a(x) + self.b(h)
        return y, torch.exp(y)


@pytest.fixture(scope="session")
def two_io_artifact(tmp_path_factory):
    """A saved ``TwoInTwoOut`` CSQ model (4-bit, batch 1) compiled for this CPU (llvm)."""
    import csqc

    torch.manual_seed(3)
    model = csqc.finalize(csqc.convert(TwoInTwoOut().eval(), n_bits=4, act_bits=4))
    folder = tmp_path_factory.mktemp("twoio")
    path = csqc.save(model, folder / "m.pt", (torch.zeros(1, 16), torch.zeros(1, 12)))
    return csqc.compile(csqc.load(path), "llvm", folder / "m.so").output
