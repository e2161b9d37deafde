"""The calibration an artifact was built with: recorded in it, checked when read, applied by verify.

``csqc compile --calibrate`` makes dynamic activation scales static (``csqc.passes.calibrate_scales``).
The artifact records exactly which scales it was built with, so ``csqc verify`` applies those to
the reference graph (``apply_scales``) instead of measuring them again: a float forward that
differs by one ulp on another CPU (BLAS, thread count) could move a measured scale and verify
would then check another model, and a user holding only the artifact has no calibration data.

Where it is kept: ``plan.json["calibration"]`` of a TVM artifact (sealed by its digests) and
``metadata_props["csqc.calibration"]`` of an ONNX model (whose graph also holds the scales as
``<quantizer>.static_scale`` initializers: the two must agree bit for bit). The document::

    {"version": 1, "source_sha256": sha256 of the source name ("digits", a path, "arrays"),
     "data_sha256": sha256 of the calibration arrays, "samples": N,
     "quantizers": {"<quantize node>": {"scale": "<float32 bit pattern, 8 hex digits>",
                                         "zero_point": 0..2**bits-1, "bits": 1..8}}}

Scales travel as bit patterns, not decimal strings, so nothing rounds on the way. A stored
calibration is untrusted data: ``parse_calibration`` checks every field (one-line ``BadInput``),
``check_against_graph`` that every name is a quantizer of the model with those bits.

A quantizer the calibration left dynamic (it saw only zeros) is not listed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Sequence

import numpy as np

from .errors import BadInput
from .ir import Graph

__all__ = ["CALIBRATION_VERSION", "PLAN_KEY", "ONNX_KEY", "StoredScale", "Calibration", "record_calibration",
           "parse_calibration", "plan_calibration", "plan_entry", "onnx_calibration", "set_onnx_calibration",
           "artifact_calibration", "check_against_graph", "apply_calibration", "scale_differences", "scale_hex"]

CALIBRATION_VERSION = 1
PLAN_KEY = "calibration"  # in a TVM artifact's plan.json
ONNX_KEY = "csqc.calibration"  # in an ONNX model's metadata_props
_HEX32 = re.compile(r"[0-9a-f]{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 512  # a node name csqc writes is far shorter
_MAX_QUANTIZERS = 1 << 16


def scale_hex(scale: float) -> str:
    """The float32 bit pattern of ``scale`` as 8 lower-case hex digits (exact, unlike a decimal)."""
    return format(int(np.float32(scale).view(np.uint32)), "08x")


def _from_hex(bits: str) -> float:
    return float(np.uint32(int(bits, 16)).view(np.float32))


@dataclass(frozen=True)
class StoredScale:
    """One quantizer's static scale (a float32 value; asymmetric: its range) and zero point."""

    scale: float
    zero_point: int
    bits: int

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


