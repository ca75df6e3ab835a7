"""The settings in words, from their declarations (mmpt.config) and the registries (mmpt.config.methods.METHODS).

`train.py --print-config` and `--help` read them here; so do the generated docs: docs/settings.md whole, and
marked blocks inside hand-written pages (`<!-- generated: NAME -->` ... `<!-- end: NAME -->`): the keys a
resume may change, the named flags and the table of weighting methods. Regenerate everything after changing a
declaration or a method with

    python -m mmpt.config.docs --write

(tests/test_docs.py fails while a generated text and the declarations differ; `--check` says which.)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import yaml

from mmpt.config import EVALUATE_FLAGS, NAMED_FLAGS, RESUME_MAY_CHANGE, SETTINGS, Config
from mmpt.config.methods import ALL, CORE_SOLVERS, METHODS, SEVERAL
from mmpt.config.settings import Key, number_text
from mmpt.io import markdown_table

REGENERATE = "python -m mmpt.config.docs --write"
ROOT = Path(__file__).resolve().parents[2]


def allowed_text(key: str | Key) -> str:
    """What a key accepts, in words, e.g. `pad | resize | native` or `number >= 0 and < 1, or null`."""
    k = SETTINGS[key] if isinstance(key, str) else key
    hint, spec = k.hint, k.spec
    nullable = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if nullable:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None  # several types (a number or text): `allowed` says it
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


def flag_help(key: str) -> str:
    """What a named flag does: a switch sets its key to the value that is not the default, another flag sets it to
    its text, checked as the key's value."""
    k = SETTINGS[key]
    if k.hint is bool:
        return f"sets {key} to {_scalar(not k.default)} ({k.spec.doc})"
    return f"{k.spec.doc}; {allowed_text(key)} (config key {key})"


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
        "Generated from the declarations in `mmpt/config/schema.py`; do not edit by hand. Regenerate with",
        f"`{REGENERATE}` (a test fails while this file and the declarations differ).",
        "",
        "```bash",
        "python train.py --print-config --config configs/quickstart.yaml   # the resolved values, annotated",
        "python train.py --config configs/quickstart.yaml --set optim.lr=3e-4 --set input.mode=resize",
        "```",
        "",
        "Set a key in a YAML recipe, with `--set section.key=value`, or with its named flag (`--epochs`, ...).",
        "*Resume* says whether `train.py --resume` accepts a new value; every other key is fixed for the run and",
        "a resume that changes it is refused (mappings such as `loss.weighting_args` compared whole).",
        "*Result* says whether the key changes what a run computes; a series ignores the keys that do not, and",
        "refuses to sweep them.",
        "",
    ]
    rows = []
    for key, k in SETTINGS.items():
        flags = [f"`{f}`" for f in dict.fromkeys((k.spec.flag, k.spec.evaluate_flag)) if f]
        cells = [
            f"`{key}`",
            allowed_text(key),
            f"`{_scalar(k.default)}`",
            "may change" if k.spec.resume else "fixed",
            "changes" if k.spec.result else "no",
            ", ".join(flags),
            k.spec.doc,
        ]
        rows.append(cells)
    header = ["key", "allowed values", "default", "resume", "result", "flag", "meaning"]
    return "\n".join([*lines, markdown_table(header, rows, align="l" * len(header))]) + "\n"


# ---------------------------------------------------------------- blocks inside hand-written pages


def resume_keys() -> str:
    """The keys a resume may change, in declaration order."""
    return ", ".join(f"`{key}`" for key in SETTINGS if key in RESUME_MAY_CHANGE)


def flag_list() -> str:
    """The named flags of train.py, in one line."""
    return " ".join(f"`{flag}`" for flag in NAMED_FLAGS)


