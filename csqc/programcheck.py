"""The program inside a model file is data: an allow-list check before torch reads it.

A model file carries ``torch.export``'s serialized program (``program.json``). torch's
deserializer is not a data reader: it ``exec``s ``guards_code`` when the module is built,
``sympy.sympify``s every ``expr_str`` (which evaluates Python), resolves op targets and
``source_fn_stack`` entries by ``getattr`` on ``torch``/``math``/``operator``, imports the modules
named in a treespec's ``defaultdict`` or ``__enum__`` context, unpickles state given as bytes and
builds torchbind objects, HOP subgraphs and verifiers by name.

``check_program`` walks the JSON against what csqc itself writes and refuses everything else:
  - every object may only have the keys csqc's captures use; unknown keys are refused
  - ``guards_code`` must be empty (``save`` strips the guards torch adds for multi-input models)
  - symbolic sizes are parsed by a small grammar of their own (``Symbol('s7', positive=True,
    integer=True)``, ``Integer(n)``, ``Add``/``Mul``/``Max``/``Min`` of those) and written back
    from the parse, so torch only ever sympifies text csqc produced
  - op targets must be ops csqc can compile (``capture.HANDLERS``) or torch's symbolic-size
    helpers; node metadata is limited to module paths, ``torch_fn`` and stack traces
  - treespecs may only be tuples, lists, dicts and leaves
  - no custom objects, subgraphs, operators as arguments, or non-ASCII names
It returns the canonical JSON (what torch then reads), the tensors the program expects to be
stored, and its quantized layers (so ``load`` can check weights before anything runs).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import BadInput

__all__ = ["ProgramRefused", "CheckedProgram", "QuantLayer", "check_program", "parse_size_expr", "allowed_targets",
           "strip_guards"]


class ProgramRefused(BadInput):
    """The program JSON holds something csqc does not write (and torch might evaluate)."""


@dataclass(frozen=True)
class QuantLayer:
    """A ``csqc::quant_linear`` / ``csqc::quant_conv2d`` node: where its integer weights are stored."""

    node: str
    q_tensor: str  # key in the model file's tensors, e.g. "state_dict/fc1.q"
    n_bits: int
    active_mask: int


@dataclass
class CheckedProgram:
    json: bytes  # canonical program JSON: the only bytes handed to torch
    tensors: dict[str, tuple[tuple[int, ...], np.dtype]] = field(default_factory=dict)
    quant_layers: list[QuantLayer] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)


# -- names and symbolic sizes -------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_.\[\]'\-]{0,300}")
_STACK_KEY = re.compile(r"[A-Za-z0-9_.@\-]{1,300}")  # e.g. "L__self__rnn.ih.0@1" for a module called twice
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_TYPE_NAME = re.compile(r"[A-Za-z_<][A-Za-z0-9_<>]*(\.[A-Za-z_<][A-Za-z0-9_<>]*)*")  # kept as text, never imported
_SYMBOL = re.compile(r"s[0-9]{1,9}")
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z]+)|(?P<int>-?[0-9]{1,18})|'(?P<symbol>[^']{0,20})'|(?P<punct>[(),=]))")
_EXPR_FUNCTIONS = ("Add", "Mul", "Max", "Min")
# torch's integer division of sizes (a batch split in halves: torch.chunk(x, 2, 0)); two terms each
_BINARY_FUNCTIONS = ("FloorDiv",)
_MAX_EXPR_DEPTH = 16


class _Refuse(Exception):
    pass


def _name(value, where: str) -> str:
    if not isinstance(value, str):
        raise _Refuse(f"{where} must be a name, is {type(value).__name__}")
    if not value.isascii():
        raise _Refuse(f"{where} {value!r} is not ASCII; csqc model files name tensors and modules in ASCII")
    if not _NAME.fullmatch(value):
        raise _Refuse(f"{where} {value[:60]!r} is not a name csqc writes")
    return value


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _Refuse(f"symbolic size {text[:80]!r} is not one csqc writes")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_size_expr(text: str) -> str:
    """Parse a symbolic size with csqc's grammar and return it re-written canonically.

    Accepted: ``Symbol('s<N>', positive=True, integer=True)``, ``Integer(<n>)``, ``Add`` /
    ``Mul`` / ``Max`` / ``Min`` of two or more accepted expressions and ``FloorDiv`` of two.
    Raises ``ProgramRefused``.
    """
    try:
        return _parse_size_expr(text)
    except _Refuse as e:
        raise ProgramRefused(str(e)) from None


def _parse_size_expr(text: str) -> str:
    if not isinstance(text, str) or len(text) > 2000:
        raise _Refuse("a symbolic size is not a short string")
    tokens = _tokens(text)
    pos = 0

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos][0] != kind or (value is not None and tokens[pos][1] != value):
            raise _Refuse(f"symbolic size {text[:80]!r} is not one csqc writes")
        pos += 1
        return tokens[pos - 1][1]

    def expr(depth: int) -> str:
        if depth > _MAX_EXPR_DEPTH:
            raise _Refuse(f"symbolic size {text[:80]!r} is nested too deeply")
        head = take("name")
        take("punct", "(")
        if head == "Symbol":
            symbol = take("symbol")
            if not _SYMBOL.fullmatch(symbol):
                raise _Refuse(f"symbol {symbol!r} is not a size symbol csqc writes")
            flags = set()
            while pos < len(tokens) and tokens[pos] == ("punct", ","):
                take("punct", ",")
                flag = take("name")
                take("punct", "=")
                take("name", "True")
                flags.add(flag)
            if flags != {"positive", "integer"}:
                raise _Refuse(f"symbol {symbol!r} has assumptions {sorted(flags)}, csqc writes positive integers")
            take("punct", ")")
            return f"Symbol('{symbol}', positive=True, integer=True)"
        if head == "Integer":
            value = int(take("int"))
            take("punct", ")")
            return f"Integer({value})"
        if head in _EXPR_FUNCTIONS or head in _BINARY_FUNCTIONS:
            args = [expr(depth + 1)]
            while pos < len(tokens) and tokens[pos] == ("punct", ","):
                take("punct", ",")
                args.append(expr(depth + 1))
            take("punct", ")")
            if len(args) < 2 or (head in _BINARY_FUNCTIONS and len(args) != 2):
                raise _Refuse(f"{head} of {len(args)} term(s) in {text[:80]!r}")
            return f"{head}({', '.join(args)})"
        raise _Refuse(f"symbolic size uses {head!r}, which csqc does not write")

    result = expr(0)
    if pos != len(tokens):
        raise _Refuse(f"symbolic size {text[:80]!r} has trailing text")
    return result


# -- the schema walk ----------------------------------------------------------------------------

def _fields(obj, where: str, allowed: dict[str, Callable[[Any, str], Any]], required: tuple[str, ...] = ()) -> dict:
    """Check ``obj`` is an object with only ``allowed`` keys; returns it with each value checked."""
    if not isinstance(obj, dict):
        raise _Refuse(f"{where} must be an object, is {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _Refuse(f"{where} has field {unknown[0][:60]!r}, which csqc does not write")
    missing = [k for k in required if k not in obj]
    if missing:
        raise _Refuse(f"{where} lacks field {missing[0]!r}")
    return {key: allowed[key](value, f"{where}.{key}") for key, value in obj.items()}


def _union(obj, where: str, allowed: dict[str, Callable[[Any, str], Any]]) -> dict:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise _Refuse(f"{where} must be an object with exactly one field")
    return _fields(obj, where, allowed)


def _list(check: Callable[[Any, str], Any], limit: int = 1_000_000):
    def run(value, where: str):
        if not isinstance(value, list) or len(value) > limit:
            raise _Refuse(f"{where} must be a list")
        return [check(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return run


def _map(check: Callable[[Any, str], Any]):
    def run(value, where: str):
        if not isinstance(value, dict):
            raise _Refuse(f"{where} must be an object")
        return {_name(k, f"{where} key"): check(v, f"{where}[{k}]") for k, v in value.items()}
    return run


def _empty(value, where: str):
    if value not in ({}, [], None):
        raise _Refuse(f"{where} must be empty: csqc models have none")
    return value


def _int(value, where: str) -> int:
    if type(value) is not int or abs(value) > 2**63:
        raise _Refuse(f"{where} must be an integer")
    return value


def _optional_int(value, where: str):
    return None if value is None else _int(value, where)


def _bool(value, where: str) -> bool:
    if type(value) is not bool:
        raise _Refuse(f"{where} must be true or false")
    return value


def _optional_bool(value, where: str):
    return None if value is None else _bool(value, where)


_SPECIAL_FLOATS = ("Infinity", "-Infinity", "NaN")  # how torch's JSON writes non-finite floats


def _float(value, where: str):
    if value in _SPECIAL_FLOATS or (type(value) in (int, float)):
        return value
    raise _Refuse(f"{where} must be a number")


def _string(value, where: str) -> str:
    if not isinstance(value, str) or len(value) > 100_000:
        raise _Refuse(f"{where} must be a string")
    return value


def _enum(values: set[int]):
    def run(value, where: str) -> int:
        if type(value) is not int or value not in values:
            raise _Refuse(f"{where} is {value!r}, not a value csqc writes")
        return value
    return run


def _constant(*values):
    def run(value, where: str):
        if value not in values or type(value) not in {type(v) for v in values}:
            raise _Refuse(f"{where} is {str(value)[:60]!r}; csqc writes {' or '.join(map(repr, values))}")
        return value
    return run


def _enum_values(name: str) -> set[int]:
    from torch._export.serde import schema

    return {int(m.value) for m in getattr(schema, name)}


_STORABLE_DTYPES = {"BYTE": np.uint8, "CHAR": np.int8, "SHORT": np.int16, "INT": np.int32, "LONG": np.int64,
                    "HALF": np.float16, "FLOAT": np.float32, "DOUBLE": np.float64, "BOOL": np.bool_}


def _scalar_types() -> dict[int, np.dtype | None]:
    from torch._export.serde.schema import ScalarType

    return {int(m.value): (np.dtype(_STORABLE_DTYPES[m.name]) if m.name in _STORABLE_DTYPES else None)
            for m in ScalarType if m.name != "UNKNOWN"}


def _sym_int(value, where: str):
    def expr(v, w):
        return _fields(v, w, {"expr_str": lambda s, w2: _parse_size_expr(s),
                              "hint": lambda h, w2: None if h is None else _union(h, w2, {"as_int": _int})},
                       required=("expr_str",))
    return _union(value, where, {"as_int": _int, "as_expr": expr})


def _device(value, where: str):
    return _fields(value, where, {"type": _constant("cpu"), "index": _optional_int})


def _tensor_meta(value, where: str):
    return _fields(value, where, {
        "dtype": _enum(set(_scalar_types())), "sizes": _list(_sym_int, 64), "strides": _list(_sym_int, 64),
        "storage_offset": _sym_int, "requires_grad": _bool, "device": _device, "layout": _enum({7}),
    }, required=("dtype", "sizes"))


def _tensor_ref(value, where: str):
    return _fields(value, where, {"name": _name}, required=("name",))


def _sym_int_arg(value, where: str):
    return _union(value, where, {"as_int": _int, "as_name": _name})


def _optional_tensor(value, where: str):
    return _union(value, where, {"as_none": _none_marker, "as_tensor": _tensor_ref})


def _none_marker(value, where: str):
    if value not in (True, None, {}, []):
        raise _Refuse(f"{where} must be an empty marker")
    return value


# What an argument may be: literals, tensors and symbolic sizes; never a graph, operator or custom object.
_ARGUMENTS: dict[str, Callable[[Any, str], Any]] = {
    "as_none": _none_marker, "as_tensor": _tensor_ref, "as_tensors": _list(_tensor_ref),
    "as_int": _int, "as_ints": _list(_int), "as_float": _float, "as_floats": _list(_float),
    "as_bool": _bool, "as_bools": _list(_bool), "as_string": _string, "as_strings": _list(_string),
    "as_sym_int": _sym_int_arg, "as_sym_ints": _list(_sym_int_arg),
    "as_scalar_type": lambda v, w: _enum(set(_scalar_types()))(v, w),
    "as_memory_format": lambda v, w: _enum(_enum_values("MemoryFormat"))(v, w),
    "as_layout": _enum({7}), "as_device": _device, "as_optional_tensors": _list(_optional_tensor),
}


def _argument(value, where: str):
    return _union(value, where, _ARGUMENTS)


def _nn_module_stack(value, where: str) -> str:
    _string(value, where)
    for item in value.split(";"):
        parts = item.split(",")
        if len(parts) != 3 or not _STACK_KEY.fullmatch(parts[0]) or not _MODULE_PATH.fullmatch(parts[1]) \
                or not _TYPE_NAME.fullmatch(parts[2]):
            raise _Refuse(f"{where} entry {item[:80]!r} is not a module path csqc writes")
    return value


def _torch_fn(value, where: str) -> str:
    _string(value, where)
    parts = value.split(";")
    if len(parts) != 2 or not all(_DOTTED.fullmatch(p.replace("-", "_")) or _NAME.fullmatch(p) for p in parts):
        raise _Refuse(f"{where} {value[:80]!r} is not one csqc writes")
    return value


_NODE_METADATA = {"stack_trace": _string, "nn_module_stack": _nn_module_stack, "torch_fn": _torch_fn}


# -- op targets ---------------------------------------------------------------------------------

# torch's own symbolic-size helpers (batch-dependent reshapes): pure functions of integers
_SIZE_HELPERS = ("torch.ops.aten.sym_size.int", "_operator.getitem", "_operator.add", "_operator.sub",
                 "_operator.mul", "_operator.floordiv")


def _target_name(op) -> str:
    import operator

    if op is operator.getitem:
        return "_operator.getitem"
    return f"{op.__module__.replace('torch._ops', 'torch.ops', 1)}.{op.__name__}"  # as torch's serializer names it


def allowed_targets() -> frozenset[str]:
    """Op targets a model file may call: those csqc compiles, plus torch's size helpers."""
    return frozenset(_op_schemas()) | frozenset(_SIZE_HELPERS)


