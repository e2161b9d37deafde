"""What csqc shows on a terminal: tables that fit its width, and progress bars on stderr.

Tables go to stdout and fit ``output_width()`` columns: secondary columns are dropped, most
dispensable first, until the rest fits; the key column (a layer's name) is never dropped or cut.
Progress bars go to stderr, only when it is a terminal and never under ``--json``, so stdout stays
the report (or exactly one JSON document) and a log file never fills with bar redraws.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

__all__ = ["Column", "CONTROL_CHARACTERS", "output_width", "stdout_console", "fit_table", "plain", "progress_wanted",
           "progress_bar"]

DEFAULT_WIDTH = 100  # stdout is a file or a pipe and COLUMNS is unset


def output_width() -> int:
    """Columns available on stdout: ``COLUMNS`` if set, else the terminal's, else 100."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    if sys.stdout.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text) -> str:
    """``text`` printed as it is: rich markup escaped (a layer named ``a[b]``, or ``[link=...]`` in an
    untrusted file's names) and terminal control characters shown as ``?`` (escape sequences that
    would retitle or clear the terminal)."""
    from rich.markup import escape

    return escape(CONTROL_CHARACTERS.sub("?", str(text)))


def stdout_console():
    """A rich console on stdout, ``output_width()`` columns wide."""
    from rich.console import Console

    return Console(width=output_width())


@dataclass(frozen=True)
class Column:
    """A table column. ``drop``: 0 always shown; the highest is dropped first when too narrow."""

    name: str
    right: bool = False
    wrap: bool = False  # free text that may wrap over lines (a reason, a note)
    drop: int = 0


def fit_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int):
    """A rich table of ``rows`` at most ``width`` columns wide, without its most dispensable columns.

    The first column is the key: never dropped and never shortened (it folds over lines only when
    even the key alone is wider than ``width``).
    """
    shown = list(range(len(columns)))
    dropped: list[int] = []
    while _needed_width(columns, rows, shown) > width:
        droppable = [i for i in shown if columns[i].drop > 0]
        if not droppable:
            return _table(title, columns, rows, shown, fold_key=True)
        dropped.append(max(droppable, key=lambda i: columns[i].drop))
        shown.remove(dropped[-1])
    for i in reversed(dropped[:-1]):  # room left over: take back a less dispensable column that fits
        if _needed_width(columns, rows, sorted([*shown, i])) <= width:
            shown = sorted([*shown, i])
    return _table(title, columns, rows, shown, fold_key=False)


def _needed_width(columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int]) -> int:
    """Columns the table needs with its unwrappable cells whole (rich's own measure ignores
    ``no_wrap``): each column's widest cell (longest word if it wraps), padding 1 each side, rules."""
    from rich.text import Text

    def cell_width(text: str, wraps: bool) -> int:
        plain = Text.from_markup(text).plain
        return max((len(w) for w in plain.split()), default=0) if wraps else Text(plain).cell_len

    widths = [max([cell_width(columns[i].name, columns[i].wrap), *(cell_width(row[i], columns[i].wrap) for row in rows)])
              for i in shown]
    return sum(widths) + 3 * len(shown) + 1


def _table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int], fold_key: bool):
    from rich.table import Table

    table = Table(title=title)
    for i in shown:
        c = columns[i]
        if i == 0:  # the key: whole, or folded (never "co...")
            table.add_column(c.name, no_wrap=not fold_key, overflow="fold")
        else:
            table.add_column(c.name, justify="right" if c.right else "left", no_wrap=not c.wrap,
                             overflow="fold" if c.wrap else "ellipsis")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def progress_wanted(as_json: bool) -> bool:
    """Show progress bars: not under ``--json``, and only when stderr is a terminal."""
    return not as_json and sys.stderr.isatty()


def _ignore(**_changes) -> None:
    return None


@contextmanager
def progress_bar(description: str, *, enabled: bool, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr; yields ``update(advance=, completed=, total=, description=, info=)``.

    Disabled, it yields a function that does nothing, so callers need no ``if``.
    """
    if not enabled:
        yield _ignore
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(**changes) -> None:
            bar.update(task, **{k: v for k, v in changes.items() if v is not None})

        yield update
