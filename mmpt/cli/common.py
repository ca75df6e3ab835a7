"""What train.py and evaluate.py share: an argparse parser whose errors are MmptErrors, and the guard that turns
an MmptError into one line `error: ...` and exit code 2 (`--debug` shows the traceback instead)."""

from __future__ import annotations

import argparse
import os
import sys

from mmpt.errors import MmptError


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
