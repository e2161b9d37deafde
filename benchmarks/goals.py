"""The speed goals of the CPU target, measured side by side in one process.

    python benchmarks/goals.py [--only NAME ...] [--json out.json] [--markdown]
    python benchmarks/goals.py --markdown --from-json out.json   # the README table of a saved run
    python benchmarks/goals.py --calibrate ...   # static calibrated activation scales (csqc compile --calibrate)

For each goal model: convert a float model (random init) with csqc.convert, finalize, save,
compile for the LLVM target and time it against PyTorch fp32, ONNX Runtime fp32 and int8
(static QDQ u8/s8 per channel; dynamic int8 and MatMulNBits for linear models) on the same
inputs with 2 threads each. Prints one table per model and a summary of csqc's speed-ups.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import csqc  # noqa: E402
from csqc.bench import bench  # noqa: E402
from csqc.models.vision import mobilenet_v2, resnet18, resnet20  # noqa: E402


def linear(n, k):
    return nn.Sequential(nn.Linear(k, n, bias=False))


def mlp():
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


# name -> (float model factory, input shape, n_bits, act_bits, quantize the first layer's input)
GOALS = {
    "linear4096-w2a4": (lambda: linear(4096, 4096), (1, 4096), 2, 4, True),
    "linear4096-w4a8": (lambda: linear(4096, 4096), (1, 4096), 4, 8, True),
    "mlp784-4096-4096-10-w2a4": (mlp, (1, 784), 2, 4, True),
    "linear1024-batch64-w2a4": (lambda: linear(1024, 1024), (64, 1024), 2, 4, True),
    "resnet20-w3a4": (resnet20, (1, 3, 32, 32), 3, 4, False),
    "mobilenetv2-w3a4": (mobilenet_v2, (1, 3, 224, 224), 3, 4, False),
    "resnet18-w3a4": (resnet18, (1, 3, 224, 224), 3, 4, False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description="csqc CPU speed goals")
    parser.add_argument("--only", nargs="*", choices=sorted(GOALS))
    parser.add_argument("--json", help="also write all reports here")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    parser.add_argument("--from-json", help="print the table of a saved run instead of measuring")
    parser.add_argument("--calibrate", action="store_true",
                        help="compile with static activation scales calibrated on 32 random inputs (fused requantization)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(markdown_table(json.load(f)))
        return 0
    torch.set_num_threads(2)
    reports = {}
    for name in args.only or GOALS:
        factory, shape, n_bits, act_bits, first = GOALS[name]
        torch.manual_seed(0)
        model = csqc.finalize(csqc.convert(factory().eval(), n_bits=n_bits, act_bits=act_bits, quantize_first_input=first))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"{name}.pt")
            csqc.save(model, path, torch.rand(shape))
            start = time.perf_counter()
            art = os.path.join(d, f"{name}.so")
            calib = torch.rand((32, *shape[1:])).numpy() if args.calibrate else None
            result = csqc.compile(path, "llvm", art, calibrate=calib)
            compile_s = time.perf_counter() - start
            report = bench(path, artifact=art, threads=2)
            summary = csqc.inspect(path)
        ratios = report.ratios()
        ours = next(r.weight_bytes for r in report.results if r.runtime == "csqc")
        ideal = summary.avg_bits / 32 * summary.weight_bytes_fp32  # the goal: artifact weights within 2% of this
        print(f"\n== {name}: batch {shape[0]}, compile {compile_s:.1f}s, kernels {sorted(set(result.report['kernels'].values()))}, "
              f"avg bits {summary.avg_bits:.2f}, weight bytes {ours / ideal:.3f}x of (avg bits / 32) x fp32")
        for r in sorted(report.results, key=lambda r: r.median_us):
            ratio = "" if r.runtime == "csqc" else f"  csqc is {ratios[r.runtime]:.2f}x"
            print(f"  {r.runtime:28s} {r.median_us:12.1f} us  {r.weight_bytes / 2**20:8.2f} MiB{ratio}")
        reports[name] = {**report.to_json(), "compile_seconds": compile_s, "avg_bits": summary.avg_bits,
                         "weight_bytes_vs_ideal": ours / ideal}
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    if args.markdown:
        print(markdown_table(reports))
    return 0


def markdown_table(reports: dict) -> str:
    """One row per goal model: median latencies and csqc's speed-up over each baseline."""
    columns = ["onnxruntime-int8", "onnxruntime-int8-dynamic", "onnxruntime-matmulnbits-4b", "onnxruntime-fp32",
               "pytorch-fp32"]
    short = {"onnxruntime-int8": "ORT int8 QDQ", "onnxruntime-int8-dynamic": "ORT int8 dynamic",
             "onnxruntime-matmulnbits-4b": "ORT MatMulNBits 4b", "onnxruntime-fp32": "ORT fp32",
             "pytorch-fp32": "PyTorch fp32"}
    lines = ["| model (batch) | csqc | " + " | ".join(short[c] for c in columns) + " | compile | weights vs ideal |",
             "|---" * (len(columns) + 4) + "|"]
    for name, r in reports.items():
        us = {x["runtime"]: x["median_us"] for x in r["results"]}
        cells = [f"{us[c]:,.0f} us ({us[c] / us['csqc']:.2f}x)" if c in us else "-" for c in columns]
        lines.append(f"| {name} ({r['batch']}) | {us['csqc']:,.0f} us | " + " | ".join(cells)
                     + f" | {r['compile_seconds']:.1f} s | {r['weight_bytes_vs_ideal']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
