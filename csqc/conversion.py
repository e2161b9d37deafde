"""``csqc.convert``: float model -> CSQ model, and the report of what was converted and what not.

Converted (in place, subclasses included):

* ``nn.Linear`` -> :class:`~csqc.layers.CSQLinear`; Hugging Face ``Conv1D`` (GPT-2: weight
  ``[in, out]``, ``y = x @ W + b``) -> ``CSQLinear`` with the transposed weight;
* ``nn.Conv2d`` (every ``padding_mode``) -> :class:`~csqc.layers.CSQConv2d`; ``nn.Conv1d`` ->
  :class:`~csqc.layers.CSQConv1d` (a 2-D convolution over a height of one);
  ``nn.ConvTranspose2d`` / ``nn.ConvTranspose1d`` -> :class:`~csqc.layers.CSQConvTranspose2d` /
  :class:`~csqc.layers.CSQConvTranspose1d`;
* ``nn.MultiheadAttention`` -> :class:`~csqc.attention.CSQMultiheadAttention` (four CSQ
  projections; the packed ``in_proj_weight`` is split);
* ``nn.LSTM`` / ``nn.GRU`` (any form: stacked, bidirectional, time-first, ``proj_size``) ->
  ``CSQLSTM`` / ``CSQGRU`` (:mod:`csqc.recurrent`).

A subclass with a ``forward`` of its own is converted only if that forward computes what its
base class computes (checked on a random input): e.g. timm's ``Linear`` is, a conv that pads
itself ("same" padding at run time) is not and stays float. A convertible layer in a form csqc
does not support (``add_bias_kv`` attention, an uneven ``padding='same'``) is refused
with :class:`~csqc.errors.BadInput`: list it in ``skip`` to keep it float.

Everything else that holds a float weight (``Conv3d``, ``ConvTranspose3d``,
``Embedding``, a module with its own weight matrix...) stays float. :func:`conversion_report`
lists every such module with the reason, and ``convert`` logs it as one warning.

The first layer (whose input stays float unless ``quantize_first_input``) is the first one the
model *executes*, found with forward pre-hooks on one forward pass of ``example_inputs``;
without them it is the first in module order, and the report says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import BadInput
from .layers import ActQuant, CSQConv1d, CSQConv2d, CSQConvTranspose1d, CSQConvTranspose2d, CSQLinear, _CSQMixin
from .layers import finalize as finalize_layers

__all__ = ["convert", "conversion_report", "execution_order", "ConversionReport", "LeftFloat"]

log = logging.getLogger(__name__)

_REPORT_ATTR = "_csqc_conversion_report"
# weight shapes of modules csqc does not convert, with the reason users see
_NOT_CONVERTED = {
    nn.Conv3d: "3-D convolution: csqc has no quantized conv3d",
    nn.ConvTranspose3d: "transposed convolution: csqc has no quantized kind",
    nn.Embedding: "embedding table: a lookup, not a product (csqc quantizes matrix products)",
    nn.EmbeddingBag: "embedding table: a lookup, not a product (csqc quantizes matrix products)",
    nn.Bilinear: "bilinear layer: csqc has no quantized kind",
}


@dataclass(frozen=True)
class LeftFloat:
    """A module that kept float weights: its name, class and why."""

    name: str
    kind: str
    reason: str


@dataclass
class ConversionReport:
    """What ``convert`` did: converted layers (name, from, to), float leftovers, the first layer."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    left_float: list[LeftFloat] = field(default_factory=list)
    first_layer: str | None = None
    order: str = "module"  # how the first layer was chosen: "execution" or "module"
    notes: list[str] = field(default_factory=list)  # e.g. weights that were tied to a float module
    # what would stop csqc.save / compile (unsupported operators, export failures); checked
    # only with example_inputs
    problems: list[str] = field(default_factory=list)
    ops_checked: bool = False

    def summary(self) -> str:
        lines = [f"csqc.convert: {len(self.converted)} layer(s) converted, {len(self.left_float)} left float"]
        if self.first_layer is not None:
            how = ("first in execution order" if self.order == "execution"
                   else "first in module order: pass example_inputs to use execution order")
            lines.append(f"  first layer (float input unless quantize_first_input): {self.first_layer} ({how})")
        lines += [f"  left float: {f.name} ({f.kind}): {f.reason}" for f in self.left_float]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  will not compile: {p}" for p in self.problems]
        if not self.ops_checked:
            lines.append("  operators not checked: pass example_inputs to find unsupported ones before training")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "converted": [{"name": n, "from": a, "to": b} for n, a, b in self.converted],
            "left_float": [{"name": f.name, "kind": f.kind, "reason": f.reason} for f in self.left_float],
            "first_layer": self.first_layer,
            "order": self.order,
            "notes": list(self.notes),
            "ops_checked": self.ops_checked,
            "problems": list(self.problems),
        }


