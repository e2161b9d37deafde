"""Exactness tests of the LLVM (CPU) kernel library against numpy int64 references."""
import contextlib
import os
import re

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpus import AVX2_CPU, GENERIC_CPU, HOST_TIER, code_limit_of, needs_avx512
from csqc.targets.llvm import isa, kernels, packing, staging
from csqc.targets.tvm.geometry import conv_geometry

RNG = np.random.default_rng(20240611)


# ------------------------------------------------------------------------------------------
# Test-local plane decompositions (the passes own the real ones)
# ------------------------------------------------------------------------------------------
def planes_from_q(q: np.ndarray, bits: int, encoding: str):
    """(planes [P, ...], shifts_signs, zero_point) with planes most significant first.

    posneg: q in [-(2^bits - 1), 2^bits - 1], one +plane and one -plane per bit.
    offset: q in [-2^(bits-1), 2^(bits-1) - 1], q + 2^(bits-1) split into its bits.
    """
    q = np.asarray(q, dtype=np.int64)
    planes, shifts_signs = [], []
    if encoding == "posneg":
        pos, neg = np.maximum(q, 0), np.maximum(-q, 0)
        for bit in reversed(range(bits)):
            planes += [(pos >> bit) & 1, (neg >> bit) & 1]
            shifts_signs += [(bit, 1), (bit, -1)]
        zero_point = 0
    elif encoding == "offset":
        zero_point = 1 << (bits - 1)
        unsigned = q + zero_point
        for bit in reversed(range(bits)):
            planes.append((unsigned >> bit) & 1)
            shifts_signs.append((bit, 1))
    else:
        raise ValueError(encoding)
    return np.stack(planes).astype(np.uint8), shifts_signs, zero_point


def random_q(shape, bits: int, encoding: str) -> np.ndarray:
    if encoding == "posneg":
        return RNG.integers(-(1 << bits) + 1, 1 << bits, shape)
    return RNG.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape)


def dense_reference(x, q):
    return x.astype(np.int64) @ np.asarray(q, dtype=np.int64).T


def conv_reference(x, q, stride, padding, dilation, groups):
    batch, channels, height, width = x.shape
    out_channels, per_group, kh, kw = q.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    padded = np.zeros((batch, channels, height + 2 * ph, width + 2 * pw), np.int64)
    padded[:, :, ph:ph + height, pw:pw + width] = x
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((batch, out_channels, out_h, out_w), np.int64)
    outs_per_group = out_channels // groups
    for o in range(out_channels):
        g = o // outs_per_group
        for r in range(kh):
            for s in range(kw):
                patch = padded[:, g * per_group:(g + 1) * per_group,
                               r * dh:r * dh + sh * (out_h - 1) + 1:sh,
                               s * dw:s * dw + sw * (out_w - 1) + 1:sw]
                y[:, o] += np.einsum("bchw,c->bhw", patch, q[o, :, r, s].astype(np.int64))
    return y


_KERNEL_CACHE = {}


def built(builder, *args, cpu=None, **kwargs):
    """Compile once per distinct kernel configuration within the test session, for CPU ``cpu``
    (None: this machine's), whose tier picks the instructions (``isa.tier``)."""
    key = (builder.__name__, cpu, repr(args), repr(sorted(kwargs.items())))
    if key not in _KERNEL_CACHE:
        target = kernels.cpu_target(cpu)
        with target:
            _KERNEL_CACHE[key] = kernels.build(builder(*args, **kwargs), target)
    return _KERNEL_CACHE[key]


# The int8 dot products of the bit-parallel kernels: AVX-512 VNNI where this machine has it,
# AVX2's everywhere. AVX2 sums two u8 x s8 products in int16 (saturating): its layers take codes
# below 128 with int8 weights (pair sums up to 2 x 127 x 128 = 32512); isa.avx2_dot_exact.
DOT_CPUS = [pytest.param(None, id="avx512", marks=needs_avx512), pytest.param(AVX2_CPU, id="avx2")]


def code_limit(cpu) -> int:
    """One past the largest code the tier's dot product takes with any int8 weight (None: the host's)."""
    return code_limit_of(HOST_TIER if cpu is None else isa.tier(kernels.cpu_target(cpu)))


# ------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n_planes=st.integers(1, 8),
    n=st.integers(1, 40),
    k=st.integers(1, 150),
    lanes=st.sampled_from([4, 8, 16, 32]),
    word_bits=st.sampled_from([8, 16, 32, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_weight_plane_packing_round_trip(n_planes, n, k, lanes, word_bits, seed):
    planes = np.random.default_rng(seed).integers(0, 2, (n_planes, n, k)).astype(np.uint8)
    packed = packing.pack_weight_planes(planes, word_bits=word_bits, lanes=lanes)
    assert packed.shape == (-(-n // lanes), n_planes, packing.words_for(k, word_bits), lanes)
    np.testing.assert_array_equal(packing.unpack_weight_planes(packed, n, k, word_bits), planes)
    # Padding is exact: the packed words hold exactly the set bits of the planes.
    popcounts = sum(bin(int(word)).count("1") for word in packed.ravel())
    assert popcounts == int(planes.sum())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 90), seed=st.integers(0, 2**31 - 1))
def test_bitparallel_packing_round_trip(n, k, seed):
    rng = np.random.default_rng(seed)
    for low, high in ((-128, 128), (-3000, 3000)):
        q = rng.integers(low, high, (n, k))
        packed = packing.pack_bitparallel_weight(q)
        np.testing.assert_array_equal(packing.unpack_bitparallel_weight(packed, n, k), q)


def test_activation_planes_match_codes():
    codes = RNG.integers(0, 32, (3, 70))
    planes = packing.pack_activation_planes(codes, 5)
    bits = packing.unpack_bits_along_k(planes, 70)  # [M, A, K]
    np.testing.assert_array_equal((bits * (1 << np.arange(5))[None, :, None]).sum(1), codes)


@pytest.mark.parametrize("encoding", ["posneg", "offset"])
def test_test_helper_decomposition_is_exact(encoding):
    q = random_q((9, 13), 3, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, 3, encoding)
    np.testing.assert_array_equal(packing.combine_planes(planes, shifts_signs, zero_point), q)


# ------------------------------------------------------------------------------------------
# Bit-serial dense
# ------------------------------------------------------------------------------------------
def run_bitserial_dense(x, planes, shifts_signs, act_bits, zero_point, n_planes=None,
                        acc_dtype="int32", knobs=None):
    m, k = x.shape
    n = planes.shape[1]
    knobs = knobs or kernels.BitserialKnobs()
    kernel = built(kernels.bitserial_dense, m, n, k, shifts_signs, act_bits,
                   zero_point is not None and zero_point != 0, acc_dtype=acc_dtype, knobs=knobs)
    packed = packing.pack_weight_planes(planes, lanes=knobs.lanes)
    used = len(shifts_signs) if n_planes is None else n_planes
    return kernel(x.astype(np.uint8), packed, used, zero_point or 0)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("k", [37, 100])
@pytest.mark.parametrize("encoding,bits", [("posneg", 1), ("posneg", 3), ("offset", 1),
                                           ("offset", 4), ("offset", 8)])
def test_bitserial_dense_encodings(m, k, encoding, bits):
    n, act_bits = 21, 4
    q = random_q((n, k), bits, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, bits, encoding)
    x = RNG.integers(0, 1 << act_bits, (m, k))
    y = run_bitserial_dense(x, planes, shifts_signs, act_bits, zero_point)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, dense_reference(x, q))


@pytest.mark.parametrize("act_bits", range(1, 9))
def test_bitserial_dense_activation_bits(act_bits):
    m, n, k = 5, 32, 100
    q = random_q((n, k), 2, "offset")
    planes, shifts_signs, zero_point = planes_from_q(q, 2, "offset")
    x = RNG.integers(0, 1 << act_bits, (m, k))
    np.testing.assert_array_equal(
        run_bitserial_dense(x, planes, shifts_signs, act_bits, zero_point), dense_reference(x, q))


@pytest.mark.parametrize("n_planes_total", range(1, 9))
def test_bitserial_dense_plane_counts(n_planes_total):
    m, n, k, act_bits = 1, 19, 37, 3
    planes = RNG.integers(0, 2, (n_planes_total, n, k)).astype(np.uint8)
    shifts_signs = [(n_planes_total - 1 - p, 1 if p % 3 else -1) for p in range(n_planes_total)]
    x = RNG.integers(0, 1 << act_bits, (m, k))
    q = packing.combine_planes(planes, shifts_signs)
    np.testing.assert_array_equal(
        run_bitserial_dense(x, planes, shifts_signs, act_bits, None), dense_reference(x, q))


def test_bitserial_dense_non_contiguous_shifts_and_knobs():
    m, n, k, act_bits = 5, 40, 100, 6
    shifts_signs = [(7, 1), (2, -1), (0, 1)]
    planes = RNG.integers(0, 2, (3, n, k)).astype(np.uint8)
    x = RNG.integers(0, 1 << act_bits, (m, k))
    q = packing.combine_planes(planes, shifts_signs, 9)
    for knobs in (kernels.BitserialKnobs(), kernels.BitserialKnobs(lanes=8, word_unroll=3,
                                                                    rows_per_task=2, pack_chunk=2)):
        np.testing.assert_array_equal(
            run_bitserial_dense(x, planes, shifts_signs, act_bits, 9, knobs=knobs), dense_reference(x, q))


@pytest.mark.parametrize("encoding,bits", [("offset", 4), ("posneg", 2)])
def test_bitserial_dense_runtime_plane_count(encoding, bits):
    m, n, k, act_bits = 5, 24, 100, 4
    q = random_q((n, k), bits, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, bits, encoding)
    x = RNG.integers(0, 1 << act_bits, (m, k))
    for used in range(0, len(shifts_signs) + 1):
        truncated = packing.combine_planes(planes, shifts_signs, zero_point, n_planes=used)
        y = run_bitserial_dense(x, planes, shifts_signs, act_bits, zero_point, n_planes=used)
        np.testing.assert_array_equal(y, dense_reference(x, truncated))


def test_bitserial_dense_int64_accumulator():
    m, n, k, act_bits = 2, 16, 300, 8
    shifts_signs = [(15, 1), (14, 1)]
    planes = np.ones((2, n, k), np.uint8)
    x = np.full((m, k), 255)
    y = run_bitserial_dense(x, planes, shifts_signs, act_bits, None, acc_dtype="int64")
    assert y.dtype == np.int64
    expected = dense_reference(x, packing.combine_planes(planes, shifts_signs))
    assert expected.max() > np.iinfo(np.int32).max  # the int32 kernel would overflow here
    np.testing.assert_array_equal(y, expected)


def test_bitserial_assembly_has_popcount():
    kernel = built(kernels.bitserial_dense, 1, 32, 64, [(1, 1), (0, 1)], 4, False)
    assembly = kernel.assembly()
    # one instruction with AVX-512 VPOPCNTDQ, else LLVM's nibble-table popcount (vpshufb): vectors either way
    assert "vpopcnt" in assembly or "vpshufb" in assembly


HAS_VBMI = "avx512vbmi" in open("/proc/cpuinfo").read()
LOOKUP = kernels.BitserialKnobs(table_lookup=True)
needs_vbmi = pytest.mark.skipif(not HAS_VBMI, reason="the table-lookup kernel needs AVX-512 VBMI (vpermb)")


@needs_vbmi
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (1, 21, 37), (3, 40, 300)])
@pytest.mark.parametrize("encoding,bits,act_bits", [("offset", 2, 4), ("posneg", 2, 5), ("offset", 3, 1)])
def test_bitserial_dense_table_lookup(m, n, k, encoding, bits, act_bits):
    # k=300: 10 words, an unrolled part and a tail; n=21/40: a partial last tile; act_bits=5
    # is the widest whose two table entries per byte still fit (2 * 4 * 31 = 248)
    q = random_q((n, k), bits, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, bits, encoding)
    x = np.full((m, k), (1 << act_bits) - 1)
    x[1:] = RNG.integers(0, 1 << act_bits, (m - 1, k))  # row 0 at the largest code
    for used in (len(shifts_signs), 1):
        truncated = packing.combine_planes(planes, shifts_signs, zero_point, n_planes=used)
        y = run_bitserial_dense(x, planes, shifts_signs, act_bits, zero_point, n_planes=used, knobs=LOOKUP)
        np.testing.assert_array_equal(y, dense_reference(x, truncated))


