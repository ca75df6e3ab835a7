import io

import pytest
import torch

from mmpt.errors import MmptError
from mmpt.weighting import build_weighting

SIZES = {"pathmnist": 89996, "breastmnist": 546, "retinamnist": 1080}


def test_size_weighting_is_smallest_split_over_each_split():
    weighting = build_weighting("size", SIZES)
    assert weighting.weight("breastmnist") == 1.0
    assert weighting.weight("retinamnist") == pytest.approx(546 / 1080)
    assert weighting.weight("pathmnist") == pytest.approx(546 / 89996)


def test_no_weighting_leaves_every_loss_unchanged():
    weighting = build_weighting("none", SIZES)
    weighting.update("pathmnist", 3.0)
    assert [weighting.weight(t) for t in SIZES] == [1.0, 1.0, 1.0]


def test_size_weights_do_not_change_with_observed_losses():
    weighting = build_weighting("size", SIZES)
    for step in range(5):
        weighting.update("pathmnist", 10.0 * step)
    assert weighting.weight("pathmnist") == pytest.approx(546 / 89996)


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
    assert {t: restored.weight(t) for t in SIZES} == {t: weighting.weight(t) for t in SIZES}
