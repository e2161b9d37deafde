"""The llvm target on each x86 instruction-set tier (``targets/llvm/isa.py``): AVX-512 VNNI, AVX2
and generic x86-64. Artifacts built for the AVX2 and generic tiers run on every CI CPU, so their
kernels and whole models are checked exactly here whatever this machine is."""
import numpy as np
import pytest
import torch

import csqc
from cpus import AVX2_CPU, GENERIC_CPU, HOST_TIER
from csqc import runtime
from csqc.errors import CompileError
from csqc.targets.llvm import isa, kernels, packing
from csqc.verify import verify
from test_kernels_llvm import conv_reference


@pytest.mark.parametrize("cpu,tier", [("haswell", isa.AVX2), ("znver3", isa.AVX2), ("alderlake", isa.AVX2),
                                      ("skylake-avx512", isa.AVX2),  # AVX-512 without VNNI
                                      ("cascadelake", isa.AVX512), ("znver4", isa.AVX512),
                                      ("sapphirerapids", isa.AVX512), ("nehalem", isa.GENERIC),
                                      ("x86-64", isa.GENERIC)])
def test_tier_of_named_cpus(cpu, tier):
    assert isa.tier(kernels.cpu_target(cpu)) == tier
    with kernels.cpu_target(cpu):  # the target in scope
        assert isa.tier() == tier


def test_aarch64_targets_have_no_x86_dot_product():
    from csqc.targets.aarch64.target import aarch64_target

    assert isa.tier(aarch64_target()) == isa.GENERIC


def test_avx2_dot_product_is_exact_up_to_its_int16_pair_bound():
    """``vpmaddubsw`` saturates its pair sums: at the bound the kernel is exact, past it not (so
    the bound the cost model applies is the real one)."""
    assert isa.avx2_dot_exact(255, 64) and isa.avx2_dot_exact(127, 128) and isa.avx2_dot_exact(30, 255)
    assert not isa.avx2_dot_exact(255, 65) and not isa.avx2_dot_exact(128, 128)
    target = kernels.cpu_target(AVX2_CPU)
    with target:
        kernel = kernels.build(kernels.bitparallel_dense(2, 16, 64), target)
    for code, weight, exact in ((255, 64, True), (255, -64, True), (255, -128, False), (255, 127, False)):
        x = np.full((2, 64), code, np.uint8)
        q = np.full((16, 64), weight)
        y = kernel(x, packing.pack_bitparallel_weight(q))
        assert np.array_equal(y, x.astype(np.int64) @ q.T) == exact, (code, weight)


def test_avx2_int16_groups_are_exact_up_to_their_bound():
    """Two channel groups' ``vpmaddubsw`` sums added in int16 before widening (``isa.dot4_sum``):
    exact while four products fit int16, wrong past it (so ``avx2_int16_groups`` is the real
    bound); 12 input channels are three groups of 4, so the unpaired last one runs too."""
    assert isa.avx2_int16_groups(255, 32) == 2 and isa.avx2_int16_groups(255, 33) == 1
    assert isa.avx2_int16_groups(30, 7, limit=2) == 2 and isa.avx2_int16_groups(255, 65) == 0
    target = kernels.cpu_target(AVX2_CPU)
    shape, weight_shape = (1, 12, 6, 6), (16, 12, 3, 3)
    with target:
        kernel = kernels.build(kernels.bitparallel_conv2d(shape, weight_shape, 1, 1, 1, 1,
                                                          kernels.BitparallelKnobs(int16_groups=2)), target)
    for code, weight, exact in ((255, 32, True), (255, -32, True), (255, 33, False), (255, 64, False)):
        x = np.full(shape, code, np.uint8)
        q = np.full(weight_shape, weight)
        y = kernel(x, packing.pack_bitparallel_conv_weight(q, 1))
        assert np.array_equal(y, conv_reference(x, q, (1, 1), (1, 1), (1, 1), 1)) == exact, (code, weight)


