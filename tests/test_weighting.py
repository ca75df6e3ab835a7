import io

import pytest
import torch

from mmpt.errors import MmptError
from mmpt.weighting import build_weighting

SIZES = {"pathmnist": 89996, "breastmnist": 546, "retinamnist": 1080}


def test_size_weighting_is_smallest_split_over_each_split():
    weights = build_weighting("size", SIZES).weights()
    assert weights["breastmnist"] == 1.0
    assert weights["retinamnist"] == pytest.approx(546 / 1080)
    assert weights["pathmnist"] == pytest.approx(546 / 89996)


@pytest.mark.parametrize("name", ["none", "size"])
def test_static_weighting_backpropagates_the_weighted_sum(name):
    weighting = build_weighting(name, SIZES)
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    losses = {task: x[i] ** 2 for i, task in enumerate(SIZES)}
    weighting.backward(losses, x, lambda loss: loss)
    expected = [2 * x[i].item() * weighting.weights()[t] for i, t in enumerate(SIZES)]
    assert x.grad.tolist() == pytest.approx(expected)


def test_unknown_weighting_lists_the_valid_names():
    with pytest.raises(MmptError) as info:
        build_weighting("uncertainty", SIZES)
    assert "none" in str(info.value) and "size" in str(info.value)


@pytest.mark.parametrize("name", ["none", "size"])
def test_state_survives_a_weights_only_checkpoint(name):
    weighting = build_weighting(name, SIZES)
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    # a resumed run rebuilds the strategy, possibly from other sizes, then loads the saved state
    restored = build_weighting(name, {t: 1 for t in SIZES})
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.weights() == weighting.weights()
