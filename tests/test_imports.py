"""The daemon's layers: no module imports a layer above it, and no import cycle.

Every ``import`` in ``managerd/`` counts, including those inside functions
and under ``TYPE_CHECKING`` (a type-only cycle is still a cycle to a
reader). The layer of a module is read from its path (``LAYERS`` below);
README.md's layout section draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "managerd"

#: Layers bottom to top; a module may import its own layer or a lower one.
#: The first prefix that matches a module's name gives its layer.
LAYERS: list[tuple[str, int]] = [
    ("managerd.safepickle", 0),
    ("managerd.histogram", 0),
    ("managerd.store", 1),
    ("managerd.service", 2),
    ("managerd.wire", 3),
    ("managerd", 4),  # the edge: server, osutil, metrics, status, browse, cli, settings
]
LAYER_NAMES = {0: "base", 1: "store", 2: "service", 3: "wire", 4: "edge"}
#: The layer packages, each with a docstring that states what it may import.
LAYER_PACKAGES = (
    "managerd.store",
    "managerd.store.memory",
    "managerd.store.etcd",
    "managerd.service",
    "managerd.wire",
)

#: ``store.memory`` is the store's inside: service/ and wire/ see only the
#: store's interface (``store.interface``, ``store.api``, ``store.stats``,
#: ``store.sessions``). An exception would be listed here, with its reason.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The managerd module ``name`` names (a name imported from a module: the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every managerd module ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # ``from managerd.store import api`` imports the module store.api.
            names = [f"{source}.{alias.name}" for alias in node.names] + [source]
        for name in names:
            if name == "managerd" or name.startswith("managerd."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    # ``from managerd.store.api import X`` also names the packages on the way;
    # only the deepest module counts.
    return {t for t in found if not any(o != t and o.startswith(t + ".") for o in found)}


GRAPH: dict[str, set[str]] = {m: imports_of(m) for m in MODULES}


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer")


def test_the_graph_sees_imports_everywhere() -> None:
    """The parser finds function-level and TYPE_CHECKING imports (it would miss cycles else)."""
    assert "managerd.server" in GRAPH["managerd.cli"]  # cli imports server inside a function
    assert "managerd.wire.connection" in GRAPH["managerd.server"]
    assert len(MODULES) > 30


def test_no_upward_import() -> None:
    upward = [
        f"{m} ({LAYER_NAMES[layer_of(m)]}) imports {t} ({LAYER_NAMES[layer_of(t)]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_service_and_wire_stay_out_of_store_memory() -> None:
    reaching = {
        (m, t)
        for m, targets in GRAPH.items()
        for t in targets
        if layer_of(m) in (2, 3) and t.startswith("managerd.store.memory")
    }
    assert sorted(reaching - ALLOWED) == []
    # An exception no longer needed is taken off the list.
    assert sorted(ALLOWED - reaching) == []


#: Edge modules that show the daemon's state: they read the store's stats
#: snapshots (``store/stats.py``), never the memory store's objects.
STATS_READERS = ("managerd.metrics", "managerd.status", "managerd.browse")


def test_status_and_metrics_read_only_the_store_interface() -> None:
    reaching = {
        (m, t) for m in STATS_READERS for t in GRAPH[m] if t.startswith("managerd.store.memory")
    }
    assert sorted(reaching) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("package", LAYER_PACKAGES)
def test_layer_package_states_its_rule(package: str) -> None:
    path = MODULES[package]
    assert path.name == "__init__.py"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "May import" in doc, f"{path} does not say what it may import"
    assert "Never" in doc, f"{path} does not say what it may not import"