@needs_vbmi
def test_bitserial_dense_table_lookup_assembly_and_fallback():
    lookup = built(kernels.bitserial_dense, 1, 32, 64, [(1, 1), (0, 1)], 4, False, knobs=LOOKUP)
    assert "vpermb" in lookup.assembly() and "vpdpbusd" in lookup.assembly()
    # 6-bit codes would overflow a byte of table sums: the popcount kernel runs instead, exactly
    wide = built(kernels.bitserial_dense, 2, 32, 64, [(1, 1), (0, 1)], 6, False, knobs=LOOKUP)
    assert "vpermb" not in wide.assembly()
    q = random_q((32, 64), 2, "offset") + 2
    planes, shifts_signs, _ = planes_from_q(q - 2, 2, "offset")
    x = RNG.integers(0, 64, (2, 64))
    np.testing.assert_array_equal(
        run_bitserial_dense(x, planes, shifts_signs, 6, None, knobs=LOOKUP), dense_reference(x, q))


@needs_vbmi
def test_table_lookup_tables_are_built_on_the_calling_thread_only_where_they_are_small():
    """One row of 4096 codes (128 words) builds its tables serially, three rows in parallel
    tasks; both builds give the exact product."""
    planes_spec = [(1, 1), (0, 1)]
    with kernels.cpu_target():
        small = kernels.bitserial_dense(1, 32, 4096, planes_spec, 4, False, knobs=LOOKUP).script()
        large = kernels.bitserial_dense(3, 32, 4096, planes_spec, 4, False, knobs=LOOKUP).script()
    assert 4096 // 32 <= kernels._SERIAL_TABLE_WORDS < 3 * 4096 // 32
    assert small.count("T.parallel") == 1 and large.count("T.parallel") == 2  # (the output tiles: parallel)
    q = random_q((32, 4096), 2, "offset")
    planes, shifts_signs, zero_point = planes_from_q(q, 2, "offset")
    x = RNG.integers(0, 16, (3, 4096))
    for rows in (1, 3):
        y = run_bitserial_dense(x[:rows], planes, shifts_signs, 4, zero_point, knobs=LOOKUP)
        np.testing.assert_array_equal(y, dense_reference(x[:rows], q))


# ------------------------------------------------------------------------------------------
# Bit-parallel dense
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", DOT_CPUS)
@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (5, 37, 100), (17, 33, 37)])
def test_bitparallel_dense_int8(m, n, k, cpu):
    q = RNG.integers(-128, 128, (n, k))
    x = RNG.integers(0, code_limit(cpu), (m, k))
    x[0, :2], q[0, :2] = code_limit(cpu) - 1, -128  # the extreme pair sum of the tier
    assert packing.bitparallel_weight_dtype(q) == "int8"
    kernel = built(kernels.bitparallel_dense, m, n, k, "int8",
                   knobs=kernels.BitparallelKnobs(row_block=4, col_vectors=2), cpu=cpu)
    y = kernel(x.astype(np.uint8), packing.pack_bitparallel_weight(q))
    np.testing.assert_array_equal(y, dense_reference(x, q))
    assembly = kernel.assembly()
    if cpu is None:
        assert "vpdpbusd" in assembly
    else:  # 256-bit registers only
        assert "vpmaddubsw" in assembly and "vpmaddwd" in assembly and "zmm" not in assembly


@pytest.mark.parametrize("m,n,k,row_block", [(1, 40, 64, 8), (2, 33, 100, 8), (5, 48, 4 * 255, 4)])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_bitparallel_dense_takes_both_sign_parts_in_one_pass(m, n, k, row_block, cpu):
    """``two_signs``: the sign parts of signed codes in one pass (their OR against weights
    complemented where the code is negative, from the row's negative sum): every negative code
    and the weight ends, a partial row tile and a K that is not whole 16-byte vectors. AVX2 sums
    pairs of products in int16: weights of magnitude up to 63 there (2 x 255 x 64 fits)."""
    low, high = (-128, 127) if cpu is None else (-63, 63)
    q = RNG.integers(low, high + 1, (n, k))
    q[0, :2] = low, high
    signed = RNG.integers(-255, 256, (m, k))
    signed[m - 1, :255] = -np.arange(1, 256)[:k]
    pos, neg = np.maximum(signed, 0).astype(np.uint8), np.maximum(-signed, 0).astype(np.uint8)
    kernel = built(kernels.bitparallel_dense, m, n, k, "int8", cpu=cpu,
                   knobs=kernels.BitparallelKnobs(row_block=row_block, col_vectors=2), two_signs=True)
    np.testing.assert_array_equal(kernel(pos, neg, packing.pack_bitparallel_weight(q)), dense_reference(signed, q))
    with kernels.cpu_target(GENERIC_CPU), pytest.raises(ValueError, match="int8 dot product"):
        kernels.bitparallel_dense(m, n, k, "int8", two_signs=True)
    with pytest.raises(ValueError, match="K % 4"):
        kernels.bitparallel_dense(m, n, 6, "int8", two_signs=True)


