"""Library functions behind ``csqc compile --target onnx`` and ``csqc verify``.

``csqc/cli.py`` parses options and calls these; each prints its result (JSON with
``as_json``, else a short table) and returns what the command needs: ``compile_onnx`` a summary
dict, ``verify_command`` the exit code (0 all runtimes agree, 1 they do not). Bad options or
files raise ``BadInput`` (exit code 2 through ``CsqcGroup``).
"""
from __future__ import annotations

import json

import click
import numpy as np

from .errors import BadInput
from .modelfile import CsqcModel
from .outputs import check_output
from .remote import describe_text
from .terminal import Column, fit_table, plain, progress_bar, stdout_console
from .verify import VerifyReport, load_inputs, verify

__all__ = ["compile_onnx", "verify_command", "print_verify_report"]


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def compile_onnx(model: CsqcModel, output: str, *, deploy: bool = False, check_planes: bool = False,
                 batch: int | str | None = None, calibration: str | None = None, calibration_samples: int = 256,
                 int4: bool = True, dump_ir=None, as_json: bool = False, echo: bool = True, calibrate=None) -> dict:
    """Compile ``model`` to ONNX at ``output`` and return a summary.

    Reference (default): the integer-exact model (``check_planes``: one product per weight
    bitplane). ``deploy``: the compact QDQ/MatMulNBits model, calibrated on ``calibration``
    (``digits``, an ``.npz`` file, or random inputs when None); with ``digits`` the summary
    includes its accuracy next to PyTorch's on the test split. ``calibrate``: the reference form
    of the model calibrated on that data (see ``csqc.compile``).
    """
    from .compiler import compile as compile_model, load_calibration_samples
    from .targets.onnx.deploy import accuracy_cost
    from .targets.onnx.runner import load_onnx, make_session, run

    check_output(output, inputs=[model.source])  # fail before the work, not after
    if calibration_samples < 1:
        raise BadInput(f"calibration samples must be at least 1, got {calibration_samples}")
    calib = load_calibration_samples(model, calibration, calibration_samples) if deploy else None
    if calib is not None and len(calib[0]) == 0:  # scales from no data at all: refused, as --calibrate refuses it
        raise BadInput(f"--calibration {calibration}: holds 0 samples; calibration needs at least one")
    result = compile_model(model, "onnx", output, batch=batch, onnx_form="deploy" if deploy else "reference",
                           check_planes=check_planes, calibration=calib, int4=int4, dump_ir=dump_ir, calibrate=calibrate)
    report = {k: v for k, v in result.report.items() if k != "onnx_form"}
    if deploy:
        if calibration == "digits":
            from .data import load_digits_split

            split = load_digits_split(image=len(model.input_specs[0]["shape"]) == 4)
            ours = run(make_session(load_onnx(output), exact=False), [split.x_test])[0]
            reference = model(split.x_test).numpy()
            report = accuracy_cost(report, ours, reference, split.y_test)
        summary = {"ok": True, "output": str(output), "kind": "deploy", **report}
        if calibration is None:  # scales fitted to noise: say so, the model looks fine otherwise
            summary["notes"] = [f"calibrated on {len(calib[0])} random [0, 1) inputs, not real data; give "
                                "--dataset digits or --calibration x.npz for scales that fit your inputs"]
    else:
        graph = result.graph
        summary = {"ok": True, "output": str(output), "kind": "reference", "check_planes": check_planes,
                   **report, "batch": "dynamic" if batch == "dynamic" else graph.inputs[0].type.shape[0],
                   "layers": [n.name for n in graph.quant_layers()]}
    summary["seconds"] = result.seconds
    if echo:
        if as_json:
            _echo_json(summary)
        else:
            size = f"{summary['size_bytes'] / 1024:.1f} KiB"
            extra = f" (fp32 {summary['fp32_size_bytes'] / 1024:.1f} KiB)" if deploy else ""
            acc = (f", accuracy {summary['accuracy']:.2%} vs PyTorch {summary['reference_accuracy']:.2%}"
                   if deploy and summary.get("accuracy") is not None else "")
            click.echo(f"wrote {summary['kind']} ONNX model {output}: {size}{extra}{acc}")
            if summary.get("calibration"):
                click.echo(f"note: {summary['calibration']['note']}")
            for note in summary.get("notes", []):
                click.echo(f"note: {note}")
    return summary


def print_verify_report(report: VerifyReport) -> None:
    """A short human-readable table of a verify report."""
    columns = [Column("pair"), Column("kind", drop=3), Column("max abs err", right=True, drop=1),
               Column("max rel err", right=True, drop=2), Column("top-1 agree", right=True), Column("ok")]
    rows = [(f"{p.a} -> {p.b}", p.kind, f"{p.max_abs_error:.3g}", f"{p.max_rel_error:.3g}",
             "-" if p.top1_agreement is None else f"{p.top1_agreement:.2%}", "[green]yes[/]" if p.ok else "[red]NO[/]")
            for p in report.pairs]
    console = stdout_console()
    console.print(fit_table(f"verify: {report.samples} samples in batches of {report.batch}", columns, rows, console.width))
    for name, acc in report.accuracy.items():  # dynamic activation scales: the batch is part of the result
        console.print(f"accuracy {name}: {acc:.2%} (batches of {report.batch})")
    for name, device in report.devices.items():
        console.print(f"{name} ran on {describe_text(device)}")
    if report.calibration:
        console.print(f"calibration: from the artifact ({report.calibration['scales']} scales)")
    console.print(f"integer tensors exact: {'[green]yes[/]' if report.accumulators_exact else '[red]NO[/]'}")
    if report.layers and not report.first_divergence:  # --per-layer: say so when there is nothing to name
        n_layers = len({row["layer"] for row in report.layers})
        console.print(f"per layer: all {n_layers} layers exact in every runtime")
    if report.first_divergence:
        d = report.first_divergence
        console.print(f"first divergence: [bold]{plain(d['tensor'])}[/] in {plain(d['runtime'])} "
                      f"({d['mismatched']} of {d['checked']} elements, {d['kind']} check)")
    for note in report.notes:
        console.print(f"note: {note}")
    console.print("[green]OK[/]" if report.ok else "[red]FAILED[/]: runtimes disagree")


def verify_command(model: CsqcModel, *, inputs: str | None = None, samples: int = 4, dataset: str | None = None,
                   artifact: str | None = None, per_layer: bool = False, batch: int | None = None,
                   atol: float = 1e-4, rtol: float = 1e-4, as_json: bool = False, echo: bool = True,
                   progress: bool = False, rpc: str | None = None, key: str | None = None, calibrate=None) -> int:
    """Run ``verify`` with CLI-style options (``inputs`` is an ``.npz`` path); 0 if ok, else 1.

    ``progress``: show a bar of samples checked on stderr.
    """
    arrays = load_inputs(inputs, model) if inputs else None
    with progress_bar("verify: samples checked", enabled=progress) as update:
        report = verify(model, inputs=arrays, samples=samples, dataset=dataset, artifact=artifact,
                        per_layer=per_layer, batch=batch, atol=atol, rtol=rtol, rpc=rpc, key=key, calibrate=calibrate,
                        on_batch=lambda done, total: update(completed=done, total=total))
    if echo:
        if as_json:
            _echo_json(report.to_json())
        else:
            print_verify_report(report)
    return 0 if report.ok else 1
