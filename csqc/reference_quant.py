"""Reference-style activation quantizers, recognised and captured as csqc's ``act_quant``.

The CSQ reference code quantizes activations with a function, not a module: blocks call
``STE.apply(x, bit)``, an ``autograd.Function`` whose forward is

    bit == 0:  x (no quantization)
    S = max|x|;  S == 0:  x * 0;  else  S * (round(|x| * (2^bit - 1) / S) / (2^bit - 1)) * sign(x)

``torch.export`` cannot trace ``if S == 0`` (a branch on data). csqc's ``act_quant`` computes
the same codes, ``round(|x| * L / S)`` in the same order, and gives 0 for ``S == 0`` without a
branch; only the final multiply order differs (a float rounding of the dequantized value).

So the capture replaces the function, soundly:

1. Candidates are the ``autograd.Function`` subclasses with a ``forward(ctx, x, bit)`` found in
   the Python modules that define the model's module classes.
2. Each candidate is probed on fixed tensors (signed, non-negative, exact rounding ties, all
   zeros) for every bit width 1..8 and bit 0; it is recognised only if every probe gives csqc's
   codes (and bit 0 gives ``x`` or zeros).
3. While capturing, every name bound to a recognised function in those modules is bound to a
   stand-in whose ``apply(x, bit)`` calls ``csqc.ops.act_quant``. Before that, the model runs
   once on a random input with the stand-in calling both: every call must give the same codes.
   The names are restored afterwards, whatever happens.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from typing import Iterator

import torch
from torch import nn

from . import ops
from .errors import CsqcError

__all__ = ["find_quantizer_functions", "reference_quantizers_replaced"]

log = logging.getLogger(__name__)

_PROBE_BITS = range(1, 9)


def _model_namespaces(model: nn.Module) -> list[dict]:
    """The globals of every (non-torch, non-csqc) Python module defining the model's classes."""
    seen, spaces = set(), []
    for m in model.modules():
        for cls in type(m).__mro__:
            name = cls.__module__ or ""
            if name in seen or name.split(".")[0] in ("torch", "csqc", "builtins"):
                continue
            seen.add(name)
            module = sys.modules.get(name)
            if module is not None:
                spaces.append(vars(module))
    return spaces