def conversion_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of the last ``csqc.convert`` of ``model``."""
    report = getattr(model, _REPORT_ATTR, None)
    if report is None:
        raise BadInput("this model has no conversion report: call csqc.convert on it first")
    return report


# -- deciding what a module becomes ---------------------------------------------------------------


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    cls = type(m)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def _probe_input(m: nn.Module) -> Tensor:
    g = torch.Generator().manual_seed(0)
    w = m.weight
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        shape = (2, m.in_channels, 5, 6)[:2 + len(m.kernel_size)]
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        size = [d * (k - 1) + 1 + 2 * s for k, s, d in zip(m.kernel_size, m.stride, m.dilation)]
        shape = (2, m.in_channels, *size)
    else:
        shape = (3, w.shape[0] if _is_hf_conv1d(m) else m.in_features)
    return torch.randn(shape, generator=g).to(device=w.device, dtype=w.dtype)


def _reference_forward(m: nn.Module) -> Callable[[Tensor], Tensor]:
    """The computation csqc's replacement performs, on ``m``'s own float weights."""
    if _is_hf_conv1d(m):
        return lambda x: F.linear(x, m.weight.t(), m.bias)
    base = _base_class(m)
    return lambda x: base.forward(m, x)


@torch.no_grad()
def _forward_differs(m: nn.Module) -> str | None:
    """Why ``m`` (a subclass with its own forward, or a Conv1D) does not compute what its CSQ
    replacement computes, or None when it does (on one random input)."""
    x = _probe_input(m)
    try:
        got, want = m(x), _reference_forward(m)(x)
    except Exception as e:  # any failure means csqc cannot vouch for the replacement
        return f"its forward could not be compared with {_base_name(m)}'s ({type(e).__name__}: {e})"
    if not isinstance(got, Tensor) or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        return f"its own forward does not compute what {_base_name(m)} does"
    return None


def _base_name(m: nn.Module) -> str:
    if _is_hf_conv1d(m):
        return "x @ weight + bias"
    return f"nn.{_base_class(m).__name__}"


def _base_class(m: nn.Module) -> type[nn.Module]:
    """The torch class whose computation ``m``'s CSQ replacement performs."""
    return next((c for c in (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d) if isinstance(m, c)),
                nn.Linear)


def _own_forward(m: nn.Module) -> bool:
    return type(m).forward is not _base_class(m).forward


