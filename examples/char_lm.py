"""A character-level LSTM language model, CSQ-quantized and compiled for the CPU.

    python examples/char_lm.py            # ~2-4 minutes on 2 cores
    python examples/char_lm.py --quick    # a smoke run (< 60 s)

Steps: read a few MB of the Python standard library's own source files (on every machine, no
download), train a float LSTM LM (one-hot characters -> nn.LSTM -> nn.Linear), convert it
with CSQ (``csqc.convert``: 4-bit weights, 8-bit activations; the LSTM becomes a ``CSQLSTM``
whose projections are CSQ layers), fine-tune the bits under a bit budget, and report the
validation perplexity of both. Then save the one-step model ``(x_t, h, c) -> (logits, h', c')``,
compile it for llvm, verify it against PyTorch, the interpreter and ONNX Runtime on real
states, and time one step at batch 1 against ONNX Runtime fp32 and int8.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import csqc
from csqc import layers
from csqc.bench import bench
from csqc.errors import CsqcError
from csqc.models.char_lm import CHARS, VOCAB, CharLM, CharLMStep
from csqc.outputs import check_output, make_output_folder

_LUT = np.full(256, len(CHARS), np.int64)
_LUT[[ord(c) for c in CHARS]] = np.arange(len(CHARS))


def load_text(n_bytes: int) -> np.ndarray:
    """Character ids of the first ``n_bytes`` of the standard library's ``*.py`` files (sorted)."""
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    raw = np.frombuffer(b"".join(chunks)[:n_bytes], np.uint8)
    return _LUT[raw]


def one_hot(ids: torch.Tensor) -> torch.Tensor:
    return F.one_hot(ids, VOCAB).float()


def batches(ids: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        window = torch.from_numpy(np.stack([ids[s : s + seq + 1] for s in starts]))
        yield one_hot(window[:, :-1]), window[:, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, ids: np.ndarray, seq: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    x = torch.from_numpy(ids[: n * seq].reshape(n, seq))
    y = torch.from_numpy(ids[1 : n * seq + 1].reshape(n, seq))
    loss = F.cross_entropy(model(one_hot(x)).reshape(-1, VOCAB), y.reshape(-1))
    return math.exp(float(loss))


def train_float(model: nn.Module, data, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"  float step {step:4d}  loss {loss.item():.3f}")


def train_csq(model: nn.Module, data, steps: int, lr: float, target_bits: float) -> None:
    """CSQ fine-tune: temperature schedule over the steps and the budget regularizer; after 70%
    of the steps the budget is enforced (weakest bits dropped) and the masks frozen, so the
    remaining steps let the kept bits adapt; then finalize."""
    reg = layers.BudgetRegularizer(model, target_bits, strength=2.0)
    schedule = layers.TemperatureSchedule(steps, t_max=200.0)
    masks = [m.mask_weight for _, m in layers.csq_layers(model)]
    mask_ids = {id(p) for p in masks}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in mask_ids], lr=lr)
    mask_opt = torch.optim.SGD(masks, lr=0.05, momentum=0.9)
    model.train()
    enforce_at = int(0.7 * steps)
    for step in range(steps):
        if step == enforce_at:
            reg.enforce()
            for mask in masks:
                mask.requires_grad_(False)
        layers.set_temperature(model, schedule(step))
        x, y = next(data)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        mask_opt.zero_grad()
        (loss + reg() if step < enforce_at else loss).backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        if step < enforce_at:
            mask_opt.step()
        if step % 25 == 0:
            print(f"  csq step {step:4d}  loss {loss.item():.3f}  T {schedule(step):6.1f}  "
                  f"bits {layers.average_bits(model):.2f}")
    reg.enforce()
    layers.finalize(model)


@torch.no_grad()
def real_states(step_model: nn.Module, ids: np.ndarray, hidden: int, samples: int):
    """``samples`` (x_t, h, c) triples met while reading text: realistic verification inputs."""
    h, c = torch.zeros(1, hidden), torch.zeros(1, hidden)
    xs, hs, cs = [], [], []
    for t in range(samples * 4):
        x = one_hot(torch.from_numpy(ids[t : t + 1]))
        if t % 4 == 3:
            xs.append(x[0].numpy()), hs.append(h[0].numpy()), cs.append(c[0].numpy())
        _, h, c = step_model(x, h, c)
    return [np.stack(a).astype(np.float32) for a in (xs, hs, cs)]