def test_bitparallel_dense_from_planes_and_int16():
    m, n, k, act_bits = 5, 20, 100, 8
    q = random_q((n, k), 8, "posneg")  # |q| <= 255 needs int16
    planes, shifts_signs, zero_point = planes_from_q(q, 8, "posneg")
    combined = packing.combine_planes(planes, shifts_signs, zero_point)
    assert packing.bitparallel_weight_dtype(combined) == "int16"
    x = RNG.integers(0, 1 << act_bits, (m, k))
    kernel = built(kernels.bitparallel_dense, m, n, k, "int16")
    y = kernel(x.astype(np.uint8), packing.pack_bitparallel_weight(combined))
    np.testing.assert_array_equal(y, dense_reference(x, q))


# ------------------------------------------------------------------------------------------
# Nibble-packed dense (4- and 5-bit weights)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", [None, "cascadelake"])  # this CPU's (GFNI where it has it), and without GFNI
@pytest.mark.parametrize("m,n,k,weights,two_signs", [
    (1, 48, 96, "posneg", True),     # CSQ 4-bit weights in [-15, 15]: a fifth bit worth -16
    (1, 80, 64, "posneg", True),     # one row, 3-vector tiles: a last tile of 2 vectors
    (1, 32, 64, "posneg", False),
    (3, 16, 32, "unsigned", True),   # [0, 15]: nibbles only
    (5, 32, 288, "posneg", True),    # a 4-row tile and a row alone; every negative code
    (9, 32, 64, "wide", False),      # [0, 31]: a fifth bit worth +16
])
@needs_avx512
def test_nibble_dense_signed_and_unsigned_codes(m, n, k, weights, two_signs, cpu):
    from csqc.artifact import nibble_high_for_range, pack_nibble_weight

    lo, hi = {"posneg": (-15, 15), "unsigned": (0, 15), "wide": (0, 31)}[weights]
    q = RNG.integers(lo, hi + 1, (n, k))
    q[0, :2] = lo, hi  # both ends present
    high = nibble_high_for_range(lo, hi)
    assert high == {"posneg": -16, "unsigned": 0, "wide": 16}[weights]
    if two_signs:  # sign parts of signed codes in [-255, 255]: at each position one of them is 0
        signed = RNG.integers(-255, 256, (m, k))
        signed[0, :2] = -255, 255
        if k >= 256:
            signed[m - 1, :255] = -np.arange(1, 256)  # every negative code
        xs = [np.maximum(signed, 0), np.maximum(-signed, 0)]
    else:
        xs = [RNG.integers(0, 256, (m, k))]
    kernel = built(kernels.nibble_dense, m, n, k, high, two_signs, cpu=cpu)
    y = kernel(*[x.astype(np.uint8) for x in xs], pack_nibble_weight(q, high))
    want = dense_reference(xs[0], q) - (dense_reference(xs[1], q) if two_signs else 0)
    np.testing.assert_array_equal(y, want)


def test_nibble_fifth_bits_spread_by_one_affine_product_where_the_cpu_has_gfni():
    """``bit_spread(high, j)``, as ``vgf2p8affineqb`` applies it (output bit i: the parity of the
    matrix's byte 7 - i and the input byte), maps every byte to ``high``'s bits when its bit j is
    set, else to 0; the kernel takes that path on a GFNI CPU only (Cascade Lake has none)."""
    from csqc.targets.llvm.nibble import bit_spread

    data = np.arange(256)
    for high in (-16, 16):
        for j in range(8):
            matrix = bit_spread(high, j)
            rows = [(matrix >> 8 * (7 - i)) & 0xFF for i in range(8)]
            out = sum((np.array([bin(int(b) & row).count("1") & 1 for b in data]) << i) for i, row in enumerate(rows))
            np.testing.assert_array_equal(out, np.where(data >> j & 1, high & 0xFF, 0))
    for cpu, gfni in (("icelake-server", True), ("cascadelake", False)):
        with kernels.cpu_target(cpu):
            script = kernels.nibble_dense(1, 32, 64, -16).script()
        assert ("vgf2p8affineqb" in script) == gfni, cpu


@pytest.mark.parametrize("cpu", ["znver4", "sapphirerapids"])
def test_nibble_gemv_keeps_its_tile_in_registers(cpu):
    """At one row no layout spills vector registers in the task's loop: spilled zmm registers went
    to stack slots the task does not align, so their cost depended on the calling thread's stack
    alignment, process by process (four column vectors with a fifth bit and sign parts spilled 20)."""
    for high in (0, -16, 16):
        for two_signs in (False, True):
            with kernels.cpu_target(cpu):
                assembly = kernels.build(kernels.nibble_dense(1, 256, 256, high, two_signs)).assembly()
            task = assembly[assembly.index("__tvm_parallel_lambda:"):]
            task = task[:task.index(".Lfunc_end")]
            spills = [line for line in task.splitlines() if "zmm" in line and "(%rsp)" in line]
            assert not spills, (cpu, high, two_signs, spills[:3])


@pytest.mark.parametrize("encoding", ["posneg", "offset"])
@needs_avx512
def test_nibble_dense_every_plane_setting(encoding):
    """The runtime recombines the kept planes (skip_planes) into the same layout: every prefix
    of the planes fits the layout chosen from prefix_weight_range and multiplies exactly."""
    from csqc.artifact import nibble_high_for_range, pack_nibble_weight, prefix_weight_range

    m, n, k = 1, 32, 64
    q = random_q((n, k), 4, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, 4, encoding)
    high = nibble_high_for_range(*prefix_weight_range(planes, shifts_signs, zero_point))
    assert high == -16
    x = RNG.integers(0, 256, (m, k))
    kernel = built(kernels.nibble_dense, m, n, k, high, False)
    for kept in range(1, len(shifts_signs) + 1):
        q_kept = packing.combine_planes(planes, shifts_signs, zero_point, kept)
        y = kernel(x.astype(np.uint8), pack_nibble_weight(q_kept, high))
        np.testing.assert_array_equal(y, dense_reference(x, q_kept))


def test_nibble_layout_refuses_what_it_cannot_hold():
    from csqc.artifact import nibble_high_for_range, pack_nibble_weight

    assert nibble_high_for_range(-15, 16) is None  # 32 values, but across both layouts' ends
    assert nibble_high_for_range(-8, 7) == -16
    with pytest.raises(ValueError, match="outside the nibble layout"):
        pack_nibble_weight(np.full((16, 32), 16), -16)
    with pytest.raises(ValueError, match="K % 32"):
        pack_nibble_weight(np.zeros((16, 40), np.int64), 0)
    with pytest.raises(ValueError, match="K % 32"):
        kernels.nibble_dense(1, 16, 40, 0)


