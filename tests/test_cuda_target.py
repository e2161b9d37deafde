"""CUDA target: exact computes (built for the CPU), GPU schedules verified, ahead-of-time
artifacts for the example models.  Runs without a GPU (needs nvcc for the compile tests)."""
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import pytest
import torch
import tvm

from csqc.errors import BadInput
from csqc.targets.cuda import glue, kernels, packing
from csqc.targets.cuda.target import (
    check_toolchain,
    CudaBackend,
    cuda_target,
    describe_fatbin,
    emit_cuda,
)
from csqc.targets.llvm import packing as cpu_packing
from csqc.targets.tvm.lower import lower_graph

RNG = np.random.default_rng(7)
CPU = tvm.target.Target({"kind": "llvm"})
GPU = cuda_target("sm_90")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
def planes_from_q(q, bits, encoding):
    """(planes [P, ...], shifts_signs, zero_point), most significant plane first."""
    q = np.asarray(q, dtype=np.int64)
    planes, shifts_signs = [], []
    if encoding == "posneg":
        pos, neg = np.maximum(q, 0), np.maximum(-q, 0)
        for bit in reversed(range(bits)):
            planes += [(pos >> bit) & 1, (neg >> bit) & 1]
            shifts_signs += [(bit, 1), (bit, -1)]
        return np.stack(planes).astype(np.uint8), shifts_signs, 0
    zero_point = 1 << (bits - 1)
    for bit in reversed(range(bits)):
        planes.append(((q + zero_point) >> bit) & 1)
        shifts_signs.append((bit, 1))
    return np.stack(planes).astype(np.uint8), shifts_signs, zero_point


def random_q(shape, bits, encoding):
    if encoding == "posneg":
        return RNG.integers(-(1 << bits) + 1, 1 << bits, shape)
    return RNG.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape)


def conv_reference(x, q, stride, padding, dilation, groups):
    """Exact int64 NCHW grouped convolution."""
    b, c, h, w = x.shape
    o, cg, kh, kw = q.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.zeros((b, c, h + 2 * ph, w + 2 * pw), np.int64)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((b, o, oh, ow), np.int64)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for r in range(kh):
            for s in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, r * dh:r * dh + sh * (oh - 1) + 1:sh, s * dw:s * dw + sw * (ow - 1) + 1:sw]
                y[:, oc] += np.einsum("bchw,c->bhw", patch, q[oc, :, r, s].astype(np.int64))
    return y


def run_on_cpu(func, *args):
    """Build an (unscheduled) PrimFunc for LLVM and run it; returns the last parameter."""
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=CPU)
    outs = []
    for buf in [p for p in func.params][len(args):]:
        outs.append(tvm.runtime.tensor(np.zeros([int(s) for s in buf.shape], str(buf.dtype))))
    ex(*[tvm.runtime.tensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in args], *outs)
    return [o.numpy() for o in outs] if len(outs) > 1 else outs[0].numpy()


# ------------------------------------------------------------------------------------------
# Exact computes (the GPU kernels before scheduling), on the CPU
# ------------------------------------------------------------------------------------------
def test_weight_packing_round_trip():
    planes = RNG.integers(0, 2, (3, 11, 77)).astype(np.uint8)
    packed = packing.pack_weight_planes(planes)
    assert packed.shape == (11, 3, 3) and packed.dtype == np.uint32
    np.testing.assert_array_equal(packing.unpack_weight_planes(packed, 11, 77), planes)
    with pytest.raises(ValueError, match="lanes=1"):
        packing.pack_weight_planes(planes, lanes=16)


