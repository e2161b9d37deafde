"""``csqc bench``: csqc's artifact against what users run today, side by side in one process.

Baselines run the float model the CSQ model stands for (its dequantized weights, activation
quantization removed), on the same inputs, with the same thread count:
PyTorch fp32 eager, ONNX Runtime fp32, ONNX Runtime int8 (static QDQ, uint8 activations,
int8 per-channel weights), ONNX Runtime dynamic int8 (models whose layers are all linear),
and ``MatMulNBits`` 4-bit (linear layers). Rounds are interleaved with short idle gaps so
thread pools of one runtime do not distort another's timing (the order rotates each round, so
no runtime always follows the same one); medians are reported, with the spread over rounds
(interquartile range / median) and an ``unreliable`` flag where it is large. ORT sessions stop
spinning when a run returns (their default pools spin between runs and would take the cores
from the runtime timed next); each ORT baseline is then also timed alone in its default
spinning pool and keeps the faster of the two. PyTorch's OpenMP pool waits passively here (see
``_TORCH_POOL_PASSIVE``); PyTorch is then also timed alone in a child process with its default
spinning pool, and keeps the faster of the two as well. csqc, too, is then timed alone and
keeps the faster of its two times: each runtime is compared at its best.
On the CPU the report also holds the machine's limits measured in the same run
(``csqc.probes``: streaming-read bandwidth, int8 MAC peak) and csqc's achieved weight bytes/s
and integer MACs/s as fractions of them.
Machines are shared and noisy: read ratios, not absolute times.

``device="cuda"`` times a CUDA artifact on the GPU against PyTorch fp32 and fp16 (cuBLAS/cuDNN)
and ONNX Runtime's CUDA execution provider (fp32, int8 QDQ), where this machine's torch and
onnxruntime builds have CUDA; a baseline that cannot run says why in the report's notes.
Every runtime's time includes copying the input to the GPU and the output back.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BadInput, CsqcError
from .ir import Graph, Node, QUANT_LAYER_OPS
from .logs import quiet_ort_quantizer
from .optable import OP_TABLE
from .provenance import check_artifact_model

__all__ = ["BenchResult", "BenchReport", "UNRELIABLE_SPREAD", "float_graph", "torch_runner", "integer_macs",
           "utilization", "bench", "bench_remote"]

log = logging.getLogger(__name__)

# libgomp, PyTorch's OpenMP runtime, reads its wait policy once, when torch is first imported.
# By default a thread that reaches a barrier spins; on busy cores it burns the time slice its
# partner thread needs to finish, and a call waits for the scheduler. Measured here (2 busy
# cores, torch 2.13, linear 1024 at batch 64): 16 ms per call spinning against 1.9 ms passive
# and 1.7 ms on one thread; on a quiet machine passive waiting costs a futex wake per region.
# TVM and ONNX Runtime have their own pools and do not read it.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_TORCH_POOL_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"

UNRELIABLE_SPREAD = 0.25  # interquartile range / median over rounds above which a time is flagged


@dataclass
class BenchResult:
    runtime: str
    median_us: float
    weight_bytes: int
    note: str = ""
    spread: float = 0.0  # interquartile range / median of the per-round times
    unreliable: bool = False  # spread above UNRELIABLE_SPREAD: the machine disturbed this runtime


@dataclass
class BenchReport:
    model: str
    batch: int
    threads: int
    results: list[BenchResult] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    cpu: str = ""
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    remote: dict = field(default_factory=dict)  # the remote device it ran on (csqc.remote.describe_device)
    limits: dict = field(default_factory=dict)  # the machine's limits and csqc's fractions of them (utilization)
    profile: list[dict] = field(default_factory=list)  # per kernel call: index, node, kind, median_us

    def ratios(self) -> dict[str, float]:
        """Speed-up of csqc over each baseline (baseline time / csqc time)."""
        mine = next((r for r in self.results if r.runtime == "csqc"), None)
        if mine is None or mine.median_us <= 0:
            return {}
        return {r.runtime: r.median_us / mine.median_us for r in self.results if r.runtime != "csqc"}

    def to_json(self) -> dict:
        return {
            "model": self.model, "batch": self.batch, "threads": self.threads, "cpu": self.cpu,
            "device": self.device, "results": [r.__dict__ for r in self.results],
            "speedup_vs": self.ratios(), "notes": self.notes,
            **({"sweep_planes": self.sweep} if self.sweep else {}), **({"remote": self.remote} if self.remote else {}),
            **({"limits": self.limits} if self.limits else {}), **({"profile": self.profile} if self.profile else {}),
        }


def float_graph(g: Graph) -> Graph:
    """The float model a quantized graph stands for: dequantized weights, no activation quant.

    Works on a graph after the ``none`` or ``integer`` pipeline (weights as integers).
    """
    from .interpreter import decode_weight

    nodes, params, rename = [], dict(g.params), {}
    producers = g.producers()
    for n in g.nodes:
        inputs = tuple(rename.get(i, i) for i in n.inputs)
        if n.op == "quantize":
            rename[n.name] = inputs[0]
            continue
        if n.op == "dequantize":
            rename[n.name] = inputs[0]
            continue
        if n.op in QUANT_LAYER_OPS:
            q = decode_weight(g, n).astype(np.float32)
            mult = g.params[n.inputs[2]].astype(np.float32)
            w = (q * mult.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)
            params[f"{n.name}.wf32"] = w
            new_inputs = (inputs[0], f"{n.name}.wf32") + ((inputs[3],) if len(inputs) == 4 else ())
            attrs = {k: v for k, v in n.attrs.items() if k not in ("weight_shape", "form", "form_weights")}
            nodes.append(Node(n.name, "conv2d" if n.op == "qconv2d" else "linear", new_inputs, n.type, attrs, None, n.source))
            continue
        if n.type.quantized:  # pragma: no cover - only quantize yields quantized values here
            raise CsqcError(f"cannot build the float twin of {n.name}")
        nodes.append(n.replace(inputs=inputs))
    outputs = tuple(rename.get(o, o) for o in g.outputs)
    from .passes import run_passes

    fg = g.replace(nodes=tuple(nodes), outputs=outputs, params=params)
    fg, _ = run_passes(fg, ("dce",))
    del producers
    return fg


def torch_runner(g: Graph, device: str = "cpu", dtype: str = "float32") -> Callable[..., np.ndarray]:
    """PyTorch eager execution of a float graph (the 'PyTorch fp32' baseline; fp16 on a GPU).

    ``run(*inputs)`` takes one array per graph input; it returns the output (a list when the
    graph has several), as float32 numpy arrays on the host."""
    import torch

    tdtype = getattr(torch, dtype)

    def to_device(a: np.ndarray):
        t = torch.from_numpy(np.array(a))
        return t.to(device, tdtype if t.is_floating_point() else t.dtype)

    params = {k: to_device(v) for k, v in g.params.items()}

    ops = {name: d.torch for name, d in OP_TABLE.items() if d.torch is not None}  # the table's torch forms

    @torch.no_grad()
    def run(*xs: np.ndarray):
        env = dict(params)
        for v, x in zip(g.inputs, xs):
            env[v.name] = to_device(x)
        for n in g.nodes:
            env[n.name] = ops[n.op](n, [env[i] for i in n.inputs])
        outs = [env[o].float().cpu().numpy() for o in g.outputs]
        return outs[0] if len(outs) == 1 else outs

    return run


def _ort_session(model_bytes: bytes, threads: int, provider: str = "CPUExecutionProvider", spinning: bool = False):
    """``spinning=False``: the pool stops spinning when ``run`` returns. By default ONNX Runtime's
    threads keep spinning between runs; in a process that times several runtimes in turn they
    would steal the cores from every other runtime (measured here: csqc 2x slower next to one
    idle ORT session)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model_bytes, opts, providers=[provider])


