"""Training: float warm-up, CSQ bit training under a budget, finalization; digits recipes.

``train_csq`` is the library entry point (any model already passed through ``convert``);
``train_recipe`` runs a named recipe end to end, as ``csqc train`` does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from . import layers
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Split, load_digits_split
from .distributed import Parallel
from .errors import BadInput, TrainingFailed
from .outputs import check_output
from .models import digits_cnn, digits_mlp
from .terminal import progress_bar

__all__ = [
    "TrainResult", "check_training_result", "train_float", "train_csq", "evaluate", "Examples", "training_examples",
    "RECIPES", "train_recipe", "TrainingRun", "train_factory",
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
    world_size: int = 1  # processes that trained it (torchrun)
    global_batch_size: int = 0  # samples per optimizer step, over all processes

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
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
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

    @property
    def presharded(self) -> bool:
        """A loader whose sampler already gives each process its own part (``DistributedSampler``)."""
        return isinstance(getattr(self.loader, "sampler", None), DistributedSampler)

    def batches(self, batch_size: int, rng: np.random.Generator, epoch: int = 0):
        """Training batches: the arrays shuffled with ``rng``, or the loader's (it shuffles itself)."""
        if self.loader is None:
            yield from _batches(self.x, self.y, batch_size, rng)
            return
        if self.presharded:
            self.loader.sampler.set_epoch(epoch)  # a DistributedSampler reshuffles by epoch number
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
def _accuracy(model: nn.Module, examples: Examples, parallel: Parallel | None = None) -> tuple[float, int]:
    """Top-1 accuracy over ``examples``'s evaluation batches, and the largest batch it used.

    Under torchrun batch ``i`` is evaluated whole on rank ``i % world_size`` (a batch is never cut:
    with dynamic activation scales that would change the result), or every rank evaluates its own
    batches of a ``DistributedSampler`` loader; correct answers and counts are summed over ranks.
    """
    parallel = parallel or Parallel()
    was = model.training
    model.eval()
    correct = seen = largest = 0
    for i, (xb, yb) in enumerate(examples.whole()):
        if not examples.presharded and i % parallel.world_size != parallel.rank:
            continue
        xb, yb = xb.to(parallel.device), yb.to(parallel.device)
        correct += int((model(xb).argmax(1) == yb).sum())
        seen += len(yb)
        largest = max(largest, len(yb))
    model.train(was)
    correct, seen = parallel.sum(correct, seen)
    (largest,) = parallel.max(largest)
    if seen == 0:
        raise BadInput(f"{examples.what}: no examples to evaluate on")
    return correct / seen, int(largest)


def _warn_training_accuracy(used_training_data: bool) -> None:
    if used_training_data:
        warnings.warn("no eval_data given: the accuracy returned is measured on the training data", stacklevel=3)


def _local_batches(examples: Examples, parallel: Parallel, batch_size: int, rng: np.random.Generator, epoch: int):
    """``(inputs, labels, global batch size)`` of this process's part of every global batch.

    Every rank draws the same global batch and keeps its rows of it; a ``DistributedSampler``
    loader's batches are this rank's already. A last global batch smaller than the number of
    processes would leave one without rows (DDP needs every rank in every step): it is skipped.
    """
    first = epoch == 0
    for xb, yb in examples.batches(batch_size, rng, epoch):
        if examples.presharded:
            yield xb, yb, len(yb) * parallel.world_size
            continue
        if first and parallel.distributed:
            _check_same_batch(parallel, yb, examples.what)
            first = False
        if len(yb) >= parallel.world_size:
            yield (*parallel.shard(xb, yb), len(yb))


def _check_same_batch(parallel: Parallel, labels: torch.Tensor, what: str) -> None:
    """Every rank must draw the same global batch, or the shards overlap and miss examples."""
    position = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    fingerprint = torch.stack([torch.tensor(float(len(labels)), dtype=torch.float64),
                               (labels.double().cpu() * position).sum()])
    if any(not torch.equal(f.cpu(), fingerprint) for f in parallel.gather(fingerprint)):
        raise BadInput(f"{what}: the loader gives different batches on different processes; seed torch the same "
                       "on every rank (torch.manual_seed) or give it a DistributedSampler")


