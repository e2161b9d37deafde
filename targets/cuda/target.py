"""The ``cuda`` target: lower with the shared planner, build GPU kernels, compile them AHEAD OF
TIME with nvcc and write the csqc artifact.

What a CUDA artifact holds
--------------------------
The same single file as the CPU target (``csqc.targets.tvm.build``): a shared library with
``plan.json`` + ``weights.npz`` appended; the plan records ``{"kind": "cuda", "arch": ...}``.
The library's host part launches kernels; its device part is a **fatbin** holding the cubin for
the chosen ``sm_XX`` and its ``compute_XX`` PTX (so a newer GPU can JIT it in the driver).
Nothing is compiled at load time.

How: TVM 0.27 built without a CUDA runtime (this wheel, on a machine without a GPU) gives a
CUDA module that only stores CUDA *source*, serialized with format ``"cuda"``; the TVM runtime
then calls ``tvm_callback_cuda_compile`` (NVRTC or nvcc) when the library is loaded.  Here the
source is compiled with nvcc (``-fmad=false``, no fast math: the float glue must round like
the interpreter) and the serialized device module is rewritten to format ``"fatbin"`` with the
binary as its data (the module's function table is kept byte for byte).  The rewritten blob is
packed into the library through ``export_library(fpack_imports=...)``.  The runtime's CUDA
loader hands the data to ``cuModuleLoadData`` for any format other than ``"cuda"``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from csqc.calibration import plan_entry
from csqc.provenance import plan_entry as provenance_entry
from csqc.errors import BadInput, CompileError
from csqc.ir import Graph
from csqc.outputs import atomic_write, make_output_folder
from csqc.targets.tvm.backend import LayerChoice
from csqc.targets.tvm.geometry import is_depthwise_layer
from csqc.targets.tvm.build import write_artifact
from csqc.targets.tvm.lower import Plan, lower_graph
from csqc.targets.tvm.vector_lanes import check_vector_widths

__all__ = [
    "SUPPORTED_ARCHS",
    "choose_kernel",
    "CudaBackend",
    "check_toolchain",
    "cuda_target",
    "build_plan",
    "compile_device_code",
    "describe_fatbin",
    "emit_cuda",
]

log = logging.getLogger(__name__)

# Names accepted for --arch (Volta .. Hopper); nvcc must also list the arch (CUDA 13 dropped sm_7x < 75).
SUPPORTED_ARCHS = ("sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
_DEVICE_FORMAT = "fatbin"


# --------------------------------------------------------------------------------------------
# Planner backend (csqc.targets.tvm.backend.TvmBackend)
# --------------------------------------------------------------------------------------------
def choose_kernel(n, rows: int, q: np.ndarray) -> LayerChoice:
    """Kernel per quantized layer on the GPU (a cost model, not measured: no GPU was at hand).

    Exactness first (int64 accumulators and weights beyond int8 only exist bit-serially).
    Bit-serial costs about 4 integer instructions (AND, POPC, shift, add) per 32 K values and
    plane pair, bit-parallel about 1-2 per K value (int32 multiply-add plus byte loads): popcount
    wins up to ~8 plane pairs, and always for few rows, where the GEMV kernel streams the packed
    planes (the smaller weight footprint is the whole cost at batch 1).
    """
    spec = n.quant
    if spec.act_bits is None:
        return LayerChoice("float", "input activations are not quantized")
    pairs = max(1, spec.num_planes) * spec.act_bits
    depthwise = is_depthwise_layer(n.op, n.attr("weight_shape"))
    if spec.acc_dtype == "int64":
        return LayerChoice("bitserial", "int64 accumulator needed (only the bit-serial kernel has one)")
    if int(np.abs(q).max(initial=0)) > 127:
        return LayerChoice("bitserial", "weights exceed int8")
    if depthwise:
        return LayerChoice("bitparallel", "depthwise: K is tiny, direct int32 kernel")
    if rows <= 8:
        return LayerChoice("bitserial", f"{rows} row(s): GEMV streaming packed planes")
    if pairs <= 8:
        return LayerChoice("bitserial", f"{pairs} plane pairs: popcount is cheaper than int8 products")
    return LayerChoice("bitparallel", f"{rows} rows x {pairs} plane pairs: int8 products are cheaper")


class CudaBackend:
    """``TvmBackend`` of the ``cuda`` target (TVM imported on construction, not on import)."""

    name = "cuda"
    offset_codes = False  # the GPU kernels keep sign parts
    fused_requant = False  # a fused layer runs its float epilogue, then the quantize kernel
    fused_residual = False  # residual adds run as their own kernels
    int16_depthwise = False  # the GPU depthwise kernel keeps int32
    int16_conv_outputs = False  # and so do its other convs

    def __init__(self):
        from . import glue, kernels, packing

        self.glue, self.kernels, self.packing = glue, kernels, packing

    def choose_kernel(self, n, rows: int, q: np.ndarray) -> LayerChoice:
        return choose_kernel(n, rows, q)


# --------------------------------------------------------------------------------------------
# Toolchain and target
# --------------------------------------------------------------------------------------------
def _nvcc_archs(nvcc: str) -> set[str]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BadInput(f"nvcc at {nvcc} does not run ({e}); install the CUDA toolkit") from None
    return {"sm_" + a.split("_", 1)[1] for a in out.split() if a.startswith("compute_")}


def check_toolchain(arch: str) -> str:
    """Path of nvcc after checking ``arch``; ``BadInput`` (exit code 2) when compiling for it
    is impossible here."""
    if arch not in SUPPORTED_ARCHS:
        raise BadInput(f"unsupported CUDA arch {arch!r}; choose one of: {', '.join(SUPPORTED_ARCHS)}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BadInput("--target cuda needs nvcc (the CUDA toolkit) on PATH to compile device code ahead of time; "
                       "none was found")
    available = _nvcc_archs(nvcc)
    if arch not in available:
        usable = [a for a in SUPPORTED_ARCHS if a in available]
        raise BadInput(f"this nvcc cannot compile for {arch}; it supports {', '.join(usable) or 'none of the csqc archs'}")
    return nvcc


def cuda_target(arch: str):
    """TVM target: CUDA device code for ``arch``, generic x86-64 host code (portable launcher)."""
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def build_plan(plan: Plan, target):
    """Compile every PrimFunc of the plan into one TVM executable (device code as CUDA source)."""
    import tvm

    check_vector_widths(plan.funcs)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in plan.funcs.items()})
    return tvm.compile(mod, target=target)


# --------------------------------------------------------------------------------------------
# Ahead-of-time device code
# --------------------------------------------------------------------------------------------
def compile_device_code(source: str, arch: str, nvcc: str) -> bytes:
    """nvcc: CUDA source -> fatbin with the ``arch`` cubin and its PTX (uncompressed)."""
    number = arch.split("_", 1)[1]
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "kernels.cu"), os.path.join(d, "kernels.fatbin")
        Path(src).write_text(source)
        cmd = [nvcc, "--fatbin", "-O3", "-fmad=false", "--no-compress",
               f"-gencode=arch=compute_{number},code=[sm_{number},compute_{number}]", "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"nvcc failed for {arch}:\n{proc.stderr.strip()[-2000:]}")
        return Path(out).read_bytes()


def describe_fatbin(data: bytes) -> list[tuple[str, str]]:
    """Entries of a fatbin as ``(kind, arch)``, kind ``"cubin"`` or ``"ptx"``, e.g. ``("cubin", "sm_90")``."""
    magic, _, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError("not a fatbin")
    entries, offset = [], header
    while offset < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        entries.append(({1: "ptx", 2: "cubin"}.get(kind, f"kind{kind}"), f"sm_{arch}"))
        offset += entry_header + payload
    return entries


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _string(data: bytes) -> bytes:
    return _u64(len(data)) + data


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        value = struct.unpack_from("<Q", self.data, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> bytes:
        n = self.u64()
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value


def _replace_device_binary(blob: bytes, source: str, binary: bytes) -> bytes:
    """Rewrite TVM's packed import blob: the CUDA module stored as source (format ``"cuda"``)
    becomes format ``"fatbin"`` holding ``binary``.

    Blob layout (TVM 0.27, ``ModulePackImportsToC``): total size; import-tree row pointers and
    child indices (u64 vectors); then per module its type key, followed by its serialized bytes
    unless it is the host library (``_lib``).  A CUDA module serializes as
    ``format, function table, data``: strings are a u64 length and bytes.
    """
    r = _Reader(blob)
    r.u64()  # total size
    head_vectors = []
    for _ in range(2):
        n = r.u64()
        head_vectors.append([r.u64() for _ in range(n)])
    modules = len(head_vectors[0]) - 1
    out = [_u64(len(v)) + b"".join(_u64(x) for x in v) for v in head_vectors]
    replaced = 0
    for _ in range(modules):
        key = r.string()
        out.append(_string(key))
        if key == b"_lib":
            continue
        payload = r.string()
        if key == b"cuda":
            p = _Reader(payload)
            fmt = p.string()
            src = source.encode()
            tail = _string(src)
            if fmt != b"cuda" or not payload.endswith(tail):
                raise CompileError(f"unexpected layout of TVM's serialized CUDA module (format {fmt!r}); "
                                   "this TVM version is not supported by the CUDA target")
            table = payload[p.pos:len(payload) - len(tail)]
            payload = _string(_DEVICE_FORMAT.encode()) + table + _string(binary)
            replaced += 1
        out.append(_string(payload))
    if r.pos != len(blob) or replaced != 1:
        raise CompileError("unexpected layout of TVM's packed device modules (expected exactly one CUDA module)")
    body = b"".join(out)
    return _u64(len(body)) + body


def _packer(source: str, binary: bytes):
    """``fpack_imports`` for ``export_library``: the C file of TVM's import blob, rewritten."""

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        from tvm.runtime import _ffi_api

        text = _ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix)
        match = re.search(r"const unsigned char (\w+)\[(\d+)\] = \{(.*?)\};", text, re.S)
        if match is None:
            raise CompileError("unexpected layout of TVM's packed import source")
        blob = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", match.group(3)))
        new = _replace_device_binary(blob, source, binary)
        rows = ",\n".join("  " + ",".join(f"0x{b:02x}" for b in new[i:i + 20]) for i in range(0, len(new), 20))
        text = text[:match.start()] + f"const unsigned char {match.group(1)}[{len(new)}] = {{\n{rows}\n}};" + text[match.end():]
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(text)
        return path

    return pack


