"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MmptError(Exception):
    """A user-caused error: the message says what is wrong and what to do.

    The CLI prints it as one line (`error: ...`) and exits with code 2.
    """


MAX_LISTED = 40  # registries longer than this are not listed in full in an error line


def unknown_name(kind: str, name: str, known: Iterable[str]) -> MmptError:
    """Return an MmptError for an unknown `name`, listing close matches or all valid names."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}?"
    elif len(known) <= MAX_LISTED:
        hint = f"choose one of: {', '.join(known)}"
    else:
        # a long registry (timm's ~1,000 models) is not a line to read: point to a search of it instead
        hint = (
            f'no close match among {len(known):,} names; search them, e.g. python -c "import timm; '
            f"print(timm.list_models('*{name[:4].lower()}*'))\""
        )
    return MmptError(f"unknown {kind} '{name}'; {hint}")


def lookup(kind: str, registry: dict, name: str):
    """Return `registry[name]`, or raise an MmptError naming the valid names."""
    try:
        return registry[name]
    except KeyError:
        raise unknown_name(kind, name, registry) from None
