"""The speed goals of the CPU target (issue 16), measured side by side in one process.

    python benchmarks/goals.py [--only NAME ...] [--json out.json] [--markdown]
    python benchmarks/goals.py --markdown --from-json out.json   # the README table of a saved run
    python benchmarks/goals.py --calibrate ...   # static calibrated activation scales (csqc compile --calibrate)

For each goal model: convert a float model (random init) with csqc.convert, finalize, save,
compile for the LLVM target and time it against PyTorch fp32, ONNX Runtime fp32 and int8
(static QDQ u8/s8 per channel; dynamic int8 and MatMulNBits for linear models) on the same
inputs with 2 threads each. Prints one table per model, csqc's fractions of the machine's
limits, and each goal (a baseline and the speed-up csqc must reach over it) as met or not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see csqc.bench

import torch  # noqa: E402
from torch import nn  # noqa: E402

import csqc  # noqa: E402
from csqc.bench import bench  # noqa: E402
from csqc.models.char_lm import VOCAB, CharLM, CharLMStep  # noqa: E402
from csqc.models import reference  # noqa: E402
from csqc.models.generative import dcgan_generator, hifigan_generator  # noqa: E402
from csqc.models.vision import mobilenet_v2, resnet18, resnet20, unet  # noqa: E402


def linear(n, k):
    return nn.Sequential(nn.Linear(k, n, bias=False))


def mlp():
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


@dataclass(frozen=True)
class Goal:
    """csqc must be at least ``ratio`` times as fast as ``baseline`` (a bench runtime name)."""

    baseline: str
    ratio: float

    def met(self, speedups: dict[str, float]) -> bool | None:
        """None when the baseline did not run."""
        return None if self.baseline not in speedups else speedups[self.baseline] >= self.ratio


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]  # (finalized CSQ model, example inputs)
    goals: tuple[Goal, ...]


def converted(factory, shape, n_bits: int, act_bits: int | None, quantize_first_input: bool,
              act_symmetric: bool = True):
    """A case builder: ``factory()`` converted with CSQ (``act_bits`` None: weight-only; ``act_symmetric``
    False: unsigned codes with a zero point) and finalized."""
    def build():
        model = factory().eval()
        model = csqc.convert(model, n_bits=n_bits, act_bits=act_bits, quantize_first_input=quantize_first_input,
                             act_symmetric=act_symmetric)
        return csqc.finalize(model), (torch.rand(shape),)
    return build


def with_batch_statistics(factory, shape, batches: int = 8, batch: int = 8):
    """``factory`` whose BatchNorm running statistics come from train-mode passes over random
    images of ``shape`` (no data, no training): every layer's activations then have the spread a
    trained network's have, where a random network's shrink layer by layer (the goal cases'
    MobileNetV2 ends with dynamic scales ~1e-5, none of its ReLU6 outputs reaching 6; with these
    statistics 32 of its 52 scales are 6, the ReLU6 bound). Timing is the same either way (Zen 4,
    dynamic scales, alternating: 2,094-2,350 against 2,110-2,338 us); the dynamic scales' values
    are what differ."""
    def build():
        model = factory()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # the plain average of the passes below
        model.train()
        with torch.no_grad():
            for _ in range(batches):
                model(torch.rand(batch, *shape[1:]))
        return model.eval()
    return build


def reference_model(factory, shape):
    """A case builder: a CSQ reference architecture (``csqc.models.reference``: CSQ layers and
    activation quantizers as the reference code places them, random bits), with BatchNorm
    statistics from random images (:func:`with_batch_statistics`), finalized."""
    def build():
        return csqc.finalize(with_batch_statistics(factory, shape)()), (torch.rand(shape),)
    return build


def charlm_step(hidden: int = 256, batch: int = 1, act_symmetric: bool = True):
    """The one-step model of examples/char_lm.py, converted as the example does (4-bit weights,
    8-bit activations), random init: ``(x_t, h, c) -> (logits, h', c')``."""
    lm = csqc.convert(CharLM(hidden).eval(), n_bits=4, act_bits=8, quantize_first_input=True,
                      act_symmetric=act_symmetric)
    step = CharLMStep(csqc.finalize(lm)).eval()
    return step, (torch.rand(batch, VOCAB), torch.rand(batch, hidden), torch.rand(batch, hidden))


INT8, DYNAMIC, NBITS, FP32 = "onnxruntime-int8", "onnxruntime-int8-dynamic", "onnxruntime-matmulnbits-4b", "onnxruntime-fp32"
CNN_GOALS = (Goal(INT8, 1.0), Goal(FP32, 2.0))

# name -> case; the goals are issue 16's
GOALS = {
    "linear4096-w2a4": Case(converted(lambda: linear(4096, 4096), (1, 4096), 2, 4, True), (Goal(INT8, 2.5),)),
    "linear4096-w4a8": Case(converted(lambda: linear(4096, 4096), (1, 4096), 4, 8, True), (Goal(INT8, 1.3),)),
    "linear4096-w4a8-asym": Case(converted(lambda: linear(4096, 4096), (1, 4096), 4, 8, True, act_symmetric=False),
                                 (Goal(INT8, 1.3),)),
    "mlp784-4096-4096-10-w2a4": Case(converted(mlp, (1, 784), 2, 4, True), (Goal(INT8, 2.5),)),
    "linear4096-w2-float": Case(converted(lambda: linear(4096, 4096), (1, 4096), 2, None, False), (Goal(NBITS, 1.5),)),
    "linear4096-batch8-w2a4": Case(converted(lambda: linear(4096, 4096), (8, 4096), 2, 4, True), (Goal(INT8, 1.0),)),
    "linear1024-batch64-w2a4": Case(converted(lambda: linear(1024, 1024), (64, 1024), 2, 4, True), (Goal(INT8, 1.0),)),
    "resnet20-w3a4": Case(converted(resnet20, (1, 3, 32, 32), 3, 4, False), CNN_GOALS),
    "mobilenetv2-w3a4": Case(converted(mobilenet_v2, (1, 3, 224, 224), 3, 4, False), CNN_GOALS),
    "resnet18-w3a4": Case(converted(resnet18, (1, 3, 224, 224), 3, 4, False), CNN_GOALS),
    "charlm-lstm-step": Case(charlm_step, (Goal(DYNAMIC, 1.0), Goal(FP32, 1.5))),
    "charlm-lstm-step-asym": Case(lambda: charlm_step(act_symmetric=False), (Goal(DYNAMIC, 1.0), Goal(FP32, 1.5))),
}
# models beyond the goal table, measured the same way (``--only``; no goal): generators and a
# U-Net, whose transposed convolutions compile as their phases' convolutions; MobileNetV2 with
# the activation statistics of a trained network (its ReLU6 outputs saturate: see
# with_batch_statistics); the CSQ reference's CIFAR VGG-19-BN and ResNet-20 with 4-bit
# activations (ReLU6, quantizers where the reference puts them: after each block, before the pools),
# and its default, float activations (``act_bit=0``: weight-only, as its README's commands train
# and as its ImageNet ResNet-50 always is), against ORT fp32, the same arithmetic
MORE = {
    "mobilenetv2-bnstats-w3a4": Case(converted(with_batch_statistics(mobilenet_v2, (1, 3, 224, 224)),
                                               (1, 3, 224, 224), 3, 4, False), ()),
    "dcgan-w4a4": Case(converted(dcgan_generator, (1, 100, 1, 1), 4, 4, False), ()),
    "hifigan-w4a8": Case(converted(hifigan_generator, (1, 80, 32), 4, 8, False), ()),
    "unet128-w4a4": Case(converted(unet, (1, 3, 128, 128), 4, 4, False), ()),
    "vgg19bn-reference-w4a4": Case(reference_model(lambda: reference.vgg19bn(Nbits=4, act_bit=4), (1, 3, 32, 32)), ()),
    "resnet20-reference-w4a4": Case(reference_model(lambda: reference.resnet20(Nbits=4, act_bit=4), (1, 3, 32, 32)),
                                    ()),
    "vgg19bn-reference-w4": Case(reference_model(lambda: reference.vgg19bn(Nbits=4), (1, 3, 32, 32)), ()),
    "resnet20-reference-w4": Case(reference_model(lambda: reference.resnet20(Nbits=4), (1, 3, 32, 32)), ()),
    "resnet50-reference-w4": Case(reference_model(lambda: reference.resnet50(Nbits=4), (1, 3, 224, 224)), ()),
}
CASES = {**GOALS, **MORE}


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), or what the platform module says elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description="csqc CPU speed goals")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="these cases (default: every goal model)")
    parser.add_argument("--json", help="also write all reports here")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    parser.add_argument("--from-json", help="print the table of a saved run instead of measuring")
    parser.add_argument("--calibrate", action="store_true",
                        help="compile with static activation scales calibrated on 32 random inputs (fused requantization)")
    parser.add_argument("--tune", action="store_true",
                        help="compile with csqc compile --tune (schedules searched here, cached on disk)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(markdown_table(json.load(f)))
        return 0
    torch.set_num_threads(2)
    reports = {name: run_case(name, args.calibrate, args.tune) for name in args.only or GOALS}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    if args.markdown:
        print(markdown_table(reports))
    return 0


def run_case(name: str, calibrate: bool, tune: bool = False) -> dict:
    """Build, compile and bench one case; print its table; return its JSON report."""
    torch.manual_seed(0)
    model, example = CASES[name].build()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.pt")
        csqc.save(model, path, example if len(example) > 1 else example[0])
        start = time.perf_counter()
        art = os.path.join(d, f"{name}.so")
        calib = [torch.rand((32, *x.shape[1:])).numpy() for x in example] if calibrate else None
        result = csqc.compile(path, "llvm", art, calibrate=calib, tune=tune)
        compile_s = time.perf_counter() - start
        report = bench(path, artifact=art, threads=2)
        summary = csqc.inspect(path)
    ratios = report.ratios()
    ours = next(r.weight_bytes for r in report.results if r.runtime == "csqc")
    ideal = summary.avg_bits / 32 * summary.weight_bytes_fp32  # the goal: artifact weights within 2% of this
    print(f"\n== {name}: batch {report.batch}, compile {compile_s:.1f}s, kernels {sorted(set(result.report['kernels'].values()))}, "
          f"avg bits {summary.avg_bits:.2f}, weight bytes {ours / ideal:.3f}x of (avg bits / 32) x fp32")
    for r in sorted(report.results, key=lambda r: r.median_us):
        ratio = "" if r.runtime == "csqc" else f"  csqc is {ratios[r.runtime]:.2f}x"
        flag = "  UNRELIABLE" if r.unreliable else ""
        print(f"  {r.runtime:28s} {r.median_us:12.1f} us  spread {r.spread:4.0%}  {r.weight_bytes / 2**20:8.2f} MiB{ratio}{flag}")
    if report.limits:
        print(f"  limits: {limits_cell(report.limits)}")
    goals = [{"baseline": g.baseline, "ratio": g.ratio, "measured": ratios.get(g.baseline), "met": g.met(ratios)}
             for g in CASES[name].goals]
    for g in goals:
        measured = "not run" if g["measured"] is None else f"{g['measured']:.2f}x"
        print(f"  goal >= {g['ratio']}x {g['baseline']}: {measured}, {_met_word(g['met'])}")
    sys.stdout.flush()
    return {**report.to_json(), "compile_seconds": compile_s, "avg_bits": summary.avg_bits,
            "weight_bytes_vs_ideal": ours / ideal, "goals": goals, "calibrated": calibrate, "tuned": tune,
            "date": datetime.date.today().isoformat(), "cpu_model": cpu_model()}


SHORT = {"onnxruntime-int8": "ORT int8 QDQ", "onnxruntime-int8-dynamic": "ORT int8 dynamic",
         "onnxruntime-matmulnbits-4b": "ORT MatMulNBits 4b", "onnxruntime-fp32": "ORT fp32",
         "pytorch-fp32": "PyTorch fp32"}


def _met_word(met: bool | None) -> str:
    return "baseline not run" if met is None else "met" if met else "not met"


def limits_cell(limits: dict) -> str:
    """csqc's fractions of the machine's limits (csqc.bench.utilization) in a few words."""
    text = (f"weights {limits['weight_gb_per_s']:.1f} GB/s = {limits['weight_fraction_of_dram']:.2f} of DRAM read, "
            f"{limits['weight_fraction_of_cached']:.2f} of in-cache read")
    if limits.get("int_fraction_of_peak") is not None:
        text += f"; {limits['int_fraction_of_peak']:.3f} of the int8 peak"
    fork_join = limits.get("machine", {}).get("fork_join_us")
    if fork_join:  # the machine's state: a slow launch slows every two-thread runtime
        text += f"; launch {fork_join:.1f} us"
    return text


def _goals_of(name: str, report: dict) -> list[dict]:
    """The report's goals (runs before goals were saved: evaluated against today's GOALS)."""
    if "goals" in report:
        return report["goals"]
    speedups = report.get("speedup_vs", {})
    case = CASES.get(name)
    return [] if case is None else [{"baseline": g.baseline, "ratio": g.ratio, "measured": speedups.get(g.baseline),
                                     "met": g.met(speedups)} for g in case.goals]


def markdown_table(reports: dict) -> str:
    """A header line (date, CPU, threads), then one row per goal model: median latencies,
    csqc's speed-up over each baseline, each goal with the measured ratio and met/not met."""
    first = next(iter(reports.values()), {})
    calibrated = ", static calibrated scales" if first.get("calibrated") else ""
    header = (f"Measured {first.get('date', 'on an unrecorded date')} on {first.get('cpu_model') or first.get('cpu') or 'an unrecorded CPU'}, "
              f"{first.get('threads', 2)} threads per runtime, one run of `benchmarks/goals.py`{calibrated}; "
              "cells: median (csqc's speed-up over it); † the runtime's time varied > 25% between rounds.")
    columns = list(SHORT)
    lines = [header, "",
             "| model (batch) | csqc | " + " | ".join(SHORT[c] for c in columns)
             + " | goal | measured | met | of machine limits | compile | weights vs ideal |",
             "|---" * (len(columns) + 8) + "|"]
    for name, r in reports.items():
        us = {x["runtime"]: x["median_us"] for x in r["results"]}
        shaky = {x["runtime"] for x in r["results"] if x.get("unreliable")}

        def cell(c):
            mark = "†" if c in shaky else ""
            return f"{us[c]:,.0f} us{mark} ({us[c] / us['csqc']:.2f}x)" if c in us else "-"

        goals = _goals_of(name, r)
        goal = "; ".join(f">= {g['ratio']}x {SHORT.get(g['baseline'], g['baseline'])}" for g in goals) or "-"
        measured = "; ".join("-" if g["measured"] is None else f"{g['measured']:.2f}x" for g in goals) or "-"
        met = "; ".join(_met_word(g["met"]) for g in goals) or "-"
        limits = limits_cell(r["limits"]) if r.get("limits") else "-"
        mark = "†" if "csqc" in shaky else ""
        lines.append(f"| {name} ({r['batch']}) | {us['csqc']:,.0f} us{mark} | " + " | ".join(cell(c) for c in columns)
                     + f" | {goal} | {measured} | {met} | {limits} | {r['compile_seconds']:.1f} s"
                     + f" | {r['weight_bytes_vs_ideal']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
