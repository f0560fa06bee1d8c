"""Imports point down the declared layer order only, and no module imports itself back (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import meshweave
from meshweave.layers import LAYERS

ROOT = Path(meshweave.__file__).parent


def _package_of(module: str) -> str | None:
    """'meshweave.core.batch' -> 'core'; None for modules outside meshweave."""
    parts = module.split(".")
    return parts[1] if parts[0] == "meshweave" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every meshweave module imported by `path` (module level and inside functions), with its line."""
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(anchor + ([base] if base else []))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names] + [(base, node.lineno)]
    return [(name, line) for name, line in found if name.startswith("meshweave")]


def _layer_index() -> dict[str, int]:
    return {package: i for i, layer in enumerate(LAYERS) for package in layer}


def test_every_package_and_top_level_module_is_in_the_declared_order():
    index = _layer_index()
    present = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert present - set(index) == set(), "add new packages to meshweave/layers.py"


def test_imports_point_down_the_layer_order():
    index, wrong = _layer_index(), []
    for path in sorted(ROOT.rglob("*.py")):
        own = _package_of(_module_name(path))
        if own is None:  # meshweave/__init__.py
            continue
        for name, line in _imports(path):
            other = _package_of(name)
            if other is None or other == own or other not in index:
                continue
            if index[other] <= index[own]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({own}) imports {name} ({other})")
    assert wrong == [], "imports against the layer order:\n" + "\n".join(wrong)


def test_no_module_import_cycles():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        targets = {name for name, _ in _imports(path)}
        # "from pkg import name" names a submodule only when one exists
        graph[_module_name(path)] = {t for t in targets if t in modules and t != _module_name(path)}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_check_catches_an_upward_import(tmp_path):
    """A hand mutation: an import from models/ into train/ must be reported."""
    fake = ROOT / "models" / "_upward_probe.py"
    fake.write_text("from meshweave.train.build import build_trainer\n")
    try:
        try:
            test_imports_point_down_the_layer_order()
        except AssertionError as err:
            assert "models/_upward_probe.py:1 (models) imports meshweave.train.build" in str(err)
        else:
            raise AssertionError("the upward import was not caught")
    finally:
        fake.unlink()
