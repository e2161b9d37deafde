"""csqc.passes: IR passes, one module each, registered by module name (installed from `passes/`).

Each pass is a pure function ``Graph -> PassResult(graph, changed)``; ``manager.run_passes``
runs a named pipeline and verifies the IR after every pass.
"""
if __name__ != "csqc.passes":  # pragma: no cover - guard against a second copy
    raise ImportError(
        "import this package as csqc.passes (the top-level 'passes' folder is mapped there by pyproject.toml)"
    )

from . import (  # noqa: E402,F401  (importing registers each pass)
    accumulator_width,
    choose_encoding,
    dce,
    drop_dead_planes,
    fold_bn,
    fold_scales,
    fold_zero_layers,
    fuse_act_quant,
    fuse_activation,
    fuse_requant,
    pack_planes,
    sink_layout_ops,
    sink_quantize,
    split_planes,
)
from .manager import PIPELINES, PassFailure, PassRecord, run_passes  # noqa: E402
from .registry import PassInfo, PassResult, get_pass, register, registered_passes  # noqa: E402

__all__ = [
    "PIPELINES", "PassFailure", "PassRecord", "run_passes",
    "PassInfo", "PassResult", "get_pass", "register", "registered_passes",
]
