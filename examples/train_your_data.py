"""Train a CSQ model on your own images: a ``csqc train --data`` factory (CIFAR-style, 32x32 RGB).

Your data, in the usual image-folder layout (one folder per class, any image files PIL reads):

    my_data/train/airplane/0001.png  my_data/train/cat/...   my_data/test/airplane/...

    CSQC_DATA=my_data csqc train --data train_your_data:image_folder --float-epochs 30 --epochs 60 -o cnn.pt
    CSQC_DATA=my_data torchrun --nproc_per_node 4 -m csqc train --data train_your_data:image_folder \\
        --float-epochs 30 --epochs 60 --checkpoint run.ckpt --checkpoint-every 5 -o cnn.pt

(run from this folder, or put it on PYTHONPATH: ``--data`` imports the module and runs it; that is
the opt-in to running your code.) Under torchrun each process takes its rows of every batch of 128;
for a large data set give the loaders a ``DistributedSampler`` instead, and each process reads only
its part. ``synthetic`` is the same recipe on a tiny generated set (what CI runs):

    csqc train --data train_your_data:synthetic --float-epochs 3 --epochs 2 -o tiny.pt
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IMAGE_SIZE = 32
BATCH_SIZE = 128
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp"}


def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    """Four 3x3 convolutions with BatchNorm and two poolings, then a linear classifier (3x32x32 in)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def _read_folder(folder: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under ``folder/<class>/`` as a normalised 3x32x32 float tensor, with its label."""
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((folder / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(file) as im:
                rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
            images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    if not images:
        raise SystemExit(f"{folder}: no images in its class folders")
    x = torch.from_numpy(np.stack(images))
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / std, torch.tensor(labels)


def image_folder(root: str | None = None):
    """``(train loader, test loader, float CNN)`` from ``$CSQC_DATA/{train,test}/<class>/<images>``."""
    root = Path(root or os.environ.get("CSQC_DATA", "data"))
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise SystemExit(f"{root}: expected train/ and test/ folders with one folder per class (set CSQC_DATA)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    train, test = _read_folder(root / "train", classes), _read_folder(root / "test", classes)
    return _loaders(train, test, len(classes))


def synthetic(n_train: int = 192, n_test: int = 64, classes: int = 4, size: int = 16, seed: int = 0):
    """A tiny learnable stand-in for ``image_folder`` (smaller images, for speed): each class is a
    fixed random pattern under noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, 3, size, size, generator=g)

    def draw(n):
        y = torch.arange(n) % classes
        return prototypes[y] + 0.8 * torch.randn(n, 3, size, size, generator=g), y

    return _loaders(draw(n_train), draw(n_test), classes, width=8, batch_size=64)


def _loaders(train, test, num_classes: int, width: int = 32, batch_size: int = BATCH_SIZE):
    # shuffle draws from torch's global generator: csqc seeds it the same on every process
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(*test), batch_size=batch_size)
    return train_loader, test_loader, small_cnn(num_classes, width)
