"""Input arrays (``.npy`` / ``.npz``) whose headers are checked before any data is read.

An input file is untrusted: its header may claim 10^12 elements, and ``np.load`` would try to
allocate them. ``array_headers`` reads only the headers (never pickles) and refuses one that
claims more bytes than the file (or the zip member) can hold; callers then compare the shapes
with what the model or artifact takes, and only then load the data.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .archive import read_npy_header
from .errors import BadInput

__all__ = ["ArrayHeader", "array_headers", "read_arrays"]

_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand a stream by more than ~1032:1


@dataclass(frozen=True)
class ArrayHeader:
    name: str  # the .npz member's array name ("" for an .npy file)
    shape: tuple[int, ...]
    dtype: np.dtype


Check = Callable[[ArrayHeader, int], None]  # (header, its position) -> raise BadInput to refuse


def array_headers(path: str | Path, check: Check | None = None) -> list[ArrayHeader]:
    """The headers of an ``.npy`` file (one) or an ``.npz`` file (one per member, in order).

    ``check`` sees each header before its size is compared with the file's, so a caller's
    message about the shape it wants comes first.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip (.npz), empty or not, as np.load tells
                return _npz_headers(path, check)
            f.seek(0)
            return [_header(f, size, "", str(path), check, 0)]
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise BadInput(f"cannot read {path}: not a numeric .npy/.npz array file ({type(e).__name__}); "
                       "write inputs with numpy.save or numpy.savez") from None


def _array_name(member: str) -> str:
    return member[:-4] if member.endswith(".npy") else member


def _npz_headers(path: Path, check: Check | None) -> list[ArrayHeader]:
    out = []
    with zipfile.ZipFile(path) as z:
        seen: set[str] = set()
        for info in z.infolist():
            name = _array_name(info.filename)
            if name in seen:  # "x" and "x.npy" (or one name twice): which one is read would be a guess
                raise BadInput(f"{path}: holds two arrays named {name!r}; write it with np.savez")
            seen.add(name)
            room = info.file_size
            if info.compress_type == zipfile.ZIP_DEFLATED:  # the declared size is only a claim
                room = min(room, info.compress_size * _DEFLATE_MAX_RATIO)
            with z.open(info) as f:
                out.append(_header(f, room, name, f"{path}[{name}]", check, len(out)))
    return out


def _header(f: BinaryIO, room: int, name: str, where: str, check: Check | None, index: int) -> ArrayHeader:
    """One array header; ``room``: bytes the file or member holds, header included."""
    try:
        shape, dtype, _ = read_npy_header(f)
    except ValueError as e:
        raise BadInput(f"cannot read {where}: not a numeric .npy array ({str(e).splitlines()[0][:120]}); "
                       "write inputs with numpy.save or numpy.savez") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise BadInput(f"cannot read {where}: it holds {dtype} data, expected float32 numbers (csqc reads numeric "
                       "arrays only and never unpickles)")
    header = ArrayHeader(name, tuple(shape), dtype)
    if check is not None:
        check(header, index)
    need = math.prod(shape) * dtype.itemsize
    header_bytes = f.tell()
    if need > room - header_bytes:
        raise BadInput(f"{where}: the header claims an array of shape {list(shape)} ({need:,} bytes), more than "
                       f"the file holds; the file is damaged")
    return header


def read_arrays(path: str | Path, names: list[str], rows: int | None = None) -> list[np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file (``[""]``: an ``.npy`` file's one array), after
    ``array_headers`` checked them; with ``rows``, only the first ``rows`` samples of each are read
    (calibration takes a few hundred samples of a data set). Never unpickles."""
    path = Path(path)
    with open(path, "rb") as f:
        if names == [""]:
            return [_read_array(f, str(path), rows)]
    with zipfile.ZipFile(path) as z:
        members = {_array_name(info.filename): info for info in z.infolist()}
        out = []
        for name in names:
            with z.open(members[name]) as f:
                out.append(_read_array(f, f"{path}[{name}]", rows))
        return out


def _read_array(f: BinaryIO, where: str, rows: int | None) -> np.ndarray:
    shape, dtype, fortran = read_npy_header(f)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise BadInput(f"cannot read {where}: it holds {dtype} data (csqc reads numeric arrays only)")
    prefix = rows is not None and len(shape) > 0 and rows < shape[0] and not fortran
    if prefix:  # C order: the first rows are the first bytes
        shape = (rows, *shape[1:])
    nbytes = math.prod(shape) * dtype.itemsize
    buf = bytearray(nbytes)  # writable, as np.load's arrays are
    if f.readinto(buf) != nbytes:
        raise BadInput(f"cannot read {where}: the file ends before the {nbytes:,} bytes its header declares")
    array = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array[:rows] if rows is not None and not prefix else array
