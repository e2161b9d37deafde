"""Capture's shared state: the context every op handler writes IR nodes through, and the
small helpers that read an FX node (its module path, type, arguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops  # noqa: F401  (registers the torch.ops.csqc operators the handlers name)
from ..errors import BadInput
from ..ir import FLOAT_DTYPES, INT_DTYPES, Node, QuantSpec, TensorType
from ..optable import output_nonneg


_aten = torch.ops.aten


class _Unsupported(Exception):
    """Raised by a handler for a form of a supported op it cannot translate."""


@dataclass
class _Ctx:
    program: torch.export.ExportedProgram
    nodes: list[Node] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # fx node name -> IR value name
    consts: dict[str, torch.Tensor] = field(default_factory=dict)  # fx placeholder -> tensor
    nonneg: set[str] = field(default_factory=set)  # IR values known to be >= 0
    taken: set[str] = field(default_factory=set)
    folded: dict[str, str] = field(default_factory=dict)  # fx node evaluated at capture -> parameter base name
    integer_inputs: set[str] = field(default_factory=set)  # IR inputs holding token ids
    id_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # their shapes
    constant_derived: set[str] = field(default_factory=set)  # fx nodes computed from constants only
    int_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # IR values holding integers: [lo, hi]
    declared_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs' [low, high)
    folded_bytes: int = 0  # what constant folding has allocated so far (capture.folding bounds it)

    def name(self, base: str) -> str:
        base = base.replace("/", ".") or "v"
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    def tensor(self, arg) -> torch.Tensor:
        """A constant tensor argument (parameter, buffer or lifted constant)."""
        if isinstance(arg, torch.fx.Node) and arg.name in self.consts:
            return self.consts[arg.name]
        raise _Unsupported("expected a constant tensor (parameter or buffer) here")

    def is_const(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and arg.name in self.consts

    def param(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.params[name] = np.ascontiguousarray(array)
        return name

    def value(self, arg, base: str = "const") -> str:
        if isinstance(arg, torch.fx.Node):
            if arg.name in self.env:
                return self.env[arg.name]
            if arg.name in self.consts and getattr(self.consts[arg.name], "numel", lambda: 1)() == 0:
                raise _Unsupported("a tensor of no elements read by an op other than cat")
            if arg.name in self.folded:
                return self._folded_param(arg.name)
            if arg.name in self.consts:
                t = self.consts[arg.name].detach().cpu().numpy()
                # (a constant condition read as a runtime value: 0.0 / 1.0, as computed ones are)
                v = self.param(base, t.astype(np.float32) if t.dtype.kind in "fb" else t)
                self.env[arg.name] = v
                if (t >= 0).all():
                    self.nonneg.add(v)
                return v
        raise _Unsupported(f"unsupported argument {arg!r}")

    def _folded_param(self, fx_name: str) -> str:
        """A constant computed at capture time, as the float32 parameter runtime ops read."""
        t = self.consts[fx_name]
        if not isinstance(t, torch.Tensor):
            raise _Unsupported(f"a folded constant of type {type(t).__name__} used as a tensor")
        a = t.detach().cpu().numpy()
        if a.dtype.kind == "f" and not np.isfinite(a.astype(np.float32)).all():
            raise BadInput(f"constant {self.folded[fx_name]!r} computed from the model's constants is NaN or "
                           "infinite in float32; no runtime can match it bit for bit")
        as_f32 = a.astype(np.float32)
        if a.dtype.kind in "biu" and not (as_f32.astype(np.float64) == a.astype(np.float64)).all():
            raise _Unsupported(f"integer constant {self.folded[fx_name]!r} is not exact in float32")
        v = self.param(self.folded[fx_name], as_f32)
        self.env[fx_name] = v
        if (as_f32 >= 0).all():
            self.nonneg.add(v)
        return v

    def emit(self, fx: torch.fx.Node, op: str, inputs, ttype: TensorType | None = None, attrs=None,
             quant: QuantSpec | None = None, base: str | None = None) -> str:
        name = self.name(base or module_path(fx) or fx.name)
        ttype = ttype or _type_of(fx)
        if ttype.dtype in INT_DTYPES and ttype.qbits is None:  # integers the model computes: exact float32
            ttype = TensorType(ttype.shape)  # (capture.integers bounds them under 2^24)
        if not ttype.shape and any(self.params[i].shape == (1,) for i in inputs if i in self.params):
            # a scalar the model reduced to, with a constant: csqc's scalar parameters are [1]
            raise _Unsupported("arithmetic on a value reduced to a single number (reduce with keepdim=True)")
        node = Node(name, op, tuple(inputs), ttype, attrs or {}, quant, module_path(fx))
        self.nodes.append(node)
        # the op table's sign rule: unsigned codes for quantizers of values known to be >= 0
        if output_nonneg(op, [i in self.nonneg for i in node.inputs], node.attrs):
            self.nonneg.add(name)
        return name


def module_path(fx: torch.fx.Node) -> str:
    stack = fx.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").replace("L['self']", "").replace("_modules['", "").replace("']", "")


def _type_of(fx: torch.fx.Node) -> TensorType:
    """``fx``'s output type; a condition the model computes (bool) is float32 0.0 / 1.0 in the IR
    (capture.elementwise composes comparisons, logic and selects of them exactly)."""
    val = fx.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise _Unsupported(f"output of {fx.name} is not a single tensor")
    dtype = str(val.dtype).replace("torch.", "")
    if dtype == "bool":
        dtype = "float32"
    if dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise _Unsupported(f"{dtype} values (csqc computes in float32)")
    return TensorType(tuple(int(s) for s in val.shape), dtype)


def _is_condition(arg) -> bool:
    """Whether ``arg`` is a boolean tensor (a mask, a comparison's result)."""
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _pair(v, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v * 2 if len(v) == 1 else v


def _arg(fx: torch.fx.Node, i: int, name: str, default=None):
    if len(fx.args) > i:
        return fx.args[i]
    return fx.kwargs.get(name, default)


def _base(fx: torch.fx.Node, op: str) -> str:
    return f"{module_path(fx) or fx.name}.{op}"


def _shape_of(arg) -> tuple[int, ...]:
    return _type_of(arg).shape


def _typed(ctx: _Ctx, fx: torch.fx.Node, op: str, inputs, shape, suffix: str, attrs=None) -> str:
    """An intermediate node of a decomposition: its own shape, named ``<module>.<suffix>``."""
    return ctx.emit(fx, op, inputs, TensorType(tuple(int(s) for s in shape)), attrs, base=_base(fx, suffix))


def _scalar(ctx: _Ctx, fx: torch.fx.Node, value: float, what: str) -> str:
    name = ctx.param(_base(fx, what), np.array(value, dtype=np.float32))
    if value >= 0:
        ctx.nonneg.add(name)
    return name
