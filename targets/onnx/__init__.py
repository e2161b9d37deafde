"""ONNX target: exact reference graphs and deployable QDQ models.

* ``emit_reference(graph)``: integer-exact model for ONNX Runtime (``reference``);
* ``emit_deploy(graph, calibration_inputs)``: compact QDQ / MatMulNBits model (``deploy``);
* ``make_session``, ``run_with_intermediates``, ``save_onnx``: ORT helpers (``runner``).

The names load on first use: the target registry imports this package (for ``entry``) on every
compile, and ONNX / ONNX Runtime take seconds to import.
"""
import importlib

_HOMES = {
    "emit_reference": "reference", "layer_table": "reference",
    "emit_deploy": "deploy", "emit_float": "deploy", "accuracy_cost": "deploy",
    "make_session": "runner", "run": "runner", "run_with_intermediates": "runner", "with_outputs": "runner",
    "save_onnx": "runner", "load_onnx": "runner",
}

__all__ = [
    "emit_reference", "layer_table", "emit_deploy", "emit_float", "accuracy_cost",
    "make_session", "run", "run_with_intermediates", "with_outputs", "save_onnx", "load_onnx",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
