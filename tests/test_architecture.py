"""The package's architecture, checked: layers only point down, no import cycles, short modules.

Every import counts, also the ones inside functions (an import hidden in a function still ties two modules) and
the type-only ones under `if TYPE_CHECKING:` (a module annotated with another's type depends on its concept:
that is how `evaluation.config` and `evaluation.tasks` once formed a circle no import ran).
The layers, low to high (README "Where things are"): a module may import its own layer and the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "illada_lightning"

# Sub-package (or top-level module) -> layer. Lower numbers are lower layers.
LAYERS = {
    "options": 0, "provenance": 0, "logs": 0, "redact": 0,
    "model": 1, "config": 1,  # the config loader knows the model presets (`model=<preset>`)
    "diffusion": 2,
    "data": 3,
    "checkpoint": 4, "interop": 4, "runs": 4, "budget": 4,
    "training": 5,
    "evaluation": 6,
    "experiment": 7,
    "sweeps": 8, "reporting": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, source: str | None = None) -> set[str]:
    """Package modules that `name` imports (its file, or `source` as if it were that file), anywhere in it:
    function-local and `if TYPE_CHECKING:` imports included, relative imports resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text() if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` depends on pkg.sub; `from pkg.mod import name` on pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("illada_lightning"):
                found.add(target)
    return found


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
    assert not unplaced, f"add these to LAYERS (and to the README's layer table): {unplaced}"


def test_layers_only_point_down():
    upward = [f"{m} -> {d}" for m in MODULES for d in imported_modules(m)
              if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: imported_modules(m) for m in MODULES}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 400, f"{MODULES[name]} has {lines} lines; split it by concept"


def test_the_checker_sees_function_local_imports(tmp_path):
    """The cycle and layer checks would be blind without this: an import inside a function is found."""
    found = imported_modules("illada_lightning.evaluation.backends")
    assert "illada_lightning.diffusion.scoring" in found or "illada_lightning.diffusion" in found


def test_the_checker_sees_type_only_imports():
    """A task annotated with the evaluation config's type ties tasks to the config that asks the task registry:
    the cycle check must see it although the import never runs."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import EvalConfig\n"
    assert "illada_lightning.evaluation.config" in imported_modules("illada_lightning.evaluation.tasks", source)


def test_tasks_own_their_names_and_never_import_the_evaluation_config():
    config = "illada_lightning.evaluation.config"
    assert "illada_lightning.evaluation.tasks" in imported_modules(config)  # the config asks the registry
    task_modules = ["illada_lightning.evaluation.tasks", *sorted(imported_modules("illada_lightning.evaluation.tasks"))]
    importers = [m for m in task_modules if m.startswith("illada_lightning.evaluation") and config in imported_modules(m)]
    assert not importers, f"tasks importing the evaluation config (read `examples.TaskSettings` instead): {importers}"
