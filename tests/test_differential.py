"""Random CSQ models through compile and verify (``csqc.differential``): a short seeded budget.

``python -m csqc.differential --cases 300`` runs the long one (it found the narrow-input conv
staging; the CUDA one-word weight tile, float convs, one-position attention and word-cutting
weight chunks;
calibrating an RNN's constant initial state; verifying a weight-only RNN per layer).
"""
import dataclasses

import pytest

from csqc import differential

# seeds whose drawn models cover convs, branches (squeeze-excitation, concatenation, pools),
# image-to-image decoders (a stride-3 transposed conv with a BatchNorm, a 1x1 latent input), 1-D
# convolutions over sequences, a reference-style net (its own quantizers, one moved below a max
# pool by sink_quantize), an MLP, an LSTM, a GRU and a Transformer encoder layer, on llvm and
# onnx, with dynamic and calibrated scales, symmetric, zero-point and float (weight-only)
# activations, 9- to 12-bit weights
SEEDS = [0, 1, 6, 7, 10, 12, 13, 14, 17, 158, 171, 197]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_models_verify_exactly_or_are_refused_by_name(seed, tmp_path):
    outcome = differential.run_case(seed, tmp_path)
    assert outcome is not None
    assert outcome.status in ("exact", "drift", "refused"), f"{outcome.case.describe()}\n{outcome.detail}"
    assert not list(tmp_path.iterdir())  # the case's files are removed


def test_the_seeds_cover_every_kind_and_both_scales():
    cases = [differential.draw_case(seed)[0] for seed in SEEDS]
    assert {c.kind for c in cases} == {"conv", "branches", "decoder", "sequence", "reference", "mlp", "lstm", "gru",
                                       "encoder"}
    assert {c.calibrated for c in cases} == {True, False} and {c.target for c in cases} == {"llvm", "onnx"}
    assert {c.symmetric for c in cases} == {True, False}
    assert any(c.act_bits is None for c in cases) and any(c.n_bits > 8 for c in cases)


def test_the_reference_seed_moves_a_quantizer_below_a_pool(tmp_path):
    """Its model quantizes, then pools, and a layer reads the pool: the sink_quantize rewrite."""
    import random

    import csqc
    from csqc.passes import get_pass, run_passes

    (seed,) = [s for s in SEEDS if differential.draw_case(s)[0].kind == "reference"]
    case, net = differential.draw_case(seed)
    model, example = differential._quantized(case, net, random.Random(seed ^ 0x5EED))
    graph = csqc.capture(csqc.load(csqc.save(model, tmp_path / "m.pt", example)))
    folded, _ = run_passes(graph, ["sink_layout_ops", "fold_bn", "fold_scales"])
    assert case.act_bits is None and any(n.op == "quantize" for n in graph.nodes)  # the model's own quantizers
    assert get_pass("sink_quantize").run(folded).changed


def test_a_seed_draws_the_same_case():
    first, again = differential.draw_case(7), differential.draw_case(7)
    assert first[0] == again[0] and str(first[1]) == str(again[1])


def test_cuda_cases_compile(tmp_path):
    """The CUDA target compiles (no GPU here to run it): a drawn conv net with zero-point
    activations, which it refused before it had an asymmetric quantizer."""
    seed = next(s for s in range(100) if (c := differential.draw_case(s, "cuda")) and c[0].kind == "branches"
                and not c[0].symmetric)
    outcome = differential.run_case(seed, tmp_path, "cuda")
    assert outcome.status == "compiled", outcome.detail


def test_only_pytorchs_pair_of_a_calibrated_case_may_drift():
    """A calibrated model is another model than PyTorch's dynamic-scale one: its top-1 may drift
    (counted apart); any other failed pair, an uncalibrated PyTorch pair or inexact
    accumulators are findings."""
    from types import SimpleNamespace

    def report(failed, exact=True):
        pairs = [SimpleNamespace(a=a, b=b, ok=(a, b) not in failed) for a, b in
                 [("pytorch", "interpreter:integer"), ("interpreter:integer", "onnxruntime")]]
        return SimpleNamespace(pairs=pairs, accumulators_exact=exact)

    drawn = differential.draw_case(1)[0]
    calibrated, dynamic = (dataclasses.replace(drawn, calibrated=flag) for flag in (True, False))
    torch_pair = {("pytorch", "interpreter:integer")}
    assert differential._status(calibrated, report(set())) == "exact"
    assert differential._status(calibrated, report(torch_pair)) == "drift"
    assert differential._status(dynamic, report(torch_pair)) == "mismatch"
    assert differential._status(calibrated, report({("interpreter:integer", "onnxruntime")})) == "mismatch"
    assert differential._status(calibrated, report(set(), exact=False)) == "mismatch"
