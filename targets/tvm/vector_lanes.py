"""How wide a kernel's vectorized loops may be, and the check every TVM build runs.

TVM 0.27 keeps a vector's lane count in a signed 16-bit field: a vectorized loop of 32,768 to
65,535 iterations aborts LLVM ("Cannot implicitly convert a scalable size"), and one of 65,536 or
more silently wraps (70,000 lanes store 4,464 of them). Below that, LLVM's time grows fast with
odd widths (a fill of 12,501 words: 4.5 s). Kernels whose loop extents follow a model's sizes (a
padded row of a dilated conv, a long 1-D signal) pick their loops with :func:`vector_loop`, and
:func:`check_vector_widths` refuses any kernel that still holds a loop TVM would miscompile
before it reaches LLVM.
"""
from __future__ import annotations

from csqc.errors import CompileError

__all__ = ["MAX_VECTOR_LANES", "TVM_MAX_LANES", "check_vector_widths", "vector_loop", "widest_vector_loop"]

MAX_VECTOR_LANES = 4096  # wider: a serial loop (a fill LLVM makes a memset; ResNet-50 runs as fast)
TVM_MAX_LANES = 32767  # the most lanes TVM 0.27 vectorizes correctly


def vector_loop(extent: int):
    """``T.vectorized(extent)`` up to ``MAX_VECTOR_LANES`` iterations, else ``T.serial(extent)``
    (LLVM's loop vectorizer then picks the width), for loops whose extent follows the model:
    ``for j in vector_loop(n):``."""
    from tvm.script import tirx as T

    return T.vectorized(extent) if extent <= MAX_VECTOR_LANES else T.serial(extent)


def widest_vector_loop(func) -> int:
    """The largest constant extent of a vectorized loop in PrimFunc ``func`` (0: none)."""
    import tvm

    widest = 0
    stack = [func.body]
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, tvm.tirx.For) and stmt.kind == tvm.tirx.ForKind.VECTORIZED:
            extent = stmt.extent
            widest = max(widest, int(extent.value) if isinstance(extent, tvm.tirx.IntImm) else 0)
        for attr in ("body", "then_case", "else_case", "block", "init"):
            child = getattr(stmt, attr, None)
            if isinstance(child, tvm.tirx.Stmt):
                stack.append(child)
        stack.extend(getattr(stmt, "seq", None) or [])
    return widest


def check_vector_widths(funcs: dict) -> None:
    """Raise :class:`CompileError` naming every kernel of ``funcs`` (symbol -> PrimFunc) with a
    vectorized loop wider than ``TVM_MAX_LANES``."""
    wide = {name: lanes for name, f in funcs.items() if (lanes := widest_vector_loop(f)) > TVM_MAX_LANES}
    if wide:
        listed = ", ".join(f"{name} ({lanes:,} lanes)" for name, lanes in sorted(wide.items()))
        raise CompileError(f"kernels with vectorized loops wider than {TVM_MAX_LANES:,} lanes, which TVM 0.27 "
                           f"miscompiles: {listed} (please report the model's layer shapes)")
