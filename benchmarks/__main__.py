"""Benchmarks of mmpt: `python -m benchmarks data|train|compare|launcher|gpu [options]` (`--help` on each).

A benchmark, not a test: figures are printed beside their baseline and written to --json, never asserted; the
GPU check (`gpu`) prints each figure beside its pass criterion and exits 1 when a judged figure fails.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import compare, data, gpu, launcher, train
from mmpt.errors import MmptError


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the data, train, compare or launcher benchmark; return the exit code (2 with one `error:` line
    for bad settings)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data.add_parser(commands)
    train.add_parser(commands)
    compare.add_parser(commands)
    launcher.add_parser(commands)
    gpu.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        # data also runs its hidden memory-scenario commands
        runners = {
            "train": train.run_command,
            "compare": compare.run_command,
            "launcher": launcher.run_command,
            "gpu": gpu.run_command,
        }
        run = runners.get(args.command, data.run_command)
        return run(args)
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
