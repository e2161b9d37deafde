"""One runtime's activation codes forced into another (``csqc verify``): a code flipped at a
rounding tie told apart from a model that computes something else.

Two runtimes that sum a float layer in different orders (PyTorch's BatchNorm unfolded, the
interpreter's folded; ONNX Runtime's float first convolution) mostly differ by a few ulps and
no code changes. But a layer's outputs take few distinct values (integer accumulators times one
factor per channel), so whole sets of them can sit exactly on a rounding tie of the next
quantizer, and there the two orders round apart: on a random-weight ResNet-18, 63 codes of
36,864 at the second quantizer. Under dynamic scales those flips move every later scale, and a
model whose logits are nearly equal (random weights, noise inputs) changes its top-1, although
nothing was captured or compiled wrongly.

Forcing separates the two questions. One runtime is run again with the other's codes at every
quantizer, and each forced code is checked against the first runtime's own input there: it
must lie within half a step plus :data:`TIE_SLACK` of that runtime's unrounded value (a flip at
a tie, never another code), its scale within ``rtol``. With no flip left to carry, the outputs
must then agree within the exact pairs' tolerance.

* :class:`ForcedRun`: PyTorch (the model's own graph) with the golden run's codes at each
  ``csqc::act_quant``, under the golden graph's scales (a calibrated graph's static ones: PyTorch
  then runs the calibrated model).
* :class:`ForcedInterpreter`: the golden interpreter with the codes a runtime exposes
  (``<layer>.xq``, ``.scale``, ``.zero_point``: ONNX Runtime, artifacts), for the runtimes whose
  codes left the golden run after a float layer rounded apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .interpreter import QValue
from .ir import Graph

__all__ = ["ForcedInterpreter", "ForcedRun", "TIE_SLACK", "code_problems"]

# How far (in steps) a forced code may sit beyond half a step from PyTorch's unrounded value.
# With the codes forced, PyTorch's input to a quantizer differs from the golden run's only by
# the float order of the ops since the last quantizer: about 1e-5 of a step; a wrong code is at
# least half a step further away.
TIE_SLACK = 1e-3

_SHOWN_PROBLEMS = 4  # problems a report lists (the count says how many more)


def code_problems(name: str, x: np.ndarray, q: QValue, static_scale: float, rtol: float,
                  zero_point: int = 0, values_of: str = "PyTorch") -> tuple[int, list[str]]:
    """``(flips, problems)`` of forcing codes ``q`` where a quantizer sees ``x`` (in the runtime
    ``values_of`` names).

    ``flips``: codes that runtime would have rounded to the other neighbour (ties); ``problems``:
    what rules the forcing out (a scale beyond ``rtol`` of its own, a code more than half a
    step plus :data:`TIE_SLACK` from its unrounded value), empty when every code is a tie's
    other neighbour at most. ``static_scale`` and ``zero_point``: the quantizer's own
    (``static_scale <= 0``: dynamic)."""
    x = np.asarray(x, np.float64)
    levels = q.levels
    if q.asymmetric:
        if static_scale > 0:
            scale, zp_exact = static_scale, float(zero_point)
        else:
            lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
            scale = hi - lo
            zp_exact = -lo * levels / scale if scale > 0 else 0.0
    else:
        scale = static_scale if static_scale > 0 else float(np.abs(x).max(initial=0.0))
        zp_exact = 0.0
    problems = []
    golden_scale = float(q.scale)
    if abs(golden_scale - scale) > rtol * abs(scale):
        problems.append(f"{name}: scale {golden_scale:.9g}, {values_of}'s {scale:.9g}")
        return 0, problems
    if scale == 0:
        bad = int(np.count_nonzero(q.codes - np.int32(q.zero_point)))
        return 0, [f"{name}: {bad} nonzero code(s) where {values_of}'s scale is 0"] if bad else []
    if q.asymmetric and abs(zp_exact - q.zero_point) > 0.5 + TIE_SLACK:
        return 0, [f"{name}: zero point {q.zero_point}, {values_of}'s {zp_exact:.6g} unrounded"]
    # its unrounded code, relative to the zero point the golden run used (a zero point that
    # itself flipped on a tie shifts both sides alike), clamped as the quantizer clamps
    exact = x * levels / scale
    lo, hi = (-q.zero_point, levels - q.zero_point) if q.asymmetric else (-levels, levels)
    if q.asymmetric or static_scale > 0:
        exact = np.clip(exact, lo, hi)
    centered = q.centered().astype(np.float64)
    off = np.abs(exact - centered)
    bad = off > 0.5 + TIE_SLACK
    if bad.any():
        i = np.unravel_index(int(np.argmax(off)), off.shape)
        problems.append(f"{name}: {int(bad.sum())} code(s) more than half a step from {values_of}'s values "
                        f"(worst at {tuple(int(v) for v in i)}: code {int(centered[i])}, {values_of} {exact[i]:.6g})")
    return int(np.count_nonzero(_own_codes(x, q, scale, static_scale, zero_point) != q.codes)), problems


def _own_codes(x: np.ndarray, q: QValue, scale: float, static_scale: float, zero_point: int) -> np.ndarray:
    """The quantizer's codes of ``x`` in its own float32 arithmetic (``csqc.ops``; round half to even)."""
    f32, x = np.float32, np.asarray(x, np.float32)
    levels = f32(q.levels)
    if q.asymmetric:
        r = f32(scale)
        zp = f32(zero_point) if static_scale > 0 else np.round((-f32(min(float(x.min(initial=0.0)), 0.0)) * levels) / r)
        return np.clip(np.round((x * levels) / r) + zp, 0, levels)
    magnitude = np.round((np.abs(x) * levels) / f32(scale))
    if static_scale > 0:
        magnitude = np.minimum(magnitude, levels)
    return np.sign(x) * magnitude