# ------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------
CONV_CASES = [
    # input shape, weight shape, stride, padding, dilation, groups
    ((2, 4, 9, 11), (6, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 4, 10, 10), (8, 2, 3, 3), (1, 1), (1, 1), (2, 2), 2),
    ((1, 6, 8, 8), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 6),       # depthwise
    ((1, 4, 7, 7), (8, 1, 3, 3), (1, 1), (2, 2), (2, 2), 4),       # depthwise, multiplier 2
    ((1, 3, 7, 9), (20, 3, 2, 2), (1, 2), (0, 1), (1, 1), 1),
    ((1, 6, 9, 8), (24, 6, 1, 1), (2, 2), (0, 0), (1, 1), 1),      # 1x1 strided, Cg % 4 != 0
    ((2, 5, 9, 7), (7, 5, 3, 3), (3, 3), (1, 1), (1, 1), 1),       # stride 3: fallback kernel
    ((1, 3, 11, 10), (3, 1, 3, 3), (3, 2), (1, 1), (1, 1), 3),     # depthwise fallback
    # stride-2 depthwise of even widths reads 16-bit pairs of codes: input column 2j + d, d from -2 to 1
    ((1, 4, 9, 12), (4, 1, 3, 3), (2, 2), (0, 0), (1, 1), 4),      # d = 0, 1
    ((2, 3, 10, 14), (6, 1, 3, 3), (2, 2), (2, 2), (2, 2), 3),     # d = -2, multiplier 2, batch 2
    ((1, 4, 9, 11), (4, 1, 3, 3), (2, 2), (1, 1), (1, 1), 4),      # odd width: byte by byte
    # one input column and stride 2: one column phase holds no input column (padding only)
    ((1, 4, 9, 1), (8, 1, 3, 3), (2, 2), (2, 2), (1, 1), 4),       # depthwise, multiplier 2
    ((1, 4, 7, 1), (6, 4, 3, 3), (2, 2), (2, 2), (1, 1), 1),
    ((1, 2, 15, 3), (4, 2, 5, 5), (2, 2), (1, 1), (1, 1), 1),       # an output one column wide
    ((1, 3, 1, 6), (5, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1),       # one input row
]


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("encoding", ["offset", "posneg"])
def test_bitserial_conv2d(input_shape, weight_shape, stride, padding, dilation, groups, encoding):
    act_bits, bits = 3, 2
    q = random_q(weight_shape, bits, encoding)
    planes, shifts_signs, zero_point = planes_from_q(q, bits, encoding)
    x = RNG.integers(0, 1 << act_bits, input_shape)
    kernel = built(kernels.bitserial_conv2d, input_shape, weight_shape, shifts_signs, act_bits,
                   zero_point != 0, stride, padding, dilation, groups)
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    if geometry.is_depthwise:
        packed = packing.pack_depthwise_weight_planes(planes)
    else:
        packed = packing.pack_conv_weight_planes(planes, groups)
    for used in (len(shifts_signs), 1):
        expected = conv_reference(x, packing.combine_planes(planes, shifts_signs, zero_point, used),
                                  stride, padding, dilation, groups)
        np.testing.assert_array_equal(kernel(x.astype(np.uint8), packed, used, zero_point), expected)


@contextlib.contextmanager
def shared_staging():
    """Build the pixel conv with one staging for all its tasks (as inputs of MIN_PARALLEL_STAGING
    codes and more are), not each task staging its own rows (as smaller ones are)."""
    saved = staging.MIN_PARALLEL_STAGING
    staging.MIN_PARALLEL_STAGING = 0
    try:
        yield
    finally:
        staging.MIN_PARALLEL_STAGING = saved


@pytest.mark.parametrize("cpu", DOT_CPUS)
@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("staged", ["by each task", "shared"])
def test_bitparallel_conv2d(input_shape, weight_shape, stride, padding, dilation, groups, cpu, staged):
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    with shared_staging() if staged == "shared" else contextlib.nullcontext():
        kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding,
                       dilation, groups, cpu=cpu)
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, dilation, groups)
    if geometry.is_depthwise:
        packed = q.reshape(weight_shape[0], -1).astype(np.int32)
    else:
        packed = packing.pack_bitparallel_conv_weight(q, groups)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packed),
                                  conv_reference(x, q, stride, padding, dilation, groups))


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,dilation,groups,pad_code", [
    ((1, 16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, 0),   # ResNet-20's layer1: row blocks
    ((1, 16, 32, 32), (32, 16, 3, 3), (2, 2), (1, 1), (1, 1), 1, 0),   # one row block by default: halved
    ((2, 12, 10, 14), (16, 6, 3, 3), (1, 1), (2, 2), (2, 2), 2, 7),    # batch 2, groups, dilation, filled padding
    ((1, 64, 8, 8), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1, 15),    # packed rows, one row block
    ((1, 160, 7, 7), (96, 160, 1, 1), (1, 1), (0, 0), (1, 1), 1, 0),   # flat domain: two channel-block tasks
    ((1, 8, 9, 11), (20, 8, 3, 3), (2, 2), (1, 1), (1, 1), 1, 3),      # odd sizes, stride 2, filled padding
])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_small_conv_tasks_stage_their_own_rows(input_shape, weight_shape, stride, padding, dilation, groups,
                                               pad_code, cpu, monkeypatch):
    """Below MIN_PARALLEL_STAGING input codes each task stages the rows it reads on its stack
    (staging.task_rows_staging): its words stay in its core's cache. The same outputs as one
    staging, padding filled with the code of zero as there."""
    rows = []
    real = kernels.task_rows_staging
    monkeypatch.setattr(kernels, "task_rows_staging", lambda geo, n, fill=0: rows.append(n) or real(geo, n, fill))
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, dilation, groups,
                   cpu=cpu, pad_code=pad_code)
    assert rows, "the tasks did not stage their own rows"
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=pad_code)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, groups)),
                                  conv_reference(padded, q, stride, (0, 0), dilation, groups))


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,dilation,groups,parallel_loops", [
    ((1, 16, 48, 48), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, 2),  # 36864 codes: staged by the pool
    ((1, 8, 72, 72), (8, 8, 3, 3), (3, 3), (1, 1), (1, 1), 1, 2),     # the same, channels-on-lanes kernel
    ((1, 16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, 1),  # ResNet-20's layer1: staged serially
])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_bitparallel_conv2d_stages_small_inputs_on_the_calling_thread(input_shape, weight_shape, stride, padding,
                                                                       dilation, groups, parallel_loops, cpu):
    """Below MIN_PARALLEL_STAGING input codes each task stages the rows it reads (one fork-join
    per call instead of two); above it, one staging for all, in parallel. Exact either way."""
    with kernels.cpu_target(cpu):
        prim = kernels.bitparallel_conv2d(input_shape, weight_shape, stride, padding, dilation, groups)
    assert prim.script().count("T.parallel") == parallel_loops
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, dilation, groups,
                   cpu=cpu)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, groups)),
                                  conv_reference(x, q, stride, padding, dilation, groups))


@pytest.mark.parametrize("input_shape,weight_shape,groups", [
    ((2, 6, 37, 41), (20, 6, 1, 1), 1),    # 1517-pixel planes: two runs, the last overlapping; channels 4-5 partial
    ((1, 12, 64, 64), (8, 6, 1, 1), 2),    # four whole runs a plane; two groups of 6 channels
    ((1, 9, 3, 5), (16, 9, 1, 1), 1),      # a plane shorter than one vector
])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_pointwise_conv_stages_flat_runs_of_its_planes(input_shape, weight_shape, groups, cpu, monkeypatch):
    """An unstrided, unpadded conv stages each plane as runs of words over its flattened pixels
    (staging._flat_staging), not row by row: every word as the row staging wrote it, so exact.
    (Staged in parallel here: below MIN_PARALLEL_STAGING each task stages its own rows.)"""
    monkeypatch.setattr(staging, "MIN_PARALLEL_STAGING", 0)
    flat, staged = staging._flat_staging, []
    monkeypatch.setattr(staging, "_flat_staging", lambda geo, rows: staged.append(rows) or flat(geo, rows))
    pixels = kernels.BitparallelKnobs(conv_form="pixels")  # (a 15-position plane would put channels on the lanes)
    with kernels.cpu_target(cpu):
        kernels.bitparallel_conv2d(input_shape, weight_shape, 1, 0, 1, groups, pixels)
    assert len(staged) == 1 and staged[0] >= input_shape[2]  # rows past the input's are zero rows
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, 1, 0, 1, groups, pixels, cpu=cpu)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, groups)),
                                  conv_reference(x, q, (1, 1), (0, 0), (1, 1), groups))


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,dilation,groups",
                         [c for c in CONV_CASES if c[1][1] == 1 and max(c[2]) <= 2] + [
                             ((1, 5, 20, 70), (5, 1, 3, 3), (1, 1), (1, 1), (1, 1), 5),  # rows of 2 pieces
                             ((1, 2, 260, 300), (2, 1, 3, 3), (1, 1), (1, 1), (1, 1), 2)])  # staging off the stack
