"""Run compiled csqc artifacts with numpy and the TVM runtime only (no torch, no compiler).

    import csqc.runtime
    model = csqc.runtime.load("model.llvm.so")
    y = model(x)                     # numpy in, numpy out
    y = model(x, skip_planes=1)      # PrecisionBatching: drop each layer's least significant plane
    model.calibration                # compile --calibrate: the static scales it was built with (or None)
    model.threads                    # the most threads a call uses (None: TVM's pool)
    model.shared_memory              # whether calls run the temporaries in shared pools (settable)
    model.call_choice                # how calls are run (threads, memory), timed now and then: csqc.call_choice

The artifact (see ``csqc.artifact``) is the shared library with ``plan.json``, ``weights.npz``
and their SHA-256 digests appended. ``load`` checks the digests, the plan and every declared
size before the library is loaded: an artifact is native code, so run only artifacts you built
or trust (``csqc compile -t onnx`` gives the data-only form for untrusted exchange).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from .artifact import (BITPARALLEL_LAYOUTS, FLOAT_LAYOUTS, NIBBLE_HIGH_VALUES, NIBBLE_K, VNNI_LANES,
                       combine_planes, float_layout_shape, float_layout_weight, load_library,
                       nibble_block_bytes, nibble_range, pack_bitparallel_layout, physical_memory, prefix_weight_range,
                       read_artifact, whole_model_arguments)
from .bitplanes import kept_zero_point
from .calibration import Calibration, plan_calibration
from .call_choice import CallChoice, CallSetting
from .errors import BadInput, CsqcError
from .interpreter import largest_safe_scale, overflow_error, scale_overflow  # numpy only, like this module
from .targets.tvm.code_thresholds import forms_in_range  # numpy only too

__all__ = ["CompiledModel", "StepTime", "aligned_array", "cuda_device", "load", "check_plan",
           "physical_cores", "pool_threads", "profile_steps"]

_BUFFER_KINDS = ("input", "output", "temp", "weight", "derived")
# an output whose values the compiler bounds below this (plan "finite_below") is not scanned
_FINITE_BOUND = 2.0**120
# outputs of at least this many bytes in all are written in place (see _fresh_output_bindings):
# below, copying them out is cheaper than binding new memory (measured: 16 KiB, 3.7 against
# 6.4 us a call; 256 KiB, 16.5 against 13.3 us)
_FRESH_OUTPUT_MIN_BYTES = 1 << 17
# inputs of at least this many bytes that are C-contiguous and 64-byte aligned (torch's CPU
# tensors are) are read where they lie instead of copied in (see _direct_input_bindings):
# MobileNetV2's 588 KiB image, ~1,700 -> ~1,630 us a call (the copy's own 11 us, and the kernels
# then reading lines the copy left dirty in one core's cache)
_DIRECT_INPUT_MIN_BYTES = 1 << 17
# float inputs (and outputs) of at most this many bytes in all share one block of host memory, so
# that one scan checks them all for NaN and infinity (see _io_block_views): each scan is a numpy
# call of ~0.7 us whatever its size, and a char-LM LSTM step reads three inputs and writes three
# outputs around ~6 us of kernels
_IO_BLOCK_MAX_BYTES = 1 << 16
_ALIGNMENT = 64  # bytes: TVM's allocation alignment, which its kernels assume of every buffer


@dataclass(frozen=True)
class _FreshOutput:
    """A model output the whole-model function writes into memory handed to each call."""

    nbytes: int
    shape: tuple  # the output's shape and dtype, as returned
    dtype: np.dtype
    args: tuple  # (position among the function's arguments, shape, dtype) of each buffer on its memory


@dataclass(frozen=True)
class _SmallCall:
    """What the call of a model of small inputs and outputs touches (see CompiledModel._call_small)."""

    inputs: tuple  # (buffer view, dtype, shape) of each input
    input_scans: tuple  # the 1-D arrays whose scans check every input: the input block, or each input's view
    scales: tuple  # (scale view, largest safe scale) of each dynamic quantization
    outputs: tuple  # the buffer view of each output
    output_block: np.ndarray | None  # the outputs' block (1-D), where they share one
    output_scans: tuple  # (1-D view, finite_below bound or None) of each output: scanned where there is no block


@dataclass(frozen=True)
class _DirectInput:
    """A model input the whole-model function can read from the caller's own array."""

    nbytes: int
    args: tuple  # (position among the function's arguments, shape, dtype) of each buffer on its memory

# _cap_threads: capped calls in flight and the TVM_NUM_THREADS value they replaced
_THREAD_CAP_LOCK = threading.Lock()
_UNCHANGED = object()
_THREAD_CAP: dict = {"calls": 0, "saved": _UNCHANGED}


def _device(kind: str):
    return cuda_device() if kind == "cuda" else _import_tvm().cpu(0)


def cuda_device():
    """TVM's first CUDA device (its ``exist`` is False on a machine without an NVIDIA GPU and
    driver), with TVM's CUDA runtime library loaded where TVM itself has not."""
    tvm = _import_tvm()
    _load_cuda_runtime()
    return tvm.cuda(0)


def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (the CUDA device and the loader of CUDA modules) where
    TVM has not: with its runtime library alone (``TVM_USE_RUNTIME_LIB=1``) TVM loads no device
    backends, and a CUDA artifact could not load, nor a GPU be seen. As TVM's CUDA backend loads
    it; where it cannot load (no NVIDIA driver), the device reports itself absent."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", mode="RTLD_LOCAL",
            extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent])
    except (OSError, RuntimeError):
        pass


def _import_tvm():
    """``tvm``, imported without torch where torch is not loaded yet. TVM's FFI package imports
    torch whenever it is installed (a workaround for a Windows symbol clash, and a DLPack
    shortcut for torch tensors; the runtime passes numpy arrays only), which cost a deployment
    with torch installed ~2 s and 200 MB at start: loading ResNet-20 and one call, 3.5 -> 1.5 s
    and 408 -> 207 MB of memory (with ``TVM_USE_RUNTIME_LIB=1``, TVM's runtime library alone:
    1.1 s, 95 MB). torch imports as usual afterwards. (Another thread importing torch while
    this runs would get an ImportError: load artifacts before starting such threads.)"""
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


