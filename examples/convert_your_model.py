"""Bring your own float model: convert it to CSQ, train its bits under a budget, compile, verify.

    python examples/convert_your_model.py

Uses scikit-learn's digits so it runs offline in about two minutes on 2 cores (progress bars on
stderr when it is a terminal).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import csqc
from csqc.data import load_digits_split
from csqc.errors import CsqcError
from csqc.outputs import check_output
from csqc.terminal import progress_bar, progress_wanted
from csqc.train import train_float

MODEL_FILE, ARTIFACT = "my-mlp.pt", "my-mlp.llvm.so"


def main() -> None:
    for path in (MODEL_FILE, ARTIFACT):  # fail now, not after a minute of training
        check_output(path)
    show = progress_wanted(as_json=False)
    torch.manual_seed(0)
    data = load_digits_split(image=False)  # a Split; a DataLoader or an (x, y) pair works too
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    print(f"float accuracy: {train_float(model, data, epochs=20, progress=show):.2%}")

    # every Linear becomes a CSQLinear, all 8 bits active; the example input finds the first layer
    # (whose input stays float) by execution order, and the report says what stayed float and why
    csqc.convert(model, n_bits=8, act_bits=4, example_inputs=torch.from_numpy(data.x_test[:1]))
    print(csqc.conversion_report(model).summary())
    accuracy, _ = csqc.train_csq(model, data, epochs=40, target_bits=2.5, progress=show)
    print(f"CSQ accuracy {accuracy:.2%} (test split in one batch of {len(data.x_test)}) "
          f"at {csqc.layers.average_bits(model):.2f} average bits")

    csqc.save(model, MODEL_FILE, torch.from_numpy(data.x_test[:1]))
    with progress_bar("compiling for llvm", enabled=show) as update:
        result = csqc.compile(MODEL_FILE, target="llvm", output=ARTIFACT,
                              on_layer=lambda name: update(advance=1, info=name))
    print("kernels:", result.report["kernels"])
    with progress_bar("verify: samples checked", enabled=show) as update:
        report = csqc.verify(csqc.load(MODEL_FILE), artifact=ARTIFACT, dataset="digits",
                             on_batch=lambda done, total: update(completed=done, total=total))
    print(f"verify ok: {report.ok}; accuracy " + ", ".join(f"{k} {v:.2%}" for k, v in report.accuracy.items())
          + f" (batches of {report.batch})")


if __name__ == "__main__":
    try:
        main()
    except CsqcError as e:  # a one-line error, as the csqc command gives
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
