"""Run compiled csqc artifacts with numpy and the TVM runtime only (no torch, no compiler).

    import csqc.runtime
    model = csqc.runtime.load("model.so")
    y = model(x)                     # numpy in, numpy out
    y = model(x, skip_planes=1)      # PrecisionBatching: drop each layer's least significant plane

The artifact (see ``csqc.targets.llvm.target``) is the shared library with ``plan.json`` and
``weights.npz`` appended; ``load`` opens both from the same file.
"""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import BadInput, CsqcError

__all__ = ["CompiledModel", "load"]

_FORMAT, _VERSION = "csqc-artifact", 1


def _device(kind: str):
    import tvm

    return tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)


class CompiledModel:
    """A loaded artifact: call it on numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: no such artifact file")
        try:
            with zipfile.ZipFile(path) as z:
                self.plan = json.loads(z.read("plan.json"))
                with np.load(io.BytesIO(z.read("weights.npz")), allow_pickle=False) as npz:
                    weights = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError, ValueError) as e:
            raise BadInput(f"{path}: not a csqc artifact ({type(e).__name__}); compile one with `csqc compile`") from None
        if self.plan.get("format") != _FORMAT or self.plan.get("version") != _VERSION:
            raise BadInput(f"{path}: not a csqc artifact of version {_VERSION}")
        import tvm

        self.path = path
        self.target = self.plan["target"]["kind"]
        self.dev = _device(self.target)
        if self.target == "cuda" and not self.dev.exist:
            raise CsqcError(f"{path} is a CUDA artifact and this machine has no CUDA device")
        try:
            self.lib = tvm.runtime.load_module(str(path))
        except Exception as e:
            raise BadInput(f"{path}: the library part cannot be loaded ({str(e).splitlines()[0][:200]})") from None
        self._weights = weights
        self.buffers = self._allocate(weights)
        self._funcs = {}
        self._calls_cache: dict = {}
        self._repacked: dict[str, int] = {}
        self.inputs = self.plan["inputs"]
        self.outputs = self.plan["outputs"]
        self.layers: dict[str, dict] = self.plan["layers"]
        self._has_bitparallel = any(info["kernel"] == "bitparallel" for info in self.layers.values())
        self._repack_bitparallel(())  # build the int8 weights of bit-parallel layers from their planes
        # host buffers are also seen as numpy arrays: copying in and out through these views
        # costs well under a microsecond, against ~10 us for Tensor.copyfrom / Tensor.numpy
        self._host = self.target != "cuda"
        if self._host:
            self._in_views = [np.from_dlpack(self.buffers[s["name"]]) for s in self.inputs]
            self._out_views = [np.from_dlpack(self.buffers[o["name"]]) for o in self.outputs]

    def _allocate(self, weights: Mapping[str, np.ndarray]) -> dict:
        import tvm

        bufs: dict = {}
        specs = self.plan["buffers"]
        for name, spec in specs.items():
            if "alias" in spec:
                continue
            if spec["kind"] == "weight":
                if name not in weights:
                    raise BadInput(f"{self.path}: the artifact lacks weight {name!r} (truncated or edited file)")
                bufs[name] = tvm.runtime.tensor(weights[name], self.dev)
            else:
                bufs[name] = tvm.runtime.tensor(np.zeros(spec["shape"], dtype=spec["dtype"]), self.dev)
        for name, spec in specs.items():
            if "alias" in spec:
                bufs[name] = bufs[spec["alias"]]._create_view(tuple(spec["shape"]), spec["dtype"])
        return bufs

    def _func(self, name: str):
        if name not in self._funcs:
            self._funcs[name] = self.lib[name]
        return self._funcs[name]

    def _skips(self, skip_planes) -> tuple:
        if isinstance(skip_planes, Mapping):
            unknown = set(skip_planes) - set(self.layers)
            if unknown:
                raise BadInput(f"skip_planes names unknown layers: {sorted(unknown)[:3]}")
            return tuple(sorted((k, int(v)) for k, v in skip_planes.items()))
        skip = int(skip_planes)
        if skip < 0:
            raise BadInput(f"skip_planes must be >= 0, got {skip}")
        return tuple((k, skip) for k in sorted(self.layers)) if skip else ()

    def _calls(self, skips: tuple):
        """Resolved call list for a plane-skip setting (cached: the hot path is a plain loop)."""
        if skips in self._calls_cache:
            return self._calls_cache[skips]
        by_layer = dict(skips)
        calls = []
        for step in self.plan["steps"]:
            args = []
            for a in step["args"]:
                if isinstance(a, str):
                    args.append(self.buffers[a])
                elif "int" in a:
                    args.append(a["int"])
                else:  # {"planes": layer}: how many most significant planes to accumulate
                    args.append(self._kept_planes(a["planes"], by_layer.get(a["planes"], 0)))
            calls.append((self._func(step["func"]), args))
        self._calls_cache[skips] = calls
        return calls

    def _kept_planes(self, layer: str, skip: int) -> int:
        """Planes (most significant first) left when ``skip`` bit positions are dropped.

        A position is one power of two: with +/- planes both of its planes go together, so
        the dropped weight bits round toward zero symmetrically. The most significant
        position always stays: a layer is never switched off, only made coarser.
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

    def _repack_bitparallel(self, skips: tuple) -> None:
        """Bit-parallel layers hold combined int8 weights: recombine them for a plane setting."""
        from .targets.llvm import packing  # numpy only

        wanted = dict(skips)
        for name, info in self.layers.items():
            if info["kernel"] != "bitparallel":
                continue
            skip = wanted.get(name, 0)
            if self._repacked.get(name) == skip:
                continue
            spec = [tuple(p) for p in info["plane_spec"]]
            bits = np.unpackbits(self._weights[f"{name}.bitplanes"], axis=-1)[..., : info["k"]]
            q = packing.combine_planes(bits, spec, info["zero_point"], self._kept_planes(name, skip))
            shape = info["weight_shape"]
            if info["pack"] == "dense":
                packed = packing.pack_bitparallel_weight(q.reshape(shape[0], -1), "int8")
            elif info["pack"] == "depthwise":
                packed = q.reshape(shape[0], -1).astype(np.int32)
            else:
                packed = packing.pack_bitparallel_conv_weight(q.reshape(shape), info["groups"])
            self.buffers[info["int8_buffer"]].copyfrom(np.ascontiguousarray(packed))
            self._repacked[name] = skip

    def _check_input(self, spec: dict, x) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != tuple(spec["shape"]):
            raise BadInput(f"input {spec['name']}: expected shape {spec['shape']}, got {list(x.shape)}")
        if x.dtype != np.dtype(spec["dtype"]):
            if x.dtype.kind not in "fiu":
                raise BadInput(f"input {spec['name']}: expected {spec['dtype']} data, got {x.dtype}")
            x = x.astype(spec["dtype"])
        # a sum is finite for almost every input, and cheaper than isfinite over the array
        if x.dtype.kind == "f" and not math.isfinite(float(np.add.reduce(x, axis=None))) and not np.isfinite(x).all():
            raise BadInput(f"input {spec['name']} contains NaN or infinity")
        return x

    def __call__(self, *inputs, skip_planes: int | Mapping[str, int] = 0, record: dict | None = None):
        """Run the model; returns one array, or a list when the model has several outputs.

        ``skip_planes`` drops that many least significant weight planes per layer (or per
        named layer, with a dict): less work, less accuracy, no recompilation. With
        ``record`` (a dict), every intermediate buffer is copied into it by name.
        """
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        if len(inputs) != len(self.inputs):
            raise BadInput(f"model takes {len(self.inputs)} input(s), got {len(inputs)}")
        for i, (spec, x) in enumerate(zip(self.inputs, inputs)):
            x = self._check_input(spec, x)
            if self._host:
                self._in_views[i][...] = x
            else:
                self.buffers[spec["name"]].copyfrom(np.ascontiguousarray(x))
        skips = self._skips(skip_planes)
        if self._has_bitparallel:
            self._repack_bitparallel(skips)
        for func, args in self._calls(skips):
            func(*args)
        if record is not None:
            for name, spec in self.plan["buffers"].items():
                if spec["kind"] not in ("weight", "derived"):
                    record[name] = self.buffers[name].numpy()
        if self._host:
            outs = [v.copy() for v in self._out_views]
        else:
            outs = [self.buffers[o["name"]].numpy() for o in self.outputs]
        return outs[0] if len(outs) == 1 else outs

    def time_us(self, *inputs, repeat: int = 50, skip_planes=0) -> float:
        """Median wall time of one call in microseconds (inputs copied in each time)."""
        import time

        self(*inputs, skip_planes=skip_planes)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            self(*inputs, skip_planes=skip_planes)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a compiled artifact (``csqc compile --target llvm`` output)."""
    return CompiledModel(path)
