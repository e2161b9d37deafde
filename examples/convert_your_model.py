"""Bring your own float model: convert it to CSQ, train its bits under a budget, compile, verify.

    python examples/convert_your_model.py

Uses scikit-learn's digits so it runs offline in about a minute on 2 cores.
"""
from __future__ import annotations

import torch
from torch import nn

import csqc
from csqc.data import load_digits_split
from csqc.train import train_float


def main() -> None:
    torch.manual_seed(0)
    data = load_digits_split(image=False)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    print(f"float accuracy: {train_float(model, data, epochs=20):.2%}")

    csqc.convert(model, n_bits=8, act_bits=4)  # every Linear becomes a CSQLinear, all 8 bits active
    accuracy, _ = csqc.train_csq(model, data, epochs=40, target_bits=2.5)
    print(f"CSQ accuracy {accuracy:.2%} at {csqc.layers.average_bits(model):.2f} average bits")

    csqc.save(model, "my-mlp.pt", torch.from_numpy(data.x_test[:1]))
    result = csqc.compile("my-mlp.pt", target="llvm", output="my-mlp.so")
    print("kernels:", result.report["kernels"])
    report = csqc.verify(csqc.load("my-mlp.pt"), artifact="my-mlp.so", dataset="digits")
    print("verify ok:", report.ok)


if __name__ == "__main__":
    main()
