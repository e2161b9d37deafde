"""Import checkpoints of the public CSQ reference code (``lawsonX/CSQ``, ``bits/bitcs.py``).

A reference checkpoint is ``torch.save({'model': state_dict, ...})``; the architecture is
Python code, so the user names a constructor (``--model-factory module:callable``: the explicit
opt-in to running their code) and the input shape. The state dict is read with
``weights_only=True``, so a pickle that would run code is refused.

Per quantized layer the reference stores, bit axis last and **most significant first**:
``pweight``/``nweight`` (bit values, hard after training: ``> 0``), ``mask_weight`` (``> 0``
keeps a position), ``scale`` and optionally ``pbias``/``nbias``/``biasscale``, a bias rounded
with a straight-through estimator. Modules of the factory's model whose state-dict prefix has
``pweight`` become finalized csqc layers; everything else loads as ordinary float state.
"""
from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import layers
from .errors import BadInput

__all__ = ["resolve_factory", "reference_bias", "csq_layer_from_reference", "load_reference_state", "import_checkpoint"]

log = logging.getLogger(__name__)


def resolve_factory(spec: str):
    """``'package.module:callable'`` -> the callable (this imports and runs user code)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"--model-factory must look like module:callable, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"--model-factory: cannot import {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise BadInput(f"--model-factory: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise BadInput(f"--model-factory: {spec} is not callable")
    return fn


def reference_bias(pbias: torch.Tensor, nbias: torch.Tensor, biasscale: torch.Tensor) -> torch.Tensor:
    """The reference's bias: bits summed MSB first, clipped to [-1, 1], rounded to N bits."""
    n = pbias.shape[-1]
    exps = 2.0 ** torch.arange(n - 1, -1, -1, dtype=torch.float32) / (2**n - 1)
    b = ((pbias - nbias) * exps).sum(-1).clamp(-1, 1)
    step = 2**n - 1
    return torch.round(b.abs() * step) / step * torch.sign(b) * biasscale


def csq_layer_from_reference(module: nn.Module, sd: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """A finalized CSQ layer equal to the reference layer stored under ``prefix``."""
    pw, nw = sd[prefix + "pweight"], sd[prefix + "nweight"]
    mask, scale = sd[prefix + "mask_weight"], sd[prefix + "scale"]
    n_bits = pw.shape[-1]
    has_bias = prefix + "pbias" in sd or sd.get(prefix + "bias") is not None
    if pw.dim() == 5 or isinstance(module, (nn.Conv2d, layers.CSQConv2d)):
        get = lambda a, d: tuple(getattr(module, a, d)) if isinstance(getattr(module, a, d), (tuple, list)) else (getattr(module, a, d),) * 2
        layer = layers.CSQConv2d(
            pw.shape[1] * getattr(module, "groups", 1), pw.shape[0], tuple(pw.shape[2:4]),
            get("stride", 1), get("padding", 0), get("dilation", 1), getattr(module, "groups", 1),
            has_bias, n_bits,
        )
    elif pw.dim() == 3:
        layer = layers.CSQLinear(pw.shape[1], pw.shape[0], has_bias, n_bits)
    else:
        raise BadInput(f"{prefix}pweight has shape {tuple(pw.shape)}: expected a Linear or Conv2d layer")
    with torch.no_grad():
        # reference index i (MSB first) is bit position N-1-i
        layer.pweight.copy_(torch.where(pw.flip(-1) > 0, 1.0, -1.0))
        layer.nweight.copy_(torch.where(nw.flip(-1) > 0, 1.0, -1.0))
        layer.mask_weight.copy_(torch.where(mask.flip(-1) > 0, 1.0, -1.0))
        layer.scale.copy_(scale.reshape(1))
        if prefix + "pbias" in sd:
            layer.bias.copy_(reference_bias(sd[prefix + "pbias"], sd[prefix + "nbias"], sd[prefix + "biasscale"]))
        elif has_bias:
            layer.bias.copy_(sd[prefix + "bias"])
    layer.finalize()
    return layer


def load_reference_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the model's reference CSQ layers for csqc layers and load everything else."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    prefixes = sorted({k[: -len("pweight")] for k in sd if k.endswith("pweight")})
    if not prefixes:
        raise BadInput("checkpoint has no CSQ layers (no '*.pweight' entries)")
    modules = dict(model.named_modules())
    csq_keys = set()
    for prefix in prefixes:
        name = prefix[:-1]
        if name not in modules:
            raise BadInput(f"checkpoint layer {name!r} does not exist in the factory's model")
        new = csq_layer_from_reference(modules[name], sd, prefix)
        old_quant = getattr(modules[name], "input_quant", None)
        new.input_quant = old_quant
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        csq_keys.update(k for k in sd if k.startswith(prefix) and "." not in k[len(prefix):])
    rest = {k: v for k, v in sd.items() if k not in csq_keys}
    expected = {k for k in model.state_dict() if not any(k.startswith(p) for p in prefixes)}
    missing = sorted(expected - set(rest))
    if missing:
        raise BadInput(f"checkpoint lacks {len(missing)} entries the model needs, e.g. {missing[:3]}")
    model.load_state_dict(rest, strict=False)
    return layers.finalize(model)


def import_checkpoint(path: Path, factory: str, input_shape: Sequence[int] | None):
    """Build the factory's model, load the reference checkpoint, return a ``CsqcModel``."""
    from .modelfile import CsqcModel, _export, _flat_outputs, _tensor_spec

    if not input_shape:
        raise BadInput("--model-factory needs --input-shape (e.g. 1,3,32,32)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInput(f"{path}: refused to load: the checkpoint holds Python objects other than "
                       f"tensors ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:
        raise BadInput(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"{path}: expected {{'model': state_dict}} or a state dict of tensors")
    build = resolve_factory(factory)
    try:
        model = build()
    except Exception as e:  # the user's code: say whose failure it is
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise BadInput(f"--model-factory {factory} failed when called with no arguments "
                       f"({type(e).__name__}: {first}); name a callable that builds the model") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model-factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
    model = load_reference_state(model, sd)
    example = (torch.zeros(tuple(int(s) for s in input_shape)),)
    program = _export(model, example)
    manifest = {
        "format": "csqc-model",
        "version": 1,
        "inputs": [_tensor_spec("input0", example[0])],
        "outputs": [_tensor_spec(f"output{i}", t) for i, t in enumerate(_flat_outputs(model(*example)))],
        "parameters": sorted(program.graph_signature.parameters),
        "avg_bits": layers.average_bits(model),
        "layers": layers.layer_report(model),
        "metadata": {"imported_from": str(path), "factory": factory},
    }
    return CsqcModel(program, manifest, example, source=str(path))