def flag_table() -> str:
    """The named flags of train.py, and the flags of evaluate.py and probe that stand for a config key."""
    rows = []
    for flag, key in NAMED_FLAGS.items():
        k = SETTINGS[key]
        what = f"sets it to {_scalar(not k.default)}: {k.spec.doc}" if k.hint is bool else k.spec.doc
        rows.append([f"`{flag}`", f"`{key}`", "" if k.hint is bool else allowed_text(key), what])
    evaluate = [[f"`{flag}`", f"`{key}`"] for flag, key in EVALUATE_FLAGS.items()]
    return "\n".join(
        [
            markdown_table(["`train.py` flag", "config key", "allowed values", "what it does"], rows, align="llll"),
            "",
            markdown_table(["`evaluate.py` / `probe` flag", "checked as config key"], evaluate, align="ll"),
        ]
    )


def _tasks_cell(tasks: str) -> str:
    return {ALL: "`all`", SEVERAL: "≥ 2"}.get(tasks, "any")


def _option_cell(k: Key) -> str:
    allowed = ("whole " if k.spec.check is not None else "") + allowed_text(k)
    default = "" if k.default is None else f", default {number_text(k.default)}"  # None: the doc says what counts
    return f"`{k.name}` ({allowed}{default}): {k.spec.doc}"


def methods_table() -> str:
    """The weighting methods as mmpt.config.methods.METHODS declares them."""
    rows = []
    for name, m in METHODS.items():
        kind = f"{m.kind.removesuffix('-based')}, {m.summary}"
        if set(m.needs) - set(CORE_SOLVERS):
            kind += ", needs `mtl-solvers`"
        options = "; ".join(_option_cell(k) for k in m.args.values())
        ddp = "yes" if m.distributed else "no"
        rows.append([f"`{name}`", kind, _tasks_cell(m.tasks), ddp, options, m.reference])
    header = [
        "`loss.weighting`",
        "kind",
        "`tasks_per_step`",
        "DDP",
        "`loss.weighting_args` (allowed, default)",
        "reference",
    ]
    return markdown_table(header, rows, align="l" * len(header))


@dataclasses.dataclass(frozen=True)
class Block:
    """A generated block inside a hand-written page: `inline` blocks sit within a sentence."""

    page: str  # relative to the project root
    name: str
    text: Callable[[], str]
    inline: bool = False


BLOCKS = (
    Block("docs/reproducibility-and-errors.md", "resume-keys", resume_keys, inline=True),
    Block("README.md", "flag-list", flag_list, inline=True),
    Block("docs/training-and-settings.md", "flags", flag_table),
    Block("docs/multi-task-optimization.md", "methods", methods_table),
)
SETTINGS_PAGE = "docs/settings.md"


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {re.escape(name)} -->)(.*?)(<!-- end: {re.escape(name)} -->)", re.DOTALL)


def render(page_text: str, block: Block) -> str:
    """`page_text` with `block` regenerated; AssertionError when the page lacks its markers."""
    pattern = _pattern(block.name)
    assert len(pattern.findall(page_text)) == 1, f"{block.page} needs one <!-- generated: {block.name} --> block"
    body = block.text() if block.inline else f"\n{block.text()}\n"
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), page_text)


def generated_pages(root: Path = ROOT) -> dict[Path, str]:
    """Every generated page's path and the text it should have."""
    pages = {root / SETTINGS_PAGE: settings_markdown()}
    for block in BLOCKS:
        path = root / block.page
        pages[path] = render(pages.get(path, path.read_text(encoding="utf-8")), block)
    return pages


def stale_pages(root: Path = ROOT) -> list[Path]:
    """The generated pages whose text differs from the declarations."""
    return [p for p, text in generated_pages(root).items() if not p.is_file() or p.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmpt.config.docs", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="regenerate docs/settings.md and every marked block")
    action.add_argument("--check", action="store_true", help="name the generated pages that are out of date")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in generated_pages().items():
            path.write_text(text, encoding="utf-8")
            print(f"written: {path.relative_to(ROOT)}")
        return 0
    if args.check:
        stale = stale_pages()
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (regenerate with {REGENERATE})")
        return 1 if stale else 0
    print(settings_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