@pytest.mark.parametrize("out_dtype", ["int32", "int16"])
@pytest.mark.parametrize("tap_pairs", [False, pytest.param(True, marks=needs_vbmi)])
def test_bitparallel_depthwise_int16(input_shape, weight_shape, stride, padding, dilation, groups, out_dtype,
                                     tap_pairs):
    """int16 accumulation, at the edges of its range: 9 taps x |q| <= 96 x codes <= 15 fill
    [-12960, 12960], and every partial sum stays within int16; stored widened or as int16.
    Each task stages its channel on its stack, or in a shared buffer when the plane is larger.
    Tap pairs (two taps a vpmaddubsw) too, on every shape: their 64-code loads run past the rows."""
    if input_shape[2] == 260:
        assert 262 * kernels._staging_pitch(302) > kernels._TASK_STAGING_BYTES
    q = RNG.integers(-96, 97, weight_shape)
    q.reshape(weight_shape[0], -1)[0] = 96  # one channel at the largest positive sum
    x = RNG.integers(0, 16, input_shape)
    x[..., :4, :] = 15
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, dilation, groups,
                   None, True, out_dtype=out_dtype, tap_pairs=tap_pairs)
    y = kernel(x.astype(np.uint8), q.reshape(weight_shape[0], -1).astype(np.int32))
    assert y.dtype == out_dtype
    np.testing.assert_array_equal(y, conv_reference(x, q, stride, padding, dilation, groups))


@needs_vbmi
@pytest.mark.parametrize("input_shape,weight_shape,stride", [
    ((1, 3, 30, 64), (3, 1, 3, 3), 1),   # 64 columns: two pair halves, no tail
    ((2, 4, 29, 57), (8, 1, 3, 3), 2),   # batch 2, two outputs a channel, odd columns: 29 a row
    ((1, 2, 12, 140), (2, 1, 3, 5), 1),  # 3 x 5 taps (an odd count: the last pair's high weight is 0), 3 pieces
    ((1, 3, 9, 40), (3, 1, 3, 3), 1),    # 64-byte rows: one row a pair step, 40 of its 64 lanes
    ((1, 5, 13, 13), (5, 1, 3, 3), 1),   # 16-byte rows: four rows a pair step, the last step one row
])
def test_depthwise_tap_pairs_read_codes_as_unsigned_bytes(input_shape, weight_shape, stride):
    """Codes up to 255 (offset and 8-bit codes) and int8 weights at both ends: vpmaddubsw reads
    the codes unsigned and the weights signed, each pair sum within int16."""
    q = RNG.integers(-7, 8, weight_shape)
    q.reshape(weight_shape[0], -1)[0, :2] = (-128, 127)  # one pair at the ends of int8 ...
    x = RNG.integers(0, 256, input_shape)
    x[:, 0] %= 16  # ... on codes small enough to keep every sum in int16
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, 1, 1, input_shape[1],
                   None, True, out_dtype="int16", tap_pairs=True)
    expected = conv_reference(x, q, (stride, stride), (1, 1), (1, 1), input_shape[1])
    assert np.abs(expected).max() < 2**15 and x.max() == 255
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), q.reshape(weight_shape[0], -1).astype(np.int32)),
                                  expected)


def test_depthwise_tap_pairs_pay_at_stride_1_and_on_wide_rows():
    assert kernels.depthwise_tap_pairs_pay(conv_geometry((1, 32, 112, 112), (32, 1, 3, 3), 1, 1, 1, 32))
    assert kernels.depthwise_tap_pairs_pay(conv_geometry((1, 96, 56, 56), (96, 1, 3, 3), 2, 1, 1, 96))
    assert kernels.depthwise_tap_pairs_pay(conv_geometry((1, 960, 7, 7), (960, 1, 3, 3), 1, 1, 1, 960))
    assert not kernels.depthwise_tap_pairs_pay(conv_geometry((1, 576, 14, 14), (576, 1, 3, 3), 2, 1, 1, 576))
    assert not kernels.depthwise_tap_pairs_pay(conv_geometry((1, 8, 99, 99), (8, 1, 3, 3), 3, 1, 1, 8))  # stride 3
    with pytest.raises(ValueError, match="tap pairs accumulate in int16"):
        kernels.bitparallel_conv2d((1, 8, 32, 32), (8, 1, 3, 3), 1, 1, 1, 8, tap_pairs=True)


DIRECT_STORE_CASES = [
    # convs whose register tiles go straight to the output (kernels._direct_rows):
    # input shape, weight shape, stride, padding, groups, knobs; first one-column convs (Wq == OW)
    ((2, 8, 12, 20), (24, 8, 1, 1), (1, 1), (0, 0), 1, None),  # batch 2, tasks of 8 rows: the last one half past OH
    ((2, 8, 12, 20), (20, 8, 1, 1), (1, 1), (0, 0), 1,         # 4 channels of a second block
     kernels.BitparallelKnobs(conv_channels=16, conv_vectors=1, conv_rows=4)),
    ((1, 12, 16, 24), (10, 12, 1, 1), (2, 2), (0, 0), 1, None),  # strided
    ((1, 8, 16, 16), (16, 8, 1, 1), (1, 1), (0, 1), 1, None),  # column padding: the padded columns are outputs
    ((1, 8, 8, 8), (16, 4, 1, 1), (1, 1), (0, 0), 2, None),    # groups
    ((1, 6, 9, 16), (24, 6, 1, 1), (1, 1), (0, 0), 1, kernels.BitparallelKnobs(conv_channels=8, conv_vectors=2,
                                                                                  conv_rows=4)),
    # rows of whole vectors (OW % 16 == 0): the vectors skip the columns no output has
    ((1, 8, 16, 16), (16, 8, 3, 3), (1, 1), (1, 1), 1, None),
    ((2, 12, 11, 32), (20, 12, 3, 3), (1, 1), (1, 1), 1, None),  # two vectors a row, last task partial
    ((1, 8, 33, 32), (16, 8, 3, 3), (2, 2), (1, 1), 1, None),  # strided: 17 x 16 outputs
    ((1, 8, 12, 32), (16, 8, 3, 5), (1, 1), (2, 2), 1, None),  # 5 columns: Wq = 36, OW = 32
    ((1, 8, 10, 32), (24, 8, 3, 3), (1, 1), (1, 1), 1, kernels.BitparallelKnobs(conv_channels=8, conv_vectors=2,
                                                                                  conv_rows=3)),
]


@pytest.mark.parametrize("cpu", DOT_CPUS)
@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,groups,knobs", DIRECT_STORE_CASES)
def test_bitparallel_conv2d_direct_stores(input_shape, weight_shape, stride, padding, groups, knobs, cpu):
    check_pixel_conv(input_shape, weight_shape, stride, padding, groups, knobs, direct=True, cpu=cpu)


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,knobs", [
    ((1, 8, 14, 14), (16, 8, 1, 1), (1, 1), (0, 0), None),     # 196 outputs: a vector would cross the end
    ((1, 8, 14, 14), (16, 8, 3, 3), (1, 1), (1, 1), None),     # padded columns (Wq > OW), rows of 14
    ((1, 8, 16, 20), (16, 8, 1, 2), (1, 1), (0, 0), None),     # two columns: Wq > OW, rows of 19
    ((1, 8, 16, 16), (16, 8, 1, 1), (1, 1), (0, 0), kernels.BitparallelKnobs(conv_vectors=2, conv_rows=3)),
    ((1, 8, 23, 23), (16, 8, 3, 3), (1, 1), (1, 1), None),     # tasks of 12 rows: the last one past OH
    ((2, 8, 37, 37), (24, 8, 3, 3), (1, 1), (1, 1), None),     # batch 2, 12-channel tiles, 19-row tasks
])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_bitparallel_conv2d_stages_tiles_where_direct_stores_cannot_go(input_shape, weight_shape, stride, padding,
                                                                        knobs, cpu):
    check_pixel_conv(input_shape, weight_shape, stride, padding, 1, knobs, direct=False, cpu=cpu)


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,tile", [
    ((1, 64, 56, 56), (64, 64, 3, 3), 1, 1, (8, 2)),     # ResNet-18's layer1: long reduction, big plane
    ((1, 512, 7, 7), (512, 512, 3, 3), 1, 1, (8, 2)),    # 63 positions: 64 either way, so two vectors
    ((1, 960, 7, 7), (320, 960, 1, 1), 1, 0, (8, 2)),
    ((1, 32, 28, 28), (192, 32, 1, 1), 1, 0, (16, 1)),   # a reduction of 32: the longer tile's stores lose
    ((1, 64, 8, 8), (64, 64, 3, 3), 1, 1, (8, 2)),       # packed rows: 64 positions, whole 32-wide tiles
    ((1, 64, 7, 8), (64, 64, 3, 3), 1, 1, (16, 1)),      # 7 rows do not pack: 70 positions, 96 against 80
    ((1, 16, 32, 32), (24, 16, 3, 3), 1, 1, (12, 2)),    # 24 channels: the 12-channel tile as before
])
def test_avx512_conv_tiles_load_fewer_words_where_that_pays(input_shape, weight_shape, stride, padding, tile):
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, 1)
    with kernels.cpu_target("cascadelake"):
        plan = kernels._conv_pixel_plan(geometry, kernels.BitparallelKnobs())
    assert (plan.channels, plan.vectors) == tile
    with kernels.cpu_target(AVX2_CPU):  # (AVX2's register file keeps its own tiles)
        assert kernels._conv_pixel_plan(geometry, kernels.BitparallelKnobs()).channels <= 6


