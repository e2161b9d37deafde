"""Static memory planning: temporary buffers whose lifetimes do not overlap share memory.

Without it every intermediate tensor of a plan had memory of its own: dynamic MobileNetV2 held
22 MiB of accumulators, codes and activations, so each layer wrote into lines last touched a
whole inference earlier (out of L3 or DRAM, on a CPU whose L2 is 1-2 MiB), and ONNX Runtime,
which reuses its arena, kept its layers' data in cache. Here each temporary buffer (with the
views of its memory) lives from the first step that names it to the last; buffers whose lives
are disjoint share one pool, the pool freed most recently first (its lines are the likeliest to
be in this core's cache: usually the input the previous step read).

Plans whose temporaries fit in the cores' caches (:data:`PRIVATE_MEMORY_MAX_BYTES`) keep them
apart: there every buffer stays in the cache of the core that writes it from one call to the
next, and a pool would move lines between cores as layers of different task splits write it
(ResNet-20, 1.1 MiB of temporaries: 189 -> 196 us pooled, Zen 4, two threads; dynamic
MobileNetV2, 22.3 MiB: 2,340 -> 2,115 us, 3.8 MiB in four pools; ResNet-18 ~4% faster).

A buffer shares only when nothing but the kernels reads it between calls: never an input,
output, weight or derived buffer, nor a scale the runtime checks after the kernels ran. A kernel
never sees two of its arguments in one pool (both are alive at its step), and every kernel
writes its outputs whole before reading them (the suite runs every model with shared pools, so
a stale value would show as a mismatch against the interpreter).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .lower import Plan

__all__ = ["buffer_lifetimes", "assign_pools", "share_temp_memory", "temp_memory", "temporary_bytes", "PRIVATE_MEMORY_MAX_BYTES"]

# Up to this many bytes of temporaries a plan keeps each in memory of its own: about the L2 of
# the two cores a call runs on (1-2 MiB each on the CPUs measured)
PRIVATE_MEMORY_MAX_BYTES = 2 * 2**20


def _nbytes(spec: Mapping) -> int:
    return math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize


def buffer_lifetimes(steps: Sequence[Mapping], buffers: Mapping[str, Mapping]) -> dict[str, tuple[int, int]]:
    """``root -> (first step, last step)`` over the steps naming the root or one of its views
    (a view's ``alias`` is its root), for every root some step names."""
    life: dict[str, tuple[int, int]] = {}
    for i, step in enumerate(steps):
        for a in step["args"]:
            if isinstance(a, str):
                root = buffers[a].get("alias", a)
                first, _ = life.get(root, (i, i))
                life[root] = (first, i)
    return life


def assign_pools(lifetimes: Mapping[str, tuple[int, int]], sizes: Mapping[str, int]) -> tuple[dict[str, int], list[int]]:
    """Pools for buffers of the given lifetimes and byte sizes: ``(buffer -> pool index, pool
    sizes)``, where two buffers of one pool are never alive at one step. Buffers are placed in
    order of their first step; each takes the most recently freed pool that holds it, or else
    the most recently freed pool grown to hold it, or else a new one."""
    order = sorted(lifetimes, key=lambda b: (lifetimes[b][0], lifetimes[b][1], b))
    pool_of: dict[str, int] = {}
    pool_sizes: list[int] = []
    free: list[int] = []  # pools no live buffer holds, least recently freed first
    alive: list[tuple[int, str]] = []  # (last step, buffer), unsorted: plans are short
    for b in order:
        first, last = lifetimes[b]
        for end, held in [x for x in alive if x[0] < first]:
            alive.remove((end, held))
            free.append(pool_of[held])
        # (pools freed at one step enter in the order their buffers were placed: deterministic)
        need = sizes[b]
        fitting = [p for p in reversed(free) if pool_sizes[p] >= need]
        if fitting:
            pool = fitting[0]
        elif free:
            pool = free[-1]
            pool_sizes[pool] = need
        else:
            pool = len(pool_sizes)
            pool_sizes.append(need)
        if pool in free:
            free.remove(pool)
        pool_of[b] = pool
        alive.append((last, b))
    return pool_of, pool_sizes


def _pinned(plan: Plan) -> set[str]:
    """Roots whose contents outlive the kernels of a call: the outputs (and what they view),
    and the dynamic scales the runtime checks afterwards."""
    def root(name: str) -> str:
        return plan.buffers[name].get("alias", name)

    pinned = {root(o["name"]) for o in plan.outputs} | {root(i["name"]) for i in plan.inputs}
    for step in plan.steps:
        if "levels" in step:
            pinned.add(root(step["args"][step.get("scale_arg", 1)]))
    for o in plan.outputs:
        bound = o.get("finite_below")
        if bound:
            pinned.add(root(bound["scale"]))
    return pinned


def share_temp_memory(plan: Plan) -> None:
    """Give the plan's temporary buffers pools of shared memory (``plan.pools``: pool name ->
    bytes; each such buffer's spec names its ``pool``; views keep their ``alias``), unless they
    take at most :data:`PRIVATE_MEMORY_MAX_BYTES` in all."""
    pinned = _pinned(plan)
    lifetimes = {root: life for root, life in buffer_lifetimes(plan.steps, plan.buffers).items()
                 if plan.buffers[root]["kind"] == "temp" and "alias" not in plan.buffers[root] and root not in pinned}
    sizes = {root: max(_nbytes(plan.buffers[root]), 1) for root in lifetimes}
    if sum(sizes.values()) <= PRIVATE_MEMORY_MAX_BYTES:
        return
    pool_of, pool_sizes = assign_pools(lifetimes, sizes)
    names = [f"pool{i}" for i in range(len(pool_sizes))]
    plan.pools = dict(zip(names, pool_sizes))
    for root, pool in pool_of.items():
        plan.buffers[root]["pool"] = names[pool]


def pooled_bytes(buffers: Mapping[str, Mapping], pools: Mapping[str, int]) -> int:
    """Bytes a plan's buffers take: its pools and every buffer of memory of its own."""
    return sum(pools.values()) + sum(_nbytes(b) for b in buffers.values() if "alias" not in b and "pool" not in b)


def temporary_bytes(plan: Plan) -> dict[str, int]:
    """The memory of a plan's temporaries, shared (``temp_bytes``: pools and the temporaries
    of memory of their own) and as it would be unshared (``temp_bytes_unshared``), for the
    compile report."""
    return temp_memory(plan.buffers, plan.pools)


def temp_memory(buffers: Mapping[str, Mapping], pools: Mapping[str, int]) -> dict[str, int]:
    """:func:`temporary_bytes` of a plan's ``buffers`` and ``pools`` as an artifact stores them."""
    temps = {name: b for name, b in buffers.items() if b["kind"] == "temp" and "alias" not in b}
    return {"temp_bytes": pooled_bytes(temps, pools), "temp_bytes_unshared": sum(map(_nbytes, temps.values()))}