"""Artifacts on remote devices through TVM RPC (csqc.remote): a local RPC server, a tracker with a
keyed server, both started with the commands the README gives, and the tiny MLP artifact."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

import csqc
from csqc.artifact import write_artifact_file
from csqc.cli import cli
from csqc.errors import BadInput

KEY = "board"
_START_S = 120  # three TVM imports on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class _Servers:
    """An RPC server, a tracker and a server registered with it under KEY, started concurrently."""

    def __init__(self):
        self.server_port, self.tracker_port, keyed_port = _free_port(), _free_port(), _free_port()
        tracker = f"127.0.0.1:{self.tracker_port}"
        self._procs = [self._start("rpc_server", self.server_port),
                       self._start("rpc_tracker", self.tracker_port),
                       self._start("rpc_server", keyed_port, "--tracker", tracker, "--key", KEY)]
        self._ready = False

    @staticmethod
    def _start(module: str, port: int, *args: str) -> subprocess.Popen:
        env = {**os.environ, "TVM_NUM_THREADS": "1"}
        # its own process group: the finalizer ends the server and the session processes it forks
        return subprocess.Popen([sys.executable, "-m", f"tvm.exec.{module}", "--host", "127.0.0.1", "--port",
                                 str(port), "--port-end", str(port + 1), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def wait(self) -> "_Servers":
        from tvm import rpc

        deadline = time.monotonic() + _START_S
        while not self._ready:
            assert time.monotonic() < deadline, "the RPC servers did not start"
            assert all(p.poll() is None for p in self._procs), "an RPC server or tracker exited"
            if _accepts(self.server_port) and _accepts(self.tracker_port):
                summary = rpc.connect_tracker("127.0.0.1", self.tracker_port).summary()
                self._ready = any(s["key"] == f"server:{KEY}" for s in summary["server_info"])
            time.sleep(0.3)
        return self

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.wait().server_port}"

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.wait().tracker_port}"

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def rpc_servers(request):
    servers = _Servers()  # starting: they import TVM while the artifact compiles
    request.addfinalizer(servers.stop)
    return servers


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _without_devices(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "devices"}


def test_verify_through_rpc_equals_local(rpc_servers, tiny_mlp, tiny_mlp_artifact):
    remote = _cli("verify", tiny_mlp, "--artifact", tiny_mlp_artifact, "--per-layer", "--json",
                  "--rpc", rpc_servers.server)
    local = _cli("verify", tiny_mlp, "--artifact", tiny_mlp_artifact, "--per-layer", "--json")
    assert remote.exit_code == 0, remote.output
    remote_report, local_report = json.loads(remote.output), json.loads(local.output)
    assert remote_report["ok"] and remote_report["accumulators_exact"]
    assert any(row["runtime"].startswith("artifact:") and row["checked"].get("acc") for row in remote_report["layers"])
    # same verdict, pairs and per-layer checks; only where it ran differs
    assert _without_devices(remote_report) == _without_devices(local_report)
    device = remote_report["devices"][f"artifact:{tiny_mlp_artifact.name}"]
    assert device["rpc"] == rpc_servers.server and device["via"] == "server" and device["device"] == "cpu:0"
    assert device["cpu"] and device["triple"]  # a full TVM on the remote says what it is


def test_remote_run_is_bit_for_bit_the_local_run(rpc_servers, tiny_mlp_artifact):
    x = np.random.default_rng(3).random((2, 8), dtype=np.float32) * 4 - 2
    local = csqc.runtime.load(tiny_mlp_artifact)
    with csqc.runtime.load(tiny_mlp_artifact, rpc=rpc_servers.server) as remote:
        for skip in (0, 1):
            mine, theirs = {}, {}
            assert np.array_equal(local(x, skip_planes=skip, record=mine), remote(x, skip_planes=skip, record=theirs))
            assert mine.keys() == theirs.keys() and len(mine) > 4
            for name in mine:
                assert mine[name].dtype == theirs[name].dtype and np.array_equal(mine[name], theirs[name]), name
        times = remote.kernel_times_us(x, repeat=3)
        assert set(times) == {s["func"] for s in remote.plan["steps"]} and all(t > 0 for t in times.values())


def test_bench_through_tracker_names_the_device(rpc_servers, tiny_mlp, tiny_mlp_artifact):
    out = _cli("bench", tiny_mlp, "--artifact", tiny_mlp_artifact, "--rounds", "3", "--json",
               "--rpc", rpc_servers.tracker, "--key", KEY)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    [result] = report["results"]
    assert result["runtime"] == "csqc" and 0 < result["median_us"] < 1e6
    assert report["remote"]["via"] == "tracker" and report["remote"]["key"] == KEY
    assert report["remote"]["rpc"] == rpc_servers.tracker
    text = _cli("bench", tiny_mlp, "--artifact", tiny_mlp_artifact, "--rounds", "2", "--rpc", rpc_servers.server)
    assert text.exit_code == 0, text.output
    words = " ".join(text.output.split())  # the table title wraps at the console's width
    assert f"on RPC server {rpc_servers.server}" in words and " us " in words


def _one_line_exit_2(out, *words):
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out.output, out.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("case", ["closed port", "wrong key", "key on a server", "bad address"])
def test_unreachable_device_is_one_line_exit_2_quickly(case, rpc_servers, tiny_mlp, tiny_mlp_artifact):
    address = {"closed port": ["--rpc", f"127.0.0.1:{_free_port()}"],
               "wrong key": ["--rpc", rpc_servers.tracker, "--key", "rasp4"],
               "key on a server": ["--rpc", rpc_servers.server, "--key", KEY],
               "bad address": ["--rpc", "127.0.0.1"]}[case]
    start = time.monotonic()
    out = _cli("bench", tiny_mlp, "--artifact", tiny_mlp_artifact, "--no-baselines", *address)
    assert time.monotonic() - start < 10
    _one_line_exit_2(out, *{"closed port": ["cannot reach", "tvm.exec.rpc_server"],
                            "wrong key": ["no device with key 'rasp4'", KEY],
                            "key on a server": ["RPC tracker"], "bad address": ["HOST:PORT"]}[case])
    if case == "closed port":  # verify says the same
        _one_line_exit_2(_cli("verify", tiny_mlp, "--artifact", tiny_mlp_artifact, *address), "cannot reach")


def test_lost_session_is_bad_input(rpc_servers, tiny_mlp_artifact):
    from tvm import rpc

    from csqc.remote import RemoteModel, parse_address

    address = parse_address(rpc_servers.server)
    # the server ends a session past its timeout, as a dropped link or a rebooted board would
    model = RemoteModel(tiny_mlp_artifact, rpc.connect(address.host, address.port, session_timeout=2), address)
    x = np.zeros((2, 8), np.float32)
    model(x)
    time.sleep(3)
    with pytest.raises(BadInput, match="lost the session with RPC server"):
        model(x)
    model.close()


def _resealed(artifact, tmp_path, *, kind: str | None = None, machine: int | None = None):
    """The artifact with its plan's target kind or its library's ELF machine changed, sealed again."""
    data = artifact.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        start = min(i.header_offset for i in z.infolist())
        plan, weights = json.loads(z.read("plan.json")), z.read("weights.npz")
    library = bytearray(data[:start])
    if kind:
        plan["target"]["kind"] = kind
    if machine:
        library[18:20] = machine.to_bytes(2, "little")
    path = tmp_path / "edited.so"
    write_artifact_file(path, bytes(library), plan, weights)
    return path


@pytest.mark.parametrize("edit, words", [({"kind": "cuda"}, ["CUDA artifact", "no CUDA device"]),
                                         ({"machine": 183}, ["aarch64 code", "is x86_64"])])
def test_remote_that_cannot_run_the_target_is_bad_input(edit, words, rpc_servers, tiny_mlp, tiny_mlp_artifact,
                                                          tmp_path):
    path = _resealed(tiny_mlp_artifact, tmp_path, **edit)
    _one_line_exit_2(_cli("verify", tiny_mlp, "--artifact", path, "--rpc", rpc_servers.server), *words)