@pytest.mark.parametrize("input_shape,weight_shape,stride", [
    ((1, 64, 56, 56), (64, 64, 3, 3), 1),     # ResNet-18's stages: tasks of about 256 positions computed
    ((1, 128, 28, 28), (128, 128, 3, 3), 1),  # 14-18% more than the flat domain (partial tiles, and a last
    ((1, 64, 56, 56), (128, 64, 3, 3), 2),    # row task as long as the others)
    ((1, 256, 14, 14), (256, 256, 3, 3), 1),
    ((1, 512, 7, 7), (512, 512, 3, 3), 1),
])
def test_staged_conv_tasks_compute_little_beyond_the_plane(input_shape, weight_shape, stride):
    geometry = conv_geometry(input_shape, weight_shape, stride, 1, 1, 1)
    with kernels.cpu_target("cascadelake"):
        plan = kernels._conv_pixel_plan(geometry, kernels.BitparallelKnobs())
    assert not plan.direct and not plan.packed
    wq = -(-geometry.padded_w // geometry.stride[1])
    row_tasks = -(-geometry.out_h // plan.rows)
    computed = row_tasks * plan.chunks * plan.vectors * 16
    assert computed >= geometry.out_h * wq and plan.chunks * plan.vectors * 16 >= plan.rows * wq
    assert computed <= 1.05 * max(geometry.out_h * wq, 64)  # (7x7: 63 positions, two 32-wide tiles)
    assert row_tasks * -(-geometry.out_channels // plan.channels) >= 4  # work for the thread pool
    assert plan.rows * wq <= 1024 or plan.rows == 1


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,channels", [
    ((1, 256, 7, 7), (24, 256, 3, 3), (1, 1), (1, 1), True),    # K 2304 on 49 positions: channels on the lanes
    ((2, 256, 14, 14), (16, 256, 3, 3), (2, 2), (1, 1), True),  # batch 2, strided: 2 x 49 positions
    ((1, 2048, 7, 7), (20, 2048, 1, 1), (1, 1), (0, 0), True),  # a 1x1 of a long reduction, a partial vector
    ((1, 512, 7, 7), (32, 512, 1, 1), (1, 1), (0, 0), False),   # K 512: the pixel kernel
    ((1, 256, 8, 8), (16, 256, 3, 3), (1, 1), (1, 1), False),   # 64 positions: no waste to save
])
def test_long_reductions_on_seven_position_planes_put_channels_on_lanes(input_shape, weight_shape, stride, padding,
                                                                         channels):
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, 1)
    with kernels.cpu_target("cascadelake"):
        assert kernels.channels_on_lanes_pay(geometry) == channels
    with kernels.cpu_target(AVX2_CPU):
        assert not kernels.channels_on_lanes_pay(geometry)  # (AVX2 keeps the pixel kernel)
    x = RNG.integers(0, code_limit(None), input_shape)
    q = RNG.integers(-8, 8, weight_shape)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, 1, 1, None)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, 1)),
                                  conv_reference(x, q, stride, padding, (1, 1), 1))


@pytest.mark.parametrize("input_shape,weight_shape,padding,row_block", [
    ((1, 64, 2, 2), (48, 64, 3, 3), 1, 4),    # VGG's last stage: 4 positions of the pixel kernel's 16
    ((2, 32, 2, 2), (40, 32, 3, 3), 1, 4),    # batch 2: two tiles of 4 rows
    ((1, 24, 1, 1), (96, 24, 1, 1), 0, 1),    # a squeeze-excitation's 1x1 conv on a 1x1 plane
    ((1, 16, 3, 3), (20, 16, 3, 3), 1, 3),    # 9 positions: rows of 3
    ((1, 8, 5, 5), (16, 8, 3, 3), 1, 5),      # 25 of 48 computed
    ((1, 16, 4, 4), (16, 16, 3, 3), 1, 0),    # 4x4 packs whole rows: the pixel kernel
    ((1, 64, 5, 5), (64, 64, 1, 1), 0, 0),    # 25 of 32: the pixel kernel
    ((1, 16, 7, 7), (16, 16, 3, 3), 1, 0),
])
def test_small_planes_put_channels_on_lanes(input_shape, weight_shape, padding, row_block):
    geometry = conv_geometry(input_shape, weight_shape, (1, 1), (padding, padding), 1, 1)
    with kernels.cpu_target("cascadelake"):
        assert kernels.small_plane_row_block(geometry) == row_block
    with kernels.cpu_target(AVX2_CPU):
        assert kernels.small_plane_row_block(geometry) == 0  # (AVX2 keeps the pixel kernel)
    x = RNG.integers(0, code_limit(None), input_shape)
    q = RNG.integers(-8, 8, weight_shape)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, (1, 1), padding, 1, 1, None)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, 1)),
                                  conv_reference(x, q, (1, 1), (padding, padding), (1, 1), 1))


PACKED_ROW_CASES = [
    # narrow outputs whose vectors join output rows (kernels._packed_rows): input shape, weight
    # shape, stride, padding, knobs
    ((1, 64, 8, 8), (64, 64, 3, 3), (1, 1), (1, 1), None),       # ResNet-20's last stage: 2 rows a vector
    ((2, 16, 8, 8), (24, 16, 3, 3), (1, 1), (1, 1), None),       # batch 2; 24 channels: a partial block
    ((1, 16, 16, 16), (32, 16, 3, 3), (2, 2), (1, 1), None),     # strided: rows of the stride phases
    ((1, 8, 4, 4), (16, 8, 3, 3), (1, 1), (1, 1), None),         # 4 columns: 4 rows a vector
    ((1, 8, 8, 8), (16, 8, 1, 3), (1, 1), (0, 1), None),         # padded columns only
    ((1, 8, 16, 8), (16, 8, 3, 3), (1, 1), (1, 1), kernels.BitparallelKnobs(conv_channels=8, conv_vectors=2,
                                                                              conv_rows=4)),  # 4 row tasks
]


@pytest.mark.parametrize("cpu", DOT_CPUS)
@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,knobs", PACKED_ROW_CASES)
def test_bitparallel_conv2d_packs_narrow_rows_exactly(input_shape, weight_shape, stride, padding, knobs, cpu):
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, 1)
    with kernels.cpu_target(cpu):
        plan = kernels._conv_pixel_plan(geometry, knobs or kernels.BitparallelKnobs())
    assert plan.packed and plan.direct
    assert plan.chunks * plan.vectors * 16 == plan.rows * geometry.out_w  # every position an output
    check_pixel_conv(input_shape, weight_shape, stride, padding, 1, knobs, direct=True, cpu=cpu)
    x = RNG.integers(0, code_limit(cpu), input_shape)  # and narrowed to int16 on the same path
    q, expected = _within_int16(x, RNG.integers(-128, 128, weight_shape), stride, padding, 1)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, 1, 1, knobs,
                   out_dtype="int16", cpu=cpu)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, 1)), expected)


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding", [
    ((1, 8, 7, 8), (16, 8, 3, 3), (1, 1), (1, 1)),    # 7 rows: a vector would cross the plane's end
    ((1, 8, 12, 12), (16, 8, 3, 3), (1, 1), (1, 1)),  # 12 columns: 16 is not whole rows
    ((1, 8, 8, 8), (16, 8, 1, 1), (1, 1), (0, 0)),    # no padded columns: flat already
])
def test_bitparallel_conv2d_packs_only_whole_rows_of_padded_planes(input_shape, weight_shape, stride, padding):
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, 1)
    assert not kernels._conv_pixel_plan(geometry, kernels.BitparallelKnobs()).packed