def test_avx2_convs_pair_channel_groups_where_their_bound_allows(tmp_path):
    from csqc.compiler import optimize
    from csqc.targets.llvm.backend import CpuBackend, avx2_dot_bounds

    graph = optimize(csqc.save(_cnn(seed=3), tmp_path / "cnn.pt", torch.zeros(2, 3, 16, 16)), "default")
    conv = next(n for n in graph.nodes if n.name == "3")
    q = csqc.interpreter.decode_weight(graph, conv)
    assert isa.avx2_int16_groups(*avx2_dot_bounds(conv.quant, q)) >= 2  # 4-bit codes and weights
    assert CpuBackend(tier=isa.AVX2).conv_int16_groups(conv, q) == 2
    assert CpuBackend(tier=isa.AVX512).conv_int16_groups(conv, q) == 1  # one vpdpbusd a group there


def test_avx2_strided_depthwise_convs_over_large_planes_accumulate_in_int32():
    from csqc.targets.llvm.backend import CpuBackend
    from csqc.targets.tvm.geometry import conv_geometry

    def geo(channels, size, stride):
        return conv_geometry((1, channels, size, size), (channels, 1, 3, 3), stride, 1, 1, channels)

    avx2, avx512 = CpuBackend(tier=isa.AVX2), CpuBackend(tier=isa.AVX512)
    assert not avx2.depthwise_int16_pays(geo(96, 112, 2)) and not avx2.depthwise_int16_pays(geo(144, 56, 2))
    assert avx2.depthwise_int16_pays(geo(192, 28, 2)) and avx2.depthwise_int16_pays(geo(96, 112, 1))
    assert avx512.depthwise_int16_pays(geo(96, 112, 2))


def test_a_kernel_builds_for_the_target_in_scope():
    """``kernels.build`` without a target compiles for the target in scope, the one whose tier
    chose the kernel's instructions: an AVX2 kernel built on an AVX-512 machine holds no 512-bit
    register (it once compiled for this machine's CPU, and LLVM widened AVX2 code to AVX-512)."""
    with kernels.cpu_target(AVX2_CPU):
        assembly = kernels.build(kernels.bitparallel_dense_signed(1, 64, 256, one_product=True)).assembly()
    assert "ymm" in assembly and "zmm" not in assembly and "ymm16" not in assembly


def test_kernels_refuse_instructions_their_target_lacks():
    """A kernel built for one tier and compiled for a smaller one raises (LLVM would abort the process)."""
    if HOST_TIER == isa.AVX512:
        with kernels.cpu_target("cascadelake"):
            avx512 = kernels.bitparallel_dense(2, 16, 64)
        with pytest.raises(CompileError, match=r"vpdpbusd.*avx512vnni"):
            kernels.build(avx512, kernels.cpu_target(AVX2_CPU))
    with kernels.cpu_target(AVX2_CPU):
        avx2 = kernels.bitparallel_dense(2, 16, 64)
    assert isa.missing_features([avx2], kernels.cpu_target(AVX2_CPU)) == []
    with pytest.raises(CompileError, match=r"pmadd.ub.sw \(avx2\)"):
        kernels.build(avx2, kernels.cpu_target(GENERIC_CPU))
    with kernels.cpu_target(GENERIC_CPU), pytest.raises(Exception, match="no int8 dot product"):  # (TVM's parser wraps it)
        kernels.bitparallel_dense(2, 16, 64)


def _cnn(seed: int, act_bits: int = 4, n_bits: int = 4):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU(),  # depthwise
        torch.nn.Conv2d(32, 24, 1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(24 * 8 * 8, 10))
    net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return csqc.finalize(csqc.convert(net, n_bits=n_bits, act_bits=act_bits)).eval()


def _assert_exact(report):
    assert report.ok and report.accumulators_exact, report.to_json()
    artifact = [s for s in report.layers if s["runtime"].startswith("artifact:")]
    assert artifact and all(sum(s["mismatched"].values()) == 0 for s in artifact)


