"""The package's import graph: no cycles, and every import points to the same or a lower layer.

Function-local imports count as edges too: a cycle hidden inside a function is still a cycle.
`make lint` runs this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmsens"

# Bottom to top (docs/DESIGN.md, "Layers"). A module may import its own layer or a lower one.
LAYERS = {
    "core": {"vlmsens", "errors", "io", "logs", "formats", "scopes", "families", "config", "provenance"},
    "data": {"calib", "batches", "models", "attention", "demo"},
    "compute": {"autoquant", "validation", "recipes"},
    "presentation": {"render", "reports"},
    "jobs": {"cell", "cli", "gpupool"},
}
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in LAYERS[layer]}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file (``vlmsens.x.y`` form)."""
    name = module_name(path, package)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package.name}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == package.name:
                base = node.module
            else:
                continue
            # `from . import x` / `from .reports import doc` name submodules when such files exist.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate, package) else base)
    return {m for m in found if m != name}


def _exists(module: str, package: Path) -> bool:
    rel = Path(*module.split(".")[1:])
    return (package / rel).with_suffix(".py").is_file() or (package / rel / "__init__.py").is_file()


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, package): imports_of(p, package) for p in sorted(package.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    missing = sorted({layer_of(m) for m in import_graph()} - set(LEVEL))
    assert not missing, f"modules without a layer: {missing}; add them to LAYERS in tests/test_imports.py and docs/DESIGN.md"


def test_imports_point_down_the_layers():
    upward = [
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if LEVEL.get(layer_of(dst), -1) > LEVEL.get(layer_of(src), len(LAYERS))
    ]
    assert not upward, "imports against the layer order (core → data → compute → presentation → jobs): " + ", ".join(sorted(upward))


def test_the_checks_see_hidden_cycles_and_upward_imports(tmp_path):
    package = tmp_path / "vlmsens"
    (package / "reports").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "recipes.py").write_text("def f():\n    from .reports.doc import Doc\n")
    (package / "reports" / "__init__.py").write_text("")
    (package / "reports" / "doc.py").write_text("from ..validation import verdict_row\n")
    (package / "validation.py").write_text("def g():\n    from vlmsens import recipes\n")
    graph = import_graph(package)
    assert graph["vlmsens.recipes"] == {"vlmsens.reports.doc"}
    assert graph["vlmsens.validation"] == {"vlmsens.recipes"}
    assert find_cycle(graph) == ["vlmsens.recipes", "vlmsens.reports.doc", "vlmsens.validation", "vlmsens.recipes"]
    (package / "validation.py").write_text("import math\n")
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("module", ["vlmsens.recipes", "vlmsens.validation", "vlmsens.reports.doc"])
def test_library_modules_import_without_torch(module):
    """Snakefile parsing and the report jobs import these; torch stays a lazy import there."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    subprocess.run([sys.executable, "-c", code], check=True)
