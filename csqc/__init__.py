"""csqc: a compiler for bit-level mixed-precision (CSQ) neural networks.

Library API (the CLI is a thin layer over it)::

    model = csqc.convert(float_model, n_bits=8, act_bits=4, example_inputs=x)  # CSQ layers
    print(csqc.conversion_report(model).summary())              # what stayed float, and why
    csqc.train_csq(model, data, target_bits=3.0)                # or csqc.train_recipe("digits-cnn")
    csqc.save(model, "model.pt", example_input)                 # safe, self-describing file
    m = csqc.load("model.pt")                                   # m(x) runs the PyTorch reference
    csqc.compile(m, target="llvm", output="model.llvm.so")      # or "onnx", "cuda"
    csqc.verify(m, artifact="model.llvm.so")                    # every runtime, bit for bit
    run = csqc.runtime.load("model.llvm.so"); y = run(x)        # deployment: numpy + tvm only

Names are imported lazily so that ``csqc.runtime`` works without torch installed.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    # name: (module, attribute)
    "CsqcError": ("errors", "CsqcError"), "BadInput": ("errors", "BadInput"),
    "CompileError": ("errors", "CompileError"), "VerifyError": ("errors", "VerifyError"),
    "TrainingFailed": ("errors", "TrainingFailed"), "check_training_result": ("train", "check_training_result"),
    "CSQLinear": ("layers", "CSQLinear"), "CSQConv2d": ("layers", "CSQConv2d"), "CSQConv1d": ("layers", "CSQConv1d"),
    "CSQConvTranspose2d": ("layers", "CSQConvTranspose2d"),
    "CSQConvTranspose1d": ("layers", "CSQConvTranspose1d"),
    "ActQuant": ("layers", "ActQuant"),
    "CSQLSTM": ("recurrent", "CSQLSTM"), "CSQGRU": ("recurrent", "CSQGRU"), "one_step": ("recurrent", "one_step"),
    "convert": ("conversion", "convert"), "conversion_report": ("conversion", "conversion_report"),
    "CSQMultiheadAttention": ("attention", "CSQMultiheadAttention"), "finalize": ("layers", "finalize"), "calibrate": ("layers", "calibrate"),
    "CsqcModel": ("modelfile", "CsqcModel"), "save": ("modelfile", "save"), "load": ("modelfile", "load"),
    "train_float": ("train", "train_float"), "train_csq": ("train", "train_csq"), "train_recipe": ("train", "train_recipe"), "evaluate": ("train", "evaluate"),
    "train_factory": ("train", "train_factory"), "TrainingRun": ("train", "TrainingRun"),
    "capture": ("capture", "capture"), "optimize": ("compiler", "optimize"), "compile": ("compiler", "compile"),
    "inspect": ("compiler", "inspect"), "verify": ("verify", "verify"), "aligned_array": ("runtime", "aligned_array"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    if name in ("runtime", "models", "passes", "targets", "ir", "interpreter", "layers", "ops", "recurrent", "attention", "conversion"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'csqc' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps API functions that share a name with their module (``csqc.verify``, ``csqc.capture``).

    Importing a submodule binds it on its package; without this guard the first
    ``import csqc.verify`` anywhere would replace the function ``csqc.verify`` with the module.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name, (None,))[0] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
