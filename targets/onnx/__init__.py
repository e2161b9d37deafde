"""ONNX target: exact reference graphs and deployable QDQ models.

* ``emit_reference(graph)``: integer-exact model for ONNX Runtime (``reference``);
* ``emit_deploy(graph, calibration_inputs)``: compact QDQ / MatMulNBits model (``deploy``);
* ``make_session``, ``run_with_intermediates``, ``save_onnx``: ORT helpers (``runner``).
"""
from .deploy import accuracy_cost, emit_deploy, emit_float
from .reference import emit_reference, layer_table
from .runner import load_onnx, make_session, run, run_with_intermediates, save_onnx, with_outputs

__all__ = [
    "emit_reference", "layer_table", "emit_deploy", "emit_float", "accuracy_cost",
    "make_session", "run", "run_with_intermediates", "with_outputs", "save_onnx", "load_onnx",
]
