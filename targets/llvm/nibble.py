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

Symmetric 8-bit activations take two code buffers (the sign parts): both multiply each
unpacked weight vector, so the weights are read once per call, not once per sign.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from csqc.artifact import NIBBLE_BLOCK, NIBBLE_K, VNNI_LANES, nibble_block_bytes, nibble_range

__all__ = ["nibble_dense", "nibble_blocking"]

_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_GF2P8AFFINE = "llvm.x86.vgf2p8affineqb.512"
_ON_STACK = {"disable_lower_builtin": True}  # see kernels._ON_STACK
_MAX_ACCUMULATORS = 16  # zmm accumulators per register tile (unpacked weights need the rest)


def nibble_blocking(M: int, signs: int) -> tuple[int, int]:
    """(rows, 16-output vectors) per register tile: four vectors for one row (fewer, longer
    weight streams per task), else as many rows as the accumulators allow with two vectors."""
    if M == 1:
        return 1, 4
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

    ``y = x @ q.T`` (``two_signs``: ``x @ q.T - x_neg @ q.T``, exact in int32 as each pass is
    within the layer's accumulator bound). ``high`` is the layout's fifth-bit value (0, -16, 16).
    """
    nibble_range(high)  # a KeyError names a bad layout early
    if N % VNNI_LANES or K % NIBBLE_K:
        raise ValueError(f"the nibble kernel needs N % {VNNI_LANES} == 0 and K % {NIBBLE_K} == 0, got N={N}, K={K}")
    signs = 2 if two_signs else 1
    n_tiles, k_blocks = N // VNNI_LANES, K // NIBBLE_K
    row_block, col_vectors = nibble_blocking(M, signs)
    col_vectors = min(col_vectors, n_tiles)
    row_blocks, col_blocks = -(-M // row_block), -(-n_tiles // col_vectors)

    def tile(xs, w, y, rb, cb):
        from tvm.script.ir_builder import tirx as I

        acc = I.alloc_buffer((signs, row_block, col_vectors), "int32x16", scope="local", annotations=_ON_STACK)
        for s in range(signs):
            for r in range(row_block):
                for cv in range(col_vectors):
                    I.buffer_store(acc, T.broadcast(T.int32(0), VNNI_LANES), [s, r, cv])
        rows = [T.min(rb * row_block + r, M - 1) for r in range(row_block)]
        with I.serial(0, k_blocks) as kb:
            for cv in range(col_vectors):
                vectors = _block_vectors(w, T.min(cb * col_vectors + cv, n_tiles - 1), kb, high)
                for group, vector in enumerate(vectors):
                    for s, x in enumerate(xs):
                        for r, m in enumerate(rows):
                            word = T.reinterpret("int32", x[m, T.ramp(kb * NIBBLE_K + 4 * group, 1, 4)])
                            I.buffer_store(acc, _vnni(acc[s, r, cv], word, vector), [s, r, cv])
        for r in range(row_block):
            for cv in range(col_vectors):
                nt = cb * col_vectors + cv
                value = acc[0, r, cv] - acc[1, r, cv] if two_signs else acc[0, r, cv]
                with I.If(T.And(nt < n_tiles, rb * row_block + r < M)):
                    with I.Then():
                        I.buffer_store(y, value, [rb * row_block + r, T.ramp(nt * VNNI_LANES, 1, VNNI_LANES)])

    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    with IRBuilder() as builder:
        with I.prim_func():
            I.func_name("main")
            I.func_attr({"tir.noalias": True})
            xs = [I.arg(name, I.Buffer((M, K), "uint8")) for name in ("x_pos", "x_neg")[:signs]]
            w = I.arg("w", I.Buffer((n_tiles, k_blocks, nibble_block_bytes(high)), "uint8"))
            y = I.arg("y", I.Buffer((M, N), "int32"))
            with I.parallel(0, row_blocks * col_blocks) as task:  # consecutive tasks share weights
                tile(xs, w, y, task % row_blocks, task // row_blocks)
    return builder.get()