def _op_schemas() -> dict[str, Any]:
    """Target name -> the op's schema, for the ops csqc compiles."""
    from .capture import HANDLERS
    from .idioms import IDIOM_OPS  # read only inside quantizer idioms, which capture rewrites

    return {_target_name(op): getattr(op, "_schema", None) for op in (*HANDLERS, *IDIOM_OPS)}


# What each parameter type may be given (torch wraps Python scalars passed for a tensor); torch
# itself would pass anything on and fail, or worse, inside the op.
_SCALARS = ("as_int", "as_float", "as_bool")
_SIZES = ("as_ints", "as_sym_ints")
_ARGUMENT_KINDS = {"Tensor": ("as_tensor",) + _SCALARS, "Optional[Tensor]": ("as_tensor", "as_none"),
                   "List[Tensor]": ("as_tensors",), "int": ("as_int", "as_sym_int"), "SymInt": ("as_int", "as_sym_int"),
                   "float": ("as_float", "as_int"), "bool": ("as_bool",), "List[int]": _SIZES, "List[SymInt]": _SIZES,
                   # dtype, layout and memory_format are Optional[int] in schemas (torch.float32, torch.strided)
                   "Optional[int]": ("as_int", "as_sym_int", "as_none", "as_scalar_type", "as_layout",
                                     "as_memory_format"), "Optional[float]": ("as_float", "as_int", "as_none"),
                   "Optional[bool]": ("as_bool", "as_none"), "str": ("as_string",),
                   "number": _SCALARS + ("as_sym_int",),  # arange(batch): a symbolic size
                   "Optional[number]": _SCALARS + ("as_none",)}
