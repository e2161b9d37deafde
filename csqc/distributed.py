"""Data-parallel training under ``torchrun``: one process per device, ``DistributedDataParallel``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``Parallel.from_env`` reads them
and joins the process group (gloo on CPU, NCCL on CUDA). Outside ``torchrun`` it is a single
process and every method below is the identity, so the training loop reads the same either way.

How a global batch is split: every rank sees the same global batch (the same seed shuffles the
same permutation) and keeps rows ``rank, rank + world_size, ...`` of it. Each rank scales its
summed loss by ``world_size / global batch``, so DDP's gradient average is exactly the mean over
the global batch. Mask logits, the budget regularizer and the temperature are then the same on
every rank: every rank starts from rank 0's parameters (DDP broadcasts them) and applies the same
averaged gradient, and ``keep_layers_alive`` / ``enforce`` are deterministic functions of them.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn

from .errors import BadInput

__all__ = ["Parallel", "under_torchrun"]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_WORKER_GRACE_S = 0.2


def under_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (or anything setting its variables)."""
    return all(v in os.environ for v in _TORCHRUN_VARIABLES)


def _leave_process_group() -> None:
    """Leave the group while Python still runs, and give gloo's worker threads time to finish.

    A gloo worker frees a collective's tensors after the caller has its result, and a tensor
    made in Python needs the GIL to die. When the last collective comes just before the process
    exits (a rank with nothing left to do), that free can fall into interpreter shutdown, where a
    thread asking for the GIL is killed, and the process aborts ("terminate called without an
    active exception", pytorch/pytorch#190489) though its work is done. Sleeping releases the
    GIL to that thread; destroying the group stops new work.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(_WORKER_GRACE_S)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


@dataclass(frozen=True)
class Parallel:
    """Where this process trains: its rank among ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> "Parallel":
        """A single process on ``device`` (default cpu), or, under torchrun, this rank's share.

        Under torchrun a cuda device becomes ``cuda:LOCAL_RANK`` with NCCL; cpu uses gloo.
        """
        device = torch.device(device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput("device cuda: PyTorch sees no CUDA device here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise BadInput(f"device {device}: csqc trains on cpu or cuda")
        if not under_torchrun():
            return cls(device=device)
        rank, world_size, local_rank = (_env_int(v) for v in _TORCHRUN_VARIABLES)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
            atexit.register(_leave_process_group)
        return cls(rank=rank, world_size=world_size, device=device)

    @property
    def is_main(self) -> bool:
        """Only this process writes files and prints reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP (its parameters and buffers now rank 0's), or ``model`` itself."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch (every ``world_size``-th, starting at ``rank``)."""
        if not self.distributed:
            return x, y
        return x[self.rank :: self.world_size], y[self.rank :: self.world_size]

    def sum(self, *numbers: float) -> list[float]:
        """``numbers`` summed over all ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return list(numbers)
        t = torch.tensor(numbers, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` from every rank (rank order), on this rank's device: to check they agree."""
        if not self.distributed:
            return [t]
        t = t.detach().to(self._comm_device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return out

    def max(self, *numbers: float) -> list[float]:
        """The largest of ``numbers`` over all ranks, element by element."""
        if not self.distributed:
            return list(numbers)
        t = torch.tensor(numbers, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    @torch.no_grad()
    def average_(self, t: torch.Tensor) -> None:
        """Replace ``t`` in place by its mean over all ranks."""
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")
