"""No import circles anywhere in our packages.

import-linter (``make lint``) keeps the layers apart, but a cycle between two modules of one
package breaks none of its contracts. This walks the import graph that grimp (the library
import-linter runs on) builds of every root package pyproject.toml names, imports under
``if TYPE_CHECKING:`` included, and fails on any group of modules that import each other.
The page's ES modules (static/js) are held to the same rule.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
JS = ROOT / "static" / "js"
#: A static import of a sibling module: ``import ... from "./x.js"`` or ``import "./x.js"``.
JS_IMPORT = re.compile(r'^\s*import\b[^"\']*?["\']\./([\w-]+)\.js["\']', re.MULTILINE | re.DOTALL)


def root_packages() -> list[str]:
    config = tomllib.loads(PYPROJECT.read_text())
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected groups of more than one module,
    and the modules that import themselves (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append(
                        (target, iter(sorted(graph.find_modules_directly_imported_by(target))))
                    )
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == module:
                            break
                    if len(group) > 1 or graph.direct_import_exists(
                        importer=module, imported=module
                    ):
                        found.append(sorted(group))
    return found


def describe(graph: grimp.ImportGraph, group: list[str]) -> str:
    """One circle of ``group`` as a chain of imports, for the failure message."""
    first = group[0]
    chain: list[str] = [first]
    for imported in sorted(graph.find_modules_directly_imported_by(first)):
        if imported in group:
            back = graph.find_shortest_chain(importer=imported, imported=first) or (imported,)
            chain += back
            break
    return " -> ".join(chain)


def test_no_module_of_ours_takes_part_in_an_import_circle() -> None:
    graph = grimp.build_graph(*root_packages(), cache_dir=None)
    assert len(graph.modules) > 50  # the packages were found and read
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, g) for g in found)


def js_graph() -> grimp.ImportGraph:
    """The import graph of the page's modules, one node per file of static/js."""
    graph = grimp.ImportGraph()
    files = sorted(JS.glob("*.js"))
    for path in files:
        graph.add_module(path.stem)
    for path in files:
        for imported in JS_IMPORT.findall(path.read_text()):
            graph.add_import(importer=path.stem, imported=imported)
    return graph


def test_no_module_of_the_page_takes_part_in_an_import_circle() -> None:
    graph = js_graph()
    assert graph.direct_import_exists(importer="app", imported="mybets")  # imports were read
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, g) for g in found)


def test_the_check_finds_a_circle_when_there_is_one() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    graph.add_import(importer="pkg.d", imported="pkg.a")
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert describe(graph, ["pkg.a", "pkg.b", "pkg.c"]) == "pkg.a -> pkg.b -> pkg.c -> pkg.a"
    graph.remove_import(importer="pkg.c", imported="pkg.a")
    assert cycles(graph) == []