@pytest.mark.parametrize("encoding", ["posneg", "offset"])
@pytest.mark.parametrize("acc_dtype", ["int32", "int64"])
def test_bitserial_dense_compute_exact(encoding, acc_dtype):
    m, n, k, bits, act_bits = 3, 21, 75, 3, 4
    q = random_q((n, k), bits, encoding)
    planes, ss, z = planes_from_q(q, bits, encoding)
    x = RNG.integers(0, 1 << act_bits, (m, k)).astype(np.uint8)
    func = kernels.bitserial_dense_compute(m, n, k, ss, act_bits, bool(z), acc_dtype)
    for n_planes in (len(ss), len(ss) - 1, 1, 0):  # PrecisionBatching: fewer planes at run time
        y = run_on_cpu(func, x, packing.pack_weight_planes(planes), n_planes, z)
        expected = x.astype(np.int64) @ cpu_packing.combine_planes(planes, ss, z, n_planes).T
        assert y.dtype == np.dtype(acc_dtype)
        np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("encoding", ["posneg", "offset"])
def test_bitserial_conv_compute_exact(encoding):
    stride, padding, dilation, groups = (2, 1), (1, 2), (1, 2), 2
    q = random_q((8, 3, 3, 3), 2, encoding)
    planes, ss, z = planes_from_q(q, 2, encoding)
    x = RNG.integers(0, 8, (2, 6, 9, 11)).astype(np.uint8)
    func = kernels.bitserial_conv2d_compute(x.shape, q.shape, ss, 3, bool(z), stride, padding, dilation, groups)
    w = packing.pack_conv_weight_planes(planes, groups)
    for n_planes in (len(ss), 1):
        y = run_on_cpu(func, x, w, n_planes, z)
        qq = cpu_packing.combine_planes(planes, ss, z, n_planes)
        np.testing.assert_array_equal(y, conv_reference(x, qq, stride, padding, dilation, groups))


@pytest.mark.parametrize("encoding", ["posneg", "offset"])
def test_bitserial_depthwise_compute_exact(encoding):
    q = random_q((6, 1, 3, 3), 3, encoding)
    planes, ss, z = planes_from_q(q, 3, encoding)
    x = RNG.integers(0, 16, (1, 6, 7, 8)).astype(np.uint8)
    func = kernels.bitserial_conv2d_compute(x.shape, q.shape, ss, 4, bool(z), 1, 1, 1, 6)
    y = run_on_cpu(func, x, packing.pack_depthwise_weight_planes(planes), len(ss) - 1, z)
    qq = cpu_packing.combine_planes(planes, ss, z, len(ss) - 1)
    np.testing.assert_array_equal(y, conv_reference(x, qq, (1, 1), (1, 1), (1, 1), 6))


def test_bitparallel_computes_exact():
    q = RNG.integers(-128, 128, (19, 70))
    x = RNG.integers(0, 256, (5, 70)).astype(np.uint8)
    y = run_on_cpu(kernels.bitparallel_dense_compute(5, 19, 70), x, cpu_packing.pack_bitparallel_weight(q, "int8"))
    np.testing.assert_array_equal(y, x.astype(np.int64) @ q.T)
    qc = RNG.integers(-128, 128, (8, 3, 3, 3))
    xc = RNG.integers(0, 256, (2, 6, 7, 9)).astype(np.uint8)
    args = ((2, 1), (1, 1), (1, 2), 2)
    y = run_on_cpu(kernels.bitparallel_conv2d_compute(xc.shape, qc.shape, *args), xc,
                   cpu_packing.pack_bitparallel_conv_weight(qc, 2))
    np.testing.assert_array_equal(y, conv_reference(xc, qc, *args))
    qd = RNG.integers(-128, 128, (6, 1, 3, 3))
    xd = RNG.integers(0, 256, (1, 6, 5, 5)).astype(np.uint8)
    y = run_on_cpu(kernels.bitparallel_conv2d_compute(xd.shape, qd.shape, 1, 1, 1, 6), xd,
                   qd.reshape(6, -1).astype(np.int32))
    np.testing.assert_array_equal(y, conv_reference(xd, qd, (1, 1), (1, 1), (1, 1), 6))