def _numeric_padding(name: str, conv: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(t % 2 for t in total):
            raise BadInput(f"{name}: padding='same' with an even kernel pads unevenly, which csqc's convolutions "
                           f"cannot: list it in skip to keep it float")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def _csq_twin(name: str, m: nn.Module, n_bits: int, finalized: bool) -> _CSQMixin:
    """The CSQ layer computing what ``m`` (a Linear, Conv1D, Conv1d/2d or ConvTranspose1d/2d) computes, bits loaded from
    its float weight (``finalized``: the integer weight, no trainable bits)."""
    bias = m.bias is not None
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        if m.padding_mode != "zeros":  # torch itself accepts only zeros; a subclass might not
            raise BadInput(f"{name}: a transposed convolution with padding_mode={m.padding_mode!r}")
        csq_class = CSQConvTranspose1d if isinstance(m, nn.ConvTranspose1d) else CSQConvTranspose2d
        new = csq_class(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.output_padding,
                        m.groups, bias, m.dilation, n_bits, weight=m.weight.detach().float().cpu(), finalized=finalized)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        csq_class = CSQConv1d if isinstance(m, nn.Conv1d) else CSQConv2d
        new = csq_class(m.in_channels, m.out_channels, m.kernel_size, m.stride, _numeric_padding(name, m),
                        m.dilation, m.groups, bias, n_bits, weight=m.weight.detach().float().cpu(), finalized=finalized,
                        padding_mode=m.padding_mode)
    elif _is_hf_conv1d(m):
        new = CSQLinear(m.weight.shape[0], m.weight.shape[1], bias, n_bits,
                        weight=m.weight.detach().t().float().cpu(), finalized=finalized)
    else:
        new = CSQLinear(m.in_features, m.out_features, bias, n_bits, weight=m.weight.detach().float().cpu(),
                        finalized=finalized)
    if bias:
        new.bias.data.copy_(m.bias.detach())
    return new


def _float_weights(m: nn.Module) -> list[str]:
    """``name [shape]`` of ``m``'s own float parameters with at least two dimensions."""
    return [f"{n} {list(p.shape)}" for n, p in m.named_parameters(recurse=False)
            if p.dim() >= 2 and p.is_floating_point()]


def _left_float_reason(m: nn.Module) -> str | None:
    for cls, reason in _NOT_CONVERTED.items():
        if isinstance(m, cls):
            return reason
    weights = _float_weights(m)
    if weights:
        return f"has float parameters csqc does not quantize: {', '.join(weights)}"
    return None


# -- plan, first layer, build, install -------------------------------------------------------------


def _is_csq(m: nn.Module) -> bool:
    from .attention import CSQMultiheadAttention
    from .recurrent import CSQGRU, CSQLSTM

    return isinstance(m, (_CSQMixin, CSQMultiheadAttention, CSQLSTM, CSQGRU))


def _is_matrix_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)) or _is_hf_conv1d(m)


