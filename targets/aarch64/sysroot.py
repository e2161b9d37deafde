"""Build the aarch64 emulation sysroot: ``python -m csqc.targets.aarch64.sysroot [--dest DIR]``.

What it holds, all for arm64: Debian's ``python3.11`` and the shared libraries it and TVM load
(unpacked from ``.deb`` files with ``dpkg -x``, nothing installed into the system), and under
``opt/csqc-site`` the manylinux aarch64 wheels of numpy, apache-tvm, apache-tvm-ffi and their
dependencies at the versions installed in this Python, so the emulated runtime matches the
compiler. ``qemu-aarch64`` runs that Python (``csqc.targets.aarch64.emulation``).

Needs Debian or Ubuntu with apt, root for ``dpkg --add-architecture arm64`` when arm64 is not
yet a foreign architecture, network access to the apt mirror and the package index, and
``qemu-user`` (``apt-get install qemu-user``). About 430 MB on disk (the TVM wheel carries
its compiler library, which the emulated runtime never loads).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from csqc.errors import BadInput, CsqcError

from .emulation import QEMU, SYSROOT_ENV, SYSROOT_MARKER, SYSROOT_PYTHON, SYSROOT_SITE, sysroot_path

__all__ = ["DEBIAN_PACKAGES", "WHEELS", "build_sysroot", "main"]

log = logging.getLogger(__name__)

PYTHON_VERSION = "3.11"
# python3.11 and what it, numpy's bundled OpenBLAS and libtvm_runtime link against
DEBIAN_PACKAGES = [
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1", "libstdc++6",
    "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5", "libssl3", "libcrypt1", "libuuid1",
]
# pinned to this Python's versions: the emulated runtime must be the compiler's TVM
WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes"]
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux2014_aarch64"]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(command))
    try:
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as e:
        raise CsqcError(f"`{' '.join(command)}` failed: {(e.stderr or e.stdout).strip()[-600:]}") from None


def _ensure_arm64_packages_visible() -> None:
    """apt lists arm64 packages only once arm64 is a foreign architecture (a system change)."""
    if "arm64" not in _run(["dpkg", "--print-foreign-architectures"]).stdout.split():
        if os.geteuid() != 0:
            raise BadInput("arm64 is not a dpkg foreign architecture; as root run `dpkg --add-architecture arm64 "
                           "&& apt-get update`, then build the sysroot again")
        _run(["dpkg", "--add-architecture", "arm64"])
        _run(["apt-get", "update", "-qq"])
    elif subprocess.run(["apt-cache", "show", "python3.11-minimal:arm64"], capture_output=True).returncode != 0:
        _run(["apt-get", "update", "-qq"])


def _pinned_wheels() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def build_sysroot(dest: Path | None = None, *, force: bool = False) -> Path:
    """Build the sysroot at ``dest`` (default: the one ``csqc verify`` looks for); returns its path."""
    dest = Path(dest or sysroot_path()).absolute()
    if (dest / SYSROOT_MARKER).is_file() and not force:
        log.info("sysroot already at %s (use --force to rebuild)", dest)
        return dest
    for tool, package in (("apt-get", "apt"), ("dpkg", "dpkg"), (QEMU, "qemu-user")):
        if shutil.which(tool) is None:
            raise BadInput(f"building the aarch64 sysroot needs {tool} (Debian package {package})")
    start = time.perf_counter()
    _ensure_arm64_packages_visible()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as debs:
        # apt drops privileges to _apt for downloads, which cannot write a root-owned temp dir
        os.chmod(debs, 0o777)
        log.info("downloading %d Debian arm64 packages into %s", len(DEBIAN_PACKAGES), dest)
        _run(["apt-get", "download", *[f"{p}:arm64" for p in DEBIAN_PACKAGES]], cwd=debs)
        for deb in sorted(Path(debs).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(dest)])
    log.info("installing aarch64 wheels: %s", " ".join(_pinned_wheels()))
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
          "--target", str(dest / SYSROOT_SITE), *[f"--platform={p}" for p in WHEEL_PLATFORMS], "--only-binary=:all:",
          f"--python-version={PYTHON_VERSION}", "--implementation=cp", *_pinned_wheels()])
    _smoke_test(dest)
    info = {"python": PYTHON_VERSION, "debian_packages": DEBIAN_PACKAGES, "wheels": _pinned_wheels(),
            "seconds": round(time.perf_counter() - start, 1)}
    (dest / SYSROOT_MARKER).write_text(json.dumps(info, indent=1))
    return dest


def _smoke_test(dest: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QEMU_LD_PREFIX": str(dest),
           "PYTHONPATH": str(dest / SYSROOT_SITE), "PYTHONNOUSERSITE": "1", "TVM_USE_RUNTIME_LIB": "1"}
    probe = "import platform, numpy, tvm; print(platform.machine(), numpy.__version__, tvm.__version__)"
    out = _run([shutil.which(QEMU), str(dest / SYSROOT_PYTHON), "-c", probe], env=env).stdout.split()
    if not out or out[0] != "aarch64":
        raise CsqcError(f"the emulated Python reports {' '.join(out)!r}, expected an aarch64 machine")
    log.info("emulated Python runs: %s", " ".join(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csqc.targets.aarch64.sysroot", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help=f"where to build it (default: ${SYSROOT_ENV}, else {sysroot_path()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete sysroot is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if platform.machine() in ("aarch64", "arm64"):
        print("this machine runs aarch64 artifacts natively; no emulation sysroot is needed", file=sys.stderr)
        return 0
    try:
        path = build_sysroot(args.dest, force=args.force)
    except CsqcError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
