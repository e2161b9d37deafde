"""CSQ training at scale: torchrun data-parallel, checkpoint/resume, ``csqc train --data``.

The torchrun tests start two real gloo processes (``python -m torch.distributed.run``) on short
runs of tiny models; resume equality runs in this process on one thread.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import csqc
from csqc.data import load_digits_split
from csqc.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def _tiny_csq_model(seed: int = 0, warm_up: int = 0) -> nn.Module:
    """A converted 64-16-10 MLP with BatchNorm (buffers) and 4-bit activations, after ``warm_up``
    float epochs (data-parallel too under torchrun)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    if warm_up:
        csqc.train_float(net, load_digits_split(), epochs=warm_up, batch_size=128)
    return csqc.convert(net, n_bits=6, act_bits=4)


def _train(model, digits, **kw):
    return csqc.train_csq(model, digits, epochs=4, target_bits=3.0, batch_size=128, **kw)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Interrupted(Exception):
    pass


def test_resume_mid_run_reaches_the_uninterrupted_result(digits, tmp_path, one_thread):
    start = _tiny_csq_model()
    whole = copy.deepcopy(start)
    accuracy, dropped = _train(whole, digits)

    def crash_in_third_epoch(epoch, _stats):
        if epoch == 2:
            raise _Interrupted

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Interrupted):
        _train(copy.deepcopy(start), digits, checkpoint=ckpt, checkpoint_every=2, on_epoch=crash_in_third_epoch)
    with zipfile.ZipFile(ckpt) as z:
        assert json.loads(z.read("checkpoint.json"))["epoch"] == 2  # written after 2 epochs, not 3
    resumed = copy.deepcopy(_tiny_csq_model(seed=1))  # other weights: the checkpoint must replace them all
    epochs_seen = []
    resumed_accuracy, resumed_dropped = _train(resumed, digits, resume=ckpt,
                                               on_epoch=lambda e, _: epochs_seen.append(e))
    assert epochs_seen == [2, 3]
    assert (resumed_accuracy, resumed_dropped) == (accuracy, dropped)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [m.active_mask for _, m in csqc.layers.csq_layers(whole)] == \
        [m.active_mask for _, m in csqc.layers.csq_layers(resumed)]


@pytest.fixture(scope="module")
def checkpoint_file(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    csqc.train_csq(_tiny_csq_model(), digits, epochs=1, target_bits=3.0, batch_size=256, checkpoint=path)
    return path


def _resume(path, digits, model=None, **kw):
    settings = dict(epochs=1, target_bits=3.0, batch_size=256) | kw
    return csqc.train_csq(model or _tiny_csq_model(), digits, resume=path, **settings)


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_training(digits, tmp_path):
    with pytest.raises(BadInput, match="checkpoint"):
        csqc.train_csq(_tiny_csq_model(), digits, epochs=1, checkpoint=tmp_path / "no" / "such" / "run.ckpt",
                       on_epoch=lambda *_: pytest.fail("trained before checking the checkpoint path"))


def test_resume_refuses_another_runs_settings(checkpoint_file, digits):
    with pytest.raises(BadInput, match=r"written by a run with target_bits=3.0, this run has target_bits=2.0"):
        _resume(checkpoint_file, digits, target_bits=2.0)


def test_resume_refuses_another_models_checkpoint(checkpoint_file, digits):
    other = csqc.convert(nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)), n_bits=6, act_bits=4)
    with pytest.raises(BadInput, match=r"tensor 'model\.0\.pweight' is float32\[16, 64, 6\], the model expects"):
        _resume(checkpoint_file, digits, model=other)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def test_damaged_checkpoints_are_one_line_bad_input(checkpoint_file, digits, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint_file.read_bytes()[:-300])
    with pytest.raises(BadInput, match="damaged"):
        _resume(truncated, digits)

    def bad_epoch(members):
        meta = json.loads(members["checkpoint.json"])
        members["checkpoint.json"] = json.dumps(meta | {"epoch": 7}).encode()

    with pytest.raises(BadInput, match="epoch 7 is not a number of finished epochs"):
        _resume(_rewrite(checkpoint_file, tmp_path / "epoch.ckpt", bad_epoch), digits)

    def pickled_tensor(members):  # an object array would need pickle to read: refused before numpy sees it
        import io
        buf = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(members["tensors.npz"])) as src, zipfile.ZipFile(buf, "w") as dst:
            for name in src.namelist():
                data = src.read(name)
                if name == "rng.torch.npy":
                    member = io.BytesIO()
                    np.save(member, np.array([object()], dtype=object), allow_pickle=True)
                    data = member.getvalue()
                dst.writestr(name, data)
        members["tensors.npz"] = buf.getvalue()

    with pytest.raises(BadInput, match="rng.torch"):
        _resume(_rewrite(checkpoint_file, tmp_path / "pickle.ckpt", pickled_tensor), digits)


