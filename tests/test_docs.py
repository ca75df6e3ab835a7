"""The documentation keeps up with the code: the generated pages match the declarations, README stays short and links
every page, each page opens with an example, every documented command parses, and every module a shipped file names
exists."""

from __future__ import annotations

import re

from mmpt.errors import MmptError
from tests.helpers import REPO


def test_the_generated_docs_match_the_declarations():
    """docs/settings.md, and the resume keys, named flags and methods blocks inside hand-written pages."""
    from mmpt.config.docs import REGENERATE, stale_pages

    stale = [str(p.relative_to(REPO)) for p in stale_pages()]
    assert stale == [], f"out of date: {', '.join(stale)}; regenerate with: {REGENERATE}"


DOC_PAGES = tuple(sorted(p.stem for p in (REPO / "docs").glob("*.md")))  # the guide (docs/results/ holds studies)


def _documents() -> dict[str, str]:
    return {
        "README.md": (REPO / "README.md").read_text(encoding="utf-8"),
        **{f"docs/{name}.md": (REPO / "docs" / f"{name}.md").read_text(encoding="utf-8") for name in DOC_PAGES},
    }


def test_the_readme_is_short_and_links_every_docs_page_and_each_page_opens_with_an_example():
    docs = _documents()
    readme = docs["README.md"]
    assert len(readme.splitlines()) <= 160
    for name in DOC_PAGES:
        text = docs[f"docs/{name}.md"]
        assert f"docs/{name}.md" in readme, name
        assert text.startswith("# "), name
        section = text.find("\n## ")
        assert "```bash" in text and (section == -1 or text.index("```bash") < section), f"{name}: example first"
    for path, text in docs.items():
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            assert (REPO / path).parent.joinpath(target).is_file(), f"{path} links to a missing {target}"


def test_every_documented_train_command_parses_and_its_config_is_valid(monkeypatch):
    import shlex

    from mmpt.cli.train import build_train_config, train_parser

    monkeypatch.chdir(REPO)  # recipes are named relative to the repository
    commands = []
    for path, text in _documents().items():
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "train.py" not in line:
                    continue  # another command (a python -c program may span lines)
                words = shlex.split(line, comments=True)
                if "train.py" in words and "--resume" not in words:
                    commands.append((path, words[words.index("train.py") + 1 :]))
    assert len(commands) >= 15
    for path, argv in commands:
        try:
            build_train_config(train_parser().parse_args(argv))
        except MmptError as exc:
            raise AssertionError(f"{path}: train.py {' '.join(argv)}: {exc}") from None


def _shipped_texts() -> dict[str, str]:
    """Every file a user gets with the repository that may name a module: code, docs, recipes."""
    paths = [*REPO.glob("mmpt/**/*.py"), *REPO.glob("benchmarks/**/*.py"), *REPO.glob("tests/**/*.py")]
    paths += [*REPO.glob("docs/**/*.md"), REPO / "README.md", *REPO.glob("configs/**/*.yaml")]
    return {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in paths}


def test_every_module_and_file_a_shipped_file_names_exists():
    """A dotted name (mmpt.training.build.check_run) resolves to a module and attribute, a path (mmpt/io.py) to a file:
    a moved module leaves no stale reference."""
    import importlib

    missing = set()
    for path, text in _shipped_texts().items():
        for name in set(re.findall(r"\bmmpt(?:\.[A-Za-z_]\w*)+", text)):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    found = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attribute in parts[i:]:
                    found = getattr(found, attribute, None)
                if found is None:
                    missing.add(f"{path}: {name}")
                break
        for file in set(re.findall(r"\b(?:mmpt|benchmarks|tests)/[\w/]+\.(?:py|json)\b", text)):
            if not (REPO / file).exists():
                missing.add(f"{path}: {file}")
    assert sorted(missing) == []


def test_no_shipped_file_names_a_design_file_outside_the_repository():
    """docs/architecture.md is the design; the one path outside the repository a file may name is the real-data
    folder's default location (../shared/data/medmnist, where the project's CI keeps medmnist's files)."""
    pattern = r"DESIGN\.md|STYLE\.md|\.\./shared/(?!data/medmnist)"
    named = [path for path, text in _shipped_texts().items() if re.search(pattern, text)]
    assert [path for path in named if path != "tests/test_docs.py"] == []
