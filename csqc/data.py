"""Data sets that work offline: scikit-learn's bundled handwritten digits (8x8, 10 classes)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Split", "load_digits_split"]


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(image: bool = False, seed: int = 0) -> Split:
    """Digits scaled to [0, 1], 75/25 stratified split; ``image`` gives NCHW ``[n, 1, 8, 8]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return Split(xtr, ytr, xte, yte)
