"""Training: float warm-up, CSQ bit training under a budget, finalization; digits recipes.

``train_csq`` is the library entry point (any model already passed through ``convert``);
``train_recipe`` runs a named recipe end to end, as ``csqc train`` does.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import layers
from .data import Split, load_digits_split
from .errors import BadInput, TrainingFailed
from .models import digits_cnn, digits_mlp
from .terminal import progress_bar

__all__ = [
    "TrainResult", "check_training_result", "train_float", "train_csq", "evaluate", "Examples", "training_examples",
    "RECIPES", "train_recipe",
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
    eval_batch: int = 0  # samples per forward pass behind test_accuracy (dynamic scales depend on it)

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
            "eval_batch": self.eval_batch,
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
    """Top-1 accuracy on the whole array, in one batch (the models here are small).

    With dynamic activation scales the batch matters: each scale is the max-abs over the batch.
    """
    return _accuracy(model, Examples.of_arrays(x, y, "x, y"))[0]


class Examples:
    """Labelled examples to train or evaluate on: two arrays (batched here) or a loader's batches.

    A loader is anything iterable again on every epoch that yields ``(inputs, labels)`` batches: a
    ``torch.utils.data.DataLoader``, a list of tensor pairs.
    """

    def __init__(self, *, x: np.ndarray | None = None, y: np.ndarray | None = None, loader=None, what: str = "data"):
        self.x, self.y, self.loader, self.what = x, y, loader, what

    @classmethod
    def of_arrays(cls, x, y, what: str) -> "Examples":
        x, y = _as_array(x, f"{what}: inputs"), _as_array(y, f"{what}: labels")
        if len(x) != len(y) or len(x) == 0:
            raise BadInput(f"{what}: {len(x)} inputs and {len(y)} labels; give the same number, at least one")
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise BadInput(f"{what}: labels must be a 1-D array of integer class indices, got {y.dtype} of shape {list(y.shape)}")
        if x.dtype.kind not in "fiub":
            raise BadInput(f"{what}: inputs must be numeric, got {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32 if x.dtype.kind == "f" else None)  # models here are float32
        return cls(x=x, y=y.astype(np.int64), what=what)

    def batches(self, batch_size: int, rng: np.random.Generator):
        """Training batches: the arrays shuffled with ``rng``, or the loader's (it shuffles itself)."""
        if self.loader is None:
            yield from _batches(self.x, self.y, batch_size, rng)
            return
        for batch in self.loader:
            yield self._tensors(batch)

    def whole(self):
        """Evaluation batches: the arrays in one batch, or the loader's batches."""
        if self.loader is None:
            yield torch.from_numpy(self.x), torch.from_numpy(self.y)
            return
        for batch in self.loader:
            yield self._tensors(batch)

    def _tensors(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise BadInput(f"{self.what}: every batch must be an (inputs, labels) pair, got {type(batch).__name__}")
        x, y = (torch.as_tensor(a) for a in batch)
        return (x.float() if x.is_floating_point() else x), y.long()


def _as_array(a, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise BadInput(f"{what} must be a torch tensor or a numpy array, got {type(a).__name__}")


def training_examples(data, what: str = "data") -> Examples:
    """``data`` as ``Examples``: a ``Split`` (its training part), an ``(x, y)`` pair of tensors or
    arrays, or a loader of ``(x, y)`` batches. Anything else is ``BadInput``."""
    if isinstance(data, Split):
        return Examples.of_arrays(data.x_train, data.y_train, what)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(a, (torch.Tensor, np.ndarray)) for a in data):
        return Examples.of_arrays(*data, what)
    if isinstance(data, (str, bytes, dict, torch.Tensor, np.ndarray)) or not hasattr(data, "__iter__"):
        raise BadInput(f"{what} must be a csqc.data.Split, an (inputs, labels) pair of tensors or arrays, or a "
                       f"DataLoader of (inputs, labels) batches; got {type(data).__name__}")
    if iter(data) is data:  # a generator is empty after the first epoch
        raise BadInput(f"{what} is a one-shot iterator ({type(data).__name__}): training reads the batches once per "
                       "epoch; pass a DataLoader or a list of (inputs, labels) batches")
    return Examples(loader=data, what=what)


def evaluation_examples(data, eval_data) -> tuple[Examples, bool]:
    """What accuracy is measured on: ``eval_data``, else a ``Split``'s test part, else the training
    data itself. The flag says it is the training data (the accuracy is then a training accuracy)."""
    if eval_data is not None:
        return training_examples(eval_data, "eval_data"), False
    if isinstance(data, Split):
        return Examples.of_arrays(data.x_test, data.y_test, "data (test split)"), False
    return training_examples(data), True


@torch.no_grad()
def _accuracy(model: nn.Module, examples: Examples) -> tuple[float, int]:
    """Top-1 accuracy over ``examples``'s evaluation batches, and the largest batch it used."""
    was = model.training
    model.eval()
    correct = seen = largest = 0
    for xb, yb in examples.whole():
        correct += int((model(xb).argmax(1) == yb).sum())
        seen += len(yb)
        largest = max(largest, len(yb))
    model.train(was)
    if seen == 0:
        raise BadInput(f"{examples.what}: no examples to evaluate on")
    return correct / seen, largest


def _warn_training_accuracy(used_training_data: bool) -> None:
    if used_training_data:
        warnings.warn("no eval_data given: the accuracy returned is measured on the training data", stacklevel=3)


def train_float(model: nn.Module, data, epochs: int, lr: float = 1e-2, batch_size: int = 64,
                seed: int = 0, progress: bool = False, *, eval_data=None) -> float:
    """Plain float training (the starting point ``convert`` quantizes); returns the accuracy.

    ``data`` and ``eval_data`` as for ``train_csq``.
    """
    examples = training_examples(data)
    held_out, is_training = evaluation_examples(data, eval_data)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    loss_fn = nn.CrossEntropyLoss()
    with progress_bar("float warm-up", enabled=progress, total=epochs) as update:
        for _ in range(epochs):
            model.train()
            for xb, yb in examples.batches(batch_size, rng):
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            sched.step()
            update(advance=1)
    _warn_training_accuracy(is_training)
    return _accuracy(model, held_out)[0]


def train_csq(
    model: nn.Module,
    data,
    *,
    eval_data=None,
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
    before finalization. Returns the finalized model's accuracy and the bits dropped by ``enforce``.

    ``data``: a ``csqc.data.Split`` (trains on its training part, measures on its test part); an
    ``(inputs, labels)`` pair of tensors or arrays (shuffled into ``batch_size`` batches here); or
    a ``DataLoader`` (any re-iterable of ``(inputs, labels)`` batches, used as it batches). The
    accuracy is measured on ``eval_data`` (a pair or a loader) when given, else on a ``Split``'s
    test part, else on ``data`` itself with a warning (a training accuracy). Arrays are evaluated in
    one batch, a loader batch by batch: with dynamic activation scales the batch changes the result.
    """
    examples = training_examples(data)
    held_out, is_training = evaluation_examples(data, eval_data)
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
    with progress_bar("CSQ bits", enabled=progress, total=epochs) as update:
        for epoch in range(epochs):
            layers.set_temperature(model, schedule(epoch))
            model.train()
            for xb, yb in examples.batches(batch_size, rng):
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
            update(advance=1, info=f"T={stats['T']:.0f} bits={stats['avg_bits']:.2f}")
    dropped = reg.enforce()
    if dropped:
        log.info("budget enforcement dropped %d bit positions", len(dropped))
    _refresh_batchnorm(model, examples, batch_size)
    layers.finalize(model)
    _warn_training_accuracy(is_training)
    return _accuracy(model, held_out)[0], dropped


@torch.no_grad()
def _keep_layers_alive(reg: layers.BudgetRegularizer, mask_opt: torch.optim.SGD) -> None:
    """Project the masks back to one active bit per layer, and drop the momentum of a raised
    logit: left in place, it would push the logit under the floor again on every step."""
    for layer_index, b in reg.keep_layers_alive():
        state = mask_opt.state.get(reg.layers[layer_index].mask_weight, {})
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"][b] = 0.0


@torch.no_grad()
def _refresh_batchnorm(model: nn.Module, examples: Examples, batch_size: int) -> None:
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
    for xb, _ in examples.batches(batch_size, rng):
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
        eval_batch=len(data.x_test),  # train_csq evaluates a Split's test arrays in one batch
    )
    example = torch.from_numpy(data.x_test[:1])
    return model, result, example
