"""Benchmark of the csqc LLVM dense and conv kernels next to ONNX Runtime, in one process.

Prints median microseconds (TVM ``time_evaluator`` for csqc kernels, wall clock per call for
ONNX Runtime) for bit-serial (weight planes, activation bits) = (2, 4) and (4, 8), the int8
bit-parallel kernel, ONNX Runtime MatMulInteger (u8 x s8) and fp32 MatMul, plus weight bytes.
All runtimes use 2 threads; rounds are interleaved with idle gaps so spinning thread pools do
not distort each other.  Bit-serial weights use the offset encoding (one plane per bit, with a
zero point).

The conv section times ``bitparallel_conv2d`` (int8 VNNI; depthwise: direct int32) and
``bitserial_conv2d`` (3 offset-encoded weight planes, 4-bit activations) on the main conv
shapes of ResNet-20 (CIFAR), ResNet-18 and MobileNetV2 (batch 1) next to ONNX Runtime
``ConvInteger`` (u8 x s8 -> int32, the same contract), ``QLinearConv`` (u8 x s8 -> u8, what an
ORT QDQ int8 model runs) and torch fp32 ``conv2d``.

    python3 benchmarks/bench_kernels.py [--rounds 3] [--section dense|conv|all] [--tune]
"""
import os

os.environ["TVM_NUM_THREADS"] = "2"  # must precede the first TVM call

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from csqc.targets.llvm import kernels, packing, tuning
from csqc.targets.llvm.backend import has_table_lookup
from csqc.targets.tvm.geometry import conv_geometry

THREADS = 2
SHAPES = [(1, 4096, 4096), (1, 1024, 1024), (64, 1024, 1024)]
PRECISIONS = [(2, 4), (4, 8)]  # (weight planes, activation bits)


