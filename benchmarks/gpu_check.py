"""The CUDA target on a real GPU: prepared on a machine without one, run on a machine with one.

    python benchmarks/gpu_check.py prepare BUNDLE   # here: models, cuda artifacts, references
    python benchmarks/gpu_check.py run BUNDLE       # on the GPU machine (prints a summary, exit 1 on a failure)

``prepare`` (nvcc, no GPU needed) trains the digits MLP and CNN, builds ResNet-20, ResNet-18,
MobileNetV2, the batch-1 linear 4096 w2a4 layer and the char-LM LSTM step (symmetric and
zero-point codes) as in ``goals.py``, saves each as a csqc model file, compiles each for the
``cuda`` target (``--arch``, default sm_90; several also with calibrated static scales), runs
the golden interpreter on fixed random inputs (``*.ref.npz``), and builds ``bench_cuda.py``'s
kernels. ``run`` then checks and times every artifact on the GPU:

1. each artifact's outputs against the interpreter's (numpy and TVM's runtime only);
2. ``bench_cuda.py --load``: the bit-serial GEMV against cuBLAS fp16 (issue 6's 8x goal);
3. ``csqc verify MODEL --artifact A`` (PyTorch, the interpreter, ONNX Runtime and the GPU);
4. ``csqc bench MODEL --artifact A --device cuda`` (PyTorch fp32 / fp16 on the GPU).

The GPU machine needs Python, numpy, torch, onnx and onnxruntime, and TVM 0.27's runtime: the
full ``apache-tvm`` wheel works, and so do its Python package and runtime libraries alone
(``libtvm_runtime*.so``, with ``TVM_USE_RUNTIME_LIB=1``): artifacts need no compiler to load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# goal models: (goals.py case, compile a calibrated artifact too)
GOAL_MODELS = [("resnet20-w3a4", True), ("mobilenetv2-w3a4", True), ("resnet18-w3a4", False),
               ("linear4096-w2a4", False), ("charlm-lstm-step", True), ("charlm-lstm-step-asym", False)]
BENCHED = ["linear4096-w2a4", "resnet20-w3a4", "mobilenetv2-w3a4", "resnet18-w3a4", "charlm-lstm-step"]


def _calibration(example) -> list:
    """32 random calibration samples per model input, the same on every run."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.rand((32, *x.shape[1:]), generator=g).numpy() for x in example]


def prepare(bundle: str, arch: str, only: list[str] | None = None, kernel_size: int = 4096) -> None:
    """Write the bundle: every model (or those named in ``only``), and ``bench_cuda.py``'s
    kernels for a ``kernel_size`` square linear layer."""
    import torch

    import csqc
    from csqc.compiler import optimize, to_model
    from csqc.interpreter import run as interpret

    sys.path.insert(0, HERE)
    import goals

    os.makedirs(bundle, exist_ok=True)
    cases = []  # (artifact base name, model file base name, calibration: None, "digits" or arrays)
    unknown = set(only or ()) - {"digits-mlp", "digits-cnn", *(name for name, _ in GOAL_MODELS)}
    if unknown:
        raise SystemExit(f"gpu_check: no model {', '.join(sorted(unknown))}")
    for recipe in ("digits-mlp", "digits-cnn"):
        if only and recipe not in only:
            continue
        subprocess.run([sys.executable, "-m", "csqc", "train", recipe, "-o", f"{bundle}/{recipe}.pt"], check=True,
                       stdout=subprocess.DEVNULL)
        cases.append((recipe, recipe, None))
        if recipe == "digits-cnn":
            cases.append(("digits-cnn-cal", "digits-cnn", "digits"))
    for name, calibrated in GOAL_MODELS:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model, example = goals.CASES[name].build()
        csqc.save(model, f"{bundle}/{name}.pt", example if len(example) > 1 else example[0])
        cases.append((name, name, None))
        if calibrated:
            cases.append((f"{name}-cal", name, _calibration(example)))
    for base, name, calibrate in cases:
        start = time.perf_counter()
        csqc.compile(f"{bundle}/{name}.pt", "cuda", f"{bundle}/{base}.cuda.so", calibrate=calibrate, arch=arch)
        model = to_model(f"{bundle}/{name}.pt")
        shapes = [tuple(s["shape"]) for s in model.input_specs]
        rng = np.random.default_rng(7)
        xs = [rng.random(s, dtype=np.float32) for s in shapes]
        ys = interpret(optimize(model, "default", batch=shapes[0][0], calibrate=calibrate), xs)
        ys = ys if isinstance(ys, (list, tuple)) else [ys]
        np.savez(f"{bundle}/{base}.ref.npz", **{f"x{i}": x for i, x in enumerate(xs)},
                 **{f"y{i}": np.asarray(y) for i, y in enumerate(ys)})
        print(f"{base}: {time.perf_counter() - start:.0f} s", flush=True)
    subprocess.run([sys.executable, f"{HERE}/bench_cuda.py", "--save", f"{bundle}/kernels", "--arch", arch,
                    "--size", str(kernel_size)], check=True)
    with open(f"{bundle}/cases.json", "w") as f:
        json.dump({"arch": arch, "kernel_size": kernel_size, "cases": [[base, name] for base, name, _ in cases]}, f)