class _AheadOfTime:
    """An executable whose ``export_library`` embeds precompiled device code."""

    def __init__(self, executable, source: str, binary: bytes):
        self.executable, self.source, self.binary = executable, source, binary

    def export_library(self, path, **kwargs):
        return self.executable.export_library(path, fpack_imports=_packer(self.source, self.binary), **kwargs)


def _device_module(executable):
    cuda = [m for m in executable.mod.imports if m.kind == "cuda"]
    if len(cuda) != 1:
        raise CompileError(f"expected one CUDA device module, found {len(cuda)}")
    return cuda[0]


# --------------------------------------------------------------------------------------------
# Emit
# --------------------------------------------------------------------------------------------
def emit_cuda(graph: Graph, output, *, arch: str = "sm_80", emit_source: str | os.PathLike | None = None,
              on_layer: Callable[[str], None] | None = None, force_kernel: str | None = None,
              calibration=None, model_digest: str | None = None) -> dict:
    """Lower, build and compile ``graph`` for an NVIDIA GPU of ``arch``; write the artifact.

    ``emit_source`` (a directory) also receives the CUDA source (``kernels.cu``).  Returns a
    report: kernel per layer, timings, sizes and the device code entries. ``calibration``: the
    ``csqc.calibration.Calibration`` the plan records; ``model_digest``: the ``csqc.provenance`` digest
    of the model it comes from.
    """
    nvcc = check_toolchain(arch)
    target = cuda_target(arch)
    t0 = time.perf_counter()
    plan = lower_graph(graph, force_kernel=force_kernel, on_layer=on_layer, backend=CudaBackend())
    t1 = time.perf_counter()
    executable = build_plan(plan, target)
    source = _device_module(executable).inspect_source()
    t2 = time.perf_counter()
    binary = compile_device_code(source, arch, nvcc)
    t3 = time.perf_counter()
    if emit_source is not None:
        folder = make_output_folder(emit_source, what="--emit-source")
        atomic_write(folder / "kernels.cu", lambda tmp: Path(tmp).write_text(source))
    entries = describe_fatbin(binary)
    meta = {"target": {"kind": "cuda", "arch": arch, "device_code": _DEVICE_FORMAT,
                       "entries": [list(e) for e in entries]}, "model": graph.name, **plan_entry(calibration),
            **provenance_entry(model_digest)}
    write_artifact(plan, _AheadOfTime(executable, source, binary), output, meta)
    weight_bytes = sum(int(a.nbytes) for a in plan.weights.values())  # stored in the artifact
    return {
        "target": "cuda", "output": str(output), "arch": arch,
        "kernels": {name: info["kernel"] for name, info in plan.layers.items()},
        "layers": plan.layers, "functions": len(plan.funcs), "steps": len(plan.steps),
        "lower_seconds": t1 - t0, "build_seconds": t2 - t1, "nvcc_seconds": t3 - t2,
        "device_code": {"format": _DEVICE_FORMAT, "bytes": len(binary), "entries": entries},
        "source_bytes": len(source), "weight_bytes": weight_bytes, "size_bytes": Path(output).stat().st_size,
    }
