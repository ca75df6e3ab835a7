"""The settings in words, from their declarations in mmpt.config: `train.py --print-config` and docs/settings.md.

Regenerate the docs' table after changing a declaration: python -m mmpt.configdoc > docs/settings.md
"""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml

from mmpt.config import SETTINGS, Config
from mmpt.settings import number_text

REGENERATE = "python -m mmpt.configdoc > docs/settings.md"


def allowed_text(key: str) -> str:
    """What `key` accepts, in words, e.g. `pad | resize | native` or `number >= 0 and < 1, or null`."""
    k = SETTINGS[key]
    hint, spec = k.hint, k.spec
    nullable = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if nullable:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if spec.allowed:
        text = spec.allowed
    elif spec.choices:
        text = " | ".join(map(str, spec.choices))
    elif hint is bool:
        text = "true | false"
    elif hint in (int, float):
        bounds = []
        if spec.low is not None:
            bounds.append(f"{'>' if spec.low_open else '>='} {number_text(spec.low)}")
        if spec.high is not None:
            bounds.append(f"{'<' if spec.high_open else '<='} {number_text(spec.high)}")
        text = ("integer" if hint is int else "number") + (" " + " and ".join(bounds) if bounds else "")
    elif hint is str:
        text = "text"
    else:
        text = "list"
    return text + (", or null" if nullable else "")


def _scalar(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def annotated_yaml(cfg: Config) -> str:
    """YAML of `cfg` (loadable by load_config) with `# allowed values; meaning` after every key."""
    lines: list[str] = []

    def emit(obj, prefix: str, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key, pad = prefix + f.name, "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, key + ".", indent + 1)
                continue
            lines.append(f"{pad}{f.name}: {_scalar(value)}  # {allowed_text(key)}; {SETTINGS[key].spec.doc}")

    emit(cfg, "", 0)
    return "\n".join(lines) + "\n"


def settings_markdown() -> str:
    """docs/settings.md: every setting with its allowed values, default, whether a resume may change it, and doc."""
    lines = [
        "# Settings",
        "",
        "Generated from the declarations in `mmpt/config.py`; do not edit by hand. Regenerate with",
        f"`{REGENERATE}` (a test fails while this file and the declarations differ).",
        "",
        "```bash",
        "python train.py --print-config --config configs/quickstart.yaml   # the resolved values, annotated",
        "python train.py --config configs/quickstart.yaml --set optim.lr=3e-4 --set input.mode=resize",
        "```",
        "",
        "Set a key in a YAML recipe, with `--set section.key=value`, or with its named flag (`--epochs`, ...).",
        "*Resume* says whether `train.py --resume` accepts a new value; every other key defines the recipe and",
        "a resume that changes it is refused (mappings such as `loss.weighting_args` compared whole).",
        "",
        "| key | allowed values | default | resume | meaning |",
        "|---|---|---|---|---|",
    ]
    for key, k in SETTINGS.items():
        cells = [
            f"`{key}`",
            allowed_text(key),
            f"`{_scalar(k.default)}`",
            "may change" if k.spec.resume else "fixed",
            k.spec.doc,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
