"""The machine's limits, measured in the bench run: memory bandwidth, the int8 MAC peak and the
cost of a parallel launch.

``csqc bench`` states how far csqc is from what the CPU can do, not only from its peers:

* **bandwidth**: a streaming read (sum of int32 vectors into registers) over a buffer larger
  than the last-level cache (what weights streamed from DRAM can reach) and over one the size
  of the model's weights (what they can reach when they stay in cache, as they do in a bench
  loop). The probe is a small TVM kernel rather than numpy: numpy reduces on one thread, while
  this kernel runs on TVM's own pool with the same thread count as the artifact it is compared to.
* **integer peak**: independent chains of ``vpdpbusd`` (AVX-512 VNNI, 64 u8 x s8 MACs per
  instruction; the 256-bit AVX-VNNI form where only that exists) on register-resident operands;
  on AVX2 the ``vpmaddubsw`` + ``vpmaddwd`` pairs csqc's AVX2 kernels use (``isa.dot4``);
  elsewhere an int32 vector multiply-add chain (one MAC per lane).

* **fork-join**: one parallel launch of TVM's pool over empty tasks, what every parallel kernel of
  a model pays before it does any work (a model of ~100 kernels pays it ~100 times a call). It
  also says what state the machine was in: on the 2-vCPU VM here it is 0.8 us while the two vCPUs
  pass a cache line in ~50 ns, and 2.2 us in the stretches (seconds to minutes) when they take
  ~200 ns, as on two dies; every two-thread time, csqc's and ONNX Runtime's, is slower then.

The kernels live in one TVM module, compiled once per process (about 0.3 s), and each probe
runs for a few milliseconds, so they add well under a second to a bench run.
"""
from __future__ import annotations

import functools
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["MachineLimits", "measure_limits", "last_level_cache_bytes", "chains_of"]

_LANES = 16  # int32 lanes of one 512-bit vector
_UNROLL = 4  # independent accumulators of the streaming read
_CHAINS = 16  # independent vpdpbusd chains: enough to cover its latency at full issue rate
_AVX2_CHAINS = 4  # AVX2: each chain's accumulator takes two of the 16 registers
_MAX_DRAM_BUFFER = 1 << 30  # CPUs with huge caches get a buffer this big
_MIN_DRAM_BUFFER = 256 << 20  # measured here: 64 MiB (2x the LLC sysfs reports) still read at 54 GB/s, 256 MiB+ at 13-15
_MIN_BYTES_PER_CALL = 8 << 20  # small buffers are read several times per call (see _stream_rate)
_PROBE_SECONDS = 0.04  # per probe: long enough for a stable best-of, short enough to stay cheap


@dataclass(frozen=True)
class MachineLimits:
    """What the CPU reached in the probes (``threads`` threads, best of a few repeats)."""

    threads: int
    llc_bytes: int
    dram_buffer_bytes: int
    dram_gb_per_s: float  # streaming read over a buffer larger than the last-level cache
    weights_buffer_bytes: int
    weights_gb_per_s: float  # streaming read over a buffer the size of the model's weights
    int_peak_gmac_per_s: float  # integer multiply-accumulates per second, in 1e9
    int_peak_kind: str  # which instruction the peak was measured with
    fork_join_us: float  # one parallel launch of empty tasks on the pool (0 on one thread: no launch)
    seconds: float  # wall time of the probes, compilation included

    def to_json(self) -> dict:
        return asdict(self)


def last_level_cache_bytes() -> int:
    """Size of the largest cache CPU 0 sees (sysfs), 32 MiB where the kernel does not say."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text[-1:].upper() in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1].upper()])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=32 << 20)


def measure_limits(weight_bytes: int, threads: int) -> MachineLimits:
    """Run both probes with ``threads`` threads (TVM's pool: ``TVM_NUM_THREADS`` must already say
    so, as ``csqc.bench`` sets it before the first TVM call)."""
    start = time.perf_counter()
    module, kind, macs_per_step = _probe_module(threads)
    llc = last_level_cache_bytes()
    dram_bytes = min(max(8 * llc, _MIN_DRAM_BUFFER), _MAX_DRAM_BUFFER)
    dram_bytes, dram = _stream_rate(module, dram_bytes, threads)
    weights_bytes, weights = _stream_rate(module, max(weight_bytes, 1), threads)
    peak = _int_peak(module, threads, macs_per_step * chains_of(kind))
    fork_join = _fork_join_seconds(module, threads) if threads > 1 else 0.0
    return MachineLimits(threads, llc, dram_bytes, dram / 1e9, weights_bytes, weights / 1e9, peak / 1e9, kind,
                         fork_join * 1e6, time.perf_counter() - start)


_LAUNCHES = 1000  # parallel launches per fork-join probe call: ~1-3 ms


def _fork_join_seconds(module, threads: int) -> float:
    """Best time of one parallel launch of ``threads`` empty tasks (``_LAUNCHES`` in a call)."""
    import tvm

    out = tvm.runtime.tensor(np.zeros((threads, _LANES), np.int32))
    return _best_seconds(lambda: module["fork_join"](_LAUNCHES, out), _LAUNCHES * 1e-6) / _LAUNCHES


def _stream_rate(module, nbytes: int, threads: int) -> tuple[int, float]:
    """``(bytes read per call, best bytes/s)``: ``nbytes`` rounded up to whole vector groups per thread."""
    import tvm

    group = threads * _UNROLL * _LANES * 4
    steps = -(-nbytes // group)
    host = _aligned_empty((threads, steps * _UNROLL, _LANES))
    buf = tvm.runtime.from_dlpack(host)  # shares host's memory
    module["fill"](buf)  # its pages written by the threads that read them (untouched pages read as one zero page)
    out = tvm.runtime.tensor(np.zeros((threads, _LANES), np.int32))
    total = steps * group
    # several passes per call over small buffers, so the rate is the cache's, not the call's overhead
    passes = max(1, _MIN_BYTES_PER_CALL // total)
    seconds = _best_seconds(lambda: module["stream_read"](buf, passes, out), passes * total / 20e9)
    return total, passes * total / seconds


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An int32 array aligned to 64 bytes, as TVM requires. numpy asks the kernel for huge pages
    for large arrays (TVM's allocator does not): 256 MiB then costs 0.03-0.15 s to fill, not 0.2-0.4 s."""
    nbytes = int(np.prod(shape)) * 4
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(np.int32).reshape(shape)