@pytest.mark.parametrize("static", [0.0, 1.75])
def test_quantize_compute_matches_interpreter(static):
    from csqc.interpreter import _quantize
    from types import SimpleNamespace

    x = (RNG.standard_normal((2, 3, 5, 7)) * 2).astype(np.float32)
    x[0, 0, 0, :3] = [1.5 / 15 * 3, -x.max(), 0.0]  # ties and the extreme value
    node = SimpleNamespace(attr=lambda k, d=None: {"bits": 4, "static_scale": static}.get(k, d))
    expected = _quantize(node, x)
    scale, pos, neg = run_on_cpu(glue.quantize(x.shape, 4, static, True, compute_only=True), x)
    assert scale[0] == expected.scale
    np.testing.assert_array_equal(pos.astype(np.int32) - neg.astype(np.int32), expected.codes)


@pytest.mark.parametrize("static, zero_point", [(0.0, 0), (3.5, 5)])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_quantize_compute_matches_interpreter(static, zero_point, centered, bits):
    """Range, zero point and codes (or the sign parts of ``u - zp``) bit for bit: ties, zeros,
    the maximum, and (static) values past the range on both sides."""
    from csqc.interpreter import _quantize_asymmetric

    x = (RNG.standard_normal((2, 3, 5, 7)) * 2 + 0.3).astype(np.float32)
    x.reshape(-1)[:5] = [0.0, -0.0, x.max(), 9.0, -9.0]
    expected = _quantize_asymmetric(lambda: "q", x, bits, static, zero_point)
    scale, zp, *codes = run_on_cpu(glue.quantize_asymmetric(x.shape, bits, static, zero_point, centered,
                                                            compute_only=True), x)
    assert scale[0] == expected.scale and zp[0] == expected.zero_point
    got = codes[0].astype(np.int32) - (codes[1].astype(np.int32) - expected.zero_point if centered else 0)
    np.testing.assert_array_equal(got, expected.codes)


def test_epilogue_compute_matches_formula():
    acc = RNG.integers(-5000, 5000, (1, 4, 3, 3)).astype(np.int32)
    acc_neg = RNG.integers(0, 5000, acc.shape).astype(np.int32)
    scale = np.array([3.7], np.float32)
    mult, add = RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    func = glue.epilogue(acc.shape, 1, 15, "clip", 0.0, 6.0, True, "int32", True, compute_only=True)
    y = run_on_cpu(func, acc, acc_neg, scale, mult, add)
    v = ((acc - acc_neg).astype(np.float32) * scale[0]) / np.float32(15)
    expected = np.clip(v * mult.reshape(1, 4, 1, 1) + add.reshape(1, 4, 1, 1), np.float32(0), np.float32(6))
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("weight_shape,stride,padding,groups,has_bias", [
    ((2, 1, 1, 1), 1, 1, 2, False),  # one product an output: no reduction
    ((8, 1, 1, 1), 2, 0, 4, True),   # the same, two outputs a channel
    ((4, 1, 3, 3), 1, 1, 2, True),   # a reduction over the taps
])
def test_float_conv_compute_matches_torch(weight_shape, stride, padding, groups, has_bias):
    x = RNG.standard_normal((1, weight_shape[1] * groups, 7, 5)).astype(np.float32)
    w = RNG.standard_normal(weight_shape).astype(np.float32)
    b = RNG.standard_normal(weight_shape[0]).astype(np.float32)
    func = glue.conv2d_f32(x.shape, w.shape, stride, padding, 1, groups, has_bias, "none", 0.0, 0.0, compute_only=True)
    y = run_on_cpu(func, x, w, *([b] if has_bias else []))
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if has_bias else None,
                                          stride, padding, 1, groups).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape, b_shape", [((1, 2, 1, 1), (1, 2, 1, 8)), ((2, 3, 4), (1, 4, 5))])
