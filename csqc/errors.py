"""Errors csqc reports to users.

Every error a user can cause is a ``CsqcError`` with a one-line message that says what to do.
The CLI maps ``BadInput`` to exit code 2 and every other ``CsqcError`` to exit code 1.
"""
from __future__ import annotations

import lzma
import zipfile
import zlib

__all__ = [
    "CsqcError", "BadInput", "CompileError", "VerifyError", "TrainingFailed", "UnsupportedOps", "UNREADABLE_ARCHIVE",
]

# What reading a damaged zip member, JSON or npz raises: encrypted or unknown compression
# (RuntimeError, NotImplementedError), corrupt streams (zlib.error, lzma.LZMAError, EOFError),
# bad headers and nesting too deep (ValueError, RecursionError). Loaders turn these into BadInput.
UNREADABLE_ARCHIVE = (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, zlib.error, lzma.LZMAError)


class CsqcError(Exception):
    """A failure csqc explains to the user (exit code 1).

    ``details``: the report of the work that failed, merged into the CLI's ``--json`` answer.
    """

    exit_code = 1

    def __init__(self, message: str = "", details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class BadInput(CsqcError):
    """The user gave a file, option or input that csqc cannot use (exit code 2)."""

    exit_code = 2


class CompileError(CsqcError):
    """A model could not be compiled for a target."""


class VerifyError(CsqcError):
    """Runtimes disagree on a model."""


class TrainingFailed(CsqcError):
    """Training ended with a collapsed model; ``details`` is the training report (for --json)."""


class UnsupportedOps(BadInput):
    """The captured graph uses operators csqc has no handler for; lists all of them."""

    def __init__(self, unsupported: list[tuple[str, str]]):
        self.unsupported = unsupported
        by_op: dict[str, list[str]] = {}
        for op, where in unsupported:
            by_op.setdefault(op, []).append(where)
        parts = [f"{op} (at {', '.join(sorted(set(w))[:4])}{', ...' if len(set(w)) > 4 else ''})" for op, w in sorted(by_op.items())]
        super().__init__(
            f"model uses {len(by_op)} unsupported operator(s): " + "; ".join(parts)
            + ". Replace them or open an issue asking for support."
        )