_POSITIONAL, _KEYWORD = 1, 2


def _check_arguments(node: dict, schema) -> None:
    """The node's arguments are the schema's, tensors where it takes tensors, none missing."""
    given = {a["name"]: (next(iter(a["arg"])), a.get("kind", _POSITIONAL)) for a in node.get("inputs", [])}
    params = {a.name: a for a in schema.arguments}
    for name, (kind, how) in given.items():
        if name not in params:
            raise _Refuse(f"node {node['name']!r} passes {name!r}, which {node['target']} does not take")
        allowed = _ARGUMENT_KINDS.get(str(params[name].type))
        if name == "dtype" and allowed:  # ScalarType prints as int in schemas: to(x, torch.float32)
            allowed = allowed + ("as_scalar_type",)
        if name == "memory_format" and allowed:  # as dtype: x.contiguous(memory_format=torch.channels_last)
            allowed = allowed + ("as_memory_format",)
        if name == schema.arguments[0].name and allowed and "as_tensor" in allowed:
            allowed = ("as_tensor",)  # scalars stand in for a second operand (x / 4.0), never for self
        if allowed and kind not in allowed:
            raise _Refuse(f"node {node['name']!r} passes {kind} as {params[name].type} {name!r}")
        # a keyword-only parameter goes by keyword; torch passes some positional ones by keyword too
        if how not in ((_KEYWORD,) if params[name].kwarg_only else (_POSITIONAL, _KEYWORD)):
            raise _Refuse(f"node {node['name']!r} passes {name!r} by the wrong kind (positional or keyword)")
    for name, param in params.items():
        if name not in given and not param.has_default_value():
            raise _Refuse(f"node {node['name']!r} lacks argument {name!r}")


