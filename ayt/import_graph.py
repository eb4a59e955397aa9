"""The `ayt` modules each `ayt` module imports, read from source with `ast` (nothing is
imported): module-level and function-level imports alike, since a lazy import runs the
same code when it is reached. Artifact kinds key their cache by the closure of their
builder modules (`ayt.artifacts`), and tests/test_imports.py checks the graph has no cycles.

An edge is an import as written: ``from ayt.x import y`` is an edge to ``ayt.x.y`` when
that is a module, else to ``ayt.x``; the parent packages Python initialises on the way
are not edges (a package re-exporting its submodules would otherwise always be a cycle).

Registries load some modules by name at run time (``"ayt.training.pretrain:build_pretrained"``,
a diagnostics module list): a string constant that is exactly an `ayt` module's name (with
an optional ``:attribute``) is a *named* module. `closure` follows named modules too (their
code runs), `graph` and the cycle check do not (a registry loading its members by name,
members that import the registry, is the plugin pattern, not an import circle).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Iterable

PACKAGE = "ayt"
ROOT = Path(__file__).resolve().parent
_NAMED = re.compile(r"^ayt(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


def module_path(name: str) -> Path | None:
    """The source file of `ayt` module `name` (a package's __init__.py), None if there is none."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def package_modules() -> list[str]:
    """Every module of the package, by dotted name (sorted)."""
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((PACKAGE, *parts)))
    return sorted(names)


def _resolve(name: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> list[str]:
    """The `ayt` modules one imported alias names."""
    if isinstance(node, ast.Import):
        return [alias.name] if module_path(alias.name) else []
    base = node.module or ""
    if node.level:                       # relative: from the importing module's package
        package = name if module_path(name) and module_path(name).name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    sub = f"{base}.{alias.name}"
    if module_path(sub):
        return [sub]
    return [base] if module_path(base) else []


@functools.lru_cache(maxsize=None)
def _parse(name: str, mtime_ns: int) -> tuple[tuple[tuple[str, int, bool], ...], tuple[str, ...]]:
    """(imports as (module, line, inside a function), named modules) of module `name`'s source."""
    path = module_path(name)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []
    named: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for alias in child.names:
                    found.extend((target, child.lineno, in_function) for target in _resolve(name, child, alias))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and _NAMED.match(child.value):
                target = child.value.partition(":")[0]
                if module_path(target):
                    named.append(target)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return tuple(found), tuple(sorted(set(named) - {name}))


def _source(name: str) -> tuple[tuple[tuple[str, int, bool], ...], tuple[str, ...]]:
    path = module_path(name)
    return ((), ()) if path is None else _parse(name, path.stat().st_mtime_ns)


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported `ayt` module, line, inside a function) for each `ayt` import of module `name`."""
    return [item for item in _source(name)[0] if item[0] != name]


def named(name: str) -> list[str]:
    """The `ayt` modules module `name` names in a string constant (loaded by name at run time)."""
    return list(_source(name)[1])


def graph(modules: Iterable[str] | None = None) -> dict[str, set[str]]:
    """module -> the `ayt` modules it imports (anywhere in its source)."""
    return {m: {target for target, _, _ in imports(m)} for m in (package_modules() if modules is None else modules)}


def closure(roots: Iterable[str]) -> tuple[str, ...]:
    """`roots` and every `ayt` module they import or name, transitively (sorted): the code
    that may run when they do. Names outside the package are kept as given, not followed."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(target for target, _, _ in imports(name))
        pending.extend(named(name))
    return tuple(sorted(seen))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    closed path through it, e.g. ['ayt.a', 'ayt.b', 'ayt.a']."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                components.append(_path_through(sorted(component), edges))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def _path_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself (breadth first)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(edges.get(node, set()) & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return component
