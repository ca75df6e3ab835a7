"""Layers point down (DESIGN.md): every module of the package imports only modules of its own layer or below,
the import graph has no cycle, every module imports in a fresh interpreter, and the light paths stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmpt"

# From the bottom up, as DESIGN.md's module table and "Layers point down" describe them. A module may import
# modules of its own layer and of the layers below, never of a layer above.
LAYERS: dict[str, set[str]] = {
    # imports no component: the errors, files, the validator, the task specs, backbone names, and the light
    # registries the schema takes its choices from
    "foundation": {
        "mmpt",
        "mmpt.errors",
        "mmpt.io",
        "mmpt.settings",
        "mmpt.tasks",
        "mmpt.choices",
        "mmpt.backbones",
        "mmpt.mtl",
        "mmpt.mtl.methods",
    },
    # the schema: one declaration per setting, and the docs generated from it
    "schema": {"mmpt.config", "mmpt.config_rules", "mmpt.launchconfig", "mmpt.configdoc"},
    # components: plain arguments in, no whole Config
    "components": {
        "mmpt.data",
        "mmpt.data.store",
        "mmpt.data.synthetic",
        "mmpt.data.sampler",
        "mmpt.data.loader",
        "mmpt.data.transforms",
        "mmpt.model",
        "mmpt.norm",
        "mmpt.norm_calibration",
        "mmpt.norm_transfer",
        "mmpt.losses",
        "mmpt.mtl.base",
        "mmpt.mtl.static",
        "mmpt.mtl.scalarizers",
        "mmpt.mtl.aggregators",
        "mmpt.mtl.build",
        "mmpt.mtl.torchjd_state",
        "mmpt.optim",
        "mmpt.precision",
        "mmpt.step",
        "mmpt.conflicts",
        "mmpt.distributed",
        "mmpt.checkpoint",
        "mmpt.weights",
        "mmpt.metrics",
        "mmpt.predict",
        "mmpt.report",
        "mmpt.plots",
        "mmpt.runnames",
        "mmpt.rundir",
        "mmpt.seriesdir",
        "mmpt.runtime",
    },
    # the recipes: a config adapted to the components, the training and evaluation loops
    "recipe": {"mmpt.recipe", "mmpt.train", "mmpt.trainstate", "mmpt.trainlog", "mmpt.evaluate"},
    # built on the recipes: series, compare, probes, export
    "experiments": {
        "mmpt.experiments",
        "mmpt.experiments.members",
        "mmpt.experiments.series",
        "mmpt.experiments.summary",
        "mmpt.experiments.stats",
        "mmpt.experiments.delta_m",
        "mmpt.experiments.compare",
        "mmpt.experiments.compare_report",
        "mmpt.experiments.probe",
        "mmpt.experiments.export",
        "mmpt.experiments.status",
        "mmpt.experiments.launch_plan",
        "mmpt.experiments.member_job",
        "mmpt.experiments.launcher",
        "mmpt.experiments.probe_launch",
    },
    # what a user runs
    "entry points": {
        "mmpt.cli",
        "mmpt.cli.common",
        "mmpt.cli.train",
        "mmpt.cli.evaluate",
        "mmpt.bench",
        "mmpt.bench.__main__",
        "mmpt.bench.common",
        "mmpt.bench.compare",
        "mmpt.bench.data",
        "mmpt.bench.datafiles",
        "mmpt.bench.launcher",
        "mmpt.bench.gpu",
        "mmpt.bench.gpu_checks",
        "mmpt.bench.gpu_context",
        "mmpt.bench.loops",
        "mmpt.bench.train",
        "mmpt.bench.train_mtl",
        "mmpt.bench.train_report",
    },
}
LEVEL = {module: level for level, modules in enumerate(LAYERS.values()) for module in modules}
NAME = dict(enumerate(LAYERS))
# a component that reads what a run recorded: a saved config, as the checkpoint and the export hold it
READS_RECORDED_CONFIG = {"mmpt.weights"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> dict[str, list[str]]:
    """The package modules `module` imports anywhere in its file (functions included) -> the names it takes."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: dict[str, list[str]] = {}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mmpt":
                    found.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base.split(".")[0] != "mmpt":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:  # from mmpt import checkpoint
                    found.setdefault(submodule, [])
                else:
                    found.setdefault(base, []).append(alias.name)
    return found


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(LEVEL))
    assert not missing, f"put each module in a layer of LAYERS in tests/test_layers.py: {missing}"
    gone = sorted(set(LEVEL) - set(MODULES))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_and_those_below(module):
    upward = [
        f"{other} ({NAME[LEVEL[other]]})"
        for other in imports(module)
        if other in LEVEL and LEVEL[other] > LEVEL.get(module, 0)
    ]
    assert not upward, f"{module} ({NAME[LEVEL[module]]}) imports a higher layer: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(LAYERS["components"] - READS_RECORDED_CONFIG))
def test_components_take_plain_arguments_not_the_whole_config(module):
    names = imports(module).get("mmpt.config", [])
    assert "Config" not in names, f"{module} takes a Config; adapt it in the recipe layer (mmpt.recipe)"


def test_the_import_graph_has_no_cycle():
    graph = {m: [o for o in imports(m) if o in MODULES and o != m] for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in graph[module]:
            if state.get(other) == 1:
                cycle = [*path[path.index(other) :], other] if other in path else [module, other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if m != "mmpt.bench.__main__")
    _fresh("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in names))


def test_the_schema_and_the_sampler_load_no_component_and_no_torchjd():
    loaded = _fresh(
        "import sys, mmpt.configdoc, mmpt.data.sampler\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('mmpt', 'torchjd', 'timm'))))"
    ).split()
    allowed = LAYERS["foundation"] | LAYERS["schema"] | {"mmpt.data", "mmpt.data.sampler"}
    assert [m for m in loaded if m not in allowed] == []


MAX_LINES = 500  # one responsibility per module: past this, a module has two and is split along its seam


def test_no_module_is_over_500_lines():
    sizes = {
        path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50  # the whole package was read
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
