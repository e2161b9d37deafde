"""Bit-parallel dense kernel on Intel AMX tiles (Sapphire Rapids and later): u8 codes x s8 weights.

At many rows a bit-parallel layer is compute bound, and AVX-512 VNNI does 64 multiply-adds per
instruction where one AMX ``tdpbusd`` does 16 x 16 x 64 = 16384 (16 cycles: ~16x the VNNI rate
of a core). ONNX Runtime uses AMX on such CPUs, so csqc must too (issue 16, item 5).

The weights need no layout of their own: ``packing.pack_bitparallel_weight``'s
``w[N/16, K/4, 64]`` (16 outputs x 4 consecutive k per 64-byte row) is the VNNI-grouped layout
``tdpbusd`` wants for its second operand, so a B tile (16 rows: 64 k x 16 outputs) is 1 KiB of
``w`` read with a 64-byte stride, and the activation codes ``x[M, K]`` are A tiles as they lie
(16 rows x 64 k, stride K). Every task computes one 64-output block for all rows: tile
registers 0-3 accumulate 16 rows x 64 outputs, 4 holds the codes, 5-7 the weights; the block's
weights (64 x K bytes) stay in the core's caches across the row blocks.

Linux grants the tile registers per process (``arch_prctl(ARCH_REQ_XCOMP_PERM)``): without it
the first tile instruction raises SIGILL, so everything that runs these kernels calls
:func:`request_tile_permission` first (``csqc.runtime`` does when it loads an artifact built
with them). Exact: integer products and sums, the same accumulators as the VNNI kernel.
"""
from __future__ import annotations

import ctypes
import functools
import os

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["AMX_ATTRS", "amx_dense", "amx_dense_fits", "host_has_amx", "request_tile_permission", "target_has_amx"]

AMX_ATTRS = ("+amx-tile", "+amx-int8")  # the LLVM features of the tile instructions used here
_TILE_ROWS, _TILE_BYTES = 16, 64  # a tile register: 16 rows of 64 bytes
_BLOCK_OUTPUTS = 64  # outputs per task: four accumulator tiles of 16 int32 columns


def host_has_amx() -> bool:
    """Whether this machine's CPU has AMX-INT8 (Linux: the kernel lists ``amx_int8`` and ``amx_tile``
    only where it supports them; LLVM's host CPU name alone can miss them in a virtual machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"amx_int8", "amx_tile"} <= flags
    except OSError:
        pass
    return False


def target_has_amx(target) -> bool:
    """Whether an LLVM target (its CPU name and ``-mattr``) has AMX-INT8 tiles."""
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(["amx-tile", "amx-int8"], target))


@functools.lru_cache(maxsize=1)
def request_tile_permission() -> None:
    """Ask Linux for the AMX tile data state for this process (once; idempotent). Raises
    RuntimeError where it is refused (kernel before 5.16, or not Linux/x86-64)."""
    arch_req_xcomp_perm, xfeature_xtiledata, sys_arch_prctl = 0x1023, 18, 158
    if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
        raise RuntimeError("AMX tile kernels need Linux on x86-64")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) != 0:
        raise RuntimeError(f"Linux refused the AMX tile state (arch_prctl: {os.strerror(ctypes.get_errno())}); "
                           "compile for this CPU without AMX (--mattr=-amx-tile)")


def amx_dense_fits(M: int, N: int, K: int) -> bool:
    """Whether :func:`amx_dense` takes this shape (whole tiles along N and K)."""
    return M >= 1 and N % _BLOCK_OUTPUTS == 0 and K % _TILE_BYTES == 0


def _tile(name: str, *args):
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def amx_dense(M: int, N: int, K: int) -> tirx.PrimFunc:
    """``y[m, n] = sum_k x[m, k] * q[n, k]`` on AMX tiles, the signature of
    ``kernels.bitparallel_dense`` with int8 weights::

        main(x: uint8[M, K], w: int8[N/16, K/4, 64], y: int32[M, N])

    Needs ``N % 64 == 0`` and ``K % 64 == 0`` (:func:`amx_dense_fits`); any M (the last row
    block loads and stores ``M % 16`` rows).
    """
    if not amx_dense_fits(M, N, K):
        raise ValueError(f"amx_dense needs N % {_BLOCK_OUTPUTS} == 0 and K % {_TILE_BYTES} == 0, got {M}x{N}x{K}")
    n_tiles, k_groups, k_tiles = N // 16, K // 4, K // _TILE_BYTES
    full_blocks, tail_rows = divmod(M, _TILE_ROWS)
    blocks = N // _BLOCK_OUTPUTS

    @T.macro
    def configure(cfg, rows):
        # palette 1; tiles 0-4 (accumulators, codes) hold `rows` rows, 5-7 (weights) 16; 64 bytes each
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)
        for t in range(8):
            cfg[16 + 2 * t] = T.uint8(_TILE_BYTES)
            cfg[48 + t] = T.Cast("uint8", T.Select(t < 5, rows, _TILE_ROWS))
        _tile("ldtilecfg", T.address_of(cfg[0]))

    @T.macro
    def row_block(x, w, y, block, m0):
        for t in T.unroll(4):
            _tile("tilezero", T.Cast("int8", t))
        for kt in range(k_tiles):
            _tile("tileloadd64", T.int8(4), T.address_of(x[m0, kt * _TILE_BYTES]), T.int64(K))
            for t in T.unroll(4):
                _tile("tileloadd64", T.Cast("int8", 5 + t % 3),
                      T.address_of(w[block * 4 + t, kt * _TILE_ROWS, 0]), T.int64(_TILE_BYTES))
                _tile("tdpbusd", T.Cast("int8", t), T.int8(4), T.Cast("int8", 5 + t % 3))
        for t in T.unroll(4):
            _tile("tilestored64", T.Cast("int8", t), T.address_of(y[m0, block * _BLOCK_OUTPUTS + t * 16]),
                  T.int64(4 * N))

    @T.prim_func
    def main(x: T.Buffer((M, K), "uint8"), w: T.Buffer((n_tiles, k_groups, 64), "int8"),
             y: T.Buffer((M, N), "int32")):
        T.func_attr({"tir.noalias": True})
        for block in T.parallel(blocks):
            # the tile configuration is per thread: every task loads its own
            cfg = T.alloc_buffer((64,), "uint8", scope="local", annotations={"disable_lower_builtin": True})
            if full_blocks > 0:
                configure(cfg, _TILE_ROWS)
                for mb in range(full_blocks):
                    row_block(x, w, y, block, mb * _TILE_ROWS)
            if tail_rows > 0:
                configure(cfg, tail_rows)
                row_block(x, w, y, block, full_blocks * _TILE_ROWS)
            _tile("tilerelease")

    return main
