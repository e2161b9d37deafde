"""The ``csqc`` command line: parses options and calls the library (nothing else lives here).

Exit codes: 0 success, 1 failure, 2 bad usage or bad input. Every command takes ``--json``.
"""
from __future__ import annotations

import functools
import json
import os

import click
from click.core import ParameterSource

from . import __version__
from .errors import BadInput, CsqcError, TrainingFailed
from .outputs import Terminated, check_output, check_output_folder
from .terminal import CONTROL_CHARACTERS, Column, fit_table, plain, progress_bar, progress_wanted, stdout_console

MAX_RANDOM_SAMPLES = 10_000  # csqc.verify.MAX_RANDOM_SAMPLES, without importing numpy for --help

__all__ = ["main", "cli"]


def _emit_json(obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    try:
        click.echo(text)  # echo flushes: a full or closed stdout fails here, not at exit
    except OSError as e:
        raise CsqcError(f"cannot write the JSON result to standard output ({e.strerror or e})") from None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class CsqcGroup(click.Group):
    """Maps csqc errors to one-line messages and exit codes; tracebacks only with --debug.

    Under ``--json`` stdout holds exactly one JSON document, for click's usage errors too.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        args = list(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            _usage_error_json(args, e)
            raise
        ctx.meta["csqc.argv"] = args  # the command's own parser runs later, in invoke
        return ctx

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # a usage error of the command: click prints it on stderr
            _usage_error_json(ctx.meta.get("csqc.argv", []), e)
            raise
        except CsqcError as e:
            self._fail(ctx, str(e), e.exit_code, e.details)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Terminated as e:  # SIGTERM/SIGHUP, after every temporary file and folder was removed
            click.echo(str(e), err=True)
            ctx.exit(128 + e.signum)
        except MemoryError as e:  # e.g. --samples or --batch far beyond this machine
            self._fail(ctx, f"out of memory ({e}); ask for less: a smaller --batch or fewer --samples", 1)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            # --debug is the group's option: after the command click would call it unknown
            where = f"csqc --debug {ctx.invoked_subcommand} ..." if ctx.invoked_subcommand else "csqc --debug ..."
            self._fail(ctx, f"internal error: {type(e).__name__}: {e} (rerun as `{where}` for the traceback)", 1)

    @staticmethod
    def _fail(ctx, message: str, code: int, details: dict | None = None):
        if ctx.obj and ctx.obj.get("debug"):
            import traceback

            traceback.print_exc()
        if ctx.obj and ctx.obj.get("json"):
            try:
                _emit_json({"ok": False, "error": message, "exit_code": code, **(details or {})})
            except CsqcError:
                pass  # stdout is what failed: the line on stderr still says why
        click.echo(f"error: {message}", err=True)
        ctx.exit(code)


def _usage_error_json(argv: list[str], e: click.ClickException) -> None:
    if "--json" in argv:
        try:
            _emit_json({"ok": False, "error": e.format_message(), "exit_code": e.exit_code})
        except CsqcError:
            pass


@click.group(cls=CsqcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csqc")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx, debug):
    """csqc: compile CSQ bit-level mixed-precision networks to fast, exact kernels.

    Typical flow: train (or import) -> inspect -> compile -> verify -> bench.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    from .logs import configure_logging

    configure_logging(debug)  # csqc's messages; library chatter only under --debug, and filtered


def _remember_json(ctx, _param, value):
    root = ctx.find_root()
    root.ensure_object(dict)["json"] = value
    return value


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                        help="Print machine-readable JSON.")(f)


def rpc_options(f):
    """--rpc / --key: run the artifact on a remote device through TVM RPC (csqc.remote)."""
    f = click.option("--key", metavar="KEY",
                     help="With --rpc: HOST:PORT is an RPC tracker; run on a device registered with this key.")(f)
    return click.option("--rpc", metavar="HOST:PORT",
                        help="Run the artifact on a TVM RPC server there (`python -m tvm.exec.rpc_server` on the device).")(f)


def model_options(f):
    """Options of every command that reads a model: a csqc file or a reference checkpoint."""

    @click.option("--model-factory", metavar="MODULE:CALLABLE",
                  help="Build this architecture (runs your code) and load a reference CSQ checkpoint into it. "
                       "MODULE is imported from the current folder or PYTHONPATH, as `python -m` would.")
    @click.option("--input-shape", metavar="N,C,H,W", help="Input shape for --model-factory, e.g. 1,3,32,32.")
    @functools.wraps(f)
    def wrapper(*args, model_factory=None, input_shape=None, **kwargs):
        shape = None
        if input_shape and not model_factory:  # a csqc model file records its own input shape
            raise BadInput("--input-shape is the input shape for --model-factory; give it with --model-factory")
        if input_shape:
            try:
                shape = tuple(int(s) for s in input_shape.replace("x", ",").split(","))
            except ValueError:
                raise BadInput(f"--input-shape must be integers separated by commas, got {input_shape!r}") from None
            if any(s <= 0 for s in shape):
                raise BadInput(f"--input-shape sizes must be positive, got {input_shape!r}")
        kwargs["load_model"] = functools.partial(_load_model, model_factory=model_factory, input_shape=shape)
        return f(*args, **kwargs)

    return wrapper


def _load_model(path, *, model_factory, input_shape):
    from .modelfile import load

    return load(path, model_factory=model_factory, input_shape=input_shape)


def _check_file_name(path: str, what: str) -> None:
    """Refuse a file name ending in a slash: the user meant a folder, and ``Path`` drops the slash."""
    if path.endswith(("/", os.sep)):
        raise BadInput(f"{what} {path} ends with a slash, so names a folder; give a file name")


