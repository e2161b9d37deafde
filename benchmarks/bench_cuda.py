"""Batch-1 linear 4096x4096 on an NVIDIA GPU: csqc CUDA kernels next to cuBLAS and ONNX Runtime.

csqc kernels are built exactly as in a CUDA artifact (device code compiled ahead of time by
nvcc into a fatbin, loaded from an exported library) and timed with TVM's ``time_evaluator``:

* bit-serial, 2-bit weights (offset encoding: 2 planes + zero point) x 4-bit activations,
  with all planes and with ``n_planes=1`` (PrecisionBatching's run-time knob);
* bit-parallel (int8 weights, int32 multiply-adds);
* torch ``F.linear`` in fp16 (cuBLAS) and fp32, timed with CUDA events;
* ONNX Runtime ``MatMulInteger`` (u8 x s8) on the CUDA execution provider, when installed.

    python3 benchmarks/bench_cuda.py [--arch sm_90] [--size 4096]

Exits with a message (status 1) on a machine without a CUDA GPU. The kernels can be built on a
machine without one and timed where one is, with only TVM's runtime installed there:

    python3 benchmarks/bench_cuda.py --save kernels/    # here: nvcc, no GPU needed
    python3 benchmarks/bench_cuda.py --load kernels/    # on the GPU machine
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np


def gpu_or_exit(program: str = "bench_cuda"):
    from csqc.runtime import cuda_device  # (loads TVM's CUDA runtime where TVM runs its runtime alone)

    try:
        present = cuda_device().exist
    except Exception:  # no CUDA runtime in this TVM build / no driver
        present = False
    if not present:
        sys.exit(f"{program}: no CUDA GPU is visible to TVM on this machine (nothing to run); "
                 "run it on a machine with an NVIDIA GPU and driver")


def build_aot(func, arch: str, path: str):
    """Compile a scheduled PrimFunc like an artifact (nvcc fatbin embedded) into the library
    ``path``; loading it needs a GPU, building it does not."""
    import tvm

    from csqc.targets.cuda.target import _AheadOfTime, _device_module, check_toolchain, compile_device_code, cuda_target

    nvcc = check_toolchain(arch)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=cuda_target(arch))
    source = _device_module(ex).inspect_source()
    _AheadOfTime(ex, source, compile_device_code(source, arch, nvcc)).export_library(path)


def time_tvm(lib, args) -> float:
    import tvm

    timer = lib.time_evaluator("main", tvm.cuda(0), number=200, repeat=10)
    return float(np.median(timer(*args).results) * 1e6)


def time_torch(fn, iters: int = 200) -> float:
    import torch

    for _ in range(20):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(10):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return float(np.median(samples))


def time_ort_int8(n: int, k: int, rng):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None, "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "onnxruntime has no CUDAExecutionProvider"
    weight = numpy_helper.from_array(rng.integers(-128, 128, (k, n)).astype(np.int8), "W")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["X", "W"], ["Y"])], "mm",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception as e:  # MatMulInteger may have no CUDA kernel in this build
        return None, f"onnxruntime CUDA session failed ({str(e).splitlines()[0][:120]})"
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return None, "onnxruntime fell back to the CPU"
    x = rng.integers(0, 256, (1, k)).astype(np.uint8)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output("Y", "cuda")
    for _ in range(20):
        sess.run_with_iobinding(binding)
    samples = []
    for _ in range(10):
        t = time.perf_counter()
        for _ in range(200):
            sess.run_with_iobinding(binding)
        samples.append((time.perf_counter() - t) / 200 * 1e6)
    return float(np.median(samples)), "wall clock per call (includes the launch)"


KERNELS = ("bitserial", "bitparallel")  # the csqc kernels timed, by file name under --save / --load


def build_kernels(n: int, k: int, arch: str, folder: str) -> None:
    """The timed csqc kernels, compiled ahead of time for ``arch`` into ``folder`` (nvcc; no GPU
    needed): 2-bit weights in the offset encoding (2 planes) x 4-bit codes, and int8 x u8."""
    from csqc.targets.cuda import kernels

    funcs = {"bitserial": kernels.bitserial_dense(1, n, k, [(1, 1), (0, 1)], 4, True),
             "bitparallel": kernels.bitparallel_dense(1, n, k)}
    for name, func in funcs.items():
        build_aot(func, arch, os.path.join(folder, f"{name}-{n}.so"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--save", metavar="DIR", help="build the kernels into DIR and exit (no GPU needed)")
    parser.add_argument("--load", metavar="DIR", help="time the kernels --save built (same --size)")
    args = parser.parse_args()
    n = k = args.size
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        build_kernels(n, k, args.arch, args.save)
        print(f"built {', '.join(KERNELS)} for {args.arch} (linear {n}x{k}) into {args.save}")
        return
    gpu_or_exit()

    import torch
    import tvm

    from csqc.targets.cuda import packing
    from csqc.targets.llvm import packing as cpu_packing

    folder = args.load or tempfile.mkdtemp()
    if not args.load:
        build_kernels(n, k, args.arch, folder)
    libs = {name: tvm.runtime.load_module(os.path.join(folder, f"{name}-{n}.so")) for name in KERNELS}
    rng = np.random.default_rng(0)
    dev = tvm.cuda(0)
    print(f"device: {torch.cuda.get_device_name(0)}; linear {n}x{k}, batch 1; median microseconds")

    # 2-bit weights, offset encoding: q + 2 = 2*plane0 + plane1, q in [-2, 1]
    zero_point = 2
    q = rng.integers(-2, 2, (n, k))
    planes = np.stack([((q + zero_point) >> 1) & 1, (q + zero_point) & 1]).astype(np.uint8)
    x = rng.integers(0, 16, (1, k)).astype(np.uint8)
    expected = x.astype(np.int64) @ q.T

    bitserial = libs["bitserial"]
    xs = tvm.runtime.tensor(x, dev)
    ws = tvm.runtime.tensor(packing.pack_weight_planes(planes), dev)
    y = tvm.runtime.tensor(np.full((1, n), -1, np.int32), dev)
    bitserial["main"](xs, ws, 2, zero_point, y)
    assert np.array_equal(y.numpy(), expected), "bit-serial result differs from numpy"
    rows = [("csqc bit-serial 2b x 4b", time_tvm(bitserial, [xs, ws, 2, zero_point, y]), ws.numpy().nbytes)]
    rows.append(("csqc bit-serial, n_planes=1", time_tvm(bitserial, [xs, ws, 1, zero_point, y]), ws.numpy().nbytes // 2))

    bitparallel = libs["bitparallel"]
    wp = tvm.runtime.tensor(cpu_packing.pack_bitparallel_weight(q, "int8"), dev)
    y = tvm.runtime.tensor(np.full((1, n), -1, np.int32), dev)
    bitparallel["main"](xs, wp, y)
    assert np.array_equal(y.numpy(), expected), "bit-parallel result differs from numpy"
    rows.append(("csqc bit-parallel int8", time_tvm(bitparallel, [xs, wp, y]), wp.numpy().nbytes))

    for dtype, label in ((torch.float16, "torch fp16 (cuBLAS)"), (torch.float32, "torch fp32 (cuBLAS)")):
        xt = torch.randn(1, k, device="cuda", dtype=dtype)
        wt = torch.randn(n, k, device="cuda", dtype=dtype)
        with torch.inference_mode():
            rows.append((label, time_torch(lambda: torch.nn.functional.linear(xt, wt)), wt.numel() * wt.element_size()))

    ort_us, note = time_ort_int8(n, k, rng)
    fp16 = rows[3][1]
    for name, us, nbytes in rows:
        print(f"{name:32s} {us:9.2f} us   weights {nbytes / 2**20:6.2f} MiB   {fp16 / us:5.2f}x torch fp16")
    print(f"{'onnxruntime int8 CUDA':32s} " + (f"{ort_us:9.2f} us   ({note})" if ort_us is not None else f"   n/a     ({note})"))


if __name__ == "__main__":
    main()
