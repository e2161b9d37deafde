"""Bring your own float model: convert it to CSQ, train its bits under a budget, compile, verify.

    python examples/convert_your_model.py

Uses scikit-learn's digits so it runs offline in about a minute on 2 cores.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import csqc
from csqc.data import load_digits_split
from csqc.errors import CsqcError
from csqc.outputs import check_output
from csqc.train import train_float

MODEL_FILE, ARTIFACT = "my-mlp.pt", "my-mlp.llvm.so"


def main() -> None:
    for path in (MODEL_FILE, ARTIFACT):  # fail now, not after a minute of training
        check_output(path)
    torch.manual_seed(0)
    data = load_digits_split(image=False)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    print(f"float accuracy: {train_float(model, data, epochs=20):.2%}")

    csqc.convert(model, n_bits=8, act_bits=4)  # every Linear becomes a CSQLinear, all 8 bits active
    accuracy, _ = csqc.train_csq(model, data, epochs=40, target_bits=2.5)
    print(f"CSQ accuracy {accuracy:.2%} at {csqc.layers.average_bits(model):.2f} average bits")

    csqc.save(model, MODEL_FILE, torch.from_numpy(data.x_test[:1]))
    result = csqc.compile(MODEL_FILE, target="llvm", output=ARTIFACT)
    print("kernels:", result.report["kernels"])
    report = csqc.verify(csqc.load(MODEL_FILE), artifact=ARTIFACT, dataset="digits")
    print("verify ok:", report.ok)


if __name__ == "__main__":
    try:
        main()
    except CsqcError as e:  # a one-line error, as the csqc command gives
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