def _short_op(target: str) -> str:
    return target.removeprefix("torch.ops.")


def _module_of(metadata) -> str:
    stack = metadata.get("nn_module_stack", "") if isinstance(metadata, dict) else ""
    last = stack.split(";")[-1].split(",") if stack else []
    return last[1] if len(last) == 3 else ""


# -- the program ----------------------------------------------------------------------------------

class _Walk:
    def __init__(self, targets: frozenset[str]):
        self.targets = targets
        self.schemas = _op_schemas()
        self.unsupported: list[tuple[str, str]] = []
        self.nodes: list[dict] = []

    def node(self, value, where: str):
        if isinstance(value, dict):
            target = value.get("target")
            if isinstance(target, str) and target not in self.targets:
                if not re.fullmatch(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+", target):
                    raise _Refuse(f"node {str(value.get('name'))[:60]!r} calls {target[:80]!r}, which is not an "
                                  "operator csqc compiles")
                self.unsupported.append((_short_op(target), _module_of(value.get("metadata")) or str(value.get("name"))))
        checked = _fields(value, where, {
            "target": lambda t, w: _string(t, w), "name": _name,
            "inputs": _list(lambda a, w: _fields(a, w, {"name": _name, "arg": _argument, "kind": _enum({1, 2})},
                                                  required=("name", "arg"))),
            "outputs": _list(_argument), "metadata": lambda m, w: _fields(m, w, _NODE_METADATA),
            "is_hop_single_tensor_return": _optional_bool,
        }, required=("target", "name"))
        if self.schemas.get(checked["target"]) is not None:
            _check_arguments(checked, self.schemas[checked["target"]])
        self.nodes.append(checked)
        return checked

    def graph(self, value, where: str):
        return _fields(value, where, {
            "inputs": _list(_argument), "outputs": _list(_argument), "nodes": _list(self.node),
            "tensor_values": _map(_tensor_meta), "sym_int_values": _map(_sym_int),
            "sym_bool_values": _empty, "sym_float_values": _empty, "custom_obj_values": _empty,
            "is_single_tensor_return": _bool,
        }, required=("nodes", "tensor_values"))


def _input_spec(value, where: str):
    arg = {"name": _name}
    return _union(value, where, {
        "user_input": lambda v, w: _fields(v, w, {"arg": _argument}, required=("arg",)),
        "parameter": lambda v, w: _fields(v, w, {"arg": _tensor_ref, "parameter_name": _name},
                                          required=("arg", "parameter_name")),
        "buffer": lambda v, w: _fields(v, w, {"arg": _tensor_ref, "buffer_name": _name, "persistent": _bool},
                                       required=("arg", "buffer_name")),
        "tensor_constant": lambda v, w: _fields(v, w, {"arg": lambda a, w2: _fields(a, w2, arg),
                                                       "tensor_constant_name": _name},
                                                required=("arg", "tensor_constant_name")),
    })


def _output_spec(value, where: str):
    return _union(value, where, {"user_output": lambda v, w: _fields(v, w, {"arg": _argument}, required=("arg",))})


# pytree node types a csqc model's inputs and outputs use; their contexts are plain JSON
_TREESPEC_TYPES = ("builtins.tuple", "builtins.list", "builtins.dict")


def _treespec_node(node, where: str, depth: int = 0) -> dict:
    if depth > 32:
        raise _Refuse(f"{where} is nested too deeply")
    node = _fields(node, where, {"type": lambda v, w: v, "context": lambda v, w: v,
                                 "children_spec": lambda v, w: v}, required=("type", "context", "children_spec"))
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        raise _Refuse(f"{where}.children_spec must be a list")
    if kind is None:
        if context is not None or children:
            raise _Refuse(f"{where} is a leaf with a context or children")
        return {"type": None, "context": None, "children_spec": []}
    if kind not in _TREESPEC_TYPES:
        raise _Refuse(f"{where} has type {str(kind)[:60]!r}; csqc models take tuples, lists and dicts of tensors")
    if kind == "builtins.dict":
        try:
            keys = json.loads(context) if isinstance(context, str) else None
        except ValueError:
            keys = None
        if not isinstance(keys, list):
            raise _Refuse(f"{where} has a dict context that is not a list of keys")
        context = json.dumps([_name(k, f"{where} key") for k in keys])
    elif context != "null":
        raise _Refuse(f"{where} has context {str(context)[:60]!r}; csqc writes none for {kind}")
    return {"type": kind, "context": context,
            "children_spec": [_treespec_node(c, f"{where}[{i}]", depth + 1) for i, c in enumerate(children)]}


def _treespec(value, where: str) -> str:
    try:
        doc = json.loads(_string(value, where))
    except (ValueError, RecursionError):
        raise _Refuse(f"{where} is not valid JSON") from None
    if not isinstance(doc, list) or len(doc) != 2 or doc[0] != 1:
        raise _Refuse(f"{where} is not a treespec of protocol 1")
    return json.dumps([1, _treespec_node(doc[1], where)])


def _signature(value, where: str):
    return _fields(value, where, {
        "inputs": _list(_argument), "outputs": _list(_argument), "in_spec": _treespec, "out_spec": _treespec,
        "forward_arg_names": _list(_name),
    })


def _leaves(node: dict) -> int:
    return 1 if node["type"] is None else sum(_leaves(c) for c in node["children_spec"])


def _check_root_specs(program: dict) -> None:
    """The root call signature's treespecs hold exactly the graph's user inputs and outputs
    (torch unflattens by them when the model runs)."""
    module = program["graph_module"]
    specs = module["signature"]
    n_in = sum("user_input" in s for s in specs["input_specs"])
    n_out = sum("user_output" in s for s in specs["output_specs"])
    for entry in module.get("module_call_graph", []):
        if entry["fqn"] != "" or entry.get("signature") is None:
            continue
        args, kwargs = (json.loads(entry["signature"]["in_spec"])[1]["children_spec"] + [None, None])[:2]
        if args is None or kwargs is None or _leaves(args) != n_in or _leaves(kwargs) != 0:
            raise _Refuse(f"call signature does not take the program's {n_in} input(s)")
        if _leaves(json.loads(entry["signature"]["out_spec"])[1]) != n_out:
            raise _Refuse(f"call signature does not return the program's {n_out} output(s)")


def _module_call_entry(value, where: str):
    return _fields(value, where, {
        "fqn": lambda v, w: v if v == "" else _name(v, w),
        "signature": lambda v, w: None if v is None else _signature(v, w),
    }, required=("fqn",))


def _guards(value, where: str):
    if value not in ([], None):
        raise _Refuse("holds guard code (guards_code), which torch would run; csqc does not run code from "
                      "model files (files saved by an older csqc: save the model again)")
    return []


def _range_constraints(value, where: str):
    if not isinstance(value, dict):
        raise _Refuse(f"{where} must be an object")
    for symbol, bounds in value.items():
        if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
            raise _Refuse(f"{where} names {str(symbol)[:40]!r}, not a size symbol csqc writes")
        _fields(bounds, f"{where}.{symbol}", {"min_val": _optional_int, "max_val": _optional_int})
    return value


def _program(value, walk: _Walk):
    return _fields(value, "program", {
        "graph_module": lambda v, w: _fields(v, w, {
            "graph": walk.graph, "signature": lambda s, w2: _fields(s, w2, {
                "input_specs": _list(_input_spec), "output_specs": _list(_output_spec)},
                required=("input_specs", "output_specs")),
            "module_call_graph": _list(_module_call_entry), "metadata": _empty, "treespec_namedtuple_fields": _empty,
        }, required=("graph", "signature")),
        "opset_version": _map(_int), "range_constraints": _range_constraints,
        "schema_version": lambda v, w: _fields(v, w, {"major": _int, "minor": _int}, required=("major", "minor")),
        "verifiers": _list(_constant("", "ATEN", "TRAINING")), "torch_version": _string, "guards_code": _guards,
    }, required=("graph_module", "schema_version"))


def check_program(raw: bytes, what: str, *, saving: bool = False) -> CheckedProgram:
    """Validate program JSON bytes; ``ProgramRefused`` (a ``BadInput``) names the first problem.

    Ops csqc cannot compile are collected in ``unsupported`` (aten ops only: anything else is
    refused outright); the caller reports them as ``UnsupportedOps``.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProgramRefused(f"{what}: the captured program is not valid JSON; the file is damaged") from None
    walk = _Walk(allowed_targets())
    try:
        checked = _program(doc, walk)
        _check_root_specs(checked)
        tensors = _stored_tensors(checked)
        layers = _quant_layers(walk.nodes, checked)
    except _Refuse as e:
        if saving:  # torch.export's own program of the user's model: nothing was edited
            raise ProgramRefused(f"{what}: the captured program {e}: csqc saves programs of the operators it "
                                 "compiles, called as torch calls them") from None
        raise ProgramRefused(f"{what}: the captured program {e}; csqc model files hold only what csqc.save writes "
                             "(the file was edited or damaged)") from None
    except RecursionError:
        raise ProgramRefused(f"{what}: the captured program is nested too deeply; the file is damaged") from None
    canonical = json.dumps(checked, allow_nan=False).encode()
    return CheckedProgram(canonical, tensors, layers, walk.unsupported)


def _stored_tensors(program: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``state_dict/<name>`` / ``constants/<name>`` -> (shape, dtype) for every lifted tensor."""
    graph = program["graph_module"]["graph"]
    metas = graph["tensor_values"]
    dtypes = _scalar_types()
    out = {}
    for spec in program["graph_module"]["signature"]["input_specs"]:
        (kind, body), = spec.items()
        if kind == "user_input":
            continue
        # torch keeps non-persistent buffers (position ids, masks) with the constants
        non_persistent = kind == "buffer" and body.get("persistent") is False
        prefix = "constants" if kind == "tensor_constant" or non_persistent else "state_dict"
        key = f"{prefix}/{body.get('parameter_name') or body.get('buffer_name') or body.get('tensor_constant_name')}"
        placeholder = body["arg"]["name"]
        meta = metas.get(placeholder)
        if meta is None:
            raise _Refuse(f"tensor {placeholder!r} has no shape")
        sizes = []
        for s in meta["sizes"]:
            if "as_int" not in s or s["as_int"] < 0:
                raise _Refuse(f"stored tensor {key!r} has a symbolic or negative size")
            sizes.append(s["as_int"])
        dtype = dtypes[meta["dtype"]]
        if dtype is None:
            raise _Refuse(f"stored tensor {key!r} has a dtype csqc cannot store")
        if key in out:
            raise _Refuse(f"names tensor {key!r} twice")
        out[key] = (tuple(sizes), dtype)
    return out


_QUANT_OPS = ("torch.ops.csqc.quant_linear.default", "torch.ops.csqc.quant_conv2d.default",
              "torch.ops.csqc.quant_conv_transpose2d.default")


_ASYMMETRIC_QUANT = "torch.ops.csqc.act_quant_asymmetric.default"


def _check_asymmetric_quant(node: dict) -> None:
    """An asymmetric quantizer's bits, range and zero point are what ``ActQuant`` can write."""
    args = {a["name"]: a["arg"] for a in node.get("inputs", [])}
    try:
        bits, zero_point = args["bits"]["as_int"], args["zero_point"]["as_int"]
        static = args["static_range"].get("as_float", args["static_range"].get("as_int"))
    except (KeyError, TypeError, AttributeError):
        raise _Refuse(f"node {node['name']!r} lacks its bits, range or zero point") from None
    if not (isinstance(bits, int) and 1 <= bits <= 8 and isinstance(zero_point, int) and 0 <= zero_point <= 2**bits - 1
            and isinstance(static, (int, float))):
        raise _Refuse(f"node {node['name']!r} quantizes to {bits!r} bits with zero point {zero_point!r}; "
                      "bits must be 1..8 and the zero point 0..2^bits-1")


def _quant_layers(nodes: list[dict], program: dict) -> list[QuantLayer]:
    stored = {}
    for spec in program["graph_module"]["signature"]["input_specs"]:
        (kind, body), = spec.items()
        if kind in ("parameter", "buffer"):
            stored[body["arg"]["name"]] = f"state_dict/{body.get('parameter_name') or body.get('buffer_name')}"
        elif kind == "tensor_constant":
            stored[body["arg"]["name"]] = f"constants/{body['tensor_constant_name']}"
    layers = []
    for node in nodes:
        if node["target"].startswith("torch.ops.csqc.") and any(
                a["arg"].get("as_float") in _SPECIAL_FLOATS for a in node.get("inputs", [])):
            raise _Refuse(f"node {node['name']!r} has a NaN or infinite argument")
        if node["target"] == _ASYMMETRIC_QUANT:
            _check_asymmetric_quant(node)
        if node["target"] not in _QUANT_OPS:
            continue
        args = {a["name"]: a["arg"] for a in node.get("inputs", [])}
        try:
            q_name = args["q"]["as_tensor"]["name"]
            n_bits, mask = args["n_bits"]["as_int"], args["active_mask"]["as_int"]
        except (KeyError, TypeError):
            raise _Refuse(f"node {node['name']!r} lacks its weights, bit width or bit mask") from None
        if q_name not in stored:
            raise _Refuse(f"node {node['name']!r} takes weights {q_name!r} that are not stored")
        if not 1 <= n_bits <= 15 or not 0 <= mask < 2**n_bits:
            raise _Refuse(f"node {node['name']!r} has N={n_bits}, mask {mask}; N must be 1..15 and the mask N bits")
        layers.append(QuantLayer(node["name"], stored[q_name], n_bits, mask))
    return layers


def strip_guards(raw: bytes) -> bytes:
    """``raw`` program JSON without torch's input guards (which torch would ``exec`` on load).

    torch writes guards such as ``L['x'].size()[0] == L['h'].size()[0]`` for models with
    several inputs sharing the dynamic batch; csqc checks input shapes itself.
    """
    doc = json.loads(raw)
    doc["guards_code"] = []
    return json.dumps(doc, allow_nan=False).encode()
