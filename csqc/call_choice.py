"""Which way to run a model's calls, decided by timing the calls themselves now and then.

A compiled model can run its calls more than one way with the same results: on the compiler's
thread cap or on TVM's whole pool, and with its temporaries in shared memory pools or in memory
of their own. Which is faster is a state of the machine, not of the model. Threads: on an Intel
VM whose two vCPUs add little, ResNet-20 ran 261-303 us a call on one thread and 305-407 on two;
on a two-vCPU AMD EPYC Zen 5, 145-155 us on one and on two 112-118 us or 205-215 us, switching
every few seconds within one process. Memory: on a two-vCPU Zen 4 VM, MobileNetV2 ran
2,085-2,255 us a call on shared pools against 2,236-2,563 on private memory, and in the same
VM's slow stretches (a parallel launch ~1.5 us instead of ~0.7) 4,402-4,547 against
3,769-4,102 us. So the calls decide.

A trial runs ``TRIAL_BLOCKS`` rounds; each round runs ``TRIAL_BLOCK_CALLS`` calls on every
setting in turn, and the first call of a block (which follows another setting, with its pool
workers still spinning and its memory cold) is not counted. A setting replaces the compiled one
(the first) only where its median call is faster by the margin of each way it differs
(``THREAD_MARGIN``, ``MEMORY_MARGIN``): noise alone does not move it. The trial runs again once
``TRIAL_PERIOD_SECONDS`` and ``TRIAL_PERIOD_CALLS`` have both passed, so a choice made in a
passing moment does not last. Results never depend on the setting, only the time does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["CallChoice", "CallSetting", "MEMORY_MARGIN", "THREAD_MARGIN", "TRIAL_BLOCK_CALLS", "TRIAL_BLOCKS",
           "TRIAL_PERIOD_CALLS", "TRIAL_PERIOD_SECONDS"]

# Calls per block and rounds per trial: blocks on one setting rather than alternate calls, since a
# one-thread call right after a parallel one runs beside a pool worker still spinning, which is
# not the steady state of either setting.
TRIAL_BLOCK_CALLS = 4
TRIAL_BLOCKS = 3
# How much faster (median call) a setting must be to replace the compiled one, per way it differs:
# threads against the cap 10% (ResNet-20 swings 5-10% between calls on one setting); private
# memory against shared pools 3% (the two differ by 4-14% wherever they differ at all).
THREAD_MARGIN = 0.9
MEMORY_MARGIN = 0.97
# A trial runs again once both have passed since the last one (for MobileNetV2, 200 calls are
# ~0.5 s; a trial's cost is then under 1% of the calls, at a setting ~10% slower).
TRIAL_PERIOD_SECONDS = 0.25
TRIAL_PERIOD_CALLS = 200


@dataclass(frozen=True)
class CallSetting:
    """One way to run a call: at most ``threads`` threads (None: TVM's pool as configured), with
    the plan's temporaries in its shared pools or (``shared_memory`` False) each in its own memory."""

    threads: int | None
    shared_memory: bool = True

    def text(self, pool: int) -> str:
        count = self.threads if self.threads is not None else pool
        return f"{count} thread{'s' if count != 1 else ''}, {'shared' if self.shared_memory else 'private'} memory"


class CallChoice:
    """Times calls on each of ``settings`` now and then and keeps the fastest, the first (the
    compiled setting) unless another beats it by its margins (see the module's docstring).
    ``pool``: the threads of TVM's pool, for reports."""

    def __init__(self, settings: Sequence[CallSetting], pool: int):
        if len(settings) < 2 or len(set(settings)) != len(settings):
            raise ValueError(f"a choice needs at least two distinct settings, got {list(settings)}")
        self.settings = tuple(settings)
        self.pool = pool
        self.chosen = self.settings[0]  # the setting of untimed calls
        self.trials = 0  # trials finished
        self._samples: dict[CallSetting, list[float]] = {s: [] for s in self.settings}
        self._medians: dict[CallSetting, float] = {}  # of the last trial finished, in microseconds
        self._trial_call = 0  # calls into the running trial; -1: none runs
        self._calls_since = 0  # calls since the last trial finished
        self._next_trial = 0.0  # perf_counter time from which a trial may start again

    @property
    def trial_calls(self) -> int:
        """Calls one trial takes."""
        return len(self.settings) * TRIAL_BLOCKS * TRIAL_BLOCK_CALLS

    def margin(self, setting: CallSetting) -> float:
        """The factor ``setting``'s median must beat the compiled setting's by to replace it."""
        first = self.settings[0]
        return ((THREAD_MARGIN if setting.threads != first.threads else 1.0)
                * (MEMORY_MARGIN if setting.shared_memory != first.shared_memory else 1.0))

    def next_call(self) -> tuple[CallSetting, bool]:
        """The setting of the next call, and whether to :meth:`record` its time."""
        if self._trial_call < 0:
            self._calls_since += 1
            if self._calls_since < TRIAL_PERIOD_CALLS or time.perf_counter() < self._next_trial:
                return self.chosen, False
            self._trial_call = 0
        return self._trial_setting(), True

    def _trial_setting(self) -> CallSetting:
        return self.settings[(self._trial_call // TRIAL_BLOCK_CALLS) % len(self.settings)]

    def record(self, seconds: float) -> None:
        """Count the time of the call :meth:`next_call` marked as timed."""
        if self._trial_call % TRIAL_BLOCK_CALLS:  # not the first of its block
            self._samples[self._trial_setting()].append(seconds)
        self._trial_call += 1
        if self._trial_call == self.trial_calls:
            self._medians = {s: float(np.median(times) * 1e6) for s, times in self._samples.items()}
            self.chosen = min(self.settings, key=lambda s: self._medians[s] / self.margin(s))
            self.trials += 1
            for times in self._samples.values():
                times.clear()
            self._trial_call, self._calls_since = -1, 0
            self._next_trial = time.perf_counter() + TRIAL_PERIOD_SECONDS

    def summary(self) -> str:
        """What the last trial found, for reports: '1 thread, shared memory 145 us; 2 threads,
        shared memory 112 us a call in the last of 3 trial(s): 2 threads, shared memory'."""
        if not self.trials:
            return f"no trial finished yet ({self.settings[0].text(self.pool)} until one does)"
        timed = "; ".join(f"{s.text(self.pool)} {self._medians[s]:.0f} us" for s in self.settings)
        return f"{timed} a call in the last of {self.trials} trial(s): {self.chosen.text(self.pool)}"
