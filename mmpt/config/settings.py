"""Declaring settings, checking values against a declaration, and reading them: the machinery behind mmpt.config.

A setting is a dataclass field made with `setting(default, doc, ...)`; its metadata (a `Setting`) says what it
accepts beyond its type, whether a resume may change it, whether it changes results and its flag. `check(key,
raw)` converts a raw value (from YAML, `--set` or a flag's text) to the field's type and checks it, returning the
one-line problem instead of raising, so that a config's loader can name every problem at once; `build` does it for
a whole tree of settings dataclasses. YAML files (with `base:` chaining) and `--set key.sub=value` overrides
become nested dicts here. This module knows no key of mmpt's: mmpt.config declares them. Plain dataclasses keep
start-up fast and the messages exactly ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmpt.errors import MmptError


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
    result: bool = True  # False: it says where or how a run goes, never what it computes (series ignore it)
    flag: str = ""  # its named flag of train.py, e.g. --epochs (a true/false key's flag sets the non-default value)
    evaluate_flag: str = ""  # its flag of evaluate.py and probe (they read a run's config and override this key)
    # for a key added after runs were recorded without it: the value that reproduces what those runs did
    # (a recorded config lacking the key is read with it, not with today's default)
    recorded: Any = None


def declaration(
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **spec: Any,
) -> Setting:
    """A Setting from its doc and what it accepts; ge/gt/le/lt are inclusive/exclusive bounds."""
    return Setting(
        doc,
        low=gt if gt is not None else ge,
        low_open=gt is not None,
        high=lt if lt is not None else le,
        high_open=lt is not None,
        **spec,
    )


def setting(default: Any, doc: str, **spec: Any) -> Any:
    """A dataclass field with its declaration (see Setting and `declaration`)."""
    meta = declaration(doc, **spec)
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


def key(name: str, hint: Any, default: Any, doc: str, **spec: Any) -> Key:
    """One setting declared outside a config dataclass (e.g. a weighting method's option), checked as config keys
    are (`check`)."""
    return Key(name, hint, declaration(doc, **spec), default)


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
SHOWN_CHARACTERS = 80  # a value longer than this is shortened in messages, which stay one readable line


def shown(value: Any) -> str:
    """repr(value) for a message, shortened (with its length) when it is long: a 5,000-digit number stays one line."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[: SHOWN_CHARACTERS - 20]}... ({len(text):,} characters)"


def check(k: Key, raw: Any) -> tuple[Any, str | None]:
    """(`raw` converted to the setting's type, None), or (None, "must be ..., got ...")."""
    value, error = _coerce(raw, k.hint)
    if error:
        return None, f"{error}, got {shown(raw)}"
    spec = k.spec
    if value is None:
        return None, None
    if spec.choices and value not in spec.choices:
        return None, f"must be one of {', '.join(map(str, spec.choices))}, got {shown(value)}"
    if spec.low is not None and (value < spec.low or (value == spec.low and spec.low_open)):
        return None, f"must be {'>' if spec.low_open else '>='} {number_text(spec.low)}, got {shown(value)}"
    if spec.high is not None and (value > spec.high or (value == spec.high and spec.high_open)):
        return None, f"must be {'<' if spec.high_open else '<='} {number_text(spec.high)}, got {shown(value)}"
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
        within = f"must be an integer within ±{INT64_MAX}"
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):  # a named flag's text, e.g. --epochs 5
            try:
                value = int(value)
            except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
                return None, within
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -INT64_MAX <= value <= INT64_MAX:  # numpy and torch hold counts and seeds in 64 bits
            return None, within
        return (int(value), None) if ok else (None, "must be an integer")
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; flags give text
            try:
                value = float(value)
            except ValueError:
                return None, "must be a number"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None, "must be a number"
        # every float ends up in float32 tensors or optimizer arithmetic: inf, nan or overflow would only crash later
        # (an integer beyond float64, e.g. 400 digits, cannot even become a float)
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not abs(value) <= FLOAT32_MAX:
            return None, f"must be a finite number within float32 range (|x| <= {FLOAT32_MAX:.3g})"
        return value, None
    if hint is str:
        if isinstance(value, (int, float)) and isinstance(getattr(value, "text", None), str):
            value = value.text  # a number in YAML (`name: 2024`) is its text, as the flag's text is
        if not isinstance(value, str):
            return None, "must be a string"
        if "\x00" in value:  # paths and names: the OS refuses a NUL byte
            return None, "must not contain a NUL character"
        if not value.strip():  # an empty path or name would silently mean the current folder or a default
            return None, "must not be empty"
        return value, None
    raise AssertionError(f"config field type {hint} has no coercion rule")


