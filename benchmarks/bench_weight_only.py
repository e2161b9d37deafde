"""Weight-only models (float activations, low-bit weights) on the CPU target, side by side.

    python benchmarks/bench_weight_only.py [--only NAME ...] [--repeat N] [--json out.json]

Each case: convert a float model (random init) with ``act_bits=None`` (the CSQ reference's
``--act 0``), compile for llvm, and time csqc against ONNX Runtime fp32 and MatMulNBits 4-bit
(block 32, accuracy level 4; linear models only) with ``csqc.bench.bench`` (same inputs, same
run, 2 threads each). Prints the kernels chosen (``lut``: table lookups, ``dequant``: codes
dequantized in registers, ``float``) and csqc's speed-up over each baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see csqc.bench

import torch  # noqa: E402
from torch import nn  # noqa: E402

import csqc  # noqa: E402
from csqc.bench import bench  # noqa: E402
from csqc.models.vision import resnet20  # noqa: E402


def linear4096():
    return nn.Sequential(nn.Linear(4096, 4096, bias=False))


def linear1024():
    return nn.Sequential(nn.Linear(1024, 1024, bias=False))


# name -> (float model factory, input shape, weight bits)
CASES = {
    "linear4096-w2-batch1": (linear4096, (1, 4096), 2),
    "linear4096-w4-batch1": (linear4096, (1, 4096), 4),
    "linear4096-w2-batch8": (linear4096, (8, 4096), 2),
    "linear4096-w4-batch8": (linear4096, (8, 4096), 4),
    "linear1024-w2-batch1": (linear1024, (1, 1024), 2),
    "linear1024-w4-batch8": (linear1024, (8, 1024), 4),
    "resnet20-w3-act0": (resnet20, (1, 3, 32, 32), 3),
}
BASELINES = ("onnxruntime-fp32", "onnxruntime-matmulnbits-4b")


def run_case(name: str, repeat: int) -> dict:
    factory, shape, bits = CASES[name]
    torch.manual_seed(0)
    model = csqc.finalize(csqc.convert(factory().eval(), n_bits=bits))  # act_bits None: weight-only
    with tempfile.TemporaryDirectory() as d:
        path, art = os.path.join(d, "m.pt"), os.path.join(d, "m.so")
        csqc.save(model, path, torch.rand(shape))
        kernels = csqc.compile(path, "llvm", art).report["kernels"]
        runs = [bench(path, artifact=art, threads=2) for _ in range(repeat)]
    rows = []
    for report in runs:
        us = {r.runtime: r.median_us for r in report.results}
        rows.append({"csqc_us": us["csqc"], **{b: us[b] for b in BASELINES if b in us}})
    return {"batch": shape[0], "bits": bits, "kernels": sorted(set(kernels.values())), "runs": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description="csqc weight-only CPU benchmark")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES))
    parser.add_argument("--repeat", type=int, default=2, help="whole bench runs per case (the machine may be busy)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name in args.only or CASES:
        result = results[name] = run_case(name, args.repeat)
        print(f"== {name}: batch {result['batch']}, {result['bits']}-bit weights, kernels {result['kernels']}")
        for i, row in enumerate(result["runs"]):
            cells = [f"{b} {row[b]:.0f} us (csqc {row[b] / row['csqc_us']:.2f}x)" for b in BASELINES if b in row]
            print(f"  run {i}: csqc {row['csqc_us']:.0f} us | " + " | ".join(cells))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
