"""Schedule search for the CPU kernels, per layer shape, cached on disk per CPU (``csqc compile --tune``).

The CPU kernels' register tiles, unrolling and task sizes (``kernels.BitparallelKnobs``,
``kernels.BitserialKnobs``) come from defaults fitted on a few machines; the best schedule of a
shape differs between CPUs (cache sizes, how many zmm multiply-adds issue per cycle) and between
shapes. ``--tune`` builds a small grid of candidate schedules for every bit-parallel convolution
and linear layer the plan runs off AMX tiles and every bit-serial linear layer, times each on
this machine, and keeps the fastest where it beats the default by a margin larger than the
timing noise. Every candidate computes the same integers (the knobs
change loop order and blocking only), so a tuned artifact is as exact as an untuned one; the
tests check each candidate form against a reference anyway.

Results are cached in a JSON file (``$CSQC_TUNING_CACHE``, else ``~/.cache/csqc/tuning.json``)
under a key naming the CPU (LLVM's name and the instruction sets the build uses) and the kernel's
shape, so a second ``--tune`` of the same model, or of another with the same layer shapes, takes
the cached schedules instead of searching again. The file is data a user or another program
may have written: every entry is checked (known knob names, integers in range) before a knob
reaches a kernel builder, and a file that fails the check is ignored with a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .host import isa_features

__all__ = ["CACHE_ENV", "Tuner", "TuningCache", "cache_path", "cpu_key"]

log = logging.getLogger(__name__)

CACHE_ENV = "CSQC_TUNING_CACHE"
FORMAT, VERSION = "csqc-tuning", 1
MAX_CACHE_BYTES = 16 << 20
# A candidate replaces the heuristic's schedule only when it is this much faster: smaller gains
# are within the timing noise of a shared machine, and churn would make builds differ for nothing.
MIN_GAIN = 1.05
# the knobs an entry may set, per kernel kind, and their allowed values
_RANGES = {
    "bpconv": {"conv_form": ("pixels", "channels"), "conv_channels": range(1, 33), "conv_vectors": range(1, 9),
               "conv_rows": range(1, 1 << 16), "row_block": range(1, 33), "col_vectors": range(1, 9)},
    "bpdense": {"row_block": range(1, 33), "col_vectors": range(1, 9)},
    "bsdense": {"word_unroll": range(1, 17), "rows_per_task": range(1, 65), "pack_chunk": range(8, 1025)},
}


def cache_path() -> Path:
    """Where tuned schedules are kept: ``$CSQC_TUNING_CACHE``, else ``~/.cache/csqc/tuning.json``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "csqc" / "tuning.json"


def cpu_key(target, threads: int) -> str:
    """The cache's name for the CPU a target builds for and the threads its kernels were timed on:
    LLVM's CPU name, its instruction sets and the thread count (a schedule's rows per task are
    chosen for a number of threads)."""
    return f"{target.attrs.get('mcpu', '')}:{'+'.join(isa_features(target))}:{threads} threads"


@contextlib.contextmanager
def _timing_pool(threads: int):
    """TVM's pool at ``threads`` threads while candidates are timed (TVM reads ``TVM_NUM_THREADS``
    at each parallel launch). Unset, TVM takes half the logical CPUs; on a 2-vCPU VM that hands
    every launch to one worker, and 1x1 convs timed 1.5x slower than on one thread and 2x slower
    than on the two a loaded model runs on, so the search compared schedules in a mode no call runs in."""
    saved = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = saved


def _valid_knobs(kind: str, knobs) -> dict | None:
    allowed = _RANGES.get(kind)
    if allowed is None or not isinstance(knobs, dict) or not set(knobs) <= set(allowed):
        return None
    for name, value in knobs.items():
        if isinstance(value, bool) or value not in allowed[name] or not isinstance(value, (int, str)):
            return None
    return dict(knobs)


@dataclass
class TuningCache:
    """The tuned schedules of one CPU, read from and written back to the cache file."""

    path: Path
    cpu: str
    entries: dict[str, dict] = field(default_factory=dict)  # problem key -> {"knobs", "default_us", "best_us"}

    @classmethod
    def load(cls, path: Path, cpu: str) -> "TuningCache":
        cache = cls(Path(path), cpu)
        cache.entries = {key: entry for key, entry in _read(cache.path).get(cpu, {}).items()
                         if _entry_ok(key, entry)}
        return cache

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, knobs: dict, default_us: float, best_us: float) -> None:
        self.entries[key] = {"knobs": knobs, "default_us": round(default_us, 3), "best_us": round(best_us, 3)}

    def save(self) -> None:
        """Merge this CPU's entries into the file (another process may have added some) and
        replace it atomically: a reader never sees half a file."""
        everything = _read(self.path)
        mine = {k: e for k, e in everything.get(self.cpu, {}).items() if _entry_ok(k, e)}
        mine.update(self.entries)
        everything[self.cpu] = mine
        data = json.dumps({"format": FORMAT, "version": VERSION, "cpus": everything}, indent=1, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _entry_ok(key, entry) -> bool:
    if not isinstance(key, str) or ":" not in key or not isinstance(entry, dict):
        return False
    times_ok = all(isinstance(entry.get(t), (int, float)) and not isinstance(entry.get(t), bool)
                   and 0 < entry[t] < 1e9 for t in ("default_us", "best_us"))
    return times_ok and _valid_knobs(key.split(":", 1)[0], entry.get("knobs")) is not None


def _read(path: Path) -> dict:
    """``{cpu: {key: entry}}`` from the cache file; empty (with a warning) where it is missing,
    too large or not a csqc tuning file. Entries are checked by the caller."""
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            log.warning("ignoring the tuning cache %s: larger than %d MiB", path, MAX_CACHE_BYTES >> 20)
            return {}
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("ignoring the tuning cache %s: %s", path, e)
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
            and isinstance(data.get("cpus"), dict)):
        log.warning("ignoring the tuning cache %s: not a csqc tuning file of version %d", path, VERSION)
        return {}
    return {cpu: entries for cpu, entries in data["cpus"].items() if isinstance(cpu, str) and isinstance(entries, dict)}


