"""Nibble-packed bit-parallel dense kernel: 4- or 5-bit weights, u8 codes, AVX-512 VNNI.

The int8 bit-parallel GEMV streams one byte per weight, as many bytes as ONNX Runtime's int8
GEMV. Weights that span at most 32 values (CSQ 4-bit weights are in [-15, 15]) are stored in
``csqc.artifact.pack_nibble_weight``'s layout instead: a nibble per weight plus, where needed, a
fifth bit (5 bits per weight, 10 MiB instead of 16 MiB for 4096 x 4096). Each 64-byte load
gives two ``vpdpbusd`` weight vectors (``v & 15`` and ``v >> 4``); the fifth bits of 8 vectors
share one 64-byte vector, and bit j of it ORs ``0xF0`` (``low - 16``) or ``0x10`` (``low + 16``)
into vector j, so the registers hold the exact int8 weights and no correction term is needed.
Where the CPU has GFNI (Ice Lake, Zen 4 and later) one ``vgf2p8affineqb`` per vector spreads bit
j over those bits (:func:`bit_spread`), else a per-byte test (``vptestmb``) selects them.

Where the time goes (Zen 5, 32 MiB L3, 2 threads, 4096 x 4096 at one row): the weights stay in
L3, and the int8 kernel streams its 16 MiB at the L3's bandwidth (75 us, ~220 GB/s); this one
reads 10 MiB but is compute bound (66 us): per 64 weights it spends an and or a shift (LLVM
uses ``vgf2p8affineqb`` for the byte shift) and, for the fifth bit, ``vptestmb``, ``vporq`` and a
masked ``vmovdqu8`` next to the broadcast and the ``vpdpbusd``. Without a fifth bit (weights
in [0, 15]) it runs in ~55% of the time. The GFNI spread of the fifth bit (an affine product and
an OR) made the 4096 x 4096 layer at one row 18-23% faster with two sign parts (83-89 -> 64-73
us) and 7% with one (70 -> 65 us) on the same Zen 5 (alternating runs).

Symmetric 8-bit activations take two code buffers (the sign parts, one of them 0 at each
position): one ``vpdpbusd`` multiplies their OR (the magnitudes) by each unpacked weight vector
with the bytes of negative positions complemented (``isa.sign_flip_mask``: a mask per 4
positions from scalar arithmetic, and an XOR that LLVM folds into the unpacking's
``vpternlogq`` where it can), and each row's sum of negative parts, the accumulators' start
value, takes back the complement's -1s. A dot product per sign part did the same work with
twice the ``vpdpbusd``: on a Zen 4 (2 threads, 4096 x 4096 at one row, weights in [-15, 15])
135 -> 108 us, one thread 268 -> 217 us.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from csqc.artifact import NIBBLE_BLOCK, NIBBLE_K, VNNI_LANES, nibble_block_bytes, nibble_range

from .isa import sign_flip_mask, sign_flipped

__all__ = ["nibble_dense", "nibble_blocking"]

_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_GF2P8AFFINE = "llvm.x86.vgf2p8affineqb.512"
_ON_STACK = {"disable_lower_builtin": True}  # see kernels._ON_STACK
_MAX_ACCUMULATORS = 16  # zmm accumulators per register tile (unpacked weights need the rest)


def nibble_blocking(M: int, signs: int, high: int = 0) -> tuple[int, int]:
    """(rows, 16-output vectors) per register tile: four vectors for one row (fewer, longer
    weight streams per task), three where a fifth bit meets sign parts (``high`` and ``signs ==
    2``: the eight ``bit_spread`` matrices and the sign masks leave too few registers for four,
    and LLVM spilled 20 zmm in the loop to unaligned stack slots, whose cost then followed the
    calling thread's stack alignment: on a Zen 4, 2 threads, 4096 x 4096, whole w4a8 models
    took 114 or 130 us by process, 112-119 with three vectors and no spill); else as many rows
    as the accumulators allow with two vectors; half as many with sign parts, whose rows hold
    their own sign-flipped weight vectors (8 rows spilled: 4096 x 4096 at 8 rows on a Zen 4,
    2 threads, 4 rows 668 us, 8 rows 740-806)."""
    if M == 1:
        return 1, 3 if high and signs == 2 else 4
    return max(1, min(M, _MAX_ACCUMULATORS // (2 * signs))), 2


def _vnni(acc, act_word, weight_vector):
    """acc[i] += sum_{t<4} u8(act_word byte t) * s8(weight byte 4i+t) (16 int32 lanes)."""
    return T.call_llvm_pure_intrin(
        "int32x16", _VPDPBUSD, acc, T.reinterpret("int8x64", T.broadcast(act_word, VNNI_LANES)), weight_vector)


def _block_vectors(w, nt, kb, high: int):
    """The eight int8 weight vectors (K groups 8kb .. 8kb+7) of block (nt, kb)."""
    def vector(i):
        return w[nt, kb, T.ramp(i * NIBBLE_BLOCK, 1, NIBBLE_BLOCK)]

    def byte(value):
        return T.broadcast(T.uint8(value & 0xFF), NIBBLE_BLOCK)

    halves = []
    for p in range(4):
        packed = vector(p)
        halves += [packed & byte(15), packed >> byte(4)]
    if high and _has_gfni():
        # one GF(2) affine product spreads bit j of every fifth-bit byte over high's bits
        fifth = vector(4)
        halves = [half | T.call_llvm_pure_intrin("uint8x64", _GF2P8AFFINE, fifth,
                                                 T.reinterpret("uint8x64", T.broadcast(T.uint64(bit_spread(high, j)), 8)),
                                                 T.int8(0))
                  for j, half in enumerate(halves)]
    elif high:
        fifth = vector(4)
        halves = [T.Select(fifth & byte(1 << j) != byte(0), half | byte(high), half)
                  for j, half in enumerate(halves)]
    return [T.reinterpret("int8x64", half) for half in halves]


def bit_spread(high: int, j: int) -> int:
    """The ``vgf2p8affineqb`` matrix (a qword: its byte ``7 - i`` selects the input bits of output
    bit ``i``) that sets each byte to ``high``'s bits where its bit ``j`` is set, else to 0."""
    return sum((1 << j) << 8 * (7 - i) for i in range(8) if (high & 0xFF) >> i & 1)


