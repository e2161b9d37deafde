"""Zip archives csqc writes and reads: byte-reproducible members, and bounded, checked reads.

Writing: ``zipfile`` and ``np.savez`` stamp every member with the current time; these helpers
stamp a fixed one (the zip epoch) and write members in the order given.

Reading: model files, IR files and artifacts are untrusted. ``unique_members`` refuses duplicate
names, ``check_member_size`` / ``read_member`` refuse members larger than the caller expects or
inflating more than deflate can, and ``read_npz`` checks every array's declared size before
allocating it, all with a one-line ``BadInput``.
"""
from __future__ import annotations

import io
import math
import zipfile
from typing import Mapping

import numpy as np

from .errors import UNREADABLE_ARCHIVE, BadInput

__all__ = ["write_member", "npz_bytes", "unique_members", "check_member_size", "read_member", "read_npz",
           "read_npy_header", "plain_dtype_problem", "MAX_INFLATION"]

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip header can hold


def write_member(z: zipfile.ZipFile, name: str, data: bytes, compress: int = zipfile.ZIP_STORED) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    z.writestr(info, data)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` (readable by ``np.load(allow_pickle=False)``) with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype.hasobject:
                raise TypeError(f"{name}: object arrays cannot be stored without pickle")
            member = io.BytesIO()
            contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # which makes 0-d 1-d
            np.lib.format.write_array(member, contiguous, allow_pickle=False)
            write_member(z, f"{name}.npy", member.getvalue())
    return buf.getvalue()


# -- reading: every zip csqc reads goes through these checks -----------------------------------

# Deflate cannot inflate more than about 1032:1; a member claiming more is nested or exotic
# compression (a zip bomb). Small members are exempt: a few zero bytes compress absurdly well.
MAX_INFLATION = 1100
_SMALL_MEMBER = 1 << 20
_KNOWN_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def unique_members(z: zipfile.ZipFile, what: str) -> dict[str, zipfile.ZipInfo]:
    """The members of ``z`` by name; ``BadInput`` if a name appears twice (zipfile reads the last)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in z.infolist():
        if info.filename in members:
            raise BadInput(f"{what}: the archive holds two members named {info.filename!r}; the file is damaged "
                           "or was edited")
        members[info.filename] = info
    return members


def check_member_size(info: zipfile.ZipInfo, what: str, limit: int) -> None:
    """``BadInput`` unless ``info`` declares at most ``limit`` bytes, inflated at a plausible ratio."""
    name = f"{what}: member {info.filename!r}"
    if info.compress_type not in _KNOWN_COMPRESSION:
        raise BadInput(f"{name} uses compression method {info.compress_type}; csqc writes only stored or "
                       "deflated members")
    if info.file_size > limit:
        raise BadInput(f"{name} claims {info.file_size} bytes, more than the {limit} it may hold; refusing")
    if info.file_size > max(_SMALL_MEMBER, MAX_INFLATION * info.compress_size):
        raise BadInput(f"{name} inflates {info.compress_size} bytes to {info.file_size}, more than deflate "
                       "can; refusing a zip bomb")


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, what: str, limit: int) -> bytes:
    """The bytes of one member after ``check_member_size``; damage becomes ``BadInput``."""
    check_member_size(info, what, limit)
    try:
        return z.read(info)
    except UNREADABLE_ARCHIVE as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(f"{what}: member {info.filename!r} cannot be read ({type(e).__name__}: {reason}); "
                       "the file is damaged") from None


TensorSpec = tuple[tuple[int, ...], np.dtype]


def plain_dtype_problem(dtype: np.dtype) -> str | None:
    """Why ``dtype`` cannot be a tensor csqc stores (object, structured, long double, big-endian), or None."""
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        return f"dtype {dtype} is not a plain number type"
    if dtype.itemsize > 8:
        return f"dtype {dtype} ({dtype.itemsize * 8}-bit) is wider than any tensor csqc stores"
    if dtype.byteorder == ">":
        return f"dtype {dtype} is big-endian"
    return None


def read_npz(data: bytes, what: str, *, limit_bytes: int,
             expected: Mapping[str, TensorSpec] | None = None, stored_only: bool = False) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` read without pickle, each size checked before it is read.

    Every member must be an ``.npy`` whose header's shape times item size is exactly the
    member's declared size; the arrays together may hold at most ``limit_bytes``. With
    ``expected`` (name -> (shape, dtype)) every array must be one of them, with that shape and
    dtype. ``stored_only``: every member must be stored, not deflated (what ``np.savez`` and
    ``npz_bytes`` write), so an ``.npz`` inside a deflated archive cannot nest one zip bomb in another.
    Anything else is ``BadInput``; no array is allocated before its checks pass.
    """
    arrays: dict[str, np.ndarray] = {}
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in unique_members(z, what).values():
                key = info.filename.removesuffix(".npy")
                if key == info.filename:
                    raise BadInput(f"{what}: member {info.filename!r} is not an .npy array")
                if expected is not None and key not in expected:
                    raise BadInput(f"{what}: holds tensor {key!r}, which the model does not use")
                if stored_only and info.compress_type != zipfile.ZIP_STORED:
                    raise BadInput(f"{what}: tensor {key!r} is compressed; csqc writes tensors uncompressed "
                                   "(the file is damaged or was edited)")
                check_member_size(info, what, limit_bytes - total + 4096)
                with z.open(info) as f:
                    shape, dtype, fortran = _npy_header(f, f"{what}: tensor {key!r}")
                    nbytes = math.prod(shape) * dtype.itemsize
                    if f.tell() + nbytes != info.file_size:
                        raise BadInput(f"{what}: tensor {key!r} declares {dtype}{list(shape)} ({nbytes} bytes) but "
                                       f"its member holds {info.file_size - f.tell()}; the file is damaged")
                    if expected is not None and (shape, dtype) != expected[key]:
                        want_shape, want_dtype = expected[key]
                        raise BadInput(f"{what}: tensor {key!r} is {dtype}{list(shape)}, the model expects "
                                       f"{want_dtype}{list(want_shape)}; the file is damaged")
                    total += nbytes
                    if total > limit_bytes:
                        raise BadInput(f"{what}: tensors claim more than {limit_bytes} bytes; refusing")
                    flat = np.frombuffer(_read_exactly(f, nbytes), dtype=dtype)
                arrays[key] = flat.reshape(shape, order="F" if fortran else "C")
    except UNREADABLE_ARCHIVE as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(f"{what}: tensor data is damaged ({type(e).__name__}: {reason})") from None
    return arrays


def _read_exactly(f, nbytes: int, chunk: int = 1 << 24) -> bytearray:
    """``nbytes`` from ``f`` into one writable buffer, a chunk at a time (``bytearray(f.read(n))``
    would hold the data twice)."""
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        piece = f.read(min(chunk, nbytes - done))
        if not piece:
            raise EOFError(f"the member ends after {done} of {nbytes} bytes")
        view[done:done + len(piece)] = piece
        done += len(piece)
    return buf


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and Fortran order of the ``.npy`` header at ``f``'s position (numpy parses it
    as a literal, never unpickles); ``ValueError`` for anything but format versions 1.0 and 2.0."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"format version {version}, which csqc does not write")
    return tuple(int(s) for s in shape), dtype, bool(fortran)


def _npy_header(f, what: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        shape, dtype, fortran = read_npy_header(f)
    except ValueError as e:
        raise BadInput(f"{what} is not an .npy array csqc reads ({str(e).splitlines()[0][:120]})") from None
    problem = plain_dtype_problem(dtype)
    if problem:
        raise BadInput(f"{what}: {problem}; the file is damaged")
    return shape, dtype, fortran
