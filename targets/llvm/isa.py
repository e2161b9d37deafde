"""The x86 instruction-set tiers csqc's CPU kernels are built for, and the int8 dot product of each.

x86-64 CPUs differ in what the bit-parallel kernels can use:

* ``avx512``: AVX-512 VNNI (with BW): ``vpdpbusd`` multiplies 64 u8 x s8 pairs into 16 int32
  sums in one instruction; the 512-bit byte and word permutes of the calibrated epilogues'
  code search and of the weight-only table lookups are there too (Cascade Lake, Ice Lake,
  Sapphire Rapids, Zen 4 and later).
* ``avx2``: the same dot product from AVX2's ``vpmaddubsw`` (u8 x s8 pairs summed into int16)
  and ``vpmaddwd`` against ones (int16 pairs into int32) on each 256-bit half: six
  instructions for ``vpdpbusd``'s one. ``vpmaddubsw`` saturates its int16 pair sums, so a layer
  takes it only where no pair can pass int16 (:func:`avx2_dot_exact`), else the bit-serial
  kernel (Haswell to Alder Lake, Zen 1 to Zen 3).
* ``generic``: neither; every quantized layer runs bit-serial (portable TensorIR: popcounts).

Kernels read the tier from the TVM target in scope (``with target:``, as the ``llvm`` target's
lowering runs), else from this machine's CPU, so one TensorIR builder emits the right
instructions for the artifact's CPU. (TVM is imported on use: the cost model imports this module.)
"""
from __future__ import annotations

__all__ = ["AVX512", "AVX2", "GENERIC", "tier", "avx2_dot_exact", "avx2_int16_groups", "dot4", "dot4_sum",
           "sign_flip_mask", "sign_flipped", "accumulator_budget", "intrinsic_features", "missing_features"]

AVX512, AVX2, GENERIC = "avx512", "avx2", "generic"

_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
_VPMADDUBSW_256 = "llvm.x86.avx2.pmadd.ub.sw"
_VPMADDWD_256 = "llvm.x86.avx2.pmadd.wd"
_INT16_MAX = 2**15 - 1


def tier(target=None) -> str:
    """The tier of an LLVM ``target`` (default: the target in scope, else this machine's)."""
    import tvm
    from tvm.target import codegen

    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    if target is None or str(target.kind) != "llvm":
        from .kernels import cpu_target

        target = cpu_target()
    if "x86" not in str(target.attrs.get("mtriple", "")) and not _is_host_x86(target):
        return GENERIC
    if codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw"], target):
        return AVX512
    if codegen.llvm_cpu_has_features(["avx2"], target):
        return AVX2
    return GENERIC


def _is_host_x86(target) -> bool:
    from tvm.target import codegen

    return not target.attrs.get("mtriple") and codegen.llvm_get_system_triple().startswith("x86_64")


def avx2_dot_exact(max_code: int, max_abs_weight: int) -> bool:
    """Whether AVX2's dot product is exact for u8 codes in ``[0, max_code]`` and weights of at
    most ``max_abs_weight`` in magnitude: ``vpmaddubsw`` sums two products into int16 with
    saturation, so two of them must stay within int16."""
    return 2 * max_code * max_abs_weight <= _INT16_MAX