def _has_gfni() -> bool:
    """Whether the current target has GFNI (Ice Lake, Zen 4 and later; not Cascade Lake)."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target.current(allow_none=True)
    return target is not None and bool(codegen.llvm_cpu_has_features(["gfni"], target))


def nibble_dense(M: int, N: int, K: int, high: int, two_signs: bool = False) -> tirx.PrimFunc:
    """Dense kernel on nibble-packed weights (``N % 16 == 0``, ``K % 32 == 0``)::

        main(x: uint8[M, K], [x_neg: uint8[M, K],] w: uint8[N/16, K/32, 256 (+64 with high)], y: int32[M, N])

    ``y = x @ q.T`` (``two_signs``: ``x @ q.T - x_neg @ q.T`` for sign parts, at each position
    at most one of ``x`` and ``x_neg`` not 0; one dot product, see the module's doc). ``high``
    is the layout's fifth-bit value (0, -16, 16).
    """
    nibble_range(high)  # a KeyError names a bad layout early
    if N % VNNI_LANES or K % NIBBLE_K:
        raise ValueError(f"the nibble kernel needs N % {VNNI_LANES} == 0 and K % {NIBBLE_K} == 0, got N={N}, K={K}")
    n_tiles, k_blocks = N // VNNI_LANES, K // NIBBLE_K
    row_block, col_vectors = nibble_blocking(M, 2 if two_signs else 1, high)
    col_vectors = min(col_vectors, n_tiles)
    row_blocks, col_blocks = -(-M // row_block), -(-n_tiles // col_vectors)

    def word(x, m, kb, group):
        return T.reinterpret("int32", x[m, T.ramp(kb * NIBBLE_K + 4 * group, 1, 4)])

    def negative_sums(x_neg, sums):
        """``sums[m] = sum_k x_neg[m, k]``, on the calling thread (M * K bytes)."""
        from tvm.script.ir_builder import tirx as I

        with I.serial(0, M) as m:
            part = I.alloc_buffer((VNNI_LANES,), "int32", scope="local", annotations=_ON_STACK)
            I.buffer_store(part, T.broadcast(T.int32(0), VNNI_LANES), [T.ramp(0, 1, VNNI_LANES)])
            with I.serial(0, K // VNNI_LANES) as v:
                I.buffer_store(part, part[T.ramp(0, 1, VNNI_LANES)] + T.Cast(
                    f"int32x{VNNI_LANES}", x_neg[m, T.ramp(v * VNNI_LANES, 1, VNNI_LANES)]), [T.ramp(0, 1, VNNI_LANES)])
            I.buffer_store(sums, T.int32(0), [m])
            for lane in range(VNNI_LANES):
                I.buffer_store(sums, sums[m] + part[lane], [m])

    def tile(xs, w, y, sums, rb, cb):
        from tvm.script.ir_builder import tirx as I

        acc = I.alloc_buffer((row_block, col_vectors), "int32x16", scope="local", annotations=_ON_STACK)
        rows = [T.min(rb * row_block + r, M - 1) for r in range(row_block)]
        for r, m in enumerate(rows):
            for cv in range(col_vectors):
                I.buffer_store(acc, T.broadcast(sums[m] if two_signs else T.int32(0), VNNI_LANES), [r, cv])
        with I.serial(0, k_blocks) as kb:
            for cv in range(col_vectors):
                vectors = _block_vectors(w, T.min(cb * col_vectors + cv, n_tiles - 1), kb, high)
                for group, vector in enumerate(vectors):
                    for r, m in enumerate(rows):
                        if two_signs:
                            negative = word(xs[1], m, kb, group)
                            codes = word(xs[0], m, kb, group) | negative
                            row_vector = sign_flipped(vector, sign_flip_mask(negative))
                        else:
                            codes, row_vector = word(xs[0], m, kb, group), vector
                        I.buffer_store(acc, _vnni(acc[r, cv], codes, row_vector), [r, cv])
        for r in range(row_block):
            for cv in range(col_vectors):
                nt = cb * col_vectors + cv
                with I.If(T.And(nt < n_tiles, rb * row_block + r < M)):
                    with I.Then():
                        I.buffer_store(y, acc[r, cv], [rb * row_block + r, T.ramp(nt * VNNI_LANES, 1, VNNI_LANES)])

    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    with IRBuilder() as builder:
        with I.prim_func():
            I.func_name("main")
            I.func_attr({"tir.noalias": True})
            xs = [I.arg(name, I.Buffer((M, K), "uint8")) for name in ("x_pos", "x_neg")[:2 if two_signs else 1]]
            w = I.arg("w", I.Buffer((n_tiles, k_blocks, nibble_block_bytes(high)), "uint8"))
            y = I.arg("y", I.Buffer((M, N), "int32"))
            sums = None
            if two_signs:
                sums = I.alloc_buffer((M,), "int32")
                negative_sums(xs[1], sums)
            with I.parallel(0, row_blocks * col_blocks) as task:  # consecutive tasks share weights
                tile(xs, w, y, sums, task % row_blocks, task // row_blocks)
    return builder.get()
