"""Import checkpoints of the public CSQ reference code (``lawsonX/CSQ``, ``bits/bitcs.py``).

A reference checkpoint is whatever ``torch.save`` got: ``{'model': state_dict, ...}``,
``{'state_dict': state_dict, ...}`` or a bare state dict, with ``module.`` prefixes when it was
saved from DataParallel/DDP. The architecture is Python code, so the user names a constructor
(``--model-factory module:callable``, optionally ``module:callable(act_bit=4)``: the explicit
opt-in to running their code) and the input shape. The state dict is read with
``weights_only=True``, so a pickle that would run code is refused.

Per quantized layer the reference stores, bit axis last and **most significant first**:
``pweight``/``nweight`` (bit values, hard after training: ``> 0``), ``mask_weight`` (``> 0``
keeps a position), ``scale``, the constants ``exps``/``bexps``, the weight-rewinding copies
``init_pweight``/``init_nweight`` and optionally ``pbias``/``nbias``/``biasscale``, a bias
rounded with a straight-through estimator. Modules of the factory's model at those prefixes
(recognised by their parameters, whatever their class) become finalized csqc layers;
everything else loads as ordinary float state.
"""
from __future__ import annotations

import ast
import functools
import importlib
import logging
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import layers
from .archive import unique_members
from .errors import BadInput

__all__ = [
    "resolve_factory", "reference_bias", "checkpoint_state_dict", "layer_prefixes", "csq_layer_from_reference",
    "ReferenceConv2d", "ReferenceLinear", "load_reference_state", "reference_bits", "reference_view",
    "import_checkpoint",
]

log = logging.getLogger(__name__)


def resolve_factory(spec: str, what: str = "--model-factory"):
    """``'package.module:callable'`` or ``'package.module:callable(name=value, ...)'`` -> a
    function that builds the model (this imports and runs user code); ``what`` names the option
    in messages.

    Keyword values must be Python literals (numbers, strings, True/False/None); they are read
    with ``ast``, never evaluated, so ``cifar10.network.resnetcs20:ResNet(act_bit=4)`` names the
    reference's own class with the arguments it was trained with.
    """
    target, kwargs = _split_call(spec, what)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"{what} must look like module:callable, got {spec!r}")
    _import_from_current_folder()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"{what}: cannot import {module_name!r} ({e}); it is looked up in the current "
                       "folder and on PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise BadInput(f"{what}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise BadInput(f"{what}: {spec} is not callable")
    return functools.partial(fn, **kwargs) if kwargs else fn


def _import_from_current_folder() -> None:
    """Let ``own_models:Net`` find ``./own_models.py``, as ``python -m`` does: the console script's
    sys.path starts at its own folder, not the user's. Only for a factory, the explicit opt-in to
    running user code; a model file never imports anything."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _split_call(spec: str, what: str = "--model-factory") -> tuple[str, dict]:
    """``'mod:f(a=1, b="x")'`` -> (``'mod:f'``, ``{'a': 1, 'b': 'x'}``); no call -> (spec, {})."""
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    target = spec[: spec.index("(")]
    try:
        call = ast.parse("f" + spec[len(target):], mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args:
        raise BadInput(f"{what} arguments must be name=value pairs, got {spec!r}")
    kwargs = {}
    for kw in call.keywords:
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            value = kw  # not a literal
        if kw.arg is None or isinstance(value, ast.keyword) or not isinstance(value, (int, float, str, bool, type(None))):
            raise BadInput(f"{what} argument {ast.unparse(kw)!r} is not name=<number, string, "
                           "True, False or None>")
        kwargs[kw.arg] = value
    return target, kwargs


def reference_bias(pbias: torch.Tensor, nbias: torch.Tensor, biasscale: torch.Tensor) -> torch.Tensor:
    """The reference's bias: bits summed MSB first, clipped to [-1, 1], rounded to N bits."""
    n = pbias.shape[-1]
    exps = 2.0 ** torch.arange(n - 1, -1, -1, dtype=torch.float32) / (2**n - 1)
    b = ((pbias - nbias) * exps).sum(-1).clamp(-1, 1)
    step = 2**n - 1
    return torch.round(b.abs() * step) / step * torch.sign(b) * biasscale


# Entries the reference keeps per quantized layer (bits.bitcs.BitConv2d / BitLinear state dicts)
_REQUIRED = ("pweight", "nweight", "mask_weight", "scale")
_LAYER_ENTRIES = frozenset(_REQUIRED + ("exps", "bexps", "init_pweight", "init_nweight", "pbias", "nbias", "biasscale"))
_WRAPPER = "module."  # DataParallel / DistributedDataParallel prefix every key with it


def _reference_exps(n_bits: int) -> torch.Tensor:
    return 2.0 ** torch.arange(n_bits - 1, -1, -1, dtype=torch.float32) / (2**n_bits - 1)


