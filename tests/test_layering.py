"""Module layering: no import cycles among eakd_llm's modules, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eakd_llm"
# Cycles elsewhere in the package are being removed separately; delete the filter line in test_no_import_cycles to
# check the whole package.


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path, root)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "eakd_llm":
                target = node.module.removeprefix("eakd_llm").lstrip(".")
            else:
                continue
            candidates = [target] + [f"{target}.{alias.name}".lstrip(".") for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name.removeprefix("eakd_llm").lstrip(".") for a in node.names
                          if a.name.split(".")[0] == "eakd_llm"]
        else:
            continue
        found.update(c for c in candidates if c in modules and c != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_function_local_and_absolute_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "x.py").write_text("def f():\n    from .y import g\n")
    (tmp_path / "y.py").write_text("import eakd_llm.x\nfrom . import z\nfrom eakd_llm import os\n")
    assert imported_modules(tmp_path / "x.py", {"x", "y", "z"}, tmp_path) == {"y"}
    assert imported_modules(tmp_path / "y.py", {"x", "y", "z"}, tmp_path) == {"x", "z"}


def test_no_import_cycles():
    graph = import_graph()
    assert {"data", "evaluation", "generation", "prompts"} <= set(graph)
    assert "prompts" in graph["data"] and "data" in graph["generation"]  # the graph really holds the imports
    found = cycles(graph)
    assert found == [], f"import cycles: {found}"


def test_data_layer_imports_neither_evaluation_nor_generation():
    graph = import_graph()
    assert not {"evaluation", "generation"} & graph["data"]
    assert not {"data", "evaluation", "generation"} & graph["prompts"]