class _OrtRunner:
    """An ORT baseline; ``spinning()`` gives the same model in ORT's default (spinning) pool."""

    def __init__(self, model_bytes: bytes, names: list[str], threads: int, provider: str, spinning: bool = False):
        self._args = (model_bytes, names, threads, provider)
        self._names = names
        self._sess = _ort_session(model_bytes, threads, provider, spinning)

    def __call__(self, *xs):
        return self._sess.run(None, dict(zip(self._names, xs)))[0]

    def spinning(self) -> "_OrtRunner":
        return _OrtRunner(*self._args, spinning=True)


@quiet_ort_quantizer()  # its warnings are about ORT's own tuning, not the user's model
def _onnx_baselines(fg: Graph, calib: list, threads: int, tmp: Path,
                    provider: str = "CPUExecutionProvider") -> dict[str, tuple[Callable, int, str]]:
    """fp32, static QDQ int8 (u8/s8 per channel), dynamic int8, MatMulNBits (the last two on
    the CPU only: ORT's CUDA provider runs neither).

    ``calib``: calibration samples, each an array or a tuple of arrays (one per graph input);
    the runners take one array per graph input."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .targets.onnx.reference import emit_reference

    out: dict[str, tuple[Callable, int, str]] = {}
    fp32 = emit_reference(fg)
    fp32_path = tmp / "fp32.onnx"
    onnx.save(fp32, fp32_path)
    names = [v.name for v in fg.inputs]
    weight_bytes = sum(int(v.nbytes) for v in fg.params.values())

    def runner(path: Path):
        return _OrtRunner(path.read_bytes(), names, threads, provider)

    out["onnxruntime-fp32"] = (runner(fp32_path), weight_bytes, "")
    pre = tmp / "pre.onnx"
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    except Exception:  # pre-processing is an optimisation; quantize the plain model otherwise
        pre = fp32_path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([dict(zip(names, c if isinstance(c, (tuple, list)) else (c,))) for c in calib])

        def get_next(self):
            return next(self.items, None)

    int8 = tmp / "int8.onnx"
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    out["onnxruntime-int8"] = (runner(int8), weight_bytes // 4, "static QDQ, u8 activations, s8 per-channel weights")
    if provider != "CPUExecutionProvider":
        return out
    linear_only = all(n.op in ("linear", "relu", "clip", "reshape", "softmax", "add", "sub", "mul", "sigmoid", "tanh",
                               "slice", "cat") for n in fg.nodes)  # e.g. MLPs and LSTM/GRU cells
    if linear_only:
        dyn = tmp / "dyn.onnx"
        quantize_dynamic(str(fp32_path), str(dyn), weight_type=QuantType.QInt8)
        out["onnxruntime-int8-dynamic"] = (runner(dyn), weight_bytes // 4, "dynamic int8")
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            model = onnx.load(fp32_path)
            q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4, bits=4)
            q.process()
            nbits = tmp / "nbits.onnx"
            onnx.save(q.model.model, nbits)
            out["onnxruntime-matmulnbits-4b"] = (runner(nbits), weight_bytes // 8, "4-bit weights, accuracy level 4")
        except Exception as e:  # the quantizer's API moves between releases
            log.warning("MatMulNBits baseline unavailable: %s", e)
    return out


ROUND_SECONDS = 0.05  # each runtime's share of a round


@dataclass(frozen=True)
class Timing:
    median_us: float
    spread: float  # interquartile range / median over the rounds

    @staticmethod
    def of(seconds: list[float]) -> "Timing":
        q1, median, q3 = np.percentile(np.asarray(seconds) * 1e6, [25, 50, 75])
        return Timing(float(median), float((q3 - q1) / median) if median > 0 else 0.0)


def _time_interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                      round_seconds: float = ROUND_SECONDS,
                      on_round: Callable[[int, int], None] | None = None) -> dict[str, Timing]:
    """Median latency per runtime (us) and its spread over ``rounds`` rounds, each runtime in turn.

    Each runtime's turn lasts about ``round_seconds`` (its call count is sized from warm calls):
    short turns measured caches and thread pools still cold from the previous runtime (here
    10 ms turns made csqc's int8 GEMV 1.7x slower than when run alone; 50 ms turns agree).
    The order rotates every round, so no runtime always runs right after the same other one.
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    calls = {}
    for key, f in fns.items():  # warm up every runtime, and size its turn
        f()
        calls[key] = max(1, min(5000, int(round_seconds / max(1e-7, min(_once(f) for _ in range(3))))))
    keys = list(fns)
    for done in range(rounds):
        if on_round is not None:
            on_round(done, rounds)
        for key in keys[done % len(keys):] + keys[:done % len(keys)]:
            f = fns[key]
            time.sleep(0.02)  # let the previous runtime's threads go idle
            f()  # and wake this one's thread pool: steady-state latency is what is compared
            t = time.perf_counter()
            for _ in range(calls[key]):
                f()
            samples[key].append((time.perf_counter() - t) / calls[key])
    return {k: Timing.of(v) for k, v in samples.items()}


def bench(model, *, batch: int | None = None, threads: int = 2, rounds: int = 15, artifact: str | None = None,
          sweep_planes: bool = False, dataset: str | None = None, baselines: bool = True,
          device: str = "cpu", rpc: str | None = None, key: str | None = None, limits: bool = True,
          profile: bool = False, on_progress: Callable[[str, int, int | None], None] | None = None) -> BenchReport:
    """Compile (unless ``artifact`` is given) and time csqc against the baselines.

    ``limits``: on the CPU, also probe the machine's bandwidth and int8 peak after the timing
    (``csqc.probes``) and report csqc's fractions of them (``BenchReport.limits``).
    ``profile``: also time every kernel call of the artifact on its own (``csqc.runtime.profile_steps``,
    ``BenchReport.profile``): where the time goes, layer by layer.

    ``device``: ``cpu`` (an llvm artifact) or ``cuda`` (a cuda artifact, on this machine's GPU).
    ``rpc``: time ``artifact`` on a remote TVM RPC server instead ("host:port"; with ``key`` a
    tracker and the device key), see ``bench_remote``.
    ``on_progress(step, done, total)`` hears each step (``total`` None when unknown) for a progress bar."""
    step = on_progress or (lambda name, done, total: None)
    from . import runtime
    from .compiler import optimize, to_model

    if rounds < 1:
        raise BadInput(f"--rounds must be at least 1, got {rounds}")
    if rpc is not None or key is not None:
        return bench_remote(model, artifact, rpc, key=key, rounds=rounds, sweep_planes=sweep_planes, dataset=dataset,
                            on_progress=on_progress)
    if device not in _ARTIFACT_KIND:
        raise BadInput(f"--device must be one of {', '.join(_ARTIFACT_KIND)}, got {device!r}")
    if device == "cuda":
        arch = _gpu_arch()
    if not 1 <= threads <= 1024:  # torch and TVM take a C int, and thousands of threads only thrash
        raise BadInput(f"--threads must be in 1..1024, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    model = to_model(model)
    from .verify import check_batch_first

    check_batch_first(model, "bench", fixed_ok=True)
    if artifact is not None:  # timing another model's artifact against this one's baselines says nothing
        check_artifact_model(model, artifact)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if artifact is None:
            from .compiler import compile as compile_model

            artifact = str(tmp / "model.so")
            step("compiling", 0, None)
            if device == "cuda":
                compile_model(model, "cuda", artifact, batch=batch, arch=arch)
            else:
                compile_model(model, "llvm", artifact, batch=batch)
        art = runtime.load(artifact)
        if art.target != _ARTIFACT_KIND[device]:
            other = next(d for d, kind in _ARTIFACT_KIND.items() if kind == art.target)
            raise BadInput(f"{artifact} is a {art.target} artifact: bench it with --device {other}, or compile "
                           f"one with --target {_ARTIFACT_KIND[device]}")
        shape = art.inputs[0]["shape"]
        xs, calib = _inputs(model, art.inputs, dataset)
        weight_bytes = _stored_bytes(art)
        fns: dict[str, Callable[[], object]] = {"csqc": lambda: art(*xs)}
        sizes = {"csqc": (weight_bytes, "")}
        notes: list[str] = []
        probe_limits = limits and device == "cpu"
        graph = optimize(model, "none", batch=shape[0]) if baselines or probe_limits else None
        if baselines:
            step("preparing baselines", 0, None)
            fg = float_graph(graph)
            fp32_bytes = sum(int(v.nbytes) for v in fg.params.values())
            ort_runners = {}
            for name, (fn, size, note) in _baselines(fg, calib, threads, tmp, device, notes).items():
                fns[name] = (lambda f=fn: f(*xs))
                sizes[name] = (size or fp32_bytes, note)
                if isinstance(fn, _OrtRunner):
                    ort_runners[name] = fn
        gc.collect()
        timings = _time_interleaved(fns, rounds, on_round=lambda done, total: step("timing rounds", done, total))
        if baselines:
            step("timing csqc alone", 0, None)
            _best_alone("csqc", fns["csqc"], timings, sizes, max(5, rounds // 2))
            step("timing ONNX Runtime alone", 0, None)
            _best_of_spinning_ort(ort_runners, xs, timings, sizes, max(5, rounds // 2))
            if device == "cpu" and _TORCH_POOL_PASSIVE:
                step("timing PyTorch alone", 0, None)
                _best_of_spinning_torch(fg, xs, threads, timings, sizes, max(5, rounds // 2), tmp)
        report = BenchReport(_model_name(model), shape[0], threads, cpu=art.plan["target"].get("mcpu", ""),
                             device=device, notes=notes)
        for key, timing in timings.items():
            report.results.append(BenchResult(key, timing.median_us, sizes[key][0], sizes[key][1], timing.spread,
                                              timing.spread > UNRELIABLE_SPREAD))
        notes.extend(_timing_notes(report.results))
        choice = art.call_choice
        if choice is not None and choice.trials:
            compiled = choice.settings[0]
            ways = []
            if any(s.threads != compiled.threads for s in choice.settings):
                ways.append(f"its plan caps a call at {compiled.threads} of the {choice.pool} threads (its layers are "
                            "small); its calls were timed on the cap and on the whole pool")
            if any(not s.shared_memory for s in choice.settings):
                ways.append(("each" if ways else "its calls were timed") + " with the intermediates in the plan's "
                            "shared pools and in memory of their own")
            notes.append(f"csqc: {', '.join(ways)}, every quarter second, the fastest kept ({choice.summary()})")
        elif art.threads is not None and art.threads < threads:
            notes.append(f"csqc ran on {art.threads} of the {threads} threads: the artifact's layers are small, so "
                         "its calls stay on the calling thread (its plan's 'threads'; CompiledModel.threads "
                         "overrides it)")
        notes.extend(_saturation_notes(art, xs))
        if probe_limits:
            step("probing the machine's limits", 0, None)
            from .probes import measure_limits

            report.limits = utilization(measure_limits(weight_bytes, threads), timings["csqc"].median_us,
                                        weight_bytes, integer_macs(graph, art.layers))
        if profile:
            step("profiling kernel calls", 0, None)
            report.profile = [dict(vars(s)) for s in runtime.profile_steps(art, *xs)]
        if sweep_planes and len(art.inputs) > 1:
            log.warning("the plane sweep runs single-input models only; skipped")
        elif sweep_planes:
            step("sweeping planes", 0, None)
            report.sweep = _sweep(art, model, shape, dataset)
    return report


def _saturation_notes(art, xs) -> list[str]:
    """How many of the artifact's depthwise convs between two ReLU6 of dynamic scales kept their
    codes at the clips' scales on the bench input (``kernels.bitparallel_depthwise_saturated_codes``):
    its time depends on it, so a user comparing inputs or models sees why."""
    trying = [name for name, info in art.layers.items() if "saturated" in info]
    if not trying:
        return []
    record: dict = {}
    art(*xs, record=record)
    kept = sum(int(record[f"{name}.saturated"].reshape(-1)[0]) for name in trying if f"{name}.saturated" in record)
    return [f"csqc: {kept} of its {len(trying)} depthwise convs between two ReLU6 of dynamic scales kept their codes "
            "at the clips' scales on this input (the others ran their conv and dynamic epilogue): its time "
            "depends on how many of its activations reach 6"]


def bench_remote(model, artifact: str | None, rpc: str | None, *, key: str | None = None, rounds: int = 15,
                 sweep_planes: bool = False, dataset: str | None = None,
                 on_progress: Callable[[str, int, int | None], None] | None = None) -> BenchReport:
    """Time ``artifact`` on a remote device through TVM RPC (``csqc.remote``): the sum of its
    kernels' medians under the remote's ``time_evaluator`` over ``rounds`` repeats. The baselines
    would run on this machine, not the device, so there are none; threads are the remote server's."""
    from . import remote
    from .compiler import to_model

    step = on_progress or (lambda name, done, total: None)
    if rpc is None:
        raise BadInput("--key names a device of an RPC tracker: give the tracker with --rpc HOST:PORT")
    if artifact is None:
        raise BadInput("--rpc times a compiled artifact on a remote device: give it with --artifact (compile it for "
                       "that device, e.g. `csqc compile MODEL --target aarch64` or `--target llvm --mcpu CPU`)")
    model = to_model(model)
    check_artifact_model(model, artifact)
    step("connecting", 0, None)
    with remote.load(artifact, rpc, key=key) as art:
        shape = art.inputs[0]["shape"]
        xs, _ = _inputs(model, art.inputs, dataset)
        step("timing on the remote device", 0, None)
        us = art.time_us(*xs, repeat=rounds)
        notes = [f"timed on {remote.describe_text(art.device)} with its time_evaluator: the sum of each kernel's "
                 "median, without network or host overhead; baselines run only locally (bench without --rpc)"]
        report = BenchReport(_model_name(model), shape[0], 0, cpu=art.device.get("cpu") or "",
                             device="cuda" if art.target == "cuda" else "cpu", notes=notes, remote=art.device)
        report.results.append(BenchResult("csqc", us, _stored_bytes(art), "remote time_evaluator"))
        if sweep_planes and len(art.inputs) == 1:
            step("sweeping planes", 0, None)
            report.sweep = _sweep(art, model, shape, dataset)
    return report


def _model_name(model) -> str:
    return model.manifest.get("metadata", {}).get("recipe") or Path(model.source).stem or "model"


def _stored_bytes(art) -> int:
    """The weight bytes the artifact stores."""
    return sum(int(a.nbytes) for a in art._weights.values())


def _inputs(model, specs: list[dict], dataset: str | None) -> tuple[list[np.ndarray], list]:
    """``(one array per model input, calibration samples)``: seeded random batches as ``verify``
    draws them (uniform [0, 1) floats, valid token ids for integer inputs), or the digits test
    split's first batch (and the next batches for calibration)."""
    from .verify import random_inputs, sample_inputs

    batch = specs[sample_inputs(model).index(True)]["shape"][0]  # (an input of fixed shape may come first)
    xs = random_inputs(model, batch, seed=0)
    calib = [tuple(random_inputs(model, batch, seed=seed)) for seed in range(1, 9)]
    if dataset == "digits":
        from .data import load_digits_split

        shape = specs[0]["shape"]
        data = load_digits_split(image=len(shape) == 4)
        batches = data.x_test[: (len(data.x_test) // shape[0]) * shape[0]].reshape(-1, *shape)
        xs, calib = [batches[0]], list(batches[:8])
    # every runtime reads these same arrays; 64-byte aligned as torch allocates its tensors (a
    # CPU artifact then reads them in place, as ONNX Runtime reads numpy inputs)
    from .runtime import aligned_array

    return [aligned_array(x) for x in xs], calib


def _best_alone(name: str, fn: Callable[[], object], timings: dict[str, Timing], sizes: dict, rounds: int,
                how: str = "timed alone") -> None:
    """Time ``name`` alone and keep the faster median, as every baseline gets below: a runtime
    interleaved with five others ran slower than alone (csqc's 4096 x 4096 w2a4 GEMV 144 against
    126 us, ORT int8 430 against 355 us), and a user deploys one runtime per process."""
    alone = _time_interleaved({name: fn}, rounds)[name]
    if alone.median_us < timings[name].median_us:
        timings[name] = alone
        size, note = sizes[name]
        sizes[name] = (size, (f"{note}; " if note else "") + how)


def _best_of_spinning_ort(runners: dict, xs, timings: dict[str, Timing], sizes: dict, rounds: int) -> None:
    """Give each ORT baseline its best configuration: also time it alone in ORT's default
    spinning pool (no other runtime runs meanwhile, so its spinning hurts no one) and keep
    the faster median. Claims against ORT are then never made against a handicapped ORT."""
    for name, fn in runners.items():
        spinning = fn.spinning()
        _best_alone(name, lambda f=spinning: f(*xs), timings, sizes, rounds, "default spinning pool, timed alone")
        del spinning
        gc.collect()  # ends the spinning pool's threads before the next baseline


def _best_of_spinning_torch(fg: Graph, xs: list, threads: int, timings: dict[str, Timing], sizes: dict,
                            rounds: int, tmp: Path) -> None:
    """Give PyTorch its best configuration too: this process loaded it with a passive OpenMP
    pool (it must not spin while other runtimes are timed), which costs a futex wake per
    parallel region: MobileNetV2 took 63-69 ms passive against 19-28 ms spinning here. The
    wait policy is read once, so the spinning pool runs in a child process, timed alone (the
    same float graph and inputs, written to ``tmp``), and the faster median is kept."""
    import subprocess

    from .ir import save_graph

    save_graph(fg, tmp / "float.csqcir")
    np.savez(tmp / "inputs.npz", *xs)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    # torch first: importing csqc.bench before torch would make the child's pool passive too
    code = "import sys, torch; from csqc.bench import _torch_alone; _torch_alone(*sys.argv[1:])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(tmp), str(threads), str(rounds)], env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        log.warning("PyTorch's spinning-pool run took over 10 minutes; kept the passive pool's time")
        return
    if done.returncode != 0:
        log.warning("PyTorch's spinning-pool run failed; kept the passive pool's time: %s",
                    done.stderr.strip()[-300:])
        return
    *_, passive, median_us, spread = done.stdout.split()
    median_us, spread = float(median_us), float(spread)
    if passive != "spinning":  # a bug: the child would time the same passive pool again
        log.warning("PyTorch's child process waited passively too; kept the passive pool's time")
        return
    if median_us < timings["pytorch-fp32"].median_us:
        timings["pytorch-fp32"] = Timing(median_us, spread)
        size, note = sizes["pytorch-fp32"]
        sizes["pytorch-fp32"] = (size, (f"{note}; " if note else "") + "default spinning pool, timed alone")


def _torch_alone(folder: str, threads: str, rounds: str) -> None:
    """The child of :func:`_best_of_spinning_torch`: time the float graph in ``folder`` on
    PyTorch with ``threads`` threads in its default pool; print the pool's wait policy
    (``spinning`` unless this process was started wrong), the median (us) and the spread."""
    import torch

    from .ir import load_graph

    torch.set_num_threads(int(threads))
    run = torch_runner(load_graph(Path(folder) / "float.csqcir"))
    with np.load(Path(folder) / "inputs.npz") as z:
        xs = [z[f"arr_{i}"] for i in range(len(z.files))]
    timing = _time_interleaved({"pytorch-fp32": lambda: run(*xs)}, int(rounds))["pytorch-fp32"]
    print("passive" if _TORCH_POOL_PASSIVE else "spinning", timing.median_us, timing.spread)


def _timing_notes(results: list[BenchResult]) -> list[str]:
    notes = []
    unreliable = [f"{r.runtime} ({r.spread:.0%})" for r in results if r.unreliable]
    if unreliable:
        notes.append(f"unreliable: {', '.join(unreliable)} varied by more than {UNRELIABLE_SPREAD:.0%} of the median "
                     "between rounds (interquartile range); the machine was busy: rerun before quoting these")
    if any(r.runtime.startswith("pytorch") for r in results) and not _TORCH_POOL_PASSIVE:
        notes.append("PyTorch's OpenMP threads spin while they wait (torch was loaded without OMP_WAIT_POLICY=PASSIVE): "
                     "on busy cores its time swings up to 10x; set it before importing torch")
    return notes


# How integer work is counted (the fraction of the int8 peak compares like with like only for
# bit-parallel layers; a bit-serial plane-MAC does 1-bit x a-bit work, cheaper than an int8 MAC).
INT_MACS_RULE = ("bit-parallel (int8) layers: MACs; bit-serial layers: weight planes x MACs; twice either where "
                 "signed activation codes take two passes; float and table-lookup layers: not counted")
_COUNTED_KERNELS = ("bitparallel", "bitserial")


def integer_macs(graph: Graph, layers: dict[str, dict]) -> int | None:
    """Integer multiply-accumulates of one call by the kernel each quantized layer of ``graph``
    got in the artifact (``layers``: its plan's layer records), per ``INT_MACS_RULE``; None when
    no layer runs an integer kernel. The shapes come from the graph: the layer records of
    bit-serial layers do not all carry them."""
    total, counted = 0, False
    for n in graph.quant_layers():
        info = layers.get(n.name)
        if info is None or info.get("kernel") not in _COUNTED_KERNELS:
            continue
        planes = int(info["planes"]) if info["kernel"] == "bitserial" else 1
        tensors = info.get("tensors") or {}
        # codes split by sign: one product per part (a small bit-parallel layer runs both in one
        # call and writes one accumulator, so only its xq_neg tells)
        passes = 2 if tensors.get("acc_neg") or tensors.get("xq_neg") else 1
        total += n.multiply_adds * planes * passes
        counted = True
    return total if counted else None


def utilization(limits, csqc_us: float, weight_bytes: int, int_macs: int | None) -> dict:
    """csqc's achieved weight bytes/s and integer MACs/s as fractions of the machine's limits
    (``csqc.probes.MachineLimits``): the report's ``limits`` entry. Every weight byte is read
    once per call, so bytes / time is the weight stream's rate."""
    seconds = csqc_us * 1e-6
    weight_rate = weight_bytes / seconds / 1e9
    out = {
        "machine": limits.to_json(),
        "weight_gb_per_s": weight_rate,
        "weight_fraction_of_dram": weight_rate / limits.dram_gb_per_s,
        "weight_fraction_of_cached": weight_rate / limits.weights_gb_per_s,
        "int_macs": int_macs,
        "int_gmac_per_s": None,
        "int_fraction_of_peak": None,
        "int_macs_rule": INT_MACS_RULE,
    }
    if int_macs:
        out["int_gmac_per_s"] = int_macs / seconds / 1e9
        out["int_fraction_of_peak"] = out["int_gmac_per_s"] / limits.int_peak_gmac_per_s
    return out


_ARTIFACT_KIND = {"cpu": "llvm", "cuda": "cuda"}  # --device -> the artifact target it times


def _gpu_arch() -> str:
    """This machine's GPU as an nvcc arch (``sm_90``), or a clear error when it has none."""
    from .runtime import cuda_device

    try:
        dev = cuda_device()
        present = dev.exist
    except Exception:  # a TVM build without CUDA, or no driver
        present = False
    if not present:
        raise BadInput("--device cuda: this machine has no CUDA GPU; compile with `csqc compile MODEL --target cuda` "
                        "here and run `csqc bench MODEL --artifact MODEL.cuda-ARCH.so --device cuda` where a GPU is")
    return "sm_" + dev.compute_version.replace(".", "")


def _baselines(fg: Graph, calib: list, threads: int, tmp: Path, device: str,
               notes: list[str]) -> dict[str, tuple[Callable, int, str]]:
    """name -> (runner, weight bytes (0: the fp32 size), note); unavailable ones are noted."""
    if device == "cpu":
        return {"pytorch-fp32": (torch_runner(fg), 0, ""), **_onnx_baselines(fg, calib, threads, tmp)}
    import onnxruntime as ort
    import torch

    out: dict[str, tuple[Callable, int, str]] = {}
    if torch.cuda.is_available():
        out["pytorch-fp32"] = (torch_runner(fg, "cuda"), 0, "cuDNN/cuBLAS")
        fp16_bytes = sum(int(v.nbytes) // 2 for v in fg.params.values())
        out["pytorch-fp16"] = (torch_runner(fg, "cuda", "float16"), fp16_bytes, "cuDNN/cuBLAS, half precision")
    else:
        notes.append(f"PyTorch baselines skipped: this torch ({torch.__version__}) is built without CUDA")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        out.update(_onnx_baselines(fg, calib, threads, tmp, provider="CUDAExecutionProvider"))
    else:
        notes.append("ONNX Runtime baselines skipped: install onnxruntime-gpu for its CUDA execution provider")
    return out


def _once(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _sweep(art, model, shape, dataset) -> list[dict]:
    """Accuracy (digits) or agreement with the exact output against latency per planes skipped."""
    rows = []
    rng = np.random.default_rng(1)
    if dataset == "digits":
        from .data import load_digits_split

        data = load_digits_split(image=len(shape) == 4)
        n = (len(data.x_test) // shape[0]) * shape[0]
        xs, ys = data.x_test[:n].reshape(-1, *shape), data.y_test[:n].reshape(-1, shape[0])
    else:
        xs, ys = rng.random((8, *shape), dtype=np.float32), None
    exact = [art(x) for x in xs]
    # one row per bit position dropped, until every layer is down to its top position
    levels = max((len(set(info.get("plane_shifts") or range(info["planes"]))) for info in art.layers.values()
                  if info["kernel"] != "float"), default=1)
    for skip in range(0, levels):
        outs = [art(x, skip_planes=skip) for x in xs]
        row = {"skip_planes": skip, "median_us": art.time_us(xs[0], repeat=30, skip_planes=skip)}
        if ys is not None:
            row["accuracy"] = float(np.mean([o.argmax(-1) == y for o, y in zip(outs, ys)]))
        row["top1_agreement"] = float(np.mean([o.argmax(-1) == e.argmax(-1) for o, e in zip(outs, exact)]))
        rows.append(row)
    return rows
