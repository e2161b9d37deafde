"""The host CPU target follows what the OS lists, not only LLVM's CPU name (targets/llvm/host.py), and
an artifact built for instruction sets a CPU lacks is refused there with a clear error.

Seen here: an Intel Xeon VM that LLVM names ``emeraldrapids`` whose Linux lists no AMX (the default
build put layers on tiles, and the runtime then refused the artifact it had just built), and
another named ``rocketlake`` that lists AMX."""
import json

import numpy as np
import pytest
import torch
import tvm

import csqc
from csqc import runtime
from cpus import AVX2_CPU, needs_avx512
from csqc.targets.llvm import amx, host, kernels


def _flags_of(cpu: str) -> frozenset[str]:
    """/proc/cpuinfo flags of a machine with exactly LLVM CPU ``cpu``'s instruction sets."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    return frozenset(host.ISA_FEATURES[f] for f in host.isa_features(target))


@pytest.fixture
def pretend_host(monkeypatch):
    """Make this machine look like one LLVM names ``cpu`` with the flags ``flags`` listed."""
    def pretend(cpu: str, flags: frozenset[str] | None):
        monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda: cpu)
        monkeypatch.setattr(host, "host_flags", lambda: flags)
    return pretend


def test_the_host_target_has_exactly_the_instruction_sets_the_os_lists():
    flags = host.host_flags()
    if flags is None:
        pytest.skip("this OS lists no CPU flags")
    have = set(host.isa_features(kernels.cpu_target()))
    assert have == {f for f, flag in host.ISA_FEATURES.items() if flag in flags}


def test_a_cpu_name_promising_tiles_the_vm_hides_gets_none(pretend_host):
    pretend_host("emeraldrapids", _flags_of("emeraldrapids") - {"amx_tile", "amx_int8", "amx_bf16"})
    target = kernels.cpu_target()
    assert target.attrs["mcpu"] == "emeraldrapids"
    assert not amx.target_has_amx(target) and not amx.host_has_amx()
    assert "avx512vnni" in host.isa_features(target)  # the rest of the name's sets stay


def test_a_cpu_name_missing_sets_the_os_lists_gets_them(pretend_host):
    pretend_host("rocketlake", _flags_of("rocketlake") | {"amx_tile", "amx_int8", "avx512_fp16"})
    target = kernels.cpu_target()
    assert amx.target_has_amx(target) and "avx512fp16" in host.isa_features(target)


def test_a_named_cpu_is_taken_as_named(pretend_host):
    pretend_host("emeraldrapids", frozenset())  # --mcpu builds for another machine: the host's flags do not matter
    assert amx.target_has_amx(kernels.cpu_target("sapphirerapids"))
    assert not amx.target_has_amx(kernels.cpu_target("icelake-server"))
    assert not amx.target_has_amx(kernels.cpu_target("sapphirerapids", ["-amx-tile"]))  # mattr overrides


def test_unreadable_flags_take_the_name_at_its_word(pretend_host):
    pretend_host("sapphirerapids", None)
    assert amx.target_has_amx(kernels.cpu_target()) and host.missing_on_host(["amx-tile"]) == []


def _linear(tmp_path):
    torch.manual_seed(3)
    model = csqc.convert(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval(),
                         n_bits=3, act_bits=4, quantize_first_input=True)
    x = torch.rand(2, 64)
    return csqc.load(csqc.save(csqc.finalize(model).eval(), tmp_path / "m.pt", x)), x


@pytest.mark.parametrize("cpu", [pytest.param("icelake-server", marks=needs_avx512), AVX2_CPU])
def test_an_artifact_records_the_instruction_sets_it_was_built_with(tmp_path, cpu):
    model, x = _linear(tmp_path)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu=cpu)
    m = runtime.load(art)
    features = host.isa_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    assert m.plan["target"]["features"] == features and "amx-tile" not in features
    assert ("avx512vnni" in features) == (cpu == "icelake-server") and "avx2" in features
    assert m(x.numpy()).shape == (2, 16)


def test_an_artifact_for_sets_this_cpu_lacks_is_refused_before_it_runs(tmp_path, monkeypatch):
    model, _ = _linear(tmp_path)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)  # this machine's own build loads here
    runtime.load(art)
    flags = host.host_flags()
    if flags is None:
        pytest.skip("this OS lists no CPU flags")
    # the same file on a CPU without AVX2 (every CPU csqc builds for here has it)
    monkeypatch.setattr(host, "host_flags", lambda: flags - {"avx2"})
    with pytest.raises(csqc.errors.BadInput, match="uses avx2, which this CPU lacks"):
        runtime.load(art)


@pytest.mark.parametrize("features", ["avx512vnni", [1], ["x" * 100]])
def test_a_plan_with_malformed_features_is_refused(tmp_path, features):
    from test_artifact_integrity import PLAN, WEIGHTS, _resealed, _split

    model, _ = _linear(tmp_path)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art)
    library, members = _split(art)
    plan = json.loads(members[PLAN])
    plan["target"]["features"] = features
    bad = tmp_path / "bad.so"
    bad.write_bytes(_resealed(library, json.dumps(plan).encode(), members[WEIGHTS]))
    with pytest.raises(csqc.errors.BadInput, match="features"):
        runtime.load(bad)


def test_cli_refuses_an_artifact_for_another_cpu_with_exit_code_2(tmp_path):
    """Where this CPU lacks a set another one has (AMX or AVX512-FP16 on the AMD and Intel machines
    here), a build for that CPU is refused with exit code 2, not run into SIGILL."""
    flags = host.host_flags()
    if flags is None:
        pytest.skip("this OS lists no CPU flags")
    cpu = next((c for c in ("graniterapids", "sapphirerapids", "znver5")
                if host.missing_on_host(host.isa_features(tvm.target.Target({"kind": "llvm", "mcpu": c})))), None)
    if cpu is None:
        pytest.skip("this CPU has every instruction set of the CPUs named here")
    from click.testing import CliRunner

    from csqc.cli import cli

    model, x = _linear(tmp_path)
    art = tmp_path / "m.so"
    csqc.compile(model, "llvm", art, mcpu=cpu)
    np.save(tmp_path / "x.npy", x.numpy())
    result = CliRunner().invoke(cli, ["run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 2 and "which this CPU lacks" in result.output, result.output
    assert not (tmp_path / "y.npy").exists()
