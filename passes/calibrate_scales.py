"""calibrate_scales: give every dynamic activation quantizer a static scale measured on data.

Not a registered pass (it takes data besides the graph): the compiler calls ``calibrate`` on
the captured graph before the pipeline. ``measure_scales`` runs the interpreter (the golden
model) over calibration batches and keeps, per dynamic ``quantize`` node, the largest scale
it computed there (its ``max|x|``); ``apply_scales`` writes those as ``static_scale``.
A quantizer that saw only zeros stays dynamic (a static scale must be positive). An asymmetric
quantizer stays dynamic too (its calibrated form needs a range and a zero point: calibrate it in
PyTorch with ``ActQuant(..., symmetric=False, mode="static")`` and ``csqc.layers.calibrate``).

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

__all__ = ["CalibratedQuantizer", "measure_scales", "apply_scales", "calibrate", "calibration_report"]


@dataclass(frozen=True)
class CalibratedQuantizer:
    """One quantizer's calibration: its mode before, and the static scale it got (None: kept)."""

    name: str
    old_mode: str
    scale: float | None

    def to_json(self) -> dict:
        return {"quantizer": self.name, "old_mode": self.old_mode, "scale": self.scale}


def _dynamic_quantizers(g: Graph) -> list[str]:
    return [n.name for n in g.nodes if n.op == "quantize" and not n.attr("static_scale", 0.0) > 0
            and not n.attr("asymmetric", False)]


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


def measure_scales(g: Graph, arrays: Sequence[np.ndarray]) -> dict[str, float]:
    """Per dynamic quantize node, the largest ``max|x|`` the interpreter saw on ``arrays``
    (one array per graph input, samples first)."""
    names = _dynamic_quantizers(g)
    scales = dict.fromkeys(names, 0.0)
    for chunk in _batches(g, arrays):
        record: dict = {}
        interpreter.run(g, chunk, record=record)
        for name in names:  # max is exact in any order
            scales[name] = max(scales[name], float(np.float32(record[f"{name}.scale"])))
    return scales


def apply_scales(g: Graph, scales: Mapping[str, float]) -> PassResult:
    """Set ``static_scale`` of the named quantize nodes (positive scales only)."""
    updated = {}
    for n in g.nodes:
        scale = scales.get(n.name, 0.0) if n.op == "quantize" else 0.0
        if scale > 0 and n.attr("static_scale", 0.0) != scale:
            updated[n.name] = n.replace(attrs={**n.attrs, "static_scale": float(np.float32(scale))})
    if not updated:
        return PassResult(g, False)
    return PassResult(replace_nodes(g, updated), True)


def calibrate(g: Graph, arrays: Sequence[np.ndarray]) -> tuple[PassResult, list[CalibratedQuantizer]]:
    """Measure the dynamic quantizers of ``g`` on ``arrays`` and make them static."""
    scales = measure_scales(g, arrays)
    report = [CalibratedQuantizer(name, "dynamic", scale if scale > 0 else None) for name, scale in scales.items()]
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
