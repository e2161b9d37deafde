"""csqc: a compiler for bit-level mixed-precision (CSQ) neural networks.

Library API (the CLI is a thin layer over it)::

    model = csqc.convert(float_model, n_bits=8, act_bits=4)   # CSQ layers
    csqc.train_csq(model, data, target_bits=3.0)                # or csqc.train_recipe("digits-cnn")
    csqc.save(model, "model.pt", example_input)                 # safe, self-describing file
    m = csqc.load("model.pt")                                   # m(x) runs the PyTorch reference
"""
__version__ = "0.1.0"

from .errors import BadInput, CompileError, CsqcError, VerifyError  # noqa: E402
from .layers import ActQuant, CSQConv2d, CSQLinear, convert, finalize  # noqa: E402
from .modelfile import CsqcModel, load, save  # noqa: E402
from .train import evaluate, train_csq, train_recipe  # noqa: E402

__all__ = [
    "__version__",
    "CsqcError", "BadInput", "CompileError", "VerifyError",
    "CSQLinear", "CSQConv2d", "ActQuant", "convert", "finalize",
    "CsqcModel", "save", "load",
    "train_csq", "train_recipe", "evaluate",
]
