"""``csqc inspect``: per-layer bit allocation, plane encodings and sizes of a compiled graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bitplanes import unpack_planes
from .errors import BadInput
from .ir import Graph, QUANT_LAYER_OPS

__all__ = ["LayerRow", "ActivationRow", "InspectReport", "inspect_graph", "activation_rows", "plot_bits"]

CSQC_ACT_QUANT = "csqc ActQuant"  # the idiom column for csqc's own quantizer (csqc.idioms names the others)
_MOVES = ("dequantize", "reshape", "permute", "slice")  # value-preserving steps between a quantizer and a layer


@dataclass
class LayerRow:
    name: str
    op: str
    weight_shape: list[int]
    n_bits: int
    active_bits: list[int]
    encoding: str
    planes: int
    plane_shifts: list[list[int]]  # [shift, sign] per stored plane
    zero_point: int
    low_shift: int
    act_bits: int | None
    act_mode: str | None
    weight_bytes_packed: int
    weight_bytes_fp32: int
    plane_zero_fraction: list[float]
    kernel: str = ""
    act_asymmetric: bool = False  # unsigned activation codes with a zero point
    form: str = ""  # the layer as the model wrote it, where its op and weight shape say another thing
    form_weights: int = 0  # the model's weight count where the stored weight holds more (zero taps)

    @property
    def params(self) -> int:
        """The model's weights (not the zero taps a transposed conv's phases store)."""
        return self.form_weights or int(np.prod(self.weight_shape))

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["params"] = self.params
        return d


@dataclass
class ActivationRow:
    """One activation quantizer: what it feeds, which idiom it came from, its codes."""

    name: str
    input_of: list[str]  # the layers (else the nodes) reading its value
    idiom: str  # CSQC_ACT_QUANT, a recognised idiom, or one left float (with the reason)
    bits: int | None  # None: left float
    signed: bool
    scale: str  # "dynamic", the static scale (asymmetric: the range R), or "-" (left float)
    asymmetric: bool = False  # unsigned codes with a zero point
    zero_point: int | None = None  # an asymmetric quantizer's static zero point (None: dynamic or symmetric)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _readers(name: str, users: dict) -> list[str]:
    """The nodes reading value ``name``, looking through dequantize and reshapes."""
    out = []
    for u in users.get(name, []):
        if u.op in _MOVES:
            out += _readers(u.name, users)
        else:
            out.append(u.name)
    return list(dict.fromkeys(out))


def activation_rows(g: Graph) -> list[ActivationRow]:
    """Every activation quantizer of ``g`` (a captured graph: fused passes keep the quantize
    nodes but fold a left-float clip into its layer), in graph order."""
    users = g.users()
    rows = []
    for n in g.nodes:
        if n.op == "quantize":
            static = float(n.attr("static_scale", 0.0))
            asymmetric = bool(n.attr("asymmetric", False))
            rows.append(ActivationRow(n.name, _readers(n.name, users), n.attr("idiom") or CSQC_ACT_QUANT,
                                      int(n.attr("bits")), bool(n.attr("signed")),
                                      f"{static:.6g}" if static > 0 else "dynamic", asymmetric,
                                      int(n.attr("zero_point", 0)) if asymmetric and static > 0 else None))
        elif n.op == "clip" and n.attr("idiom"):
            rows.append(ActivationRow(n.name, _readers(n.name, users), n.attr("idiom"), None, True, "-"))
    return rows


@dataclass
class InspectReport:
    model: str
    avg_bits: float
    avg_planes: float
    weight_bytes_packed: int
    weight_bytes_fp32: int
    float_weight_bytes: int
    layers: list[LayerRow] = field(default_factory=list)
    activations: list[ActivationRow] = field(default_factory=list)
    calibration: dict | None = None  # set when static scales were calibrated (csqc.passes.calibrate_scales)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "avg_bits": self.avg_bits,
            "avg_planes": self.avg_planes,
            "weight_bytes_packed": self.weight_bytes_packed,
            "weight_bytes_fp32": self.weight_bytes_fp32,
            "float_weight_bytes": self.float_weight_bytes,
            "compression": self.weight_bytes_fp32 / max(1, self.weight_bytes_packed),
            "layers": [r.to_json() for r in self.layers],
            "activations": [r.to_json() for r in self.activations],
            **({"calibration": self.calibration} if self.calibration else {}),
        }


def _row(g: Graph, n) -> LayerRow:
    spec = n.quant
    shape = [int(s) for s in n.attr("weight_shape")]
    out_ch, k = shape[0], int(np.prod(shape[1:]))
    w = g.params[n.inputs[1]]
    if spec.encoding == "int":
        planes = len(spec.active_bits)
        zero = [float(np.mean(((w.astype(np.int64) >> b) & 1) == 0)) for b in spec.active_bits] if planes else []
        packed = -(-planes * out_ch * k // 8)
    else:
        bits = unpack_planes(w, k, spec.packed_word) if spec.packed_word else w
        planes = len(spec.planes)
        zero = [float(1 - p.mean()) for p in bits]
        words = -(-k // 32)
        packed = planes * out_ch * words * 4
    return LayerRow(
        name=n.name, op=n.op, weight_shape=shape, n_bits=spec.n_bits, active_bits=list(spec.active_bits),
        encoding=spec.encoding, planes=planes, plane_shifts=[list(p) for p in spec.planes],
        zero_point=spec.zero_point, low_shift=spec.low_shift, act_bits=spec.act_bits, act_mode=spec.act_mode,
        act_asymmetric=bool(spec.act_asymmetric), form=str(n.attr("form", "")),
        form_weights=int(n.attr("form_weights", 0)), weight_bytes_packed=packed,
        weight_bytes_fp32=4 * (int(n.attr("form_weights", 0)) or out_ch * k), plane_zero_fraction=zero,
    )


def _folded_row(n) -> LayerRow:
    """A layer with no nonzero weights, folded to its constant output: 0 bits, 0 planes, 0 bytes."""
    shape = [int(s) for s in n.attr("weight_shape")]
    return LayerRow(
        name=n.name, op=n.attr("folded_layer"), weight_shape=shape, n_bits=int(n.attr("n_bits")), active_bits=[],
        encoding="constant", planes=0, plane_shifts=[], zero_point=0, low_shift=0, act_bits=None, act_mode=None,
        weight_bytes_packed=0, weight_bytes_fp32=int(np.prod(shape)) * 4, plane_zero_fraction=[], kernel="constant",
    )


def _unused_row(captured: Graph, n) -> LayerRow:
    """A layer no output depends on any more (it fed only folded layers): its bits, no planes."""
    row = _row(captured, n)
    row.encoding, row.planes, row.plane_shifts, row.plane_zero_fraction = "unused", 0, [], []
    row.weight_bytes_packed, row.kernel = 0, "removed"
    return row


def inspect_graph(g: Graph, kernels: dict[str, str] | None = None, captured: Graph | None = None) -> InspectReport:
    """Report on a graph (normally after the default pipeline, so planes are final).

    Layers that ``fold_zero_layers`` replaced by their constant output are listed too, with 0
    bits and kernel ``constant``; given the ``captured`` graph, so are its quantized layers that
    the passes removed as unused (kernel ``removed``), in the captured order."""
    rows = []
    for n in g.nodes:
        if n.op in QUANT_LAYER_OPS:
            rows.append(_row(g, n))
            rows[-1].kernel = (kernels or {}).get(n.name, "")
        elif n.op == "expand" and n.attr("folded_layer"):
            rows.append(_folded_row(n))
    if captured is not None:
        listed = {r.name for r in rows}
        rows += [_unused_row(captured, n) for n in captured.quant_layers() if n.name not in listed]
        order = {n.name: i for i, n in enumerate(captured.nodes)}
        rows.sort(key=lambda r: order.get(r.name, len(order)))
    total = sum(r.params for r in rows)
    float_bytes = sum(int(g.params[n.inputs[1]].nbytes) for n in g.nodes if n.op in ("conv2d", "linear"))
    return InspectReport(
        model=g.name,
        avg_bits=sum(r.params * len(r.active_bits) for r in rows) / total if total else 0.0,
        avg_planes=sum(r.params * r.planes for r in rows) / total if total else 0.0,
        weight_bytes_packed=sum(r.weight_bytes_packed for r in rows),
        weight_bytes_fp32=sum(r.weight_bytes_fp32 for r in rows),
        float_weight_bytes=float_bytes,
        layers=rows,
        activations=activation_rows(captured if captured is not None else g),
    )


def plot_bits(report: InspectReport, path: str | Path) -> Path:
    """Bar chart of active bits per layer over a map of which bit positions each layer keeps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install 'csqc[plot]'") from None
    from .outputs import atomic_write

    rows = report.layers
    if not rows:
        raise BadInput("the model has no quantized layers to plot")
    n_max = max(r.n_bits for r in rows)
    names = [r.name for r in rows]
    x = np.arange(len(rows))
    width = max(6.0, 0.45 * len(rows) + 2)
    fig, (ax_bits, ax_map) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    counts = [len(r.active_bits) for r in rows]
    colors = plt.cm.viridis(np.array(counts) / max(1, n_max))
    bars = ax_bits.bar(x, counts, color=colors, edgecolor="black", linewidth=0.5)
    for bar, r in zip(bars, rows):
        ax_bits.annotate(f"{r.planes}p", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7, color="dimgray")
    ax_bits.axhline(report.avg_bits, color="crimson", linestyle="--", linewidth=1,
                    label=f"size-weighted average {report.avg_bits:.2f} bits")
    ax_bits.set_ylabel("active weight bits")
    ax_bits.set_ylim(0, n_max + 1)
    ax_bits.set_title(f"{report.model}: bits per layer (labels: bitplanes after encoding)")
    ax_bits.legend(loc="upper right", fontsize=8)
    ax_bits.grid(axis="y", alpha=0.3)
    grid = np.zeros((n_max, len(rows)))
    for j, r in enumerate(rows):
        for b in r.active_bits:
            grid[n_max - 1 - b, j] = 1
    ax_map.pcolormesh(np.arange(len(rows) + 1) - 0.5, np.arange(n_max + 1) - 0.5, grid[::-1], cmap="Greens",
                      vmin=0, vmax=1.3, edgecolors="white", linewidth=1.5)
    ax_map.set_yticks(range(n_max))
    ax_map.set_yticklabels([str(b) for b in range(n_max)])
    ax_map.set_ylabel("bit position (kept = green)")
    ax_map.set_xticks(x)
    ax_map.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, dpi=120, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)
    return Path(path)
