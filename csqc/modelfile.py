"""csqc model files: a finalized CSQ model as a self-describing archive that never runs code.

A model file is a zip archive (any name; ``.pt`` is conventional) holding
  ``csqc-model.json``  manifest: format, version, inputs, outputs, per-layer bit allocation
  ``program.json``     the ``torch.export`` graph in torch's JSON schema; CSQ layers appear as
                       ``csqc::quant_linear`` / ``csqc::quant_conv2d`` / ``csqc::act_quant`` ops
                       that carry the integer weights ``q``, N and the bit mask
  ``tensors.npz``      every parameter, buffer, constant and example input, read with
                       ``allow_pickle=False``

Loading never unpickles: torch's own ``torch.export.load`` does (``weights_only=False``), so
csqc keeps only torch's JSON graph and stores tensors itself.
"""
from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import idioms  # noqa: F401  (lets torch.export trace fake_quantize with a symbolic batch)
from . import layers
from .archive import read_member, read_npz, unique_members
from .errors import UNREADABLE_ARCHIVE, BadInput, CsqcError, UnsupportedOps
from .outputs import atomic_write, check_writable  # re-exported: they lived here first
from .programcheck import CheckedProgram, check_program, strip_guards

__all__ = ["MODEL_FORMAT", "CsqcModel", "save", "load", "atomic_write", "check_writable"]

log = logging.getLogger(__name__)

MODEL_FORMAT = "csqc-model"
MODEL_VERSION = 1
_MANIFEST, _PROGRAM, _TENSORS = "csqc-model.json", "program.json", "tensors.npz"
_MAX_TENSOR_BYTES = 8 << 30  # refuse zip bombs: the tensors together may not claim more than 8 GiB
_MAX_JSON_BYTES = 64 << 20  # the manifest and the program are text; a ResNet-20 program is 230 KB
_NPY_OVERHEAD = 1024  # per stored array: its zip headers (twice its name) and the .npy header
_UNREADABLE = UNREADABLE_ARCHIVE


def tensor_spec(name: str, t: torch.Tensor) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


@dataclass
class CsqcModel:
    """A loaded model file: the captured program plus its manifest.

    Calling it runs the finalized model in PyTorch (the reference every other runtime is
    checked against).
    """

    program: torch.export.ExportedProgram
    manifest: dict
    example_inputs: tuple[torch.Tensor, ...]
    source: str = ""
    _module: Any = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            self._module = self.program.module()
        return self._module

    @torch.no_grad()
    def __call__(self, *inputs):
        args = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
        try:
            return self.module(*args)
        except AssertionError as e:  # torch.export's input guards (a shape other than the saved one's)
            shapes = [list(t.shape) for t in self.example_inputs]
            raise BadInput(f"the model does not take these inputs ({e}); it was saved with inputs of shapes "
                           f"{shapes} (other batch sizes may be allowed)") from None

    @property
    def input_specs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def batched_inputs(self) -> list[bool]:
        """Per input: whether the program takes any batch size on its first axis (symbolic); an
        input of fixed shape (an LSTM's state, a table; or a batch torch.export fixed) is not."""
        names = set(self.program.graph_signature.user_inputs)
        return [isinstance(val := node.meta.get("val"), torch.Tensor) and val.dim() > 0
                and not isinstance(val.shape[0], int)
                for node in self.program.graph.nodes if node.op == "placeholder" and node.name in names]

    @property
    def layers(self) -> list[dict]:
        return self.manifest.get("layers", [])

    @property
    def avg_bits(self) -> float:
        return float(self.manifest.get("avg_bits", 0.0))


def _finalized_copy(model: nn.Module) -> nn.Module:
    training_form = [m for _, m in layers.csq_layers(model) if not m.finalized]
    if training_form:
        log.info("model has CSQ layers still in training form; saving a finalized copy")
        # each CSQ layer becomes its finalized twin in the copy; its bits are never copied
        memo = {id(m): m.finalized_copy() for m in training_form}
        memo.update(_computed_tensors(model))
        model = copy.deepcopy(model, memo)
    return model.eval()