@dataclass
class _Tally:
    """What forcing one runtime's codes into another found, over every call."""

    codes_from: str  # whose codes were forced ("the golden run")
    values_of: str  # the runtime they were forced into ("PyTorch")
    quantizers: int = 0
    codes: int = 0
    flips: int = 0
    flips_at: dict[str, int] = field(default_factory=dict)  # quantizer -> flips, in graph order once known
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def first_flip(self) -> str | None:
        """The first quantizer in graph order with a flip."""
        return next((name for name, n in self.flips_at.items() if n), None)

    def _count(self, name: str, size: int, flips: int, problems: list[str]) -> None:
        self.quantizers += 1
        self.codes += size
        self.flips += flips
        self.flips_at[name] = self.flips_at.get(name, 0) + flips
        self.problem_count += len(problems)
        self.problems += problems[: max(0, _SHOWN_PROBLEMS - len(self.problems))]

    def summary(self) -> str:
        """One line on what the forcing found, for the report's notes."""
        if self.problem_count:
            more = self.problem_count - len(self.problems)
            return (f"{self.codes_from}'s codes are not {self.values_of}'s own at a rounding tie: "
                    + "; ".join(self.problems) + (f"; and {more} more" if more > 0 else ""))
        if not self.flips:
            return (f"every one of {self.codes:,} codes at its {self.quantizers} quantizer call(s) is the one "
                    f"{self.values_of} computes from the same inputs")
        return (f"{self.flips:,} of {self.codes:,} activation codes fell on rounding ties that {self.values_of}'s "
                f"float order rounds the other way (first at {self.first_flip})")