@pytest.mark.parametrize("cpu", [AVX2_CPU, GENERIC_CPU])
@pytest.mark.parametrize("calibrate", [False, True])
def test_models_verify_exactly_on_each_tier(tmp_path, cpu, calibrate):
    """A CNN (stem, strided, depthwise and 1x1 convs, a linear head) compiled for the AVX2 and the
    generic tier: every runtime and layer agrees bit for bit, dynamic and calibrated scales; AVX2
    runs its convs on the int8 dot product, the generic tier bit-serial (depthwise: plain integer
    code on both)."""
    model = csqc.save(_cnn(seed=3), tmp_path / "cnn.pt", torch.zeros(2, 3, 16, 16))
    model = csqc.load(model)
    out = tmp_path / f"{cpu}.so"
    calib = np.random.default_rng(1).random((8, 3, 16, 16), dtype=np.float32) if calibrate else None
    report = csqc.compile(model, "llvm", out, mcpu=cpu, **({"calibrate": calib} if calibrate else {}))
    tier = isa.AVX2 if cpu == AVX2_CPU else isa.GENERIC
    assert report.report["tier"] == tier
    kernels_used = report.report["kernels"]
    assert kernels_used["5"] == "bitparallel"  # depthwise
    dot = [kernels_used[name] for name in ("3", "7")]
    assert dot == (["bitparallel"] * 2 if tier == isa.AVX2 else ["bitserial"] * 2), kernels_used
    features = runtime.load(out).plan["target"]["features"]
    assert not any(f.startswith("avx512") for f in features) and ("avx2" in features) == (tier == isa.AVX2)
    _assert_exact(verify(model, samples=2, artifact=str(out), per_layer=True))


def _mlp_and_avx512_kernels(tmp_path, sizes, n_bits: int, act_bits: int, rows: int, expected: str):
    """A saved two-layer CSQ MLP, after checking that an AVX-512 build (cascadelake: built, not
    run) puts both its layers on ``expected``."""
    torch.manual_seed(sum(sizes))
    net = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
                              torch.nn.Linear(sizes[1], sizes[2])).eval()
    model = csqc.finalize(csqc.convert(net, n_bits=n_bits, act_bits=act_bits, quantize_first_input=True)).eval()
    model = csqc.load(csqc.save(model, tmp_path / "mlp.pt", torch.zeros(rows, sizes[0])))
    vnni = csqc.compile(model, "llvm", tmp_path / "vnni.so", mcpu="cascadelake").report
    assert set(vnni["kernels"].values()) == {expected}, vnni["layers"]
    return model


def test_avx2_keeps_layers_its_dot_product_could_saturate_bit_serial(tmp_path):
    """8-bit codes times int8 weights can pass AVX2's int16 pair sums: such layers run bit-serial
    there (an AVX-512 CPU runs them on VNNI), also when bit-parallel is forced, and verify exactly."""
    model = _mlp_and_avx512_kernels(tmp_path, (64, 48, 10), n_bits=7, act_bits=8, rows=16, expected="bitparallel")
    for force in (None, "bitparallel"):
        out = tmp_path / f"w8a8-{force}.so"
        report = csqc.compile(model, "llvm", out, mcpu=AVX2_CPU, force_kernel=force).report
        layers = report["layers"]
        assert {info["kernel"] for info in layers.values()} == {"bitserial"}, layers
        if force is None:
            assert any("saturate" in info["reason"] for info in layers.values())
        _assert_exact(verify(model, samples=16, artifact=str(out), per_layer=True))


def test_avx2_runs_small_low_bit_layers_on_its_dot_product(tmp_path):
    """One row of 2-bit weights x 4-bit codes: AVX-512 runs it bit-serial (VPOPCNTDQ), AVX2 on its
    int8 dot product (its popcounts are nibble lookups), four output vectors a register tile."""
    model = _mlp_and_avx512_kernels(tmp_path, (256, 64, 16), n_bits=2, act_bits=4, rows=1, expected="bitserial")
    out = tmp_path / "avx2.so"
    avx2 = csqc.compile(model, "llvm", out, mcpu=AVX2_CPU).report
    assert set(avx2["kernels"].values()) == {"bitparallel"}
    assert all("AVX2: int8 dot products" in info["reason"] for info in avx2["layers"].values())
    _assert_exact(verify(model, samples=2, artifact=str(out), per_layer=True))