def _computed_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """Copies of the tensors a model's modules keep that autograd computed (a cache filled by a
    forward run with gradients on: LeViT's ``attention_bias_cache``), which ``copy.deepcopy``
    refuses to copy: detached, for the deepcopy memo."""
    found: dict[int, torch.Tensor] = {}

    def visit(value, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                found[id(value)] = value.detach().clone()
        elif isinstance(value, Mapping) and depth < 2:
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)) and depth < 2:
            for v in value:
                visit(v, depth + 1)

    for m in model.modules():
        for value in vars(m).values():
            visit(value)
    return found


def _named_outputs(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as ``(name, tensor)``: a tensor, tuples and lists of them (``output{i}``),
    dicts and Hugging Face ``ModelOutput`` (their keys, ``logits``); ``None`` entries are left out."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output0", out)]
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict of its non-None fields
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(f"{prefix}.{i}" if prefix else f"output{i}", v) for i, v in enumerate(out)]
    else:
        hint = " (for a transformers model, set config.use_cache=False)" if "Cache" in type(out).__name__ else ""
        raise BadInput(f"model output {prefix or 'output'!r} is a {type(out).__name__}, not tensors{hint}")
    return [pair for name, v in items if v is not None for pair in _named_outputs(v, name)]


def _flat_output_model(model: nn.Module) -> nn.Module:
    """``model`` returning a flat tuple of tensors, for ``torch.export``: a model file's program
    holds only tuples (no ``ModelOutput`` class to import when it is read). A shallow copy
    whose ``forward`` flattens keeps the module paths (``encoder.layer.0``) of the original."""
    flat = copy.copy(model)
    forward = model.forward

    @functools.wraps(forward)  # torch.export binds the example inputs to forward's parameters
    def flat_forward(*args):
        return tuple(t for _, t in _named_outputs(forward(*args)))

    flat.forward = flat_forward
    return flat