def checkpoint_state_dict(ckpt, path="checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint the reference code (or a user's torch.save) wrote.

    Accepts ``{'model': sd, ...}``, ``{'state_dict': sd, ...}`` or a bare state dict, and
    strips the ``module.`` prefixes DataParallel/DDP add (when every key has one).
    """
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                sd = ckpt[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise BadInput(f"{path}: expected {{'model': state_dict}}, {{'state_dict': state_dict}} or a state dict "
                       "of tensors")
    while all(k.startswith(_WRAPPER) for k in sd):
        sd = {k[len(_WRAPPER):]: v for k, v in sd.items()}
    return dict(sd)


def layer_prefixes(sd: dict[str, torch.Tensor]) -> list[str]:
    """Key prefixes (``'layer1.block1.conv1.'``) of the reference's quantized layers.

    A layer is a module with a ``pweight`` entry of its own; ``init_pweight`` (the weight
    rewinding copy) belongs to the same layer.
    """
    return [k[: -len("pweight")] for k in sd if k.rpartition(".")[2] == "pweight"]  # in module order


def _layer_problem(sd: dict[str, torch.Tensor], prefix: str) -> str | None:
    """What is wrong with the entries of the quantized layer at ``prefix``, or None."""
    missing = [e for e in _REQUIRED if prefix + e not in sd]
    if missing:
        return f"has pweight but no {', '.join(missing)}"
    pw, nw, mask = sd[prefix + "pweight"], sd[prefix + "nweight"], sd[prefix + "mask_weight"]
    n = pw.shape[-1] if pw.dim() else 0
    if pw.dim() not in (3, 5) or not 1 <= n <= 15:
        return f"pweight has shape {list(pw.shape)}: expected [out, in, N] or [out, in, kh, kw, N] with N <= 15"
    if nw.shape != pw.shape or list(mask.shape) != [n]:
        return f"nweight {list(nw.shape)} / mask_weight {list(mask.shape)} do not match pweight {list(pw.shape)}"
    for e in ("scale", "biasscale"):
        if prefix + e in sd and sd[prefix + e].numel() != 1:
            return f"{e} has {sd[prefix + e].numel()} values, expected 1"
    for e, bits in (("exps", n), ("bexps", None)):
        t = sd.get(prefix + e)
        if t is not None and (t.dim() != 1 or not 1 <= t.numel() <= 15
                              or not torch.allclose(t.float(), _reference_exps(bits or t.numel()), rtol=1e-6, atol=0)):
            return (f"{e} is not 2^(N-1-i)/(2^N-1) for N={bits or t.numel()} (a pruned or edited layer?); "
                    "csqc imports layers with the reference's standard bit values only")
    if (prefix + "pbias" in sd) != (prefix + "nbias" in sd) or (prefix + "pbias" in sd) != (prefix + "biasscale" in sd):
        return "has some but not all of pbias, nbias, biasscale"
    if prefix + "pbias" in sd:
        pb, nb = sd[prefix + "pbias"], sd[prefix + "nbias"]
        if pb.dim() != 2 or pb.shape != nb.shape or pb.shape[0] != pw.shape[0] or not 1 <= pb.shape[1] <= 24:
            return f"pbias {list(pb.shape)} / nbias {list(nb.shape)} do not fit {pw.shape[0]} outputs"
    return None


def _has_csq_structure(module: nn.Module) -> bool:
    """A reference bit layer (whatever its class is called) or a csqc CSQ layer."""
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return isinstance(module, layers._CSQMixin) or all(e in own for e in _REQUIRED)


class ReferenceConv2d(layers.CSQConv2d):
    """A finalized CSQ convolution called the reference's way: ``conv(x, temp, ticket)``.

    ``temp`` and ``ticket`` only steer the reference's training gates; finalized bits are what
    ticket mode with saturated gates computes, so both are accepted and ignored.
    """

    def forward(self, x, temp=None, ticket=None):
        return super().forward(x)


class ReferenceLinear(layers.CSQLinear):
    """A finalized CSQ linear layer called the reference's way: ``fc(x, temp, ticket)``."""

    def forward(self, x, temp=None, ticket=None):
        return super().forward(x)


def _pair_attr(module: nn.Module, name: str, default: int) -> tuple[int, int]:
    v = getattr(module, name, default)
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def csq_layer_from_reference(module: nn.Module, sd: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """A finalized CSQ layer equal to the reference layer stored under ``prefix``.

    Geometry (stride, padding, dilation, groups) comes from ``module``, the factory's layer;
    shapes and bits come from the checkpoint.
    """
    problem = _layer_problem(sd, prefix)
    if problem:
        raise BadInput(f"checkpoint layer {prefix[:-1]!r} {problem}")
    pw, nw = sd[prefix + "pweight"], sd[prefix + "nweight"]
    mask, scale = sd[prefix + "mask_weight"], sd[prefix + "scale"]
    n_bits = pw.shape[-1]
    has_bias = prefix + "pbias" in sd or sd.get(prefix + "bias") is not None
    own = getattr(module, "pweight", None)
    if isinstance(own, torch.Tensor) and tuple(own.shape[:-1]) != tuple(pw.shape[:-1]):
        raise BadInput(f"checkpoint layer {prefix[:-1]!r} has weights {list(pw.shape[:-1])}, the factory's model "
                       f"{list(own.shape[:-1])}: the factory builds a different architecture")
    if pw.dim() == 5:
        if getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(getattr(module, "padding", 0), str):
            raise BadInput(f"{prefix[:-1]}: only zero padding with numeric sizes can be imported")
        groups = int(getattr(module, "groups", 1))
        layer = ReferenceConv2d(
            pw.shape[1] * groups, pw.shape[0], tuple(pw.shape[2:4]), _pair_attr(module, "stride", 1),
            _pair_attr(module, "padding", 0), _pair_attr(module, "dilation", 1), groups, has_bias, n_bits,
        )
    else:
        if isinstance(module, (nn.Conv2d, layers.CSQConv2d)) or hasattr(module, "kernel_size"):
            raise BadInput(f"checkpoint layer {prefix[:-1]!r} is a linear layer, the factory's module a convolution")
        layer = ReferenceLinear(pw.shape[1], pw.shape[0], has_bias, n_bits)
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


def _owned_by(key: str, prefixes: Sequence[str]) -> bool:
    """Whether ``key`` is an entry of one of the quantized layers at ``prefixes``."""
    return any(key.startswith(p) and "." not in key[len(p):] for p in prefixes)


def load_reference_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Swap the model's reference CSQ layers for finalized csqc layers and load the rest.

    The checkpoint and the model must name the same entries: an entry the model lacks or a
    model entry the checkpoint lacks means the factory builds another architecture.
    """
    sd = checkpoint_state_dict(sd)
    prefixes = layer_prefixes(sd)
    if not prefixes:
        raise BadInput("checkpoint has no CSQ layers (no '*.pweight' entries)")
    modules = dict(model.named_modules())
    expected = {k for k in model.state_dict() if not _owned_by(k, prefixes)}
    for prefix in prefixes:
        name = prefix[:-1]
        if name not in modules:
            raise BadInput(f"checkpoint layer {name!r} does not exist in the factory's model")
        old = modules[name]
        if not _has_csq_structure(old):
            raise BadInput(f"checkpoint layer {name!r} is a CSQ layer, but the factory's {name!r} is a "
                           f"{type(old).__name__} without pweight/nweight/mask_weight/scale")
        new = csq_layer_from_reference(old, sd, prefix)
        new.input_quant = getattr(old, "input_quant", None)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    strange = sorted(k for k in sd if _owned_by(k, prefixes) and k.rpartition(".")[2] not in _LAYER_ENTRIES | {"bias"})
    if strange:
        raise BadInput(f"checkpoint has entries a CSQ layer does not have, e.g. {strange[:3]}")
    rest = {k: v for k, v in sd.items() if not _owned_by(k, prefixes)}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing:
        raise BadInput(f"checkpoint lacks {len(missing)} entries the model needs, e.g. {missing[:3]}")
    if unexpected:
        raise BadInput(f"checkpoint has {len(unexpected)} entries the factory's model does not, e.g. "
                       f"{unexpected[:3]}: the factory builds a different architecture")
    try:
        model.load_state_dict(rest, strict=False)
    except RuntimeError as e:  # size mismatches
        detail = " ".join(str(e).split("\n\t")[1:2]).strip()[:200]
        raise BadInput(f"checkpoint does not fit the factory's model: {detail}") from None
    return layers.finalize(model)


def reference_bits(sd: dict[str, torch.Tensor]) -> dict:
    """The bit counts the reference's training log reports, from a (reference) state dict.

    Per layer: candidate bits ``Nbits``, kept mask positions, weights. Whole model:
    ``total_param`` and ``total_bit`` as the reference's ``total_param()``/``total_bit()`` count
    them (every layer whose name has no ``downsample``; ``total_bit`` is weights x candidate
    bits), ``ratio_one`` (kept mask positions over all mask positions, as ``get_ratio_one``) and
    ``avg_bit = Nbits * ratio_one`` with the model's most common ``Nbits``.
    """
    sd = checkpoint_state_dict(sd)
    rows, total_param, total_bit, kept, positions = [], 0, 0, 0, 0
    for prefix in layer_prefixes(sd):
        pw, mask = sd[prefix + "pweight"], sd.get(prefix + "mask_weight")
        if mask is None:
            continue
        n, params = int(pw.shape[-1]), int(pw[..., 0].numel())
        bias = sd.get(prefix + "pbias")
        counted = "downsample" not in prefix
        if counted:
            total_param += params + (bias.shape[0] if bias is not None else 0)
            total_bit += pw.numel() + (bias.numel() if bias is not None else 0)
        on = [bool(v > 0) for v in mask]
        kept, positions = kept + sum(on), positions + n
        rows.append({"name": prefix[:-1], "n_bits": n, "kept_bits": sum(on), "params": params,
                     "mask": "".join("1" if b else "0" for b in on), "counted": counted})
    if not rows:
        return {}
    common = max({r["n_bits"] for r in rows}, key=lambda b: (sum(r["n_bits"] == b for r in rows), b))
    ratio = kept / positions
    return {"total_param": total_param, "total_bit": total_bit, "ratio_one": ratio, "n_bits": common,
            "avg_bit": common * ratio, "layers": rows}


def reference_view(manifest: dict) -> dict | None:
    """The reference's bit counts stored in a model file's metadata, checked, or None.

    A model file is untrusted: a malformed record is reported as absent, never half-printed.
    """
    view = manifest.get("metadata", {}).get("reference_bits") if isinstance(manifest.get("metadata"), dict) else None
    if not isinstance(view, dict):
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e18
    if not all(number(view.get(k)) for k in ("total_param", "total_bit", "ratio_one", "n_bits", "avg_bit")):
        return None
    rows = view.get("layers")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and number(r.get("n_bits"))
            and number(r.get("kept_bits")) and number(r.get("params")) for r in rows):
        return None
    return view


_MAX_CHECKPOINT_BYTES = 8 << 30  # as a model file's tensors


def _check_archive(path: Path) -> None:
    """Refuse a zip checkpoint ``torch.load`` would inflate past what it holds: ``weights_only``
    stops code, not a zip bomb. ``torch.save`` stores members uncompressed; a legacy (non-zip)
    checkpoint holds no more than its own size."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip: torch.load says what it is
    with z:
        total = 0
        for info in unique_members(z, str(path)).values():
            if info.compress_type != zipfile.ZIP_STORED:
                raise BadInput(f"{path}: member {info.filename!r} is compressed; torch.save stores checkpoint "
                               "members uncompressed (the file was edited or rewritten); refusing")
            total += info.file_size
            if total > _MAX_CHECKPOINT_BYTES:
                raise BadInput(f"{path}: the checkpoint claims more than {_MAX_CHECKPOINT_BYTES >> 30} GiB; refusing")


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInput(f"{path}: refused to load: the checkpoint holds Python objects other than "
                       f"tensors ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:
        raise BadInput(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    return checkpoint_state_dict(ckpt, path)


def _build(factory: str) -> nn.Module:
    build = resolve_factory(factory)
    try:
        model = build()
    except Exception as e:  # the user's code: say whose failure it is
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise BadInput(f"--model-factory {factory} failed when called with no arguments "
                       f"({type(e).__name__}: {first}); name a callable that builds the model") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model-factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_checkpoint(path: Path, factory: str, input_shape: Sequence[int] | None):
    """Build the factory's model, load the reference checkpoint, return a ``CsqcModel``.

    A model written in the reference's style quantizes activations with a function-level
    quantizer that ``torch.export`` cannot trace; it is recognised and replaced by csqc's
    ``act_quant`` for the capture (``csqc.reference_quant``), after checking on a sample input
    that the replacement computes the same codes.
    """
    from .modelfile import CsqcModel, export_program, flat_outputs, tensor_spec
    from .reference_quant import reference_quantizers_replaced

    if not input_shape:
        raise BadInput("--model-factory needs --input-shape (e.g. 1,3,32,32)")
    sd = _read_checkpoint(path)
    model = load_reference_state(_build(factory), sd)
    example = (torch.zeros(tuple(int(s) for s in input_shape)),)
    with reference_quantizers_replaced(model, example) as replaced:
        program = export_program(model, example)
        outputs = flat_outputs(model(*example))
    metadata = {"imported_from": str(path), "factory": factory, "reference_bits": reference_bits(sd)}
    if replaced:
        metadata["replaced_quantizers"] = replaced
    manifest = {
        "format": "csqc-model",
        "version": 1,
        "inputs": [tensor_spec("input0", example[0])],
        "outputs": [tensor_spec(f"output{i}", t) for i, t in enumerate(outputs)],
        "parameters": sorted(program.graph_signature.parameters),
        "avg_bits": layers.average_bits(model),
        "layers": layers.layer_report(model),
        "metadata": metadata,
    }
    return CsqcModel(program, manifest, example, source=str(path))
