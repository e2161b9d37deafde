"""Training checkpoints: the whole CSQ training state, so a resumed run ends where an uninterrupted one would.

A checkpoint is a zip of ``checkpoint.json`` (format, epochs done, the run's settings, the numpy
shuffling state, activation scales) and ``tensors.npz`` (every parameter and buffer of the model
- weight bits, mask logits, scales, BatchNorm statistics -, the optimizers' moments and steps,
and PyTorch's random state), written atomically like an IR file. The regularizer and the
temperature schedule keep no state of their own: both are functions of the mask logits, the
settings and the epoch, which the checkpoint holds.

A checkpoint is untrusted input: it is read without pickle (never ``torch.load``), every member's
size is checked before it is read, every tensor must have the name, shape and dtype the model
and optimizers expect, and the settings must be the ones of the run that resumes it.
"""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import torch
from torch import nn

from .archive import npz_bytes, read_member, read_npz, unique_members, write_member
from .errors import UNREADABLE_ARCHIVE, BadInput
from .layers import ActQuant
from .outputs import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "check_checkpoint_file", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "csqc-train-checkpoint", 1
_MAX_JSON_BYTES = 1 << 20

# Optimizer state csqc's trainer creates, per parameter: "param" = the parameter's shape and dtype.
_OPTIMIZER_STATE = {
    torch.optim.Adam: {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "param"},
    torch.optim.SGD: {"momentum_buffer": "param"},
}


def save_checkpoint(path, *, epoch: int, settings: dict, model: nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], rng: np.random.Generator) -> None:
    """Write the training state after ``epoch`` finished epochs to ``path`` (atomically)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, opt in optimizers.items():
        for index, state in _indexed_state(opt).items():
            for key, value in state.items():
                if value is not None:
                    tensors[f"opt.{name}.{index}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "settings": settings,
        "numpy_rng": rng.bit_generator.state,
        "act_scales": {name: m.static_scale for name, m in model.named_modules() if isinstance(m, ActQuant)},
        # asymmetric static quantizers: their calibrated zero points (0 for every other quantizer)
        "act_zero_points": {name: m.zero_point for name, m in model.named_modules() if isinstance(m, ActQuant)},
    }
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w") as z:
            write_member(z, "checkpoint.json", json.dumps(meta, indent=1).encode())
            write_member(z, "tensors.npz", npz_bytes(arrays), zipfile.ZIP_DEFLATED)

    atomic_write(path, write)


def _indexed_state(opt: torch.optim.Optimizer) -> dict[int, dict]:
    """The optimizer's per-parameter state by the parameter's position in its groups."""
    return opt.state_dict()["state"]


def load_checkpoint(path, *, settings: dict, model: nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer], rng: np.random.Generator) -> int:
    """Restore the state ``save_checkpoint`` wrote into ``model``, ``optimizers`` and ``rng``; returns
    the number of epochs already done. Anything but a checkpoint of this very run is ``BadInput``."""
    where = f"checkpoint {path}"
    meta, arrays = _read(path, where, _expected_tensors(model, optimizers))
    epoch = _check_meta(meta, settings, where)
    missing = sorted(k for k in _required_tensors(model) if k not in arrays)
    if missing:
        raise BadInput(f"{where}: lacks tensor(s) {', '.join(missing[:5])}; it belongs to another model")
    _restore_act_scales(model, meta.get("act_scales"), meta.get("act_zero_points"), where)
    model.load_state_dict({k[len("model."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")})
    for name, opt in optimizers.items():
        _restore_optimizer(opt, name, arrays)
    _restore_rng(rng, meta.get("numpy_rng"), arrays, where)
    return epoch


def check_checkpoint_file(path) -> None:
    """``BadInput`` unless ``path`` looks like a csqc training checkpoint (its header only): lets a
    command refuse a damaged or foreign file before minutes of warm-up, not after."""
    where = f"checkpoint {path}"
    meta, _ = _read(path, where, None)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise BadInput(f"{where}: not a csqc training checkpoint of version {CHECKPOINT_VERSION}")


def _param_specs(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _dtype(t: torch.Tensor) -> np.dtype:
    return np.dtype(str(t.dtype).removeprefix("torch."))


def _expected_tensors(model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Every tensor a checkpoint of this run may hold: name -> (shape, dtype)."""
    expected = {f"model.{k}": (tuple(v.shape), _dtype(v)) for k, v in model.state_dict().items()}
    for name, opt in optimizers.items():
        keys = _OPTIMIZER_STATE.get(type(opt))
        if keys is None:
            raise TypeError(f"no checkpoint layout for optimizer {type(opt).__name__}")
        for index, p in enumerate(_param_specs(opt)):
            for key, kind in keys.items():
                spec = ((), np.dtype(np.float32)) if kind == "scalar" else (tuple(p.shape), _dtype(p))
                expected[f"opt.{name}.{index}.{key}"] = spec
    rng_state = torch.get_rng_state()
    expected["rng.torch"] = (tuple(rng_state.shape), np.dtype(np.uint8))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            expected[f"rng.cuda.{i}"] = (tuple(torch.cuda.get_rng_state(i).shape), np.dtype(np.uint8))
    return expected