# ---------------------------------------------------------------- settings trees and their YAML


def build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of the settings dataclass `cls` from the nested dict `raw`, each value converted and checked
    (`check`); every unknown key and bad value is appended to `problems` (one phrase each), and the field keeps
    its default."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"unknown key '{prefix}{key}' (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = prefix + f.name
        if "section" in f.metadata:
            kwargs[f.name] = build(hints[f.name], raw[f.name], key + ".", problems)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value, problem = check(Key(key, hints[f.name], f.metadata["setting"], default), raw[f.name])
        if problem:
            problems.append(f"{key} {problem}")
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def value_of(cfg: Any, key: str) -> Any:
    """The value of a dotted key, e.g. value_of(cfg, "optim.lr")."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> Any:
    """The config as plain Python values (tuples become lists), for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` with `override` merged in; nested dicts merge, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class DuplicateKey(yaml.YAMLError):
    """A mapping in YAML text gives one key twice (YAML itself would keep the last value and drop the first)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"{shown(key)} is given twice (lines {first_line} and {line})")
        self.key, self.first_line, self.line = key, first_line, line


class _Integer(int):
    """An integer read from YAML, with the text it was written as (`text`)."""

    text: str


class _Float(float):
    """A float read from YAML, with the text it was written as (`text`)."""

    text: str


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (DuplicateKey) instead of
    silently keeping the last value, and that numbers keep the text they were written as: a string setting written
    as a number (`name: 2024`) is that text, as it is from a flag (`--output 2024`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges on purpose; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the safe loader's own error names an unhashable key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        try:
            number = _Integer(super().construct_yaml_int(node))
        except ValueError:  # more digits than Python converts: the text, which every setting refuses or takes as text
            return text
        number.text = text
        return number

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        number = _Float(super().construct_yaml_float(node))
        number.text = self.construct_scalar(node)
        return number


_RecipeLoader.add_constructor("tag:yaml.org,2002:map", _RecipeLoader.construct_yaml_map)
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _RecipeLoader.construct_yaml_float)


def load_yaml(text: str) -> Any:
    """YAML text as Python values: the one reader of recipes, `--set`/`--sweep` values and the configs runs record.

    Raises DuplicateKey (a yaml.YAMLError) for a key given twice in one mapping, and yaml.YAMLError for bad syntax.
    """
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain values only, never Python objects


def parse_override(text: str) -> dict:
    """Turn `a.b=value` into {"a": {"b": value}}, parsing value as YAML (so 1e-3, true, [a, b] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MmptError(f"--set expects key.sub=value, got '{text}'")
    if re.fullmatch(r"\s*[+-]?0\d+\s*", raw):  # YAML 1.1 would read 010 as octal 8; a researcher means ten
        value: Any = raw.strip()
    else:
        try:
            value = load_yaml(raw) if raw.strip() else None
        except DuplicateKey as exc:
            raise MmptError(f"--set {text}: {exc}; give each key once") from None
        except yaml.YAMLError:
            value = raw
    return nested(key.strip(), value)


def nested(key: str, value: Any) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is an MmptError."""
    path = Path(path)
    if not path.is_file():
        raise MmptError(f"config file {path} not found; pass an existing YAML file with --config")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKey as exc:
        raise MmptError(
            f"config file {path}: {exc} in one mapping, and YAML would keep only the last; give it once "
            "(merge the two sections or keep one of the values)"
        ) from None
    except UnicodeDecodeError as exc:
        raise MmptError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise MmptError(f"cannot read config file {path} ({exc.strerror or exc}); check its permissions") from None
    except yaml.YAMLError as exc:
        raise MmptError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise MmptError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def read_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip() or "\x00" in base:
        raise MmptError(f"config {path}: base must be the path of another YAML file (a string), got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise MmptError(f"config {path} has a cycle of 'base:' references; remove one")
    return deep_merge(read_with_base(base_path, (*seen, base_path)), data)
