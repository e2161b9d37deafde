"""Run compiled csqc artifacts on remote devices through TVM's RPC server and tracker.

    import csqc.remote
    with csqc.remote.load("model.llvm.so", rpc="board:9090") as model:      # an RPC server
        y = model(x)                                  # numpy in and out, kernels run on the board
        us = model.time_us(x)                         # the board's time_evaluator
    csqc.remote.load("model.arm64.so", rpc="tracker:9190", key="rasp4")      # a device via a tracker

On the device: ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (it needs only the
TVM runtime and numpy), or, registered with a tracker (``python -m tvm.exec.rpc_tracker``),
``python -m tvm.exec.rpc_server --tracker HOST:9190 --key rasp4``.

The artifact is read and checked here exactly as ``csqc.runtime.load`` does (digests, plan,
sizes) before its library is uploaded under a name csqc chooses and loaded on the remote; the
plan and weights then become remote tensors and the plan's kernels run there one by one, so
``record`` and ``csqc verify``'s per-layer comparison see the same buffers as a local run.

Every network failure (refused, unreachable, no device with that key, no answer within the
timeout, a session lost midway) and a remote that cannot run the artifact are ``BadInput``
(exit code 2) with one line naming the address. An RPC server serves one session at a time:
close a model (``close()`` or ``with``) before another connects to the same server.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from .errors import BadInput, CsqcError
from .runtime import CompiledModel, error_text

__all__ = ["CONNECT_TIMEOUT_S", "RemoteAddress", "RemoteModel", "parse_address", "connect", "describe_device", "load"]

CONNECT_TIMEOUT_S = 30.0  # connecting, the tracker's answer, a free device: never wait forever
_MIN_REPEAT_MS = 5  # each timed repeat of a kernel lasts at least this long (TVM raises its call count)
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine of the libraries csqc builds
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteAddress:
    """An RPC server at ``host:port``, or with ``key`` a tracker there and the device key."""

    host: str
    port: int
    key: str | None = None

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"RPC tracker {where} (key {self.key})" if self.key else f"RPC server {where}"


def parse_address(rpc: str, key: str | None = None) -> RemoteAddress:
    """``"host:port"`` (``"[::1]:9090"`` for IPv6) and an optional device key, checked."""
    host, _, port = str(rpc).strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadInput(f"--rpc takes HOST:PORT (e.g. 192.168.1.20:9090), got {rpc!r}")
    # the key travels in a space-separated handshake: whitespace would split it
    if key is not None and (not key or any(c.isspace() for c in key)):
        raise BadInput(f"a device key is one word (e.g. rasp4), got {key!r}")
    return RemoteAddress(host, int(port), key)


def _within(seconds: float, work: Callable[[], _T], what: str, on_timeout: Callable[[], None] | None = None) -> _T:
    """``work()``, or ``BadInput`` when it has not returned within ``seconds``.

    TVM's connect and tracker calls block without a deadline; they run in a daemon thread that
    is left behind on timeout (``on_timeout`` may close its socket to end it).
    """
    result: dict = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as e:  # handed to the caller's thread below
            result["error"] = e

    thread = threading.Thread(target=run, name="csqc-rpc", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
        raise BadInput(f"{what}: no answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _reachable(address: RemoteAddress, timeout: float) -> None:
    """A TCP connection to the address, within ``timeout``: TVM's own connect would retry a refused
    tracker for a minute and wait for an unreachable host as long as the OS does."""
    try:
        socket.create_connection((address.host, address.port), timeout=timeout).close()
    except socket.timeout:
        raise BadInput(f"{address}: no answer within {timeout:g} s (is the host reachable?)") from None
    except OSError as e:
        start = (f"python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {address.port}" if address.key else
                 f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {address.port}")
        raise BadInput(f"cannot reach {address} ({e.strerror or type(e).__name__}): start it there with "
                       f"`{start}`") from None


def connect(address: RemoteAddress, timeout: float = CONNECT_TIMEOUT_S):
    """An open ``tvm.rpc.RPCSession`` to the server, or to a device the tracker lends for ``key``."""
    from tvm import rpc

    _reachable(address, timeout)
    try:
        if address.key is None:
            return _within(timeout, lambda: rpc.connect(address.host, address.port),
                           f"{address} (serving another session?)")
        tracker = _within(timeout, lambda: rpc.connect_tracker(address.host, address.port), f"{address}")
        _check_key(address, _within(timeout, tracker.summary, f"{address}", tracker.close))
        return _within(timeout, lambda: tracker.request(address.key, max_retry=1),
                       f"{address}: no device with key {address.key} became free", tracker.close)
    except CsqcError:
        raise
    except Exception as e:  # TVM's errors: a handshake refused, a port that is no RPC server or tracker
        hint = "; with --key the address must be an RPC tracker, without it an RPC server" if address.key else ""
        raise BadInput(f"cannot open an RPC session with {address} ({error_text(e)}{hint})") from None


def _check_key(address: RemoteAddress, summary: dict) -> None:
    """The tracker queues a request for an unknown key forever: refuse it up front."""
    keys = sorted({str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info", [])})
    if address.key not in keys:
        raise BadInput(f"the RPC tracker {address.host}:{address.port} has no device with key {address.key!r} "
                       f"(registered: {', '.join(keys) or 'none'}); start one there with `python -m "
                       f"tvm.exec.rpc_server --tracker {address.host}:{address.port} --key {address.key}`")


def _remote_call(session, name: str):
    """A global function of the remote, or None where its TVM lacks it (a runtime-only build)."""
    try:
        return session.get_function(name)()
    except Exception:  # not registered there: the description just has less in it
        return None


def describe_device(session, address: RemoteAddress, target: str) -> dict:
    """What the remote says it is: address, key, device and, where its TVM can say, CPU and triple."""
    info: dict = {"rpc": f"{address.host}:{address.port}", "via": "tracker" if address.key else "server",
                  "key": address.key, "device": "cuda:0" if target == "cuda" else "cpu:0",
                  "cpu": _remote_call(session, "target.llvm_get_system_cpu"),
                  "triple": _remote_call(session, "target.llvm_get_system_triple")}
    if target == "cuda":
        dev = session.cuda(0)
        info["gpu"] = dev.device_name if dev.exist else None
    return info


def describe_text(info: dict) -> str:
    """One line: ``cpu:0 (znver5, x86_64-linux-gnu) on RPC server 10.0.0.5:9090``."""
    detail = ", ".join(str(info[k]) for k in ("gpu", "cpu", "triple") if info.get(k))
    via = f"RPC tracker {info['rpc']}, key {info['key']}" if info["via"] == "tracker" else f"RPC server {info['rpc']}"
    return f"{info['device']}{f' ({detail})' if detail else ''} on {via}"


def _library_arch(library: bytes) -> str | None:
    """The instruction set of an ELF library (csqc checked the magic already)."""
    order = "little" if library[5:6] == b"\x01" else "big"
    return _ELF_MACHINES.get(int.from_bytes(library[18:20], order))


class RemoteModel(CompiledModel):
    """An artifact loaded on a remote device, with ``CompiledModel``'s API (``model(x, record=...)``,
    ``skip_planes``); ``time_us`` times it with the remote's ``time_evaluator``; ``device`` says
    where it runs (``describe_device``)."""

    def __init__(self, path: str | os.PathLike, session, address: RemoteAddress):
        self.session, self.address = session, address
        self.device: dict = {}
        with self._session_guard("loading the artifact"):
            super().__init__(path)  # reads and checks the artifact, then calls _open
        self._timers: dict = {}

    def _open(self, library: bytes):
        self.device = describe_device(self.session, self.address, self.target)
        dev = self.session.cuda(0) if self.target == "cuda" else self.session.cpu(0)
        self._check_runs_there(library, dev)
        # the server picks its loader by the file's suffix: the name is csqc's, never the user's
        name = f"csqc-{hashlib.sha256(library).hexdigest()[:16]}.so"
        try:
            self.session.upload(bytearray(library), name)
            return dev, self.session.load_module(name)
        except Exception as e:
            if not self._alive():
                raise
            raise BadInput(f"{self.path}: {self.address} cannot load the artifact's library ({error_text(e)})") from None

    def _check_runs_there(self, library: bytes, dev) -> None:
        """A remote that cannot run the artifact's target is bad input (exit code 2), like a local one."""
        where = describe_text(self.device)
        if self.target == "cuda" and not dev.exist:
            raise BadInput(f"{self.path} is a CUDA artifact and {self.address} has no CUDA device ({where}); "
                           "connect to a server on a machine with an NVIDIA GPU")
        triple = self.device.get("triple")
        remote = _ARCH_ALIASES.get(triple.split("-")[0], triple.split("-")[0]) if triple else None
        ours = _library_arch(library)
        if remote and ours and remote != ours:
            fix = "--target aarch64" if remote == "aarch64" else "--target llvm on such a machine"
            raise BadInput(f"{self.path} holds {ours} code ({self.target} artifact); {self.address} is {remote} "
                           f"({triple}): compile for it with {fix}")

    def _in_this_process(self) -> bool:
        return False  # remote tensors: no numpy views, copies go through the session

    def _alive(self) -> bool:
        import tvm

        try:  # a real round trip (device queries of a CPU are answered locally)
            tvm.runtime.empty((1,), "uint8", self.session.cpu(0)).numpy()
            return True
        except Exception:  # any failure of the round trip: the session is gone
            return False

    @contextmanager
    def _session_guard(self, doing: str):
        """A failure on a dead session is a lost connection (exit code 2), whatever TVM called it."""
        try:
            yield
        except BadInput:
            raise
        except Exception as e:
            if self.session is None or self._alive():
                raise
            raise BadInput(f"lost the session with {self.address} while {doing} ({error_text(e)})") from None

    def __call__(self, *inputs, skip_planes=0, record: dict | None = None, record_names=None):
        with self._session_guard("running the model"):
            return super().__call__(*inputs, skip_planes=skip_planes, record=record, record_names=record_names)

    def time_us(self, *inputs, repeat: int = 50, skip_planes=0) -> float:
        """The run time in microseconds on the remote device: the sum over the plan's kernels of
        each one's median under TVM's ``time_evaluator``, run there (no network or host overhead)."""
        return sum(self.kernel_times_us(*inputs, repeat=repeat, skip_planes=skip_planes).values())

    def kernel_times_us(self, *inputs, repeat: int = 50, skip_planes=0) -> dict[str, float]:
        """Median time of each kernel in microseconds, on buffers of a real run on ``inputs``."""
        with self._lock, self._session_guard("timing the model"):
            self(*inputs, skip_planes=skip_planes)  # inputs in place, weights packed for this setting
            times: dict[str, float] = {}
            for step, (_, args) in zip(self.plan["steps"], self._calls(self._skips(skip_planes))):
                name = step["func"]
                if name not in self._timers or self._timers[name][0] != repeat:
                    timer = self.lib.time_evaluator(name, self.dev, number=1, repeat=repeat,
                                                    min_repeat_ms=_MIN_REPEAT_MS)
                    self._timers[name] = (repeat, timer)
                seconds = float(np.median(self._timers[name][1](*args).results))
                times[name] = times.get(name, 0.0) + seconds * 1e6  # a kernel the plan calls twice counts twice
            return times

    def close(self) -> None:
        """End the session (the server then takes its next client); the model cannot run after this."""
        for attr in ("_timers", "_calls_cache", "_funcs", "buffers", "_scales"):
            setattr(self, attr, {} if attr != "_scales" else [])
        self.lib = self.dev = self.session = None

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike, rpc: str, *, key: str | None = None,
         timeout: float = CONNECT_TIMEOUT_S) -> RemoteModel:
    """Check the artifact at ``path`` here, then load and run it on the remote ``rpc`` ("host:port";
    with ``key``, a tracker's address and the device key). ``timeout``: seconds to wait for the
    connection and for a free device."""
    from .artifact import read_artifact

    address = parse_address(rpc, key)
    read_artifact(path)  # a damaged or missing file is reported before any connection is made
    return RemoteModel(path, connect(address, timeout), address)
