"""calibrate_scales: give every dynamic activation quantizer a static scale measured on data.

Not a registered pass (it takes data besides the graph): the compiler calls ``calibrate`` on
the captured graph before the pipeline. ``measure_scales`` runs the interpreter (the golden
model) over calibration batches and keeps, per dynamic ``quantize`` node, the largest scale
it computed there (its ``max|x|``); ``apply_scales`` writes those as ``static_scale``.
An asymmetric quantizer gets the range of everything it saw: ``lo = min(min x, 0)``,
``hi = max(max x, 0)``, ``R = hi - lo`` as its static scale and ``round((-lo * L) / R)`` as its
zero point (the dynamic quantizer's formulas over the union of the batches).
A quantizer that saw only zeros stays dynamic (a static scale must be positive).

Not exact, by design: a static scale clamps codes to ``L`` where an input reaches beyond the
calibration data (the IR's static contract), so the calibrated graph is a different model, checked
against PyTorch on top-1 and against every runtime exactly. In exchange no quantizer needs a
run-time reduction. ``changed``: a scale was set or changed. Running it again with the same
scales changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from csqc import interpreter
from csqc.errors import BadInput
from csqc.ir import Graph

from .registry import PassResult
from .rewrite import replace_nodes

__all__ = ["StaticScale", "CalibratedQuantizer", "measure_scales", "apply_scales", "calibrate", "calibration_report"]


@dataclass(frozen=True)
class StaticScale:
    """A measured static scale (asymmetric: the range ``R``) and, for an asymmetric quantizer,
    its zero point."""

    scale: float
    zero_point: int = 0


@dataclass(frozen=True)
class CalibratedQuantizer:
    """One quantizer's calibration: its mode before, and the static scale (and zero point) it got
    (scale None: kept dynamic)."""

    name: str
    old_mode: str
    scale: float | None
    zero_point: int | None = None

    def to_json(self) -> dict:
        data = {"quantizer": self.name, "old_mode": self.old_mode, "scale": self.scale}
        return data if self.zero_point is None else {**data, "zero_point": self.zero_point}


def _dynamic_quantizers(g: Graph) -> list[str]:
    return [n.name for n in g.nodes if n.op == "quantize" and not n.attr("static_scale", 0.0) > 0]


def _batches(g: Graph, arrays: Sequence[np.ndarray]):
    """The calibration samples cut into the graph's batch size; the last batch is filled up with
    samples from the start (every op of a captured model works per sample, so repeating a
    sample cannot raise any maximum)."""
    if len(arrays) != len(g.inputs):
        raise BadInput(f"calibration data has {len(arrays)} array(s); the model takes {len(g.inputs)} input(s)")
    count = len(arrays[0])
    if count == 0 or any(len(a) != count for a in arrays):
        raise BadInput("calibration arrays must hold the same number of samples, at least one")
    batch = g.inputs[0].type.shape[0] if g.inputs[0].type.shape else 1
    for start in range(0, count, batch):
        rows = np.arange(start, start + batch) % count
        yield [np.asarray(a)[rows] for a in arrays]


def measure_scales(g: Graph, arrays: Sequence[np.ndarray]) -> dict[str, StaticScale]:
    """Per dynamic quantize node, the static scale the interpreter's runs on ``arrays`` call for
    (one array per graph input, samples first): the largest ``max|x|`` seen, or for an asymmetric
    quantizer the range and zero point of everything seen."""
    names = _dynamic_quantizers(g)
    asymmetric = {name for name in names if g.node(name).attr("asymmetric", False)}
    scales = dict.fromkeys(names, np.float32(0))
    lows = dict.fromkeys(asymmetric, np.float32(0))  # min(min x, 0) and max(max x, 0): exact in any order
    highs = dict.fromkeys(asymmetric, np.float32(0))
    inputs = [i.name for i in g.inputs]
    for chunk in _batches(g, arrays):
        record: dict = {}
        interpreter.run(g, chunk, record=record)
        for name in names:
            if name in asymmetric:
                source = g.node(name).inputs[0]
                # a graph input, a constant (an RNN's zero initial state: the interpreter records
                # computed values only), or a computed value
                x = chunk[inputs.index(source)] if source in inputs else g.params[source] if source in g.params \
                    else record[source]
                x = np.asarray(x, np.float32)
                lows[name] = min(lows[name], np.float32(x.min(initial=0)))
                highs[name] = max(highs[name], np.float32(x.max(initial=0)))
            else:
                scales[name] = max(scales[name], np.float32(record[f"{name}.scale"]))
    result = {}
    for name in names:
        if name in asymmetric:
            lo = np.float32(lows[name])
            r = np.float32(np.float32(highs[name]) - lo)
            levels = 2 ** g.node(name).attr("bits") - 1
            result[name] = StaticScale(float(r), interpreter.asymmetric_zero_point(lo, r, levels))
        else:
            result[name] = StaticScale(float(scales[name]))
    return result


def apply_scales(g: Graph, scales: Mapping[str, StaticScale]) -> PassResult:
    """Set ``static_scale`` (and an asymmetric quantizer's ``zero_point``) of the named quantize
    nodes (positive scales only)."""
    updated = {}
    for n in g.nodes:
        measured = scales.get(n.name) if n.op == "quantize" else None
        if measured is None or not measured.scale > 0:
            continue
        attrs = {**n.attrs, "static_scale": float(np.float32(measured.scale))}
        if n.attr("asymmetric", False):
            attrs["zero_point"] = int(measured.zero_point)
        if attrs != n.attrs:
            updated[n.name] = n.replace(attrs=attrs)
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated), True)


def calibrate(g: Graph, arrays: Sequence[np.ndarray]) -> tuple[PassResult, list[CalibratedQuantizer]]:
    """Measure the dynamic quantizers of ``g`` on ``arrays`` and make them static."""
    scales = measure_scales(g, arrays)
    report = [CalibratedQuantizer(name, "dynamic", s.scale if s.scale > 0 else None,
                                  s.zero_point if s.scale > 0 and g.node(name).attr("asymmetric", False) else None)
              for name, s in scales.items()]
    return apply_scales(g, scales), report


def calibration_report(quantizers: Sequence[CalibratedQuantizer], source: str, samples: int) -> dict:
    """What the compile and inspect reports say about a calibrated model."""
    kept = [q.name for q in quantizers if q.scale is None]
    note = ("calibrated: static activation scales (max |x| on the calibration data) replace the dynamic ones, so "
            "codes clamp to L where an input goes beyond that data; this is a different model from the trained one, "
            "compared with PyTorch on top-1 and checked exactly against the calibrated interpreter")
    if kept:
        note += f"; {len(kept)} quantizer(s) saw only zeros and stay dynamic"
    return {"calibrated": True, "source": source, "samples": int(samples),
            "quantizers": [q.to_json() for q in quantizers], "note": note}
