"""The artifact file: a TVM shared library with its plan, weights and SHA-256 digests appended.

    [ELF shared library][zip: plan.json, weights.npz, integrity.json]

The dynamic loader ignores trailing bytes and zip readers find their directory at the end of
the file, so one path holds both. ``integrity.json`` records the library's length and the
SHA-256 of the library bytes, ``plan.json`` and ``weights.npz``.

An artifact is native code: loading it runs its constructors. ``read_artifact`` therefore
checks everything before any byte reaches the dynamic loader: the file is a regular file, the
zip holds exactly these three stored (uncompressed) members with sizes in bounds, every digest
matches, the library is an ELF file, and every weight array's declared size equals the bytes
it occupies (so nothing allocates more than the file holds). ``load_library`` then hands TVM
a private copy of the checked bytes named ``lib.so``: never the user's path, whose suffix
(``.o``, ``.tar``) would make TVM run a compiler or unpack an archive.

The digests detect damage and edits; they do not prove who built the file (whoever can edit
it can recompute them). Run only artifacts you built or trust.

This module owns the format: its constants, ``plan.json``'s top level (``plan_document``), and
the bit-parallel weight layouts by name (``layers[name]["pack"]``), which the planner packs and
the runtime derives again at load. It needs only numpy (the aarch64 emulated runtime imports it).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .archive import read_npy_header, write_member
from .bitplanes import kept_zero_point
from .errors import UNREADABLE_ARCHIVE, BadInput

__all__ = [
    "ARTIFACT_FORMAT", "ARTIFACT_VERSION", "ArtifactContents", "plan_document", "write_artifact_file", "read_artifact",
    "load_library", "physical_memory",
    "BITPARALLEL_LAYOUTS", "VNNI_LANES", "combine_planes", "bitparallel_weight_dtype", "pack_bitparallel_weight",
    "pack_bitparallel_conv_weight", "pack_bitparallel_layout", "pack_conv_rows_weight", "NIBBLE_HIGH_VALUES", "nibble_high_for_range",
    "nibble_range", "nibble_block_bytes", "pack_nibble_weight", "NIBBLE_K", "prefix_weight_range", "CHANNEL_LANES",
    "channel_lanes_shape", "channel_lanes_weight", "WINOGRAD_POINTS", "winograd_shape", "winograd_weight",
    "FLOAT_LAYOUTS", "float_layout_shape", "float_layout_weight",
]

ARTIFACT_FORMAT, ARTIFACT_VERSION = "csqc-artifact", 3  # 3: zero points per plane setting
PLAN, WEIGHTS, INTEGRITY = "plan.json", "weights.npz", "integrity.json"
_MEMBERS = (PLAN, WEIGHTS, INTEGRITY)
# generous for any model csqc compiles (the plan of a ResNet-50 is well under 1 MiB); weights
# are capped by this machine's memory when read
_MAX_BYTES = {PLAN: 64 << 20, INTEGRITY: 64 << 10}
_ELF_MAGIC = b"\x7fELF"
_ENCRYPTED = 0x1  # zip general-purpose flag bit 0


@dataclass(frozen=True)
class ArtifactContents:
    """What ``read_artifact`` checked: the plan, the weights by name and the library bytes."""

    plan: dict
    weights: dict[str, np.ndarray]
    library: bytes


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: no limit to check against
        return 1 << 62


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def whole_model_arguments(steps: list) -> list:
    """The arguments of a library's whole-model function, derived from the plan's steps: every
    buffer the steps use (first use first), then each layer's count of planes to accumulate, then
    the zero point of each layer whose zero point follows it (offset planes).
    The compiler declares the function with these parameters; the runtime refuses a plan whose
    ``entry`` says anything else (its steps and its function would disagree)."""
    buffers = dict.fromkeys(a for step in steps for a in step["args"] if isinstance(a, str))

    def layers(kind: str) -> dict:
        return dict.fromkeys(a[kind] for step in steps for a in step["args"] if isinstance(a, dict) and kind in a)

    return [*buffers, *({"planes": layer} for layer in layers("planes")),
            *({"zero_point": layer} for layer in layers("zero_point"))]


def plan_document(meta: dict, *, inputs: list, outputs: list, buffers: dict, steps: list, layers: dict,
                  entry: dict | None = None, pools: dict | None = None) -> dict:
    """``plan.json``: the format and version, the target's ``meta`` (target, model), then the plan;
    ``entry``: the call of a library function that runs every step (readers without it run the steps);
    ``pools``: memory temporary buffers share (name -> bytes; a buffer on one names it as its
    ``pool``; readers without it give each buffer its own memory)."""
    return {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, **meta, "inputs": inputs, "outputs": outputs,
            "buffers": buffers, "steps": steps, "layers": layers, **({"entry": entry} if entry else {}),
            **({"pools": pools} if pools else {})}


def write_artifact_file(path: str | os.PathLike, library: bytes, plan: dict, weights_npz: bytes) -> None:
    """Write the artifact atomically; ``plan`` must already carry the format and version."""
    from .outputs import atomic_write

    plan_bytes = json.dumps(plan).encode()
    integrity = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "library_bytes": len(library),
        "sha256": {"library": _sha256(library), PLAN: _sha256(plan_bytes), WEIGHTS: _sha256(weights_npz)},
    }

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(library)
        with zipfile.ZipFile(tmp, "a", zipfile.ZIP_STORED) as z:
            write_member(z, PLAN, plan_bytes)
            write_member(z, WEIGHTS, weights_npz)
            write_member(z, INTEGRITY, json.dumps(integrity, indent=1).encode())

    atomic_write(path, write)


_ONNX_IS_NO_ARTIFACT = (
    "{path} is an ONNX model; `csqc run` and csqc.runtime.load take the .so artifacts of --target llvm, cuda "
    "or aarch64. Run an ONNX model with onnxruntime (onnxruntime.InferenceSession('{path}')), or check it "
    "against the model with `csqc verify MODEL --artifact {path}`")


def _damaged(path: Path, what: str) -> BadInput:
    return BadInput(f"{path}: the artifact is damaged or was edited after compilation ({what}); "
                    "compile the model again")


def _open_regular(path: Path):
    """Open ``path`` for reading if it is a regular file (a FIFO would block, a device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such artifact file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot open the artifact ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(f"{path}: not a regular file; an artifact is a file written by `csqc compile`")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_artifact(path: str | os.PathLike) -> ArtifactContents:
    """Read and check an artifact without loading its library; ``BadInput`` (exit code 2) for
    anything that is not exactly what csqc writes."""
    path = Path(path)
    with _open_regular(path) as f:
        try:
            with zipfile.ZipFile(f) as z:
                infos = _checked_members(path, z)
                integrity = _integrity(path, z.read(infos[INTEGRITY]))
                library = _library(path, f, integrity, min(i.header_offset for i in infos.values()))
                members = {name: z.read(infos[name]) for name in (PLAN, WEIGHTS)}
        except UNREADABLE_ARCHIVE as e:
            if path.suffix.lower() == ".onnx":
                raise BadInput(_ONNX_IS_NO_ARTIFACT.format(path=path)) from None
            raise BadInput(f"{path}: not a csqc artifact ({type(e).__name__}); compile one with `csqc compile`") from None
    for name, data in members.items():
        if _sha256(data) != integrity["sha256"][name]:
            raise _damaged(path, f"{name} does not match its SHA-256")
    try:
        plan = json.loads(members[PLAN])
    except (ValueError, RecursionError):
        raise _damaged(path, "plan.json is not JSON") from None
    if not isinstance(plan, dict) or plan.get("format") != ARTIFACT_FORMAT or plan.get("version") != ARTIFACT_VERSION:
        raise _damaged(path, f"plan.json is not a {ARTIFACT_FORMAT} plan of version {ARTIFACT_VERSION}")
    return ArtifactContents(plan, _read_weights(path, members[WEIGHTS]), library)


def _checked_members(path: Path, z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The three members, stored and within their size caps; nothing else may be there."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    if INTEGRITY not in names and PLAN in names:
        raise BadInput(f"{path}: an artifact from an older csqc (format version 1, without SHA-256 digests); "
                       "compile the model again with this csqc")
    if sorted(names) != sorted(_MEMBERS):
        raise BadInput(f"{path}: not a csqc artifact (its archive holds {sorted(names)[:5]}, "
                       f"csqc writes exactly {list(_MEMBERS)}); compile one with `csqc compile`")
    for info in infos:
        limit = _MAX_BYTES.get(info.filename, physical_memory())
        # csqc stores members uncompressed: a compressed member could inflate far beyond the file
        if (info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size
                or info.flag_bits & _ENCRYPTED or info.file_size > limit):
            raise _damaged(path, f"member {info.filename} is compressed, encrypted or too large")
    return {i.filename: i for i in infos}


def _integrity(path: Path, data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    digests = doc.get("sha256") if isinstance(doc, dict) else None
    if (not isinstance(digests, dict) or type(doc.get("library_bytes")) is not int
            or not all(isinstance(digests.get(k), str) for k in ("library", PLAN, WEIGHTS))):
        raise _damaged(path, "integrity.json is unreadable")
    if doc.get("format") != ARTIFACT_FORMAT or doc.get("version") != ARTIFACT_VERSION:
        raise BadInput(f"{path}: an artifact of format {doc.get('format')!r} version {doc.get('version')!r}; "
                       f"this csqc reads {ARTIFACT_FORMAT} version {ARTIFACT_VERSION}: compile the model again")
    return doc


def _library(path: Path, f, integrity: dict, zip_start: int) -> bytes:
    """The bytes in front of the zip: exactly the library the digests describe."""
    if integrity["library_bytes"] != zip_start:
        raise _damaged(path, f"the library is {zip_start} bytes, integrity.json says {integrity['library_bytes']}")
    f.seek(0)
    library = f.read(zip_start)
    if not library.startswith(_ELF_MAGIC):
        raise _damaged(path, "the library part is not an ELF shared library")
    if _sha256(library) != integrity["sha256"]["library"]:
        raise _damaged(path, "the library does not match its SHA-256")
    return library


def _read_weights(path: Path, data: bytes) -> dict[str, np.ndarray]:
    """The arrays of ``weights.npz``; each array's declared size must be exactly the bytes it
    holds, so reading never allocates more than the file itself."""
    weights: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                if (name == info.filename or name in weights or info.compress_type != zipfile.ZIP_STORED
                        or info.file_size != info.compress_size or info.flag_bits & _ENCRYPTED):
                    raise _damaged(path, f"weights.npz member {info.filename!r} is not a stored .npy or is repeated")
                weights[name] = _npy_array(path, name, z.read(info))
    except UNREADABLE_ARCHIVE as e:
        raise _damaged(path, f"weights.npz cannot be read ({type(e).__name__})") from None
    return weights


def _npy_array(path: Path, name: str, raw: bytes) -> np.ndarray:
    fp = io.BytesIO(raw)
    try:
        shape, dtype, fortran = read_npy_header(fp)
    except ValueError as e:
        raise _damaged(path, f"weight {name!r} is not an .npy array csqc writes ({str(e).splitlines()[0][:120]})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise _damaged(path, f"weight {name!r} is not a numeric array")
    count = math.prod(shape)
    if any(d < 0 for d in shape) or count * dtype.itemsize != len(raw) - fp.tell():
        raise _damaged(path, f"weight {name!r} declares {dtype}{list(shape)}, which is not the "
                             f"{len(raw) - fp.tell()} bytes it holds")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=fp.tell()) if count else np.empty(0, dtype)
    return array.reshape(shape, order="F" if fortran else "C")


def load_library(library: bytes):
    """Load checked library bytes as a TVM module from a private ``lib.so``.

    TVM picks a loader by file suffix (``.o`` runs the system compiler, ``.tar`` unpacks), so
    csqc never hands it a path the user named; the folder is private (0700) and removed once
    the library is mapped.
    """
    import tvm

    with tempfile.TemporaryDirectory(prefix="csqc-lib-") as folder:
        lib = os.path.join(folder, "lib.so")
        with open(lib, "wb") as f:
            f.write(library)
        return tvm.runtime.load_module(lib)


# --------------------------------------------------------------------------------------------
# Weight layouts by name: a bit-parallel layer stores only its bitplanes; its int8 buffer is
# derived at load (``layers[name]["pack"]`` names the layout), by the runtime and the planner alike
# --------------------------------------------------------------------------------------------
BITPARALLEL_LAYOUTS = ("dense", "depthwise", "conv", "nibble", "conv_rows")
VNNI_LANES = 16  # int32 outputs per 512-bit vpdpbusd


def combine_planes(planes: np.ndarray, shifts_signs, zero_point: int = 0,
                   n_planes: int | None = None) -> np.ndarray:
    """Integer weights ``q = sum_p sign_p 2^shift_p plane_p - zero_point`` (int64), using only
    the first ``n_planes`` planes when given (most significant first), with the zero point
    that goes with them (``bitplanes.kept_zero_point``)."""
    planes = np.asarray(planes).astype(np.int64)
    used = len(shifts_signs) if n_planes is None else min(n_planes, len(shifts_signs))
    q = np.zeros(planes.shape[1:], dtype=np.int64)
    for (shift, sign), plane in zip(shifts_signs[:used], planes[:used]):
        q += sign * (plane << shift)
    return q - kept_zero_point(zero_point, [shift for shift, _ in shifts_signs], used)


def bitparallel_weight_dtype(q: np.ndarray) -> str:
    """``"int8"`` when every weight fits int8 (the vpdpbusd path), else ``"int16"``."""
    q = np.asarray(q)
    if q.size == 0 or (q.min() >= -128 and q.max() <= 127):
        return "int8"
    if q.min() >= -32768 and q.max() <= 32767:
        return "int16"
    raise ValueError("bit-parallel weights must fit int16")


def pack_bitparallel_weight(q: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """Pack integer weights ``q[N, K]`` for the bit-parallel dense kernel: int8
    ``[ceil(N/16), ceil(K/4), 64]`` or int16 ``[ceil(N/16), K, 16]`` (zero padded)."""
    q = np.asarray(q)
    n, k = q.shape
    dtype = dtype or bitparallel_weight_dtype(q)
    n_tiles = -(-n // VNNI_LANES)
    if dtype == "int8":
        k4 = -(-k // 4)
        padded = np.zeros((n_tiles * VNNI_LANES, k4 * 4), dtype=np.int8)
        padded[:n, :k] = q
        blocked = padded.reshape(n_tiles, VNNI_LANES, k4, 4).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(blocked.reshape(n_tiles, k4, VNNI_LANES * 4))
    if dtype == "int16":
        padded = np.zeros((n_tiles * VNNI_LANES, k), dtype=np.int16)
        padded[:n] = q
        return np.ascontiguousarray(padded.reshape(n_tiles, VNNI_LANES, k).transpose(0, 2, 1))
    raise ValueError(f"unsupported bit-parallel weight dtype {dtype}")


def pack_bitparallel_conv_weight(q: np.ndarray, groups: int) -> np.ndarray:
    """Pack conv weights ``q[O, C/groups, kh, kw]`` (must fit int8) into
    ``[G, ceil(Og/16), kh*kw*ceil(Cg/4), 64]`` with K ordered ``(r, s, c)``."""
    q = np.asarray(q)
    o, cg, kh, kw = q.shape
    if bitparallel_weight_dtype(q) != "int8":
        raise ValueError("bit-parallel conv weights must fit int8")
    og = o // groups
    cg4 = -(-cg // 4) * 4
    rsc = np.zeros((groups, og, kh, kw, cg4), dtype=np.int64)
    rsc[..., :cg] = q.reshape(groups, og, cg, kh, kw).transpose(0, 1, 3, 4, 2)
    flat = rsc.reshape(groups, og, kh * kw * cg4)
    return np.stack([pack_bitparallel_weight(flat[g], "int8") for g in range(groups)])


def pack_conv_rows_weight(q: np.ndarray) -> np.ndarray:
    """Conv weights ``q[O, C, kh, kw]`` (one group, int8 range) as ``[O, kh*kw, 4*ceil(C/4)]``:
    one row per output channel, the input channels of each tap contiguous (zero past C), the
    first operand of the AMX conv kernel's tile products."""
    q = np.asarray(q)
    o, c, kh, kw = q.shape
    if bitparallel_weight_dtype(q) != "int8":
        raise ValueError("bit-parallel conv weights must fit int8")
    rows = np.zeros((o, kh * kw, -(-c // 4) * 4), dtype=np.int8)
    rows[:, :, :c] = q.transpose(0, 2, 3, 1).reshape(o, kh * kw, c)
    return rows


# Nibble layout (dense layers whose weights span at most 32 values): each weight is the byte
# ``low | (fifth_bit ? H : 0)`` of a 4-bit ``low`` and an optional fifth bit worth ``H`` (-16:
# the byte 0xF0 makes ``low - 16``; +16), so the kernel rebuilds the exact int8 weight in
# registers and needs no correction term. Per 16 outputs and 32 K positions (8 vpdpbusd groups
# of 4, each a 64-byte vector in the dense int8 layout's byte order ``4 * lane + t``) one block:
# four 64-byte vectors of nibbles (vector p: group 2p in the low nibbles, group 2p+1 in the high
# ones) and, with a fifth bit, a 64-byte vector whose byte b holds the fifth bits of byte b of
# the 8 groups (bit j: group j). 5 bits per weight instead of 8.
NIBBLE_HIGH_VALUES = (0, -16, 16)
NIBBLE_K = 32  # K positions per block
NIBBLE_BLOCK = 64  # bytes per vector of a block


def nibble_range(high: int) -> tuple[int, int]:
    """The weights (inclusive bounds) the nibble layout with fifth bit ``high`` holds."""
    if high not in NIBBLE_HIGH_VALUES:
        raise ValueError(f"nibble fifth-bit value must be one of {NIBBLE_HIGH_VALUES}, got {high!r}")
    return {0: (0, 15), -16: (-16, 15), 16: (0, 31)}[high]


def prefix_weight_range(planes: np.ndarray, shifts_signs, zero_point: int) -> tuple[int, int]:
    """Smallest and largest weight ``combine_planes(planes, shifts_signs, zero_point, n)`` takes
    for any ``n >= 1`` (the run-time plane knob keeps a most significant prefix of the planes,
    with its zero point)."""
    shifts = [shift for shift, _ in shifts_signs]
    total = np.zeros(np.asarray(planes).shape[1:], dtype=np.int64)
    low, high = None, None
    for kept, ((shift, sign), plane) in enumerate(zip(shifts_signs, planes), 1):
        total += sign * (np.asarray(plane).astype(np.int64) << shift)
        q = total - kept_zero_point(zero_point, shifts, kept)  # (each prefix has its own zero point)
        low = int(q.min(initial=0)) if low is None else min(low, int(q.min(initial=0)))
        high = int(q.max(initial=0)) if high is None else max(high, int(q.max(initial=0)))
    return (low, high) if low is not None else (-zero_point, -zero_point)


def nibble_high_for_range(lo: int, hi: int) -> int | None:
    """The fifth-bit value of the narrowest nibble layout holding weights in ``[lo, hi]`` (None: none does)."""
    for high in NIBBLE_HIGH_VALUES:
        low, top = nibble_range(high)
        if low <= lo and hi <= top:
            return high
    return None


def nibble_block_bytes(high: int) -> int:
    return NIBBLE_BLOCK * (5 if high else 4)


def pack_nibble_weight(q: np.ndarray, high: int) -> np.ndarray:
    """Pack ``q[N, K]`` (``N % 16 == 0``, ``K % 32 == 0``) into the nibble layout: uint8
    ``[N/16, K/32, 256 (+64 with a fifth bit)]``."""
    q = np.asarray(q).astype(np.int64)
    n, k = q.shape
    lo, hi = nibble_range(high)
    if n % VNNI_LANES or k % NIBBLE_K:
        raise ValueError(f"nibble weights need N % {VNNI_LANES} == 0 and K % {NIBBLE_K} == 0, got {n} x {k}")
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"weights span [{q.min()}, {q.max()}], outside the nibble layout's [{lo}, {hi}]")
    # [tiles, blocks, 8 groups, 64 bytes] in the dense int8 byte order
    groups = q.reshape(n // VNNI_LANES, VNNI_LANES, k // NIBBLE_K, 8, 4).transpose(0, 2, 3, 1, 4).reshape(
        n // VNNI_LANES, k // NIBBLE_K, 8, NIBBLE_BLOCK)
    low = (groups & 15).astype(np.uint8)
    vectors = [low[:, :, 0::2] | (low[:, :, 1::2] << 4)]
    if high:
        fifth = ((groups >> 4) & 1).astype(np.uint8)
        vectors.append(sum(fifth[:, :, j] << j for j in range(8)).astype(np.uint8)[:, :, None])
    blocks = np.concatenate(vectors, axis=2)
    return np.ascontiguousarray(blocks.reshape(n // VNNI_LANES, k // NIBBLE_K, -1))


CHANNEL_LANES = 16  # output channels a vector of the channels-on-lanes float conv holds


def channel_lanes_shape(weight_shape) -> tuple[int, ...]:
    """The shape :func:`channel_lanes_weight` gives a ``[O, C, KH, KW]`` weight."""
    o, c, kh, kw = (int(d) for d in weight_shape)
    return -(-o // CHANNEL_LANES), c, kh, kw, CHANNEL_LANES


def channel_lanes_weight(w: np.ndarray) -> np.ndarray:
    """A conv's float32 weights ``[O, C, KH, KW]`` as the channels-on-lanes float kernel reads
    them: ``[ceil(O/16), C, KH, KW, 16]`` (each tile's weights in the order its sums read
    them), the padding channels zero."""
    o, c, kh, kw = w.shape
    tiles = channel_lanes_shape(w.shape)[0]
    padded = np.zeros((tiles * CHANNEL_LANES, c, kh, kw), np.float32)
    padded[:o] = w
    return np.ascontiguousarray(padded.reshape(tiles, CHANNEL_LANES, c, kh, kw).transpose(0, 2, 3, 4, 1))


WINOGRAD_POINTS = 16  # the 4x4 transformed points of an F(2x2, 3x3) tile

# G of F(2x2, 3x3): U = G g G^T (Lavin and Gray, CVPR 2016)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)


def winograd_shape(weight_shape, block: int) -> tuple[int, ...]:
    """The shape :func:`winograd_weight` gives a ``[O, C, 3, 3]`` weight."""
    o, c, kh, kw = (int(d) for d in weight_shape)
    if (kh, kw) != (3, 3) or not block > 0:
        raise ValueError(f"the Winograd layout takes 3x3 weights and a block > 0, got {weight_shape}, {block}")
    return WINOGRAD_POINTS, -(-o // block), c, block


def winograd_weight(w: np.ndarray, block: int) -> np.ndarray:
    """A 3x3 conv's float32 weights ``[O, C, 3, 3]`` as the Winograd F(2x2, 3x3) float kernel
    reads them: ``U = G g G^T`` per output and input channel, laid out ``[16, ceil(O/block), C,
    block]`` (each register tile's weights contiguous), the padding channels zero. Computed in
    float64, so exact in float32 wherever float32 holds the result: for integer weights of
    magnitude up to 2^20 (quarters below 2^22)."""
    points, blocks, c, _ = winograd_shape(w.shape, block)
    o = w.shape[0]
    padded = np.zeros((blocks * block, c, 3, 3), np.float64)
    padded[:o] = w
    u = np.einsum("ik,ockl,jl->ijco", _WINOGRAD_G, padded, _WINOGRAD_G).reshape(points, c, blocks, block)
    return np.ascontiguousarray(u.transpose(0, 2, 1, 3).astype(np.float32))


# Float conv weight layouts a plan names (``float_layout``, with ``float_block`` for Winograd's)
FLOAT_LAYOUTS = ("channel_lanes", "winograd")


def float_layout_shape(weight_shape, layout: str | None, block: int = 0) -> tuple[int, ...]:
    """The shape of a ``[O, C, KH, KW]`` conv weight in float layout ``layout`` (None: as it is)."""
    if layout is None:
        return tuple(int(d) for d in weight_shape)
    if layout == "channel_lanes":
        return channel_lanes_shape(weight_shape)
    if layout == "winograd":
        return winograd_shape(weight_shape, block)
    raise ValueError(f"unknown float layout {layout!r}")


def float_layout_weight(w: np.ndarray, layout: str | None, block: int = 0) -> np.ndarray:
    """Float32 conv weights ``w`` in float layout ``layout`` (see :func:`float_layout_shape`)."""
    if layout is None:
        return np.ascontiguousarray(w, np.float32)
    if layout == "channel_lanes":
        return channel_lanes_weight(w)
    if layout == "winograd":
        return winograd_weight(w, block)
    raise ValueError(f"unknown float layout {layout!r}")


def pack_bitparallel_layout(layout: str, q: np.ndarray, weight_shape, groups: int,
                            nibble_high: int = 0) -> np.ndarray:
    """The int8 (int32 for ``depthwise``, uint8 for ``nibble``) buffer of layout ``layout`` for
    integer weights ``q``."""
    if layout == "nibble":
        return pack_nibble_weight(q.reshape(weight_shape[0], -1), nibble_high)
    if layout == "dense":
        return pack_bitparallel_weight(q.reshape(weight_shape[0], -1), "int8")
    if layout == "depthwise":
        return q.reshape(weight_shape[0], -1).astype(np.int32)
    if layout == "conv":
        return pack_bitparallel_conv_weight(q.reshape(weight_shape), groups)
    if layout == "conv_rows":
        if groups != 1:
            raise ValueError("the conv_rows layout holds one group")
        return pack_conv_rows_weight(q.reshape(weight_shape))
    raise ValueError(f"unknown bit-parallel layout {layout!r}")
