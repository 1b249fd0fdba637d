"""The import structure: layers in order, no cycles, no private names across modules.

Every ``import`` of a module of the package is read (module level and inside functions, where
lazy imports live), so a new import that goes up a layer, closes a cycle or reaches for
another module's private name fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer or of layers below.
LAYERS = {
    "kernels": ["_array", "_version", "errors", "packing", "quantize", "random", "linalg"],
    "storage": ["fs", "storage", "inputs", "reader"],
    "core": ["engine", "params", "methods", "budget", "job", "api", "cluster", "datasets"],
    "checkpoint": ["checkpoint_policy", "checkpoint_index", "checkpoint"],
    "cli": ["config", "cli_common", "cli_checkpoint", "cli", "__init__"],
    "pipelines": ["pipelines.flows", "pipelines.checkpoint", "pipelines.__init__"],
}
RANK = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


def _modules() -> dict[str, Path]:
    mods = {p.stem: p for p in (ROOT / "lplr_dask").glob("*.py")}
    mods.update({f"pipelines.{p.stem}": p for p in (ROOT / "pipelines").glob("*.py")})
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of our own modules."""
    package = "pipelines" if name.startswith("pipelines.") else "lplr_dask"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and package == "lplr_dask":
                if node.module:
                    out.append((node.module.split(".")[0], names, node.lineno))
                else:  # from . import x
                    out += [(n, [], node.lineno) for n in names]
            elif node.level == 1:
                out.append((f"pipelines.{node.module}", names, node.lineno))
            elif node.module and node.module.split(".")[0] == "lplr_dask":
                parts = node.module.split(".")
                out.append((parts[1] if len(parts) > 1 else "__init__", names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "lplr_dask":
                    out.append((parts[1] if len(parts) > 1 else "__init__", [], node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _, _ in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(RANK)) == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers(module):
    up = [
        f"{module} (layer {RANK[module]}) imports {target} (layer {RANK[target]}) at line {line}"
        for target, _, line in _imports(module, _modules()[module])
        if target in RANK and RANK[target] > RANK[module]
    ]
    assert up == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_private_names_across_modules(module):
    private = [
        f"{module} line {line}: {name} from {target}"
        for target, names, line in _imports(module, _modules()[module])
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first search, as the cycle it closes."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_can_fail():
    """Lazy imports inside functions are seen, and a cycle is found when there is one."""
    graph = _graph()
    assert "job" in graph["api"]
    assert "reader" in graph["job"]  # imported inside the verify stage
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({**graph, "errors": {"cli"}})  # a kernel importing the CLI closes cycles
