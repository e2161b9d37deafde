"""The ``onnx`` target's registry entry (cheap to import: ONNX is imported when called)."""
from __future__ import annotations

from pathlib import Path

from csqc.errors import BadInput
from csqc.ir import Graph
from csqc.targets.registry import CompileOptions, Target, register

__all__ = ["TARGET"]

FORMS = ("reference", "deploy")


def _check(options: CompileOptions) -> None:
    if options.onnx_form not in FORMS:
        raise BadInput(f"unknown --onnx-form {options.onnx_form!r}: use reference or deploy")
    if options.onnx_form == "deploy" and options.calibration is None:
        raise BadInput("--onnx-form deploy needs calibration inputs (--dataset digits or --calibration file.npz)")


def _emit(graph: Graph, output: Path, options: CompileOptions) -> dict:
    from csqc.provenance import set_onnx_digest

    from .runner import save_onnx

    if options.onnx_form == "reference":
        from csqc.calibration import set_onnx_calibration

        from .reference import emit_reference

        model = emit_reference(graph, check_planes=options.check_planes, dynamic_batch=options.dynamic_batch)
        set_onnx_calibration(model, options.calibration_record)  # the scales it bakes in, for verify
        set_onnx_digest(model, options.model_digest)
        save_onnx(model, output)
        return {"onnx_form": "reference", "size_bytes": output.stat().st_size, "dynamic_batch": options.dynamic_batch}
    from .deploy import emit_deploy

    # without --batch dynamic the deploy form stays dynamic where it can (None), as it always was
    model, report = emit_deploy(graph, options.calibration, int4=options.int4,
                                dynamic_batch=True if options.dynamic_batch else None)
    set_onnx_digest(model, options.model_digest)
    save_onnx(model, output)
    return {"onnx_form": "deploy", **report}


def _unsupported(graph: Graph) -> list[tuple[str, str]]:
    from .reference import unsupported_ops

    return unsupported_ops(graph)


def _ops() -> frozenset[str]:
    from .reference import EMITTERS

    return frozenset(EMITTERS)


TARGET = register(Target(
    name="onnx", description="ONNX: integer-exact reference graph (or --onnx-form deploy)",
    pipeline="integer", suffix=".onnx", runs_here=True, needs_gpu=False, emulated=False, check=_check, emit=_emit,
    unsupported=_unsupported, ops=_ops,
))
