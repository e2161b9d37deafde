"""Which model an artifact was compiled from, so ``verify`` and ``bench`` catch a mix-up.

``verify MODEL --artifact A`` with ``A`` compiled from another model (a retrained one, the one next
to it) used to report "runtimes disagree", which reads as a csqc bug; ``bench`` timed ``A``
against the baselines of the other model. ``csqc.compile`` records a digest of the model's weights
in the artifact, and both commands compare it with the model they were given first.

The digest covers the weights only (every tensor of the captured program, by name, dtype, shape
and bytes): re-saving the model, importing the same reference checkpoint, compiling with another
batch size or calibration keep it; retraining changes it. Where it is kept:
``plan.json["model_digest"]`` of a TVM artifact (sealed by its digests) and
``metadata_props["csqc.model_digest"]`` of an ONNX model. Artifacts without one (built by the
target emitters directly, or by an older csqc) are not checked.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .errors import BadInput

__all__ = ["model_digest", "plan_entry", "set_onnx_digest", "plan_digest", "onnx_digest", "artifact_digest",
           "check_artifact_model"]

PLAN_KEY = "model_digest"
ONNX_KEY = "csqc.model_digest"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def model_digest(model) -> str:
    """SHA-256 over a ``CsqcModel``'s program tensors (parameters, buffers, constants) in name order."""
    program = model.program
    tensors = {**program.state_dict, **program.constants}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):  # a script object constant: no weights of its own
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{list(tensors[name].shape)}\0".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # (the tensor's own bytes, not a copy)
    return h.hexdigest()


def plan_entry(digest: str | None) -> dict:
    """What a TVM target adds to its plan's metadata (nothing without a digest)."""
    return {} if digest is None else {PLAN_KEY: digest}


def set_onnx_digest(onnx_model, digest: str | None) -> None:
    """Record ``digest`` in an ONNX model's metadata (nothing without one)."""
    if digest is not None:
        onnx_model.metadata_props.add(key=ONNX_KEY, value=digest)


def _checked(value, where) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise BadInput(f"{where}: the recorded model digest is not one csqc writes; compile the model again")
    return value


def plan_digest(plan: dict, where) -> str | None:
    """The model digest a TVM artifact's (digest-checked) plan records, None without one."""
    return _checked(plan[PLAN_KEY], where) if PLAN_KEY in plan else None


def onnx_digest(onnx_model, where) -> str | None:
    """The model digest an ONNX model's metadata records, None without one."""
    values = [p.value for p in onnx_model.metadata_props if p.key == ONNX_KEY]
    if len(values) > 1:
        raise BadInput(f"{where}: the model holds {len(values)} model digests; csqc writes one")
    return _checked(values[0], where) if values else None


def artifact_digest(path) -> str | None:
    """The model digest an artifact (``.so`` or ``.onnx``) records, None without one (or for
    another kind of file). Reads the file only: no library is loaded."""
    path = Path(path)
    if path.name.endswith(".onnx"):
        from .targets.onnx.runner import load_onnx

        return onnx_digest(load_onnx(path), path)
    if not path.name.endswith(".so"):
        return None
    from .artifact import read_artifact

    return plan_digest(read_artifact(path).plan, path)


def check_artifact_model(model, artifact) -> None:
    """``BadInput`` when ``artifact`` records a digest other than ``model``'s."""
    recorded = artifact_digest(artifact)
    if recorded is None:
        return
    own = model_digest(model)
    if recorded != own:
        name = model.source or "the model given"
        raise BadInput(f"{artifact} was compiled from another model (weights digest {recorded[:12]}), not from "
                       f"{name} ({own[:12]}): give the model it was built from, or compile this one")
