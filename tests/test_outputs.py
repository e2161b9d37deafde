"""Outputs never destroy files: checked before the work, written whole, cleaned up on signals.

Exit codes: a path csqc may not write (device, FIFO, an input, too long, missing folder) is bad
input (2) and is refused before any work; a full disk is a failure (1) with one line and no
partial file; SIGTERM/SIGHUP end with 128 + the signal and leave no temporary behind.
"""
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import csqc
from csqc.cli import cli
from csqc.errors import BadInput, CsqcError
from csqc.outputs import atomic_write, check_output, check_output_folder

BATCH = 2
LONG_NAME = "n" * 300  # longer than any file system's name limit (255 bytes)


@pytest.fixture
def model_path(tiny_mlp):
    return tiny_mlp


@pytest.fixture
def artifact(tiny_mlp_artifact):
    return tiny_mlp_artifact


@pytest.fixture
def x_npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((BATCH, 8), np.float32))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Makes any compile or model load that starts fail loudly: outputs must be refused first."""
    def started(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr("csqc.compiler.optimize", started)
    monkeypatch.setattr("csqc.cli._load_model", started)
    monkeypatch.setattr("csqc.runtime.load", started)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    return lines[0]


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# -- the one check every command uses ----------------------------------------------------------------


def test_check_output_accepts_new_and_regular_files(tmp_path):
    assert check_output(tmp_path / "new.so") == tmp_path / "new.so"
    (tmp_path / "old.so").write_bytes(b"x")
    assert check_output(tmp_path / "old.so") == tmp_path / "old.so"


@pytest.mark.parametrize("case, message", [
    ("device", "device, FIFO or socket"),
    ("fifo", "device, FIFO or socket"),
    ("folder", "is a folder"),
    ("missing-folder", "does not exist"),
    ("under-a-file", "is a file, not a folder"),
    ("too-long", "too long"),
    ("symlink-to-input", "is the input file"),
    ("hardlink-to-input", "is the input file"),
    ("input", "is the input file"),
])
def test_check_output_refuses(tmp_path, case, message):
    source = tmp_path / "model.pt"
    source.write_bytes(b"model")
    path = {"device": "/dev/null", "folder": tmp_path, "missing-folder": tmp_path / "nope" / "a.so",
            "under-a-file": source / "a.so", "too-long": tmp_path / LONG_NAME, "input": source}.get(case)
    if case == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif case == "symlink-to-input":
        path = tmp_path / "link.pt"
        path.symlink_to(source)
    elif case == "hardlink-to-input":
        path = tmp_path / "hard.pt"
        os.link(source, path)
    with pytest.raises(BadInput, match=message):
        check_output(path, inputs=[source])
    assert source.read_bytes() == b"model"


def test_check_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    for bad, message in ((tmp_path / "file", "not a folder"), (tmp_path / "file" / "sub", "is a file"),
                         (tmp_path / LONG_NAME, "too long")):
        with pytest.raises(BadInput, match=message):
            check_output_folder(bad)


# -- commands refuse before working -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["same-as-input", "default-output-is-input", "dev-null", "dev-full", "fifo",
                                  "too-long", "missing-folder", "dump-ir-under-a-file", "emit-source-under-a-file"])
def test_compile_refuses_outputs_before_working(model_path, tmp_path, monkeypatch, no_work, case):
    model = tmp_path / "m.pt"
    model.write_bytes(model_path.read_bytes())
    args = ["compile", model, "-o", tmp_path / "m.so"]
    if case == "same-as-input":
        args = ["compile", model, "-o", model]
    elif case == "default-output-is-input":  # the default name m.llvm.so is a link to the model itself
        (tmp_path / "m.llvm.so").symlink_to(model)
        monkeypatch.chdir(tmp_path)
        args = ["compile", "m.pt"]
    elif case in ("dev-null", "dev-full"):
        args = ["compile", model, "-o", f"/dev/{case[4:]}"]
    elif case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        args = ["compile", model, "-o", tmp_path / "fifo"]
    elif case == "too-long":
        args = ["compile", model, "-o", tmp_path / f"{LONG_NAME}.so"]
    elif case == "missing-folder":
        args = ["compile", model, "-o", tmp_path / "nope" / "m.so"]
    elif case == "dump-ir-under-a-file":
        args += ["--dump-ir", model / "ir"]
    elif case == "emit-source-under-a-file":
        args += ["-t", "cuda", "--emit-source", model / "src"]
    before = _sha(model)
    _one_line_error(_cli(*args), 2)
    assert _sha(model) == before
    for device in ("/dev/null", "/dev/full"):
        assert stat.S_ISCHR(os.stat(device).st_mode)
    assert _leftovers(tmp_path) == []


def test_library_compile_checks_its_default_output_before_working(model_path, tmp_path, monkeypatch):
    model = tmp_path / "model.pt"
    model.write_bytes(model_path.read_bytes())
    loaded = csqc.load(model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("csqc.compiler.optimize", lambda *a, **k: pytest.fail("compiled before the check"))
    (tmp_path / "model.llvm.so").symlink_to(model)  # the default name, a link to the input
    with pytest.raises(BadInput, match="is the input file"):
        csqc.compile(loaded, "llvm")
    with pytest.raises(BadInput, match="too long"):
        csqc.compile(loaded, "llvm", tmp_path / f"{LONG_NAME}.so")


@pytest.mark.parametrize("case", ["artifact", "input", "dev-null", "symlink-to-artifact", "too-long"])
def test_run_refuses_outputs_before_working(artifact, tmp_path, x_npy, no_work, case):
    output = {"artifact": artifact, "input": x_npy, "dev-null": "/dev/null",
              "too-long": tmp_path / f"{LONG_NAME}.npy"}.get(case)
    if case == "symlink-to-artifact":
        output = tmp_path / "y.npy"
        output.symlink_to(artifact)
    before = _sha(artifact), _sha(x_npy)
    _one_line_error(_cli("run", artifact, "-i", x_npy, "-o", output), 2)
    assert (_sha(artifact), _sha(x_npy)) == before


def test_plot_refuses_its_model_as_output(model_path, tmp_path, no_work):
    model = tmp_path / "m.pt"
    model.write_bytes(model_path.read_bytes())
    _one_line_error(_cli("inspect", model, "--plot", model), 2)
    _one_line_error(_cli("inspect", model, "--plot", "/dev/null"), 2)


def test_replacing_an_output_keeps_its_mode(artifact, tmp_path, x_npy):
    out = tmp_path / "y.npy"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert _cli("run", artifact, "-i", x_npy, "-o", out).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and np.load(out).shape == (BATCH, 4)


def test_a_new_output_gets_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_a_long_output_name_does_not_break_the_temporary_name(tmp_path):
    name = "l" * 250 + ".npy"  # legal, but ".{name}.XXXX.tmp" would not be
    atomic_write(tmp_path / name, lambda tmp: open(tmp, "w").write("x"))
    assert (tmp_path / name).read_text() == "x"


# -- a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a full file system: a real 16 KiB tmpfs when this process may mount one
    (root), else ordinary writes made to fail with ENOSPC."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if mounted:
        (folder / "existing.npy").write_bytes(b"keep me")
        try:
            with open(folder / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    else:
        (folder / "existing.npy").write_bytes(b"keep me")

        def no_space(src, dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("csqc.outputs.os.replace", no_space)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _disk_left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


@pytest.mark.parametrize("command", ["compile", "run", "run-replace", "plot"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(model_path, artifact, x_npy, full_disk, command):
    args = {"compile": ["compile", model_path, "-o", full_disk / "m.so"],
            "run": ["run", artifact, "-i", x_npy, "-o", full_disk / "y.npy"],
            "run-replace": ["run", artifact, "-i", x_npy, "-o", full_disk / "existing.npy"],
            "plot": ["inspect", model_path, "--plot", full_disk / "bits.png"]}[command]
    line = _one_line_error(_cli(*args), 1)
    assert "disk is full" in line
    assert _disk_left(full_disk) == ["existing.npy"]
    assert (full_disk / "existing.npy").read_bytes() == b"keep me"


def test_atomic_write_turns_enospc_into_a_csqc_error(tmp_path):
    def write(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CsqcError, match="disk is full"):
        atomic_write(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


# -- signals -------------------------------------------------------------------------------------------

# Runs the real CLI entry point; the only change is a pause (announced on stdout) at the moment
# the named temporary exists, so the test can send its signal there and not at a random time.
_PAUSING_CLI = textwrap.dedent("""
    import sys, time
    import csqc.outputs, csqc.targets.llvm.target as target

    def pause():
        print("PAUSED", flush=True)
        # short sleeps: the kernel may deliver the signal to another thread (TVM's pool), and then
        # Python runs the handler only when the main thread next runs bytecode, not mid-sleep
        for _ in range(1200):
            time.sleep(0.1)

    if sys.argv[1] == "building":  # inside TVM's export, while csqc's build folder exists
        real_build = target.build_plan

        class Pausing:
            def __init__(self, executable):
                self.executable = executable

            def export_library(self, path, **kwargs):
                self.executable.export_library(path, **kwargs)
                pause()

        target.build_plan = lambda plan, tvm_target: Pausing(real_build(plan, tvm_target))
    else:  # after the artifact's temporary file was written, before it is renamed
        real_write = csqc.outputs.atomic_write
        csqc.outputs.atomic_write = lambda path, write, **kw: real_write(path, lambda tmp: (write(tmp), pause()), **kw)
    from csqc.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("signum, moment", [(signal.SIGTERM, "building"), (signal.SIGHUP, "writing")])
def test_a_signal_mid_compile_leaves_no_temporary(model_path, tmp_path, signum, moment):
    out_dir, tmp_dir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_dir)}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, moment, "compile", str(model_path), "-o",
                             str(out_dir / "m.so")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "PAUSED", proc.stderr.read()
        if moment == "building":
            assert any(tmp_dir.iterdir())  # the build folder exists now
        else:
            assert _leftovers(out_dir)  # the temporary artifact exists now
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 128 + signum, proc.stderr.read()
    assert list(out_dir.iterdir()) == [] and list(tmp_dir.iterdir()) == []
