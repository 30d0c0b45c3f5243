"""The package layers of DESIGN.md hold: pallas_kernels < model < sharding < train < rl <
experiments. No module imports a package above its own (not even lazily inside a function),
and the packages' import graph has no cycle. Read from the source with `ast`, so an import
that only runs on one backend or code path counts too."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pallas_kernels", "model", "sharding", "train", "rl", "experiments")
RANK = {name: i for i, name in enumerate(LAYERS)}


class Edge(NamedTuple):
    """One import of package `target` by a module of package `source`."""

    where: str  # file:line
    source: str
    target: str
    module: str


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside its own package.
            module = package if node.level else node.module or ""
            out.append((node.lineno, module))
    return out


def edges_of(source: str, path: str, package: str) -> list[Edge]:
    """The imports of other layered packages in one file's source."""
    out = []
    for line, module in imported_modules(ast.parse(source, path), package):
        target = module.split(".")[0]
        if target in RANK and target != package:
            out.append(Edge(f"{path}:{line}", package, target, module))
    return out


def all_edges() -> list[Edge]:
    out = []
    for package in LAYERS:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"no Python files under {package}/"
        for path in files:
            rel = str(path.relative_to(ROOT))
            out += edges_of(path.read_text(encoding="utf-8"), rel, package)
    return out


def upward(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if RANK[e.target] > RANK[e.source]]


def package_cycles(edges: list[Edge]) -> list[list[str]]:
    """Each strongly connected set of two or more packages (Tarjan), in layer order."""
    graph = {p: sorted({e.target for e in edges if e.source == p}) for p in LAYERS}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(p):
        index[p] = low[p] = len(index)
        stack.append(p)
        on_stack.add(p)
        for q in graph[p]:
            if q not in index:
                visit(q)
                low[p] = min(low[p], low[q])
            elif q in on_stack:
                low[p] = min(low[p], index[q])
        if low[p] == index[p]:
            component = []
            while True:
                q = stack.pop()
                on_stack.discard(q)
                component.append(q)
                if q == p:
                    break
            if len(component) > 1:
                found.append(sorted(component, key=RANK.get))

    for p in LAYERS:
        if p not in index:
            visit(p)
    return found


def _report(edges: list[Edge]) -> str:
    return "\n".join(f"  {e.where}: {e.source} imports {e.module} (a layer above)" for e in edges)


def test_no_package_imports_a_layer_above_it():
    bad = upward(all_edges())
    assert not bad, "upward imports (layers: " + " < ".join(LAYERS) + "):\n" + _report(bad)


def test_the_packages_import_graph_has_no_cycle():
    edges = all_edges()
    cycles = package_cycles(edges)
    # Every cycle has an upward edge (the layers are a strict order): name those.
    detail = [
        f"  {' <-> '.join(c)}, closed by "
        + ", ".join(f"{e.where} ({e.module})" for e in upward(edges) if e.source in c)
        for c in cycles
    ]
    assert not cycles, "import cycles between packages:\n" + "\n".join(detail)


def test_the_checker_sees_lazy_relative_and_aliased_imports():
    # The checks above pass vacuously if the parser misses imports: this source has each kind.
    source = textwrap.dedent(
        """
        import jax
        from model.config import ModelConfig
        from . import sibling

        def lazy():
            import train.state as state
            from sharding import mesh

        class Holder:
            def method(self):
                from rl import grpo
        """
    )
    edges = edges_of(source, "model/example.py", "model")
    assert [(e.where, e.module) for e in edges] == [
        ("model/example.py:7", "train.state"),
        ("model/example.py:8", "sharding"),
        ("model/example.py:12", "rl"),
    ]
    assert [e.where for e in upward(edges)] == [e.where for e in edges]
    cyclic = [
        *edges,
        Edge("train/x.py:1", "train", "model", "model"),
        Edge("sharding/y.py:1", "sharding", "pallas_kernels", "pallas_kernels"),
    ]
    assert package_cycles(cyclic) == [["model", "train"]]
    assert package_cycles(edges) == []
    # The real tree has edges at all (the parser reads the repository).
    assert any(e.source == "model" and e.target == "pallas_kernels" for e in all_edges())