def _convertible(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or type(m) in (nn.LSTM, nn.GRU) or _is_matrix_layer(m)


def _plan(model: nn.Module, skip: set[str]) -> tuple[list[tuple[str, nn.Module]], list[LeftFloat]]:
    """The modules to convert (module order) and those left float, with reasons. A skipped or
    converted module's submodules are not visited (they go with it)."""
    chosen: list[tuple[str, nn.Module]] = []
    left: list[LeftFloat] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            kind = type(child).__name__
            if name in skip:
                left.append(LeftFloat(name, kind, "listed in skip"))
            elif _is_csq(child):
                continue
            elif _convertible(child):
                reason = _why_not_replaceable(child)
                if reason is None:
                    chosen.append((name, child))
                else:
                    left.append(LeftFloat(name, kind, reason))
            else:
                visit_with_own_parameters(child, name, kind, _left_float_reason(child))

    def visit_with_own_parameters(m: nn.Module, name: str, kind: str, reason: str | None) -> None:
        # a module's own float parameters stay float; the layers inside it are converted all the same
        at, before = len(left), len(chosen)
        visit(m, "" if name == "<model>" else name)
        inside = len(chosen) - before
        if reason is not None:
            note = f" (they stay as they are; the {inside} layer(s) inside it are converted)" if inside else ""
            left.insert(at, LeftFloat(name, kind, reason + note))

    if _convertible(model):
        left.append(LeftFloat("<model>", type(model).__name__,
                              "the model itself is one layer: convert replaces submodules, wrap it (nn.Sequential(layer))"))
        visit(model, "")
    else:
        visit_with_own_parameters(model, "<model>", type(model).__name__, _left_float_reason(model))
    return chosen, left


def _why_not_replaceable(m: nn.Module) -> str | None:
    """Why a convertible module must stay float (its own forward computes something else), or None."""
    if isinstance(m, nn.MultiheadAttention):
        if type(m).forward is not nn.MultiheadAttention.forward:
            return "a subclass of nn.MultiheadAttention with its own forward: csqc cannot tell what it computes"
        return None
    if _is_matrix_layer(m) and (_is_hf_conv1d(m) or _own_forward(m)):
        return _forward_differs(m)
    return None


def _tied_weights(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[str]:
    """Notes on converted layers whose parameters are shared with another module (a language
    model head tied to its embedding): the CSQ layer gets its own copy and the tie is broken."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name or "<model>")
    notes = []
    for name, m in chosen:
        others = {o for p in m.parameters() for o in owners.get(id(p), [])
                  if o != name and not o.startswith(name + ".")}
        if others:
            notes.append(f"{name}: its weights were shared with {', '.join(sorted(others))} (tied); "
                         f"the CSQ layer has its own copy, so the tie is broken")
    return notes


def _call(model: nn.Module, example_inputs) -> None:
    if isinstance(example_inputs, dict):
        model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        model(*example_inputs)
    else:
        model(example_inputs)


@torch.no_grad()
def execution_order(model: nn.Module, names: Iterable[str], example_inputs) -> list[str]:
    """``names`` (submodules of ``model``) in the order one forward pass of ``example_inputs``
    first calls them; modules never called come last, in the given order.

    The pass runs in eval mode without gradients; every module's training flag is restored.
    A pre-hook sits on every module, not only on ``names``: fused fast paths (e.g.
    ``nn.TransformerEncoderLayer``'s) decline on a hooked module, so the layers inside it run
    and are seen.
    """
    return _execution_order(model, names, example_inputs)[0]


def _execution_order(model: nn.Module, names: Iterable[str], example_inputs) -> tuple[list[str], list[str]]:
    """:func:`execution_order`, and the ``names`` the pass never called."""
    names = list(names)
    wanted = set(names)
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(module, args):
            if name in wanted and name not in seen:
                seen[name] = len(seen)
        return hook

    def calling(name: str, forward):
        def recorded(*args, **kwargs):
            record(name)(None, args)
            return forward(*args, **kwargs)
        return recorded

    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()]
    # the layers' own forward too, for as long as the pass runs: a model may call layer.forward(x),
    # which no hook sees (an attribute of the instance, deleted after, shadows the class's method)
    wrapped = [(name, m) for name, m in model.named_modules() if name in wanted and "forward" not in vars(m)]
    for name, m in wrapped:
        m.forward = calling(name, m.forward)
    try:
        model.eval()
        _call(model, example_inputs)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"convert: the model failed on example_inputs ({type(e).__name__}: {e})") from None
    finally:
        for h in hooks:
            h.remove()
        for _, m in wrapped:
            del m.forward
        for m, training in modes.items():
            m.training = training
    position = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: seen.get(n, len(seen) + position[n])), [n for n in names if n not in seen]


def _build(name: str, m: nn.Module, quantize_input: bool, o: "_Options") -> nn.Module:
    """The CSQ replacement of ``m`` (refusing unsupported forms of a convertible layer)."""
    if isinstance(m, nn.MultiheadAttention):
        from .attention import from_torch
    elif type(m) in (nn.LSTM, nn.GRU):
        from .recurrent import from_torch
    else:
        new = _csq_twin(name, m, o.n_bits, o.finalize)
        if o.act_bits is not None and quantize_input:
            new.input_quant = ActQuant(o.act_bits, o.act_clip, o.act_mode, symmetric=o.act_symmetric)
        return new.train(m.training)
    try:
        new = from_torch(m, o.n_bits, o.act_bits, act_clip=o.act_clip, act_mode=o.act_mode,
                         quantize_first_input=quantize_input)
    except BadInput as e:
        if type(m) in (nn.LSTM, nn.GRU):  # a float one does not compile either (the message says what does)
            raise BadInput(f"{name}: {e}") from None
        raise BadInput(f"{name}: {e}: list it in skip to keep it float") from None
    for quant in new.modules():  # attention and recurrent blocks build their own quantizers
        if isinstance(quant, ActQuant):
            quant.symmetric = o.act_symmetric
    if o.finalize:  # one module's bits at a time
        finalize_layers(new)
    return new.train(m.training)


@dataclass(frozen=True)
class _Options:
    n_bits: int
    act_bits: int | None
    act_clip: str | None
    act_mode: str
    finalize: bool = False
    act_symmetric: bool = True


def convert(
    model: nn.Module,
    n_bits: int = 8,
    act_bits: int | None = None,
    *,
    act_clip: str | None = None,
    act_mode: str = "dynamic",
    act_symmetric: bool = True,
    quantize_first_input: bool = False,
    skip: Iterable[str] = (),
    example_inputs=None,
    finalize: bool = False,
) -> nn.Module:
    """Replace the layers of ``model`` (in place) with CSQ layers and return ``model``.

    What is converted and what stays float is in the module docstring of
    :mod:`csqc.conversion`; :func:`csqc.conversion_report` gives the report (every layer left
    float with the reason), which is also logged as one warning when something stays float.
    Bits start from the float weights with all ``n_bits`` positions active.

    With ``act_bits`` (1..8; None or 0, the CSQ reference's ``act_bit=0``, keep activations
    float), the input of each quantized layer is quantized too, except the first
    layer's unless ``quantize_first_input``. The first layer is the first one executed on
    ``example_inputs`` (a tensor, a tuple of tensors or a dict of keyword arguments; one
    forward pass in eval mode without gradients); without them it is the first in module order,
    which is wrong for models that register a head before their stem (DenseNet, RegNet...).
    With ``example_inputs`` (tensors) the converted model is also exported once, and every
    operator csqc cannot compile is in the report's ``problems`` before any training is spent.
    ``finalize=True`` (post-training quantization, no CSQ training): every layer comes out
    finalized with all ``n_bits`` positions, exactly what ``csqc.finalize`` would give, without
    ever allocating the trainable bits (2 * n_bits floats per weight): peak memory stays near the
    float model's.
    ``act_symmetric=False`` quantizes activations asymmetrically (unsigned codes with a zero
    point, ``csqc.layers.ActQuant``): an 8-bit activation then fits one byte.
    Modules named in ``skip`` (and their submodules) stay float. Nothing is changed when a
    layer is refused (:class:`~csqc.errors.BadInput`).
    """
    if act_bits == 0:  # the CSQ reference's act_bit=0: float activations
        act_bits = None
    if act_bits is not None and (type(act_bits) is not int or not 1 <= act_bits <= 8):
        raise BadInput(f"act_bits must be 1..8, or None (0, as the CSQ reference writes it) for float activations, "
                       f"got {act_bits!r}")
    o = _Options(n_bits, act_bits, act_clip, act_mode, finalize, bool(act_symmetric))
    chosen, left = _plan(model, set(skip))
    names = [name for name, _ in chosen]
    by_execution = example_inputs is not None and bool(names)
    never_called: list[str] = []
    if by_execution:
        names, never_called = _execution_order(model, names, example_inputs)
    first = names[0] if names else None
    notes = _tied_weights(model, chosen)
    # a layer whose weight the model reads itself (Hugging Face's reference Mamba scan:
    # F.conv1d(x, conv1d.weight), dt_proj.weight @ ...) computes with the quantized weight, in float
    notes += [f"{name}: the model never calls it on example_inputs (it reads the weight itself, or skips the "
              "layer): its quantized weight is used as a float tensor, with no activation quantization or "
              "quantized kernel" for name in never_called]
    # build every replacement before installing any, so a refused layer leaves the model as it was
    replacements = [_build(name, m, name != first or quantize_first_input, o) for name, m in chosen]
    converted = []
    for (name, m), new in zip(chosen, replacements):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new)
        converted.append((name, type(m).__name__, type(new).__name__))
    report = ConversionReport(converted, left, first, "execution" if by_execution else "module", notes)
    if example_inputs is not None and not isinstance(example_inputs, dict):
        from .modelfile import capture_problems  # one torch.export of a finalized copy

        report.problems, report.ops_checked = capture_problems(model, example_inputs), True
    setattr(model, _REPORT_ATTR, report)
    (log.warning if left or report.problems else log.info)("%s", report.summary())
    return model
