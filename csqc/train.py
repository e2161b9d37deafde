"""Training: float warm-up, CSQ bit training under a budget, finalization; digits recipes.

``train_csq`` is the library entry point (any model already passed through ``convert``);
``train_recipe`` runs a named recipe end to end, as ``csqc train`` does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import layers
from .data import Split, load_digits_split
from .errors import BadInput, TrainingFailed
from .models import digits_cnn, digits_mlp

__all__ = [
    "TrainResult", "check_training_result", "train_float", "train_csq", "evaluate", "RECIPES", "train_recipe",
]

log = logging.getLogger(__name__)

# A quantized model this far below its own float warm-up has collapsed, not merely lost a little.
MAX_ACCURACY_DROP = 0.10


@dataclass
class TrainResult:
    recipe: str
    test_accuracy: float
    float_accuracy: float
    avg_bits: float
    target_bits: float
    seconds: float
    layers: list[dict] = field(default_factory=list)
    dropped_bits: int = 0
    allow_layer_pruning: bool = False

    def problem(self) -> str | None:
        """Why this result is a failed training (one line), or None when it is usable."""
        dead = [l["name"] for l in self.layers if not l["active_bits"]]
        if dead and not self.allow_layer_pruning:
            return (f"training collapsed: layer(s) {', '.join(dead)} kept no bit position "
                    f"(test accuracy {self.test_accuracy:.2%}); train again, e.g. with another --seed")
        if self.test_accuracy < self.float_accuracy - MAX_ACCURACY_DROP:
            return (f"training collapsed: test accuracy {self.test_accuracy:.2%} is more than "
                    f"{MAX_ACCURACY_DROP:.0%} below the float warm-up's {self.float_accuracy:.2%}; "
                    "train again with a larger --target-bits or more --epochs")
        return None

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe,
            "test_accuracy": self.test_accuracy,
            "float_accuracy": self.float_accuracy,
            "avg_bits": self.avg_bits,
            "target_bits": self.target_bits,
            "seconds": self.seconds,
            "layers": self.layers,
            "problem": self.problem(),
        }


def check_training_result(result: TrainResult) -> TrainResult:
    """Raise ``TrainingFailed`` (exit code 1) when ``result`` is a collapsed model; else return it."""
    problem = result.problem()
    if problem:
        raise TrainingFailed(problem, result.to_json())
    return result


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy on the whole array (one batch: the models here are small)."""
    was = model.training
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    model.train(was)
    return float((pred == y).mean())


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


