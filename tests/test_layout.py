"""The package layout: imports go only down the layers, no module imports itself back, and no module reaches into another's private names.

Layers, lowest first: ``core`` (devices, I/O, errors, Dask plumbing),
``subject`` (confounds, physio, QC, denoising), ``stats`` (group statistics;
pure array code plus randomise's file wrappers), ``maps`` (regions, series
I/O, seed, ROI, ICA, dual regression: dual regression's stage 2 Z and stage 3
randomise use ``stats``), and ``study`` (the study runner, report and demo). Every import counts, at
module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gpuconn
import gpuconn.cli

PACKAGE = Path(gpuconn.__file__).parent
LAYERS = {"gpuconn": 0, "core": 0, "subject": 1, "stats": 2, "maps": 3, "study": 4}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("gpuconn", *parts)).removesuffix(".__init__")
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gpuconn modules ``name`` imports (a ``from pkg import module`` counts as the module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gpuconn")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("gpuconn"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found - {name}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["gpuconn"]


def test_every_module_has_a_layer():
    assert all(name.split(".")[1] in LAYERS for name in _modules() if name != "gpuconn")


def test_imports_only_go_down_the_layers():
    modules = _modules()
    upward = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in _imports(name, path, modules)
        if _layer(target) > _layer(name)
    ]
    assert not upward, upward


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) & set(modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _private_uses(path: Path) -> list[str]:
    """Private names (``_x``) this file takes from a gpuconn module: imported, or read as ``module._x``."""
    tree = ast.parse(path.read_text())
    modules = set()  # local names bound to gpuconn modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gpuconn")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name.startswith("gpuconn")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    """Seams between modules are public names (the issue's ``_host``/``_run_loop``/``_as_batch`` kind of reach-in)."""
    cli = Path(gpuconn.cli.__file__).parent  # installed as gpuconn.cli, from the repository's cli/
    paths = set(PACKAGE.rglob("*.py")) | set(cli.glob("*.py"))
    found = [use for path in sorted(paths) for use in _private_uses(path)]
    assert not found, found


def test_nothing_imports_click():
    """typer vendors its own click and gpuconn does not depend on click: an import of it fails on a fresh install."""
    cli = Path(gpuconn.cli.__file__).parent
    found = [f"{path.name}:{node.lineno}" for path in sorted(set(PACKAGE.rglob("*.py")) | set(cli.glob("*.py")))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "click" for a in node.names)
             or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "click" and not node.level]
    assert not found, found