@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_two_vector_tiles_on_a_plane_under_64_positions_are_exact(cpu):
    # 7 x 9 positions, tiles of 32 (the default kept two vectors below the 64 the heuristic used to need)
    check_pixel_conv((1, 64, 7, 7), (32, 64, 3, 3), (1, 1), (1, 1), 1, None, direct=False, cpu=cpu)


def _within_int16(x, q, stride, padding, groups):
    """``q`` scaled down until every conv output fits int16, with some beyond +-2^14 (so the
    narrowing store must keep the high bits and the sign)."""
    while True:
        y = conv_reference(x, q, stride, padding, (1, 1), groups)
        if np.abs(y).max() < 2**15:
            assert np.abs(y).max() >= 2**14, "the case cannot reach the top of int16"
            return q, y
        q = np.trunc(q * 0.9).astype(np.int64)


@pytest.mark.parametrize("input_shape,weight_shape,stride,padding,groups,path", [
    ((1, 16, 32, 32), (24, 16, 1, 1), (1, 1), (0, 0), 1, "direct"),
    ((2, 8, 16, 16), (20, 8, 3, 3), (1, 1), (1, 1), 1, "direct"),
    ((1, 8, 14, 14), (16, 8, 3, 3), (2, 2), (1, 1), 1, "tile"),     # staged tiles, strided
    ((1, 8, 8, 8), (16, 4, 1, 1), (1, 1), (0, 0), 2, "direct"),     # groups
    ((1, 16, 7, 7), (64, 16, 3, 3), (1, 1), (1, 1), 1, "tile"),      # 7x7 planes: pixels on the lanes too
    ((1, 16, 7, 7), (64, 16, 3, 3), (1, 1), (1, 1), 1, "channels"),  # channels on the lanes, when asked
])
@pytest.mark.parametrize("cpu", DOT_CPUS)
def test_bitparallel_conv2d_narrows_to_int16_outputs_exactly(input_shape, weight_shape, stride, padding, groups,
                                                             path, cpu):
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, groups)
    knobs = kernels.BitparallelKnobs(conv_form="channels" if path == "channels" else "")
    with kernels.cpu_target(cpu):
        if path != "channels":
            assert kernels._conv_pixel_plan(geometry, knobs).direct == (path == "direct")
    x = RNG.integers(0, code_limit(cpu), input_shape)
    q, expected = _within_int16(x, RNG.integers(-128, 128, weight_shape), stride, padding, groups)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, 1, groups, knobs,
                   out_dtype="int16", cpu=cpu)
    y = kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, groups))
    assert y.dtype == np.int16
    np.testing.assert_array_equal(y, expected)


def test_depthwise_convs_write_int16_only_where_they_accumulate_in_int16():
    with pytest.raises(ValueError, match="depthwise convs write int16 outputs only"):
        kernels.bitparallel_conv2d((1, 8, 8, 8), (8, 1, 3, 3), 1, 1, 1, 8, out_dtype="int16")
    with pytest.raises(ValueError, match="depthwise convs write int16 outputs only"):  # stride 3: no fused kernel
        kernels.bitparallel_conv2d((1, 8, 9, 9), (8, 1, 3, 3), 3, 1, 1, 8, int16_depthwise=True, out_dtype="int16")
    with pytest.raises(ValueError, match="out_dtype must be int32 or int16"):
        kernels.bitparallel_conv2d((1, 8, 8, 8), (8, 8, 1, 1), out_dtype="int8")


def check_pixel_conv(input_shape, weight_shape, stride, padding, groups, knobs, direct: bool, cpu):
    """The plan stores directly (or not) as ``direct`` says, and the conv is exact either way. (The
    cases were chosen for AVX-512's register tiles; AVX2's default tiles are smaller, so its
    stores may take the other path.)"""
    geometry = conv_geometry(input_shape, weight_shape, stride, padding, 1, groups)
    with kernels.cpu_target(cpu):
        plan = kernels._conv_pixel_plan(geometry, knobs or kernels.BitparallelKnobs())
    assert plan.direct == direct or (cpu is not None and knobs is None)
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    for staged in (contextlib.nullcontext(), shared_staging()):  # each task's rows, then one staging
        with staged:
            kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, 1, groups,
                           knobs=knobs, cpu=cpu)
        np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, groups)),
                                      conv_reference(x, q, stride, padding, (1, 1), groups))


@pytest.mark.parametrize("channels,vectors,rows,cpu", [(4, 4, 1, AVX2_CPU), (8, 3, 5, None), (12, 2, 100, AVX2_CPU),
                                                     (24, 1, 2, None)])
def test_bitparallel_conv2d_tilings(channels, vectors, rows, cpu):
    if cpu is None and HOST_TIER != "avx512":
        cpu = AVX2_CPU  # (the same tiling, AVX2's dot product)
    input_shape, weight_shape, stride, padding, dilation = (1, 10, 13, 11), (24, 10, 3, 3), (1, 2), (2, 1), (1, 2)
    q = RNG.integers(-128, 128, weight_shape)
    x = RNG.integers(0, code_limit(cpu), input_shape)
    knobs = kernels.BitparallelKnobs(conv_channels=channels, conv_vectors=vectors, conv_rows=rows)
    kernel = built(kernels.bitparallel_conv2d, input_shape, weight_shape, stride, padding, dilation, 1,
                   knobs=knobs, cpu=cpu)
    np.testing.assert_array_equal(kernel(x.astype(np.uint8), packing.pack_bitparallel_conv_weight(q, 1)),
                                  conv_reference(x, q, stride, padding, dilation, 1))


def test_cpu_target_names_the_cpu():
    target = kernels.cpu_target()
    assert str(target.attrs["mcpu"]) not in ("", "generic")


