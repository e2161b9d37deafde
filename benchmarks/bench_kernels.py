"""Benchmark of the csqc LLVM dense kernels next to ONNX Runtime, in one process.

Prints median microseconds (TVM ``time_evaluator`` for csqc kernels, wall clock per call for
ONNX Runtime) for bit-serial (weight planes, activation bits) = (2, 4) and (4, 8), the int8
bit-parallel kernel, ONNX Runtime MatMulInteger (u8 x s8) and fp32 MatMul, plus weight bytes.
All runtimes use 2 threads; rounds are interleaved with idle gaps so spinning thread pools do
not distort each other.  Bit-serial weights use the offset encoding (one plane per bit, with a
zero point).

    python3 benchmarks/bench_kernels.py [--rounds 3]
"""
import os

os.environ["TVM_NUM_THREADS"] = "2"  # must precede the first TVM call

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from csqc.targets.llvm import kernels, packing

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
    knobs = kernels.BitserialKnobs()
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of medians)")
    options = parser.parse_args()
    rng = np.random.default_rng(0)

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
