"""The package's import graph: no cycles, every import points to the same or a lower layer, and
sibling modules are imported at the top of files.

Function-local imports count as edges too: a cycle hidden inside a function is still a cycle.
`make lint` runs this file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmsens"

# Bottom to top (docs/DESIGN.md, "Layers"). A module may import its own layer or a lower one.
LAYERS = {
    "core": {"vlmsens", "errors", "io", "failures", "logs", "formats", "scopes", "families", "preflight", "config", "provenance", "handoff"},
    "data": {"calib", "batches", "models", "attention", "kernels", "vision_reuse", "vision_geometry", "prefix_reuse", "demo", "exported"},
    "compute": {"calibration", "autoquant", "validation", "recipes", "ladder", "export"},
    "presentation": {"render", "reports"},
    "jobs": {"cell", "cli", "worker", "gpupool"},
}
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in LAYERS[layer]}
# Only these load inside functions: they are slow to import and some need the environment set first.
HEAVY = ("torch", "transformers", "modelopt", "liger_kernel")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(module: str, package: Path) -> bool:
    rel = Path(*module.split(".")[1:])
    return (package / rel).with_suffix(".py").is_file() or (package / rel / "__init__.py").is_file()


def targets_of(node: ast.AST, path: Path, package: Path = PACKAGE) -> set[str]:
    """The package modules one import statement of ``path`` names (``vlmsens.x.y`` form)."""
    name = module_name(path, package)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == package.name}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
    elif node.module and node.module.split(".")[0] == package.name:
        base = node.module
    else:
        return set()
    # `from . import x` / `from .reports import doc` name submodules when such files exist.
    return {f"{base}.{a.name}" if _exists(f"{base}.{a.name}", package) else base for a in node.names}


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file."""
    found = set().union(*(targets_of(node, path, package) for node in ast.walk(ast.parse(path.read_text(), str(path)))))
    return found - {module_name(path, package)}


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


def _imports_heavy_at_top(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level]
    return any(name.split(".")[0] in HEAVY for name in names)


def lazy_sibling_imports(package: Path = PACKAGE) -> list[str]:
    """Package imports made inside functions, except of modules that import torch & co. at their top."""
    heavy = {module_name(p, package) for p in package.rglob("*.py") if _imports_heavy_at_top(p)}
    heavy.add(package.name)  # `from .. import reports` in the registry names the package, not a module
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if id(node) in top:
                continue
            lazy = {t for t in targets_of(node, path, package) if t not in heavy and t != f"{package.name}.reports"}
            if lazy:
                found.append(f"{module_name(path, package)}:{node.lineno} imports {', '.join(sorted(lazy))}")
    return found


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


def test_sibling_imports_sit_at_the_top_of_files():
    lazy = lazy_sibling_imports()
    assert not lazy, "import these at the top of the file (only torch, transformers, ModelOpt and Liger Kernel load lazily): " + "; ".join(lazy)


def test_the_checks_see_hidden_cycles_upward_and_lazy_imports(tmp_path):
    package = tmp_path / "vlmsens"
    (package / "reports").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "recipes.py").write_text("def f():\n    from .reports.doc import Doc\n")
    (package / "reports" / "__init__.py").write_text("")
    (package / "reports" / "doc.py").write_text("from ..validation import verdict_row\n")
    (package / "validation.py").write_text("def g():\n    from vlmsens import recipes\n")
    (package / "attention.py").write_text("import torch\n")
    (package / "models.py").write_text("def h():\n    from .attention import x\n")
    graph = import_graph(package)
    assert graph["vlmsens.recipes"] == {"vlmsens.reports.doc"}
    assert graph["vlmsens.validation"] == {"vlmsens.recipes"}
    assert find_cycle(graph) == ["vlmsens.recipes", "vlmsens.reports.doc", "vlmsens.validation", "vlmsens.recipes"]
    assert [line.split(" ")[0] for line in lazy_sibling_imports(package)] == ["vlmsens.recipes:2", "vlmsens.validation:2"]
    (package / "validation.py").write_text("import math\n")
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("module", ["vlmsens.cell", "vlmsens.gpupool"])
def test_job_modules_import_without_torch(module):
    """Snakefile parsing, the report jobs and the GPU job scripts import these (and every analysis)
    before the GPU slot and the extension cache are set up: torch stays a lazy import below them."""
    code = (f"import sys, {module}, vlmsens.reports.registry as r; r.analyses(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)
