"""Capture: a csqc model (``torch.export`` program) -> csqc IR, through a table of op handlers.

The program is re-exported at a concrete batch size so every shape is static. Each aten (or
``csqc::``) op maps to one handler in ``HANDLERS``; an op without a handler is collected with
the module it came from, and capture fails once with the complete list (``UnsupportedOps``).
IR nodes are named after the module that produced them (``layer1.0.conv1``), so inspect
tables, verify reports and ONNX tensor names read like the user's model.

The package: ``handlers.py`` is the op table; the handlers live by kind in ``layers.py``
(quantized and float layers, matmul, einsum), ``transposed.py`` (transposed convs),
``tensors.py`` (views, slices, pads, gathers), ``resampling.py`` (pooling, upsampling),
``elementwise.py`` (arithmetic, activations), ``reductions.py`` (softmax, norms),
``attention.py`` and ``folding.py`` (constants evaluated at capture); ``context.py`` holds the
state they share.
"""

from __future__ import annotations

import operator

import torch

from ..errors import BadInput, CsqcError, UnsupportedOps
from ..idioms import rewrite_idioms
from ..ir import Graph, Node, Value, nonfinite_params, verify
from ..modelfile import CsqcModel
from .context import _aten, _Ctx, _is_condition, module_path, _type_of, _Unsupported
from .folding import _constant_derived, _fold, _foldable
from .handlers import HANDLERS
from .integers import check_integer_result, is_integer_typed

__all__ = ["capture", "HANDLERS"]


def _op_name(target) -> str:
    return getattr(target, "__name__", None) if target is operator.getitem else str(target)