def _check_outputs(bundle: str, base: str) -> bool:
    """Run one artifact on its reference inputs. Failing: an error, or outputs off by more than
    float rounding (float layers sum in another order on the GPU, and a code that flips at a
    rounding tie moves its layer's outputs: exactness is ``csqc verify``'s to judge)."""
    from csqc import runtime

    ref = np.load(f"{bundle}/{base}.ref.npz")
    xs = [ref[f"x{i}"] for i in range(sum(k.startswith("x") for k in ref.files))]
    ys = [ref[f"y{i}"] for i in range(sum(k.startswith("y") for k in ref.files))]
    try:
        art = runtime.load(f"{bundle}/{base}.cuda.so")
        outs = art(*xs)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        if [o.shape for o in outs] != [y.shape for y in ys]:
            raise ValueError(f"output shapes {[o.shape for o in outs]}, expected {[y.shape for y in ys]}")
        same = all(np.array_equal(o, y) for o, y in zip(outs, ys))
        rel = max(float(np.max(np.abs(o.astype(np.float64) - y), initial=0.0) / max(float(np.max(np.abs(y), initial=0.0)),
                                                                                  1e-30)) for o, y in zip(outs, ys))
        print(f"  {base:28s} bit-identical={same} max relative diff={rel:.3g} "
              f"call={art.time_us(*xs, repeat=50):.1f} us", flush=True)
        return rel <= 1e-3
    except Exception as e:  # report every artifact, whatever one of them does
        print(f"  {base:28s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


def _csqc_json(args: list[str], timeout: int) -> tuple[int, dict, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "csqc", *args, "--json"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, {}, f"timed out after {timeout} s"
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    return proc.returncode, report, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def run(bundle: str, report_path: str | None) -> int:
    sys.path.insert(0, HERE)
    from bench_cuda import gpu_or_exit

    gpu_or_exit("gpu_check")
    with open(f"{bundle}/cases.json") as f:
        manifest = json.load(f)
    cases = manifest["cases"]
    failed = []
    print("1. outputs against the golden interpreter's", flush=True)
    failed += [base for base, _ in cases if not _check_outputs(bundle, base)]
    print("2. kernels: batch-1 linear, 2-bit weights x 4-bit codes, against cuBLAS", flush=True)
    if subprocess.run([sys.executable, f"{HERE}/bench_cuda.py", "--load", f"{bundle}/kernels", "--size",
                       str(manifest["kernel_size"])]).returncode:
        failed.append("bench_cuda")
    print("3. csqc verify --artifact", flush=True)
    reports = {}
    for base, name in cases:
        samples = "2" if name.startswith(("resnet18", "mobilenet")) else "8"  # (224 x 224: the interpreter is slow)
        data = ["--dataset", "digits"] if name.startswith("digits") else ["--samples", samples]
        rc, report, err = _csqc_json(["verify", f"{bundle}/{name}.pt", "--artifact", f"{bundle}/{base}.cuda.so", *data], 150)
        reports[f"verify:{base}"] = report
        accuracy = {k: round(v, 4) for k, v in (report.get("accuracy") or {}).items()}
        print(f"  {base:28s} rc={rc} ok={report.get('ok')} exact={report.get('accumulators_exact')} "
              f"{accuracy or ''} {err if rc else ''}", flush=True)
        if rc:
            failed.append(f"verify:{base}")
    print("4. csqc bench --device cuda", flush=True)
    for name in (name for name in BENCHED if name in {n for _, n in cases}):
        rc, report, err = _csqc_json(["bench", f"{bundle}/{name}.pt", "--artifact", f"{bundle}/{name}.cuda.so",
                                      "--device", "cuda"], 150)
        reports[f"bench:{name}"] = report
        times = " ".join(f"{r['runtime']}={r['median_us']:.1f}us" for r in report.get("results", []))
        print(f"  {name:28s} rc={rc} {times} {err if rc else ''}", flush=True)
        for note in report.get("notes", []):
            print(f"      {note}", flush=True)
        if rc:
            failed.append(f"bench:{name}")
    if report_path:
        with open(report_path, "w") as f:
            json.dump(reports, f)
    print("failed: " + (", ".join(failed) if failed else "nothing"))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("bundle", help="the folder prepare writes and run reads")
    parser.add_argument("--arch", default="sm_90", help="prepare: the GPU's nvcc arch")
    parser.add_argument("--only", nargs="+", metavar="MODEL", help="prepare: these models only")
    parser.add_argument("--kernel-size", type=int, default=4096, help="prepare: bench_cuda.py's linear layer size")
    parser.add_argument("--json", help="run: write every verify and bench report here")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.bundle, args.arch, args.only, args.kernel_size)
        return 0
    return run(args.bundle, args.json)


if __name__ == "__main__":
    sys.exit(main())