def avx2_int16_groups(max_code: int, max_abs_weight: int, limit: int = 4) -> int:
    """How many ``vpmaddubsw`` results :func:`dot4_sum` may add in int16 before widening, up to
    ``limit``: each holds two products, so ``groups`` of them must stay within int16 (0 where
    even one may not: :func:`avx2_dot_exact`)."""
    pair = 2 * max_code * max_abs_weight
    return min(limit, _INT16_MAX // pair) if pair else limit


def dot4(acc, codes, weights, kind: str | None = None):
    """``acc[i] + sum_{t<4} u8(codes[4i+t]) * s8(weights[4i+t])`` on 16 int32 lanes (``codes`` and
    ``weights`` ``int8x64``) with the int8 dot product of tier ``kind`` (default: :func:`tier`)."""
    return dot4_sum(acc, [(codes, weights)], kind)


def dot4_sum(acc, pairs, kind: str | None = None):
    """:func:`dot4` over several ``(codes, weights)`` pairs into one accumulator. On AVX2 the
    ``vpmaddubsw`` int16 results of all pairs are added in int16 and widened by one
    ``vpmaddwd``, fewer multiplies (three for two pairs, not four), exact only where
    ``len(pairs) <= avx2_int16_groups(...)`` (the caller's bound, as for :func:`dot4`)."""
    from tvm import tirx

    kind = kind or tier()
    if kind == AVX512:
        for codes, weights in pairs:
            acc = tirx.call_llvm_pure_intrin("int32x16", _VPDPBUSD, acc, codes, weights)
        return acc
    if kind != AVX2:
        raise ValueError(f"the {kind} tier has no int8 dot product (its layers run bit-serial)")
    ones = tirx.Broadcast(tirx.IntImm("int16", 1), 16)

    def half(vector, which: int):
        return tirx.Shuffle([vector], [tirx.IntImm("int32", 32 * which + i) for i in range(32)])

    def sums(which: int):
        total = None
        for codes, weights in pairs:
            part = tirx.call_llvm_pure_intrin("int16x16", _VPMADDUBSW_256, half(codes, which), half(weights, which))
            total = part if total is None else total + part
        return tirx.call_llvm_pure_intrin("int32x8", _VPMADDWD_256, total, ones)

    return acc + tirx.Shuffle([sums(0), sums(1)], [tirx.IntImm("int32", i) for i in range(16)])


def sign_flip_mask(negative_word):
    """0xFF in each byte of ``negative_word`` (int32: four K positions' negative code parts) that
    is not 0, else 0x00, as a uint32. Scalar arithmetic (the top bit of ``((b & 0x7F) + 0x7F) | b``
    is set exactly where byte ``b`` is not 0; no carry crosses a byte), so the vector pipes stay
    free for the dot products.

    With it, symmetric signed codes (sign parts ``pos``, ``neg``: at each position at most one
    is not 0) take one dot product instead of one per part:
    ``sum_k (pos_k | neg_k) * (w_k ^ m_k) = sum_k (pos_k - neg_k) * w_k - sum_k neg_k`` (where
    ``neg_k`` is not 0, ``m_k`` complements ``w_k``: ``~w = -w - 1``), so a row's result is that
    one dot product plus the row's sum of negative parts. Exact in wrapping int32 arithmetic
    (``vpdpbusd``), which holds the true result."""
    from tvm import tirx

    word = tirx.reinterpret("uint32", negative_word)
    low7, top = tirx.const(0x7F7F7F7F, "uint32"), tirx.const(0x80808080, "uint32")
    nonzero = (((word & low7) + low7) | word) & top
    return (nonzero >> tirx.const(7, "uint32")) * tirx.const(0xFF, "uint32")


def sign_flipped(weights, flip_mask):
    """``weights`` (int8x64: 16 lanes of 4 K positions) with the bytes set in ``flip_mask`` (a
    uint32 of :func:`sign_flip_mask`, the same four positions in every lane) complemented."""
    from tvm import tirx

    mask = tirx.reinterpret("int8x64", tirx.Broadcast(flip_mask, 16))
    return tirx.bitwise_xor(weights, mask)


def accumulator_budget(kind: str | None = None) -> int:
    """16-lane int32 accumulators a register tile may hold: AVX-512 has 32 512-bit registers,
    AVX2 16 of 256 bits (each accumulator takes two, and the dot product's halves need four)."""
    return 24 if (kind or tier()) == AVX512 else 6


# x86 intrinsic name prefixes -> the LLVM features a CPU needs to run them (most specific first)
_INTRINSIC_FEATURES = (
    ("llvm.x86.avx512.vpdpbusd", ("avx512vnni",)),
    ("llvm.x86.avx512.permvar.qi", ("avx512vbmi",)),
    ("llvm.x86.avx512.vpermi2var.qi", ("avx512vbmi",)),
    ("llvm.x86.vgf2p8affineqb.512", ("gfni", "avx512bw")),
    ("llvm.x86.avx512.", ("avx512f", "avx512bw")),
    ("llvm.x86.avx2.", ("avx2",)),
    ("llvm.x86.ldtilecfg", ("amx-tile",)),
    ("llvm.x86.tile", ("amx-tile", "amx-int8")),
)


def intrinsic_features(funcs) -> dict[str, set[str]]:
    """The x86 intrinsics the PrimFuncs ``funcs`` call, each with the LLVM features it needs
    (read from their TVMScript: this TVM has no Python IR visitor)."""
    import re

    found: dict[str, set[str]] = {}
    for func in funcs:
        for name in set(re.findall(r'"(llvm\.x86\.[\w.]+)"', func.script())):
            for prefix, features in _INTRINSIC_FEATURES:
                if name.startswith(prefix):
                    found.setdefault(name, set()).update(features)
                    break
    return found


def missing_features(funcs, target) -> list[str]:
    """``name (feature)`` for each intrinsic in ``funcs`` that LLVM ``target`` cannot emit: LLVM
    aborts the whole process on one (\"Cannot select\"), so builds check first."""
    from tvm.target import codegen

    return sorted(f"{name} ({feature})" for name, features in intrinsic_features(funcs).items()
                  for feature in sorted(features) if not codegen.llvm_cpu_has_features([feature], target))
