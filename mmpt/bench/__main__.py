"""Benchmarks of mmpt: `python -m mmpt.bench data|train [options]` (`--help` on each for its options).

A benchmark, not a test: figures are printed beside their targets and written to --json, never asserted.
"""

from __future__ import annotations

import argparse
import sys

from mmpt.bench import data, train
from mmpt.errors import MmptError


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the data or train benchmark; return the exit code (2 with one `error:` line for bad settings)."""
    parser = argparse.ArgumentParser(prog="python -m mmpt.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data.add_parser(commands)
    train.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return train.run_command(args) if args.command == "train" else data.run_command(args)
    except MmptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