@dataclass
class TunedShape:
    """One searched or cached kernel shape, for the compile report."""

    key: str
    source: str  # "searched" or "cache"
    knobs: dict
    default_us: float
    best_us: float

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Tuner:
    """Knobs per kernel shape for one build: the cache's, else found by timing candidates here
    (``{}``: the kernel's defaults won)."""

    def __init__(self, target, cache: TuningCache, threads: int, on_search=None):
        self.target, self.cache, self.threads = target, cache, threads  # threads: what candidates are timed on
        self.on_search = on_search  # called with each problem key before it is searched
        self.shapes: dict[str, TunedShape] = {}
        self.seconds = 0.0

    def conv_knobs(self, geo):
        """Knobs of ``kernels.bitparallel_conv2d`` for a (non-depthwise) convolution geometry."""
        from .kernels import BitparallelKnobs

        key = "bpconv:" + "x".join(str(v) for v in (
            geo.batch, geo.in_channels, geo.height, geo.width, geo.out_channels, geo.kernel_h, geo.kernel_w,
            *geo.stride, *geo.padding, *geo.dilation, geo.groups))
        return BitparallelKnobs(**self._knobs(key, lambda: _conv_problem(geo)))

    def dense_knobs(self, m: int, n: int, k: int):
        """Knobs of ``kernels.bitparallel_dense`` (int8 weights) for an ``[m, k] x [k, n]`` product."""
        from .kernels import BitparallelKnobs

        return BitparallelKnobs(**self._knobs(f"bpdense:{m}x{n}x{k}", lambda: _dense_problem(m, n, k)))

    def bitserial_dense_knobs(self, m: int, n: int, k: int, plane_spec, act_bits: int, zero_point: bool,
                              acc_dtype: str, base):
        """Knobs of ``kernels.bitserial_dense`` for these planes and activation bits; ``base`` (the
        backend's ``BitserialKnobs``: lanes and table lookups, which fix the weight layout) is kept."""
        signs = "".join("+" if sign > 0 else "-" for _, sign in plane_spec)
        shifts = ".".join(str(shift) for shift, _ in plane_spec)
        key = (f"bsdense:{m}x{n}x{k}:planes{shifts}{signs}:a{act_bits}:z{int(zero_point)}:{acc_dtype}"
               f":lanes{base.lanes}:{'lut' if base.table_lookup else 'popcount'}")
        return replace(base, **self._knobs(key, lambda: _bitserial_dense_problem(
            m, n, k, plane_spec, act_bits, zero_point, acc_dtype, base)))

    def report(self) -> dict:
        shapes = [s.to_json() for s in self.shapes.values()]
        return {"cache": str(self.cache.path), "threads": self.threads, "seconds": round(self.seconds, 2), "shapes": shapes,
                "searched": sum(s["source"] == "searched" for s in shapes),
                "default_us": round(sum(s["default_us"] for s in shapes), 3),
                "tuned_us": round(sum(s["best_us"] for s in shapes), 3)}

    def _knobs(self, key: str, problem) -> dict:
        """The knob values to set for ``key`` (``{}``: the kernel's defaults)."""
        if key not in self.shapes:
            entry = self.cache.get(key)
            if entry is not None:
                self.shapes[key] = TunedShape(key, "cache", entry["knobs"], entry["default_us"], entry["best_us"])
            else:
                if self.on_search is not None:
                    self.on_search(key)
                start = time.perf_counter()
                with _timing_pool(self.threads):
                    knobs, default_us, best_us = _search(*problem(), self.target)
                self.seconds += time.perf_counter() - start
                self.cache.put(key, knobs, default_us, best_us)
                self.shapes[key] = TunedShape(key, "searched", knobs, default_us, best_us)
        return dict(self.shapes[key].knobs)


