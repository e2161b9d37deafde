"""Import of CSQ reference checkpoints: every key layout, biases, dead layers, float activations.

Checkpoints come from ``csq_reference_style`` (an independent implementation of the reference
math in tests/), so they carry every key the reference writes (init_*, exps, bexps, ...).
"""
import pytest
import torch

import csq_reference_style as R
import csqc
from csqc.reference import checkpoint_state_dict, load_reference_state, reference_bits, resolve_factory
from csqc.models import reference as mirrors

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trained(cls=R.ResNet, seed=0, dead_layer=None, **kwargs):
    net = cls(**kwargs)
    R.randomize_trained(net, seed=seed, dead_layer=dead_layer)
    return net


def _reference_checkpoint(path, act_bit=4, seed=0):
    """A full-width ResNet-20 checkpoint with every reference key, for
    ``csqc.models.reference:resnet20_4bit`` (test_verify and test_llvm_target use it)."""
    sd = _trained(act_bit=act_bit, seed=seed).state_dict()
    torch.save({"model": sd, "epoch": 7, "valid_acc": 0.9}, path)
    return sd


def _expected(net, x=X):
    with torch.no_grad():
        return net(x)


def _load(path, factory, shape=(2, 3, 32, 32)):
    return csqc.load(path, model_factory=factory, input_shape=shape)


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare", "dataparallel", "ddp-in-model"])
def test_every_checkpoint_layout_loads_to_the_reference_forward(tmp_path, layout):
    net = _trained(act_bit=4, width=4)
    sd = net.state_dict()
    wrapped = {"module." + k: v for k, v in sd.items()}
    ckpt = {"model": {"model": sd, "epoch": 3, "valid_acc": 0.9}, "state_dict": {"state_dict": sd, "epoch": 1},
            "bare": sd, "dataparallel": wrapped, "ddp-in-model": {"model": wrapped}}[layout]
    torch.save(ckpt, tmp_path / "ckpt.pth")
    read = checkpoint_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True))
    assert set(read) == set(sd) and any(k.endswith("init_pweight") for k in read) and "fc.bexps" in read
    model = load_reference_state(mirrors.resnet20(act_bit=4, width=4), read)
    assert torch.allclose(model(X), _expected(net), rtol=1e-5, atol=1e-5)


def test_checkpoint_imports_through_load_with_bias_and_reference_bits(tmp_path):
    net = _trained(act_bit=4, width=4, seed=3)
    assert net.fc.pbias is not None and net.conv1.scale.dim() == 0  # the reference's 0-d scales
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pth")
    model = _load(tmp_path / "ckpt.pth", "csqc.models.reference:resnet20(act_bit=4, width=4)")
    assert torch.allclose(model(X), _expected(net), rtol=1e-5, atol=1e-5)
    # bit order: reference index i (MSB first) is position N-1-i
    mask = (net.conv1.mask_weight > 0).tolist()
    assert model.layers[0]["name"] == "conv1"
    assert model.layers[0]["active_bits"] == [7 - i for i, on in enumerate(mask) if on]
    # the reference's own counts: total_bit = weights x Nbits, ratio_one over all masks
    view = model.manifest["metadata"]["reference_bits"]
    bit_layers = [m for m in net.modules() if isinstance(m, R._Bits)]
    assert view["total_param"] == sum(m.pweight[..., 0].numel() + (m.pbias.shape[0] if m.pbias is not None else 0)
                                      for m in bit_layers)
    assert view["total_bit"] == sum(m.pweight.numel() + (m.pbias.numel() if m.pbias is not None else 0)
                                    for m in bit_layers)
    kept = sum(int((m.mask_weight > 0).sum()) for m in bit_layers)
    assert view["ratio_one"] == pytest.approx(kept / (8 * len(bit_layers)))
    assert view["avg_bit"] == pytest.approx(8 * view["ratio_one"])
    assert [r["kept_bits"] for r in view["layers"]] == [int((m.mask_weight > 0).sum()) for m in bit_layers]


def test_layer_with_no_kept_position_and_weight_only_model_verify(tmp_path):
    """A layer whose mask keeps nothing (folded to a constant by the compiler) in a model with
    float activations (act_bit=0, the reference README's CIFAR setting)."""
    net = _trained(act_bit=0, width=4, dead_layer="layer2.block2.conv1")
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pth")
    model = _load(tmp_path / "ckpt.pth", "csqc.models.reference:resnet20(width=4)")
    assert torch.allclose(model(X), _expected(net), rtol=1e-5, atol=1e-5)
    dead = [r for r in model.layers if r["name"] == "layer2.block2.conv1"]
    assert dead and dead[0]["active_bits"] == []
    graph = csqc.capture(model)
    assert not [n for n in graph.nodes if n.op == "quantize"]  # float activations stay float
    report = csqc.verify(model, samples=2)
    assert report.ok and report.accumulators_exact