def capture(model: CsqcModel, batch: int | None = None) -> Graph:
    """Translate ``model`` into a verified IR graph with static shapes (batch from the file)."""
    specs = model.input_specs
    shapes = [list(s["shape"]) for s in specs]
    if batch is not None:
        if batch < 1:
            raise BadInput(f"batch must be at least 1, got {batch}")
        batched = model.batched_inputs
        leading = [s[0] for s in shapes if s]
        if not any(batched) and (not leading or batch != leading[0]):
            fixed = f"a batch of {leading[0]} only" if leading else "no batch axis"
            raise BadInput(f"the model's program takes {fixed} (fixed when it was saved), not a batch of {batch}: "
                           "use that batch, or save the model with an example of the batch you want")
        for s, b in zip(shapes, batched):
            if b:  # an input of fixed shape (its first axis is not the batch) keeps it
                s[0] = batch
    try:
        examples = tuple(torch.zeros(s, dtype=getattr(torch, spec["dtype"])) for s, spec in zip(shapes, specs))
    except (RuntimeError, TypeError, ValueError) as e:  # sizes torch cannot allocate, or not even represent
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"cannot make example inputs of shapes {shapes} ({reason}); use a smaller batch") from None
    try:
        program = torch.export.export(model.module, examples)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if model.source:  # a model file's program that does not run at these shapes: the input is at fault
            raise BadInput(f"{model.source}: its program does not run at input shapes {shapes} ({first}); "
                           "if these are the shapes it was saved with, the file is damaged or was edited") from e
        raise CsqcError(f"could not re-capture the model at input shapes {shapes}: {first}") from e
    ctx = _Ctx(program)
    sig = program.graph_signature
    const_map = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tables = {**program.state_dict, **program.constants}
    _check_finite(tables)
    inputs: list[Value] = []
    for fx in program.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in const_map:
                ctx.consts[fx.name] = tables[const_map[fx.name]]
            else:
                if _is_condition(fx):
                    raise BadInput(f"input {len(inputs)} is boolean: csqc takes float and integer inputs (pass a "
                                   "mask as float 0.0 / 1.0)")
                name = ctx.name(f"input{len(inputs)}")
                inputs.append(Value(name, _type_of(fx)))
                ctx.env[fx.name] = name
                if _type_of(fx).dtype != "float32":
                    ctx.integer_inputs.add(name)
                    ctx.id_shapes[name] = _type_of(fx).shape
                    declared = specs[len(inputs) - 1].get("range") if len(inputs) <= len(specs) else None
                    if declared is not None:
                        ctx.declared_ranges[name] = (int(declared[0]), int(declared[1]))
    rewrite_idioms(program.graph, ctx.consts)  # other code bases' quantizers -> csqc::act_quant
    ctx.constant_derived = _constant_derived(program.graph, ctx.consts)
    unsupported: list[tuple[str, str]] = []
    outputs: list[str] = []
    for fx in program.graph.nodes:
        if fx.op == "call_function":
            handler = HANDLERS.get(fx.target)
            where = module_path(fx) or fx.name
            if handler is None:
                unsupported.append((_op_name(fx.target), where))
                continue
            if any(isinstance(a, torch.fx.Node) and a.op == "call_function" and a.name not in ctx.env
                   and a.name not in ctx.consts for a in fx.all_input_nodes):
                continue  # depends on an unsupported op: reported there
            val = fx.meta.get("val")
            if fx.target == _aten.slice.Tensor and isinstance(val, torch.Tensor) and val.numel() == 0:
                # an empty slice (Phi-3's rotary split at the full width): a constant of no elements,
                # which cat leaves out; any other op that reads it folds or is refused
                ctx.consts[fx.name] = torch.empty(tuple(val.shape), dtype=val.dtype)
                continue
            try:
                if _foldable(ctx, fx):  # every input is a constant: evaluate it now
                    _fold(ctx, fx)
                    continue
                ctx.env[fx.name] = handler(ctx, fx)
                if is_integer_typed(fx) and fx.users:  # (the unread indices of max.dim and max pools pass)
                    check_integer_result(ctx, fx, ctx.env[fx.name])
            except _Unsupported as e:
                ctx.env.pop(fx.name, None)
                unsupported.append((f"{_op_name(fx.target)} [{e}]", where))
        elif fx.op == "output":
            flat = fx.args[0] if isinstance(fx.args[0], (list, tuple)) else [fx.args[0]]
            for i, a in enumerate(flat):
                if _is_condition(a):
                    raise BadInput(f"output {i} is boolean: csqc's runtimes return float32 (return it as "
                                   "mask.float())")
                if isinstance(a, torch.fx.Node) and is_integer_typed(a):
                    raise BadInput(f"output {i} is {a.meta['val'].dtype}: csqc's runtimes return float32 "
                                   "(return it as .float())")
            outputs = [ctx.env.get(a.name, "") for a in flat]
    if unsupported:
        raise UnsupportedOps(unsupported)
    name = str(model.manifest.get("metadata", {}).get("recipe") or "model")
    nodes, outputs = _named_outputs(ctx, outputs, [str(o.get("name", "")) for o in model.manifest["outputs"]])
    g = Graph(tuple(inputs), nodes, outputs, ctx.params, name=name)
    derived = nonfinite_params(g)
    if derived:  # finite weights whose folding overflowed float32
        raise BadInput(f"parameter {derived[0]!r} of the captured model is NaN or infinite (float32 overflow "
                       "folding the model's weights); the weights are out of range")
    verify(g)
    return g


def _named_outputs(ctx: _Ctx, outputs: list[str], names: list[str]) -> tuple[tuple[Node, ...], tuple[str, ...]]:
    """Output nodes renamed after the model's named outputs (``logits``, ``last_hidden_state``),
    so the IR, the artifacts and the reports use them; positional names (``output0``) change nothing."""
    produced = {n.name for n in ctx.nodes}
    renames: dict[str, str] = {}
    for value, name in zip(outputs, names):
        positional = name.startswith("output") and name[6:].isdigit()
        if positional or not name or value not in produced or value in renames or name in ctx.taken:
            continue
        ctx.taken.add(name)
        renames[value] = name
    if not renames:
        return tuple(ctx.nodes), tuple(outputs)
    nodes = tuple(n.replace(name=renames.get(n.name, n.name), inputs=tuple(renames.get(i, i) for i in n.inputs))
                  for n in ctx.nodes)
    return nodes, tuple(renames.get(o, o) for o in outputs)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Every float weight, buffer and constant of the program must be finite (NaN != NaN would
    make every runtime comparison fail, and compilers fold NaN in their own ways)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInput(f"model tensor {name!r} contains NaN or infinity; the model file's weights are damaged")
