"""Deploy a compiled csqc model: this script needs only numpy and TVM's runtime, not torch.

It proves it: torch, ONNX, ONNX Runtime and csqc's compiler are blocked before csqc.runtime is
imported, so any import of them fails (TVM's ffi imports torch when it is installed, and falls
back without it), and TVM runs its runtime library alone (``TVM_USE_RUNTIME_LIB=1``: its
compiler library is not loaded, as on a machine with TVM's runtime installed and nothing more).

    csqc train digits-cnn -o digits-cnn.pt
    csqc compile digits-cnn.pt --target llvm -o digits-cnn.so
    python examples/deploy.py digits-cnn.so input.npy [--skip-planes 1]

With no input file it classifies random images of the right shape.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Block what a deployment machine does not have: importing any of these now raises ImportError.
BLOCKED = ("torch", "onnx", "onnxruntime", "csqc.compiler", "csqc.capture")
for _name in BLOCKED:
    sys.modules[_name] = None
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # read when tvm is first imported

import numpy as np  # noqa: E402  (after the blocker on purpose)

import csqc.runtime  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("input", nargs="?", help=".npy array with the model's input shape")
    parser.add_argument("--skip-planes", type=int, default=0, help="trade accuracy for speed at run time")
    args = parser.parse_args()

    model = csqc.runtime.load(args.artifact)
    spec = model.inputs[0]
    x = np.load(args.input) if args.input else np.random.default_rng(0).random(spec["shape"], dtype=np.float32)
    start = time.perf_counter()
    y = model(x, skip_planes=args.skip_planes)
    elapsed = (time.perf_counter() - start) * 1e6
    print(f"input {spec['shape']} -> output {list(y.shape)} in {elapsed:.0f} us")
    print("predicted classes:", y.reshape(y.shape[0], -1).argmax(1).tolist())
    loaded = [name for name in BLOCKED if sys.modules.get(name) is not None]
    print(f"ran with {', '.join(BLOCKED)} blocked; loaded anyway: {', '.join(loaded) or 'none'}")
    import tvm

    print(f"TVM's compiler library: {'loaded' if 'tvm_compiler' in tvm.base._LOADED_LIBS else 'not loaded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
