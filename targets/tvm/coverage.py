"""What the shared TVM planner lowers, for the registry entries of the TVM targets.

Cheap to import (the planner is imported when asked): every TVM target lowers the same ops,
so ``llvm``, ``aarch64`` and ``cuda`` declare their coverage with these two functions.
"""
from __future__ import annotations

from csqc.ir import Graph

__all__ = ["unsupported", "ops"]


def unsupported(graph: Graph) -> list[tuple[str, str]]:
    """``(op, node)`` for every node the planner cannot lower."""
    from .lower import unsupported_ops

    return unsupported_ops(graph)


def ops() -> frozenset[str]:
    """The IR ops the planner lowers."""
    from .lower import lowerable_ops

    return lowerable_ops()
