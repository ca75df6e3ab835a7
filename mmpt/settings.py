"""Declaring settings and checking values against a declaration: the small validator behind mmpt.config.

A setting is a dataclass field made with `setting(default, doc, ...)`; its metadata (a `Setting`) says what it
accepts beyond its type and whether a resume may change it. `check(key, raw)` converts a raw value (from YAML,
`--set` or a flag's text) to the field's type and checks it, returning the one-line problem instead of raising,
so that a config's loader can name every problem at once. Plain dataclasses keep start-up fast and the messages
exactly ours, with no dependency beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Setting:
    """What one config key means and accepts, beyond its type."""

    doc: str
    choices: tuple = ()
    low: float | None = None  # lower bound
    low_open: bool = False  # True: the bound itself is refused
    high: float | None = None
    high_open: bool = False
    check: Callable[[Any], str | None] | None = None  # value -> "must be ..., got ..." or None
    allowed: str = ""  # what it accepts in words, where type, choices and bounds do not say it
    resume: bool = False  # a resume may change it (where, how fast, how long or how loudly the run goes)
    # for a key added after runs were recorded without it: the value that reproduces what those runs did
    # (a recorded config lacking the key is read with it, not with today's default)
    recorded: Any = None


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **spec: Any,
) -> Any:
    """A dataclass field with its declaration (see Setting); ge/gt/le/lt are inclusive/exclusive bounds."""
    meta = Setting(
        doc,
        low=gt if gt is not None else ge,
        low_open=gt is not None,
        high=lt if lt is not None else le,
        high_open=lt is not None,
        **spec,
    )
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"setting": meta})
    return field(default=default, metadata={"setting": meta})


def section(cls: type, doc: str) -> Any:
    """A nested group of settings."""
    return field(default_factory=cls, metadata={"section": doc})


@dataclass(frozen=True)
class Key:
    """One declared setting: its dotted name, type hint, declaration and default."""

    name: str
    hint: Any
    spec: Setting
    default: Any


def declared(cls: type, prefix: str = "") -> dict[str, Key]:
    """Every setting of the dataclass `cls` and its sections, by dotted key, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Key] = {}
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            out.update(declared(hints[f.name], f"{prefix}{f.name}."))
            continue
        assert "setting" in f.metadata, f"config field {prefix}{f.name} is not declared with setting()"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[prefix + f.name] = Key(prefix + f.name, hints[f.name], f.metadata["setting"], default)
    return out


FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1


def check(k: Key, raw: Any) -> tuple[Any, str | None]:
    """(`raw` converted to the setting's type, None), or (None, "must be ..., got ...")."""
    value, error = _coerce(raw, k.hint)
    if error:
        return None, f"{error}, got {raw!r}"
    spec = k.spec
    if value is None:
        return None, None
    if spec.choices and value not in spec.choices:
        return None, f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if spec.low is not None and (value < spec.low or (value == spec.low and spec.low_open)):
        return None, f"must be {'>' if spec.low_open else '>='} {number_text(spec.low)}, got {value!r}"
    if spec.high is not None and (value > spec.high or (value == spec.high and spec.high_open)):
        return None, f"must be {'<' if spec.high_open else '<='} {number_text(spec.high)}, got {value!r}"
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            return None, problem
    return value, None


def number_text(x: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Return (value converted to `hint`, None) or (None, 'must be ...')."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errors = []
        for inner in [a for a in args if a is not type(None)]:
            converted, error = _coerce(value, inner)
            if not error:
                return converted, None
            errors.append(error)
        if not all(e.startswith("must be ") for e in errors):  # e.g. an empty string: that problem alone
            return None, next(e for e in errors if not e.startswith("must be "))
        words = [e.removeprefix("must be ") for e in errors] + (["null"] if type(None) in args else [])
        return None, "must be " + " or ".join(words)
    if origin is dict:
        if not isinstance(value, dict):
            return None, "must be a mapping of names to values"
        items = {key: _coerce(v, args[1]) for key, v in value.items()}
        errors = [f"{key} {e}" for key, (_, e) in items.items() if e]
        if any(not isinstance(key, str) for key in value):
            errors.append("keys must be names")
        return (None, "entries: " + "; ".join(errors)) if errors else ({k: v for k, (v, _) in items.items()}, None)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return None, "must be a list"
        items = [_coerce(v, args[0]) for v in value]
        errors = [e for _, e in items if e]
        return (None, errors[0] + " (each item)") if errors else (tuple(v for v, _ in items), None)
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if hint is int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):  # a named flag's text, e.g. --epochs 5
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -INT64_MAX <= value <= INT64_MAX:  # numpy and torch hold counts and seeds in 64 bits
            return None, f"must be an integer within ±{INT64_MAX}"
        return (value, None) if ok else (None, "must be an integer")
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; flags give text
            try:
                value = float(value)
            except ValueError:
                return None, "must be a number"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None, "must be a number"
        # every float ends up in float32 tensors or optimizer arithmetic: inf, nan or overflow would only crash later
        if not abs(float(value)) <= FLOAT32_MAX:
            return None, f"must be a finite number within float32 range (|x| <= {FLOAT32_MAX:.3g})"
        return float(value), None
    if hint is str:
        if not isinstance(value, str):
            return None, "must be a string"
        if "\x00" in value:  # paths and names: the OS refuses a NUL byte
            return None, "must not contain a NUL character"
        if not value.strip():  # an empty path or name would silently mean the current folder or a default
            return None, "must not be empty"
        return value, None
    raise AssertionError(f"config field type {hint} has no coercion rule")