class CompiledModel:
    """A loaded artifact: call it on numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        # the buffers are the model's own: calls from several threads take turns (two at once
        # mixed their intermediate tensors); one model per thread runs them side by side
        self._lock = threading.RLock()
        path = Path(path)
        contents = read_artifact(path)  # digests, member sizes and weight sizes, before anything is loaded
        self.plan, weights = contents.plan, contents.weights
        check_plan(path, self.plan, weights)
        # the static activation scales it was built with (compile --calibrate), checked; None: dynamic
        self.calibration: Calibration | None = plan_calibration(self.plan, path)
        self.path = path
        self.target = self.plan["target"]["kind"]
        # the most threads a call uses: the compiler caps models of small layers at one (see
        # csqc.targets.llvm.target.thread_cap), and calls check that guess on this machine
        # (call_choice); settable, None leaves TVM's pool as configured (TVM_NUM_THREADS; one
        # per physical core unless it or OMP_NUM_THREADS is set: see _default_thread_count)
        self._threads: int | None = self.plan.get("threads")
        self._threads_set = False  # set by the user: no longer timed against the pool
        self._memory_set: bool | None = None  # shared_memory as the user set it (None: timed)
        # timed choice of threads and memory for the common call (None: one way only)
        self.call_choice: CallChoice | None = None
        self._private_calls: list | None = None  # the whole-model call on private memory (built once)
        self._check_cpu()
        # only now, with digests and plan checked, may the library reach a loader
        self.dev, self.lib = self._open(contents.library)
        self._funcs = {}
        for step in [*self.plan["steps"], *([self.plan["entry"]] if "entry" in self.plan else [])]:
            try:
                self._func(step["func"])
            except AttributeError:
                raise _csqc_bug(path, f"the plan calls a kernel {step['func']!r} that its library lacks") from None
        self._weights = weights
        self.buffers = self._allocate(weights)
        self._calls_cache: dict = {}
        self._run_cache: dict = {}
        self._repacked: dict[str, int] = {}
        self._offsets_for: dict[str, int] = {}
        self._plane_sums: dict[str, np.ndarray] = {}
        self.inputs = self.plan["inputs"]
        self._input_types = {s["name"]: (np.dtype(s["dtype"]), tuple(s["shape"])) for s in self.inputs}
        self.outputs = self.plan["outputs"]
        self.layers: dict[str, dict] = self.plan["layers"]
        # layers whose weights the runtime combines from their planes (again for each plane setting)
        self._has_combined_weights = any(info["kernel"] == "bitparallel" or "float_buffer" in info
                                    for info in self.layers.values())
        self._has_offsets = any("acc_offset" in info for info in self.layers.values())
        # offset buffers are derived, but verify needs them next to the accumulators they correct
        self._recorded_derived = {info["acc_offset"] for info in self.layers.values() if "acc_offset" in info}
        try:
            self._combine_weights(())  # build the int8 / float32 weights of layers from their planes
            self._fill_acc_offsets(())
            self._prepared_for = ()  # the plane setting the weights and offsets above were built for
        except (ValueError, TypeError, IndexError) as e:
            raise _csqc_bug(path, f"the layer weights cannot be rebuilt from the stored planes ({error_text(e)})"
                            ) from None
        # host buffers are also seen as numpy arrays: copying in and out through these views
        # costs well under a microsecond, against ~10 us for Tensor.copyfrom / Tensor.numpy
        self._host = self._in_this_process()
        if self._host:
            _default_thread_count()
        self._settings_changed()
        if self._host:
            self._in_views = [np.from_dlpack(self.buffers[s["name"]]) for s in self.inputs]
            self._out_views = [np.from_dlpack(self.buffers[o["name"]]) for o in self.outputs]
        # inputs copied into the input block and outputs computed in the output block (see
        # _io_block_views): one scan of a block checks them all
        self._block_inputs = set(range(len(self.inputs))) if "input" in self._io_blocks else set()
        self._outputs_in_block = "output" in self._io_blocks
        # (scale buffer, L, largest safe scale, quantize node) of every dynamic quantization:
        # see _check_overflow
        self._scales = [(self.buffers[st["args"][st.get("scale_arg", 1)]], st["levels"], largest_safe_scale(st["levels"]),
                         str(st.get("quantizer") or st.get("layer", st["func"]))) for st in self.plan["steps"]
                        if "levels" in st]
        if self._host:
            self._scales = [(np.from_dlpack(buf).reshape(-1), *rest) for buf, *rest in self._scales]
        self._fresh_outputs = self._fresh_output_bindings() if self._host else None
        self._fresh_bytes = sum(out.nbytes for out in self._fresh_outputs or ())
        self._direct_inputs = self._direct_input_bindings() if self._host else None
        # (scale view, per_scale, plus) of outputs whose magnitude the scale bounds (see _check_overflow)
        self._output_bounds = [(np.from_dlpack(self.buffers[b["scale"]]).reshape(-1), b["per_scale"], b["plus"])
                               if self._host and (b := o.get("finite_below")) else None for o in self.outputs]
        self._small_call = self._small_call_parts()

    @property
    def threads(self) -> int | None:
        """The most threads a call uses now (None: TVM's pool as configured): the plan's cap, or
        what :attr:`call_choice` last found faster. Setting it ends the choosing of threads: the
        value set holds for every call (memory may still be chosen)."""
        return self.call_choice.chosen.threads if self.call_choice is not None else self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        if value is not None and not (type(value) is int and value >= 1):
            raise BadInput(f"threads must be a positive thread count or None, got {value!r}")
        with self._lock:
            self._threads, self._threads_set = value, True
            self._settings_changed()

    @property
    def shared_memory(self) -> bool:
        """Whether the common call now runs the plan's temporaries in its shared pools (False:
        each in memory of its own, or a plan without pools): what :attr:`call_choice` last found
        faster. Setting it ends the choosing of memory (False allocates the private memory, True
        frees it); calls with planes skipped or recorded always run on the pools."""
        setting = self.call_choice.chosen if self.call_choice is not None else self._fixed
        return bool(self.plan.get("pools")) and setting.shared_memory

    @shared_memory.setter
    def shared_memory(self, value: bool) -> None:
        if type(value) is not bool:
            raise BadInput(f"shared_memory must be True or False, got {value!r}")
        with self._lock:
            self._memory_set = value
            if value:
                self._private_calls = None
            self._settings_changed()

    def _settings_changed(self) -> None:
        """Set what calls may take after a change of threads or memory: ``_fixed``, the setting
        of every call where there is nothing to choose, and :attr:`call_choice` (host models)."""
        self._fixed = CallSetting(self._threads, self._memory_set is not False or not self._has_private_memory())
        if self._host:
            self.call_choice = self._make_call_choice(_pool_threads())

    def _has_private_memory(self) -> bool:
        """Whether the common call can run on private memory: pools, and a whole-model function."""
        return bool(self.plan.get("pools")) and self.plan.get("entry") is not None

    def _make_call_choice(self, pool: int | None) -> CallChoice | None:
        """The settings a common call may take, the compiled one first (see csqc.call_choice):
        TVM's whole pool as well as the plan's thread cap (unless the user set the threads), and
        private memory for the temporaries as well as the plan's shared pools (with a whole-model
        function: the call a trial times; unless the user set the memory). None where there is
        one setting only."""
        threads = [self._threads]
        if not self._threads_set and self._threads is not None and pool is not None and pool > self._threads:
            threads.append(None)
        if self._memory_set is not None or not self._has_private_memory():
            memory = [self._fixed.shared_memory]
        else:
            memory = [True, False]
        settings = [CallSetting(t, m) for m in memory for t in threads]
        return CallChoice(settings, pool or 1) if len(settings) > 1 else None

    def _setting_of_call(self, skips: tuple, record: dict | None) -> tuple[CallSetting, bool]:
        """The setting of this call and whether its time counts for :attr:`call_choice`: only the
        common call (all planes, nothing recorded) is timed; others take the setting last chosen."""
        choice = self.call_choice
        if choice is None:
            return self._fixed, False
        if not skips and record is None:
            return choice.next_call()
        return choice.chosen, False

    def _calls_on(self, setting: CallSetting, skips: tuple) -> list:
        """The calls of one inference at ``skips`` in ``setting``'s memory. Private memory only
        serves the common call (the one timed); other calls use the plan's pools, with the same
        results."""
        if setting.shared_memory or skips:
            return self._run_cache.get(skips) or self._run_calls(skips)
        if self._private_calls is None:
            self._private_calls = self._calls_with_private_memory()
        return self._private_calls

    def _calls_with_private_memory(self) -> list:
        """The whole-model call (all planes) with every pooled temporary, and the views of its
        memory, in memory of its own: the plan without its ``pools`` (what older compilers built)."""
        import tvm

        specs = self.plan["buffers"]
        private = {name: tvm.runtime.from_dlpack(_output_memory(_nbytes(spec)))._create_view(tuple(spec["shape"]), spec["dtype"])
                   for name, spec in specs.items() if "pool" in spec}
        for name, spec in specs.items():
            if spec.get("alias") in private:
                private[name] = private[spec["alias"]]._create_view(tuple(spec["shape"]), spec["dtype"])
        (func, args), = self._run_calls(())
        entry_args = self.plan["entry"]["args"]
        return [(func, [private.get(a, arg) if isinstance(a, str) else arg for a, arg in zip(entry_args, args)])]

    def _check_cpu(self) -> None:
        """Refuse, clearly, an x86 artifact built for instruction sets this CPU lacks (else the
        first such instruction kills the process with SIGILL), and ask the OS for the AMX tile
        state before the first tile instruction where layers run on tiles."""
        if self.target != "llvm" or not self._in_this_process():
            return  # (a remote server's process checks on its own machine: csqc.remote)
        from csqc.targets.llvm.host import host_has_amx, missing_on_host, request_tile_permission

        cpu = self.plan["target"].get("mcpu") or "another CPU"
        missing = missing_on_host(self.plan["target"].get("features", ()))
        if missing:
            raise BadInput(f"{self.path} was built for {cpu} and uses {', '.join(missing)}, which this CPU lacks; "
                           "compile it on this machine, or with --mcpu naming this CPU")
        if not any(info.get("tiles") == "amx" for info in self.plan["layers"].values()):
            return
        if not host_has_amx():  # (an artifact from before features were recorded)
            raise BadInput(f"{self.path} runs layers on AMX tiles (Intel Sapphire Rapids or newer) and this CPU "
                           "has none; compile it on this machine, or with --mcpu naming this CPU")
        try:
            request_tile_permission()
        except RuntimeError as e:
            raise BadInput(f"{self.path}: {e}") from None

    def _open(self, library: bytes):
        """``(device, module)``: the checked library loaded on this machine (``csqc.remote`` overrides it)."""
        dev = _device(self.target)
        # an artifact for another machine is bad input here (exit code 2), like any file that cannot run here
        if self.target == "cuda" and not dev.exist:
            raise BadInput(f"{self.path} is a CUDA artifact and this machine has no CUDA device; run it on a machine "
                           "with an NVIDIA GPU, or compile for this one with --target llvm")
        if self.target == "aarch64" and platform.machine() not in ("aarch64", "arm64"):
            raise BadInput(f"{self.path} is an aarch64 artifact and this machine is {platform.machine()}; run it on "
                           "a 64-bit ARM machine (csqc verify runs it here under qemu-user emulation)")
        try:
            return dev, load_library(library)
        except Exception as e:
            raise BadInput(f"{self.path}: the library part cannot be loaded on this machine ({error_text(e)})") from None

    def _fresh_output_bindings(self) -> list[_FreshOutput] | None:
        """Where the whole-model function takes each output's memory, so that a call can hand it
        a new array per output instead of copying the output buffer out (None where a call must
        copy: no whole-model function, or an output that shares memory with an input, a weight or
        another output, or is empty). The function writes every output element each call, so the
        new array's initial contents are never read (tests/conftest.py poisons it for every test)."""
        if self.plan.get("entry") is None:
            return None
        specs = self.plan["buffers"]
        roots = [self._root(o["name"]) for o in self.outputs]
        if len(set(roots)) != len(roots):
            return None
        bindings = []
        for out, name in zip(self.outputs, roots):
            spec = specs[name]
            nbytes = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
            if spec["kind"] not in ("output", "temp") or nbytes == 0:
                return None
            out_spec = specs[out["name"]]
            bindings.append(_FreshOutput(nbytes, tuple(out_spec["shape"]), np.dtype(out_spec["dtype"]),
                                         self._entry_arguments_on(name)))
        return bindings

    def _small_call_parts(self) -> _SmallCall | None:
        """What :meth:`_call_small` needs, for a model in this process with a whole-model function
        whose inputs are all copied in and whose outputs are all copied out (None otherwise)."""
        if not self._host or self.plan.get("entry") is None:
            return None
        if any(d is not None for d in self._direct_inputs or ()) or self._fresh_bytes >= _FRESH_OUTPUT_MIN_BYTES:
            return None
        inputs = tuple((view, *self._input_types[spec["name"]]) for view, spec in zip(self._in_views, self.inputs))
        if not all(dtype == np.float32 for _, dtype, _ in inputs):
            return None  # (integer ids get their range checked: the general path)
        input_scans = ((self._io_blocks["input"],) if "input" in self._io_blocks else
                       tuple(view.reshape(-1) for view, _, _ in inputs))
        return _SmallCall(inputs, input_scans, tuple((buf, safe) for buf, _, safe, _ in self._scales),
                          tuple(self._out_views), self._io_blocks.get("output"),
                          tuple((view.reshape(-1), bound) for view, bound in zip(self._out_views, self._output_bounds)))

    def _call_small(self, parts: _SmallCall, inputs: tuple):
        """The common call of a model of small inputs and outputs (all planes, nothing
        recorded): :meth:`__call__`'s work in as few Python steps as it takes, since here
        they cost as much as the kernels (the char-LM step: ~7 us around ~6 us of kernels).
        None where an input is not a float array of the right type and shape, or not finite, or
        a call would need more than this: the general path then handles it, errors included."""
        if len(inputs) != len(parts.inputs):
            return None
        for x, (view, dtype, shape) in zip(inputs, parts.inputs):
            if type(x) is not np.ndarray or x.dtype != dtype or x.shape != shape:
                return None
            view[...] = x  # (a third of np.copyto's time for arrays this small)
        for flat in parts.input_scans:
            if not _flat_finite(flat):
                return None
        choice = self.call_choice
        if choice is None:
            fixed = self._fixed
            self._run_kernels(self._run_cache.get(()) or self._run_calls(()) if fixed.shared_memory
                              else self._calls_on(fixed, ()), fixed.threads)
        else:
            setting, timed = choice.next_call()
            self._run_kernels(self._calls_on(setting, ()), setting.threads, choice if timed else None)
        outs = [view.copy() for view in parts.outputs]
        for buf, safe in parts.scales:
            if not buf[0] <= safe:  # NaN included
                self._check_overflow(outs)  # raises, naming the quantizer
        if parts.output_block is not None:
            if not _flat_finite(parts.output_block):
                self._check_overflow(outs)
        else:
            for flat, bound in parts.output_scans:
                if (bound is None or not float(bound[0][0]) * bound[1] + bound[2] < _FINITE_BOUND) and not _flat_finite(flat):
                    self._check_overflow(outs)
        return outs[0] if len(outs) == 1 else outs

    def _root(self, name: str) -> str:
        """The buffer whose memory plan buffer ``name`` is (itself, or what it aliases)."""
        return self.plan["buffers"][name].get("alias", name)

    def _entry_arguments_on(self, root: str) -> tuple:
        """``(position, shape, dtype)`` of each whole-model function argument on buffer ``root``'s memory."""
        specs = self.plan["buffers"]
        return tuple((position, tuple(specs[a]["shape"]), np.dtype(specs[a]["dtype"]))
                     for position, a in enumerate(self.plan["entry"]["args"]) if isinstance(a, str) and self._root(a) == root)

    def _direct_input_bindings(self) -> list[_DirectInput | None] | None:
        """Per model input, where the whole-model function takes its memory (None for an input
        that is always copied in: below ``_DIRECT_INPUT_MIN_BYTES``, or sharing memory with an
        output), so that a call can hand it the caller's array instead of copying it in; None
        where there is no whole-model function. The kernels only read an input's buffer: what
        the compiler lowers writes each tensor into its own buffer (tests check the caller's
        array is left as it was)."""
        if self.plan.get("entry") is None:
            return None
        output_roots = {self._root(o["name"]) for o in self.outputs}
        bindings = []
        for spec in self.inputs:
            name = spec["name"]
            nbytes = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
            if nbytes < _DIRECT_INPUT_MIN_BYTES or self._root(name) in output_roots:
                bindings.append(None)
                continue
            bindings.append(_DirectInput(nbytes, self._entry_arguments_on(name)))
        return bindings

    def _readable_in_place(self, i: int, x: np.ndarray) -> bool:
        """Whether input ``i``'s checked array ``x`` can be handed to the kernels as it is."""
        binding = self._direct_inputs[i]
        return (binding is not None and x.flags.c_contiguous and x.ctypes.data % _ALIGNMENT == 0
                and x.nbytes == binding.nbytes)

    def _with_direct_inputs(self, calls: list, direct: dict[int, np.ndarray]) -> list:
        """The whole-model call with the inputs in ``direct`` (position -> array) read from those arrays."""
        import tvm

        (func, args), = calls
        args = list(args)
        for i, x in direct.items():
            for position, shape, dtype in self._direct_inputs[i].args:
                args[position] = tvm.runtime.from_dlpack(x.view(dtype).reshape(shape))
        return [(func, args)]

    def _with_fresh_outputs(self, calls: list) -> tuple[list, list[np.ndarray]]:
        """The whole-model call with every output bound to a new, 64-byte aligned numpy array
        (the alignment TVM's kernels assume), and those arrays: the outputs without a copy."""
        import tvm

        (func, args), = calls
        args = list(args)
        outs = []
        for out in self._fresh_outputs:
            memory = _output_memory(out.nbytes)
            for position, shape, dtype in out.args:
                args[position] = tvm.runtime.from_dlpack(memory.view(dtype).reshape(shape))
            outs.append(memory.view(out.dtype).reshape(out.shape))
        return [(func, args)], outs

    def _in_this_process(self) -> bool:
        """Whether the buffers are host memory of this process (numpy views of them are possible)."""
        return self.target != "cuda"

    def _allocate(self, weights: Mapping[str, np.ndarray]) -> dict:
        import tvm

        bufs: dict = {}
        specs = self.plan["buffers"]
        blocks = {}
        if self._in_this_process():
            inputs = [spec["name"] for spec in self.plan["inputs"]]
            outputs = [self._root(o["name"]) for o in self.plan["outputs"]]
            blocks = {"input": self._io_block_views(inputs),
                      "output": self._io_block_views(outputs) if not set(inputs) & set(outputs) else (None, {})}
        self._io_blocks = {kind: block for kind, (block, _) in blocks.items() if block is not None}
        in_block = {name: view for _, views in blocks.values() for name, view in views.items()}
        # a pool holds whatever its last buffer left (the kernels write each buffer before they read it)
        pools = {name: (tvm.runtime.from_dlpack(_output_memory(nbytes)) if self._in_this_process()
                        else tvm.runtime.tensor(np.zeros(nbytes, np.uint8), self.dev))
                 for name, nbytes in self.plan.get("pools", {}).items()}
        for name, spec in specs.items():
            if "alias" in spec:
                continue
            if "pool" in spec:  # memory shared with temporaries of other lifetimes (targets.tvm.memory)
                bufs[name] = pools[spec["pool"]]._create_view(tuple(spec["shape"]), spec["dtype"])
            elif spec["kind"] == "weight":
                bufs[name] = tvm.runtime.tensor(weights[name], self.dev)
            elif name in in_block:
                bufs[name] = tvm.runtime.from_dlpack(in_block[name])
            else:
                bufs[name] = tvm.runtime.tensor(np.zeros(spec["shape"], dtype=spec["dtype"]), self.dev)
        for name, spec in specs.items():
            if "alias" in spec:
                bufs[name] = bufs[spec["alias"]]._create_view(tuple(spec["shape"]), spec["dtype"])
        return bufs

    def _io_block_views(self, buffers: list[str]) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """One zeroed float32 block of host memory holding the model's input (or output)
        ``buffers`` when they are all float32 buffers of their own memory, at least two, and take
        at most ``_IO_BLOCK_MAX_BYTES``; and a view of it for each, each starting on a 64-byte
        boundary (the alignment TVM's kernels assume), the gaps left 0. (None, {}) otherwise."""
        specs = self.plan["buffers"]
        names = list(dict.fromkeys(buffers))
        if not all(specs[name]["dtype"] == "float32" and "alias" not in specs[name]
                   and specs[name]["kind"] != "weight" and math.prod(specs[name]["shape"]) > 0 for name in names):
            return None, {}
        slots = [-(-math.prod(specs[name]["shape"]) * 4 // _ALIGNMENT) * _ALIGNMENT for name in names]
        if len(names) < 2 or sum(slots) > _IO_BLOCK_MAX_BYTES:
            return None, {}
        memory = _output_memory(sum(slots))
        memory[...] = 0
        views, start = {}, 0
        for name, size in zip(names, slots):
            shape = tuple(specs[name]["shape"])
            views[name] = memory[start:start + math.prod(shape) * 4].view(np.float32).reshape(shape)
            start += size
        return memory.view(np.float32), views

    def _func(self, name: str):
        if name not in self._funcs:
            self._funcs[name] = self.lib[name]
        return self._funcs[name]

    def _skips(self, skip_planes) -> tuple:
        if isinstance(skip_planes, Mapping):
            unknown = set(skip_planes) - set(self.layers)
            if unknown:
                raise BadInput(f"skip_planes names unknown layers: {sorted(unknown)[:3]}")
            return tuple(sorted((k, _plane_skip(v, f"skip_planes[{k!r}]")) for k, v in skip_planes.items()))
        skip = _plane_skip(skip_planes, "skip_planes")
        return tuple((k, skip) for k in sorted(self.layers)) if skip else ()

    def _calls(self, skips: tuple):
        """Resolved call list of the plan's steps, one per kernel, for a plane-skip setting (cached)."""
        if skips not in self._calls_cache:
            self._calls_cache[skips] = [(self._func(step["func"]), self._arguments(step["args"], skips))
                                        for step in self.plan["steps"]]
        return self._calls_cache[skips]

    def _run_calls(self, skips: tuple):
        """What one inference calls: the library's whole-model function where it has one (one
        call into TVM instead of one per kernel), else the steps (cached: the hot path is a plain loop)."""
        if skips not in self._run_cache:
            entry = self.plan.get("entry")
            self._run_cache[skips] = ([(self._func(entry["func"]), self._arguments(entry["args"], skips))] if entry
                                      else self._calls(skips))
        return self._run_cache[skips]

    def _arguments(self, spec: list, skips: tuple) -> list:
        by_layer = dict(skips)
        args = []
        for a in spec:
            if isinstance(a, str):
                args.append(self.buffers[a])
            elif "int" in a:
                args.append(a["int"])
            elif "zero_point" in a:  # {"zero_point": layer}: its weights' zero point for those planes
                layer = a["zero_point"]
                info = self.layers[layer]
                args.append(kept_zero_point(info["zero_point"], info["plane_shifts"],
                                            self._kept_planes(layer, by_layer.get(layer, 0))))
            else:  # {"planes": layer}: how many most significant planes to accumulate
                args.append(self._kept_planes(a["planes"], by_layer.get(a["planes"], 0)))
        return args

    def _kept_planes(self, layer: str, skip: int) -> int:
        """Planes (most significant first) left when ``skip`` bit positions are dropped.

        A position is one power of two: with +/- planes both of its planes go together (a
        weight and its negation stay negations); offset planes take the zero point that goes
        with them (``bitplanes.kept_zero_point``: zero weights stay zero). Either way no weight
        changes sign, and each moves by less than the lowest kept power of two. The most
        significant position always stays: a layer is never switched off, only made coarser.
        """
        info = self.layers[layer]
        shifts = info.get("plane_shifts")
        if not skip:
            return info["planes"]
        if not shifts:  # artifacts without per-plane shifts: count planes
            return max(1, info["planes"] - skip)
        levels = sorted(set(shifts), reverse=True)
        lowest_kept = levels[max(1, len(levels) - skip) - 1]
        return sum(1 for s in shifts if s >= lowest_kept)

    def _combine_weights(self, skips: tuple) -> None:
        """Bit-parallel layers hold combined int8 weights, float-input layers float32 ones:
        recombine them from the planes for a plane setting."""
        wanted = dict(skips)
        for name, info in self.layers.items():
            if info["kernel"] != "bitparallel" and "float_buffer" not in info:
                continue
            skip = wanted.get(name, 0)
            if self._repacked.get(name) == skip:
                continue
            spec = [tuple(p) for p in info["plane_spec"]]
            bits = np.unpackbits(self._weights[f"{name}.bitplanes"], axis=-1)[..., : info["k"]]
            q = combine_planes(bits, spec, info["zero_point"], self._kept_planes(name, skip))
            if "float_buffer" in info:  # integers below 2**24: exact in float32
                w = q.reshape(info["weight_shape"]).astype(np.float32)
                w = float_layout_weight(w, info.get("float_layout"), info.get("float_block", 0))
                self.buffers[info["float_buffer"]].copyfrom(w)
            else:
                packed = pack_bitparallel_layout(info["pack"], q, info["weight_shape"], info["groups"],
                                                 info.get("nibble_high", 0))
                self.buffers[info["int8_buffer"]].copyfrom(np.ascontiguousarray(packed))
            self._repacked[name] = skip

    def _fill_acc_offsets(self, skips: tuple) -> None:
        """Layers fed offset activation codes (``code + L``) subtract ``L * sum_k q[c, k]`` in
        their epilogue; ``q`` is the weight of the planes kept for this plane setting."""
        wanted = dict(skips)
        for name, info in self.layers.items():
            if "acc_offset" not in info:
                continue
            skip = wanted.get(name, 0)
            if self._offsets_for.get(name) == skip:
                continue
            if name not in self._plane_sums:
                ones = self._plane_ones(name, info)
                self._plane_sums[name] = np.stack([sign * (ones[i] << shift) for i, (shift, sign) in
                                                   enumerate(info["plane_spec"])]) if info["plane_spec"] else ones
            kept = self._kept_planes(name, skip)
            zero_point = kept_zero_point(info["zero_point"], [shift for shift, _ in info["plane_spec"]], kept)
            weight_sum = self._plane_sums[name][:kept].sum(axis=0, dtype=np.int64) - zero_point * info["k"]
            buf = self.buffers[info["acc_offset"]]
            buf.copyfrom((weight_sum * info["code_offset"]).astype(buf.dtype))
            self._offsets_for[name] = skip

    def _plane_ones(self, name: str, info: dict) -> np.ndarray:
        """Ones per weight plane and output channel (int64 ``[P, N]``), from the stored planes."""
        n = self.plan["buffers"][info["acc_offset"]]["shape"][0]
        if info["kernel"] == "bitparallel":
            bits = np.unpackbits(self._weights[f"{name}.bitplanes"], axis=-1)[..., : info["k"]]
            return bits.sum(axis=-1, dtype=np.int64)
        packed = self._weights[info["weight_planes"]]  # bit-serial layout [N tiles, P, K words, lanes] (zero padded)
        tiles, planes, words, lanes = packed.shape
        as_bytes = np.ascontiguousarray(packed).view(np.uint8).reshape(tiles, planes, words, lanes, -1)
        ones = np.unpackbits(as_bytes, axis=-1).sum(axis=(2, 4), dtype=np.int64)  # [N tiles, P, lanes]
        return ones.transpose(1, 0, 2).reshape(planes, tiles * lanes)[:, :n]

    def _check_input(self, spec: dict, x, check_finite: bool = True) -> np.ndarray:
        """``x`` checked (and converted) for input ``spec``; ``check_finite`` False: the caller
        checks the float values itself."""
        if not isinstance(x, np.ndarray) and callable(getattr(x, "detach", None)):
            x = x.detach()  # a torch tensor that requires grad (np.asarray refuses it; the runtime imports no torch)
        x = np.asarray(x)
        dtype, shape = self._input_types[spec["name"]]
        if x.dtype == dtype and x.shape == shape and dtype.kind == "f":
            if check_finite and not _all_finite(x):  # the common call: float input of the right type and shape
                raise BadInput(f"input {spec['name']} contains NaN or infinity")
            return x
        if x.shape != tuple(spec["shape"]):
            raise BadInput(f"input {spec['name']}: expected shape {spec['shape']}, got {list(x.shape)}")
        if x.dtype != np.dtype(spec["dtype"]):
            if x.dtype.kind not in "fiu":
                raise BadInput(f"input {spec['name']}: expected {spec['dtype']} data, got {x.dtype}")
            if np.dtype(spec["dtype"]).kind in "iu" and x.dtype.kind == "f" and not (
                    _all_finite(x) and (x == np.round(x)).all()):
                raise BadInput(f"input {spec['name']}: expected integer ids, got values that are not whole numbers")
            with np.errstate(over="ignore", invalid="ignore"):  # float64 past float32's range: refused just below
                x = x.astype(spec["dtype"])
        if check_finite and x.dtype.kind == "f" and not _all_finite(x):
            raise BadInput(f"input {spec['name']} contains NaN or infinity")
        limit = spec.get("index_limit")
        if limit is not None and x.size and (int(x.min()) < 0 or int(x.max()) >= limit):
            raise BadInput(f"input {spec['name']}: token id out of range: ids must lie in [0, {limit}), "
                           f"got {int(x.min())}..{int(x.max())}")
        return x

    def __call__(self, *inputs, skip_planes: int | Mapping[str, int] = 0, record: dict | None = None,
                 record_names: Collection[str] | None = None):
        """Run the model; returns one array, or a list when the model has several outputs.

        ``skip_planes`` drops that many least significant weight planes per layer (or per
        named layer, with a dict): less work, less accuracy, no recompilation. With
        ``record`` (a dict), every intermediate buffer is copied into it by name, or only those
        of ``record_names`` (a large model's buffers together can be gigabytes).

        Calls from several threads run one at a time (each returns arrays of its own); load
        the artifact once per thread to run them in parallel.
        """
        with self._lock:
            return self._call(inputs, skip_planes, record, record_names)

    def _call(self, inputs: tuple, skip_planes, record: dict | None, record_names: Collection[str] | None = None):
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        small = self._small_call
        if small is not None and record is None and type(skip_planes) is int and skip_planes == 0 and self._prepared_for == ():
            outs = self._call_small(small, inputs)
            if outs is not None:
                return outs
        if len(inputs) != len(self.inputs):
            raise BadInput(f"model takes {len(self.inputs)} input(s), got {len(inputs)}")
        direct = {}  # inputs the kernels read where the caller keeps them
        for i, (spec, x) in enumerate(zip(self.inputs, inputs)):
            x = self._check_input(spec, x, check_finite=not self._host)
            if self._direct_inputs is not None and record is None and self._readable_in_place(i, x):
                if not _all_finite(x):
                    raise BadInput(f"input {spec['name']} contains NaN or infinity")
                direct[i] = x
            elif self._host:
                # copied first, then checked where the copy left it: in this core's cache (the
                # user's array may be cold; 256 KiB: 16 -> 13.5 us)
                np.copyto(self._in_views[i], x)
                if i not in self._block_inputs and not _all_finite(self._in_views[i]):
                    raise BadInput(f"input {spec['name']} contains NaN or infinity")
            else:
                self.buffers[spec["name"]].copyfrom(np.ascontiguousarray(x))
        # every input of the block was copied in just now (they are small: never read in place)
        if self._block_inputs and not _all_finite(self._io_blocks["input"]):
            name = next(self.inputs[i]["name"] for i in sorted(self._block_inputs) if not _all_finite(self._in_views[i]))
            raise BadInput(f"input {name} contains NaN or infinity")
        # the common call (all planes) skips the plane-setting bookkeeping
        skips = () if type(skip_planes) is int and skip_planes == 0 else self._skips(skip_planes)
        if skips != self._prepared_for:
            if self._has_combined_weights:
                self._combine_weights(skips)
            if self._has_offsets:
                self._fill_acc_offsets(skips)
            self._prepared_for = skips
        setting, timed = self._setting_of_call(skips, record)
        threads = setting.threads
        calls = self._calls_on(setting, skips)
        if direct:
            calls = self._with_direct_inputs(calls, direct)
        fresh = self._fresh_outputs is not None and record is None and self._fresh_bytes >= _FRESH_OUTPUT_MIN_BYTES
        if fresh:
            calls, outs = self._with_fresh_outputs(calls)
        if record is None:
            self._run_kernels(calls, threads, self.call_choice if timed else None)
        else:
            self._run_recording(skips, threads, record, record_names)
        if fresh:
            pass  # the kernels wrote into the arrays returned
        elif self._host:
            outs = [v.copy() for v in self._out_views]
        else:
            outs = [self.buffers[o["name"]].numpy() for o in self.outputs]
        self._check_overflow(outs, in_block=not fresh and self._outputs_in_block)
        return outs[0] if len(outs) == 1 else outs

    def _run_recording(self, skips: tuple, threads: int | None, record: dict,
                       names: Collection[str] | None = None) -> None:
        """Run the steps one at a time and copy into ``record`` every buffer (less weights), or
        those of ``names``, with the views of its memory, as the last step naming that memory
        leaves it: its final value, though a later step may reuse the memory (a shared pool, see
        targets.tvm.memory)."""
        specs = self.plan["buffers"]
        wanted = set(specs) if names is None else set(names)
        kept = [name for name, spec in specs.items() if name in wanted
                and (spec["kind"] not in ("weight", "derived") or name in self._recorded_derived)]
        memory: dict[str, list[str]] = {}  # root -> the recorded buffers on its memory
        for name in kept:
            memory.setdefault(self._root(name), []).append(name)
        last: dict[str, int] = {}  # root -> the last step naming its memory
        for i, step in enumerate(self.plan["steps"]):
            for a in step["args"]:
                if isinstance(a, str):
                    last[self._root(a)] = i
        done_at: dict[int, list[str]] = {}
        for root, i in last.items():
            done_at.setdefault(i, []).append(root)

        def copy_out(i: int) -> None:
            for root in done_at.get(i, ()):
                for name in memory.get(root, ()):
                    record[name] = self.buffers[name].numpy()

        self._run_kernels(self._calls(skips), threads, after_each=copy_out)
        for name in kept:  # buffers no step names (an input the model ignores)
            if name not in record:
                record[name] = self.buffers[name].numpy()

    def _run_kernels(self, calls: list, threads: int | None, timed_by: CallChoice | None = None,
                     after_each: Callable[[int], None] | None = None) -> None:
        """Run ``calls`` on at most ``threads`` threads (None: TVM's pool as configured), and
        record their time with ``timed_by`` where it is given (a trial call of :attr:`call_choice`);
        ``after_each(i)`` runs after call ``i``."""
        capped = threads is not None and self._host  # (no context manager: a microsecond a call)
        if capped:
            _cap_threads(threads)
        start = time.perf_counter() if timed_by is not None else 0.0
        try:
            for i, (func, args) in enumerate(calls):
                func(*args)
                if after_each is not None:
                    after_each(i)
        except (TypeError, ValueError) as e:  # TVM's argument checks: buffers the kernels were not built for
            raise _csqc_bug(self.path, f"the plan does not match the compiled kernels (TVM: {error_text(e)})") from None
        finally:
            if capped:
                _uncap_threads()
        if timed_by is not None:
            timed_by.record(time.perf_counter() - start)

    @contextlib.contextmanager
    def _thread_limit(self):
        """Run the enclosed kernels on at most ``self.threads`` threads (:func:`_cap_threads`)."""
        capped = self.threads is not None and self._host
        if capped:
            _cap_threads(self.threads)
        try:
            yield
        finally:
            if capped:
                _uncap_threads()

    def _check_overflow(self, outs: list[np.ndarray], in_block: bool = False) -> None:
        """Refuse a run whose activations left float32's range, as the interpreter does.

        Past that point kernels disagree (TVM turns an infinite scale into finite garbage where
        numpy gives NaN). A dynamic scale ``S = max|x|`` bounds every value it quantizes, so
        ``S * L`` finite is the exact condition there; outputs must be finite too: scanned,
        unless the compiler bounded an output by its layer's input scale (``finite_below``: the
        accumulator bound, ``mult`` and ``add``) and this run's scale keeps it far from overflow.
        ``in_block``: ``outs`` are copies of the output block's views (one scan checks them all).
        """
        for buf, levels, safe, name in self._scales:
            scale = float((buf if self._host else buf.numpy().reshape(-1))[0])
            if not scale <= safe:  # quantization_overflows(scale, levels), NaN included, in 0.1 us
                raise overflow_error(scale_overflow(name, scale, levels))
        if in_block and _all_finite(self._io_blocks["output"]):
            return
        for spec, y, bound in zip(self.outputs, outs, self._output_bounds):
            if bound is not None and float(bound[0][0]) * bound[1] + bound[2] < _FINITE_BOUND:
                continue  # every value of this output's epilogue stays below float32's largest
            if not _all_finite(y):
                raise overflow_error(f"output {spec['name']} is NaN or infinite")

    def time_us(self, *inputs, repeat: int = 50, skip_planes=0) -> float:
        """Median wall time of one call in microseconds (inputs copied in each time)."""
        if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or repeat < 1:
            raise BadInput(f"repeat must be a whole number of calls >= 1, got {repeat!r}")
        self(*inputs, skip_planes=skip_planes)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            self(*inputs, skip_planes=skip_planes)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)


def physical_cores(cpus: Sequence[int] | None = None, sys_root: str | os.PathLike = "/sys") -> int:
    """Cores this process may run on: its CPU affinity (or ``cpus``), one per physical core
    (hyperthread siblings share one; Linux's ``topology`` files say which), at most the cgroup's
    CPU quota (``sys_root``: where sysfs is, for tests)."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
    root = Path(sys_root)
    cores = set()
    for cpu in cpus:
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux): count the CPU itself
    count = max(1, len(cores))
    try:
        quota, period = (root / "fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def _default_thread_count() -> None:
    """Give TVM's thread pool one thread per physical core when nothing says otherwise.

    Without ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` TVM takes half the logical CPUs on x86,
    assuming two hyperthreads a core. On a VM whose vCPUs are cores (a two-vCPU one here) that
    is one thread, where ONNX Runtime and PyTorch take every physical core: ResNet-18 ran in
    20 ms instead of 10. So loading a CPU model sets ``TVM_NUM_THREADS`` to
    :func:`physical_cores` once, if neither variable is set (TVM reads it at every parallel
    launch); a value the user sets is kept."""
    if os.environ.get("TVM_NUM_THREADS") is None and os.environ.get("OMP_NUM_THREADS") is None:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def pool_threads() -> int:
    """The threads a loaded model's calls run on when nothing caps them: ``TVM_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else one per physical core (what loading a model sets: see
    :func:`_default_thread_count`). Whatever times kernels for a model (``csqc compile --tune``)
    times them on this many."""
    return _pool_threads() or physical_cores()


def _pool_threads() -> int | None:
    """The threads of TVM's pool as configured (``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``);
    None where neither says (TVM then decides)."""
    value = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    return int(value) if value is not None and value.isdigit() and int(value) > 0 else None


def _cap_threads(cap: int) -> None:
    """Let TVM's parallel launches use at most ``cap`` threads until :func:`_uncap_threads`.

    TVM reads ``TVM_NUM_THREADS`` at every parallel launch (else ``OMP_NUM_THREADS``, else
    half the hardware threads on x86; loading a model sets it, see :func:`_default_thread_count`),
    and at 1 runs the task on the calling thread without waking its pool. So the variable is lowered for a call where it would allow more, and
    restored after it: other models in the process keep their threads. It is the process's:
    while capped calls run in several Python threads, the first one's cap holds and the last
    one to finish restores it (an uncapped call meanwhile runs capped too)."""
    with _THREAD_CAP_LOCK:
        if _THREAD_CAP["calls"] == 0:
            previous = os.environ.get("TVM_NUM_THREADS")
            configured = previous if previous is not None else os.environ.get("OMP_NUM_THREADS")
            if configured is not None and configured.isdigit() and 0 < int(configured) <= cap:
                _THREAD_CAP["saved"] = _UNCHANGED
            else:
                _THREAD_CAP["saved"] = previous
                os.environ["TVM_NUM_THREADS"] = str(cap)
        _THREAD_CAP["calls"] += 1


def _uncap_threads() -> None:
    with _THREAD_CAP_LOCK:
        _THREAD_CAP["calls"] -= 1
        if _THREAD_CAP["calls"] == 0:
            saved = _THREAD_CAP["saved"]
            if saved is None:
                os.environ.pop("TVM_NUM_THREADS", None)
            elif saved is not _UNCHANGED:
                os.environ["TVM_NUM_THREADS"] = saved


@dataclass(frozen=True)
class StepTime:
    """Median time of one kernel call of an artifact's plan."""

    index: int  # position in the plan's steps
    node: str  # the IR node the call lowers ("" for calls without one)
    kind: str  # the kernel builder: conv2d_f32, epilogue, quantize, bitparallel_conv2d, ...
    median_us: float


def _kernel_kind(func: str) -> str:
    """``k12_epilogue`` -> ``epilogue`` (the planner names kernels ``k<n>_<builder>``)."""
    return func.split("_", 1)[1] if func.startswith("k") and "_" in func else func


def profile_steps(model: CompiledModel, *inputs, repeat: int = 20) -> list[StepTime]:
    """Median wall time of every kernel call of ``model`` on ``inputs``, in plan order.

    Each call is timed on its own (a few tenths of a microsecond of Python call overhead
    included), so the sum is close to, not equal to, ``model.time_us``: use it to see where
    the time goes, not as the model's latency.
    """
    with model._lock:
        # copies the inputs into the model's buffers, which the steps read (a recording run never
        # reads them where the caller keeps them), and prepares derived weights
        model(*inputs, record={}, record_names=())
        calls = model._calls(())
        samples = np.zeros((repeat, len(calls)))
        with model._thread_limit():  # on the threads a call runs on
            for r in range(repeat):
                for i, (func, args) in enumerate(calls):
                    start = time.perf_counter()
                    func(*args)
                    samples[r, i] = time.perf_counter() - start
    medians = np.median(samples, axis=0) * 1e6
    return [StepTime(i, step.get("layer", ""), _kernel_kind(step["func"]), float(t))
            for i, (step, t) in enumerate(zip(model.plan["steps"], medians))]


def aligned_array(x) -> np.ndarray:
    """A C-contiguous copy of ``x`` at a 64-byte aligned address, the alignment TVM's kernels
    assume: a CPU model reads such an input where it lies (from 128 KiB) instead of copying it
    in. torch's CPU tensors are aligned so already (``tensor.numpy()`` shares them); numpy
    places large arrays 16 bytes past a boundary. Allocate once and write each batch into it
    (``out[...] = batch``) to keep the saving."""
    x = np.asarray(x)
    out = _output_memory(x.nbytes).view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def _output_memory(nbytes: int) -> np.ndarray:
    """``nbytes`` new, uninitialized bytes at a 64-byte aligned address (uint8; the tests fill
    them with 0xFF, so an output element a call leaves unwritten shows as NaN or -1)."""
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + nbytes]


def _plane_skip(value, what: str) -> int:
    """A count of bit positions to drop: an integer >= 0 (a bool, float or string is refused,
    not rounded or parsed)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadInput(f"{what} must be an integer >= 0 (or a dict of them per layer), got {value!r}")
    if value < 0:
        raise BadInput(f"{what} must be >= 0, got {value}")
    return int(value)


def _flat_finite(x: np.ndarray) -> bool:
    """:func:`_all_finite` for a 1-D float array, in half its time (a small model's call makes
    two such scans: see CompiledModel._call_small). ``dot`` warns where a square overflows (an
    element beyond ~1.8e19, finite or not): the filter below keeps that out of the caller's
    output (np.errstate would cost more than the scan)."""
    return math.isfinite(x.dot(x)) or _all_finite(x)


warnings.filterwarnings("ignore", "overflow encountered in dot", RuntimeWarning, __name__)


def _all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite, in well under a microsecond for the common case.

    ``x . x`` is finite exactly when every element is, unless a finite element's square
    overflows: only then ask element by element. ``vdot`` runs in BLAS, which raises no
    floating-point warnings (a ufunc sum needs np.errstate, ~1.5 us, to keep them quiet).
    """
    if x.dtype.kind != "f":
        return True
    return math.isfinite(np.vdot(x, x)) or bool(np.isfinite(x).all())


_MAX_REASON_CHARS = 2000  # a bound for a runaway message, far above any TVM argument-check reason


def error_text(e: BaseException) -> str:
    """The whole message of ``e`` on one line: TVM's argument checks put the reason on the lines
    after "... when calling:", so the first line alone says nothing."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text[:_MAX_REASON_CHARS]


def _csqc_bug(path: Path, what: str) -> CsqcError:
    """The file passed its SHA-256 checks, so it is what ``csqc compile`` wrote: a recompile gives the
    same file, and the fault is csqc's (exit code 1)."""
    return CsqcError(f"{path}: {what}. The artifact's digests match, so it is not damaged: unless someone "
                     "rebuilt and re-sealed it (digests say nothing of who wrote it), this is a csqc bug, please "
                     "report it with the model (compiling again gives the same file)")


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(type(d) is int and d >= 0 for d in value)


def _is_dtype(name) -> bool:
    """A numeric dtype spelled the way numpy and TVM both read it."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        return False
    return dtype is not None and dtype.kind in "biuf" and dtype.itemsize <= 8 and str(dtype) == name


def _nbytes(spec: dict) -> int:
    return math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize


def check_plan(path: Path, plan: dict, weights: Mapping[str, np.ndarray]) -> None:
    """``BadInput`` unless the plan and weights of the artifact at ``path`` are safe to allocate and run."""
    problem = _plan_problem(plan, weights)
    if problem:
        raise BadInput(f"{path}: the artifact's plan is not one csqc writes ({problem}), although its digests "
                       "match: it was edited and re-sealed, or csqc wrote it wrong (then please report it)")


def _plan_problem(plan: dict, weights: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with a plan the runtime is about to trust, or None.

    Checked before any memory is allocated or any kernel runs: a view larger than its buffer
    would let kernels write past it, and any other malformed field would fail deep in TVM.
    """
    target = plan.get("target")
    if not isinstance(target, dict) or target.get("kind") not in ("llvm", "cuda", "aarch64"):
        return "its target is not llvm, cuda or aarch64"
    features = target.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) and len(f) < 64 for f in features):
        return "the target's 'features' must list instruction set names"
    threads = plan.get("threads")
    if threads is not None and not (type(threads) is int and 1 <= threads <= 1024):
        return "'threads' must be a thread count from 1 to 1024"
    buffers = plan.get("buffers")
    if not isinstance(buffers, dict) or not all(isinstance(b, dict) for b in buffers.values()):
        return "'buffers' must map names to buffer specs"
    for name, spec in buffers.items():
        if not _is_shape(spec.get("shape")) or not _is_dtype(spec.get("dtype")) or spec.get("kind") not in _BUFFER_KINDS:
            return f"buffer {name!r} needs a shape of sizes, a numeric dtype and one of the kinds {_BUFFER_KINDS}"
    pools = plan.get("pools", {})
    if not isinstance(pools, dict) or not all(type(n) is int and 0 < n for n in pools.values()):
        return "'pools' must map names to sizes in bytes"
    for name, spec in buffers.items():
        if "alias" in spec:
            base = buffers.get(spec["alias"]) if isinstance(spec["alias"], str) else None
            if base is None or "alias" in base or _nbytes(spec) > _nbytes(base):
                return f"buffer {name!r} views {spec['alias']!r}, which is missing, a view itself or smaller"
        if "pool" in spec:
            pool = pools.get(spec["pool"]) if isinstance(spec["pool"], str) else None
            if pool is None or "alias" in spec or spec["kind"] != "temp" or _nbytes(spec) > pool:
                return f"buffer {name!r} lies in pool {spec['pool']!r}, which is missing or smaller (or it is not " \
                       "a temporary buffer of its own)"
        if "alias" not in spec and spec["kind"] == "weight":
            w = weights.get(name)
            if not isinstance(w, np.ndarray):
                return f"weight {name!r} is missing"
            if list(w.shape) != spec["shape"] or str(w.dtype) != spec["dtype"]:
                return f"weight {name!r} is {w.dtype}{list(w.shape)}, the plan says {spec['dtype']}{spec['shape']}"
            if name.endswith(".code_form") and not forms_in_range(w):
                return f"weight {name!r} holds fixed-point code forms out of range (shifts past 15, or overflowing)"
    stray = sorted(set(weights) - {n for n, b in buffers.items() if b["kind"] == "weight"})
    if stray:
        return f"weights.npz holds arrays the plan declares no weight buffer for: {stray[:3]}"
    need = sum(pools.values()) + sum(_nbytes(b) for b in buffers.values() if "alias" not in b and "pool" not in b)
    if need > physical_memory():
        return f"its buffers need {need / 2**30:.1f} GiB, more than this machine's memory"
    for key in ("inputs", "outputs"):
        specs = plan.get(key)
        if not isinstance(specs, list) or not specs:
            return f"{key!r} must list buffers"
        for s in specs:
            buf = buffers.get(s.get("name")) if isinstance(s, dict) and isinstance(s.get("name"), str) else None
            if buf is None or s.get("shape") != buf["shape"] or s.get("dtype") != buf["dtype"]:
                return f"{key!r} entry {s!r} does not match a buffer of the same shape and dtype"
            bound = s.get("finite_below")
            if "finite_below" in s and not (
                    key == "outputs" and isinstance(bound, dict) and isinstance(bound.get("scale"), str)
                    and buffers.get(bound["scale"], {}).get("shape") == [1]
                    and buffers[bound["scale"]]["dtype"] == "float32"
                    and all(type(bound.get(k)) is float and 0 <= bound[k] < math.inf for k in ("per_scale", "plus"))):
                return f"output {s['name']!r} has a bound {bound!r}, not a float32 scale buffer and two finite numbers"
            limit = s.get("index_limit")
            if "index_limit" in s and (type(limit) is not int or limit < 1 or np.dtype(s["dtype"]).kind not in "iu"):
                return f"input {s['name']!r} has an index limit {limit!r}, not a positive count of table rows"
    layers = plan.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(i, dict) for i in layers.values()):
        return "'layers' must map names to layer records"
    for name, info in layers.items():
        problem = _layer_problem(name, info, buffers, weights)
        if problem:
            return problem
    steps = plan.get("steps")
    if not isinstance(steps, list):
        return "'steps' must be a list"
    entry = plan.get("entry", {"func": "", "args": []})  # the whole-model function (optional)
    for i, step in [*enumerate(steps), ("entry", entry)]:
        if not isinstance(step, dict) or not isinstance(step.get("func"), str) or not isinstance(step.get("args"), list):
            return f"step {i} needs a kernel name and a list of arguments"
        for a in step["args"]:
            if isinstance(a, str):
                ok = a in buffers
            elif isinstance(a, dict) and "int" in a:
                ok = type(a["int"]) is int and -2**31 <= a["int"] < 2**31  # kernels take int32
            elif isinstance(a, dict) and "zero_point" in a:  # a layer's zero point, for each plane setting
                info = layers.get(a["zero_point"]) if isinstance(a["zero_point"], str) else None
                ok = (info is not None and type(info.get("zero_point")) is int
                      and isinstance(info.get("plane_shifts"), list) and len(info["plane_shifts"]) == info["planes"]
                      and all(-2**31 <= kept_zero_point(info["zero_point"], info["plane_shifts"], kept) < 2**31
                              for kept in range(1, info["planes"] + 1)))
            else:
                ok = isinstance(a, dict) and isinstance(a.get("planes"), str) and a["planes"] in layers
            if not ok:
                return f"step {i} ({step['func']}) has an argument {a!r} that is no buffer, int32, layer or zero point"
        if "levels" in step:  # a dynamic quantization: args[scale_arg] (default 1) is its float32[1] scale
            at = step.get("scale_arg", 1)
            scale = buffers.get(step["args"][at]) if type(at) is int and 0 <= at < len(step["args"]) \
                and isinstance(step["args"][at], str) else None
            if type(step["levels"]) is not int or not 1 <= step["levels"] <= 255 or scale is None \
                    or scale["shape"] != [1] or scale["dtype"] != "float32":
                return f"step {i} ({step['func']}) needs levels 1..255 and a float32[1] scale buffer"
    if "entry" in plan and entry["args"] != whole_model_arguments(steps):
        return "its whole-model function's arguments disagree with its steps"
    unused = sorted(set(buffers) - _used_buffers(plan))
    if unused:  # memory nothing reads or writes: a plan csqc never writes
        return f"it declares buffers no step, input, output or layer uses: {unused[:3]}"
    return None


def _used_buffers(plan: dict) -> set[str]:
    """Buffers the plan refers to: step arguments, inputs, outputs, the buffers layers rebuild
    or read, and the buffers these view."""
    used = {a for step in plan["steps"] for a in step["args"] if isinstance(a, str)}
    used |= {s["name"] for key in ("inputs", "outputs") for s in plan[key]}
    for name, info in plan["layers"].items():
        used |= {info[k] for k in ("int8_buffer", "float_buffer", "acc_offset", "weight_planes")
                 if isinstance(info.get(k), str)}
        tensors = info.get("tensors")
        if isinstance(tensors, dict):  # what verify reads back (a layer's input may be a view only it reads)
            used |= {t for t in tensors.values() if isinstance(t, str)}
        if info["kernel"] == "bitparallel" or "float_buffer" in info:
            used.add(f"{name}.bitplanes")
    buffers = plan["buffers"]
    used |= {buffers[n]["alias"] for n in used if n in buffers and "alias" in buffers[n]}
    return used


def _layer_problem(name: str, info: dict, buffers: dict, weights: Mapping[str, np.ndarray]) -> str | None:
    if not isinstance(info.get("kernel"), str) or type(info.get("planes")) is not int or info["planes"] < 1:
        return f"layer {name!r} needs a kernel name and a plane count"
    shifts = info.get("plane_shifts")
    if shifts is not None and not (isinstance(shifts, list) and all(type(s) is int and 0 <= s < 63 for s in shifts)):
        return f"layer {name!r} has plane shifts {shifts!r}"
    if info.get("float_layout") not in (None, *FLOAT_LAYOUTS):
        return f"layer {name!r} has float layout {info['float_layout']!r}"
    if "acc_offset" in info:
        problem = _offset_problem(name, info, buffers, weights)
        if problem:
            return problem
    if "float_buffer" in info:
        return _float_planes_problem(name, info, buffers, weights)
    if info["kernel"] != "bitparallel":
        return None if "tiles" not in info else f"layer {name!r} runs on tiles but is not bit-parallel"
    # the AMX kernels read the dense layout (linear layers) or conv_rows (convolutions), and only they read conv_rows
    tiles, pack = info.get("tiles"), info.get("pack")
    packs = ("dense", "conv_rows") if tiles == "amx" else tuple(p for p in BITPARALLEL_LAYOUTS if p != "conv_rows")
    if ("tiles" in info and tiles != "amx") or pack not in packs:
        return (f"bit-parallel layer {name!r} has tiles {tiles!r} with pack {pack!r} "
                "(AMX tiles take the dense or conv_rows layout, and conv_rows needs them)")
    problem = _stored_planes_problem(name, info, weights, "bit-parallel")
    if problem:
        return problem
    int8 = info.get("int8_buffer")
    derived = isinstance(int8, str) and buffers.get(int8, {}).get("kind") == "derived"
    if info.get("pack") not in BITPARALLEL_LAYOUTS or not derived:
        return f"bit-parallel layer {name!r} needs a pack in {BITPARALLEL_LAYOUTS} and a derived int8 buffer"
    planes = weights[f"{name}.bitplanes"]
    if info["pack"] == "nibble":
        return _nibble_problem(name, info, buffers[int8], planes)
    if info.get("tap_pairs", False) is not False:
        return _tap_pairs_problem(name, info, planes)
    return None


def _stored_planes_problem(name: str, info: dict, weights: Mapping[str, np.ndarray], kind: str) -> str | None:
    """The plane spec, weight shape, zero point and packed bitplanes of a layer whose weights
    the runtime combines from its planes."""
    spec, shape, k = info.get("plane_spec"), info.get("weight_shape"), info.get("k")
    if not (isinstance(spec, list) and all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int and 0 <= p[0] < 63
                                           and p[1] in (1, -1) and type(p[1]) is int for p in spec)):
        return f"{kind} layer {name!r} has plane spec {spec!r}"
    if not (_is_shape(shape) and len(shape) >= 2 and type(k) is int and k == math.prod(shape[1:])):
        return f"{kind} layer {name!r} has weight shape {shape!r} and k {k!r}, which disagree"
    if type(info.get("zero_point")) is not int or type(info.get("groups")) is not int or info["groups"] < 1:
        return f"{kind} layer {name!r} needs an integer zero point and group count"
    planes = weights.get(f"{name}.bitplanes")
    if not isinstance(planes, np.ndarray) or planes.dtype != np.uint8 or planes.shape != (len(spec), shape[0], -(-k // 8)):
        return f"{kind} layer {name!r} needs uint8 bitplanes of shape {[len(spec), shape[0], -(-k // 8)]}"
    return None


def _float_planes_problem(name: str, info: dict, buffers: dict, weights: Mapping[str, np.ndarray]) -> str | None:
    """A float-input layer whose float32 weights the runtime combines from its planes: a float
    kernel, a derived float32 buffer of the weight's shape, and weights float32 holds exactly."""
    problem = _stored_planes_problem(name, info, weights, "float-input")
    if problem:
        return problem
    layout, block = info.get("float_layout"), info.get("float_block", 0)
    if layout not in (None, *FLOAT_LAYOUTS) or (layout and len(info["weight_shape"]) != 4):
        return f"float-input layer {name!r} has float layout {layout!r}"
    if layout == "winograd" and (type(block) is not int or not 1 <= block <= 64
                                 or list(info["weight_shape"][2:]) != [3, 3]):
        return f"float-input layer {name!r} has a Winograd layout of block {block!r} for weights {info['weight_shape']}"
    shape = list(float_layout_shape(info["weight_shape"], layout, block))
    spec = buffers.get(info["float_buffer"]) if isinstance(info["float_buffer"], str) else None
    if info["kernel"] != "float" or spec is None or spec["kind"] != "derived" or spec["dtype"] != "float32" \
            or list(spec["shape"]) != shape:
        return f"float-input layer {name!r} needs a float kernel and a derived float32 buffer of shape {shape}"
    bits = np.unpackbits(weights[f"{name}.bitplanes"], axis=-1)[..., : info["k"]]
    low, top = prefix_weight_range(bits, [tuple(p) for p in info["plane_spec"]], info["zero_point"])
    if max(-low, top) > 2**24:
        return f"float-input layer {name!r} has weights in [{low}, {top}], beyond float32's integers"
    if layout == "winograd" and max(-low, top) > 2**20:  # the transform's quarters stay exact below
        return f"float-input layer {name!r} has weights in [{low}, {top}], beyond its Winograd transform's exact range"
    return None


def _tap_pairs_problem(name: str, info: dict, planes: np.ndarray) -> str | None:
    """A depthwise layer whose kernel multiplies two taps at once reads each weight as a byte:
    every weight its planes can form (any plane setting) must be an int8."""
    if info["tap_pairs"] is not True or info["pack"] != "depthwise":
        return f"layer {name!r} has tap_pairs {info['tap_pairs']!r} with pack {info['pack']!r}"
    bits = np.unpackbits(planes, axis=-1)[..., : info["k"]]
    low, top = prefix_weight_range(bits, [tuple(p) for p in info["plane_spec"]], info["zero_point"])
    if low < -128 or top > 127:
        return f"depthwise layer {name!r} has weights in [{low}, {top}]; its tap-pair kernel reads int8"
    return None


def _nibble_problem(name: str, info: dict, buffer: dict, planes: np.ndarray) -> str | None:
    """A nibble-packed layer: its buffer has the layout's shape, and every weight its planes can
    form (any plane setting) fits the layout, so the runtime's repacking cannot fail."""
    high, spec, shape = info.get("nibble_high"), info["plane_spec"], info["weight_shape"]
    if type(high) is not int or high not in NIBBLE_HIGH_VALUES:
        return f"nibble layer {name!r} has fifth-bit value {high!r}, not one of {NIBBLE_HIGH_VALUES}"
    n, k = shape[0], info["k"]
    want = [n // VNNI_LANES, k // NIBBLE_K, nibble_block_bytes(high)]
    if len(shape) != 2 or n % VNNI_LANES or k % NIBBLE_K or buffer["dtype"] != "uint8" or list(buffer["shape"]) != want:
        return f"nibble layer {name!r} needs a {shape!r} weight with N % 16 == 0, K % 32 == 0 and a uint8 {want} buffer"
    bits = np.unpackbits(planes, axis=-1)[..., :k]
    low, top = prefix_weight_range(bits, [tuple(p) for p in spec], info["zero_point"])
    lo, hi = nibble_range(high)
    if low < lo or top > hi:
        return f"nibble layer {name!r} has weights in [{low}, {top}], outside its layout's [{lo}, {hi}]"
    return None


def _offset_problem(name: str, info: dict, buffers: dict, weights: Mapping[str, np.ndarray]) -> str | None:
    """A layer fed offset codes needs a derived offset buffer and the planes to sum."""
    off = info.get("acc_offset")
    spec = buffers.get(off) if isinstance(off, str) else None
    if spec is None or spec["kind"] != "derived" or len(spec["shape"]) != 1 or spec["dtype"] not in ("int32", "int64"):
        return f"layer {name!r} needs a derived int32 or int64 offset buffer"
    for key in ("code_offset", "zero_point", "k"):
        if type(info.get(key)) is not int or not 0 <= abs(info[key]) < 2**31:
            return f"layer {name!r} needs an integer {key}"
    plane_spec, n = info.get("plane_spec"), spec["shape"][0]
    if not (isinstance(plane_spec, list) and all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                                                 and 0 <= p[0] < 63 and p[1] in (1, -1) and type(p[1]) is int
                                                 for p in plane_spec)):
        return f"layer {name!r} has plane spec {plane_spec!r}"
    if info["kernel"] == "bitparallel":
        planes, want = weights.get(f"{name}.bitplanes"), (len(plane_spec), n, -(-info["k"] // 8))
        if not (isinstance(planes, np.ndarray) and planes.dtype == np.uint8 and planes.shape == want):
            return f"layer {name!r} needs uint8 bitplanes of shape {list(want)}"
        return None
    planes = weights.get(info.get("weight_planes")) if isinstance(info.get("weight_planes"), str) else None
    if not (isinstance(planes, np.ndarray) and planes.dtype == np.uint32 and planes.ndim == 4
            and planes.shape[1] == len(plane_spec) and planes.shape[0] * planes.shape[3] >= n
            and planes.shape[2] * 32 >= info["k"]):
        return f"layer {name!r} needs uint32 weight planes [N tiles, {len(plane_spec)}, K words, lanes]"
    return None


def load(path: str | os.PathLike, *, rpc: str | None = None, key: str | None = None) -> CompiledModel:
    """Load a compiled artifact (``csqc compile --target llvm`` output).

    ``rpc="host:port"`` runs it on a TVM RPC server instead (with ``key``, ``host:port`` is an
    RPC tracker and ``key`` the device key): see ``csqc.remote``.
    """
    if rpc is not None:
        from .remote import load as load_remote

        return load_remote(path, rpc, key=key)
    if key is not None:
        raise BadInput("a device key needs an RPC tracker address (rpc='host:port')")
    return CompiledModel(path)