@dataclass
class ForcedRun(_Tally):
    """The model's PyTorch graph with the golden run's codes at every quantizer (module
    docstring); :meth:`for_model` builds it where every golden quantizer has a PyTorch one."""

    module: object = None  # torch.fx.GraphModule
    names: dict[str, str] = field(default_factory=dict)  # PyTorch node name -> golden quantize node name
    # golden quantize node -> its static scale (0: dynamic) and zero point
    static: dict[str, tuple[float, int]] = field(default_factory=dict)
    rtol: float = 0.0

    @classmethod
    def for_model(cls, module, golden: Graph, rtol: float) -> "ForcedRun | None":
        """None where the quantizers do not pair up one to one (another code base's quantizers,
        fused or renamed ones): then there is nothing to force."""
        import torch

        from .capture.context import module_path

        ops = (torch.ops.csqc.act_quant.default, torch.ops.csqc.act_quant_asymmetric.default)
        graph = getattr(module, "graph", None)
        if graph is None:
            return None
        names = {n.name: f"{module_path(n) or n.name}.quant" for n in graph.nodes
                 if n.op == "call_function" and n.target in ops}
        quantizers = _static_attrs(golden)
        if not names or len(set(names.values())) != len(names) or set(names.values()) != set(quantizers):
            return None
        if any(_sample_size(n) != int(np.prod(golden.node(names[n.name]).type.shape[1:])) for n in graph.nodes
               if n.name in names):
            # a quantizer of another tensor (a dilated transposed convolution's: of the stuffed input);
            # another view of the same one (a 1x1 input's [N, C]) is forced in PyTorch's shape
            return None
        return cls("the golden run", "PyTorch", flips_at=dict.fromkeys(quantizers, 0), module=module, names=names,
                   static=quantizers, rtol=rtol)

    def run(self, inputs: Sequence[np.ndarray], record: Mapping[str, object]) -> list[np.ndarray]:
        """Outputs of one batch; ``record``: the golden run's (``interpreter.run``) on the same inputs."""
        import torch

        forced = self

        class Interpreter(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                name = forced.names.get(self.csqc_node.name)
                if name is None:
                    return super().call_function(target, args, kwargs)
                x = args[0].detach().numpy()
                golden = record[name]
                codes = forced._check(name, x.reshape(golden.codes.shape), golden).dequantize()
                return torch.from_numpy(np.ascontiguousarray(codes.reshape(x.shape)))

            def run_node(self, n):
                self.csqc_node = n
                return super().run_node(n)

        with torch.no_grad():
            out = Interpreter(self.module).run(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.detach().numpy() for o in outs]

    def _check(self, name: str, x: np.ndarray, q: QValue) -> QValue:
        # the golden graph's static scale, not the op's: a calibrated model's differs from the trained one's
        static, zero_point = self.static[name]
        flips, problems = code_problems(name, x, q, static, self.rtol, zero_point, self.values_of)
        self._count(name, int(q.codes.size), flips, problems)
        return q


@dataclass
class ForcedInterpreter(_Tally):
    """The golden interpreter with another runtime's codes at every quantizer: the other
    direction, for runtimes that expose the codes each layer multiplies (``<layer>.xq`` and
    ``.scale``, and an asymmetric quantizer's ``.zero_point``: ONNX Runtime, artifacts), whose
    float ops (a float first layer) round apart from the interpreter's. :meth:`for_graph` builds
    it where every quantizer of the golden graph feeds a layer."""

    layers: dict[str, str] = field(default_factory=dict)  # layer -> the quantize node it reads
    static: dict[str, tuple[float, int]] = field(default_factory=dict)
    rtol: float = 0.0

    @classmethod
    def for_graph(cls, golden: Graph, runtime: str, rtol: float) -> "ForcedInterpreter | None":
        producers = golden.producers()
        layers = {}
        for n in golden.quant_layers():
            src = producers.get(n.inputs[0])
            if src is not None and src.op == "quantize":
                layers[n.name] = src.name
        quantizers = _static_attrs(golden)
        if not layers or set(layers.values()) != set(quantizers):
            return None
        return cls(runtime, "the interpreter", flips_at=dict.fromkeys(quantizers, 0), layers=layers, static=quantizers,
                   rtol=rtol)

    def count_equal(self, golden: Graph) -> None:
        """A batch where the runtime's codes equal the golden run's: nothing to force, its codes counted."""
        for n in golden.nodes:
            if n.op == "quantize":
                self._count(n.name, int(np.prod(n.type.shape)), 0, [])

    def run(self, golden: Graph, inputs: Sequence[np.ndarray], tensors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of the golden graph (of this batch's size) on ``inputs`` with the codes and
        scales in ``tensors`` (the runtime's ``<layer>.xq`` and ``.scale`` on the same inputs)."""
        from .interpreter import run as interpret

        forced = {}
        for layer, quant in self.layers.items():
            if quant not in forced and f"{layer}.xq" in tensors:
                zero_point = tensors.get(f"{layer}.zero_point")
                forced[quant] = (np.asarray(tensors[f"{layer}.xq"]),
                                 np.float32(np.asarray(tensors[f"{layer}.scale"]).reshape(-1)[0]),
                                 None if zero_point is None else int(zero_point))

        def codes_of(node, x):
            if node.name not in forced:
                return None
            centered, scale, zero_point = forced[node.name]
            if node.attr("asymmetric", False):
                if zero_point is None:
                    self._count(node.name, int(centered.size), 0,
                                [f"{node.name}: {self.codes_from} exposes no zero point"])
                    return None
                # the runtime exposes u - zp, what its layer multiplies: the codes are u
                q = QValue((centered + zero_point).astype(np.int32), scale, int(node.attr("bits")), zero_point, True)
            else:
                q = QValue(centered.astype(np.int32), scale, int(node.attr("bits")))
            static, static_zero_point = self.static[node.name]
            flips, problems = code_problems(node.name, x, q, static, self.rtol, static_zero_point, self.values_of)
            self._count(node.name, int(centered.size), flips, problems)
            return q

        if set(forced) != set(self.static):
            missing = sorted(set(self.static) - set(forced))
            self.problem_count += 1
            self.problems.append(f"{self.codes_from} exposes no codes for {', '.join(missing[:3])}")
        return interpret(golden, list(inputs), codes_of=codes_of)


def _sample_size(fx_node) -> int | None:
    """One sample's element count of a PyTorch node's value (None: unknown or symbolic)."""
    val = fx_node.meta.get("val")
    try:
        return int(np.prod([int(d) for d in val.shape[1:]]))
    except (AttributeError, TypeError):
        return None


def _static_attrs(g: Graph) -> dict[str, tuple[float, int]]:
    """Quantize node -> its static scale (0: dynamic) and zero point."""
    return {n.name: (float(n.attr("static_scale", 0.0)), int(n.attr("zero_point", 0)))
            for n in g.nodes if n.op == "quantize"}
