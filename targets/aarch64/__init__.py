"""ARM64 (aarch64) target: cross-compiled bit-serial NEON kernels, run under qemu-user for checks.

* :mod:`.target` -- ``csqc compile --target aarch64``: the CPU planner with bit-serial kernels
  only, LLVM's aarch64 backend, linked by Debian's ``aarch64-linux-gnu-gcc``.
* :mod:`.sysroot` -- builds the emulation sysroot (Debian arm64 Python + aarch64 numpy / TVM
  wheels) that lets an x86 machine run such an artifact.
* :mod:`.emulation` -- runs an artifact in that sysroot under ``qemu-aarch64``; ``csqc verify``
  dispatches aarch64 artifacts there.
"""
