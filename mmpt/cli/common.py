"""What train.py and evaluate.py share: an argparse parser whose errors are MmptErrors, and the guard that turns
an MmptError into one line `error: ...` and exit code 2 (`--debug` shows the traceback instead)."""

from __future__ import annotations

import argparse
import os
import sys

from mmpt.config import NAMED_FLAGS, SETTINGS
from mmpt.config.docs import flag_help
from mmpt.config.settings import deep_merge, nested
from mmpt.errors import MmptError

# the launch.* keys (where a series' members, or a series' probes, run as jobs); their flags form a launcher group
LAUNCH_KEYS = frozenset(key for key in SETTINGS if key.startswith("launch."))
LAUNCH_FLAGS = {flag: key for flag, key in NAMED_FLAGS.items() if key in LAUNCH_KEYS}


def guarded(main, argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return main(argv) or 0
    except MmptError as exc:
        if debug:
            raise
        # under torchrun every rank raises the same error; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2


class Parser(argparse.ArgumentParser):
    """argparse that raises MmptError for a bad flag, so it prints as one `error:` line like every other input error."""

    def error(self, message: str):
        raise MmptError(f"{message}; see {self.prog} --help")


def flag_dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_setting_flag(group, flag: str, key: str) -> None:
    """The named flag of a config key, its help from the key's declaration (a bool key: a switch to its other value)."""
    help_text = flag_help(key).replace("%", "%%")
    if SETTINGS[key].hint is bool:
        group.add_argument(flag, action="store_true", help=help_text)
    else:
        group.add_argument(flag, metavar=key.rsplit(".", 1)[-1].upper(), help=help_text)


def flag_overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The named `flags` (flag -> key) given in `args` as a nested override dict; the config checks their text."""
    out: dict = {}
    for flag, key in flags.items():
        value = getattr(args, flag_dest(flag))
        if SETTINGS[key].hint is bool:
            value = (not SETTINGS[key].default) if value else None
        if value is not None:
            out = deep_merge(out, nested(key, value))
    return out


def check_launch_resources(args: argparse.Namespace, launcher: str) -> None:
    """A job's resources (--jobs, --time, ...) go with --launcher local or slurm: one MmptError line otherwise."""
    resources = [
        flag
        for flag, key in LAUNCH_FLAGS.items()
        if key != "launch.launcher" and getattr(args, flag_dest(flag)) is not None
    ]
    if resources and launcher == "sequential":
        raise MmptError(
            f"{resources[0]} is a job's setting and goes with --launcher local or slurm; add --launcher, "
            f"or drop {resources[0]}"
        )
