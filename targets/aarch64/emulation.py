"""Run aarch64 artifacts on another machine under qemu-user, for ``csqc verify`` and tests.

An x86 Python cannot load an aarch64 library, so the artifact runs in an aarch64 Python
(Debian's ``python3.11`` for arm64 plus aarch64 numpy / TVM wheels, see :mod:`.sysroot`)
executed by ``qemu-aarch64``, which translates its instructions (NEON included) one by one.
One emulated process per loaded artifact serves every call over pipes (``emulated_driver``);
it loads only the TVM runtime library (``TVM_USE_RUNTIME_LIB=1``), not the 240 MB compiler.

The sysroot is ``$CSQC_AARCH64_SYSROOT``, else ``~/.cache/csqc/aarch64-sysroot``; build it
with ``python -m csqc.targets.aarch64.sysroot``.
"""
from __future__ import annotations

import io
import logging
import os
import platform
import shutil
import struct
import subprocess
import weakref
from pathlib import Path

import numpy as np

from csqc.artifact import read_artifact
from csqc.calibration import plan_calibration
from csqc.errors import BadInput, CsqcError
from csqc.runtime import check_plan

__all__ = ["SYSROOT_ENV", "QEMU", "sysroot_path", "check_emulator", "artifact_target_kind", "needs_emulation",
           "EmulatedModel", "load_emulated"]

log = logging.getLogger(__name__)

SYSROOT_ENV = "CSQC_AARCH64_SYSROOT"
QEMU = "qemu-aarch64"
SETUP_COMMAND = "python -m csqc.targets.aarch64.sysroot"
SYSROOT_PYTHON = "usr/bin/python3.11"
SYSROOT_SITE = "opt/csqc-site"
SYSROOT_MARKER = "csqc-sysroot.json"  # written last by the sysroot builder: its presence means complete


def sysroot_path() -> Path:
    configured = os.environ.get(SYSROOT_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "csqc" / "aarch64-sysroot"


def check_emulator(sysroot: Path | None = None) -> tuple[str, Path]:
    """``(qemu path, sysroot)`` ready to run aarch64 artifacts; ``BadInput`` naming the fix otherwise."""
    sysroot = sysroot or sysroot_path()
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise BadInput(f"running an aarch64 artifact on this {platform.machine()} machine needs {QEMU}; "
                       "install it with `apt-get install qemu-user`")
    if not (sysroot / SYSROOT_MARKER).is_file():
        raise BadInput(f"no aarch64 emulation sysroot at {sysroot}; build it with `{SETUP_COMMAND} --dest {sysroot}` "
                       f"(or point {SYSROOT_ENV} at one)")
    return qemu, sysroot


def artifact_target_kind(path: str | os.PathLike) -> str | None:
    """The target kind recorded in an artifact's plan, or None when it has no readable plan."""
    try:
        target = read_artifact(path).plan.get("target")
    except BadInput:
        return None  # csqc.runtime reports the damage in detail
    return target.get("kind") if isinstance(target, dict) else None


def needs_emulation(path: str | os.PathLike) -> bool:
    return artifact_target_kind(path) == "aarch64" and platform.machine() not in ("aarch64", "arm64")


class EmulatedModel:
    """An aarch64 artifact served by an emulated process, with ``CompiledModel``'s call API.

    ``model(*inputs, record=dict)`` returns the outputs (one array or a list) and fills
    ``record`` with every intermediate buffer (or those of ``record_names``), like
    ``csqc.runtime.CompiledModel``.
    """

    def __init__(self, path: str | os.PathLike, *, sysroot: Path | None = None, threads: int = 1):
        self.path = Path(path)
        qemu, sysroot = check_emulator(sysroot)
        # digests and sizes are checked here, before the emulated runtime loads the library
        # (qemu-user is an emulator, not a sandbox: the library's code runs as this user)
        contents = read_artifact(self.path)
        check_plan(self.path, contents.plan, contents.weights)
        self.plan = contents.plan
        self.calibration = plan_calibration(self.plan, self.path)  # as CompiledModel.calibration
        self.inputs, self.outputs, self.layers = self.plan["inputs"], self.plan["outputs"], self.plan["layers"]
        self.target = "aarch64"
        import csqc
        import csqc.targets

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "QEMU_LD_PREFIX": str(sysroot),  # the emulated loader and libraries come from the sysroot
            "PYTHONPATH": str(sysroot / SYSROOT_SITE), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1",
        }
        command = [qemu, str(sysroot / SYSROOT_PYTHON), str(Path(__file__).with_name("emulated_driver.py")),
                   str(Path(csqc.__file__).parent), str(Path(csqc.targets.__file__).parent), str(self.path.resolve())]
        log.info("starting %s", " ".join(command))
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        # ends the emulated process when this object is collected, or at interpreter exit
        self._shut_down = weakref.finalize(self, _shut_down, self._process)
        try:
            self._expect_reply("loading")
        except CsqcError:
            self.close()
            raise

    def _expect_reply(self, doing: str) -> bytes:
        header = self._process.stdout.read(9)
        if len(header) < 9:
            code = self._process.wait()
            raise CsqcError(f"the emulated aarch64 runtime exited with code {code} while {doing} {self.path} "
                            "(its messages are above)")
        status, (size,) = header[:1], struct.unpack("<Q", header[1:])
        payload = self._process.stdout.read(size)
        if status == b"E":
            kind, _, message = payload.decode().partition(": ")
            # the runtime's own user-facing errors keep their exit code
            raise (BadInput if kind in ("BadInput", "UnsupportedOps") else CsqcError)(f"under emulation: {message}")
        return payload

    def __call__(self, *inputs, record: dict | None = None, record_names=None):
        if not self._shut_down.alive:
            raise CsqcError(f"{self.path}: the emulated model was closed; load it again")
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        request = io.BytesIO()
        # what to record: none, the names given, or every buffer (no entry)
        wanted = {} if record_names is None else {"record_names": np.array(sorted(record_names), dtype=str)}
        np.savez(request, **{f"input{i}": np.asarray(x) for i, x in enumerate(inputs)},
                 **(wanted if record is not None else {"record_names": np.array([], dtype=str)}))
        data = request.getvalue()
        try:
            self._process.stdin.write(struct.pack("<Q", len(data)) + data)
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the process died; _expect_reply reports its exit code
        with np.load(io.BytesIO(self._expect_reply("running")), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        outputs = [arrays[f"output{i}"] for i in range(len(self.outputs))]
        if record is not None:
            record.update({k.removeprefix("record/"): v for k, v in arrays.items() if k.startswith("record/")})
        return outputs[0] if len(outputs) == 1 else outputs

    def close(self) -> None:
        self._shut_down()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shut_down(process: subprocess.Popen) -> None:
    try:
        process.stdin.close()  # the driver exits at end of input
    except BrokenPipeError:
        pass  # it has exited already
    if process.poll() is None:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.stdout.close()


def load_emulated(path: str | os.PathLike, **kwargs) -> EmulatedModel:
    return EmulatedModel(path, **kwargs)
