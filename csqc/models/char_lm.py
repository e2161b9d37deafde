"""The character-level LSTM language model of ``examples/char_lm.py`` and its one-step form.

The example trains it; ``benchmarks/goals.py`` times the step model (random init) against
ONNX Runtime, so both build it from here.
"""
from __future__ import annotations

from torch import nn

__all__ = ["CHARS", "VOCAB", "CharLM", "CharLMStep"]

# vocabulary: tab, newline, printable ASCII; everything else is one "other" symbol
CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(CHARS) + 1


class CharLM(nn.Module):
    """One-hot characters -> LSTM -> linear head (logits of the next character)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = nn.LSTM(VOCAB, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x):  # x: one-hot [B, T, V]
        out, _ = self.rnn(x)
        return self.head(out)


class CharLMStep(nn.Module):
    """One time step of a converted CharLM: ``(x_t [B, V], h, c) -> (logits, h', c')``.

    The LSTM must be converted first (``csqc.convert``): the step is ``CSQLSTM.step``."""

    def __init__(self, lm: CharLM):
        super().__init__()
        self.rnn, self.head = lm.rnn, lm.head

    def forward(self, x, h, c):
        h2, c2 = self.rnn.step(x, h, c)
        return self.head(h2), h2, c2
