"""Pass registry: a pass is a pure function ``Graph -> PassResult``, registered by module name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from csqc.errors import BadInput
from csqc.ir import Graph

__all__ = ["PassResult", "PassInfo", "Requirement", "PLANES_SPLIT", "register", "get_pass", "registered_passes"]


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    changed: bool


@dataclass(frozen=True)
class Requirement:
    """A property of the graph a pass needs, as a predicate: ``unmet(g)`` lists the nodes that
    lack it (empty: met). ``name`` says what establishes it, for messages."""

    name: str
    unmet: Callable[[Graph], list[str]]


def _int_encoded_layers(g: Graph) -> list[str]:
    return [n.name for n in g.quant_layers() if n.quant.encoding == "int"]


# quantized layers store bitplanes, not integer weights
PLANES_SPLIT = Requirement("split_planes", _int_encoded_layers)


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: Callable[[Graph], PassResult]
    requires: tuple[Requirement, ...]
    exact: bool  # True: interpreter outputs are bit-identical before and after
    doc: str


_REGISTRY: dict[str, PassInfo] = {}


def register(*, requires: tuple[Requirement, ...] = (), exact: bool = True):
    """Register ``fn`` under its module's name (``csqc.passes.fold_bn`` -> ``fold_bn``).

    ``requires``: properties the input graph must have (checked by the pass manager on the
    graph itself, so a pipeline that establishes them another way, or a graph without quantized
    layers, passes);
    ``exact=False`` marks passes that reassociate float arithmetic (accumulators stay exact).
    """

    def deco(fn: Callable[[Graph], PassResult]):
        name = fn.__module__.rsplit(".", 1)[-1]
        if name in _REGISTRY:
            raise RuntimeError(f"pass {name} registered twice (is csqc.passes imported under two names?)")
        _REGISTRY[name] = PassInfo(name, fn, tuple(requires), exact, (fn.__doc__ or "").strip())
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInput(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}") from None


def registered_passes() -> dict[str, PassInfo]:
    return dict(_REGISTRY)