def _outputs(out: str | None) -> tuple[str, str]:
    """(model file, artifact) in ``out`` (created if missing) or a temporary folder, checked writable."""
    folder = make_output_folder(out, what="--out") if out else tempfile.mkdtemp(prefix="char_lm_")
    model_file, artifact = (os.path.join(folder, name) for name in ("char_lm_step.pt", "char_lm_step.llvm.so"))
    for path in (model_file, artifact):
        check_output(path)
    return model_file, artifact


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and step counts (a smoke test)")
    p.add_argument("--hidden", type=int, default=None, help="LSTM width (default 256; 64 with --quick)")
    p.add_argument("--bytes", type=int, default=None, help="text to read (default 3 MB)")
    p.add_argument("--float-steps", type=int, default=None)
    p.add_argument("--csq-steps", type=int, default=None)
    p.add_argument("--n-bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--target-bits", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None,
                   help="folder for char_lm_step.pt / char_lm_step.llvm.so, created if missing (default: a temporary one)")
    args = p.parse_args(argv)
    model_file, artifact = _outputs(args.out)  # before minutes of training, not after
    quick = args.quick
    hidden = args.hidden or (64 if quick else 256)
    n_bytes = args.bytes or (200_000 if quick else 3_000_000)
    float_steps = args.float_steps if args.float_steps is not None else (30 if quick else 400)
    csq_steps = args.csq_steps if args.csq_steps is not None else (10 if quick else 150)
    seq, batch = (32, 16) if quick else (64, 64)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()

    ids = load_text(n_bytes)
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    print(f"text: {len(ids)} characters from the standard library, vocabulary {VOCAB}")
    data = batches(train_ids, seq, batch, rng)

    model = CharLM(hidden)
    train_float(model, data, float_steps, lr=3e-3)
    ppl_float = perplexity(model, val_ids, 128, 16 if quick else 64)
    print(f"float LSTM (hidden {hidden}): validation perplexity {ppl_float:.3f}  [{time.perf_counter() - t0:.0f} s]")

    csqc.convert(model, n_bits=args.n_bits, act_bits=args.act_bits, quantize_first_input=True)
    ppl_init = perplexity(model, val_ids, 128, 16 if quick else 64)
    print(f"converted (soft bits, before fine-tuning): perplexity {ppl_init:.3f}")
    train_csq(model, data, csq_steps, lr=1e-3, target_bits=args.target_bits)
    ppl_csq = perplexity(model, val_ids, 128, 16 if quick else 64)
    print(f"CSQ LSTM ({args.n_bits}-bit weights, {layers.average_bits(model):.2f} bits kept on average, "
          f"{args.act_bits}-bit activations): validation perplexity {ppl_csq:.3f}  [{time.perf_counter() - t0:.0f} s]")

    step_model = CharLMStep(model).eval()
    example = (torch.zeros(1, VOCAB), torch.zeros(1, hidden), torch.zeros(1, hidden))
    path = csqc.save(step_model, model_file, example, metadata={"recipe": "char-lm-step"})
    m = csqc.load(path)
    csqc.compile(m, "llvm", artifact)
    inputs = real_states(step_model, val_ids, hidden, 8 if quick else 32)
    report = csqc.verify(m, inputs=inputs, artifact=artifact)
    print(f"verify: ok={report.ok} accumulators_exact={report.accumulators_exact} runtimes={report.runtimes}")
    for pair in report.pairs:
        print(f"  {pair.a} -> {pair.b}: max abs error {pair.max_abs_error:.2e}  ok={pair.ok}")

    result = bench(path, artifact=artifact, threads=args.threads, rounds=5 if quick else 15)
    print(f"one step at batch 1, {args.threads} threads (median us; ratio = baseline / csqc):")
    ratios = result.ratios()
    for r in result.results:
        ratio = f"  x{ratios[r.runtime]:.2f}" if r.runtime in ratios else ""
        print(f"  {r.runtime:28s} {r.median_us:9.1f} us  {r.weight_bytes / 1024:8.1f} KiB{ratio}")
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {os.path.dirname(artifact)}")
    return {"ppl_float": ppl_float, "ppl_csq": ppl_csq, "verify_ok": report.ok,
            "accumulators_exact": report.accumulators_exact, "ratios": ratios, "artifact": artifact}


if __name__ == "__main__":
    try:
        main()
    except CsqcError as e:  # a one-line error, as the csqc command gives
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