def test_bad_checkpoints_are_refused_with_a_reason():
    sd = _trained(act_bit=4, width=4).state_dict()
    cases = {
        "exps": ({**sd, "conv1.exps": sd["conv1.exps"].flip(0)}, "standard bit values"),
        "missing": ({k: v for k, v in sd.items() if k != "bn1.running_mean"}, "lacks 1 entries"),
        "unexpected": ({**sd, "extra.weight": torch.zeros(1)}, "does not"),
        "no mask": ({k: v for k, v in sd.items() if k != "fc.mask_weight"}, "no mask_weight"),
        "half bias": ({k: v for k, v in sd.items() if k != "fc.nbias"}, "not all of pbias"),
        "shape": ({**sd, "conv1.pweight": torch.zeros(4, 3, 5, 5, 8), "conv1.nweight": torch.zeros(4, 3, 5, 5, 8),
                   "conv1.init_pweight": torch.zeros(4, 3, 5, 5, 8)}, "different architecture"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(csqc.BadInput, match=message):
            load_reference_state(mirrors.resnet20(act_bit=4, width=4), bad)
    with pytest.raises(csqc.BadInput, match="is a CSQ layer"):  # a float conv where the checkpoint has bits
        model = mirrors.resnet20(act_bit=4, width=4)
        model.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        load_reference_state(model, sd)


def test_factory_arguments_are_literals_only():
    assert resolve_factory("csqc.models.reference:resnet20(act_bit=2, width=4)")().layer1.block1.quant1.bits == 2
    for spec in ("csqc.models.reference:resnet20(2)", "csqc.models.reference:resnet20(act_bit=__import__('os'))",
                 "csqc.models.reference:resnet20(**{'a': 1})", "csqc.models.reference:resnet20(act_bit=[1])",
                 "csqc.models.reference:resnet20(act_bit=)"):
        with pytest.raises(csqc.BadInput, match="--model-factory"):
            resolve_factory(spec)


def test_factory_errors_are_bad_input(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _trained(act_bit=4, width=4).state_dict()}, path)
    for spec, msg in (("nomodule", "module:callable"), ("csqc.nothere:f", "cannot import"),
                      ("csqc.models.reference:nope", "no attribute"),
                      ("torch.nn:Linear", "failed when called with no arguments")):  # needs arguments
        with pytest.raises(csqc.BadInput, match=msg):
            _load(path, spec)
    with pytest.raises(csqc.BadInput, match="input-shape"):
        csqc.load(path, model_factory="csqc.models.reference:resnet20")
    with pytest.raises(csqc.BadInput, match="does not exist in the factory"):
        _load(path, "csqc.models:digits_mlp", (1, 64))


def test_inspect_shows_the_reference_bit_counts_next_to_csqc(tmp_path):
    import json

    from click.testing import CliRunner

    from csqc.cli import cli

    net = _trained(act_bit=4, width=4, seed=6)
    torch.save({"model": net.state_dict()}, tmp_path / "ckpt.pth")
    args = ["inspect", str(tmp_path / "ckpt.pth"), "--model-factory", "csqc.models.reference:resnet20(act_bit=4, width=4)",
            "--input-shape", "2,3,32,32"]
    result = CliRunner().invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = reference_bits(net.state_dict())
    assert data["reference"]["total_bit"] == expected["total_bit"] and data["reference"]["avg_bit"] == expected["avg_bit"]
    assert len(data["reference"]["layers"]) == 20 and data["avg_bits"] > 0
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "reference: average bit" in text.output and "size-weighted" in text.output
    assert f"total_bit {expected['total_bit']}" in text.output


def test_a_damaged_reference_view_is_not_shown():
    from csqc.reference import reference_view

    good = {"total_param": 1, "total_bit": 8, "ratio_one": 0.5, "n_bits": 8, "avg_bit": 4.0,
            "layers": [{"name": "fc", "n_bits": 8, "kept_bits": 4, "params": 1}]}
    assert reference_view({"metadata": {"reference_bits": good}}) == good
    for bad in ({**good, "avg_bit": "4"}, {**good, "layers": [{"name": 3}]}, {**good, "total_bit": float("nan")}, []):
        assert reference_view({"metadata": {"reference_bits": bad}}) is None
    assert reference_view({"metadata": []}) is None
