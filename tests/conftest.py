"""Shared fixtures: trained digits models are built once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(recipe)`` -> (finalized model, TrainResult, example input, saved path)."""
    from csqc import save, train_recipe

    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            model, result, example = train_recipe(recipe)
            path = tmp_path_factory.mktemp("models") / f"{recipe}.pt"
            save(model, path, example)
            cache[recipe] = (model, result, example, path)
        return cache[recipe]

    return get
