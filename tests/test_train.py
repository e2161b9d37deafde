"""Digits recipes: accuracy and bit budget (the acceptance bar of the foundation issue)."""
import pytest

import csqc


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_recipe_reaches_accuracy_within_budget_with_mixed_precision(trained, recipe):
    model, result, _, path = trained(recipe)
    assert result.test_accuracy >= 0.95
    assert result.avg_bits <= 3.0
    assert result.problem() is None and all(l["active_bits"] for l in result.layers)
    allocations = {tuple(l["active_bits"]) for l in result.layers}
    assert len(allocations) > 1, "every layer got the same bits: no mixed precision"
    # the saved file reproduces the reported accuracy
    from csqc.data import load_digits_split

    data = load_digits_split(image=recipe == "digits-cnn")
    loaded = csqc.load(path)
    acc = float((loaded(data.x_test).argmax(1).numpy() == data.y_test).mean())
    assert acc == pytest.approx(result.test_accuracy)


def test_unknown_recipe_is_bad_input():
    with pytest.raises(csqc.BadInput, match="unknown recipe"):
        csqc.train_recipe("imagenet-vit")


def _result(accuracy, active_bits, allow_layer_pruning=False):
    rows = [{"name": "fc1", "active_bits": [7, 1]}, {"name": "fc2", "active_bits": active_bits}]
    from csqc.train import TrainResult

    return TrainResult(
        recipe="digits-mlp", test_accuracy=accuracy, float_accuracy=0.97, avg_bits=2.0, target_bits=3.0,
        seconds=1.0, layers=rows, allow_layer_pruning=allow_layer_pruning)


def test_a_usable_result_has_no_problem():
    assert _result(0.95, [7]).problem() is None
    assert csqc.check_training_result(_result(0.88, [0])).test_accuracy == 0.88  # 9 points below: kept


@pytest.mark.parametrize("accuracy, active_bits, allow, reason", [
    (0.96, [], False, "layer(s) fc2 kept no bit position"),
    (0.10, [3], False, "test accuracy 10.00% is more than 10% below the float warm-up's 97.00%"),
    (0.10, [], True, "test accuracy 10.00%"),  # pruning allowed: the accuracy still has to hold
])
def test_a_collapsed_result_is_a_training_failure(accuracy, active_bits, allow, reason):
    result = _result(accuracy, active_bits, allow)
    assert reason in result.problem() and "\n" not in result.problem()
    with pytest.raises(csqc.TrainingFailed, match="training collapsed") as e:
        csqc.check_training_result(result)
    assert e.value.exit_code == 1 and e.value.details["problem"] == result.problem()
    assert _result(0.96, [], allow_layer_pruning=True).problem() is None


# Seeds x thread counts: the recipes must not depend on one machine's float paths. Seed 0 with
# 2 threads is the session fixture's run (conftest's ``trained``, digits-cnn and digits-mlp).
# digits-cnn (conv3 died on an Intel Xeon) gets seeds 1 to 3, including 1 and 3, where the old
# training killed conv3 on AMD EPYC too; digits-mlp seed 1. One thread each: two threads beside
# the other test worker took 35 s where one takes 14 (about 1 minute in all on 2 cores).
SWEEP = [("digits-cnn", 1, 1), ("digits-cnn", 2, 1), ("digits-cnn", 3, 1), ("digits-mlp", 1, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, seed, threads", SWEEP)
def test_recipe_is_robust_across_seeds_and_thread_counts(recipe, seed, threads):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, result, _ = csqc.train_recipe(recipe, seed=seed)
    finally:
        torch.set_num_threads(before)
    assert result.problem() is None
    assert all(l["active_bits"] for l in result.layers)
    assert result.test_accuracy >= 0.95 and result.avg_bits <= 3.0, (result.test_accuracy, result.avg_bits)
