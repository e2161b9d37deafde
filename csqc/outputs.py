"""Writing outputs without destroying anything: checked up front, written whole or not at all.

Every command checks its output paths with ``check_output`` / ``check_output_folder`` before the
long work (a path too long, a missing or read-only folder, a device or FIFO, an input file named
again as the output) and writes files with ``atomic_write``: a temporary file in the same folder
renamed over the output, removed on any failure, on Ctrl-C and on SIGTERM/SIGHUP (the CLI turns
those into ``Terminated`` with ``terminate_on_signals``).
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import BadInput, CsqcError

__all__ = ["check_output", "check_output_folder", "make_output_folder", "atomic_write", "Terminated",
           "terminate_on_signals", "check_writable"]

PathLike = str | os.PathLike
# errors that mean "this disk cannot take the file", not "csqc is broken"
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file is larger than this file system allows",
                errno.EROFS: "the file system is read-only"}
_TMP_NAME_CHARS = 64  # temporaries keep a short prefix of the name: a long output name stays legal


def _stat(path: Path, what: str) -> os.stat_result | None:
    """``os.stat`` of ``path`` (following links), None when it does not exist; one-line errors otherwise."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise BadInput(f"{what} {path}: a part of this path is a file, not a folder") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise BadInput(f"{what} {path}: the path or one of its names is too long for this file system") from None
        if e.errno == errno.ELOOP:
            raise BadInput(f"{what} {path}: too many levels of symbolic links") from None
        raise BadInput(f"{what} {path}: cannot check this path ({e.strerror})") from None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output(path: PathLike, *, inputs: Iterable[PathLike | None] = (), what: str = "output") -> Path:
    """``path`` as a ``Path`` if csqc may write a file there; ``BadInput`` (exit code 2) if not.

    Accepts a new name in an existing writable folder, or an existing regular file that is none
    of ``inputs`` (compared by device and inode, so symbolic and hard links count as the same
    file). Refuses folders, devices, FIFOs and sockets: replacing ``/dev/null`` with a file would
    break the system, and writing into a FIFO would block forever.
    """
    path = Path(path)
    if not str(path) or path.name in ("", ".", ".."):
        raise BadInput(f"{what} {str(path)!r} is not a file name; give a file path")
    st = _stat(path, what)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path} is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{what} {path} is a device, FIFO or socket, not a regular file; "
                           "csqc writes only regular files, give a file path")
        for source in inputs:
            source_st = _stat(Path(source), "input") if source else None
            if source_st is not None and _same_file(st, source_st):
                raise BadInput(f"{what} {path} is the input file {source}; give another output name "
                               "(csqc never overwrites its inputs)")
    _check_parent(path, what)
    return path


def _check_parent(path: Path, what: str) -> None:
    parent = path.parent
    st = _stat(parent, f"{what} folder")
    if st is None:
        raise BadInput(f"{what} folder {parent} does not exist")
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} folder {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{what} folder {parent} is not writable")


def check_output_folder(path: PathLike, *, what: str = "output folder") -> Path:
    """``path`` if it is a folder csqc can write into, or one it can create (its nearest existing
    ancestor is a writable folder); ``BadInput`` otherwise."""
    path = Path(path)
    st = _stat(path, what)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path} exists and is not a folder; give a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadInput(f"{what} {path} is not writable")
        return path
    ancestor = path.absolute().parent
    while (st := _stat(ancestor, what)) is None:
        ancestor = ancestor.parent
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {path}: cannot create it, {ancestor} is not writable")
    return path


def make_output_folder(path: PathLike, *, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) after ``check_output_folder``; one-line errors."""
    path = check_output_folder(path, what=what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e, what) from None
    return path


def _write_error(path: Path, e: OSError, what: str = "output") -> CsqcError:
    """A one-line error for an ``OSError`` while writing ``path``."""
    reason = _DISK_ERRNOS.get(e.errno)
    if reason:
        return CsqcError(f"cannot write {what} {path}: {reason} ({e.strerror}); free some space or write elsewhere")
    # a path the user chose and csqc may not use is bad input; anything else is a failure here
    kind = BadInput if e.errno in (errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR) else CsqcError
    return kind(f"cannot write {what} {path}: {e.strerror or e}")


def atomic_write(path: PathLike, write: Callable[[str], None], *, inputs: Iterable[PathLike | None] = ()) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``; nothing is left on failure.

    An existing output keeps its permission bits (a private 0600 file stays private); a new one
    gets the usual ``0666 & ~umask``. A full disk is a one-line ``CsqcError`` (exit code 1), and
    the output, if it existed, is untouched.
    """
    path = check_output(path, inputs=inputs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_TMP_NAME_CHARS]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _remove(tmp)
        raise


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:  # a new file (mkstemp made it 0600): the mode a plain open() would give
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C so every ``finally`` cleans up.

    A ``BaseException`` for the same reason as ``KeyboardInterrupt``: ``except Exception``
    handlers on the way must not swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def terminate_on_signals(signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Turn ``signals`` into ``Terminated`` in the main thread (the CLI's entry point calls this).

    Without it the process dies at once and leaves temporary files and folders behind; with it
    ``atomic_write`` and ``tempfile.TemporaryDirectory`` remove theirs on the way out.
    """
    for signum in signals:
        signal.signal(signum, _raise_terminated)


check_writable = check_output  # the name modelfile and older code use
