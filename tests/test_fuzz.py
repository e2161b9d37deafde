"""Fuzzing the loaders and the CLI: every damaged input ends in a CsqcError, never a crash.

A short, seeded budget (about 1,000 cases in all); ``python -m csqc.fuzz --cases 10000`` runs
the long one.
"""
import pickle

import pytest

import csqc
from csqc import fuzz
from csqc.errors import BadInput

SEED = 0
BUDGET = {"ir": 400, "model": 175, "program": 100, "artifact": 250, "cli": 175}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return fuzz.build_env(tmp_path_factory.mktemp("fuzz"))


def _describe(report: fuzz.TargetReport) -> str:
    return "\n".join(f"{f.error} at {f.where} ({f.count} cases); made by: {'; '.join(f.case.steps)}\n{f.trace}"
                     for f in report.findings.values())


@pytest.mark.parametrize("target", list(BUDGET))
def test_damaged_inputs_end_in_csqc_errors(env, target, tmp_path):
    report = fuzz.run_target(target, BUDGET[target], env, seed=SEED, findings_dir=tmp_path)
    assert report.cases == BUDGET[target]
    assert not report.findings, _describe(report)
    assert not env.marker.exists()


def test_seeded_runs_draw_the_same_cases(env):
    drawn = {0: [], 1: []}
    for run in drawn:
        fuzz.run_target("ir", 15, env, seed=SEED, on_case=lambda _name, case, run=run: drawn[run].append(case.steps))
    assert drawn[0] == drawn[1]


def test_a_crash_is_reported_with_a_replayable_case(env, tmp_path, monkeypatch):
    def crashing_loader(path):
        raise KeyError("boom")

    monkeypatch.setattr(fuzz, "fuzz_ir", crashing_loader)
    report = fuzz.run_target("ir", 5, env, seed=SEED, findings_dir=tmp_path)
    assert report.cases == 5 and report.outcomes == {"crashed": 5}
    (finding,) = report.findings.values()
    assert finding.error == "KeyError: 'boom'" and finding.count == 5
    monkeypatch.undo()
    assert fuzz.replay(finding.saved) == 0  # the real loader does not crash on it


def test_a_cli_internal_error_is_a_crash(env, monkeypatch):
    import csqc.compiler

    fuzz._write_cli_files(env)
    assert fuzz.fuzz_cli(["inspect", "model.pt", "--json"], env.scratch) == "exit 0"
    monkeypatch.setattr(csqc.compiler, "inspect", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(fuzz.CliCrash, match="internal error: ZeroDivisionError"):
        fuzz.fuzz_cli(["inspect", "model.pt"], env.scratch)
    with pytest.raises(ZeroDivisionError):  # --debug lets it through: the fuzzer re-raises it
        fuzz.fuzz_cli(["--debug", "inspect", "model.pt"], env.scratch)


def _pickle_carriers(env) -> dict[str, bytes]:
    """Every way the fuzzer smuggles the marker payload into a file."""
    payload = fuzz.marker_pickle(env.marker)
    object_npy = env.foreign["object-npy"]
    return {
        "raw pickle": payload,
        "torch.save layout": env.foreign["torch-zip-pickle"],
        "torch checkpoint": env.foreign["torch-checkpoint-pickle"],
        "object .npy": object_npy,
        "model with pickled tensors": fuzz._zip_bytes(
            [(n, fuzz._zip_bytes([("state_dict/0.bias.npy", object_npy)]) if n.endswith(".npz") else d)
             for n, d in fuzz._zip_members(env.model)]),
        "IR with pickled params": fuzz._zip_bytes(
            [(n, fuzz._zip_bytes([("0.mult.npy", object_npy)]) if n.endswith(".npz") else d)
             for n, d in fuzz._zip_members(env.irs[-1])]),
        "model with a data.pkl": fuzz._zip_bytes(fuzz._zip_members(env.model)[1:] + [("data.pkl", payload)]),
    }


def test_pickle_payloads_never_run(env, tmp_path):
    from csqc import runtime
    from csqc.ir import load_graph

    assert not env.marker.exists()
    pickle.loads(fuzz.marker_pickle(tmp_path / "proof"))  # the payload does run when unpickled
    assert (tmp_path / "proof").exists()
    loaders = {"model": csqc.load, "ir": load_graph, "artifact": runtime.load,
               "reference checkpoint": lambda p: csqc.load(p, model_factory="torch.nn:Identity", input_shape=(1, 8))}
    if env.artifact is not None:
        loaders["artifact with pickled weights"] = runtime.load
    for kind, data in _pickle_carriers(env).items():
        for name, load in loaders.items():
            path = tmp_path / f"{name}-{kind}.bin".replace(" ", "-")
            if name == "artifact with pickled weights":
                members = [(n, fuzz._zip_bytes([("0.mult.npy", data)]) if n == "weights.npz" else d)
                           for n, d in fuzz._zip_members(env.artifact[env.library_size:])]
                path.write_bytes(env.artifact[:env.library_size] + fuzz._zip_bytes(members))
            else:
                path.write_bytes(data)
            with pytest.raises(BadInput):
                load(path)
            assert not env.marker.exists(), f"{name} loader ran the pickle in {kind}"


def test_cli_refuses_pickled_inputs(env):
    fuzz._write_cli_files(env)
    for args in (["run", "model.so", "-i", "evil.npy"], ["verify", "model.pt", "--inputs", "evil.npz"],
                 ["compile", "model.pt", "-t", "onnx", "--onnx-form", "deploy", "--calibration", "evil.npz", "-o", "x.onnx"],
                 ["inspect", "evil-checkpoint.pt", "--model-factory", "torch.nn:Identity", "--input-shape", "1,8"]):
        if args[0] == "run" and env.artifact is None:
            continue
        assert fuzz.fuzz_cli(args, env.scratch) == "exit 2", args
    assert not env.marker.exists()


def test_program_payloads_would_run_if_evaluated(tmp_path):
    exec(fuzz._code(tmp_path / "proof"))  # what the program target writes into guards and sizes
    assert (tmp_path / "proof").exists()
