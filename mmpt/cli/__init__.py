"""Command lines of `train.py` / `mmpt-train` (mmpt.cli.train) and `evaluate.py` / `mmpt-evaluate`
(mmpt.cli.evaluate).

A user-caused error prints one line `error: ...` and exits 2; `--debug` shows the traceback instead. The named
flags of train.py, and the flags of evaluate.py and probe that stand for a config key, come from the keys'
declarations (`flag`, `evaluate_flag` in mmpt.config) and are checked as those keys are.
"""

from __future__ import annotations

from mmpt.cli.common import guarded
from mmpt.cli.evaluate import evaluate_command
from mmpt.cli.train import train_command


def train_main(argv: list[str] | None = None) -> int:
    return guarded(train_command, argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    return guarded(evaluate_command, argv)
