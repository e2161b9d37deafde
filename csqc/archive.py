"""Byte-reproducible zip members: compiling a model twice must give identical files.

``zipfile`` and ``np.savez`` stamp every member with the current time; these helpers stamp a
fixed one (the zip epoch) and write members in the order given.
"""
from __future__ import annotations

import io
import zipfile
from typing import Mapping

import numpy as np

__all__ = ["write_member", "npz_bytes"]

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
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            write_member(z, f"{name}.npy", member.getvalue())
    return buf.getvalue()