def _required_tensors(model: nn.Module) -> list[str]:
    return [f"model.{k}" for k in model.state_dict()] + ["rng.torch"]


def _read(path, where: str, expected: dict | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and, with ``expected`` (else only the header is read), the tensors."""
    limit = sum(math.prod(shape) * dtype.itemsize for shape, dtype in (expected or {}).values())
    try:
        with zipfile.ZipFile(path) as z:
            members = unique_members(z, where)
            if set(members) != {"checkpoint.json", "tensors.npz"}:
                raise BadInput(f"{where}: not a csqc training checkpoint (members {sorted(members)[:4]})")
            meta = json.loads(read_member(z, members["checkpoint.json"], where, _MAX_JSON_BYTES))
            data = read_member(z, members["tensors.npz"], where, limit + (1 << 20)) if expected is not None else b""
    except FileNotFoundError:
        raise BadInput(f"{where}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{where} is a folder; give the checkpoint file") from None
    except (*UNREADABLE_ARCHIVE, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = (str(e).splitlines() or [""])[0][:120]
        raise BadInput(f"{where}: not a csqc training checkpoint or a damaged one ({type(e).__name__}: {reason})") from None
    if not isinstance(meta, dict):
        raise BadInput(f"{where}: not a csqc training checkpoint")
    arrays = read_npz(data, where, limit_bytes=limit, expected=expected) if expected is not None else {}
    for key, array in arrays.items():  # a run resumed from these would only end in "training collapsed"
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadInput(f"{where}: tensor {key!r} holds NaN or infinite values; the checkpoint is damaged")
    return meta, arrays


def _check_meta(meta: dict, settings: dict, where: str) -> int:
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise BadInput(f"{where}: not a csqc training checkpoint of version {CHECKPOINT_VERSION}")
    saved = meta.get("settings")
    wanted = json.loads(json.dumps(settings))  # compare as the file stores them (tuples become lists)
    if not isinstance(saved, dict):
        raise BadInput(f"{where}: its settings are missing; the file is damaged")
    differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if differ:
        k = differ[0]
        raise BadInput(f"{where} was written by a run with {k}={saved.get(k)!r}, this run has {k}={wanted.get(k)!r}; "
                       "resume with the same settings")
    epoch = meta.get("epoch")
    epochs = wanted.get("epochs")
    if type(epoch) is not int or not 0 <= epoch <= (epochs if isinstance(epochs, int) else 0):
        raise BadInput(f"{where}: epoch {epoch!r} is not a number of finished epochs of this run")
    return epoch


def _restore_act_scales(model: nn.Module, scales, zero_points, where: str) -> None:
    """Static scales and zero points of the activation quantizers (a checkpoint written before
    asymmetric quantizers existed has no zero points: all 0)."""
    quants = {name: m for name, m in model.named_modules() if isinstance(m, ActQuant)}
    if zero_points is None:
        zero_points = dict.fromkeys(quants, 0)
    if not isinstance(scales, dict) or set(scales) != set(quants) or not isinstance(zero_points, dict) \
            or set(zero_points) != set(quants):
        raise BadInput(f"{where}: its activation quantizers are not this model's")
    for name, value in scales.items():
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise BadInput(f"{where}: activation scale of {name} is {value!r}, not a finite number >= 0")
        zero_point = zero_points[name]
        if type(zero_point) is not int or not 0 <= zero_point <= 2 ** quants[name].bits - 1:
            raise BadInput(f"{where}: zero point of {name} is {zero_point!r}, not an integer in "
                           f"0..{2 ** quants[name].bits - 1}")
        quants[name].static_scale = float(value)
        quants[name].zero_point = zero_point


def _restore_optimizer(opt: torch.optim.Optimizer, name: str, arrays: dict[str, np.ndarray]) -> None:
    state = {}
    for index, _ in enumerate(_param_specs(opt)):
        prefix = f"opt.{name}.{index}."
        entry = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix)}
        if entry:
            state[index] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _restore_rng(rng: np.random.Generator, state, arrays: dict[str, np.ndarray], where: str) -> None:
    try:
        if not isinstance(state, dict) or state.get("bit_generator") != rng.bit_generator.state["bit_generator"]:
            raise ValueError("another generator")
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError):
        raise BadInput(f"{where}: its shuffling state is not a {type(rng.bit_generator).__name__} state; "
                       "the file is damaged") from None
    try:
        torch.set_rng_state(torch.from_numpy(arrays["rng.torch"].copy()))
        cuda = [torch.from_numpy(arrays[k].copy()) for k in sorted(arrays) if k.startswith("rng.cuda.")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    except RuntimeError as e:
        raise BadInput(f"{where}: its random state is damaged ({str(e).splitlines()[0][:120]})") from None
