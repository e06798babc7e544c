"""The import graph of models/, bench/ and reports/ has layers: no cycle between modules, and no upward import.

The graph is read from the source with :mod:`ast`; nothing is imported, so an import that only runs inside a
function (a lazy import) or under ``if TYPE_CHECKING:`` counts like one at the top of the file. A module that
imports a package imports that package's ``__init__``; ``from pkg import name`` imports ``pkg.name`` when that
is a module, else ``pkg``. The pytest case files (``test_*.py``) are leaves and are left out.

Layers, lowest first: ``models`` (the workloads) < ``bench`` (the benchmark) < ``reports`` (reading results);
inside bench, the DP code (``bench.dp``) sits below the command line and its configuration. A package's
``__main__`` (``python -m models``, ``python -m bench.dp``) is a command line wherever it sits, so it is above
every layer: it may import any module, and no module may import it.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "bench", "reports")
CLI_AND_CONFIG = ("bench.config", "bench.conftest")

# (lower layer, a module or package it must not reach, why): checked on every import that leaves the lower
# layer, transitively, so a detour through a third module does not hide an upward dependency.
FORBIDDEN = (
    ("models", "bench", "the workloads are the bottom layer"),
    ("models", "reports", "the workloads are the bottom layer"),
    ("bench", "reports", "the benchmark writes results, reports reads them"),
    *(("bench.dp", module, "the DP code is below the command line and its configuration") for module in CLI_AND_CONFIG),
    *(
        ("bench.dp", folder, "a DP method knows the neutral channel, not the case around it or its launchers")
        for folder in ("bench.case", "bench.ranks", "bench.plan", "bench.system")
    ),
    *(
        ("bench.trackers", module, "a tracker measures any step: it knows neither DP nor the case around it")
        for module in ("bench.dp", "bench.case", "bench.ranks", "bench.plan", *CLI_AND_CONFIG)
    ),
    ("bench.results", "bench.case", "the record is below the runner that fills it"),
    *(
        ("reports", folder, "the reports read the record's files, not the bench that wrote them")
        for folder in ("bench.case", "bench.dp", "bench.ranks", "bench.trackers", "bench.system")
    ),
    ("bench.system", "bench.case", "machine facts are below the case"),
)


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``importer`` (in file ``path``, at ``line``) imports module ``imported``."""

    importer: str
    imported: str
    path: str
    line: int
    lazy: bool  # inside a function, so it runs on the first call, not at import time

    def __str__(self) -> str:
        where = " (inside a function)" if self.lazy else ""
        return f"{self.path}:{self.line} {self.importer} imports {self.imported}{where}"


