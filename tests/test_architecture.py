"""The folders are the architecture (docs/architecture.md): each package imports only the packages below it in the
order that page declares, so nothing imports upward and there is no cycle between packages or modules (imports inside
functions counted); every module imports in a fresh interpreter; the settings and the sampler stay light; no module
is over 500 lines; components take plain arguments, and only the modules that adapt a Config to them read one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmpt"
ARCHITECTURE = REPO / "docs" / "architecture.md"
# where packages stop and the library's users begin: the benchmarks import the package, the package never them
OUTSIDE = ("benchmarks",)


def declared_order() -> list[str]:
    """The packages and leaf modules of mmpt/ from the bottom up, as docs/architecture.md's layer table lists them
    (its first column, between the layers markers)."""
    text = ARCHITECTURE.read_text()
    table = text.split("<!-- layers -->")[1].split("<!-- end: layers -->")[0]
    return [m.group(1) for m in re.finditer(r"^\| `([a-z_]+)(?:/|\.py)?` \|", table, re.M)]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])}


def unit(module: str) -> str:
    """The package (or leaf module) of mmpt/ that `module` belongs to: mmpt.model.net -> model, mmpt.io -> io."""
    parts = module.split(".")
    if parts[0] in OUTSIDE:
        return parts[0]
    return parts[1] if len(parts) > 1 else "mmpt"


def imports(module: str) -> set[str]:
    """The modules of the package `module` imports anywhere in its file (functions included)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mmpt"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mmpt":
            for alias in node.names:  # from mmpt.runs import checkpoint: the submodule itself
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), f"{module}: relative import"
    return found


def test_the_architecture_page_declares_every_package_once():
    order = declared_order()
    present = sorted({unit(m) for m in MODULES if m.startswith("mmpt.")})
    assert len(order) == len(set(order)), f"docs/architecture.md lists a package twice: {order}"
    assert sorted(order) == present, (
        f"docs/architecture.md's layer table must list exactly mmpt's packages and leaf modules: {present}"
    )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("mmpt.")))
def test_a_package_imports_only_the_packages_below_it(module):
    order = declared_order()
    level = {name: i for i, name in enumerate(order)}
    mine = unit(module)
    upward = sorted(
        f"{other} ({unit(other)})"
        for other in imports(module)
        if unit(other) != mine and unit(other) in level and level[unit(other)] > level.get(mine, -1)
    )
    assert not upward, f"{module} ({mine}) imports upward, against docs/architecture.md's order: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("mmpt.")))
def test_the_package_never_imports_what_lies_outside_it(module):
    outside = sorted(m for m in imports(module) if unit(m) in OUTSIDE)
    assert not outside, f"{module} imports {outside}: the benchmarks build on the package, never the reverse"


def test_the_module_import_graph_has_no_cycle():
    graph = {m: [o for o in imports(m) if o in MODULES and o != m] for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in graph[module]:
            if state.get(other) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(other) :], other]))
            if other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_at_most_six_modules_lie_directly_in_the_package():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= 6, f"mmpt/ holds {flat}: put a module in the package that owns its concept"


# Components take plain arguments; these modules adapt a whole Config to them (docs/architecture.md)
ADAPTERS = {
    "mmpt.model.build",  # the model of a config
    "mmpt.model.weights",  # reads the config a saved run recorded
    "mmpt.model.export",  # writes the card from the recorded config
    "mmpt.evaluation.probe",  # the probe's features from a run's recorded config
    "mmpt.training.build",  # the sampler, optimizers, method and step of a config
    "mmpt.training.setup",  # the run's setup from its config
    "mmpt.training.loop",  # the loop reads its settings
    "mmpt.training.state",  # checkpoints carry the config; resume compares it
    "mmpt.training.log",  # the start lines describe the config
}
COMPONENT_PACKAGES = ("runtime", "data", "model", "mtl", "evaluation", "training")


COMPONENTS = sorted(m for m in MODULES if m.startswith("mmpt.") and unit(m) in COMPONENT_PACKAGES and m not in ADAPTERS)


@pytest.mark.parametrize("module", COMPONENTS)
def test_components_take_plain_arguments_not_the_whole_config(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    takes = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("mmpt.config")
        and any(alias.name == "Config" for alias in node.names)
    ]
    assert not takes, f"{module} takes a whole Config; adapt it in a build module (mmpt.model.build, training.build)"


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    _fresh("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in names))


def test_the_settings_and_the_sampler_load_no_component_and_no_torchjd():
    loaded = _fresh(
        "import sys, mmpt.config.docs, mmpt.data.sampler\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('mmpt', 'torchjd', 'timm'))))"
    ).split()
    light = {"mmpt", "mmpt.errors", "mmpt.io", "mmpt.tasks", "mmpt.data", "mmpt.data.sampler"}
    assert [m for m in loaded if m not in light and not m.startswith("mmpt.config")] == []


MAX_LINES = 500  # one responsibility per module: past this, a module has two and is split along its seam


def test_no_module_is_over_500_lines():
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in MODULES.values()}
    assert len(sizes) > 50  # the whole package was read
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
