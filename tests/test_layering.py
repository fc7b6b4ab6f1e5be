"""The layering the architecture promises, read from the source: flows → rapm_core / planner →
storage, the testing builders never imported by the product, and no import cycle between modules
(function-level imports included; ``if TYPE_CHECKING:`` blocks excluded, they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "rapm_core", "storage", "planner", "rapm_shapes", "rapm_testing")
# (importer, imported) top-level packages that must never meet.
FORBIDDEN = {("storage", "rapm_core"), ("storage", "flows"), ("storage", "planner"), ("rapm_core", "flows"),
             ("rapm_core", "planner"), ("planner", "flows"), ("rapm_core", "rapm_shapes"), ("storage", "rapm_shapes")}
PRODUCT = ("flows", "rapm_core", "storage", "planner", "rapm_shapes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found |= _imports(node)
    return found


def _graph() -> nx.DiGraph:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, m) for m in _imports(ast.parse(path.read_text(encoding="utf-8"))) if m in modules)
    return graph


def test_no_module_imports_across_a_forbidden_layer_boundary():
    top = lambda m: m.split(".")[0]  # noqa: E731
    crossing = sorted((a, b) for a, b in _graph().edges
                      if (top(a), top(b)) in FORBIDDEN or (top(b) == "rapm_testing" and top(a) in PRODUCT))
    assert crossing == []


def test_no_import_cycles_between_modules():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert cycles == []