def _csqc(*args, cwd: Path, monkeypatch):
    """``csqc ARGS`` in this process (fast), in ``cwd``."""
    from click.testing import CliRunner

    from csqc.cli import cli

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated"])
def test_cli_resume_from_a_foreign_file_exits_2_in_one_line(tmp_path, content, monkeypatch):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    done = _csqc("train", "digits-mlp", "-o", "m.pt", "--resume", str(bad), cwd=tmp_path, monkeypatch=monkeypatch)
    assert done.exit_code == 2, done.output
    assert "not a csqc training checkpoint" in done.output
    assert len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def _torchrun(*args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(EXAMPLES), str(REPO / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


DDP_SCRIPT = r'''
import json, sys
import torch
import csqc
from csqc.cli import cli
from csqc.data import load_digits_split
from csqc.distributed import Parallel
from test_distributed import CSQ_RUN, _tiny_csq_model

torch.set_num_threads(1)
model = _tiny_csq_model(warm_up=4)
accuracy, dropped = csqc.train_csq(model, load_digits_split(), **CSQ_RUN)
parallel = Parallel.from_env()
mine = [torch.tensor([float(m.active_mask)]) for _, m in csqc.layers.csq_layers(model)]
mine += [m.q.float() for _, m in csqc.layers.csq_layers(model)] + [p.detach() for p in model.parameters()]
mine += [b for b in model.buffers() if b.is_floating_point()]
for tensor in mine:  # every rank ends with the same masks, bits, weights and BatchNorm statistics
    gathered = parallel.gather(tensor)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree"
if parallel.is_main:
    json.dump({"world_size": parallel.world_size, "accuracy": accuracy, "avg_bits": csqc.layers.average_bits(model),
               "masks": [m.active_mask for _, m in csqc.layers.csq_layers(model)]}, open(sys.argv[1], "w"))
# the command line in the same processes (one torchrun start instead of two): --data, rank 0 reports
cli.main(sys.argv[2:], standalone_mode=False)
'''
CSQ_RUN = dict(epochs=3, target_bits=3.0, batch_size=128)


def test_torchrun_trains_data_parallel_with_identical_ranks(digits, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    done = _torchrun(str(script), str(tmp_path / "api.json"),
                     "train", "--data", "train_your_data:synthetic", "--float-epochs", "3", "--epochs", "2",
                     "--target-bits", "4", "-o", "tiny.pt", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the API run: ranks agreed (asserted in the script); one process with the same global batch
    # gives the same bit budget and accuracy within 3 points (each process normalises its half of
    # a batch with its own BatchNorm statistics and activation scales, so weights differ slightly)
    api = json.loads((tmp_path / "api.json").read_text())
    model = _tiny_csq_model(warm_up=4)
    accuracy, _ = csqc.train_csq(model, digits, **CSQ_RUN)
    assert api["world_size"] == 2
    assert api["avg_bits"] == pytest.approx(csqc.layers.average_bits(model)) and api["avg_bits"] <= 3.0
    assert abs(api["accuracy"] - accuracy) <= 0.03 and accuracy > 0.8
    # the command line: --data on synthetic images, only rank 0 prints and writes
    report = json.loads(done.stdout)  # exactly one JSON document
    assert report["ok"] and report["world_size"] == 2 and report["global_batch_size"] == 64
    assert report["recipe"] == "train_your_data:synthetic"
    assert report["avg_bits"] <= 4.0 and report["test_accuracy"] > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.json", "ddp_train.py", "tiny.pt"]
    assert csqc.load(tmp_path / "tiny.pt").manifest["inputs"][0]["shape"][1:] == [3, 16, 16]


EXIT_SCRIPT = r'''
import torch
from torch import distributed as dist
from csqc.distributed import Parallel

parallel = Parallel.from_env()
for _ in range(50):  # fire and forget: gloo's worker threads free these tensors as they finish
    dist.all_reduce(torch.ones(64), async_op=True)
parallel.sum(1.0)  # then exit at once, as a rank with nothing left to do
'''


def test_ranks_that_exit_right_after_a_collective_exit_cleanly(tmp_path):
    # Without csqc leaving the group at exit, a gloo worker freeing a tensor during interpreter
    # shutdown aborted the process ("terminate called without an active exception") in about
    # half of these runs, and CI's data-parallel training run failed on it.
    script = tmp_path / "exit_after_collective.py"
    script.write_text(EXIT_SCRIPT)
    for _ in range(4):
        done = _torchrun(str(script), cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_data_factory_that_returns_something_else_is_bad_input(tmp_path, monkeypatch):
    (tmp_path / "wrong_factory.py").write_text("def make():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    done = _csqc("train", "--data", "wrong_factory:make", "-o", "m.pt", cwd=tmp_path, monkeypatch=monkeypatch)
    assert done.exit_code == 2
    assert "must return (train_loader, eval_loader, float_model), got int" in done.output
    done = _csqc("train", "digits-mlp", "--data", "wrong_factory:make", "-o", "m.pt", cwd=tmp_path,
                 monkeypatch=monkeypatch)
    assert done.exit_code == 2 and "not both" in done.output
    assert not (tmp_path / "m.pt").exists()


def test_checkpoints_keep_the_zero_points_of_asymmetric_quantizers(tmp_path):
    """A calibrated asymmetric quantizer's range and zero point survive save and resume; a zero
    point outside 0..L is refused in one line."""
    from csqc.checkpoint import load_checkpoint, save_checkpoint
    from csqc.layers import ActQuant

    def model():
        torch.manual_seed(0)
        return csqc.convert(nn.Sequential(nn.Linear(8, 4)), n_bits=4, act_bits=8, act_mode="static",
                            act_symmetric=False, quantize_first_input=True)

    written = model()
    (quant,) = [m for m in written.modules() if isinstance(m, ActQuant)]
    quant.static_scale, quant.zero_point = 2.5, 37
    state = dict(settings={"epochs": 3}, optimizers={}, rng=np.random.default_rng(0))
    save_checkpoint(tmp_path / "run.ckpt", epoch=1, model=written, **state)
    resumed = model()
    assert load_checkpoint(tmp_path / "run.ckpt", model=resumed, **state) == 1
    (back,) = [m for m in resumed.modules() if isinstance(m, ActQuant)]
    assert (back.static_scale, back.zero_point) == (2.5, 37)

    def bad_zero_point(members):
        meta = json.loads(members["checkpoint.json"])
        meta["act_zero_points"] = {name: 256 for name in meta["act_zero_points"]}
        members["checkpoint.json"] = json.dumps(meta).encode()

    bad = _rewrite(tmp_path / "run.ckpt", tmp_path / "bad.ckpt", bad_zero_point)
    with pytest.raises(BadInput, match=r"zero point of .* is 256, not an integer in 0\.\.255"):
        load_checkpoint(bad, model=model(), **state)
