"""Package layering: every import runs down the subpackage order of docs/layout.md, and no module or subpackage is in
an import cycle, function-local imports included."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eakd_llm"
# The subpackages bottom to top (docs/layout.md): a module may import from its own subpackage and those before it.
# ``_version`` and ``_atomic`` are leaves every layer may use; the package root and the command line (``cli``) sit on
# top.
LAYERS = ("_version", "_atomic", "loss", "config", "data", "models", "teacher", "training", "evaluation", "studies",
          "cli", "")


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


def layer_of(module: str) -> str:
    """The layer of a module: its subpackage (``data.prompts`` -> ``data``), or the root module's own name."""
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Every import from a layer above the importer's own, as ``"a.x -> b.y (a below b)"``."""
    rank = {name: i for i, name in enumerate(layers)}
    return [f"{module} -> {target} ({layer_of(module)} below {layer_of(target)})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if rank[layer_of(target)] > rank[layer_of(module)]]


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between layers (imports inside one layer left out)."""
    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layers.setdefault(layer_of(module), set()).update(
            layer_of(t) for t in targets if layer_of(t) != layer_of(module))
    return layers


def test_layer_checker_sees_an_upward_import():
    graph = {"loss.a": {"config.b"}, "config.b": {"loss.a"}, "data.c": {"loss.a"}, "cli": {"data.c"}}
    assert upward_imports(graph) == ["loss.a -> config.b (loss below config)"]
    assert cycles(layer_graph(graph)) == [["config", "loss"]]
    assert upward_imports({"data.c": {"loss.a"}, "loss.a": set()}) == []


def test_every_module_sits_in_a_known_layer():
    graph = import_graph()
    unknown = sorted(m for m in graph if layer_of(m) not in LAYERS)
    assert unknown == [], f"modules outside the layers of docs/layout.md (add the subpackage to LAYERS): {unknown}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"_version", "_atomic", "cli", ""}


def test_imports_run_down_the_layers():
    graph = import_graph()
    assert "data.prompts" in graph["data.dataset"] and "loss.distillation" in graph["config.eakd_config"]
    assert upward_imports(graph) == []


def test_no_import_cycles():
    graph = import_graph()
    assert {"data.dataset", "evaluation.protocol", "models.generation", "data.prompts"} <= set(graph)
    assert "data.prompts" in graph["data.dataset"] and "data.dataset" in graph["models.generation"]
    found = cycles(graph)
    assert found == [], f"import cycles: {found}"
    assert cycles(layer_graph(graph)) == []


def test_data_layer_imports_neither_evaluation_nor_generation():
    graph = import_graph()
    assert not {"evaluation.protocol", "models.generation"} & graph["data.dataset"]
    assert not {"data.dataset", "evaluation.protocol", "models.generation"} & graph["data.prompts"]


def test_loss_layer_is_pure_torch():
    """The loss subpackage loads without transformers (the root's public names are imported on first use)."""
    code = ("import sys, eakd_llm.loss.chunked, eakd_llm.loss.distillation; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", ["EAKDConfig", "EAKDTrainer", "LossSettings", "distillation_loss",
                                  "fused_distillation_loss", "ConfigError", "LMHead", "SparseTeacher", "load_recipe",
                                  "run_training"])
def test_public_names_from_the_package_root(name):
    import eakd_llm

    module = importlib.import_module(f"eakd_llm.{eakd_llm._PUBLIC[name]}")
    assert getattr(eakd_llm, name) is getattr(module, name)
    assert name in dir(eakd_llm)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eakd_llm.nope  # noqa: B018