def _layers_read(program: torch.export.ExportedProgram, rows: list[dict], avg: float) -> tuple[list[dict], float]:
    """The layer rows (``layers.layer_report``) of the CSQ layers whose tensors the program still
    reads, and their average bits: a layer whose output nothing depends on (CLIP's text
    projection when only the hidden states are returned) went with the dead code and is no layer
    of the model file."""
    signature = program.graph_signature
    owners = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    read = [owners[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.users and n.name in owners]
    kept = [row for row in rows if any(p.startswith(f"{row['name']}.") if row["name"] else True for p in read)]
    if len(kept) == len(rows):
        return rows, avg
    total = sum(row["params"] for row in kept)
    return kept, (sum(row["params"] * len(row["active_bits"]) for row in kept) / total if total else 0.0)


def export_program(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``model`` exported with a symbolic batch where it allows one (below), without the values
    its outputs do not depend on: torch.export keeps them (CLIP's text model computes a pooled
    output by ``argmax`` whether or not it is returned), and an op csqc does not compile there
    would refuse a model that never needs it."""
    # under no_grad: a forward that turns gradients off itself (@torch.no_grad() on a position
    # embedding) is exported with no grad-mode region, an op csqc does not compile
    with torch.no_grad():
        program = _exported(model, example_inputs)
    program.graph_module.graph.eliminate_dead_code()  # (keeps side effects: asserts, mutations)
    _views_as_reshapes(program.graph_module.graph)
    program.graph_module.recompile()
    return program


def _views_as_reshapes(graph: torch.fx.Graph) -> None:
    """Every ``view`` of the program as ``reshape`` (a view where the strides allow, else a
    copy: the same values). torch.export drops a ``contiguous()`` that was a no-op at the traced
    shapes, and a tensor's strides can differ at another batch: Data2VecVision's
    ``permute(...).contiguous().view(...)`` after SDPA traced at 2 rows failed at 1. The program
    is functional (mutations are its outputs), so no aliasing is lost."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default


def _exported(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    # The batch dimension stays symbolic so the PyTorch reference runs any batch size; a batch
    # of 1 would be specialised by torch.export, so capture with 2 rows. The batch is the first
    # input's first axis; an input whose first axis is another size (an LSTM's [layers, N, H]
    # state, a fixed table) keeps its shape.
    batched = _batch_first(example_inputs)
    wide = tuple(t.expand(2, *t.shape[1:]).contiguous() if b and t.shape[0] == 1 else t
                 for t, b in zip(example_inputs, batched))
    dynamic = _by_signature(model, tuple({0: torch.export.Dim.DYNAMIC} if b else {} for b in batched))
    try:
        try:
            program = torch.export.export(model, wide, dynamic_shapes=dynamic)
        except Exception as dynamic_error:
            if "Constraints violated" not in str(dynamic_error):
                raise
            # the model fixes its batch (x.reshape(2, ...)): keep it fixed
            log.warning("the model fixes its batch size: saved for batches of %d only (%s)",
                        example_inputs[0].shape[0] if example_inputs[0].dim() else 1,
                        str(dynamic_error).strip().splitlines()[0][:160])
            try:  # (clones: the failed export left its dynamic marks on the example tensors)
                return torch.export.export(model, tuple(t.clone() for t in example_inputs))
            except Exception:
                raise dynamic_error from None
        if any(w is not t for w, t in zip(wide, example_inputs)) and not _runs_at(program, example_inputs):
            # its guards exclude the example's own batch of 1 (two batches multiplied: torch rules
            # out the size 1 that would broadcast): keep the example's shapes, static
            log.warning("the model's symbolic batch excludes a batch of 1 (torch.export's guards): saved for "
                        "batches of 1 only; save it with an example of batch 2 or more for other batch sizes")
            program = torch.export.export(model, tuple(t.clone() for t in example_inputs))
        return program
    except Exception as e:  # torch raises many types; the user needs the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CsqcError(f"torch.export could not capture the model: {first}") from e


def _by_signature(model: nn.Module, dynamic: tuple) -> tuple:
    """``dynamic`` (one spec per example input) shaped as ``forward``'s parameters: the inputs a
    ``*args`` parameter takes are one tuple (a wrapper's ``forward(self, *args)``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return dynamic
    star = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    return dynamic if star is None or star >= len(dynamic) else dynamic[:star] + (dynamic[star:],)


def _batch_first(example: tuple) -> list[bool]:
    """Per example input: whether its first axis is the batch (the first axis of the first input
    that has one)."""
    batch = next((t.shape[0] for t in example if t.dim()), None)
    return [t.dim() > 0 and t.shape[0] == batch for t in example]


def _runs_at(program: torch.export.ExportedProgram, example: tuple) -> bool:
    """Whether the program's input guards accept ``example`` (its shapes, not its values)."""
    try:
        with torch.no_grad():
            program.module()(*example)
    except AssertionError:  # torch.export's guard failures
        return False
    return True


def save(model: nn.Module | CsqcModel, path: str | os.PathLike, example_inputs=None, *,
         metadata: dict | None = None, input_ranges: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Capture ``model`` with ``torch.export`` and write a csqc model file (atomically).

    ``example_inputs`` (a tensor or tuple of tensors) fixes the input shapes the compiler
    builds for. CSQ layers not yet finalized are finalized in a copy; the caller's model is
    left as it was. Outputs may be tensors, tuples, dicts or a Hugging Face ``ModelOutput``:
    they are stored flat, named after their keys (``logits``). ``input_ranges`` maps an
    integer input's name (``input0``) to ``(low, high)``: the valid values (token ids, high
    excluded) that ``verify`` draws random samples from.

    A model csqc cannot compile (an op outside ``csqc ops``, or one capture folds only on
    constants applied to a computed value) raises ``UnsupportedOps`` and writes no file.
    """
    names: list[str] | None = None
    if isinstance(model, CsqcModel):
        program, example = model.program, model.example_inputs
        layer_rows, avg = model.layers, model.avg_bits
        names = [o["name"] for o in model.manifest["outputs"]]
    else:
        if example_inputs is None:
            raise BadInput("save needs example_inputs (the input shapes to compile for)")
        example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(t, torch.Tensor) for t in example):
            raise BadInput("example_inputs must be tensors")
        if any(t.numel() == 0 for t in example):
            raise BadInput(f"example_inputs must hold at least one sample each, got shapes {[list(t.shape) for t in example]}")
        model = _finalized_copy(model)
        layer_rows, avg = layers.layer_report(model), layers.average_bits(model)
        with torch.no_grad():
            try:
                out = model(*example)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:  # the model's own error on this example
                raise BadInput(f"the model does not run on example_inputs (shapes "
                               f"{[list(t.shape) for t in example]}, dtypes {[str(t.dtype) for t in example]}): "
                               f"{type(e).__name__}: {e}") from None
        names = [name for name, _ in _named_outputs(out)]
        flat = isinstance(out, torch.Tensor) or (isinstance(out, (list, tuple))
                                                 and all(isinstance(t, torch.Tensor) for t in out))
        program = export_program(model if flat else _flat_output_model(model), example)
        layer_rows, avg = _layers_read(program, layer_rows, avg)
    from torch._export.serde import serialize as serde

    artifact = serde.serialize(program)
    program_json = _checked_for_saving(artifact.exported_program)
    input_specs = _input_specs(example, input_ranges if input_ranges is not None else _stored_ranges(model))
    _check_capture(program, example, input_specs)  # before a file nobody can compile exists
    tensors: dict[str, np.ndarray] = {}
    for prefix, table in (("state_dict", program.state_dict), ("constants", program.constants)):
        for key, value in table.items():
            if not isinstance(value, torch.Tensor):
                raise CsqcError(f"cannot save non-tensor constant {key!r} ({type(value).__name__})")
            tensors[f"{prefix}/{key}"] = value.detach().cpu().contiguous().numpy()
    for i, t in enumerate(example):
        tensors[f"example_inputs/{i}"] = t.detach().cpu().numpy()
    with torch.no_grad():  # (autograd refuses in-place writes to views of csqc's ops: Swin V2's position bias)
        flat = flat_outputs(program.module()(*example))
    if names is None or len(names) != len(flat):
        names = [f"output{i}" for i in range(len(flat))]
    outputs = [tensor_spec(name, t) for name, t in zip(names, flat)]
    manifest = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "inputs": input_specs,
        "outputs": outputs,
        "parameters": sorted(program.graph_signature.parameters),
        "avg_bits": avg,
        "layers": layer_rows,
        "metadata": metadata or {},
    }

    def write(tmp):
        buf = io.BytesIO()
        np.savez(buf, **tensors)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            z.writestr(_PROGRAM, program_json)
            z.writestr(_TENSORS, buf.getvalue())

    atomic_write(path, write)
    return Path(path)


def _stored_ranges(model) -> dict:
    if isinstance(model, CsqcModel):
        return {s["name"]: s["range"] for s in model.input_specs if "range" in s}
    return {}


def _input_specs(example: tuple, ranges: Mapping[str, Sequence[int]]) -> list[dict]:
    specs = [tensor_spec(f"input{i}", t) for i, t in enumerate(example)]
    by_name = {s["name"]: s for s in specs}
    for name, bounds in ranges.items():
        spec = by_name.get(name)
        if spec is None:
            raise BadInput(f"input_ranges names {name!r}; the model's inputs are {sorted(by_name)}")
        problem = _range_problem(spec, bounds)
        if problem:
            raise BadInput(f"input_ranges[{name!r}]: {problem}")
        spec["range"] = [int(b) for b in bounds]
    return specs


def _range_problem(spec: dict, bounds) -> str | None:
    """What is wrong with an integer input's declared ``[low, high)``, or None."""
    if spec["dtype"] not in ("uint8", "int8", "int16", "int32", "int64"):
        return f"only integer inputs take a range, {spec['name']} is {spec['dtype']}"
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
        return f"must be two integers (low, high), got {bounds!r}"
    if not -2**62 < bounds[0] < bounds[1] < 2**62:
        return f"needs low < high, got {list(bounds)}"
    return None


def capture_problems(model: nn.Module, example_inputs) -> list[str]:
    """What would stop ``save`` (and so every compile) for ``model`` at ``example_inputs``, without
    writing anything: each operator csqc cannot compile with the module it came from, or why
    torch.export could not capture the model. Empty: the model saves."""
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in example):
        return ["the op check needs example inputs that are tensors"]
    try:
        program = export_program(_flat_output_model(_finalized_copy(model)), example)
        from torch._export.serde import serialize as serde

        checked = check_program(strip_guards(serde.serialize(program).exported_program), "the model", saving=True)
    except CsqcError as e:
        return [str(e)]
    problems = [f"unsupported operator {op} (at {where})" for op, where in checked.unsupported]
    return problems or _capture_problems(program, example)


def _check_capture(program: torch.export.ExportedProgram, example: tuple, specs: list[dict] | None = None) -> None:
    """Raise what capture itself refuses: ops the program check's allow-list admits because
    capture folds them on constants (masks, positions, rotary tables), here reading the model's
    input; shapes and arguments it cannot translate. ``specs``: the inputs' (declared ranges)."""
    from .capture import capture

    specs = specs or [tensor_spec(f"input{i}", t) for i, t in enumerate(example)]
    capture(CsqcModel(program, {"inputs": specs, "outputs": []}, example))


def _capture_problems(program: torch.export.ExportedProgram, example: tuple) -> list[str]:
    """:func:`_check_capture`'s refusals as messages (none: the program captures)."""
    try:
        _check_capture(program, example)
    except UnsupportedOps as e:
        return [f"unsupported operator {op} (at {where})" for op, where in e.unsupported]
    except CsqcError as e:
        return [str(e)]
    return []


def flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    raise CsqcError(f"model outputs must be tensors, got {type(out).__name__}")


def _checked_for_saving(program_json: bytes) -> bytes:
    """torch's program JSON as csqc stores it: without guard code, and passing ``load``'s checks."""
    checked = check_program(strip_guards(program_json), "the model", saving=True)
    if checked.unsupported:  # the same list capture would give, before a file nobody can compile exists
        raise UnsupportedOps(checked.unsupported)
    return checked.json


def _read_member(z: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], name: str, path, limit: int) -> bytes:
    if name not in members:
        raise BadInput(f"{path}: csqc model file is missing {name}; the file is damaged")
    return read_member(z, members[name], str(path), limit)


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's fields that later steps read, or None."""
    for key in ("inputs", "outputs"):
        specs = manifest.get(key)
        if not isinstance(specs, list) or not specs:
            return f"{key!r} must be a non-empty list of tensor specs"
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                return f"every entry of {key!r} needs a name"
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                return f"{spec['name']} has shape {shape!r}, not a list of sizes"
            if not isinstance(getattr(torch, str(spec.get("dtype")), None), torch.dtype):
                return f"{spec['name']} has unknown dtype {spec.get('dtype')!r}"
            if "range" in spec and (key != "inputs" or _range_problem(spec, spec["range"])):
                return f"{spec['name']} has an invalid range {spec['range']!r}"
    parameters = manifest.get("parameters", [])
    if not isinstance(parameters, list) or not all(isinstance(p, str) for p in parameters):
        return "'parameters' must be a list of names"
    layer_rows = manifest.get("layers", [])
    if not isinstance(layer_rows, list) or not all(isinstance(r, dict) for r in layer_rows):
        return "'layers' must be a list of layer records"
    if not isinstance(manifest.get("metadata", {}), dict):
        return "'metadata' must be an object"
    avg = manifest.get("avg_bits", 0.0)
    if isinstance(avg, bool) or not isinstance(avg, (int, float)):
        return f"'avg_bits' must be a number, is {avg!r}"
    return None


def _program_problem(program: torch.export.ExportedProgram, manifest: dict, example: tuple) -> str | None:
    """What disagrees between the program, its stored tensors and the manifest, or None."""
    sig = program.graph_signature
    stored = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tables = {**program.state_dict, **program.constants}
    user_inputs = []
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        expected = node.meta.get("val")
        if node.name not in stored:
            user_inputs.append(expected)
            continue
        actual = tables.get(stored[node.name])
        if not isinstance(actual, torch.Tensor):
            return f"tensor {stored[node.name]!r} is missing"
        if isinstance(expected, torch.Tensor) and (expected.dtype != actual.dtype or expected.shape != actual.shape):
            return (f"tensor {stored[node.name]!r} is {actual.dtype}{list(actual.shape)}, the program expects "
                    f"{expected.dtype}{list(expected.shape)}")
    specs = manifest["inputs"]
    if len(user_inputs) != len(specs) or len(example) != len(specs):
        return f"the manifest lists {len(specs)} input(s), the program takes {len(user_inputs)}, {len(example)} stored"
    for spec, val, t in zip(specs, user_inputs, example):
        if list(t.shape) != spec["shape"] or str(t.dtype).replace("torch.", "") != spec["dtype"]:
            return (f"{spec['name']} is {spec['dtype']}{spec['shape']} in the manifest, but the stored example "
                    f"is {t.dtype}{list(t.shape)}")
        if isinstance(val, torch.Tensor):
            # the batch size (first dimension) was widened when the program was captured
            dims = [d if isinstance(d, int) else None for d in val.shape]
            if (len(dims) != len(t.shape) or val.dtype != t.dtype
                    or any(d is not None and d != s for d, s in zip(dims[1:], t.shape[1:]))):
                return f"{spec['name']} is {spec['dtype']}{spec['shape']}, the program takes {val.dtype}{dims}"
    return None


def _expected_tensors(checked: CheckedProgram, manifest: dict, path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every array ``tensors.npz`` must hold, by key: the program's stored tensors and the examples."""
    expected = dict(checked.tensors)
    for i, spec in enumerate(manifest["inputs"]):
        dtype = np.dtype(spec["dtype"]) if spec["dtype"] in _EXAMPLE_DTYPES else None
        if dtype is None:
            raise BadInput(f"{path}: input {spec['name']} has dtype {spec['dtype']}, which csqc model files "
                           "cannot store; save the model again with csqc.save")
        expected[f"example_inputs/{i}"] = (tuple(spec["shape"]), dtype)
    return expected


_EXAMPLE_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")


def _check_tensor_values(arrays: dict[str, np.ndarray], checked: CheckedProgram, path) -> None:
    """Refuse NaN/Inf anywhere and integer weights outside their layer's N-bit range."""
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadInput(f"{path}: tensor {key!r} holds NaN or infinite values; a model file must hold finite "
                           "weights, batch-norm statistics and scales (retrain or fix the model, then save it again)")
    for layer in checked.quant_layers:
        q = arrays[layer.q_tensor]
        if q.dtype.kind not in "iu":
            raise BadInput(f"{path}: layer {layer.node}: weights {layer.q_tensor!r} are {q.dtype}, not integer codes; "
                           "the file is damaged")
        limit = 2**layer.n_bits - 1
        largest = max(int(q.max()), -int(q.min())) if q.size else 0  # no int64 copy of the weights
        if largest > limit:
            raise BadInput(f"{path}: layer {layer.node}: weight code {largest} in {layer.q_tensor!r} does not fit "
                           f"N={layer.n_bits} bits (|q| <= {limit}); the file is damaged")


def load(path: str | os.PathLike, *, model_factory: str | None = None,
         input_shape: Sequence[int] | None = None) -> CsqcModel:
    """Load a csqc model file, or import a reference CSQ checkpoint.

    A reference checkpoint (``torch.save({'model': state_dict, ...})``) needs
    ``model_factory="module:callable"`` (the explicit opt-in to running user code that builds
    the architecture) and ``input_shape``; it is then loaded with ``weights_only=True``.
    Anything else is refused without executing any of its content.
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path} is a directory, not a model file")
    if model_factory is not None:
        from .reference import import_checkpoint

        return import_checkpoint(path, model_factory, input_shape)
    try:
        z = zipfile.ZipFile(path)
    except _UNREADABLE:
        raise BadInput(f"{path}: not a csqc model file (expected a zip archive written by csqc.save)") from None
    with z:
        members = unique_members(z, str(path))
        names = set(members)
        if _MANIFEST not in names:
            hint = (" It looks like a torch.save pickle: csqc does not unpickle files. For a reference "
                    "CSQ checkpoint pass --model-factory module:callable and --input-shape.")
            raise BadInput(f"{path}: not a csqc model file (no {_MANIFEST}).{hint if any(n.endswith('data.pkl') for n in names) else ''}")
        try:
            manifest = json.loads(_read_member(z, members, _MANIFEST, path, _MAX_JSON_BYTES))
        except (ValueError, RecursionError):  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
            raise BadInput(f"{path}: manifest is not valid JSON; the file is damaged") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
            raise BadInput(f"{path}: not a csqc model file (wrong format tag)")
        if manifest.get("version") != MODEL_VERSION:
            raise BadInput(f"{path}: model file version {manifest.get('version')} is not supported "
                           f"(this csqc reads version {MODEL_VERSION}); re-save it with this csqc")
        problem = _manifest_problem(manifest)
        if problem:
            raise BadInput(f"{path}: the manifest is damaged: {problem}; save the model again with csqc.save")
        checked = check_program(_read_member(z, members, _PROGRAM, path, _MAX_JSON_BYTES), str(path))
        if checked.unsupported:  # an op csqc cannot compile never reaches torch either
            raise UnsupportedOps(checked.unsupported)
        expected = _expected_tensors(checked, manifest, path)
        budget = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
        if budget > _MAX_TENSOR_BYTES:
            raise BadInput(f"{path}: the model declares {budget} bytes of tensors, more than csqc loads "
                           f"({_MAX_TENSOR_BYTES}); refusing")
        tensor_bytes = _read_member(z, members, _TENSORS, path, budget + _NPY_OVERHEAD * (len(expected) + 1))
    arrays = read_npz(tensor_bytes, f"{path}: {_TENSORS}", limit_bytes=budget, expected=expected, stored_only=True)
    _check_tensor_values(arrays, checked, path)
    state, consts, example = {}, {}, {}
    for key, arr in arrays.items():
        kind, _, name = key.partition("/")
        t = torch.from_numpy(np.ascontiguousarray(arr).reshape(arr.shape))  # ascontiguousarray makes 0-d 1-d
        if kind == "state_dict":
            state[name] = t
        elif kind == "constants":
            consts[name] = t
        else:
            example[int(name)] = t
    for name in manifest.get("parameters", []):
        if name in state:
            state[name] = nn.Parameter(state[name], requires_grad=False)
    example_inputs = tuple(example[i] for i in sorted(example))
    from torch._export.serde import serialize as serde

    from . import ops  # noqa: F401  (registers csqc:: ops the program refers to)

    try:
        program = serde.deserialize(serde.SerializedArtifact(checked.json, state, consts, (example_inputs, {})))
    except Exception as e:
        raise BadInput(f"{path}: the captured program could not be read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); the file is damaged or from "
                       "an incompatible torch version") from None
    problem = _program_problem(program, manifest, example_inputs)
    if problem:
        raise BadInput(f"{path}: {problem}; the file is damaged, save the model again with csqc.save")
    return CsqcModel(program, manifest, example_inputs, source=str(path))
