"""Activation-quantizer idioms of other QAT code bases, recognised in a captured graph.

A model trained outside csqc quantizes its activations with plain tensor code, which
``torch.export`` records as aten ops (``round``, ``abs``, ``max``, ``fake_quantize_...``) that
csqc has no float form for. This module rewrites the exported ``torch.fx`` graph before
capture's handlers run: each recognised quantizer becomes one ``csqc::act_quant`` call, so the
IR gets a ``quantize`` node with integer codes, and the node records the idiom it came from
(``attrs["idiom"]``, shown by ``csqc inspect`` and the compile report).

Recognised (``v`` the quantized tensor, ``L = 2^b - 1`` for 1 <= b <= 8):

1. ``fake_quantize_per_tensor_affine(x, scale, 0, -L, L)`` -> signed static quantizer with
   ``S = float32(scale * L)``; ``(x, scale, 0, 0, L)`` -> unsigned (a relu goes first where x
   may be negative: torch maps negatives to code 0). torch's codes are
   ``rint(x * float32(1 / scale))``, csqc's ``rint((|x| * L) / S)``: two float orders. They agree
   except on inputs within a few float32 ulps of a rounding tie, where one code can differ by
   one; with a power-of-two scale no difference was found on tie probes. The dequantized
   values differ in the last ulp (``code * scale`` vs ``(code * S) / L``).
   ``(x, scale, zp, 0, L)`` with ``0 < zp <= L`` -> static asymmetric quantizer with
   ``R = float32(scale * L)`` and zero point ``zp`` (``csqc::act_quant_asymmetric``); torch's
   codes are ``clamp(rint(x * float32(1 / scale)) + zp, 0, L)``, csqc's
   ``clamp(rint((x * L) / R) + zp, 0, L)``: the same caveat near a tie unless the scale is a
   power of two. A zero point outside ``0..L`` or with a signed grid, a grid
   ``-2^b .. 2^b - 1``, more than 8 bits or another grid: recognised but left float, as
   ``clip`` to the grid's range (no rounding), with the reason in ``attrs["idiom"]``.
   (``torch.ao.quantization.FakeQuantize`` modules do not export: their forward branches on
   the ``observer_enabled`` buffer, a data-dependent guard torch.export refuses.)
2. The CSQ reference's max-abs quantizer as plain tensor code, ``round(|x| * L / S) / L * S *
   sign(x)`` with ``S = max|x|`` (``max`` or ``amax`` over all axes), or ``round(x * L / S) ...``
   without ``abs``/``sign`` -> csqc's dynamic quantizer. Same codes where the graph computes
   ``(|x| * L) / S`` in that order (the reference's), and 0 for an all-zero input where the
   plain code gives NaN.
3. A clipped value ``c`` = PACT ``clamp(x, 0, alpha)`` / ``min(relu(x), alpha)``, ``relu6(x)``,
   ``hardtanh(x, 0, a)`` (or a symmetric ``clamp(x, -a, a)``), then ``round(c * L / a) * a / L``
   -> csqc's static quantizer with ``S = a``, unsigned for a lower bound 0. The clip stays in
   the graph; csqc's codes are the same ``rint((c * L) / a)`` where the graph uses that order.

Each quantizer may end in the straight-through form ``v + (q - v).detach()``, replaced whole.
A product whose factors do not multiply out to ``L / S`` and ``S / L`` (within 1e-6), or whose
scale is not the clip's bound, is left alone (capture then names the unsupported ``round``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch.fx import Graph, Node

from . import ops  # noqa: F401  (registers torch.ops.csqc.act_quant)

__all__ = ["Idiom", "IDIOM_META", "IDIOM_OPS", "rewrite_idioms", "idiom_attrs"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten

IDIOM_META = "csqc_idiom"  # fx node meta key: the Idiom a rewritten node stands for

# aten ops that only appear inside the idioms: a model file may contain them (programcheck)
IDIOM_OPS = (
    _aten.abs.default, _aten.sign.default, _aten.round.default, _aten.max.default, _aten.amax.default,
    _aten.clamp.Tensor, _aten.fake_quantize_per_tensor_affine.default,
    _aten.fake_quantize_per_tensor_affine.tensor_qparams,
)

_MAX_BITS = 8  # csqc's activation codes: 1..8 bits (ir.TensorType)
_REL_TOL = 1e-6
_MUL = (_aten.mul.Tensor, _aten.mul.Scalar)
_DIV = (_aten.div.Tensor, _aten.div.Scalar)
_FAKE_QUANT = (_aten.fake_quantize_per_tensor_affine.default, _aten.fake_quantize_per_tensor_affine.tensor_qparams)


@dataclass(frozen=True)
class Idiom:
    """One recognised quantizer: its name, whether it got csqc codes, and what to know."""

    name: str
    quantized: bool = True
    unsigned: bool = False  # codes on the grid 0..L: negative inputs become 0
    note: str = ""

    @property
    def label(self) -> str:
        state = "" if self.quantized else "left float: "
        return f"{self.name} ({state}{self.note})" if self.note else self.name


def idiom_attrs(fx: Node) -> dict:
    """The IR attributes recording the idiom a rewritten fx node stands for (none: csqc's own)."""
    idiom = fx.meta.get(IDIOM_META)
    return {"idiom": idiom.label} if isinstance(idiom, Idiom) else {}


def _register_fake_quant_shapes() -> torch.library.Library | None:
    """Meta kernels for torch's fake-quantize ops, which have none (torch 2.13).

    Without them ``torch.export`` with a symbolic batch (``csqc.save``) stops with
    ``UnsupportedOperatorException: aten.fake_quantize_per_tensor_affine_cachemask``. The ops are
    elementwise: the output is shaped like ``x``, the mask too (bool). A torch that has its
    own kernels keeps them.
    """
    names = ("fake_quantize_per_tensor_affine_cachemask", "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams")
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{n}", "Meta")]
    if not missing:
        return None
    lib = torch.library.Library("aten", "IMPL")

    def shapes(x, *args):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    for name in missing:
        lib.impl(name, shapes, "Meta")
    return lib


_FAKE_QUANT_SHAPES = _register_fake_quant_shapes()  # kept alive: the registration lasts while the library does


# -- reading the graph ---------------------------------------------------------------------------


def _is(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _number(arg, consts: Mapping[str, torch.Tensor]) -> float | None:
    """A scalar the graph fixes: a literal, a one-element constant tensor, or ``zeros``/``full``."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, Node):
        return None
    if arg.op == "placeholder" and arg.name in consts and consts[arg.name].numel() == 1:
        return float(consts[arg.name].detach().reshape(()).item())
    if _is(arg, (_aten.zeros.default, _aten.zeros_like.default)):
        return 0.0
    if _is(arg, (_aten.full.default,)) and isinstance(arg.args[1], (int, float)):
        return float(arg.args[1])
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL)


def _levels_bits(levels: float) -> int | None:
    """b where ``levels`` = 2^b - 1 (1 <= b <= 8), else None."""
    for b in range(1, _MAX_BITS + 1):
        if _close(levels, 2**b - 1):
            return b
    return None


@dataclass
class _Product:
    """A chain of mul/div read as numerator and denominator factors."""

    num: list
    den: list
    nodes: list  # the mul/div nodes of the chain

    def numeric(self, consts) -> float | None:
        """The product of the factors that are numbers, with the others removed first."""
        value = 1.0
        for f in self.num:
            v = _number(f, consts)
            if v is None:
                return None
            value *= v
        for f in self.den:
            v = _number(f, consts)
            if not v:
                return None
            value /= v
        return value


def _upstream(arg) -> _Product:
    """``arg`` as a product: mul/div nodes are opened, everything else is a factor."""
    if _is(arg, _MUL):
        a, b = _upstream(arg.args[0]), _upstream(arg.args[1])
        return _Product(a.num + b.num, a.den + b.den, a.nodes + b.nodes + [arg])
    if _is(arg, _DIV):
        a, b = _upstream(arg.args[0]), _upstream(arg.args[1])
        return _Product(a.num + b.den, a.den + b.num, a.nodes + b.nodes + [arg])
    return _Product([arg], [], [])


def _downstream(start: Node) -> Iterable[tuple[Node, _Product]]:
    """Each node of the single-user mul/div chain after ``start``, with the factors so far."""
    cur, prod = start, _Product([], [], [])
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if _is(user, _MUL):
            other = user.args[1] if user.args[0] is cur else user.args[0]
            prod = _Product(prod.num + [other], prod.den, prod.nodes + [user])
        elif _is(user, _DIV) and user.args[0] is cur:
            prod = _Product(prod.num, prod.den + [user.args[1]], prod.nodes + [user])
        else:
            return
        cur = user
        yield cur, prod


def _straight_through(q: Node) -> tuple[Node, list[Node]]:
    """``v + (q - v).detach()`` ends in the add (same value as q); else q itself."""
    if len(q.users) != 1:
        return q, []
    sub = next(iter(q.users))
    if not (_is(sub, (_aten.sub.Tensor,)) and sub.args[0] is q and len(sub.users) == 1):
        return q, []
    detach = next(iter(sub.users))
    if not (_is(detach, (_aten.detach.default, _aten.alias.default)) and len(detach.users) == 1):
        return q, []
    add = next(iter(detach.users))
    v = sub.args[1]
    if _is(add, (_aten.add.Tensor,)) and set(add.args[:2]) == {v, detach} and len(add.args) == 2:
        return add, [sub, detach, add]
    return q, []


# -- the quantizers ------------------------------------------------------------------------------


@dataclass
class _Match:
    source: Node  # the value csqc quantizes
    bits: int
    static_scale: float  # 0: dynamic max-abs
    idiom: Idiom
    end: Node  # the node whose uses the quantizer takes over
    matched: list[Node]  # nodes that go once unused
    zero_point: int | None = None  # set: the static asymmetric quantizer


def _max_abs_of(node) -> Node | None:
    """x where ``node`` is ``max(|x|)`` over all axes."""
    if _is(node, (_aten.max.default,)):
        src = node.args[0]
    elif _is(node, (_aten.amax.default,)):
        src, dims = node.args[0], list(node.args[1]) if len(node.args) > 1 else []
        rank = len(src.meta["val"].shape) if isinstance(src, Node) and "val" in src.meta else -1
        if dims and (rank < 1 or sorted(d % rank for d in dims) != list(range(rank))):
            return None
    else:
        return None
    return src.args[0] if _is(src, (_aten.abs.default,)) else None


def _clip_bounds(node, consts) -> tuple[float, float] | None:
    """(lo, hi) of a clipping node with constant bounds: clamp, relu6, hardtanh, min(relu(x), a)."""
    if _is(node, (_aten.relu6.default,)):
        return 0.0, 6.0
    if _is(node, (_aten.hardtanh.default,)):
        lo = node.args[1] if len(node.args) > 1 else -1.0
        hi = node.args[2] if len(node.args) > 2 else 1.0
        return float(lo), float(hi)
    if _is(node, (_aten.clamp.default, _aten.clamp.Tensor)):
        lo = _number(node.args[1], consts) if len(node.args) > 1 else None
        hi = _number(node.args[2], consts) if len(node.args) > 2 else None
        return (lo, hi) if lo is not None and hi is not None else None
    if _is(node, (_aten.min.other, _aten.minimum.default)):
        for x, a in (node.args[:2], node.args[1::-1]):
            hi = _number(a, consts)
            if hi is not None and (_is(x, (_aten.relu.default,)) or (_is(x, (_aten.clamp_min.default,)) and x.args[1] == 0)):
                return 0.0, hi
    return None


def _clip_name(node: Node, lo: float) -> str:
    if _is(node, (_aten.relu6.default,)):
        return "ReLU6 clip"
    return "PACT clip" if lo == 0 else "symmetric clamp"


def _match_round(rnd: Node, consts) -> _Match | None:
    up = _upstream(rnd.args[0])
    clips = [f for f in up.num if _clip_bounds(f, consts) is not None]
    static = _match_static(rnd, up, clips[0], consts) if len(clips) == 1 else None
    return static or _match_dynamic(rnd, up, consts)


def _match_static(rnd: Node, up: _Product, clip: Node, consts) -> _Match | None:
    lo, hi = _clip_bounds(clip, consts)
    if not (hi > 0 and (lo == 0 or lo == -hi)):
        return None
    rest = _Product([f for f in up.num if f is not clip], up.den, [])
    m = rest.numeric(consts)
    bits = _levels_bits(m * hi) if m is not None else None
    if bits is None:
        return None
    levels = 2**bits - 1
    for end, down in _downstream(rnd):
        d = down.numeric(consts)
        if d is not None and _close(d, hi / levels):
            exact = _in_csqc_order(rnd.args[0], clip, levels, hi, consts)
            note = "" if exact else "float order differs from (v * L) / S: a code can differ by one near a tie"
            idiom = Idiom(_clip_name(clip, lo), unsigned=lo == 0, note=note)
            out, ste = _straight_through(end)
            return _Match(clip, bits, hi, idiom, out, [rnd] + up.nodes + down.nodes + ste)
    return None


def _match_dynamic(rnd: Node, up: _Product, consts) -> _Match | None:
    scales = [f for f in up.den if _max_abs_of(f) is not None]
    values = [f for f in up.num if _number(f, consts) is None]
    if len(scales) != 1 or len(values) != 1:
        return None
    s = scales[0]
    x = _max_abs_of(s)
    v = values[0]
    with_abs = _is(v, (_aten.abs.default,)) and v.args[0] is x
    if not (with_abs or v is x):
        return None
    m = _Product([f for f in up.num if f is not v], [f for f in up.den if f is not s], []).numeric(consts)
    bits = _levels_bits(m) if m is not None else None
    if bits is None:
        return None
    for end, down in _downstream(rnd):
        scale_f = [f for f in down.num if _max_abs_of(f) is x]
        sign_f = [f for f in down.num if _is(f, (_aten.sign.default,)) and f.args[0] is x]
        if len(scale_f) != 1 or len(sign_f) != int(with_abs):
            continue
        rest = _Product([f for f in down.num if f not in scale_f + sign_f], down.den, [])
        d = rest.numeric(consts)
        if d is not None and _close(d, 1 / (2**bits - 1)):
            exact = _in_csqc_order(rnd.args[0], v, 2**bits - 1, s, consts)
            note = "" if exact else "float order differs from (|x| * L) / S: a code can differ by one near a tie"
            out, ste = _straight_through(end)
            extra = [v] + scale_f + sign_f + [s, s.args[0]]
            return _Match(x, bits, 0.0, Idiom("CSQ max-abs STE", note=note), out,
                          [rnd] + up.nodes + down.nodes + ste + extra)
    return None


def _in_csqc_order(arg: Node, value: Node, levels: int, scale, consts) -> bool:
    """Whether ``arg`` is ``(value * L) / S``, csqc's own order (hence the same codes)."""
    if not (_is(arg, _DIV) and _is(arg.args[0], _MUL)):
        return False
    a, b = arg.args[0].args[:2]
    l_factor = b if a is value else a if b is value else None
    if l_factor is None or _number(l_factor, consts) != float(levels):
        return False
    s = arg.args[1]
    return s is scale or (isinstance(scale, float) and _number(s, consts) == scale)


def _match_fake_quant(fq: Node, consts) -> _Match | None:
    x, scale, zero_point, qmin, qmax = fq.args[:5]
    scale, zero_point = _number(scale, consts), _number(zero_point, consts)
    if scale is None or zero_point is None or not (math.isfinite(scale) and scale > 0):
        return None
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    levels, bits = int(qmax), _levels_bits(int(qmax))
    exact = math.frexp(scale32)[0] == 0.5
    note = "" if exact else "scale not a power of two: a code can differ by one near a tie"
    asymmetric = zero_point != 0 and qmin == 0 and bits is not None and zero_point == int(zero_point) \
        and 0 < zero_point <= levels
    if asymmetric:
        static = float(torch.tensor(scale32, dtype=torch.float32) * levels)
        return _Match(x, bits, static, Idiom("torch fake_quantize", note=note), fq, [fq], int(zero_point))
    if zero_point != 0:
        reason = f"zero_point {zero_point:g} with grid {qmin}..{qmax}: csqc's zero point needs the grid 0..L"
    elif qmin == -qmax - 1:
        reason = f"grid {qmin}..{qmax}: csqc's signed grid is symmetric (-{qmax}..{qmax})"
    elif bits is None or qmin not in (0, -qmax):
        reason = f"grid {qmin}..{qmax} is not csqc's (-L..L or 0..L with L = 2^b - 1, b <= {_MAX_BITS})"
    else:
        static = float(torch.tensor(scale32, dtype=torch.float32) * levels)
        return _Match(x, bits, static, Idiom("torch fake_quantize", unsigned=qmin == 0, note=note), fq, [fq])
    return _Match(x, 0, 0.0, Idiom("torch fake_quantize", quantized=False, note=reason), fq, [fq])


# -- the rewrite ---------------------------------------------------------------------------------


def _copy_meta(new: Node, old: Node, idiom: Idiom) -> None:
    for key in ("val", "nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    new.meta[IDIOM_META] = idiom


def _constant_clamp(graph: Graph, clip: Node, consts) -> Node:
    """``clamp.Tensor`` with constant bounds as ``clamp(x, lo, hi)`` (the form capture handles)."""
    if not _is(clip, (_aten.clamp.Tensor,)):
        return clip
    lo, hi = _clip_bounds(clip, consts)
    with graph.inserting_before(clip):
        plain = graph.call_function(_aten.clamp.default, (clip.args[0], lo, hi))
    for key in ("val", "nn_module_stack", "stack_trace"):
        if key in clip.meta:
            plain.meta[key] = clip.meta[key]
    clip.replace_all_uses_with(plain)
    bounds = [a for a in clip.args[1:3] if isinstance(a, Node) and a.op == "call_function"]
    graph.erase_node(clip)
    _erase_unused(graph, bounds)  # a zeros() lower bound
    return plain


def _apply(graph: Graph, m: _Match, consts) -> None:
    source = _constant_clamp(graph, m.source, consts) if m.idiom.quantized else m.source
    name = m.idiom.name.split()[-1 if m.idiom.name.startswith("torch") else 0].lower()  # fake_quantize, csq, pact...
    with graph.inserting_before(m.end):
        if m.idiom.quantized and m.zero_point is not None:
            new = graph.create_node("call_function", torch.ops.csqc.act_quant_asymmetric.default,
                                    (source, m.bits, m.static_scale, m.zero_point), {}, f"{name}_quant")
        elif m.idiom.quantized:
            new = graph.create_node("call_function", torch.ops.csqc.act_quant.default,
                                    (source, m.bits, m.static_scale), {}, f"{name}_quant")
        else:  # left float: the grid's range, no rounding
            x, scale, zero_point, qmin, qmax = m.end.args[:5]
            s = float(torch.tensor(_number(scale, consts), dtype=torch.float32))
            z = _number(zero_point, consts)
            new = graph.create_node("call_function", _aten.clamp.default, (x, (qmin - z) * s, (qmax - z) * s), {},
                                    f"{name}_float")
    _copy_meta(new, m.end, m.idiom)
    m.end.replace_all_uses_with(new)
    _erase_unused(graph, m.matched + [m.end])


def _erase_unused(graph: Graph, nodes: list[Node]) -> None:
    """Erase those of ``nodes`` nothing reads any more (a node other code reads stays)."""
    pending = [n for n in dict.fromkeys(nodes) if n.op == "call_function" and not getattr(n, "_erased", False)]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.remove(n)
                changed = True


def rewrite_idioms(graph: Graph, consts: Mapping[str, torch.Tensor]) -> list[Idiom]:
    """Replace every recognised quantizer in ``graph`` (in place; see module docstring).

    ``consts``: placeholder name -> tensor for the program's parameters, buffers and constants.
    Returns the idioms found, in graph order.
    """
    found = []
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or node.op != "call_function":
            continue  # erased by an earlier match
        if node.target in _FAKE_QUANT:
            m = _match_fake_quant(node, consts)
        elif node.target == _aten.round.default and len(node.args) == 1:
            m = _match_round(node, consts)
        else:
            continue
        if m is None:
            continue
        _apply(graph, m, consts)
        where = m.end.meta.get("nn_module_stack") and list(m.end.meta["nn_module_stack"].values())[-1][0]
        (log.info if m.idiom.quantized else log.warning)("quantizer idiom at %s: %s", where or node.name, m.idiom.label)
        found.append(m.idiom)
    return found