def _takes_x_and_bit(fn: type) -> bool:
    try:
        params = list(inspect.signature(fn.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 3 and all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)


def _probes() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    signed = torch.randn(2, 3, 5, 5, generator=g)
    ties = torch.arange(0, 511, dtype=torch.float32) / 2  # |x| * L / S hits k + 0.5 for L = 255 ... 1
    return [signed, signed.clamp(min=0), torch.cat([ties, -ties]), torch.cat([ties, ties[-1:]])]


def _same_codes(original: torch.Tensor, x: torch.Tensor, bit: int) -> bool:
    """Whether ``original`` (a quantizer's output for ``x``) carries csqc's codes for ``x``."""
    codes, s = ops.act_codes(x, bit, 0.0)
    if not isinstance(original, torch.Tensor) or original.shape != x.shape:
        return False
    if float(s) == 0:
        return bool((original == 0).all())
    levels = 2**bit - 1
    recovered = torch.round(original.to(torch.float32) * levels / s)
    close = (original - ops.fake_quant_act(x, bit, 0.0)).abs().max() <= 8 * torch.finfo(torch.float32).eps * s
    return bool(torch.equal(recovered, codes)) and bool(close)


def _bit0_mode(fn: type) -> str | None:
    """What ``fn`` does at bit 0: 'identity', 'zero', or None when it is neither."""
    x = _probes()[0]
    try:
        with torch.no_grad():
            y = fn.apply(x, 0)
    except Exception:
        return None
    if isinstance(y, torch.Tensor) and torch.equal(y, x):
        return "identity"
    if isinstance(y, torch.Tensor) and y.shape == x.shape and bool((y == 0).all()):
        return "zero"
    return None


def _quantizer_problem(fn: type) -> str | None:
    """Why ``fn`` is not a max-abs activation quantizer csqc can stand in for, or None."""
    for bit in _PROBE_BITS:
        for x in _probes() + [torch.zeros(3, 4)]:
            try:
                with torch.no_grad():
                    y = fn.apply(x, bit)
            except Exception as e:
                return f"it raised {type(e).__name__} on a {bit}-bit probe"
            if not _same_codes(y, x, bit):
                return f"its {bit}-bit output differs from round(|x| * (2^{bit} - 1) / max|x|) codes"
    if _bit0_mode(fn) is None:
        return "at bit 0 it returns neither its input nor zeros"
    return None


def find_quantizer_functions(model: nn.Module) -> tuple[list[type], dict[type, str]]:
    """(recognised quantizer functions, {candidate that was not recognised: why})."""
    recognised, refused, seen = [], {}, set()
    for space in _model_namespaces(model):
        for value in list(space.values()):
            if (not isinstance(value, type) or not issubclass(value, torch.autograd.Function)
                    or value.__module__.split(".")[0] == "torch" or value in seen or not _takes_x_and_bit(value)):
                continue
            seen.add(value)
            problem = _quantizer_problem(value)
            if problem:
                refused[value] = problem
            else:
                recognised.append(value)
    return recognised, refused


class _StandIn:
    """Takes the place of a recognised quantizer function: ``apply(x, bit)`` -> csqc's op."""

    def __init__(self, original: type):
        self.original = original
        self.bit0 = _bit0_mode(original)
        self.checking = False
        self.calls = 0

    def apply(self, x: torch.Tensor, bit) -> torch.Tensor:
        bit = int(bit)
        if bit == 0:
            return x if self.bit0 == "identity" else x * 0
        y = ops.act_quant(x, bit, 0.0)
        if self.checking:
            self.calls += 1
            if not _same_codes(self.original.apply(x, bit), x, bit):
                raise CsqcError(f"{_qualname(self.original)} and csqc's act_quant give different {bit}-bit codes on "
                                "the check input; csqc cannot stand in for this quantizer")
        return y


def _qualname(fn: type) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


@contextlib.contextmanager
def reference_quantizers_replaced(model: nn.Module, example: tuple[torch.Tensor, ...]) -> Iterator[list[dict]]:
    """Within the block, recognised quantizer functions are csqc's ``act_quant`` (see module doc).

    Yields a list with one record per replaced function (name, calls per forward). A function
    that looks like a quantizer (``forward(ctx, x, bit)``) but is not recognised is named in
    the error if the capture then fails.
    """
    recognised, refused = find_quantizer_functions(model)
    stand_ins = {fn: _StandIn(fn) for fn in recognised}
    bound = [(space, name, value) for space in _model_namespaces(model)
             for name, value in list(space.items()) if isinstance(value, type) and value in stand_ins]
    try:
        for space, name, value in bound:
            space[name] = stand_ins[value]
        records = []
        if stand_ins:
            _check_on_random_input(model, example, stand_ins.values())
            records = [{"function": _qualname(fn), "replaced_by": "csqc::act_quant (dynamic max-abs)",
                        "calls": s.calls, "bit0": s.bit0} for fn, s in stand_ins.items()]
            for r in records:
                log.info("replaced activation quantizer %s (%d calls per forward)", r["function"], r["calls"])
        try:
            yield records
        except CsqcError as e:
            if refused:
                hints = "; ".join(f"{_qualname(fn)} was not recognised as a quantizer: {why}" for fn, why in refused.items())
                raise CsqcError(f"{e} ({hints})") from e
            raise
    finally:
        for space, name, value in bound:
            space[name] = value


@torch.no_grad()
def _check_on_random_input(model: nn.Module, example: tuple[torch.Tensor, ...], stand_ins) -> None:
    g = torch.Generator().manual_seed(0)
    sample = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t for t in example)
    for s in stand_ins:
        s.checking, s.calls = True, 0
    try:
        model(*sample)
    finally:
        for s in stand_ins:
            s.checking = False
