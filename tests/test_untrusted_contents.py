"""What an untrusted file holds is data, shown and checked as such: ONNX files do not reach other
files (external data), their metadata and graphs are refused by name (exit 2, not an internal
error), names from any file print as they are (no rich markup, no terminal escapes), a model file
whose program does not run at its shapes is bad input without torch's traceback, and a training
checkpoint of NaN weights is refused rather than resumed."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import csqc
from csqc.errors import BadInput
from csqc.targets.onnx.reference import LAYERS_KEY
from csqc.targets.onnx.runner import load_onnx
from csqc.terminal import plain


@pytest.fixture(scope="module")
def reference_onnx(tiny_mlp, tmp_path_factory):
    return csqc.compile(csqc.load(tiny_mlp), "onnx", tmp_path_factory.mktemp("onnx") / "mlp.onnx").output


def _csqc(*args):
    env = {**os.environ, "COLUMNS": "1000"}  # no wrapped lines
    return subprocess.run([sys.executable, "-m", "csqc", *map(str, args)], capture_output=True, text=True, env=env)


def test_onnx_external_data_is_refused_not_read(reference_onnx, tmp_path):
    model = onnx.load(str(reference_onnx))
    init = model.graph.initializer[0]
    (tmp_path / "secret.txt").write_bytes(b"\0" * numpy_helper.to_array(init).nbytes)
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="secret.txt")
    onnx.save(model, str(tmp_path / "ext.onnx"))
    with pytest.raises(BadInput, match=f"tensor '{init.name}' is stored in another file"):
        load_onnx(tmp_path / "ext.onnx")


@pytest.mark.parametrize("value, message", [
    ("{not json", "metadata is not JSON"),
    ("[1, 2]", "not a table of layers"),
    ("[" * 100_000, "metadata is not JSON"),
    (json.dumps([{"name": "a", "input": "x", "out": "y", "acc_shift": 10**30}]), "not a table of layers"),
])
def test_malformed_onnx_layer_metadata_is_bad_input(tiny_mlp, reference_onnx, tmp_path, value, message):
    model = onnx.load(str(reference_onnx))
    next(p for p in model.metadata_props if p.key == LAYERS_KEY).value = value
    onnx.save(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(BadInput, match=message):
        csqc.verify(csqc.load(tiny_mlp), artifact=str(tmp_path / "edited.onnx"))


def test_a_graph_onnx_runtime_refuses_is_bad_input(tiny_mlp, reference_onnx, tmp_path):
    model = onnx.load(str(reference_onnx))
    model.graph.input[0].type.tensor_type.elem_type = 999
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(BadInput, match="ONNX Runtime cannot load it"):
        csqc.verify(csqc.load(tiny_mlp), artifact=str(tmp_path / "odd.onnx"))
    shown = _csqc("inspect", tmp_path / "odd.onnx")
    assert shown.returncode == 0 and "unknown ONNX type 999" in shown.stdout


def test_names_from_files_print_as_they_are(reference_onnx, tmp_path):
    assert plain("a[/bold]\x1b]0;title\x07") == "a\\[/bold]?]0;title?"
    model = onnx.load(str(reference_onnx))
    model.graph.name = "m [link=https://example.invalid]x[/link] [/bold]\x1b[2J"
    onnx.save(model, str(tmp_path / "named.onnx"))
    shown = _csqc("inspect", tmp_path / "named.onnx")
    assert shown.returncode == 0, shown.stderr
    assert "[link=https://example.invalid]x[/link] [/bold]?[2J" in shown.stdout
    assert "\x1b" not in shown.stdout


def test_a_model_file_whose_program_does_not_run_at_its_shapes_is_bad_input(tiny_mlp, tmp_path):
    """Re-capture failing on a loaded file is the file's fault (exit 2), in one line."""
    shown = _csqc("compile", tiny_mlp, "--target", "onnx", "--batch", "3", "-o", tmp_path / "m.onnx")
    assert shown.returncode == 0, shown.stderr  # (another batch of a symbolic-batch program is fine)

    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.reshape(2, 8))  # the batch is fixed by the model itself

    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(FixedBatch(), n_bits=4, act_bits=4))
    path = csqc.save(model, tmp_path / "fixed.pt", torch.zeros(2, 8))
    out = _csqc("compile", path, "--target", "onnx", "--batch", "3", "-o", tmp_path / "f.onnx")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "takes a batch of 2 only" in out.stderr or "does not run at input shapes" in out.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_a_training_checkpoint_of_nan_weights_is_refused(tmp_path):
    from csqc.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "ok.ckpt", epoch=1, settings={"epochs": 2}, model=model, optimizers={"sgd": opt},
                    rng=np.random.default_rng(0))
    assert load_checkpoint(tmp_path / "ok.ckpt", settings={"epochs": 2}, model=model, optimizers={"sgd": opt},
                           rng=np.random.default_rng(0)) == 1
    with torch.no_grad():
        model.bias[0] = float("nan")
    save_checkpoint(tmp_path / "nan.ckpt", epoch=1, settings={"epochs": 2}, model=model, optimizers={"sgd": opt},
                    rng=np.random.default_rng(0))
    with pytest.raises(BadInput, match="tensor 'model.bias' holds NaN or infinite values"):
        load_checkpoint(tmp_path / "nan.ckpt", settings={"epochs": 2}, model=torch.nn.Linear(4, 2), optimizers={"sgd": opt},
                        rng=np.random.default_rng(0))


def test_float64_inputs_past_float32_are_refused_without_numpys_warning(tiny_mlp, tiny_mlp_artifact, tmp_path):
    np.savez(tmp_path / "big.npz", input0=np.full((2, 8), 1e300))
    for args in (("run", tiny_mlp_artifact, "--input", tmp_path / "big.npz"),
                 ("verify", tiny_mlp, "--inputs", tmp_path / "big.npz")):
        out = _csqc(*args)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            "error: input input0 contains NaN or infinity"], out.stderr
