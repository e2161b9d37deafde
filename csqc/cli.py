"""The ``csqc`` command line: parses options and calls the library (nothing else lives here).

Exit codes: 0 success, 1 failure, 2 bad usage or bad input. Every command takes ``--json``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from . import __version__
from .errors import BadInput, CsqcError

__all__ = ["main", "cli"]


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class CsqcGroup(click.Group):
    """Maps csqc errors to one-line messages and exit codes; tracebacks only with --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CsqcError as e:
            self._fail(ctx, str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            self._fail(ctx, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)

    @staticmethod
    def _fail(ctx, message: str, code: int):
        if ctx.obj and ctx.obj.get("debug"):
            import traceback

            traceback.print_exc()
        if ctx.obj and ctx.obj.get("json"):
            _emit_json({"ok": False, "error": message, "exit_code": code})
        click.echo(f"error: {message}", err=True)
        ctx.exit(code)


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
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _remember_json(ctx, _param, value):
    root = ctx.find_root()
    root.ensure_object(dict)["json"] = value
    return value


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                        help="Print machine-readable JSON.")(f)


def model_options(f):
    """Options of every command that reads a model: a csqc file or a reference checkpoint."""

    @click.option("--model-factory", metavar="MODULE:CALLABLE",
                  help="Build this architecture (runs your code) and load a reference CSQ checkpoint into it.")
    @click.option("--input-shape", metavar="N,C,H,W", help="Input shape for --model-factory, e.g. 1,3,32,32.")
    @functools.wraps(f)
    def wrapper(*args, model_factory=None, input_shape=None, **kwargs):
        shape = None
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


def _bits_cell(active: list[int], n_bits: int) -> str:
    return "".join("[green]#[/]" if b in active else "[dim].[/]" for b in reversed(range(n_bits)))


@cli.command()
@click.argument("recipe", type=click.Choice(["digits-mlp", "digits-cnn"]))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.pt).")
@click.option("--target-bits", default=3.0, show_default=True, type=float, help="Average weight-bit budget.")
@click.option("--epochs", type=int, help="CSQ training epochs (default: the recipe's).")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def train(recipe, output, target_bits, epochs, seed, as_json):
    """Train a CSQ model on scikit-learn's digits and save it."""
    import torch

    from .modelfile import save
    from .train import train_recipe

    from .modelfile import check_writable

    check_writable(output)  # fail before minutes of training, not after
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, result, example = train_recipe(
        recipe, target_bits=target_bits, epochs=epochs, seed=seed, progress=not as_json and sys.stderr.isatty()
    )
    save(model, output, example, metadata={"recipe": recipe, "test_accuracy": result.test_accuracy})
    if as_json:
        _emit_json({"ok": True, "output": output, **result.to_json()})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{recipe}: bit allocation (# = active bit position, MSB left)")
    for col in ("layer", "op", "shape", "bits", "active positions", "act bits"):
        table.add_column(col)
    for row in result.layers:
        table.add_row(row["name"], row["op"], "x".join(map(str, row["shape"])),
                      _bits_cell(row["active_bits"], row["n_bits"]), ",".join(map(str, row["active_bits"])) or "-",
                      str(row["act_bits"] or "float"))
    console = Console()
    console.print(table)
    console.print(f"test accuracy [bold]{result.test_accuracy:.2%}[/] (float {result.float_accuracy:.2%}), "
                  f"average weight bits [bold]{result.avg_bits:.2f}[/] (budget {target_bits}), "
                  f"{result.seconds:.1f}s -> {output}")


def main(argv=None):
    # click exits with 2 on usage errors, which is csqc's code for bad usage too
    cli.main(args=argv, prog_name="csqc")


if __name__ == "__main__":  # pragma: no cover
    main()
