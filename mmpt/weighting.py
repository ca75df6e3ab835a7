"""Loss weighting: how a step's per-dataset losses become one backward pass, behind one Protocol.

To add a strategy, write one class with the methods below and add it to WEIGHTINGS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from mmpt.errors import lookup


class Weighting(Protocol):
    """What the training step needs from a loss-weighting strategy."""

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        """Run the step's backward pass from its per-dataset mean losses (0-dim, unweighted, on the device).

        `features` is the backbone's output for the whole step (the datasets' slices concatenated in the
        order of `losses`); `scale` is the fp16 gradient scaler's (identity otherwise). Never synchronises.
        """
        ...

    def weights(self) -> dict[str, float | Tensor]:
        """The effective weight of each dataset (of the last step), for logging."""
        ...

    def state_dict(self) -> dict:
        """Resume state: plain Python values and tensors only (checkpoints load with weights_only=True)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


class StaticWeighting:
    """A fixed multiplier per dataset: the step's loss is the weighted sum of its datasets' losses."""

    def __init__(self, weights: dict[str, float]) -> None:
        self._weights = dict(weights)

    def backward(self, losses: dict[str, Tensor], features: Tensor, scale: Callable[[Tensor], Tensor]) -> None:
        scale(sum(self._weights[task] * loss for task, loss in losses.items())).backward()

    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights)}

    def load_state_dict(self, state: dict) -> None:
        self._weights = dict(state["weights"])


def no_weighting(train_sizes: dict[str, int]) -> StaticWeighting:
    """Every dataset's loss counts as it is (weight 1)."""
    return StaticWeighting({task: 1.0 for task in train_sizes})


def size_weighting(train_sizes: dict[str, int]) -> StaticWeighting:
    """Weight |smallest train split| / |D_t| (Bachmeier 2024): offsets proportional sampling of big datasets."""
    assert train_sizes and min(train_sizes.values()) > 0, f"train sizes must be positive, got {train_sizes}"
    smallest = min(train_sizes.values())
    return StaticWeighting({task: smallest / size for task, size in train_sizes.items()})


WEIGHTINGS: dict[str, Callable[[dict[str, int]], Weighting]] = {
    "none": no_weighting,
    "size": size_weighting,
}


def build_weighting(name: str, train_sizes: dict[str, int]) -> Weighting:
    """Return the weighting strategy `name` for datasets with these train-split sizes.

    Raises MmptError for an unknown name, listing the valid ones.
    """
    return lookup("loss weighting", WEIGHTINGS, name)(train_sizes)