def test_matmul_compute_matches_numpy(a_shape, b_shape):
    a, b = RNG.standard_normal(a_shape).astype(np.float32), RNG.standard_normal(b_shape).astype(np.float32)
    y = run_on_cpu(glue.matmul(a_shape, b_shape, compute_only=True), a, b)
    np.testing.assert_allclose(y, np.matmul(a, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["hardsigmoid", "hardswish", "silu"])
def test_vision_activation_computes_match_interpreter(op):
    from csqc import numerics

    x = (RNG.standard_normal((4, 50)) * 4).astype(np.float32)
    x[0, :4] = [-3.0, 3.0, 0.0, 6.5]
    y = run_on_cpu(glue.unary(op, x.shape, compute_only=True), x)
    np.testing.assert_allclose(y, getattr(numerics, op)(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,count_include_pad", [("max", True), ("avg", True), ("avg", False)])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (2, 2), (1, 1)), ((3, 3), (2, 2), (0, 0)), ((2, 2), (2, 2), (0, 0))])
def test_ceil_mode_pool_computes_match_interpreter(kind, count_include_pad, kernel, stride, padding):
    from csqc.numerics import pool2d

    x = RNG.standard_normal((1, 3, 20, 21)).astype(np.float32)
    expected = pool2d(x, kind, kernel, stride, padding, (1, 1), True, count_include_pad)
    func = (glue.max_pool2d(x.shape, kernel, stride, padding, (1, 1), True, compute_only=True) if kind == "max" else
            glue.avg_pool2d(x.shape, kernel, stride, padding, count_include_pad, 0, True, compute_only=True))
    np.testing.assert_allclose(run_on_cpu(func, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,output_size", [((1, 3, 9, 11), (4, 3)), ((2, 3, 2, 2), (7, 7)), ((1, 2, 32, 32), (7, 7))])
def test_uneven_adaptive_pool_compute_matches_interpreter(shape, output_size):
    from csqc.numerics import adaptive_avg_pool2d

    x = RNG.standard_normal(shape).astype(np.float32)
    y = run_on_cpu(glue.adaptive_avg_pool2d(shape, output_size, compute_only=True), x)
    np.testing.assert_allclose(y, adaptive_avg_pool2d(x, output_size), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# GPU schedules: every kernel passes TVM's GPU verification
# ------------------------------------------------------------------------------------------
SCHEDULED = {
    "bitserial_dense_gemv": lambda: kernels.bitserial_dense(1, 4096, 4096, [(1, 1), (0, 1)], 4, True),
    "bitserial_dense_small": lambda: kernels.bitserial_dense(3, 10, 64, [(2, 1), (2, -1), (0, 1)], 4, False, "int64"),
    "bitserial_conv": lambda: kernels.bitserial_conv2d((1, 64, 56, 56), (64, 64, 3, 3), [(1, 1), (0, 1)], 4, True, 1, 1),
    "bitserial_conv_grouped": lambda: kernels.bitserial_conv2d((2, 8, 9, 9), (8, 4, 3, 3), [(0, 1)], 3, False, 2, 1, 1, 2),
    "bitserial_depthwise": lambda: kernels.bitserial_conv2d((1, 32, 16, 16), (32, 1, 3, 3), [(1, 1), (0, 1)], 4, True, 1, 1, 1, 32),
    # a weight tile of one word: its shared-memory copy has no loop left to bind (random-model run)
    "bitserial_conv_one_word": lambda: kernels.bitserial_conv2d((1, 4, 24, 38), (2, 2, 1, 1), [(1, 1)], 6, True, 1, 1, 1, 2),
    "bitparallel_dense": lambda: kernels.bitparallel_dense(64, 1000, 512),
    # K = 22: chunks of 11 cut 4-code weight words (a Transformer of width 22: csqc.differential)
    "bitparallel_dense_odd_k": lambda: kernels.bitparallel_dense(12, 22, 22),
    "bitparallel_conv_odd_channels": lambda: kernels.bitparallel_conv2d((1, 22, 8, 8), (8, 22, 1, 1)),
    "bitparallel_conv": lambda: kernels.bitparallel_conv2d((1, 16, 32, 32), (32, 16, 3, 3), 2, 1),
    "bitparallel_depthwise": lambda: kernels.bitparallel_conv2d((1, 32, 16, 16), (32, 1, 3, 3), 1, 1, 1, 32),
    "quantize": lambda: glue.quantize((1, 64, 56, 56), 4, 0.0, True),
    "quantize_asymmetric": lambda: glue.quantize_asymmetric((1, 64, 56, 56), 8, 0.0, 0, True),
    "quantize_asymmetric_static": lambda: glue.quantize_asymmetric((4, 1000), 4, 2.5, 3, False),
    "epilogue": lambda: glue.epilogue((1, 64, 56, 56), 1, 15, "relu", 0.0, 0.0, True, "int32", True),
    "conv2d_f32": lambda: glue.conv2d_f32((1, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, 1, False, "none", 0.0, 0.0),
    # float convs, one output a thread (dlight asserted on the one-product one; mapped the others'
    # reductions across a block's threads, which failed to build)
    "conv2d_f32_one_product": lambda: glue.conv2d_f32((1, 2, 11, 9), (2, 1, 1, 1), 1, 1, 1, 2, False, "none", 0.0, 0.0),
    "conv2d_f32_depthwise_dilated": lambda: glue.conv2d_f32((1, 8, 13, 13), (16, 1, 5, 5), 2, 0, 2, 8, True, "relu", 0, 0),
    "conv2d_f32_small_dilated": lambda: glue.conv2d_f32((3, 2, 17, 17), (4, 2, 3, 3), 2, 0, 2, 1, False, "none", 0, 0),
    # attention over one position: the product of weights and values has K = 1
    "matmul_one_position": lambda: glue.matmul((1, 2, 1, 1), (1, 2, 1, 8)),
    "linear_f32": lambda: glue.linear_f32(1, 512, 1000, True, "none", 0.0, 0.0),
    "max_pool2d": lambda: glue.max_pool2d((1, 64, 112, 112), (3, 3), (2, 2), (1, 1), (1, 1)),
    "avg_pool2d": lambda: glue.avg_pool2d((1, 16, 8, 8), (3, 3), (1, 1), (1, 1), False, 0),
    "adaptive_avg_pool2d": lambda: glue.adaptive_avg_pool2d((1, 512, 7, 7), (1, 1)),
    "adaptive_avg_pool2d_uneven": lambda: glue.adaptive_avg_pool2d((1, 64, 32, 32), (7, 7)),
    "avg_pool2d_ceil": lambda: glue.avg_pool2d((1, 16, 9, 9), (2, 2), (2, 2), (0, 0), True, 0, True),
    "softmax": lambda: glue.softmax((1, 10), 1),
    "mean": lambda: glue.mean((2, 64, 8, 8), (2, 3), True),
    "binary": lambda: glue.binary("minimum", (1, 16, 8, 8), (16, 1, 1), (1, 16, 8, 8)),
    "concat": lambda: glue.concat(((1, 16, 8, 8), (1, 8, 8, 8)), 1),
    "transpose": lambda: glue.transpose((1, 16, 8, 8), (0, 2, 3, 1)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_scheduled_kernel_verifies(name):
    func = SCHEDULED[name]()
    assert kernels.verify_gpu(func, GPU)
    # The verifier does see the launch configuration: an impossible limit fails.
    assert not kernels.verify_gpu(func, GPU, {**kernels.GPU_LIMITS, "max_threads_per_block": 1})


def test_bitserial_gemv_source_uses_popc_and_warp_shuffles():
    func = SCHEDULED["bitserial_dense_gemv"]()
    ex = tvm.compile(tvm.IRModule({"main": func}), target=GPU)
    src = [m for m in ex.mod.imports if m.kind == "cuda"][0].inspect_source()
    assert "__popc(" in src and "__shfl_down_sync" in src and "__shared__" in src


def test_bench_cuda_builds_its_kernels_without_a_gpu(tmp_path):
    """``benchmarks/bench_cuda.py --save`` compiles the timed kernels here (nvcc, no GPU) for a
    GPU machine that has only TVM's runtime; ``--load`` times them there, and says so without one."""
    script = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_cuda.py")]
    proc = subprocess.run([*script, "--save", str(tmp_path), "--size", "256", "--arch", "sm_80"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("bitserial", "bitparallel"):
        library = (tmp_path / f"{name}-256.so").read_bytes()
        start = library.find(struct.pack("<I", 0xBA55ED50))  # the device code, compiled: a fatbin
        assert start >= 0 and ("cubin", "sm_80") in describe_fatbin(library[start:])
    if not tvm.cuda(0).exist:
        proc = subprocess.run([*script, "--load", str(tmp_path), "--size", "256"], capture_output=True, text=True)
        assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr


@pytest.fixture(scope="module")
def stub_driver(tmp_path_factory):
    """A folder holding a stub ``libcuda.so.1``: every driver call TVM's CUDA runtime library
    links fails (error 100, no device), so that library loads on this machine without an NVIDIA
    driver, registering the CUDA device and module loader as on a GPU machine."""
    folder = tmp_path_factory.mktemp("stub-driver")
    runtime_dir = os.path.dirname(tvm.base._LOADED_LIBS["tvm_runtime"]._name)
    symbols = subprocess.run(["nm", "-D", "--undefined-only", os.path.join(runtime_dir, "libtvm_runtime_cuda.so")],
                             capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in symbols.splitlines() if re.search(r" cu[A-Z]\w+$", line)]
    (folder / "stub.c").write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in names))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "stub.c")], check=True)
    return folder


def _with_stub_driver(stub_driver, script: str, runtime_only: bool) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(stub_driver))
    if runtime_only:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_cuda_runtime_loads_with_tvm_runtime_alone(stub_driver):
    """With its runtime library alone (``TVM_USE_RUNTIME_LIB=1``) TVM loads no device backend:
    csqc loads TVM's CUDA runtime library itself, so a GPU can be seen and CUDA modules load."""
    _with_stub_driver(stub_driver, (
        "import tvm, tvm_ffi, csqc.runtime\n"
        "assert tvm.base._RUNTIME_ONLY\n"
        "assert not csqc.runtime.cuda_device().exist  # the stub driver has no device\n"
        "assert tvm_ffi.get_global_func('ffi.Module.load_from_bytes.cuda', allow_missing=True) is not None\n"
    ), runtime_only=True)


# ------------------------------------------------------------------------------------------
# Toolchain errors
# ------------------------------------------------------------------------------------------
def test_bad_arch_is_bad_input():
    for arch in ("sm_61", "sm_100", "compute_90", "ampere"):
        with pytest.raises(BadInput, match="sm_80") as info:
            check_toolchain(arch)
        assert info.value.exit_code == 2


def test_missing_nvcc_is_bad_input(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BadInput, match="nvcc"):
        emit_cuda(None, tmp_path / "m.so", arch="sm_90")


# ------------------------------------------------------------------------------------------
# Whole models: ahead-of-time artifacts
# ------------------------------------------------------------------------------------------
_LOADER_PROBE = """
import sys, json, tvm, tvm_ffi
seen = {}
@tvm_ffi.register_global_func("ffi.Module.load_from_bytes.cuda", override=True)
def load(data):
    seen["data"] = bytes(data)
    return tvm.get_global_func("runtime.SourceModuleCreate")("", "cu")
lib = tvm.runtime.load_module(sys.argv[1])
from csqc.targets.cuda.target import _Reader
r = _Reader(seen["data"]); fmt = r.string().decode(); functions = r.u64()
print(json.dumps({"format": fmt, "functions": functions, "tail": seen["data"][-16:].hex()}))
"""


def check_artifact(path, report, arch):
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        plan = json.loads(z.read("plan.json"))
    assert plan["target"]["kind"] == "cuda" and plan["target"]["arch"] == arch
    start = data.find(struct.pack("<I", 0xBA55ED50))
    assert start > 0, "no fatbin in the artifact"
    assert describe_fatbin(data[start:]) == [("cubin", arch), ("ptx", arch)]
    assert f".target {arch}".encode() in data  # the PTX is stored uncompressed
    # The CUDA module is stored as a binary, not as source compiled at load time.
    # (module key "cuda", payload size, then the payload's format string)
    assert re.search(rb"\x04\x00{7}cuda.{8}\x06\x00{7}fatbin", data, re.S)
    assert not re.search(rb"\x04\x00{7}cuda.{8}\x04\x00{7}cuda", data, re.S)
    assert report["device_code"]["entries"] == [("cubin", arch), ("ptx", arch)]


def emit_and_check(graph, tmp_path, arch, name):
    out = tmp_path / f"{name}-{arch}.so"
    src = tmp_path / f"{name}-{arch}-src"
    report = emit_cuda(graph, out, arch=arch, emit_source=src)
    check_artifact(out, report, arch)
    source = (src / "kernels.cu").read_text()
    if "bitserial" in report["kernels"].values():
        assert "__popc(" in source
    return report, out


def verify_plan(graph):
    plan = lower_graph(graph, backend=CudaBackend())
    bad = [name for name, f in plan.funcs.items() if not kernels.verify_gpu(f, GPU)]
    assert not bad


def _optimized(path):
    from csqc.compiler import optimize

    return optimize(path, "default")


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_digits_models_compile(trained, tmp_path, recipe):
    *_, path = trained(recipe)
    graph = _optimized(path)
    report, out = emit_and_check(graph, tmp_path, "sm_90", recipe)
    assert "bitserial" in report["kernels"].values()
    verify_plan(graph)
    # The TVM loader parses the library and hands the CUDA loader format "fatbin" + the binary.
    probe = subprocess.run([sys.executable, "-c", _LOADER_PROBE, str(out)], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    assert loaded["format"] == "fatbin" and loaded["functions"] >= report["functions"]


def _csq_model(factory, shape, tmp_path, name):
    import csqc
    from csqc.layers import finalize

    torch.manual_seed(0)
    model = factory().eval()
    csqc.convert(model, n_bits=4, act_bits=4)
    finalize(model)
    path = tmp_path / f"{name}.pt"
    csqc.save(model, path, torch.randn(*shape))
    return _optimized(path)


@pytest.fixture(scope="module")
def resnet20_sm90(tmp_path_factory):
    """ResNet-20 (4-bit) built for sm_90: its optimized graph, build report and artifact (one
    compile for the tests below; ResNet-18 further down builds for sm_80: both architectures)."""
    from csqc.models.vision import resnet20

    tmp_path = tmp_path_factory.mktemp("resnet20-cuda")
    graph = _csq_model(resnet20, (1, 3, 32, 32), tmp_path, "resnet20")
    return graph, *emit_and_check(graph, tmp_path, "sm_90", "resnet20")


def test_resnet20_compiles_for_sm90(resnet20_sm90):
    graph, report, _ = resnet20_sm90
    verify_plan(graph)
    assert report["kernels"]["conv1"] == "float"


def test_cuda_artifact_library_loads_in_tvms_cuda_loader(resnet20_sm90, stub_driver):
    """TVM's CUDA module loader (on a stub driver: the fatbin is handed to the driver only at
    the first launch) reads the artifact's device module, and every step's function resolves;
    with TVM's compiler and with its runtime library alone."""
    *_, artifact = resnet20_sm90
    for runtime_only in (False, True):
        _with_stub_driver(stub_driver, _cuda_loader_reads(artifact), runtime_only)


def _cuda_loader_reads(artifact) -> str:
    """A script that loads ``artifact``'s library (its device module through TVM's CUDA loader)
    and resolves every step's function."""
    return (
        "import csqc.runtime\n"
        "from csqc.artifact import load_library, read_artifact\n"
        "csqc.runtime.cuda_device()\n"
        f"contents = read_artifact({str(artifact)!r})\n"
        "module = load_library(contents.library)\n"
        "assert [m.kind for m in module.imports] == ['cuda'], module.imports\n"
        "missing = [s['func'] for s in contents.plan['steps'] if module.get_function(s['func'], query_imports=True) is None]\n"
        "assert contents.plan['steps'] and not missing, missing\n"
    )


def test_gpu_check_prepares_what_a_gpu_machine_runs(tmp_path, stub_driver):
    """``benchmarks/gpu_check.py prepare`` (no GPU needed): its reference outputs are the
    interpreter's (an llvm build of the same model file gives them), its cuda artifacts load in
    TVM's CUDA loader with TVM's runtime library alone, and ``run`` without a GPU says so."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, script, "prepare", str(bundle), "--only", "digits-mlp", "--kernel-size", "256",
                           "--arch", "sm_80"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((bundle / "cases.json").read_text())["cases"] == [["digits-mlp", "digits-mlp"]]
    assert {p.name for p in (bundle / "kernels").iterdir()} == {"bitserial-256.so", "bitparallel-256.so"}
    import csqc
    from csqc import runtime

    ref = np.load(bundle / "digits-mlp.ref.npz")
    csqc.compile(str(bundle / "digits-mlp.pt"), "llvm", str(tmp_path / "mlp.so"))
    np.testing.assert_allclose(runtime.load(tmp_path / "mlp.so")(ref["x0"]), ref["y0"], rtol=1e-6, atol=1e-6)
    _with_stub_driver(stub_driver, _cuda_loader_reads(bundle / "digits-mlp.cuda.so"), runtime_only=True)
    proc = subprocess.run([sys.executable, script, "run", str(bundle)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr


@pytest.mark.parametrize("kernel", ["bitserial", "bitparallel"])
def test_one_input_channel_convs_compile(tmp_path, kernel):
    from modelcheck import one_channel_convs

    graph = _optimized(one_channel_convs(tmp_path))
    verify_plan(graph)
    out = tmp_path / f"one-channel-{kernel}.so"
    report = emit_cuda(graph, out, arch="sm_90", force_kernel=kernel)
    check_artifact(out, report, "sm_90")
    assert report["kernels"]["0"] == kernel and report["kernels"]["2"] == kernel


def test_asymmetric_model_compiles_with_centered_codes(tmp_path):
    """Zero-point quantizers (dynamic and calibrated) lower to the asymmetric kernel with the
    sign parts of ``u - zp``: every GPU kernel reads signed codes, so no epilogue takes a zero point."""
    from torch import nn

    import csqc
    from csqc.compiler import optimize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    model = csqc.finalize(csqc.convert(net.eval(), n_bits=4, act_bits=8, act_symmetric=False, quantize_first_input=True))
    path = csqc.save(model, tmp_path / "m.pt", torch.randn(2, 2, 6, 6))
    for calibrate in (None, np.random.default_rng(0).standard_normal((8, 2, 6, 6)).astype(np.float32)):
        graph = optimize(path, "default", calibrate=calibrate)
        plan = lower_graph(graph, backend=CudaBackend())
        keys = list(plan._by_key)
        quantizers = [k for k in keys if k.startswith("quantize")]
        assert len(quantizers) == 3 and all(k.startswith("quantize_asymmetric") and k.endswith(",True)")
                                            for k in quantizers), quantizers  # centered: sign parts
        assert not any("zero_point" in k for k in keys if k.startswith("epilogue"))
        verify_plan(graph)
        out = tmp_path / f"m{'-cal' if calibrate is not None else ''}.so"
        report = csqc.compile(path, "cuda", out, calibrate=calibrate)
        assert out.stat().st_size > 0 and report is not None


def test_resnet18_224_compiles(tmp_path):
    from csqc.models.vision import resnet18

    graph = _csq_model(resnet18, (1, 3, 224, 224), tmp_path, "resnet18")
    report, _ = emit_and_check(graph, tmp_path, "sm_80", "resnet18")
    assert len(report["kernels"]) == 21