def chains_of(kind: str) -> int:
    """Independent accumulator chains of the peak probe of ``kind``."""
    return _AVX2_CHAINS if "vpmaddubsw" in kind else _CHAINS


def _int_peak(module, threads: int, macs_per_step: int) -> float:
    """Best multiply-accumulates per second over register-resident chains (``macs_per_step``:
    of all chains together)."""
    import tvm

    operands = tvm.runtime.tensor(np.full((2, 4 * _LANES), 3, np.int8))
    out = tvm.runtime.tensor(np.zeros((threads, _LANES), np.int32))
    steps = 20_000  # x 16 chains x 64 MACs x threads: ~0.1-1 ms per call on a VNNI core
    seconds = _best_seconds(lambda: module["int_peak"](operands, steps, out), 1e-3)
    return threads * steps * macs_per_step / seconds


def _best_seconds(call, guess_seconds: float) -> float:
    """Fastest of repeated calls within ``_PROBE_SECONDS`` (after one warm-up call): the
    probe asks what the machine can do, so the best time, not the median, answers it."""
    call()
    best, deadline = float("inf"), time.perf_counter() + max(_PROBE_SECONDS, 3 * guess_seconds)
    for _ in range(1000):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    return best


@functools.lru_cache(maxsize=None)
def _probe_module(threads: int, mcpu: str | None = None):
    """``(module, peak kind, MACs per chain step)`` for this CPU (or ``mcpu``: the fallbacks'
    tests), built once per process and thread count."""
    import tvm
    import tvm.target.codegen as codegen

    from .targets.llvm.kernels import cpu_target

    target = cpu_target(mcpu)
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    if is_x86 and codegen.llvm_cpu_has_features(["avx512vnni"], target):
        peak, kind, macs = _vnni_peak(threads, 16, "llvm.x86.avx512.vpdpbusd.512"), "AVX-512 VNNI vpdpbusd (int8)", 64
    elif is_x86 and codegen.llvm_cpu_has_features(["avxvnni"], target):
        peak, kind, macs = _vnni_peak(threads, 8, "llvm.x86.avx512.vpdpbusd.256"), "AVX-VNNI vpdpbusd (int8)", 32
    elif is_x86 and codegen.llvm_cpu_has_features(["avx2"], target):
        peak, kind, macs = _avx2_dot_peak(threads), "AVX2 vpmaddubsw + vpmaddwd (int8)", 4 * _LANES
    else:
        peak, kind, macs = _multiply_add_peak(threads), "int32 vector multiply-add (no VNNI)", _LANES
    funcs = {"fill": _fill(threads), "stream_read": _stream_read(threads), "int_peak": peak,
             "fork_join": _fork_join(threads)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    # see kernels._ON_STACK: storage rewrite would drop the on-stack annotation of the accumulators
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        return tvm.compile(mod, target=target).mod, kind, macs


_ON_STACK = {"disable_lower_builtin": True}  # register-sized scratch stays in registers (kernels._ON_STACK)


def _fill(threads: int):
    from tvm.script import tirx as T

    @T.prim_func
    def fill(buf_handle: T.handle):
        T.func_attr({"tir.noalias": True})
        words = T.int32()
        buf = T.match_buffer(buf_handle, (threads, words, _LANES), "int32")
        for t in T.parallel(threads):
            for i in range(words):
                buf[t, i, T.ramp(0, 1, _LANES)] = T.broadcast(T.int32(1), _LANES)

    return fill


def _fork_join(threads: int):
    """``launches`` parallel launches, one after another, each task storing one word (kept)."""
    from tvm.script import tirx as T

    @T.prim_func
    def fork_join(launches: T.int32, out: T.Buffer((threads, _LANES), "int32")):
        T.func_attr({"tir.noalias": True})
        for r in range(launches):
            for t in T.parallel(threads):
                out[t, 0] = r

    return fork_join


def _stream_read(threads: int):
    from tvm.script import tirx as T

    @T.prim_func
    def stream_read(buf_handle: T.handle, passes: T.int32, out: T.Buffer((threads, _LANES), "int32")):
        T.func_attr({"tir.noalias": True})
        words = T.int32()
        buf = T.match_buffer(buf_handle, (threads, words, _LANES), "int32")
        for t in T.parallel(threads):
            acc = T.alloc_buffer((_UNROLL,), "int32x16", scope="local", annotations=_ON_STACK)
            for u in T.unroll(_UNROLL):
                acc[u] = T.broadcast(T.int32(0), _LANES)
            for _ in range(passes):
                for i in range(words // _UNROLL):
                    for u in T.unroll(_UNROLL):
                        acc[u] = acc[u] + buf[t, i * _UNROLL + u, T.ramp(0, 1, _LANES)]
            out[t, T.ramp(0, 1, _LANES)] = acc[0] + acc[1] + acc[2] + acc[3]

    return stream_read


def _vnni_peak(threads: int, lanes: int, intrinsic: str):
    """``lanes`` int32 accumulators per instruction, each adding four u8 x s8 products."""
    from tvm.script import tirx as T

    acc_type = f"int32x{lanes}"

    @T.prim_func
    def int_peak(operands: T.Buffer((2, 4 * _LANES), "int8"), steps: T.int32,
                 out: T.Buffer((threads, _LANES), "int32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((_CHAINS,), acc_type, scope="local", annotations=_ON_STACK)
            for c in T.unroll(_CHAINS):
                acc[c] = T.broadcast(T.int32(c), lanes)
            for _ in range(steps):
                for c in T.unroll(_CHAINS):
                    acc[c] = T.call_llvm_pure_intrin(acc_type, intrinsic, acc[c],
                                                     operands[0, T.ramp(0, 1, 4 * lanes)],
                                                     operands[1, T.ramp(0, 1, 4 * lanes)])
            for c in T.unroll(1, _CHAINS):  # every chain feeds the output: none is dead code
                acc[0] = acc[0] + acc[c]
            out[t, T.ramp(0, 1, lanes)] = acc[0]

    return int_peak


def _avx2_dot_peak(threads: int):
    """The int8 dot product csqc's AVX2 kernels use (``isa.dot4``: 64 u8 x s8 MACs a step, in
    two 256-bit halves); fewer chains, as each takes two of AVX2's 16 registers. Its products
    do not depend on the accumulator, so LLVM would hoist them out of a loop over constant
    operands: the codes are carried from step to step instead (``min(codes, operand)``, equal to
    the operand every step, one cheap ALU operation per step against eight multiplies)."""
    from tvm.script import tirx as T

    from .targets.llvm.isa import AVX2, dot4

    chains = _AVX2_CHAINS

    @T.prim_func
    def int_peak(operands: T.Buffer((2, 4 * _LANES), "int8"), steps: T.int32,
                 out: T.Buffer((threads, _LANES), "int32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((chains,), "int32x16", scope="local", annotations=_ON_STACK)
            codes = T.alloc_buffer((1,), "int8x64", scope="local", annotations=_ON_STACK)
            codes[0] = operands[0, T.ramp(0, 1, 4 * _LANES)]
            for c in T.unroll(chains):
                acc[c] = T.broadcast(T.int32(c), _LANES)
            for _ in range(steps):
                codes[0] = T.min(codes[0], operands[0, T.ramp(0, 1, 4 * _LANES)])
                for c in T.unroll(chains):
                    acc[c] = dot4(acc[c], codes[0], operands[1, T.ramp(0, 1, 4 * _LANES)], AVX2)
            for c in T.unroll(1, chains):
                acc[0] = acc[0] + acc[c]
            out[t, T.ramp(0, 1, _LANES)] = acc[0]

    return int_peak


def _multiply_add_peak(threads: int):
    """``acc = acc * a + b`` per int32 lane: a chain LLVM cannot fold into a closed form."""
    from tvm.script import tirx as T

    @T.prim_func
    def int_peak(operands: T.Buffer((2, 4 * _LANES), "int8"), steps: T.int32,
                 out: T.Buffer((threads, _LANES), "int32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((_CHAINS,), "int32x16", scope="local", annotations=_ON_STACK)
            for c in T.unroll(_CHAINS):
                acc[c] = T.broadcast(T.int32(c), _LANES)
            for _ in range(steps):
                for c in T.unroll(_CHAINS):
                    acc[c] = acc[c] * T.Cast("int32x16", operands[0, T.ramp(0, 1, _LANES)]) \
                        + T.Cast("int32x16", operands[1, T.ramp(0, 1, _LANES)])
            for c in T.unroll(1, _CHAINS):
                acc[0] = acc[0] + acc[c]
            out[t, T.ramp(0, 1, _LANES)] = acc[0]

    return int_peak
