"""Pass manager: runs named pipelines, verifies the IR after every pass, can dump it after each."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from csqc.errors import CsqcError
from csqc.outputs import make_output_folder
from csqc.ir import Graph, IRError, verify

from .registry import get_pass

__all__ = ["PIPELINES", "PassRecord", "PassFailure", "run_passes", "resolve_pipeline"]

log = logging.getLogger(__name__)

PIPELINES: dict[str, tuple[str, ...]] = {
    # float rewrites first, then the bit-level ones, then bookkeeping
    "default": (
        "sink_layout_ops", "fold_bn", "fold_scales", "sink_quantize", "fuse_act_quant", "fuse_activation",
        "fold_zero_layers", "fuse_requant", "dce",
        "split_planes", "drop_dead_planes", "choose_encoding", "pack_planes", "accumulator_width", "dce",
    ),
    # integer weights kept whole (the ONNX reference form and the bit-parallel kernels)
    "integer": ("sink_layout_ops", "fold_bn", "fold_scales", "sink_quantize", "fuse_act_quant", "fuse_activation",
                "fold_zero_layers", "accumulator_width", "dce"),
    "none": (),
}


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool
    seconds: float


class PassFailure(CsqcError):
    def __init__(self, name: str, ran: Sequence[str], cause: Exception):
        self.pass_name, self.ran, self.cause = name, tuple(ran), cause
        before = ", ".join(ran) or "none"
        super().__init__(f"pass {name} failed ({type(cause).__name__}: {cause}); passes that ran before it: {before}")


def resolve_pipeline(pipeline: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(pipeline, str):
        if pipeline in PIPELINES:
            return PIPELINES[pipeline]
        return tuple(p.strip() for p in pipeline.split(",") if p.strip())
    return tuple(pipeline)


def run_passes(
    graph: Graph,
    pipeline: str | Sequence[str] = "default",
    *,
    dump_dir: str | Path | None = None,
    on_pass: Callable[[str, Graph], None] | None = None,
) -> tuple[Graph, list[PassRecord]]:
    """Run ``pipeline`` (a name from PIPELINES or a list of pass names) over ``graph``.

    The IR is verified before the first pass and after every pass; ``dump_dir`` receives the
    text form after each pass (``00-captured.ir``, ``01-fold_bn.ir``, ...).
    """
    names = resolve_pipeline(pipeline)
    infos = [get_pass(n) for n in names]  # unknown names fail before any work
    verify(graph)
    dump = Path(dump_dir) if dump_dir else None
    if dump:
        make_output_folder(dump, what="IR dump folder")
        _write_text(dump / "00-captured.ir", graph.text())
    ran: list[str] = []
    records: list[PassRecord] = []
    for i, info in enumerate(infos, 1):
        unmet = {r.name: r.unmet(graph) for r in info.requires}
        unmet = {name: nodes for name, nodes in unmet.items() if nodes}
        if unmet:
            detail = "; ".join(f"{name} to run first (not yet true for {', '.join(nodes[:4])})" for name, nodes in unmet.items())
            raise PassFailure(info.name, ran, CsqcError(f"requires {detail}"))
        start = time.perf_counter()
        try:
            result = info.run(graph)
            verify(result.graph)
        except (IRError, CsqcError, ValueError, KeyError, IndexError, TypeError) as e:
            raise PassFailure(info.name, ran, e) from e
        records.append(PassRecord(info.name, result.changed, time.perf_counter() - start))
        graph = result.graph
        ran.append(info.name)
        log.debug("pass %s: changed=%s", info.name, result.changed)
        if dump:
            _write_text(dump / f"{i:02d}-{info.name}.ir", graph.text())
        if on_pass:
            on_pass(info.name, graph)
    return graph, records


def _write_text(path: Path, text: str) -> None:
    """IR dumps are written like every other output: whole or not at all."""
    from csqc.outputs import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