def _given(name: str) -> bool:
    """Whether the user gave option ``name`` (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT)


class BatchSize(click.ParamType):
    """``--batch`` of ``compile``: a positive integer, or ``dynamic`` (the ONNX target checks that)."""

    name = "N|dynamic"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "dynamic":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a batch size nor 'dynamic'", param, ctx)


def _bits_cell(active: list[int], n_bits: int) -> str:
    return "".join("[green]#[/]" if b in active else "[dim].[/]" for b in reversed(range(n_bits)))


@cli.command()
@click.argument("recipe", type=click.Choice(["digits-mlp", "digits-cnn"]), required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.pt).")
@click.option("--target-bits", default=3.0, show_default=True, type=float, help="Average weight-bit budget.")
@click.option("--epochs", type=int, help="CSQ training epochs (default: the recipe's; 10 with --data).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data", "data_factory", metavar="MODULE:CALLABLE",
              help="Train on your data instead of a recipe: a factory (runs your code) returning "
                   "(train_loader, eval_loader, float_model). MODULE is imported from the current folder or PYTHONPATH.")
@click.option("--float-epochs", default=0, show_default=True, type=int,
              help="With --data: float warm-up epochs before CSQ training (0: the factory's model is trained).")
@click.option("--act-bits", default=4, show_default=True, type=click.IntRange(1, 8), help="With --data: activation bits.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Train here; on cuda with bfloat16 autocast (under torchrun: cuda:LOCAL_RANK).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Write the whole CSQ training state here.")
@click.option("--checkpoint-every", default=1, show_default=True, type=click.IntRange(min=1),
              help="CSQ epochs between checkpoints (one is always written after the last).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from this checkpoint (same settings).")
@json_option
def train(recipe, output, target_bits, epochs, seed, data_factory, float_epochs, act_bits, device, checkpoint,
          checkpoint_every, resume, as_json):
    """Train a CSQ model (a digits recipe, or your data with --data) and save it.

    Exits 1 without writing the model when training collapsed (a layer without bits, or test
    accuracy more than 10 points below the float warm-up's). Under torchrun it trains
    data-parallel; only rank 0 writes files and prints.
    """
    import torch

    from .distributed import Parallel
    from .modelfile import save
    from .train import TrainingRun, check_training_result, train_factory, train_recipe

    if (recipe is None) == (data_factory is None):
        raise BadInput("give a recipe (digits-mlp, digits-cnn) or --data MODULE:CALLABLE, not both")
    _check_file_name(output, "-o")
    if checkpoint:
        _check_file_name(checkpoint, "--checkpoint")
        if os.path.realpath(checkpoint) == os.path.realpath(output):  # the model would replace the training state
            raise BadInput(f"--checkpoint and -o are both {output}; give the checkpoint another name")
    elif _given("checkpoint_every"):
        raise BadInput("--checkpoint-every sets how often --checkpoint is written; give --checkpoint FILE too")
    if resume:
        from .checkpoint import check_checkpoint_file

        check_checkpoint_file(resume)
    parallel = Parallel.from_env(device)
    if parallel.is_main:  # fail before minutes of training, not after
        check_output(output)
        if checkpoint:
            check_output(checkpoint, what="--checkpoint")  # may be the --resume file: it is replaced atomically
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // max(1, local_processes))))
    run = TrainingRun(device=device, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
    progress = progress_wanted(as_json) and parallel.is_main
    if data_factory:
        model, result, example = train_factory(data_factory, target_bits=target_bits, epochs=epochs or 10,
                                               float_epochs=float_epochs, act_bits=act_bits, seed=seed,
                                               progress=progress, run=run)
    else:
        model, result, example = train_recipe(recipe, target_bits=target_bits, epochs=epochs, seed=seed,
                                              progress=progress, run=run)
    if not parallel.is_main:
        if result.problem():  # every rank exits 1 on a collapsed model (torchrun reports the worst); rank 0 says why
            raise SystemExit(1)
        return
    check_training_result(result)  # a collapsed model is not written: `csqc train && csqc compile` must stop
    save(model, output, example, metadata={"recipe": result.recipe, "test_accuracy": result.test_accuracy})
    if as_json:
        _emit_json({"ok": True, "output": output, **result.to_json()})
        return
    columns = [Column("layer"), Column("op", drop=2), Column("shape", drop=3), Column("bits"),
               Column("active positions", drop=1), Column("act bits")]
    rows = [(plain(row["name"]), row["op"], "x".join(map(str, row["shape"])), _bits_cell(row["active_bits"], row["n_bits"]),
             ",".join(map(str, row["active_bits"])) or "-", str(row["act_bits"] or "float")) for row in result.layers]
    console = stdout_console()
    console.print(fit_table(f"{result.recipe}: bit allocation (# = active bit position, MSB left)", columns, rows, console.width))
    console.print(f"test accuracy [bold]{result.test_accuracy:.2%}[/] (one batch of {result.eval_batch}; "
                  f"float {result.float_accuracy:.2%}), "
                  f"average weight bits [bold]{result.avg_bits:.2f}[/] (budget {target_bits}), "
                  f"{result.seconds:.1f}s" + (f" on {result.world_size} processes" if result.world_size > 1 else "")
                  + f" -> {output}")


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@click.option("--batch", type=int, help="Batch size to analyse (default: the model file's).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG bar chart of bits per layer.")
@click.option("--dump-ir", is_flag=True, help="Print the optimized IR (stable, diffable text; under --json, its 'ir' field).")
@click.option("--calibrate", metavar="digits|X.npz",
              help="Make the dynamic activation scales static: max |x| seen on this data (a different, calibrated model).")
@json_option
def inspect(model, load_model, batch, plot, dump_ir, calibrate, as_json):
    """Per-layer bit allocation, planes, sizes and kernel choice of a model.

    Given a compiled artifact (.so, .onnx) instead: its target, model, size, inputs and outputs, layers
    by kernel and memory (ONNX: operators), and the calibration it records.
    """
    from .compiler import inspect as inspect_model, inspect_artifact, is_artifact_path
    from .reference import reference_view

    if is_artifact_path(model):
        if batch or plot or dump_ir or calibrate:
            raise BadInput("--batch, --plot, --dump-ir and --calibrate inspect a model file; an artifact is "
                           "inspected as it was compiled")
        _print_artifact(inspect_artifact(model), as_json)
        return

    if plot:
        _check_file_name(plot, "--plot")
        check_output(plot, inputs=[model], what="--plot")
    loaded = load_model(model)
    report = inspect_model(loaded, batch=batch, calibrate=calibrate)
    reference = reference_view(loaded.manifest)  # an imported reference checkpoint's own bit counts
    if plot:
        from .report import plot_bits

        plot_bits(report, plot)
    ir_text = None
    if dump_ir:
        from .compiler import optimize

        ir_text = optimize(loaded, "default", batch=batch, calibrate=calibrate).text()
    if as_json:  # one JSON document on stdout: the IR goes inside it
        _emit_json({"ok": True, **report.to_json(), **({"reference": reference} if reference else {}),
                    **({"plot": plot} if plot else {}), **({"ir": ir_text} if ir_text is not None else {})})
        return
    if ir_text is not None:
        click.echo(ir_text)
    # narrow terminals lose the zero fractions first, then fp32 sizes, positions (bits shows them), shapes...
    columns = [Column("layer"), Column("weight", drop=6), Column("bits"), Column("positions", drop=7),
               Column("planes", right=True, drop=5), Column("zero % per plane", drop=9), Column("packed", right=True, drop=3),
               Column("fp32", right=True, drop=8), Column("act", drop=4), Column("kernel", drop=2)]
    rows = []
    for r in report.layers:
        zero = " ".join(f"{100 * z:.0f}" for z in r.plane_zero_fraction[:5]) + (" .." if len(r.plane_zero_fraction) > 5 else "")
        weight = r.form or f"{r.op[1:]} " + "x".join(map(str, r.weight_shape))
        rows.append((plain(r.name), weight, _bits_cell(r.active_bits, r.n_bits),
                     ",".join(map(str, r.active_bits)) or "-", f"{r.planes} {r.encoding}", zero,
                     _human(r.weight_bytes_packed), _human(r.weight_bytes_fp32), _act_cell(r), r.kernel))
    console = stdout_console()
    console.print(fit_table(f"{plain(report.model)}: quantized layers", columns, rows, console.width))
    _print_activations(console, [r.to_json() for r in report.activations])
    console.print(f"average weight bits [bold]{report.avg_bits:.2f}[/], planes {report.avg_planes:.2f}; "
                  f"quantized weights {_human(report.weight_bytes_packed)} packed vs {_human(report.weight_bytes_fp32)} fp32 "
                  f"({report.weight_bytes_fp32 / max(1, report.weight_bytes_packed):.1f}x smaller); "
                  f"float layers {_human(report.float_weight_bytes)}" + (f"; plot -> {plot}" if plot else ""))
    if reference:
        _print_reference_view(console, reference, report.avg_bits)
    if report.calibration:
        _print_calibration(console, report.calibration)


# plan kernel names as ``csqc inspect`` prints them
_KERNEL_NAMES = {"bitparallel": "bit-parallel", "bitserial": "bit-serial", "float": "float-input"}
_FLOAT_LAYOUT_NAMES = {"winograd": "by Winograd F(2x2, 3x3)", "channel_lanes": "with output channels on the lanes"}


def _print_artifact(info: dict, as_json: bool) -> None:
    """An artifact's target, model, size, inputs and outputs, layers, memory and operators, and
    the static scales it records (briefly)."""
    if as_json:
        _emit_json({"ok": True, **info})
        return
    console = stdout_console()
    built_for = f", built for {plain(info['cpu'])}" if info.get("cpu") else ""  # (file contents: printed as they are)
    console.print(f"{plain(info['artifact'])}: {plain(info['target'])} artifact of model {plain(info['model'])}, "
                  f"{_human(info['bytes'])}{built_for}")
    if info.get("model_digest"):  # what verify and bench compare with the model they are given
        console.print(f"  model weights sha256 {info['model_digest'][:16]}...")
    for kind in ("inputs", "outputs"):
        for tensor in info[kind]:
            shape = ",".join(map(str, tensor["shape"]))
            console.print(f"  {kind[:-1]:6s} {plain(tensor['name'])}  {plain(tensor['dtype'])}[{shape}]")
    if "layers" in info:
        kinds = ", ".join(f"{count} {plain(_KERNEL_NAMES.get(kernel, kernel))}" for kernel, count in info["layers"].items())
        runner = "one whole-model function" if info["whole_model_function"] else "the runtime, step by step"
        console.print(f"layers: {sum(info['layers'].values())} quantized ({kinds}); {info['kernel_calls']} kernel "
                      f"calls, run by {runner}")
        if info.get("saturated_scales"):
            console.print(f"saturated scales: {info['saturated_scales']} depthwise convs between two ReLU6 of dynamic "
                          "scales first try their codes at the clips' scales (kept where a value reaches 6)")
        if info.get("saturated_epilogues"):
            console.print(f"saturated epilogues: {info['saturated_epilogues']} convs between two clips of dynamic "
                          "scales write the codes of the clips' scales where both scales reach them")
        if info.get("float_layouts"):
            forms = ", ".join(f"{count} {_FLOAT_LAYOUT_NAMES.get(layout, layout)}"
                              for layout, count in info["float_layouts"].items())
            console.print(f"float-input convs: {forms} (weights derived from the planes at load in that order)")
        memory = info["memory"]
        shared = (f" in {memory['pools']} shared pool{'s' if memory['pools'] != 1 else ''} "
                  f"({_human(memory['intermediates_unshared'])} unshared; calls are timed on private memory "
                  "too, CompiledModel.call_choice)") if memory["pools"] else ""
        console.print(f"memory: weights {_human(memory['weights'])}, derived at load {_human(memory['derived'])}, "
                      f"intermediates {_human(memory['intermediates'])}{shared}")
    if "operators" in info:
        ops = ", ".join(f"{count} {plain(op)}" for op, count in list(info["operators"].items())[:8])
        more = len(info["operators"]) - 8
        console.print(f"operators: {ops}" + (f" and {more} more kinds" if more > 0 else ""))
    if info.get("threads"):
        console.print(f"threads: at most {info['threads']} per call (its layers are small), unless its calls "
                      "time more threads as faster (CompiledModel.call_choice)")
    calibration = info["calibration"]
    if calibration is None:
        console.print("calibration: none (dynamic activation scales)")
        return
    rows = [(plain(q["quantizer"]), str(q["bits"]), f"{q['scale']:.6g}", plain(q["scale_bits"]), str(q["zero_point"]))
            for q in calibration["quantizers"]]
    console.print(fit_table(f"calibration: {calibration['scales']} static scale(s), {calibration['samples']} samples",
                            [Column("quantizer"), Column("bits"), Column("scale", right=True),
                             Column("float32 bits", drop=2), Column("zero point", right=True, drop=1)],
                            rows, console.width))


def _print_calibration(console, calibration: dict) -> None:
    """Per quantizer: its mode before calibration and the static scale it got."""
    rows = [(plain(q["quantizer"]), q["old_mode"], "kept dynamic" if q["scale"] is None else f"static {q['scale']:.6g}")
            for q in calibration["quantizers"]]
    console.print(fit_table(f"calibrated on {plain(calibration['source'])} ({calibration['samples']} samples)",
                            [Column("quantizer"), Column("was"), Column("now")], rows, console.width))
    console.print(f"note: {plain(calibration['note'])}")


def _print_reference_view(console, view: dict, csqc_avg_bits: float) -> None:
    """The bit counts as the CSQ reference's training log reports them, next to csqc's."""
    columns = [Column("layer"), Column("Nbits", right=True, drop=2), Column("kept", right=True), Column("mask", drop=1),
               Column("weights", right=True, drop=3), Column("in total_bit", wrap=True)]
    rows = [(plain(r["name"]), str(r["n_bits"]), str(r["kept_bits"]), plain(r.get("mask", "")), str(r["params"]),
             "yes" if r.get("counted", True) else "no (downsample)") for r in view["layers"]]
    console.print(fit_table("reference view: kept bits per layer (mask MSB first, as the reference logs it)",
                            columns, rows, console.width))
    console.print(f"reference: average bit [bold]{view['avg_bit']:.3f}[/] (Nbits {view['n_bits']} x ratio_one "
                  f"{view['ratio_one']:.4f}), total_param {view['total_param']}, total_bit {view['total_bit']} "
                  f"(downsample layers excluded); csqc size-weighted average weight bits {csqc_avg_bits:.3f}")


def _print_activations(console, rows) -> None:
    """Which quantizer (csqc's, a recognised idiom, or one left float) feeds which layers; printed
    only for a model with another code base's quantizers (``--json`` always lists them)."""
    from .report import CSQC_ACT_QUANT

    if all(r["idiom"] == CSQC_ACT_QUANT for r in rows):
        return
    cells = [(plain(r["name"]), plain(", ".join(r["input_of"])) or "-", plain(r["idiom"]),
              "float" if r["bits"] is None else _codes_cell(r)) for r in rows]
    console.print(fit_table("activation quantizers", [Column("quantizer", drop=2), Column("input of"),
                                                      Column("idiom", wrap=True), Column("codes", drop=1)],
                            cells, console.width))


def _codes_cell(r: dict) -> str:
    """``s4 dynamic``, ``u8 0.5``; asymmetric (unsigned codes, zero point): ``a8 dynamic``, ``a8 R 2.5 zp 37``."""
    if r.get("asymmetric"):
        return f"a{r['bits']} " + ("dynamic" if r.get("zero_point") is None else f"R {r['scale']} zp {r['zero_point']}")
    return f"{'s' if r['signed'] else 'u'}{r['bits']} {r['scale']}"


def _act_cell(r) -> str:
    if r.encoding in ("constant", "unused"):
        return "-"  # a constant output reads no activations; an unused layer runs on none
    if not r.act_bits:
        return "float"
    return f"{'a' if r.act_asymmetric else 'u'}{r.act_bits}/{r.act_mode}"


def _limits_lines(limits: dict) -> list[str]:
    """The bench report's machine limits and csqc's fractions of them, in words."""
    if not limits:
        return []
    m = limits["machine"]
    lines = [f"machine limits, same run, {m['threads']} threads: streaming read {m['dram_gb_per_s']:.1f} GB/s over "
             f"{_human(m['dram_buffer_bytes'])} (last-level cache {_human(m['llc_bytes'])}), "
             f"{m['weights_gb_per_s']:.1f} GB/s over {_human(m['weights_buffer_bytes'])} (the weights' size); "
             f"integer peak {m['int_peak_gmac_per_s']:.0f} GMAC/s ({m['int_peak_kind']})"
             + (f"; a parallel launch {m['fork_join_us']:.2f} us" if m.get("fork_join_us") else ""),
             f"csqc: weights streamed at {limits['weight_gb_per_s']:.1f} GB/s = {limits['weight_fraction_of_dram']:.2f} of "
             f"the DRAM read, {limits['weight_fraction_of_cached']:.2f} of the weights-sized read"]
    if limits["int_gmac_per_s"] is not None:
        lines[-1] += (f"; {limits['int_gmac_per_s']:.1f} GMAC/s = {limits['int_fraction_of_peak']:.3f} of the integer "
                      f"peak ({limits['int_macs_rule']})")
    return lines


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@model_options
@click.option("--target", "-t", default="llvm", show_default=True,
              help="llvm (CPU), aarch64 (ARM64 CPU, cross-compiled), cuda (NVIDIA GPU) or onnx.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Artifact to write (default, in this folder: MODEL.llvm.so, MODEL.arm64.so, MODEL.cuda-ARCH.so, "
                   "MODEL.onnx, or MODEL.deploy.onnx for --onnx-form deploy).")
@click.option("--batch", type=BatchSize(),
              help="Batch size to compile for (default: the model file's); onnx: 'dynamic' for any batch size.")
@click.option("--mcpu", help="llvm: CPU name (default: this machine's); aarch64: ARM CPU (default: neoverse-n1).")
@click.option("--arch", default="sm_80", show_default=True, help="cuda: GPU architecture (sm_80, sm_90, ...).")
@click.option("--emit-source", type=click.Path(file_okay=False), help="cuda: also write the CUDA source to this folder.")
@click.option("--kernel", "force_kernel", type=click.Choice(["auto", "bitserial", "bitparallel"]), default="auto",
              show_default=True, help="Override the per-layer kernel choice.")
@click.option("--onnx-form", type=click.Choice(["reference", "deploy"]), default="reference", show_default=True,
              help="onnx: integer-exact reference, or compact QDQ/MatMulNBits model to ship.")
@click.option("--check-planes", is_flag=True, help="onnx: one product per weight bitplane (checks the decomposition).")
@click.option("--dataset", type=click.Choice(["digits"]), help="onnx deploy: calibrate on digits and report accuracy.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False),
              help="onnx deploy: calibration inputs (.npz) instead of a data set.")
@click.option("--dump-ir", type=click.Path(file_okay=False), help="Write the IR after every pass to this folder.")
@click.option("--calibrate", metavar="digits|X.npz",
              help="Make the dynamic activation scales static: max |x| seen on this data (a different, calibrated model).")
@click.option("--tune", is_flag=True,
              help="llvm: time candidate kernel schedules per layer shape on this machine and build with the "
                   "fastest (minutes the first time; cached in ~/.cache/csqc/tuning.json or $CSQC_TUNING_CACHE).")
@json_option
def compile_cmd(model, load_model, target, output, batch, mcpu, arch, emit_source, force_kernel, onnx_form,
                check_planes, dataset, calibration_file, dump_ir, calibrate, tune, as_json):
    """Compile a model into a deployable artifact.

    The CPU targets build their kernels on every CPU this process may use; set
    CSQC_BUILD_THREADS=N to use N (the artifact is the same either way)."""
    from .compiler import TARGETS, compile as compile_model, default_output
    from .targets.registry import get_target

    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if tune and not get_target(target).tunable:
        raise BadInput(f"--tune searches CPU kernel schedules on this machine; it is for --target llvm, not {target}")
    _check_target_options(target, onnx_form)
    if dataset and calibration_file:
        raise BadInput("give --dataset or --calibration, not both")
    if output is None:  # the library's default too: the model's name, the target and the form
        output = str(default_output(model, target, arch=arch, onnx_form=onnx_form))
    if calibrate and onnx_form == "deploy":
        raise BadInput("--calibrate is for the exact forms; the deploy form calibrates its own scales (--dataset, --calibration)")
    _check_compile_outputs(model, output, calibration_file, emit_source, dump_ir)
    if calibrate not in (None, "digits"):
        check_output(output, inputs=[calibrate])
    loaded = load_model(model)
    if target == "onnx":
        from .cli_onnx import compile_onnx

        compile_onnx(loaded, output, deploy=onnx_form == "deploy", check_planes=check_planes, batch=batch,
                     calibration=dataset or calibration_file, dump_ir=dump_ir, as_json=as_json, calibrate=calibrate)
        return
    with progress_bar(f"compiling for {target}", enabled=progress_wanted(as_json)) as update:
        result = compile_model(
            loaded, target, output, batch=batch, mcpu=mcpu, arch=arch, emit_source=emit_source,
            force_kernel=None if force_kernel == "auto" else force_kernel, dump_ir=dump_ir, calibrate=calibrate,
            on_layer=lambda name: update(advance=1, info=f"lowered {name}"),
            tune=tune, on_tune=lambda key: update(info=f"tuning {key}"),
        )
    if as_json:
        _emit_json(result.to_json())
        return
    if result.report.get("layers"):
        rows = [(plain(name), info["kernel"], info.get("reason", "")
                 + (f"; codes: {info['codes']}" if "codes" in info else ""))
                for name, info in result.report["layers"].items()]
        console = stdout_console()
        console.print(fit_table(f"{result.target}: kernel per quantized layer",
                                [Column("layer"), Column("kernel"), Column("why", wrap=True)], rows, console.width))
    _print_activations(stdout_console(), result.report.get("activations", []))
    extra = f", build {result.report['build_seconds']:.1f}s" if "build_seconds" in result.report else ""
    if "tier" in result.report:  # the llvm target: which instructions the kernels use
        extra += f", CPU {result.report['mcpu']} ({_TIER_WORDS[result.report['tier']]})"
    if result.report.get("temp_bytes", 0) < result.report.get("temp_bytes_unshared", 0):
        extra += (f", intermediates {_human(result.report['temp_bytes'])} in shared memory "
                  f"({_human(result.report['temp_bytes_unshared'])} unshared)")
    if target == "cuda":
        extra += f", {result.report['arch']} device code {_human(result.report['device_code']['bytes'])}"
        if emit_source:
            extra += f", source in {emit_source}/kernels.cu"
    if result.report.get("calibration"):
        _print_calibration(stdout_console(), result.report["calibration"])
    if "tuning" in result.report:
        _print_tuning(result.report["tuning"])
    click.echo(f"compiled for {result.target} in {result.seconds:.1f}s{extra} -> {result.output} "
               f"({_human(result.output.stat().st_size)})")


# compile options that only some targets (or ONNX forms) read: given for another, they would do nothing
_TARGET_OPTIONS = {
    "mcpu": ("--target llvm or aarch64", {"llvm", "aarch64"}),
    "force_kernel": ("--target llvm, aarch64 or cuda", {"llvm", "aarch64", "cuda"}),
    "arch": ("--target cuda", {"cuda"}),
    "emit_source": ("--target cuda", {"cuda"}),
    "onnx_form": ("--target onnx", {"onnx reference", "onnx deploy"}),
    "check_planes": ("--target onnx --onnx-form reference", {"onnx reference"}),
    "dataset": ("--target onnx --onnx-form deploy", {"onnx deploy"}),
    "calibration_file": ("--target onnx --onnx-form deploy", {"onnx deploy"}),
}


def _check_target_options(target: str, onnx_form: str) -> None:
    """Refuse an option the user gave that the chosen target ignores (defaults pass: they were not asked for)."""
    chosen = f"onnx {onnx_form}" if target == "onnx" else target
    ours = f"--target onnx --onnx-form {onnx_form}" if target == "onnx" else f"--target {target}"
    for param in click.get_current_context().command.params:
        if param.name not in _TARGET_OPTIONS or not _given(param.name):
            continue
        where, targets = _TARGET_OPTIONS[param.name]
        if chosen not in targets:
            raise BadInput(f"{max(param.opts, key=len)} is for {where}; it does nothing with {ours}")


_TIER_WORDS = {"avx512": "AVX-512 VNNI int8 dot products", "avx2": "AVX2 int8 dot products",
               "generic": "no int8 dot product: bit-serial kernels"}


def _print_tuning(tuning: dict) -> None:
    shapes = tuning["shapes"]
    if not shapes:
        click.echo("tuned nothing: no bit-parallel convolution or linear layer off AMX tiles, nor bit-serial "
                   "linear layer, to tune")
        return
    changed = sum(bool(s["knobs"]) for s in shapes)
    gain = tuning["default_us"] / tuning["tuned_us"] if tuning["tuned_us"] else 1.0
    click.echo(f"tuned {len(shapes)} kernel shapes ({tuning['searched']} searched in {tuning['seconds']:.1f}s, "
               f"{len(shapes) - tuning['searched']} from the cache {tuning['cache']}), timed on {tuning['threads']} "
               f"thread(s) as the artifact's calls run: {changed} beat the default schedule, "
               f"{tuning['default_us']:.0f} -> {tuning['tuned_us']:.0f} us summed over the shapes ({gain:.2f}x)")


def _check_compile_outputs(model, output, calibration_file, emit_source, dump_ir) -> None:
    """Every path ``compile`` writes, checked before the model is even read."""
    _check_file_name(output, "-o")
    check_output(output, inputs=[model, calibration_file])
    if emit_source is not None:
        check_output_folder(emit_source, what="--emit-source")
    if dump_ir is not None:
        check_output_folder(dump_ir, what="--dump-ir")


def _dataset_inputs(model, dataset: str, batch: int | None) -> list:
    from .data import load_digits_split

    shape = list(model.input_specs[0]["shape"])
    if batch:
        shape[0] = batch
    data = load_digits_split(image=len(shape) == 4)
    x = data.x_train
    if list(x.shape[1:]) != shape[1:]:
        raise BadInput(f"--dataset digits gives inputs of shape {list(x.shape[1:])}; the model takes {shape[1:]}")
    n = shape[0]
    return [x[i : i + n] for i in range(0, len(x) - n + 1, n)][:64]


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@click.option("--artifact", type=click.Path(),
              help="Also run this compiled artifact (.so from llvm/cuda/aarch64, or .onnx). A .so is native code "
                   "(an aarch64 one runs under qemu-user, which is no sandbox): only artifacts you built or trust.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), help="Inputs to check on (.npz).")
@click.option("--samples", default=4, show_default=True, type=int,
              help=f"Random inputs to check on (without --inputs/--dataset), at most {MAX_RANDOM_SAMPLES:,}.")
@click.option("--dataset", type=click.Choice(["digits"]), help="Check on a data set's test split (and report accuracy).")
@click.option("--batch", type=int, help="Samples per run (default: the artifact's, else the model file's).")
@click.option("--per-layer", is_flag=True, help="Compare every layer's tensors and name the first that diverges.")
@click.option("--atol", default=1e-4, show_default=True, type=float, help="Float tolerance, relative to each output's magnitude.")
@click.option("--rtol", default=1e-4, show_default=True, type=float, help="Elementwise relative float tolerance.")
@click.option("--calibrate", metavar="digits|X.npz",
              help="Make the dynamic activation scales static: max |x| seen on this data (a different, calibrated model). "
                   "An artifact built with --calibrate brings its own scales: then they are measured again, compared "
                   "with the artifact's, and the artifact's are checked.")
@rpc_options
@json_option
def verify(model, load_model, artifact, inputs_file, samples, dataset, batch, per_layer, atol, rtol, calibrate, rpc, key,
           as_json):
    """Check PyTorch, the IR interpreter, ONNX Runtime and an artifact against each other.

    Integer tensors (activation codes, accumulators) must agree exactly; exit code 0 only when
    every runtime agrees, 1 when one does not.

    A .so artifact is a program: verifying it loads and runs it (an aarch64 one under qemu-user,
    which emulates, not isolates). csqc checks its SHA-256 digests first; that catches damage and
    edits, not a malicious author. An .onnx artifact is data only. With --rpc the .so runs on a
    remote TVM RPC server (checked here first, then uploaded) and the report names the device.

    An artifact compiled with --calibrate records its static activation scales: every runtime is
    then checked with exactly those, without the calibration data.
    """
    from .cli_onnx import verify_command

    if inputs_file and dataset:
        raise BadInput("give --inputs or --dataset, not both")
    samples_given = click.get_current_context().get_parameter_source("samples") != ParameterSource.DEFAULT
    if samples_given and (inputs_file or dataset):  # they check every sample they hold: --samples would be ignored
        raise BadInput(f"--samples counts random inputs; {'--dataset' if dataset else '--inputs'} checks all of its "
                       "samples, so give one or the other")
    if not 1 <= samples <= MAX_RANDOM_SAMPLES:  # checked before the model loads
        raise BadInput(f"--samples must be 1..{MAX_RANDOM_SAMPLES:,}, got {samples:,}; to check on more, "
                       "give your own inputs with --inputs x.npz")
    code = verify_command(load_model(model), inputs=inputs_file, samples=samples, dataset=dataset, artifact=artifact,
                          per_layer=per_layer, batch=batch, atol=atol, rtol=rtol, as_json=as_json,
                          progress=progress_wanted(as_json), rpc=rpc, key=key, calibrate=calibrate)
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--input", "-i", "input_path", required=True, type=click.Path(),
              help=".npy input, or .npz with one array per input named after it (csqc inspect ARTIFACT names them).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the output here (.npy); .npz: every output by name (needed for several outputs).")
@click.option("--skip-planes", default=0, show_default=True, type=int,
              help="Drop this many least significant weight planes per layer (faster, less exact).")
@json_option
def run(artifact, input_path, output, skip_planes, as_json):
    """Run a compiled artifact on an input array.

    An artifact is native code: loading it runs the library inside it. Run only artifacts you
    built or trust; csqc checks their SHA-256 digests and plan before loading, which catches
    damage and edits, not a malicious author. For untrusted exchange use the ONNX form
    (``csqc compile -t onnx``), which is data only.
    """
    import numpy as np

    from . import runtime
    from .archive import npz_bytes
    from .outputs import atomic_write
    from .verify import load_artifact_inputs

    if output:
        _check_file_name(output, "-o")
        check_output(output, inputs=[artifact, input_path])
    model = runtime.load(artifact)
    names = [o["name"] for o in model.outputs]
    as_npz = bool(output) and output.endswith(".npz")
    if output and len(names) > 1 and not as_npz:  # refused before running: an .npy holds one array
        raise BadInput(f"{artifact} has {len(names)} outputs ({', '.join(names)}); give -o a .npz name to write "
                       "them all by name")
    xs = load_artifact_inputs(input_path, model.inputs, artifact)
    ys = model(*xs, skip_planes=skip_planes)
    ys = ys if isinstance(ys, list) else [ys]
    if output:
        def write(tmp):
            with open(tmp, "wb") as f:  # np.save(name) would append .npy to the temporary's name
                if as_npz:  # (not np.savez: an output named "file" or "allow_pickle" is one of its arguments)
                    f.write(npz_bytes(dict(zip(names, ys))))
                else:
                    np.save(f, ys[0])

        atomic_write(output, write, inputs=[artifact, input_path])
    if as_json:
        results = [{"shape": list(y.shape), "argmax": y.reshape(y.shape[0], -1).argmax(1).tolist()} for y in ys]
        if len(ys) == 1:
            _emit_json({"ok": True, "output": output, **results[0]})
        else:
            _emit_json({"ok": True, "output": output,
                        "outputs": [{"name": name, **r} for name, r in zip(names, results)]})
    elif len(ys) == 1:
        y = ys[0]
        click.echo(f"output {list(y.shape)}" + (f" -> {output}" if output else f": {np.array2string(y, precision=4, threshold=20)}"))
    else:
        for name, y in zip(names, ys):
            values = "" if output else f": {np.array2string(y, precision=4, threshold=20)}"
            click.echo(f"output {CONTROL_CHARACTERS.sub('?', name)} {list(y.shape)}{values}")  # (names from the file)
        if output:
            click.echo(f"{len(ys)} outputs -> {output}")


@cli.command()
@click.argument("model", type=click.Path())
@model_options
@click.option("--artifact", type=click.Path(), help="Time this compiled artifact (default: compile one now).")
@click.option("--batch", type=int, help="Batch size (default: the model file's).")
@click.option("--threads", default=2, show_default=True, type=int, help="Threads for every runtime.")
@click.option("--rounds", default=15, show_default=True, type=int, help="Interleaved timing rounds.")
@click.option("--sweep-planes", is_flag=True, help="Accuracy/agreement against latency as LSB planes are skipped.")
@click.option("--dataset", type=click.Choice(["digits"]), help="Real inputs (and accuracy in the sweep).")
@click.option("--no-baselines", is_flag=True, help="Time csqc only.")
@click.option("--no-limits", is_flag=True,
              help="Skip the bandwidth and int8-peak probes (csqc's fractions of the machine's limits).")
@click.option("--profile", is_flag=True, help="Also time every kernel call of the artifact: where the time goes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: an llvm artifact; cuda: a cuda artifact on this machine's GPU, against PyTorch fp16/fp32 and ORT's CUDA provider.")
@rpc_options
@json_option
def bench(model, load_model, artifact, batch, threads, rounds, sweep_planes, dataset, no_baselines, no_limits, profile,
          device, rpc, key, as_json):
    """Time csqc against PyTorch and ONNX Runtime (fp32, int8) on the same inputs.

    With --rpc the artifact runs and is timed on a remote TVM RPC server (its time_evaluator); the
    baselines, which would run here, are left out.
    """
    from .bench import bench as run_bench

    if batch is not None and batch < 1:
        raise BadInput(f"batch must be at least 1, got {batch}")
    if artifact and batch is not None:  # an artifact runs the batch it was compiled for: --batch would be ignored
        from .compiler import inspect_artifact

        compiled = inspect_artifact(artifact)["inputs"][0]["shape"][0]
        if isinstance(compiled, int) and compiled != batch:
            raise BadInput(f"the artifact runs batches of {compiled}; bench with batch {compiled}")
    loaded = load_model(model)
    with progress_bar("bench", enabled=progress_wanted(as_json)) as update:
        report = run_bench(loaded, batch=batch, threads=threads, rounds=rounds, artifact=artifact,
                           sweep_planes=sweep_planes, dataset=dataset, baselines=not no_baselines, device=device,
                           rpc=rpc, key=key, limits=not no_limits, profile=profile, on_progress=lambda step, done, total: update(description=step, completed=done, total=total))
    if as_json:
        _emit_json({"ok": True, **report.to_json()})
        return
    from rich.table import Table

    ratios = report.ratios()
    where = "GPU" if report.device == "cuda" else f"{report.threads} threads, CPU {report.cpu}"
    if report.remote:
        from .remote import describe_text

        where = describe_text(report.remote)
    columns = [Column("runtime"), Column("median", right=True), Column("spread", right=True, drop=2),
               Column("weights", right=True, drop=1), Column("csqc speed-up", right=True), Column("note", wrap=True)]
    rows = [(r.runtime, f"{r.median_us:,.1f} us", f"{r.spread:.0%}" + (" unreliable" if r.unreliable else ""),
             _human(r.weight_bytes), "-" if r.runtime == "csqc" else f"{ratios[r.runtime]:.2f}x", plain(r.note))
            for r in sorted(report.results, key=lambda r: r.median_us)]
    console = stdout_console()
    console.print(fit_table(f"{plain(report.model)}: batch {report.batch}, {where} (median)", columns, rows, console.width))
    for line in _limits_lines(report.limits):
        console.print(line)
    if report.profile:
        console.print(fit_table(*_profile_table(report.profile), console.width))
    if report.sweep:
        sweep = Table(title="PrecisionBatching: least significant planes skipped at run time")
        for col in ("skip", "median", "accuracy", "top-1 agreement with exact"):
            sweep.add_column(col, justify="right")
        for row in report.sweep:
            acc = f"{row['accuracy']:.2%}" if "accuracy" in row else "-"
            sweep.add_row(str(row["skip_planes"]), f"{row['median_us']:,.1f} us", acc, f"{row['top1_agreement']:.2%}")
        console.print(sweep)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("[dim]Shared, noisy machine: compare ratios from this run, not absolute times.[/]")


PROFILE_ROWS = 12


def _profile_table(profile: list[dict]) -> tuple[str, list, list]:
    """Title, columns and rows of ``bench --profile``: the slowest kernel calls, then the total per kernel kind."""
    total = sum(p["median_us"] for p in profile) or 1.0
    by_kind: dict[str, float] = {}
    for p in profile:
        by_kind[p["kind"]] = by_kind.get(p["kind"], 0.0) + p["median_us"]
    slowest = sorted(profile, key=lambda p: -p["median_us"])[:PROFILE_ROWS]
    rows = [(f"#{p['index']} {plain(p['node'] or '-')}", p["kind"], f"{p['median_us']:,.1f} us", f"{p['median_us'] / total:.0%}")
            for p in slowest]
    rows += [(f"all {kind}", kind, f"{us:,.1f} us", f"{us / total:.0%}")
             for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    columns = [Column("kernel call"), Column("kind", drop=1), Column("median", right=True), Column("share", right=True)]
    title = (f"kernel calls timed one by one ({len(profile)} calls, {total:,.1f} us in all; "
             f"the {min(PROFILE_ROWS, len(profile))} slowest, then per kind)")
    return title, columns, rows


@cli.command()
@click.option("--recipe", type=click.Choice(["digits-cnn", "digits-mlp"]), default="digits-cnn", show_default=True)
@click.option("--out", "out_dir", default="csqc-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the model, artifacts and plot.")
@json_option
def demo(recipe, out_dir, as_json):
    """The whole flow on digits: train, inspect, compile (CPU + ONNX), verify, benchmark."""
    import torch

    from .bench import bench as run_bench
    from .compiler import compile as compile_model, default_output, inspect as inspect_model
    from .modelfile import load, save
    from .outputs import make_output_folder
    from .report import plot_bits
    from .train import train_recipe
    from .verify import verify as run_verify

    out = make_output_folder(out_dir, what="--out")
    torch.set_num_threads(2)
    say = (lambda *a: None) if as_json else click.echo
    say(f"[1/5] training {recipe} on scikit-learn's digits (CSQ, 3-bit budget)")
    model, result, example = train_recipe(recipe, progress=progress_wanted(as_json))
    say(f"      test accuracy {result.test_accuracy:.2%} (one batch of {result.eval_batch}) at {result.avg_bits:.2f} "
        "average bits; "
        + "; ".join(f"{l['name']}: bits {','.join(map(str, l['active_bits'])) or '-'}" for l in result.layers))
    if problem := result.problem():  # stop here: compiling a collapsed model only hides the failure
        raise TrainingFailed(problem, {"train": result.to_json()})
    model_path = save(model, out / f"{recipe}.pt", example, metadata={"recipe": recipe})
    loaded = load(model_path)
    report = inspect_model(loaded)
    plot = plot_bits(report, out / f"{recipe}-bits.png")
    say(f"[2/5] inspect: {report.weight_bytes_fp32 / max(1, report.weight_bytes_packed):.1f}x smaller weights "
        f"({report.weight_bytes_packed} B packed), plot -> {plot}")
    say("[3/5] compiling for the CPU (TVM, bit-serial and int8 kernels per layer) and ONNX")
    with progress_bar("compiling for llvm", enabled=progress_wanted(as_json)) as update:
        art = compile_model(loaded, "llvm", out / default_output(model_path, "llvm"),
                            on_layer=lambda name: update(advance=1, info=name))
    onnx_art = compile_model(loaded, "onnx", out / default_output(model_path, "onnx"))
    say(f"      kernels ({art.report['mcpu']}, {_TIER_WORDS[art.report['tier']]}): {art.report['kernels']} -> "
        f"{art.output}, {onnx_art.output}")
    say("[4/5] verifying PyTorch, IR interpreter, ONNX Runtime and the CPU artifact on the digits test set")
    with progress_bar("verify", enabled=progress_wanted(as_json)) as update:
        ver = run_verify(loaded, artifact=str(art.output), dataset="digits",
                         on_batch=lambda done, total: update(completed=done, total=total))
    say(f"      {'OK' if ver.ok else 'MISMATCH'}: accumulators exact = {ver.accumulators_exact}; accuracy "
        + ", ".join(f"{name} {acc:.2%}" for name, acc in ver.accuracy.items()) + f" (batches of {ver.batch})")
    say("[5/5] benchmarking (2 threads, median; tiny models mostly measure call overhead)")
    with progress_bar("bench", enabled=progress_wanted(as_json)) as update:
        b = run_bench(loaded, artifact=str(art.output), rounds=10,
                      on_progress=lambda step, done, total: update(description=step, completed=done, total=total))
    for r in sorted(b.results, key=lambda r: r.median_us):
        say(f"      {r.runtime:28s} {r.median_us:10.1f} us")
    payload = {"train": result.to_json(), "inspect": report.to_json(), "verify": ver.to_json(), "bench": b.to_json(),
               "outputs": [str(model_path), str(art.output), str(onnx_art.output), str(plot)]}
    if not ver.ok:  # one JSON document either way: the failure carries the whole report
        raise CsqcError("verification failed: runtimes disagree (see above)", payload)
    if as_json:
        _emit_json({"ok": True, **payload})


@cli.command()
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (the README's operator table).")
@json_option
def ops(markdown, as_json):
    """The IR ops and the runtimes that run them (capture maps PyTorch ops onto these)."""
    from .targets.registry import support_matrix, support_table_markdown

    if as_json:
        _emit_json({"ok": True, "ops": support_matrix()})
    elif markdown:
        click.echo(support_table_markdown(), nl=False)
    else:
        matrix = support_matrix()
        runtimes = list(next(iter(matrix.values())))
        rows = [[op] + ["yes" if row[r] else "no" for r in runtimes] for op, row in matrix.items()]
        console = stdout_console()
        console.print(fit_table("IR ops per runtime", [Column("op")] + [Column(r) for r in runtimes], rows, console.width))


def main(argv=None):
    from .outputs import terminate_on_signals

    terminate_on_signals()  # SIGTERM/SIGHUP clean up temporary files like Ctrl-C does
    # click exits with 2 on usage errors, which is csqc's code for bad usage too
    cli.main(args=argv, prog_name="csqc")


if __name__ == "__main__":  # pragma: no cover
    main()