# ------------------------------------------------------------------------------------------
# Weight-only (float activations x weight planes, table lookups)
# ------------------------------------------------------------------------------------------
def _lut_case(m, n, k, bits, encoding):
    q = random_q((n, k), bits, encoding)
    planes, spec, zero_point = planes_from_q(q, bits, encoding)
    tiles = kernels.lut_tiles_per_task(len(spec), -(-n // kernels.LUT_LANES))
    w = kernels.pack_lut_weight(packing.pack_weight_planes(planes, lanes=kernels.LUT_LANES), tiles)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    kernel = built(kernels.lut_dense, m, n, k, spec, bool(zero_point), tiles)
    return q, spec, zero_point, w, x, kernel


@pytest.mark.parametrize("m, n, k, bits, encoding", [
    (1, 64, 256, 2, "offset"),  # whole tiles and words
    (3, 37, 70, 3, "offset"),  # ragged N (last tile), K not a multiple of 32 (zero-padded table)
    (8, 48, 96, 4, "offset"),
    (2, 20, 33, 2, "posneg"),  # +/- planes, no zero point
    (8, 50, 200, 2, "offset"),  # passes of 2 rows share each index (scaled and unscaled rows)
    (6, 40, 64, 1, "posneg"),  # passes of 3 rows
    (5, 33, 96, 3, "offset"),  # 5 rows: one row per pass
])
@needs_avx512
def test_lut_dense_matches_float_reference(m, n, k, bits, encoding):
    q, spec, zero_point, w, x, kernel = _lut_case(m, n, k, bits, encoding)
    y = kernel(x, w, len(spec), zero_point)
    reference = x @ q.astype(np.float32).T  # the IR's float-input product: x @ float32(q).T
    assert y.dtype == np.float32 and y.shape == (m, n)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@needs_avx512
def test_lut_dense_runtime_plane_count_drops_low_planes():
    q, spec, zero_point, w, x, kernel = _lut_case(2, 40, 64, 3, "offset")
    planes, _, _ = planes_from_q(q, 3, "offset")
    kept = 2  # the top two planes: q' = 4 * plane_0 + 2 * plane_1 - zero_point
    coarse = sum(sign * (1 << shift) * planes[p].astype(np.int64) for p, (shift, sign) in enumerate(spec[:kept]))
    reference = x @ (coarse - zero_point).astype(np.float32).T
    np.testing.assert_allclose(kernel(x, w, kept, zero_point), reference, rtol=1e-5,
                               atol=1e-5 * np.abs(reference).max())


@needs_avx512
def test_lut_dense_assembly_looks_up_with_vpermps():
    *_, kernel = _lut_case(1, 64, 256, 2, "offset")
    assembly = kernel.assembly()
    lookups = assembly.count("vpermps") + assembly.count("vpermd")  # LLVM may pick the int form
    assert lookups >= 8 * 3  # the 8 nibbles x 3 planes of a word, unrolled
    # even nibbles are loaded at a byte offset instead of shifted; odd ones shift once
    assert assembly.count("vpsrld") <= lookups // 2
    assert "vfmadd" in assembly  # half of the accumulation runs on the FMA pipes


def test_pack_lut_weight_is_little_endian_bytes_with_load_slack():
    planes = RNG.integers(0, 2, (2, 40, 70)).astype(np.uint8)
    packed = packing.pack_weight_planes(planes, lanes=kernels.LUT_LANES)  # [3 tiles, 2, 3 words, 16]
    flat = kernels.pack_lut_weight(packed, 2)
    assert flat.dtype == np.uint8 and flat.shape == (2 * 3 * 2 * 2 * 16 * 4 + 4,)
    words = flat[:-4].view("<u4").reshape(2, 3, 2, 2, 16)  # [blocks, KW, tiles, P, 16]
    np.testing.assert_array_equal(words[0, :, 1], packed[1].transpose(1, 0, 2))
    assert not words[1, :, 1].any() and not flat[-4:].any()  # the padding tile and the slack


# ------------------------------------------------------------------------------------------
# Weight-only, dequantized in registers (packed codes -> vpermps levels -> FMA)
# ------------------------------------------------------------------------------------------
# The two widths: AVX-512 (16 lanes) where this machine has it, AVX2 (8 lanes) everywhere.
DEQUANT_WIDTHS = [pytest.param((None, 16), id="avx512", marks=needs_avx512), pytest.param((AVX2_CPU, 8), id="avx2")]


def _dequant_case(m, n, k, bits, width=(None, 16), encoding="offset"):
    cpu, lanes = width
    q = random_q((n, k), bits, encoding)
    planes, spec, zero_point = planes_from_q(q, bits, encoding)
    _, tiles = kernels.dequant_blocking(m, -(-n // lanes), lanes)
    w = kernels.pack_dequant_weight(planes, spec, tiles, lanes)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    return q, planes, spec, zero_point, w, x, built(kernels.dequant_dense, m, n, k, spec, True, lanes, cpu=cpu)


def _assert_float_close(y, reference):
    assert y.dtype == np.float32 and y.shape == reference.shape
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("m, n, k, bits", [
    (1, 64, 256, 3),  # nibble codes, whole tiles and words (x read in place), two tasks
    (1, 37, 70, 2),  # ragged N (last tile), K not a multiple of 8 (zero-padded row copy)
    (2, 20, 33, 4),  # 2 rows per pass, 16 levels (AVX2: two permutes and a blend)
    (5, 33, 100, 3),  # 4 rows per pass and a padded second pass
    (3, 17, 9, 1),  # one plane
])
@pytest.mark.parametrize("width", DEQUANT_WIDTHS)
def test_dequant_dense_matches_float_reference(m, n, k, bits, width):
    q, _, spec, zero_point, w, x, kernel = _dequant_case(m, n, k, bits, width)
    _assert_float_close(kernel(x, w, len(spec), zero_point), x @ q.astype(np.float32).T)


@pytest.mark.parametrize("m, n, k, bits", [(8, 48, 96, 5), (1, 37, 33, 5), (3, 40, 70, 6), (1, 64, 256, 6)])
@pytest.mark.parametrize("width", DEQUANT_WIDTHS)
def test_dequant_dense_reads_five_and_six_plane_codes_as_bytes(m, n, k, bits, width):
    # 32 levels: one vpermi2ps (AVX-512), two 8-entry lookups added (AVX2); 64: two lookups
    # added on both (16 + 4 or 8 + 8 entries); x read in place, or copied
    q, _, spec, zero_point, w, x, kernel = _dequant_case(m, n, k, bits, width)
    _assert_float_close(kernel(x, w, len(spec), zero_point), x @ q.astype(np.float32).T)


@pytest.mark.parametrize("bits, encoding", [(3, "offset"), (2, "posneg"), (1, "posneg"), (3, "posneg")])
@pytest.mark.parametrize("width", DEQUANT_WIDTHS)
def test_dequant_dense_runtime_plane_count_drops_low_planes(bits, encoding, width):
    # signed planes (positive and negative parts of each bit) form codes too: the level table
    # holds each plane's sign and power of two
    q, planes, spec, zero_point, w, x, kernel = _dequant_case(2, 40, 64, bits, width, encoding)
    for kept in range(1, len(spec) + 1):
        coarse = sum(sign * (1 << shift) * planes[p].astype(np.int64) for p, (shift, sign) in enumerate(spec[:kept]))
        _assert_float_close(kernel(x, w, kept, zero_point), x @ (coarse - zero_point).astype(np.float32).T)


@needs_avx512
def test_dequant_dense_assembly_looks_up_levels_and_fmas():
    *_, kernel = _dequant_case(1, 256, 256, 3)
    assembly = kernel.assembly()
    lookups = assembly.count("vpermps") + assembly.count("vpermd")  # LLVM may pick the int form
    assert lookups >= 8 * 8  # 8 nibbles x 8 tiles of a word, unrolled
    assert assembly.count("vfmadd") >= lookups
    # odd nibbles shift the load of the even one; no AND or int->float conversion per weight
    assert assembly.count("vpsrld") <= lookups // 2 and not re.search(r"vcvtu?dq2ps\s+%zmm", assembly)
    *_, kernel = _dequant_case(1, 256, 256, 5)
    assert "vpermi2ps" in kernel.assembly() or "vpermt2ps" in kernel.assembly()


def test_dequant_dense_assembly_on_avx2_uses_ymm_permutes_and_no_zmm():
    *_, kernel = _dequant_case(1, 256, 256, 3, (AVX2_CPU, 8))
    assembly = kernel.assembly()
    lookups = len(re.findall(r"vperm(?:ps|d)\s+%ymm", assembly))
    assert lookups >= 8 * 6  # 8 nibbles x 6 tiles of a word, unrolled
    assert "%zmm" not in assembly and len(re.findall(r"vfmadd\w+\s+[^\n]*%ymm", assembly)) >= lookups
    *_, kernel = _dequant_case(1, 256, 256, 4, (AVX2_CPU, 8))
    assembly = kernel.assembly()  # 16 levels: two 8-entry lookups a weight vector, added
    assert len(re.findall(r"vperm(?:ps|d)\s+%ymm", assembly)) >= 2 * lookups and "vblendv" not in assembly


def test_pack_dequant_weight_puts_codes_in_nibbles_along_k():
    planes = RNG.integers(0, 2, (3, 40, 20)).astype(np.uint8)
    spec = [(2, 1), (1, 1), (0, 1)]
    flat = kernels.pack_dequant_weight(planes, spec, 2)
    assert flat.dtype == np.uint8 and flat.shape == (2 * 3 * 2 * 16 * 4 + 4,)  # [blocks, KW, tiles, 16] words
    words = flat[:-4].view("<u4").reshape(2, 3, 2, 16)
    codes = 4 * planes[0] + 2 * planes[1] + planes[2]  # one bit a plane, the first on top
    n, k = 37, 13  # output 37 = block 1, tile 0, lane 5; k 13 = word 1, nibble 5
    assert (words[1, 1, 0, 5] >> 20) & 15 == codes[n, k]
    assert not words[1, :, 1].any() and not words[:, 2, :, :][words[:, 2] >> 16 != 0].any()  # padding is 0
    eight = kernels.pack_dequant_weight(planes, spec, 2, lanes=8)  # AVX2: [blocks, KW, tiles, 8] words
    words = eight[:-4].view("<u4").reshape(3, 3, 2, 8)
    assert (words[2, 1, 0, 5] >> 20) & 15 == codes[n, k]  # output 37 = block 2, tile 0, lane 5
    with pytest.raises(ValueError, match="6 planes at most"):
        kernels.pack_dequant_weight(np.zeros((7, 8, 8), np.uint8), [(s, 1) for s in range(7)], 1, lanes=8)


@pytest.mark.parametrize("planes, bits", [(1, 4), (3, 4), (4, 4), (5, 8), (6, 8), (7, 0), (0, 0)])
def test_dequant_code_bits(planes, bits):
    assert packing.dequant_code_bits(planes) == bits