# --------------------------------------------------------------------------------------------
# Candidates and timing
# --------------------------------------------------------------------------------------------
def _conv_problem(geo):
    """(kernel factory of knobs, its inputs, candidate knobs) of a bit-parallel convolution."""
    from . import kernels, packing

    rng = np.random.default_rng(0)
    input_shape = (geo.batch, geo.in_channels, geo.height, geo.width)
    weight_shape = (geo.out_channels, geo.in_per_group, geo.kernel_h, geo.kernel_w)
    x = rng.integers(0, 16, input_shape).astype(np.uint8)
    w = packing.pack_bitparallel_conv_weight(rng.integers(-7, 8, weight_shape), geo.groups)

    def factory(knobs: dict):
        return kernels.bitparallel_conv2d(input_shape, weight_shape, geo.stride, geo.padding, geo.dilation,
                                          geo.groups, kernels.BitparallelKnobs(**knobs))

    return factory, (x, w), _conv_candidates(geo)


def _conv_candidates(geo) -> list[dict]:
    """Pixels on the lanes: register tiles of 8..24 accumulators x tasks of ~128..512 flat
    positions; channels on the lanes: a few (rows, 16-channel vectors) register tiles."""
    from .kernels import task_rows

    wq = -(-geo.padded_w // geo.stride[1])
    found = []
    for channels, vectors in ((16, 1), (8, 2), (4, 4), (12, 2), (8, 3)):
        if channels > 2 * geo.out_per_group and channels > 4:
            continue
        o_blocks = geo.batch * geo.groups * -(-geo.out_per_group // channels)
        # tasks of about 128 and 512 positions, and the rows that compute the fewest positions
        for rows in sorted({max(1, min(geo.out_h, round(positions / wq))) for positions in (128, 512)}
                           | {task_rows(geo, wq, vectors, o_blocks)}):
            found.append({"conv_form": "pixels", "conv_channels": channels, "conv_vectors": vectors, "conv_rows": rows})
    n_tiles = -(-geo.out_per_group // 16)
    for row_block, col_vectors in ((8, 2), (7, 2), (4, 4), (12, 2), (6, 3)) if n_tiles > 1 else ((16, 1), (8, 1)):
        if col_vectors <= n_tiles:
            found.append({"conv_form": "channels", "row_block": row_block, "col_vectors": col_vectors})
    return found


def _dense_problem(m: int, n: int, k: int):
    from . import kernels, packing

    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, (m, k)).astype(np.uint8)
    w = packing.pack_bitparallel_weight(rng.integers(-7, 8, (n, k)))

    def factory(knobs: dict):
        return kernels.bitparallel_dense(m, n, k, "int8", "int32", kernels.BitparallelKnobs(**knobs))

    candidates = [{"row_block": rb, "col_vectors": cv} for rb, cv in
                  ((1, 4), (2, 4), (4, 2), (4, 4), (6, 3), (8, 1), (8, 3), (12, 2), (16, 1))
                  if rb <= m and cv <= -(-n // 16)]
    return factory, (x, w), candidates


def _bitserial_dense_problem(m, n, k, plane_spec, act_bits, zero_point, acc_dtype, base):
    from . import kernels, packing

    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << act_bits, (m, k)).astype(np.uint8)
    planes = packing.pack_weight_planes(rng.integers(0, 2, (len(plane_spec), n, k)).astype(np.uint8), lanes=base.lanes)

    def factory(knobs: dict):
        return kernels.bitserial_dense(m, n, k, plane_spec, act_bits, zero_point, acc_dtype,
                                       replace(base, **knobs))

    candidates = [{"word_unroll": unroll, "pack_chunk": chunk, "rows_per_task": rows}
                  for unroll in (1, 2, 4) for chunk in (32, 128) for rows in ((1, 4) if m > 1 else (1,))]
    return factory, (x, planes, len(plane_spec), 1 if zero_point else 0), candidates


def _time_us(kernel, inputs, budget_us: float = 2000.0) -> float:
    """Median of 5 repeats, each long enough (~``budget_us``) that timer resolution does not matter."""
    once = kernel.time_us(*inputs, number=1, repeat=3)
    number = max(1, min(1000, int(budget_us / max(once, 1e-3))))
    return kernel.time_us(*inputs, number=number, repeat=5)


def _search(factory, inputs, candidates: list[dict], target) -> tuple[dict, float, float]:
    """(knobs, heuristic's time, chosen time): every candidate built and timed once, then the
    heuristic's schedule and the fastest timed again, alternately; ``{}`` (the heuristic) unless
    the fastest wins by ``MIN_GAIN`` over both rounds."""
    from .kernels import build

    default = build(factory({}), target)
    default_us = _time_us(default, inputs)
    best, best_kernel, best_us = {}, default, default_us
    for knobs in candidates:
        try:
            kernel = build(factory(knobs), target)
        except Exception as error:  # (TVM raises its own kinds) a candidate that does not build is no schedule
            log.warning("tuning: candidate %s did not build and was skipped (a csqc bug: %s)", knobs,
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            continue
        elapsed = _time_us(kernel, inputs)
        if elapsed < best_us:
            best, best_kernel, best_us = knobs, kernel, elapsed
    if not best:
        return {}, default_us, default_us
    again_default, again_best = _time_us(default, inputs), _time_us(best_kernel, inputs)
    default_us, best_us = min(default_us, again_default), max(best_us, again_best)
    if best_us * MIN_GAIN > default_us:
        return {}, default_us, default_us
    return best, default_us, best_us
