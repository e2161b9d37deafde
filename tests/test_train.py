"""Digits recipes: accuracy and bit budget (the acceptance bar of the foundation issue)."""
import pytest

import csqc


@pytest.mark.parametrize("recipe", ["digits-mlp", "digits-cnn"])
def test_recipe_reaches_accuracy_within_budget_with_mixed_precision(trained, recipe):
    model, result, _, path = trained(recipe)
    assert result.test_accuracy >= 0.95
    assert result.avg_bits <= 3.0
    allocations = {tuple(l["active_bits"]) for l in result.layers}
    assert len(allocations) > 1, "every layer got the same bits: no mixed precision"
    assert result.seconds < 180
    # the saved file reproduces the reported accuracy
    from csqc.data import load_digits_split

    data = load_digits_split(image=recipe == "digits-cnn")
    loaded = csqc.load(path)
    acc = float((loaded(data.x_test).argmax(1).numpy() == data.y_test).mean())
    assert acc == pytest.approx(result.test_accuracy)


def test_unknown_recipe_is_bad_input():
    with pytest.raises(csqc.BadInput, match="unknown recipe"):
        csqc.train_recipe("imagenet-vit")