def _task_loss(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, global_batch: int, parallel: Parallel,
               mixed_precision: bool) -> torch.Tensor:
    """Cross-entropy of this rank's rows, scaled so that DDP's gradient average is the global batch mean."""
    xb, yb = xb.to(parallel.device, non_blocking=True), yb.to(parallel.device, non_blocking=True)
    with _autocast(parallel.device, mixed_precision):
        logits = net(xb)
    return F.cross_entropy(logits.float(), yb, reduction="sum") * (parallel.world_size / global_batch)


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast of the training forward on CUDA (no loss scaler needed); CPU stays float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_float(model: nn.Module, data, epochs: int, lr: float = 1e-2, batch_size: int = 64,
                seed: int = 0, progress: bool = False, *, eval_data=None, device=None,
                mixed_precision: bool = True) -> float:
    """Plain float training (the starting point ``convert`` quantizes); returns the accuracy.

    ``data``, ``eval_data``, ``device`` and ``mixed_precision`` as for ``train_csq``; under torchrun
    it runs data-parallel like ``train_csq``.
    """
    parallel = Parallel.from_env(device)
    examples = training_examples(data)
    held_out, is_training = evaluation_examples(data, eval_data)
    rng = np.random.default_rng(seed)
    net = parallel.wrap(model.to(parallel.device))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    with progress_bar("float warm-up", enabled=progress and parallel.is_main, total=epochs) as update:
        for epoch in range(epochs):
            model.train()
            for xb, yb, n in _local_batches(examples, parallel, batch_size, rng, epoch):
                opt.zero_grad()
                _task_loss(net, xb, yb, n, parallel, mixed_precision).backward()
                opt.step()
            sched.step()
            update(advance=1)
    _warn_training_accuracy(is_training)
    return _accuracy(model, held_out, parallel)[0]


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
    device: str | torch.device | None = None,
    mixed_precision: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: str | os.PathLike | None = None,
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

    ``device``: ``"cpu"`` (default) or ``"cuda"``; the model moves there and stays there. On CUDA
    the training forward runs under bfloat16 autocast unless ``mixed_precision=False``; evaluation,
    BatchNorm refresh and finalization are float32 everywhere.

    ``checkpoint``: a file the whole training state is written to every ``checkpoint_every``
    epochs and after the last (see ``csqc.checkpoint``); ``resume``: such a file, written by a run
    with the same settings, to continue from. A resumed run ends with the same bits and weights
    as an uninterrupted one (same device and thread count).

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) it runs data-parallel with
    ``DistributedDataParallel``: ``batch_size`` is the global batch, split over the processes
    (see ``csqc.distributed``); a ``DistributedSampler`` loader's batches are per process instead.
    Only rank 0 writes the checkpoint; the accuracy is reduced over all ranks.
    """
    if checkpoint_every < 1:
        raise BadInput(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    parallel = Parallel.from_env(device)
    if checkpoint is not None and parallel.is_main:
        check_output(checkpoint, what="checkpoint")  # refused now, not after the first epochs
    examples = training_examples(data)
    held_out, is_training = evaluation_examples(data, eval_data)
    model.to(parallel.device)
    rng = np.random.default_rng(seed)
    reg = layers.BudgetRegularizer(model, target_bits, reg_strength, allow_layer_pruning=allow_layer_pruning)
    schedule = layers.TemperatureSchedule(epochs, t_max, rounds)
    # Masks train with plain SGD: Adam would normalise away the size weighting of the budget
    # term, and every layer would lose bits at the same pace.
    masks = [m.mask_weight for _, m in layers.csq_layers(model)]
    mask_ids = {id(p) for p in masks}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in mask_ids], lr=lr)
    mask_opt = torch.optim.SGD(masks, lr=mask_lr, momentum=0.9)
    state = {"settings": dict(epochs=epochs, target_bits=target_bits, lr=lr, batch_size=batch_size,
                              reg_strength=reg_strength, mask_lr=mask_lr, t_max=t_max, rounds=rounds, seed=seed,
                              allow_layer_pruning=allow_layer_pruning),
             "model": model, "optimizers": {"weights": opt, "masks": mask_opt}, "rng": rng}
    done = load_checkpoint(resume, **state) if resume is not None else 0
    net = parallel.wrap(model)  # after resuming: DDP starts every rank from rank 0's parameters
    with progress_bar("CSQ bits", enabled=progress and parallel.is_main, total=epochs) as update:
        update(advance=done)
        for epoch in range(done, epochs):
            layers.set_temperature(model, schedule(epoch))
            model.train()
            for xb, yb, n in _local_batches(examples, parallel, batch_size, rng, epoch):
                opt.zero_grad()
                mask_opt.zero_grad()
                loss = _task_loss(net, xb, yb, n, parallel, mixed_precision) + reg()
                loss.backward()
                opt.step()
                mask_opt.step()
                _keep_layers_alive(reg, mask_opt)
            finished = epoch + 1
            if checkpoint is not None and parallel.is_main and (finished % checkpoint_every == 0 or finished == epochs):
                save_checkpoint(checkpoint, epoch=finished, **state)
            stats = {"T": schedule(epoch), "avg_bits": layers.average_bits(model)}
            if on_epoch:
                on_epoch(epoch, stats)
            update(advance=1, info=f"T={stats['T']:.0f} bits={stats['avg_bits']:.2f}")
    dropped = reg.enforce()
    if dropped:
        log.info("budget enforcement dropped %d bit positions", len(dropped))
    _refresh_batchnorm(model, examples, batch_size, parallel)
    layers.finalize(model)
    _warn_training_accuracy(is_training)
    return _accuracy(model, held_out, parallel)[0], dropped


@torch.no_grad()
def _keep_layers_alive(reg: layers.BudgetRegularizer, mask_opt: torch.optim.SGD) -> None:
    """Project the masks back to one active bit per layer, and drop the momentum of a raised
    logit: left in place, it would push the logit under the floor again on every step."""
    for layer_index, b in reg.keep_layers_alive():
        state = mask_opt.state.get(reg.layers[layer_index].mask_weight, {})
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"][b] = 0.0


@torch.no_grad()
def _refresh_batchnorm(model: nn.Module, examples: Examples, batch_size: int, parallel: Parallel) -> None:
    """Re-estimate BatchNorm statistics with hardened bits (soft-gate statistics drift).

    Every rank passes over all the training data (the same statistics everywhere, as in one
    process), except with a ``DistributedSampler`` loader: then each its own part, averaged.
    """
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
        model(xb.to(parallel.device))
    if examples.presharded:
        for bn in bns:
            parallel.average_(bn.running_mean)
            parallel.average_(bn.running_var)
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


@dataclass(frozen=True)
class TrainingRun:
    """How ``train_recipe`` / ``train_factory`` run: where, and what they checkpoint or resume from."""

    device: str | None = None
    mixed_precision: bool = True
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 1
    resume: str | os.PathLike | None = None

    def csq_options(self) -> dict:
        return dict(device=self.device, mixed_precision=self.mixed_precision, checkpoint=self.checkpoint,
                    checkpoint_every=self.checkpoint_every, resume=self.resume)


def _check_budget(target_bits: float, epochs: int | None) -> None:
    if not 0 < target_bits <= 8:
        raise BadInput(f"--target-bits must be in (0, 8], got {target_bits}")
    if epochs is not None and epochs < 1:
        raise BadInput(f"--epochs must be at least 1, got {epochs}")


def train_recipe(
    name: str,
    *,
    target_bits: float = 3.0,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    run: TrainingRun = TrainingRun(),
) -> tuple[nn.Module, TrainResult, torch.Tensor]:
    """Run a named recipe: float warm-up, ``convert``, CSQ training, finalization.

    Returns the finalized model (on the CPU), its report and an example input (batch 1) for
    ``csqc.save``. The report may describe a collapsed model: ``result.problem()`` /
    ``check_training_result``. A resumed run repeats the (deterministic) float warm-up, then
    continues the CSQ training from the checkpoint.
    """
    if name not in RECIPES:
        raise BadInput(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    _check_budget(target_bits, epochs)
    recipe = RECIPES[name]
    torch.manual_seed(seed)
    start = time.perf_counter()
    data = load_digits_split(image=recipe.image, seed=0)
    model = recipe.build()
    float_acc = train_float(model, data, recipe.float_epochs, recipe.lr, seed=seed, progress=progress,
                            device=run.device, mixed_precision=run.mixed_precision)
    layers.convert(model, n_bits=recipe.n_bits, act_bits=recipe.act_bits)
    acc, dropped = train_csq(
        model, data, epochs=epochs or recipe.csq_epochs, target_bits=target_bits,
        lr=recipe.lr, reg_strength=recipe.reg_strength, seed=seed,
        allow_layer_pruning=recipe.allow_layer_pruning, progress=progress, **run.csq_options(),
    )
    result = _result(name, model, acc, float_acc, target_bits, start, dropped, recipe.allow_layer_pruning,
                     eval_batch=len(data.x_test), run=run)  # a Split's test arrays are evaluated in one batch
    example = torch.from_numpy(data.x_test[:1])
    return model.cpu(), result, example


def _result(name: str, model: nn.Module, acc: float, float_acc: float, target_bits: float, start: float,
            dropped: list, allow_layer_pruning: bool, *, eval_batch: int, run: TrainingRun,
            batch_size: int = 64) -> TrainResult:
    parallel = Parallel.from_env(run.device)
    return TrainResult(
        recipe=name, test_accuracy=acc, float_accuracy=float_acc,
        avg_bits=layers.average_bits(model), target_bits=target_bits,
        seconds=time.perf_counter() - start, layers=layers.layer_report(model),
        dropped_bits=len(dropped), allow_layer_pruning=allow_layer_pruning,
        eval_batch=eval_batch, world_size=parallel.world_size, global_batch_size=batch_size,
    )


def train_factory(
    spec: str,
    *,
    target_bits: float = 3.0,
    epochs: int = 10,
    float_epochs: int = 0,
    n_bits: int = 8,
    act_bits: int | None = 4,
    seed: int = 0,
    progress: bool = False,
    run: TrainingRun = TrainingRun(),
) -> tuple[nn.Module, TrainResult, torch.Tensor]:
    """Train on the user's data: ``spec`` names a factory (``module:callable``, imported from the
    current folder or PYTHONPATH: this runs user code) returning ``(train_loader, eval_loader,
    float_model)``. Optional float warm-up (``float_epochs``), then ``convert`` and CSQ training.

    The loaders' batch size is the global batch (under torchrun each process takes its rows of
    every batch) unless they use a ``DistributedSampler``. Returns what ``train_recipe`` does; the
    example input is the first evaluation example.
    """
    from .reference import resolve_factory

    _check_budget(target_bits, epochs)
    if float_epochs < 0:
        raise BadInput(f"--float-epochs must be at least 0, got {float_epochs}")
    torch.manual_seed(seed)  # the same on every rank: shuffling loaders draw the same batches
    start = time.perf_counter()
    factory = resolve_factory(spec, what="--data")
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 3 and isinstance(made[2], nn.Module)):
        raise BadInput(f"--data {spec} must return (train_loader, eval_loader, float_model), "
                       f"got {type(made).__name__}")
    train_loader, eval_loader, model = made
    held_out = training_examples(eval_loader, "--data eval loader")
    parallel = Parallel.from_env(run.device)
    model.to(parallel.device)
    if float_epochs:
        float_acc = train_float(model, train_loader, float_epochs, seed=seed, progress=progress,
                                eval_data=eval_loader, device=run.device, mixed_precision=run.mixed_precision)
    else:  # the factory's model is the trained float model: its accuracy is the collapse check's reference
        float_acc = _accuracy(model, held_out, parallel)[0]
    layers.convert(model, n_bits=n_bits, act_bits=act_bits)
    acc, dropped = train_csq(model, train_loader, eval_data=eval_loader, epochs=epochs, target_bits=target_bits,
                             seed=seed, progress=progress, **run.csq_options())
    example, _ = next(held_out.whole())
    result = _result(spec, model, acc, float_acc, target_bits, start, dropped, False,
                     eval_batch=_accuracy_batch(held_out), run=run, batch_size=_global_batch(train_loader))
    return model.cpu(), result, example[:1].cpu()


def _accuracy_batch(examples: Examples) -> int:
    return max(len(y) for _, y in examples.whole())


def _global_batch(loader) -> int:
    """Samples per optimizer step over all processes: the loader's batch, times the processes if
    its sampler gives each its own part."""
    batch = getattr(loader, "batch_size", None) or 0
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        batch *= Parallel.from_env().world_size
    return batch
