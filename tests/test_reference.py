"""Import of the public CSQ reference checkpoint layout (bit axis MSB first, {'model': sd})."""
import torch
from torch.nn import functional as F

import csqc
from csqc.models.reference import resnet20
from csqc.reference import reference_bias


def _reference_checkpoint(path, act_bits=4, seed=0):
    """A checkpoint as the reference code saves it, with random (hard) bits and masks."""
    g = torch.Generator().manual_seed(seed)
    model = resnet20(act_bits=act_bits)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith(".bias") and "bn" in k:
            v = torch.randn(v.shape, generator=g) * 0.1
        sd[k] = v
    for name, m in model.named_modules():
        if hasattr(m, "pweight"):
            n = m.n_bits
            sd.pop(f"{name}.exps", None)
            sd[f"{name}.pweight"] = torch.randn(m.pweight.shape, generator=g)
            sd[f"{name}.nweight"] = torch.randn(m.nweight.shape, generator=g)
            sd[f"{name}.mask_weight"] = torch.randn(n, generator=g)
            sd[f"{name}.scale"] = torch.rand(1, generator=g) + 0.1
            sd[f"{name}.exps"] = torch.tensor([2.0 ** (n - 1 - i) / (2**n - 1) for i in range(n)])
            if m.bias is not None:
                del sd[f"{name}.bias"]
                sd[f"{name}.pbias"] = torch.rand(m.bias.shape[0], n, generator=g).round()
                sd[f"{name}.nbias"] = torch.rand(m.bias.shape[0], n, generator=g).round()
                sd[f"{name}.biasscale"] = torch.rand(1, generator=g)
    torch.save({"model": sd, "epoch": 7, "valid_acc": 0.9}, path)
    return sd


def _weight_by_hand(sd, name):
    """The reference's finalized weight: sum_i m_i (p_i - n_i) exps_i * scale, MSB first."""
    p = (sd[f"{name}.pweight"] > 0).float()
    n = (sd[f"{name}.nweight"] > 0).float()
    m = (sd[f"{name}.mask_weight"] > 0).float()
    return ((p - n) * m * sd[f"{name}.exps"]).sum(-1) * sd[f"{name}.scale"]


def test_reference_checkpoint_imports_with_the_same_math(tmp_path):
    path = tmp_path / "ckpt.pth"
    sd = _reference_checkpoint(path)
    model = csqc.load(path, model_factory="csqc.models.reference:resnet20_4bit", input_shape=(1, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    out = model(x)

    # the same network computed by hand from the raw state dict
    def bn(t, prefix):
        return F.batch_norm(t, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], False, 0.0, 1e-5)

    def quant(t, bits=4):
        s = t.abs().max()
        return torch.round(t.abs() * (2**bits - 1) / s) * torch.sign(t) * s / (2**bits - 1)

    h = F.relu(bn(F.conv2d(x, _weight_by_hand(sd, "conv1"), padding=1), "bn1"))
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        for block in ("block1", "block2", "block3"):
            p = f"{stage}.{block}"
            s = stride if block == "block1" else 1
            o = quant(F.relu6(bn(F.conv2d(h, _weight_by_hand(sd, f"{p}.conv1"), stride=s, padding=1), f"{p}.bn1")))
            o = bn(F.conv2d(o, _weight_by_hand(sd, f"{p}.conv2"), padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                h = bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            h = quant(F.relu6(o + h))
    h = F.avg_pool2d(h, 8).flatten(1)
    bias = reference_bias(sd["fc.pbias"], sd["fc.nbias"], sd["fc.biasscale"])
    expected = F.linear(h, _weight_by_hand(sd, "fc"), bias)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert [l["name"] for l in model.layers][:2] == ["conv1", "layer1.block1.conv1"]


def test_reference_bit_order_is_msb_first(tmp_path):
    path = tmp_path / "ckpt.pth"
    sd = _reference_checkpoint(path)
    model = csqc.load(path, model_factory="csqc.models.reference:resnet20_4bit", input_shape=(1, 3, 32, 32))
    mask = (sd["conv1.mask_weight"] > 0).tolist()
    expected_positions = [7 - i for i, on in enumerate(mask) if on]  # index i is position N-1-i
    assert model.layers[0]["active_bits"] == expected_positions


def test_factory_errors_are_bad_input(tmp_path):
    path = tmp_path / "ckpt.pth"
    _reference_checkpoint(path)
    import pytest

    for spec, msg in (("nomodule", "module:callable"), ("csqc.nothere:f", "cannot import"),
                      ("csqc.models.reference:nope", "no attribute"),
                      ("torch.nn:Linear", "failed when called with no arguments")):  # needs arguments
        with pytest.raises(csqc.BadInput, match=msg):
            csqc.load(path, model_factory=spec, input_shape=(1, 3, 32, 32))
    with pytest.raises(csqc.BadInput, match="input-shape"):
        csqc.load(path, model_factory="csqc.models.reference:resnet20_4bit")
    with pytest.raises(csqc.BadInput, match="does not exist in the factory"):
        csqc.load(path, model_factory="csqc.models:digits_mlp", input_shape=(1, 64))