def ort_session(m: int, n: int, k: int, int8: bool, rng):
    """A one-node ONNX graph (opset 21, IR 10) with the weight as an initializer."""
    if int8:
        weight = numpy_helper.from_array(rng.integers(-128, 128, (k, n)).astype(np.int8), "W")
        node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
        x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    else:
        weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        x_type = y_type = TensorProto.FLOAT
        x = rng.standard_normal((m, k)).astype(np.float32)
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("X", x_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, {"X": x}


def time_ort(session, feeds, calls: int = 200) -> float:
    for _ in range(20):
        session.run(None, feeds)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def bitserial_case(m: int, n: int, k: int, weight_bits: int, act_bits: int, rng):
    """Compiled kernel and arguments for offset-encoded random weights (checked once)."""
    zero_point = 1 << (weight_bits - 1)
    shifts_signs = [(bit, 1) for bit in reversed(range(weight_bits))]
    planes = rng.integers(0, 2, (weight_bits, n, k)).astype(np.uint8)
    x = rng.integers(0, 1 << act_bits, (m, k)).astype(np.uint8)
    # the compiler's choice for this CPU: vpermb table lookups where AVX-512 VBMI exists
    knobs = kernels.BitserialKnobs(table_lookup=has_table_lookup(kernels.cpu_target()))
    kernel = kernels.build(kernels.bitserial_dense(m, n, k, shifts_signs, act_bits, True, knobs=knobs))
    packed = packing.pack_weight_planes(planes, lanes=knobs.lanes)
    args = (x, packed, weight_bits, zero_point)
    q = packing.combine_planes(planes, shifts_signs, zero_point)
    assert np.array_equal(kernel(*args), x.astype(np.int64) @ q.T), "bit-serial result is not exact"
    return kernel, args, packed.nbytes


def bitparallel_case(m: int, n: int, k: int, rng):
    q = rng.integers(-128, 128, (n, k))
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    kernel = kernels.build(kernels.bitparallel_dense(m, n, k, "int8"))
    packed = packing.pack_bitparallel_weight(q)
    assert np.array_equal(kernel(x, packed), x.astype(np.int64) @ q.T), "bit-parallel result is not exact"
    return kernel, (x, packed), packed.nbytes


# (name, input NCHW, weight OIHW, stride, padding, groups)
CONV_SHAPES = [
    ("r20 16>16 3x3 32", (1, 16, 32, 32), (16, 16, 3, 3), 1, 1, 1),
    ("r20 16>32 3x3 s2", (1, 16, 32, 32), (32, 16, 3, 3), 2, 1, 1),
    ("r20 32>32 3x3 16", (1, 32, 16, 16), (32, 32, 3, 3), 1, 1, 1),
    ("r20 32>64 3x3 s2", (1, 32, 16, 16), (64, 32, 3, 3), 2, 1, 1),
    ("r20 64>64 3x3 8", (1, 64, 8, 8), (64, 64, 3, 3), 1, 1, 1),
    ("r20 16>32 1x1 s2", (1, 16, 32, 32), (32, 16, 1, 1), 2, 0, 1),
    ("r18 64>64 3x3 56", (1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    ("r18 64>128 3x3 s2", (1, 64, 56, 56), (128, 64, 3, 3), 2, 1, 1),
    ("r18 64>128 1x1 s2", (1, 64, 56, 56), (128, 64, 1, 1), 2, 0, 1),
    ("r18 128>128 3x3 28", (1, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1),
    ("r18 256>256 3x3 14", (1, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    ("r18 512>512 3x3 7", (1, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
    ("mb dw32 3x3 112", (1, 32, 112, 112), (32, 1, 3, 3), 1, 1, 32),
    ("mb dw96 3x3 s2", (1, 96, 112, 112), (96, 1, 3, 3), 2, 1, 96),
    ("mb dw144 3x3 56", (1, 144, 56, 56), (144, 1, 3, 3), 1, 1, 144),
    ("mb dw576 3x3 14", (1, 576, 14, 14), (576, 1, 3, 3), 1, 1, 576),
    ("mb 16>96 1x1 112", (1, 16, 112, 112), (96, 16, 1, 1), 1, 0, 1),
    ("mb 144>24 1x1 56", (1, 144, 56, 56), (24, 144, 1, 1), 1, 0, 1),
    ("mb 384>64 1x1 14", (1, 384, 14, 14), (64, 384, 1, 1), 1, 0, 1),
    ("mb 960>160 1x1 7", (1, 960, 7, 7), (160, 960, 1, 1), 1, 0, 1),
]
CONV_WEIGHT_BITS, CONV_ACT_BITS = 3, 4


def conv_reference(x, q, stride, padding, groups):
    """int64 numpy reference (im2col per group) used to check every csqc conv once."""
    b, c, h, w = x.shape
    o, cg, kh, kw = q.shape
    padded = np.zeros((b, c, h + 2 * padding, w + 2 * padding), np.int64)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    cols = np.stack([padded[:, :, r:r + stride * (oh - 1) + 1:stride, s:s + stride * (ow - 1) + 1:stride]
                     for r in range(kh) for s in range(kw)], axis=2)  # [B, C, taps, OH, OW]
    cols = cols.reshape(b, groups, cg * kh * kw, oh * ow)
    weights = q.reshape(groups, o // groups, cg * kh * kw).astype(np.int64)
    return np.einsum("gok,bgkp->bgop", weights, cols).reshape(b, o, oh, ow)


def ort_conv_session(x_shape, q, stride, padding, groups, qlinear: bool):
    """One ConvInteger (u8 x s8 -> int32) or QLinearConv (u8 x s8 -> u8) node."""
    attrs = dict(strides=[stride, stride], pads=[padding] * 4, group=groups)
    weight = numpy_helper.from_array(q.astype(np.int8), "W")
    if qlinear:
        scalars = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in
                   [("xs", 0.05, np.float32), ("xz", 0, np.uint8), ("ws", 0.02, np.float32),
                    ("wz", 0, np.int8), ("ys", 0.1, np.float32), ("yz", 128, np.uint8)]]
        node = helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz"], ["Y"], **attrs)
        initializers, y_type = [weight] + scalars, TensorProto.UINT8
    else:
        node = helper.make_node("ConvInteger", ["X", "W"], ["Y"], **attrs)
        initializers, y_type = [weight], TensorProto.INT32
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("X", TensorProto.UINT8, list(x_shape))],
                              [helper.make_tensor_value_info("Y", y_type, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_torch(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def conv_section(rounds: int, tune: bool, rng):
    import torch

    torch.set_num_threads(THREADS)
    zero_point = 1 << (CONV_WEIGHT_BITS - 1)
    shifts_signs = [(bit, 1) for bit in reversed(range(CONV_WEIGHT_BITS))]
    rows = []
    # the same search as `csqc compile --tune`, kept in memory (this run's knobs, not the disk cache's)
    tuner = tuning.Tuner(kernels.cpu_target(), tuning.TuningCache(Path("(in memory)"), "")) if tune else None
    for name, x_shape, w_shape, stride, padding, groups in CONV_SHAPES:
        x = rng.integers(0, 1 << CONV_ACT_BITS, x_shape).astype(np.uint8)
        planes = rng.integers(0, 2, (CONV_WEIGHT_BITS,) + w_shape).astype(np.uint8)
        q = packing.combine_planes(planes, shifts_signs, zero_point)
        expected = conv_reference(x, q, stride, padding, groups)
        geometry = conv_geometry(x_shape, w_shape, stride, padding, 1, groups)
        knobs = tuner.conv_knobs(geometry) if tune and not geometry.is_depthwise else None
        bitparallel = kernels.build(kernels.bitparallel_conv2d(x_shape, w_shape, stride, padding, 1, groups, knobs))
        bp_weight = (q.reshape(w_shape[0], -1).astype(np.int32) if geometry.is_depthwise
                     else packing.pack_bitparallel_conv_weight(q, groups))
        bitserial = kernels.build(kernels.bitserial_conv2d(x_shape, w_shape, shifts_signs, CONV_ACT_BITS, True,
                                                           stride, padding, 1, groups))
        bs_weight = (packing.pack_depthwise_weight_planes(planes) if geometry.is_depthwise
                     else packing.pack_conv_weight_planes(planes, groups))
        cases = {"csqc bit-parallel": (bitparallel, (x, bp_weight)),
                 f"csqc bit-serial w{CONV_WEIGHT_BITS}a{CONV_ACT_BITS}":
                     (bitserial, (x, bs_weight, CONV_WEIGHT_BITS, zero_point))}
        for label, (kernel, args) in cases.items():
            assert np.array_equal(kernel(*args), expected), f"{label} {name} is not exact"
        integer = ort_conv_session(x_shape, q, stride, padding, groups, qlinear=False)
        qlinear = ort_conv_session(x_shape, q, stride, padding, groups, qlinear=True)
        assert np.array_equal(integer.run(None, {"X": x})[0], expected), "ORT ConvInteger disagrees"
        xf = torch.from_numpy(x.astype(np.float32))
        wf = torch.from_numpy(q.astype(np.float32))
        runs = {"ORT ConvInteger": lambda: integer.run(None, {"X": x}),
                "ORT QLinearConv": lambda: qlinear.run(None, {"X": x}),
                "torch fp32": lambda: torch.nn.functional.conv2d(xf, wf, None, stride, padding, 1, groups)}
        times = {label: [] for label in list(cases) + list(runs)}
        with torch.inference_mode():
            for _ in range(rounds):
                for label, (kernel, args) in cases.items():
                    times[label].append(kernel.time_us(*args, number=20, repeat=10))
                    time.sleep(0.1)
                for label, fn in runs.items():
                    time.sleep(0.3)  # let TVM's spinning workers go idle before other pools run
                    times[label].append(time_torch(fn, calls=100))
        rows.append((name, {label: float(np.median(v)) for label, v in times.items()}))
    labels = list(rows[0][1])
    print(f"conv2d, batch 1, median microseconds, {THREADS} threads "
          f"(ratio: ORT ConvInteger time / bit-parallel time)")
    header = f"{'shape':<20} | " + " | ".join(f"{label:>18}" for label in labels) + " | bp vs ORT"
    print(header)
    print("-" * len(header))
    for name, medians in rows:
        ratio = medians["ORT ConvInteger"] / medians["csqc bit-parallel"]
        print(f"{name:<20} | " + " | ".join(f"{medians[label]:18.1f}" for label in labels) + f" | {ratio:8.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of medians)")
    parser.add_argument("--section", choices=["dense", "conv", "all"], default="all")
    parser.add_argument("--tune", action="store_true", help="search the bit-parallel conv schedule per shape (as csqc compile --tune)")
    options = parser.parse_args()
    rng = np.random.default_rng(0)
    if options.section in ("conv", "all"):
        conv_section(options.rounds, options.tune, rng)
    if options.section == "conv":
        return

    rows = []
    for m, n, k in SHAPES:
        cases = {}
        for weight_bits, act_bits in PRECISIONS:
            cases[f"bit-serial w{weight_bits}a{act_bits}"] = bitserial_case(m, n, k, weight_bits, act_bits, rng)
        cases["bit-parallel int8"] = bitparallel_case(m, n, k, rng)
        sessions = {"ORT int8 MatMulInteger": ort_session(m, n, k, True, rng),
                    "ORT fp32 MatMul": ort_session(m, n, k, False, rng)}
        times = {name: [] for name in list(cases) + list(sessions)}
        for _ in range(options.rounds):
            for name, (kernel, args, _) in cases.items():
                times[name].append(kernel.time_us(*args, number=50, repeat=10))
                time.sleep(0.2)
            for name, (session, feeds) in sessions.items():
                times[name].append(time_ort(session, feeds))
                time.sleep(0.2)
        medians = {name: float(np.median(values)) for name, values in times.items()}
        weight_bytes = {name: case[2] for name, case in cases.items()}
        weight_bytes["ORT int8 MatMulInteger"] = n * k
        weight_bytes["ORT fp32 MatMul"] = 4 * n * k
        rows.append(((m, n, k), medians, weight_bytes))

    print(f"median microseconds, {THREADS} threads, CPU {kernels.cpu_target().attrs['mcpu']}")
    header = f"{'M x N x K':>16} | {'kernel':<24} | {'us':>9} | {'vs ORT int8':>11} | {'weight KiB':>10}"
    print(header)
    print("-" * len(header))
    for (m, n, k), medians, weight_bytes in rows:
        reference = medians["ORT int8 MatMulInteger"]
        for name, value in medians.items():
            print(f"{f'{m}x{n}x{k}':>16} | {name:<24} | {value:9.1f} | {reference / value:10.2f}x"
                  f" | {weight_bytes[name] / 1024:10.0f}")
        print("-" * len(header))


if __name__ == "__main__":
    main()
