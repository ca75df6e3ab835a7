"""Loss-weighting strategies: a multiplier for each task's loss, behind one small Protocol.

To add a strategy, write one class with the four methods below and add it to WEIGHTINGS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mmpt.errors import lookup


class LossWeighting(Protocol):
    """What the training loop needs from a loss-weighting strategy."""

    def weight(self, task: str) -> float:
        """Multiplier for `task`'s loss at this step."""
        ...

    def update(self, task: str, loss: float) -> None:
        """Observe `task`'s unweighted loss after a step (a no-op for static strategies)."""
        ...

    def state_dict(self) -> dict:
        """Resume state: plain Python values and tensors only (checkpoints load with weights_only=True)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


class NoWeighting:
    """Every task's loss counts as it is (weight 1.0)."""

    def __init__(self, train_sizes: dict[str, int]) -> None:
        pass

    def weight(self, task: str) -> float:
        return 1.0

    def update(self, task: str, loss: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SizeWeighting:
    """Weight |smallest train split| / |D_t| (Bachmeier 2024): offsets proportional sampling of big datasets."""

    def __init__(self, train_sizes: dict[str, int]) -> None:
        assert train_sizes and min(train_sizes.values()) > 0, f"train sizes must be positive, got {train_sizes}"
        smallest = min(train_sizes.values())
        self.weights = {task: smallest / size for task, size in train_sizes.items()}

    def weight(self, task: str) -> float:
        return self.weights[task]

    def update(self, task: str, loss: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])


WEIGHTINGS: dict[str, Callable[[dict[str, int]], LossWeighting]] = {
    "none": NoWeighting,
    "size": SizeWeighting,
}


def build_weighting(name: str, train_sizes: dict[str, int]) -> LossWeighting:
    """Return the weighting strategy `name` for tasks with these train-split sizes.

    Raises MmptError for an unknown name, listing the valid ones.
    """
    return lookup("loss weighting", WEIGHTINGS, name)(train_sizes)