def train_float(model: nn.Module, data: Split, epochs: int, lr: float = 1e-2, batch_size: int = 64,
                seed: int = 0, progress: bool = False) -> float:
    """Plain float training (the starting point ``convert`` quantizes); returns test accuracy."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    loss_fn = nn.CrossEntropyLoss()
    with _progress(epochs, "float", progress) as bar:
        task = bar.add_task("float warm-up", total=epochs, info="")
        for _ in range(epochs):
            model.train()
            for xb, yb in _batches(data.x_train, data.y_train, batch_size, rng):
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            sched.step()
            bar.update(task, advance=1)
    return evaluate(model, data.x_test, data.y_test)


def train_csq(
    model: nn.Module,
    data: Split,
    *,
    epochs: int = 60,
    target_bits: float = 3.0,
    lr: float = 1e-2,
    batch_size: int = 64,
    reg_strength: float = 2.0,
    mask_lr: float = 0.05,
    t_max: float = 200.0,
    rounds: int = 1,
    seed: int = 0,
    allow_layer_pruning: bool = False,
    progress: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> tuple[float, list]:
    """Train a converted model's bits and masks under the bit budget, then finalize it.

    The temperature follows ``TemperatureSchedule``; the budget regularizer steers the
    size-weighted average of active bits toward ``target_bits`` and ``enforce`` guarantees it
    before finalization. Returns the finalized model's test accuracy and the bits dropped by
    ``enforce``.
    """
    rng = np.random.default_rng(seed)
    reg = layers.BudgetRegularizer(model, target_bits, reg_strength, allow_layer_pruning=allow_layer_pruning)
    schedule = layers.TemperatureSchedule(epochs, t_max, rounds)
    # Masks train with plain SGD: Adam would normalise away the size weighting of the budget
    # term, and every layer would lose bits at the same pace.
    masks = [m.mask_weight for _, m in layers.csq_layers(model)]
    mask_ids = {id(p) for p in masks}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in mask_ids], lr=lr)
    mask_opt = torch.optim.SGD(masks, lr=mask_lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with _progress(epochs, "csq", progress) as bar:
        task = bar.add_task("CSQ bits", total=epochs, info="")
        for epoch in range(epochs):
            layers.set_temperature(model, schedule(epoch))
            model.train()
            for xb, yb in _batches(data.x_train, data.y_train, batch_size, rng):
                opt.zero_grad()
                mask_opt.zero_grad()
                loss = loss_fn(model(xb), yb) + reg()
                loss.backward()
                opt.step()
                mask_opt.step()
                _keep_layers_alive(reg, mask_opt)
            stats = {"T": schedule(epoch), "avg_bits": layers.average_bits(model)}
            if on_epoch:
                on_epoch(epoch, stats)
            bar.update(task, advance=1, info=f"T={stats['T']:.0f} bits={stats['avg_bits']:.2f}")
    dropped = reg.enforce()
    if dropped:
        log.info("budget enforcement dropped %d bit positions", len(dropped))
    _refresh_batchnorm(model, data, batch_size)
    layers.finalize(model)
    return evaluate(model, data.x_test, data.y_test), dropped


@torch.no_grad()
def _keep_layers_alive(reg: layers.BudgetRegularizer, mask_opt: torch.optim.SGD) -> None:
    """Project the masks back to one active bit per layer, and drop the momentum of a raised
    logit: left in place, it would push the logit under the floor again on every step."""
    for layer_index, b in reg.keep_layers_alive():
        state = mask_opt.state.get(reg.layers[layer_index].mask_weight, {})
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"][b] = 0.0


@torch.no_grad()
def _refresh_batchnorm(model: nn.Module, data: Split, batch_size: int) -> None:
    """Re-estimate BatchNorm statistics with hardened bits (soft-gate statistics drift)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    layers.set_temperature(model, 1e6)  # gates are exactly 0/1 at this temperature
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass
    model.train()
    rng = np.random.default_rng(0)
    for xb, _ in _batches(data.x_train, data.y_train, batch_size, rng):
        model(xb)
    model.eval()


@dataclass(frozen=True)
class Recipe:
    build: Callable[[], nn.Module]
    image: bool
    float_epochs: int
    csq_epochs: int
    act_bits: int
    n_bits: int = 8
    lr: float = 1e-2
    reg_strength: float = 2.0
    allow_layer_pruning: bool = False


RECIPES: dict[str, Recipe] = {
    "digits-mlp": Recipe(digits_mlp, image=False, float_epochs=30, csq_epochs=60, act_bits=4),
    "digits-cnn": Recipe(digits_cnn, image=True, float_epochs=20, csq_epochs=40, act_bits=4),
}


def train_recipe(
    name: str,
    *,
    target_bits: float = 3.0,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, TrainResult, torch.Tensor]:
    """Run a named recipe: float warm-up, ``convert``, CSQ training, finalization.

    Returns the finalized model, its report and an example input (batch 1) for ``csqc.save``.
    The report may describe a collapsed model: ``result.problem()`` / ``check_training_result``.
    """
    if name not in RECIPES:
        raise BadInput(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    if not 0 < target_bits <= 8:
        raise BadInput(f"--target-bits must be in (0, 8], got {target_bits}")
    if epochs is not None and epochs < 1:
        raise BadInput(f"--epochs must be at least 1, got {epochs}")
    recipe = RECIPES[name]
    torch.manual_seed(seed)
    start = time.perf_counter()
    data = load_digits_split(image=recipe.image, seed=0)
    model = recipe.build()
    float_acc = train_float(model, data, recipe.float_epochs, recipe.lr, seed=seed, progress=progress)
    layers.convert(model, n_bits=recipe.n_bits, act_bits=recipe.act_bits)
    acc, dropped = train_csq(
        model, data, epochs=epochs or recipe.csq_epochs, target_bits=target_bits,
        lr=recipe.lr, reg_strength=recipe.reg_strength, seed=seed,
        allow_layer_pruning=recipe.allow_layer_pruning, progress=progress,
    )
    result = TrainResult(
        recipe=name, test_accuracy=acc, float_accuracy=float_acc,
        avg_bits=layers.average_bits(model), target_bits=target_bits,
        seconds=time.perf_counter() - start, layers=layers.layer_report(model),
        dropped_bits=len(dropped), allow_layer_pruning=recipe.allow_layer_pruning,
    )
    example = torch.from_numpy(data.x_test[:1])
    return model, result, example
