"""Nothing imports a layer above its own (../shared/DESIGN.md, "Layers"), function-local imports included.

The imports are read with `ast` from the source files, so an import inside a function body counts the same as one
at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Source directory → the package it is installed as (pyproject.toml's package-dir).
SOURCE_DIRS = {"flywheel": "flywheel", "tasks": "flywheel.tasks", "flows": "flywheel.flows",
               "deployments": "flywheel.deployments"}  # fmt: skip

# Each layer and the layers it may import (its own included). Bottom to top.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "tasks": {"core", "tasks"},
    "flows": {"core", "tasks", "flows"},
    "serving": {"core", "tasks", "serving"},  # long-running services: core and tasks, never flows
    "bridge": {"core", "tasks", "bridge"},
    "deployments": {"core", "tasks", "flows", "deployments"},
    "stack": {"core", "tasks", "flows", "deployments", "serving", "bridge", "stack"},
    "cli": {"core", "tasks", "flows", "deployments", "serving", "bridge", "stack", "cli"},
}
# Packages of data files (YAML) that anything may read: they count as the bottom layer.
DATA_PACKAGES = {"specs": "core", "params": "core"}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of ours (`flywheel.tasks.data` → "tasks"); None for anything else."""
    parts = module.split(".")
    if parts[0] != "flywheel":
        return None
    if len(parts) == 1:
        return "core"  # the bare package `flywheel` (its __init__ holds only the version)
    head = parts[1]
    if head.startswith("_"):
        return "core"  # `from flywheel import __version__`
    if head in ALLOWED:
        return head
    if head in DATA_PACKAGES:
        return DATA_PACKAGES[head]
    return "unplaced:" + head


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    top, *rest = rel.parts
    parts = SOURCE_DIRS[top].split(".") + rest
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, relative ones resolved against `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from flywheel import local` imports the module flywheel.local
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    out = []
    for line, name in imported_modules(source, module, is_package):
        theirs = layer_of(name)
        if theirs is None or theirs == own or own is None or own.startswith("unplaced:"):
            continue  # not ours, or the same layer; a module outside every layer is the other test's finding
        if theirs.startswith("unplaced:") or theirs not in ALLOWED[own]:
            out.append(f"{module}:{line} ({own}) imports {name} ({theirs})")
    return out


def source_files() -> list[Path]:
    files = []
    for top in SOURCE_DIRS:
        files += sorted((ROOT / top).rglob("*.py"))
    return files


def test_every_source_file_is_in_a_layer():
    unplaced = sorted({module_name(p) for p in source_files() if str(layer_of(module_name(p))).startswith("unplaced")})
    assert not unplaced, f"modules outside every layer of DESIGN.md (move them into one): {unplaced}"


def test_nothing_imports_a_layer_above_its_own():
    found = []
    for path in source_files():
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, "upward imports:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("flywheel.tasks.gate", "from flywheel.flows.train import train"),
        ("flywheel.flows.check_drift", "def f():\n    from flywheel.serving.app import create_app\n"),
        ("flywheel.core.settings", "import flywheel.tasks.data"),
        ("flywheel.serving.app", "from ..flows import deploy"),
        ("flywheel.bridge.app", "from flywheel import cli"),
    ],
)
def test_the_checker_sees_an_upward_import(module, source):
    assert violations(source, module), f"{source!r} in {module} should be refused"


def test_the_checker_allows_downward_and_outside_imports():
    source = "import pandas\nfrom flywheel.core.spec import DatasetSpec\nfrom . import data\nfrom ..tasks import gate\n"
    assert violations(source, "flywheel.tasks.registry") == []