def module_name(path: PurePosixPath) -> str:
    """``bench/dp/base.py`` -> ``bench.dp.base``; a package's ``__init__.py`` is named by the package."""
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_sources(root: Path = ROOT) -> dict[str, str]:
    """Every first-party .py file but the pytest case files, as {relative posix path: source}."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.name.startswith("test_"):
                continue
            sources[path.relative_to(root).as_posix()] = path.read_text()
    return sources


def _is_first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _statements(tree: ast.AST) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module with whether it sits inside a function (at any depth)."""

    def walk(node: ast.AST, lazy: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            yield from walk(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    yield from walk(tree, False)


def import_graph(sources: Mapping[str, str]) -> tuple[list[Import], list[str]]:
    """The first-party imports of ``sources`` ({relative path: source}) and the ones naming no module there."""
    modules = {module_name(PurePosixPath(path)): path for path in sources}
    packages = {module_name(PurePosixPath(path)) for path in sources if path.endswith("/__init__.py")}
    edges, unresolved = [], []
    for path, source in sources.items():
        importer = module_name(PurePosixPath(path))
        # relative imports resolve against the importer's package: itself when it is a package's __init__
        package = importer if importer in packages else importer.rpartition(".")[0]
        for node, lazy in _statements(ast.parse(source, filename=path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            for target in dict.fromkeys(targets):  # `from pkg import a, b` of two names is one edge to pkg
                if not _is_first_party(target):
                    continue
                if target not in modules:
                    unresolved.append(f"{path}:{node.lineno} imports {target}, which is no module of the project")
                    continue
                edges.append(Import(importer, target, path, node.lineno, lazy))
    return edges, unresolved


def _successors(edges: Iterable[Import]) -> dict[str, list[Import]]:
    graph: dict[str, list[Import]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge)
    return graph


def _shortest_chain(graph: Mapping[str, list[Import]], start: str, goal, allowed=None) -> list[Import] | None:
    """The shortest import chain from ``start`` to a module where ``goal(module)`` holds, through ``allowed``."""
    came_by: dict[str, Import | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for edge in graph.get(module, []):
            target = edge.imported
            if goal(target):
                chain = [edge]
                while came_by[chain[0].importer] is not None:
                    chain.insert(0, came_by[chain[0].importer])
                return chain
            if target not in came_by and (allowed is None or target in allowed):
                came_by[target] = edge
                queue.append(target)
    return None


def _strongly_connected(graph: Mapping[str, list[Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative: the graph is small, but recursion limits are not)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    nodes = sorted({*graph, *(edge.imported for edges in graph.values() for edge in edges)})
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            successors = graph.get(node, [])
            if position < len(successors):
                work.append((node, position + 1))
                target = successors[position].imported
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if work:  # node is done: its low link propagates to the caller
                caller = work[-1][0]
                low[caller] = min(low[caller], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def find_cycles(edges: Iterable[Import]) -> list[tuple[list[str], list[Import]]]:
    """Every group of modules that import each other (sorted), with one import cycle through it (a chain of
    imports from the group's first module back to it)."""
    graph = _successors(edges)
    cycles = []
    for component in _strongly_connected(graph):
        start = min(component)
        chain = _shortest_chain(graph, start, lambda module, start=start: module == start, allowed=component)
        if chain and (len(component) > 1 or chain[0].imported == start):
            cycles.append((sorted(component), chain))
    return cycles


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_entry_point(module: str) -> bool:
    """Whether ``module`` is a package's ``__main__``, what ``python -m package`` runs."""
    return module.rpartition(".")[2] == "__main__"


def find_upward(edges: Iterable[Import], forbidden=FORBIDDEN) -> list[tuple[str, list[Import]]]:
    """Every import that leaves a lower layer and leads, directly or through other modules, to one it must not
    reach: (the rule, the chain of imports). A command line (a ``__main__``) is above every layer, so its own
    imports are not upward; importing one is, from anywhere."""
    edges = list(edges)
    graph = _successors(edges)
    found = [
        ("no module imports a command line (a package's __main__)", [edge])
        for edge in edges
        if is_entry_point(edge.imported)
    ]
    for lower, upper, why in forbidden:
        for edge in edges:
            if is_entry_point(edge.importer) or not _within(edge.importer, lower) or _within(edge.imported, lower):
                continue
            rule = f"{lower} must not import {upper} ({why})"
            if _within(edge.imported, upper):
                found.append((rule, [edge]))
                continue
            rest = _shortest_chain(graph, edge.imported, lambda module, upper=upper: _within(module, upper))
            if rest:
                found.append((rule, [edge, *rest]))
    return found


def _chain_text(chain: list[Import]) -> str:
    return "\n".join(f"    {edge}" for edge in chain)


# ---- the project --------------------------------------------------------------------------------------------


def test_every_first_party_import_names_a_module():
    _, unresolved = import_graph(first_party_sources())
    assert not unresolved, "\n".join(unresolved)


def test_no_import_cycle():
    edges, _ = import_graph(first_party_sources())
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n\n".join(
        f"  {', '.join(group)} import each other, e.g.:\n{_chain_text(chain)}" for group, chain in cycles
    )


def test_no_upward_import():
    edges, _ = import_graph(first_party_sources())
    found = find_upward(edges)
    assert not found, "upward imports:\n" + "\n\n".join(f"  {rule}:\n{_chain_text(chain)}" for rule, chain in found)


def test_the_graph_is_the_whole_project():
    """Guards the two tests above against passing on an empty or partial graph."""
    sources = first_party_sources()
    edges, _ = import_graph(sources)
    importers = {edge.importer for edge in edges}
    assert {"models", "bench.dp", "bench.dp.base", "bench.case.runner", "reports.load"} <= importers
    assert any(edge.lazy for edge in edges), "the function-level imports were not collected"
    assert not any(path.rpartition("/")[2].startswith("test_") for path in sources)


# ---- the detector on small synthetic projects ---------------------------------------------------------------


def test_detector_finds_a_cycle_through_a_lazy_import():
    sources = {
        "bench/__init__.py": "",
        "bench/case/__init__.py": "",
        "bench/case/runner.py": "def run():\n    from bench.ranks import launch\n",
        "bench/ranks/__init__.py": "from .launch import start\n",
        "bench/ranks/launch.py": "from ..case.runner import CaseSpec\n",
    }
    edges, unresolved = import_graph(sources)
    assert not unresolved
    assert {(edge.importer, edge.imported, edge.lazy) for edge in edges} == {
        ("bench.case.runner", "bench.ranks.launch", True),
        ("bench.ranks", "bench.ranks.launch", False),
        ("bench.ranks.launch", "bench.case.runner", False),
    }
    [(group, cycle)] = find_cycles(edges)
    assert group == ["bench.case.runner", "bench.ranks.launch"]
    assert [(edge.importer, edge.imported) for edge in cycle] == [
        ("bench.case.runner", "bench.ranks.launch"),
        ("bench.ranks.launch", "bench.case.runner"),
    ]


def test_detector_counts_importing_a_package_as_importing_its_init():
    sources = {
        "bench/__init__.py": "",
        "bench/dp/__init__.py": "from .base import get_method\n",
        "bench/dp/base.py": "from bench.dp import errors\nfrom bench.dp import get_method\n",
        "bench/dp/errors.py": "",
    }
    edges, _ = import_graph(sources)
    assert ("bench.dp.base", "bench.dp.errors") in {(edge.importer, edge.imported) for edge in edges}
    [(group, _)] = find_cycles(edges)
    assert group == ["bench.dp", "bench.dp.base"]


def test_detector_finds_a_self_import_and_no_cycle_in_a_tree():
    assert find_cycles(import_graph({"models/__init__.py": "import models\n"})[0])
    tree = {
        "models/__init__.py": "",
        "bench/__init__.py": "",
        "bench/a.py": "import bench.b\nimport models\n",
        "bench/b.py": "from models import x\n",
        "models/x.py": "",
    }
    assert find_cycles(import_graph(tree)[0]) == []


def test_detector_finds_upward_imports_direct_lazy_and_through_a_detour():
    sources = {
        "models/__init__.py": "def f():\n    import reports.load\n",
        "bench/__init__.py": "",
        "bench/config/__init__.py": "",
        "bench/config/options.py": "",
        "bench/names.py": "",
        "bench/helpers.py": "from .config.options import did_you_mean\n",
        "bench/dp/__init__.py": "",
        "bench/dp/base.py": "from bench.names import did_you_mean\nfrom ..helpers import thing\n",
        "bench/dp/bk.py": "from . import base\n",  # inside bench.dp: not blamed for base's imports
        "bench/dp/__main__.py": "from bench.config.options import comma_list\n",  # a command line: above every layer
        "bench/plan/__init__.py": "",
        "bench/plan/planner.py": "from bench.dp.__main__ import main\n",  # ... but nothing imports one
        "reports/__init__.py": "",
        "reports/load.py": "",
    }
    edges, unresolved = import_graph(sources)
    assert not unresolved
    found = {
        (rule.split(" (")[0], tuple((edge.importer, edge.imported) for edge in chain))
        for rule, chain in find_upward(edges)
    }
    assert found == {
        ("models must not import reports", (("models", "reports.load"),)),
        ("no module imports a command line", (("bench.plan.planner", "bench.dp.__main__"),)),
        (
            "bench.dp must not import bench.config",
            (("bench.dp.base", "bench.helpers"), ("bench.helpers", "bench.config.options")),
        ),
    }
    assert [edge.lazy for rule, chain in find_upward(edges) for edge in chain if edge.importer == "models"] == [True]


def test_detector_reports_an_import_of_no_module():
    _, unresolved = import_graph({"bench/__init__.py": "", "bench/a.py": "from bench.gone import x\n"})
    assert unresolved == ["bench/a.py:1 imports bench.gone, which is no module of the project"]