@dataclass(frozen=True)
class Calibration(Mapping):
    """A read-only mapping quantizer name -> ``StoredScale``, with where the scales came from."""

    quantizers: Mapping[str, StoredScale]
    source_sha256: str
    data_sha256: str
    samples: int

    def __post_init__(self):
        object.__setattr__(self, "quantizers", MappingProxyType(dict(self.quantizers)))

    def __getitem__(self, name: str) -> StoredScale:
        return self.quantizers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.quantizers)

    def __len__(self) -> int:
        return len(self.quantizers)

    def static_scales(self) -> dict:
        """The scales as ``calibrate_scales.apply_scales`` takes them."""
        from .passes.calibrate_scales import StaticScale

        return {name: StaticScale(s.scale, s.zero_point) for name, s in self.quantizers.items()}

    def to_json(self) -> dict:
        return {"version": CALIBRATION_VERSION, "source_sha256": self.source_sha256, "data_sha256": self.data_sha256,
                "samples": self.samples,
                "quantizers": {name: {"scale": scale_hex(s.scale), "zero_point": s.zero_point, "bits": s.bits}
                               for name, s in self.quantizers.items()}}

    def summary(self) -> list[dict]:
        """Per quantizer, for reports: name, scale (decimal and bits), zero point, bits."""
        return [{"quantizer": name, "scale": s.scale, "scale_bits": scale_hex(s.scale), "zero_point": s.zero_point,
                 "bits": s.bits} for name, s in self.quantizers.items()]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes (the same data gives the same digest anywhere)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{list(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def record_calibration(calibrated: Graph, names: Sequence[str], source: str,
                       arrays: Sequence[np.ndarray]) -> Calibration:
    """The calibration of ``calibrated`` (the captured graph after ``calibrate``) for quantizers
    ``names``: their scales exactly as the graph holds them."""
    quantizers = {}
    for name in names:
        node = calibrated.node(name)
        quantizers[name] = StoredScale(float(np.float32(node.attr("static_scale"))), int(node.attr("zero_point", 0)),
                                       int(node.attr("bits")))
    return Calibration(quantizers, _sha256(source.encode()), _data_digest(arrays), len(arrays[0]))


# -- reading an untrusted document -------------------------------------------------------------------


def parse_calibration(doc, where: str) -> Calibration:
    """``doc`` (parsed JSON from an artifact) as a ``Calibration``; ``BadInput`` naming ``where``
    and the first problem unless it is exactly what csqc writes."""
    problem = _document_problem(doc)
    if problem:
        raise BadInput(f"{where}: the stored calibration is not one csqc writes ({problem}); compile the model again")
    quantizers = {name: StoredScale(_from_hex(q["scale"]), q["zero_point"], q["bits"])
                  for name, q in doc["quantizers"].items()}
    return Calibration(quantizers, doc["source_sha256"], doc["data_sha256"], doc["samples"])


def _document_problem(doc) -> str | None:
    if not isinstance(doc, dict) or doc.get("version") != CALIBRATION_VERSION:
        return f"not a version {CALIBRATION_VERSION} calibration record"
    if set(doc) != {"version", "source_sha256", "data_sha256", "samples", "quantizers"}:
        return f"unexpected fields {sorted(set(doc))[:8]}"
    for key in ("source_sha256", "data_sha256"):
        if not isinstance(doc[key], str) or not _SHA256.fullmatch(doc[key]):
            return f"{key} is not a SHA-256 hex digest"
    if type(doc["samples"]) is not int or doc["samples"] < 1:
        return "samples is not a positive count"
    quantizers = doc["quantizers"]
    if not isinstance(quantizers, dict) or not 1 <= len(quantizers) <= _MAX_QUANTIZERS:
        return "quantizers must map quantizer names to scales"
    for name, q in quantizers.items():
        problem = _quantizer_problem(name, q)
        if problem:
            return problem
    return None


def _quantizer_problem(name: str, q) -> str | None:
    shown = repr(name[:60])
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        return f"quantizer name {shown} is empty, too long or not printable"
    if not isinstance(q, dict) or set(q) != {"scale", "zero_point", "bits"}:
        return f"quantizer {shown} needs exactly scale, zero_point and bits"
    if not isinstance(q["scale"], str) or not _HEX32.fullmatch(q["scale"]):
        return f"quantizer {shown}: scale is not a float32 bit pattern (8 hex digits)"
    scale = _from_hex(q["scale"])
    if not math.isfinite(scale) or not scale > 0:
        return f"quantizer {shown}: scale {scale} is not a positive finite number"
    if type(q["bits"]) is not int or not 1 <= q["bits"] <= 8:
        return f"quantizer {shown}: bits {q['bits']!r} is not 1..8"
    if type(q["zero_point"]) is not int or not 0 <= q["zero_point"] <= 2 ** q["bits"] - 1:
        return f"quantizer {shown}: zero point {q['zero_point']!r} is not in 0..{2 ** q['bits'] - 1}"
    return None


def plan_calibration(plan: dict, where) -> Calibration | None:
    """The calibration a TVM artifact's (digest-checked) plan records, None without one."""
    if PLAN_KEY not in plan:
        return None
    return parse_calibration(plan[PLAN_KEY], str(where))


def plan_entry(calibration: Calibration | None) -> dict:
    """What a TVM target adds to its plan's metadata for ``calibration`` (nothing without one)."""
    return {} if calibration is None else {PLAN_KEY: calibration.to_json()}


def set_onnx_calibration(model, calibration: Calibration | None) -> None:
    """Record ``calibration`` in an ONNX model's metadata (nothing without one)."""
    if calibration is not None:
        model.metadata_props.add(key=ONNX_KEY, value=json.dumps(calibration.to_json()))


def onnx_calibration(model, where) -> Calibration | None:
    """The calibration an ONNX model's metadata records, checked against the scales baked into its
    graph (``<quantizer>.static_scale`` initializers, where the quantizer kept its own node)."""
    values = [p.value for p in model.metadata_props if p.key == ONNX_KEY]
    if not values:
        return None
    if len(values) > 1:
        raise BadInput(f"{where}: the model holds {len(values)} calibration records; csqc writes one")
    try:
        doc = json.loads(values[0])
    except (ValueError, RecursionError):
        raise BadInput(f"{where}: the stored calibration is not JSON; compile the model again") from None
    calibration = parse_calibration(doc, str(where))
    _check_baked_scales(model, calibration, where)
    return calibration


def _check_baked_scales(model, calibration: Calibration, where) -> None:
    """The graph computes with its initializers: a record that disagrees with them describes another model."""
    from onnx import numpy_helper

    baked = {i.name: i for i in model.graph.initializer if i.name.endswith((".static_scale", ".static_zero_point"))}
    for name, s in calibration.items():
        init = baked.get(f"{name}.static_scale")
        if init is None:
            continue  # the quantizer was fused into a layer; verify compares that layer's scale
        value = numpy_helper.to_array(init)
        if value.dtype != np.float32 or value.size != 1 or scale_hex(value.reshape(-1)[0]) != scale_hex(s.scale):
            raise BadInput(f"{where}: the stored calibration gives quantizer {name!r} scale {s.scale!r} "
                           f"({scale_hex(s.scale)}), the graph computes with {value.reshape(-1)[:1].tolist()}: "
                           "the metadata was edited; compile the model again")
        point = baked.get(f"{name}.static_zero_point")
        baked_point = [] if point is None else numpy_helper.to_array(point).reshape(-1)[:1].tolist()
        if point is not None and baked_point != [float(s.zero_point)]:
            raise BadInput(f"{where}: the stored calibration gives quantizer {name!r} zero point {s.zero_point}, "
                           f"the graph computes with {baked_point}: the metadata was edited; compile the model again")


def artifact_calibration(path) -> Calibration | None:
    """The calibration recorded in the artifact at ``path`` (``.onnx`` or a TVM ``.so``), checked;
    None when it was built without one. Reads the file only: no library is loaded."""
    path = Path(path)
    if path.name.endswith(".onnx"):
        from .targets.onnx.runner import load_onnx

        return onnx_calibration(load_onnx(path), path)
    from .artifact import read_artifact

    return plan_calibration(read_artifact(path).plan, path)


# -- using it --------------------------------------------------------------------------------------------


def check_against_graph(calibration: Calibration, graph: Graph, where: str) -> None:
    """``BadInput`` unless every stored name is a quantize node of ``graph`` with those bits, and
    only an asymmetric one has a zero point."""
    nodes = graph.producers()
    for name, s in calibration.items():
        node = nodes.get(name)
        if node is None or node.op != "quantize":
            raise BadInput(f"{where}: the stored calibration names quantizer {name[:60]!r}, which the model "
                           "does not have: it was built from another model, or edited")
        if node.attr("bits") != s.bits:
            raise BadInput(f"{where}: the stored calibration gives quantizer {name!r} {s.bits} bits, the model "
                           f"quantizes to {node.attr('bits')}: it was built from another model, or edited")
        if s.zero_point and not node.attr("asymmetric", False):
            raise BadInput(f"{where}: the stored calibration gives the symmetric quantizer {name!r} a zero point "
                           f"{s.zero_point}: it was edited")


def apply_calibration(graph: Graph, calibration: Calibration, where: str) -> Graph:
    """``graph`` (captured, dynamic scales) with the stored static scales, checked first."""
    from .passes.calibrate_scales import apply_scales

    check_against_graph(calibration, graph, where)
    return apply_scales(graph, calibration.static_scales()).graph


def scale_differences(stored: Calibration, measured: Mapping) -> list[str]:
    """Every quantizer whose measured ``StaticScale`` (scale 0: left dynamic) is not the stored one."""
    out = []
    for name in sorted(set(stored) | {n for n, m in measured.items() if m.scale > 0}):
        s, m = stored.get(name), measured.get(name)
        was = "dynamic" if s is None else f"{s.scale!r} ({scale_hex(s.scale)}) zp {s.zero_point}"
        now = "dynamic" if m is None or not m.scale > 0 else \
            f"{float(np.float32(m.scale))!r} ({scale_hex(m.scale)}) zp {int(m.zero_point)}"
        if was != now:
            out.append(f"{name}: artifact {was}, measured {now}")
    return out
