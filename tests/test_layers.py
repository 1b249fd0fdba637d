"""The import structure: folders are layers in order, no cycles, no private names across modules.

Every ``import`` of a module of the project is read (module level and inside functions, where
lazy imports live), so a new import that goes up a layer, closes a cycle or reaches for
another module's private name fails here. Module names are dotted paths from the repository
root (``lplr_dask.core.job``, ``pipelines.flows``); a folder's ``__init__`` is the folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own layer or of layers below. Folders are
# layers; the few modules at the top of the package are placed explicitly.
LAYERS = [
    ("base", ["lplr_dask.errors", "lplr_dask._version"]),
    ("kernels", ["lplr_dask.kernels"]),
    ("storage", ["lplr_dask.storage"]),
    ("core", ["lplr_dask.core", "lplr_dask.cluster", "lplr_dask.datasets"]),
    ("checkpoint", ["lplr_dask.checkpoint"]),
    ("pipelines", ["pipelines"]),
    ("cli", ["lplr_dask.cli"]),
    ("api", ["lplr_dask"]),  # the package's __init__: the public API
]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("lplr_dask", "pipelines"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _layer(module: str) -> int:
    """Index in LAYERS of the longest prefix that names a layer."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} has no layer"
    return rank


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the project's modules."""
    mods = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] not in ("lplr_dask", "pipelines"):
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{module}.{n}" in mods]  # from pkg import submodule
            out += [(f"{module}.{n}", [], node.lineno) for n in subs]
            if len(subs) < len(names):
                out.append((module, [n for n in names if n not in subs], node.lineno))
        elif isinstance(node, ast.Import):
            out += [
                (a.name, [], node.lineno)
                for a in node.names
                if a.name.split(".")[0] in ("lplr_dask", "pipelines")
            ]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _, _ in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert (
        sorted(m for m in _modules() if not any(m.startswith(p) for _, ps in LAYERS for p in ps))
        == []
    )


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers(module):
    mods = _modules()
    up = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
        f"({LAYERS[_layer(target)][0]}) at line {line}"
        for target, _, line in _imports(module, mods[module])
        if _layer(target) > _layer(module)
    ]
    assert up == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_private_names_across_modules(module):
    private = [
        f"{module} line {line}: {name or target} from {target}"
        for target, names, line in _imports(module, _modules()[module])
        for name in names or [""]
        if (name.startswith("_") and not name.startswith("__"))
        or any(p.startswith("_") and p != "_version" for p in target.split("."))
    ]
    assert private == []


def test_every_import_names_a_module_that_exists():
    mods = _modules()
    missing = [
        f"{module} line {line}: {target}"
        for module, path in mods.items()
        for target, _, line in _imports(module, path)
        if target not in mods
    ]
    assert missing == []


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
    """Lazy imports inside functions are seen, a cycle is found when there is one, and an
    import up the layers is placed above its importer."""
    graph = _graph()
    assert "lplr_dask.core.job" in graph["lplr_dask.core.compress"]
    assert "lplr_dask.storage.reader" in graph["lplr_dask.core.job"]  # inside the verify stage
    assert "pipelines.flows" in graph["lplr_dask.cli.main"]  # `lplr run`, imported lazily
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({**graph, "lplr_dask.errors": {"lplr_dask.cli.main"}})
    assert _layer("lplr_dask.kernels.quantize") < _layer("lplr_dask.core.engine")
    assert _layer("lplr_dask.checkpoint.run") > _layer("lplr_dask.storage.fs")
