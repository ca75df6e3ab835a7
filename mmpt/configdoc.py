"""The resolved config as YAML with every key's allowed values as a comment (`train.py --print-config`)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing

import yaml

from mmpt.config import CHOICES, MINIMUM, Config
from mmpt.model import BACKBONES
from mmpt.tasks import RESOLUTIONS, TASKS

# keys whose allowed values are not a type, a choice or a bound
SPECIAL = {
    "data.datasets": "all, or a list of: " + ", ".join(t.short for t in TASKS.values()),
    "data.resolution": " | ".join(map(str, RESOLUTIONS)),
    "model.backbone": "an alias (" + ", ".join(BACKBONES) + ") or any timm model name",
    "optim.name": "any timm optimizer name (adamw, sgd, lamb, ...)",
    "train.device": "auto | cpu | cuda | cuda:N",
}
_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.*)$")


def _source_comments(cls: type) -> dict[str, str]:
    """field -> the comment written beside it in the dataclass's source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = _COMMENT.match(line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def allowed_values(key: str, hint) -> str:
    """What `key` accepts, in words, e.g. `pad | resize | native` or `integer >= 1, or null`."""
    nullable = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if nullable:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if key in SPECIAL:
        text = SPECIAL[key]
    elif key in CHOICES:
        text = " | ".join(CHOICES[key])
    elif hint is bool:
        text = "true | false"
    elif hint in (int, float):
        text = "integer" if hint is int else "number"
        if key in MINIMUM:
            low, inclusive = MINIMUM[key]
            text += f" {'>=' if inclusive else '>'} {low:g}"
    elif hint is str:
        text = "text"
    else:
        text = "list"
    return text + (", or null" if nullable else "")


def _scalar(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def annotated_yaml(cfg: Config) -> str:
    """YAML of `cfg` (loadable by load_config) with `# allowed values; meaning` after every key."""
    lines: list[str] = []

    def emit(obj, prefix: str, indent: int) -> None:
        hints = typing.get_type_hints(type(obj))
        comments = _source_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = prefix + f.name
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, key + ".", indent + 1)
                continue
            if isinstance(value, tuple):
                value = list(value)
            note = allowed_values(key, hints[f.name])
            comment = comments.get(f.name)
            if comment and key in CHOICES and all(c in comment for c in CHOICES[key]):
                note = comment  # the source comment already lists the choices, with their meaning
            elif comment and not (key in SPECIAL and ("|" in comment or "timm" in comment)):
                note += f"; {comment}"
            lines.append(f"{pad}{f.name}: {_scalar(value)}  # {note}")

    emit(cfg, "", 0)
    return "\n".join(lines) + "\n"
