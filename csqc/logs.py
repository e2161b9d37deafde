"""Which log lines reach the terminal: csqc's own warnings, library chatter only under ``--debug``.

Libraries csqc drives log for their own developers: matplotlib lists every font it scans at
DEBUG (hundreds of lines), and ONNX Runtime's quantizer (used for the int8 baselines) warns
through the *root* logger about pre-processing and non-constant Gemm biases, which says nothing
a csqc user can act on. ``configure_logging`` keeps the first to WARNING even under ``--debug``;
``quiet_ort_quantizer`` drops the second unless debug logging is on.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

__all__ = ["NOISY_LOGGERS", "configure_logging", "quiet_ort_quantizer"]

# loggers that stay at WARNING even under --debug: their DEBUG lines are about the library itself
NOISY_LOGGERS = ("matplotlib", "PIL", "onnxruntime.quantization", "neural_compressor")
_QUANTIZER_LOGGERS = ("onnxruntime.quantization", "neural_compressor")
_QUANTIZER_SOURCE = os.path.join("onnxruntime", "quantization", "")


def configure_logging(debug: bool) -> None:
    """The CLI's logging: WARNING and up, DEBUG with ``debug``, the noisy libraries held at WARNING."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch logs a traceback at ERROR when a program fails at fake shapes; csqc says why in one line
    # (a filter: torch sets its loggers' levels itself when it is imported)
    fake_tensor = logging.getLogger("torch._subclasses.fake_tensor")
    (fake_tensor.removeFilter if debug else fake_tensor.addFilter)(_drop_all)  # (adding twice keeps one)


def _drop_all(record: logging.LogRecord) -> bool:
    return False


class _DropQuantizerRecords(logging.Filter):
    """Drops records that ONNX Runtime's quantizer logs through the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _QUANTIZER_SOURCE not in (record.pathname or "")


@contextlib.contextmanager
def quiet_ort_quantizer() -> Iterator[None]:
    """Silence ONNX Runtime's quantizer inside the block, unless debug logging is on (``--debug``)."""
    root = logging.getLogger()
    if root.isEnabledFor(logging.DEBUG):
        yield
        return
    dropper = _DropQuantizerRecords()
    quantizers = [logging.getLogger(name) for name in _QUANTIZER_LOGGERS]
    levels = [q.level for q in quantizers]
    root.addFilter(dropper)
    for q in quantizers:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(dropper)
        for q, level in zip(quantizers, levels):
            q.setLevel(level)
