"""The layering of pipeline/ (CONTRIBUTING.md), read from the source with `ast`: nothing is imported or run.

    dags (5) → pipeline.orchestration (3) → [pipeline.research (2)] → jobs: pipeline.data | training | serving (1)
             → pipeline.io, pipeline.errors, pipeline.job (0), and model/ (which imports nothing of pipeline)
    pipeline.cli (4) sits beside orchestration: argv → the same jobs; nothing else imports it.

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`, relative ones, `from pipeline.x
import y` with y a submodule, and `importlib.import_module("pipeline...")` with a constant name. A failure names
the importing module, its file and line, and the imported module.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# rank: a module may import modules of its own rank or lower; prefixes are matched on whole dotted segments
RANKS: tuple[tuple[str, int], ...] = (
    ("pipeline.errors", 0), ("pipeline.job", 0), ("pipeline.io", 0),
    ("pipeline.data", 1), ("pipeline.training", 1), ("pipeline.serving", 1),
    ("pipeline.research", 2),
    ("pipeline.orchestration", 3),
    ("pipeline.cli", 4),
    ("dags", 5),
)
JOB_PACKAGES = ("pipeline.data", "pipeline.training", "pipeline.serving")  # rank 1: independent of each other
DAG_ALLOWED = ("pipeline.orchestration", "airflow")  # plus the standard library


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    dst: str  # imported module (the submodule itself for `from pkg import submodule`)
    path: str  # file of the importing module, relative to the repo
    line: int

    def __str__(self) -> str:
        return f"{self.src} imports {self.dst} ({self.path}:{self.line})"


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rank(module: str) -> int | None:
    if module == "pipeline":  # the root package's __init__: a leaf
        return 0
    return next((r for prefix, r in RANKS if _within(module, prefix)), None)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of pipeline/, model/ and dags/ by dotted name (dags/x.py is `dags.x`)."""
    found = {}
    for top in ("pipeline", "model", "dags"):
        for f in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in f.parts:
                found[_module_name(f)] = f
    return found


def _resolve_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import anywhere in the file."""
    known = modules()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, path, node)
            plain = False
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from pipeline.io import lake`: the submodule is what is used
                    yield sub, node.lineno
                else:
                    plain = True
            if plain:
                yield target, node.lineno
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno


@cache
def imports() -> tuple[Import, ...]:
    found = []
    for module, path in modules().items():
        rel = str(path.relative_to(ROOT))
        found += [Import(module, dst, rel, line) for dst, line in _imports_of(module, path)]
    return tuple(found)


def _pipeline_imports() -> list[Import]:
    return [i for i in imports() if _within(i.dst, "pipeline") and i.src != i.dst]


def _fail_on(violations: list[str], rule: str) -> None:
    if violations:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(sorted(set(violations))), pytrace=False)


# -- the rules ------------------------------------------------------------------------------------------------------

def test_the_graph_is_read() -> None:
    """Guards the test itself: the modules and the known arrows are found."""
    assert {"pipeline.job", "pipeline.errors", "pipeline.orchestration.steps", "dags.weekly_train"} <= set(modules())
    dag_edges = {(i.src, i.dst) for i in imports() if i.src.startswith("dags.")}
    assert ("dags.weekly_train", "pipeline.orchestration.topology") in dag_edges
    edges = {(i.src, i.dst) for i in imports()}
    assert ("pipeline.orchestration.topology", "pipeline.orchestration.steps") in edges  # an import inside a task function


def test_imports_are_resolved_as_python_would(tmp_path: Path) -> None:
    src = tmp_path / "lake.py"
    src.write_text("""
import pipeline.io.redact as r
from pipeline import errors, job
from pipeline.io import snapshot, lake as _lake
from . import bundle
from .publish import commit
from .. import errors as e2
from ..training.gates import load_gate_config
import importlib
def late():
    from pipeline.cli import main
    importlib.import_module("pipeline.serving.recs")
""")
    found = {dst for dst, _ in _imports_of("pipeline.io.lake", src)}
    assert found == {"pipeline.io.redact", "pipeline.errors", "pipeline.job", "pipeline.io.snapshot", "pipeline.io.lake",
                     "pipeline.io.bundle", "pipeline.io.publish", "pipeline.training.gates", "pipeline.cli.main",
                     "pipeline.serving.recs", "importlib"}
    init = tmp_path / "__init__.py"
    init.write_text("from . import lake\nfrom .spark import session\n")  # in a package's __init__, `.` is the package
    assert {dst for dst, _ in _imports_of("pipeline.io", init)} == {"pipeline.io.lake", "pipeline.io.spark"}


def test_every_pipeline_module_has_a_layer() -> None:
    _fail_on([f"{m} ({p.relative_to(ROOT)}) is in no layer: put it in one of the subpackages (tests/test_import_graph.py RANKS)"
              for m, p in modules().items() if _within(m, "pipeline") and rank(m) is None], "modules outside the layout")


def test_every_pipeline_import_resolves() -> None:
    """An import of a pipeline module that does not exist (a stale path after a move)."""
    known = modules()
    _fail_on([f"{i}: no such module" for i in _pipeline_imports() if i.dst not in known], "imports of missing modules")


def test_modules_import_only_their_own_rank_or_lower() -> None:
    bad = []
    for i in _pipeline_imports():
        src, dst = rank(i.src), rank(i.dst)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{i}: rank {src} may not import rank {dst}")
    _fail_on(bad, "upward imports (ranks: io/errors/job 0, data/training/serving 1, research 2, orchestration 3, cli 4, dags 5)")


def test_job_packages_do_not_import_each_other() -> None:
    bad = []
    for i in _pipeline_imports():
        src = next((p for p in JOB_PACKAGES if _within(i.src, p)), None)
        dst = next((p for p in JOB_PACKAGES if _within(i.dst, p)), None)
        if src and dst and src != dst:
            bad.append(f"{i}: {src} and {dst} share code only through pipeline.io / pipeline.job / model")
    _fail_on(bad, "imports between the job packages")


def test_dags_import_only_orchestration_airflow_and_the_standard_library() -> None:
    bad = []
    for i in imports():
        if not i.src.startswith("dags."):
            continue
        top = i.dst.partition(".")[0]
        if not (any(_within(i.dst, p) for p in DAG_ALLOWED) or top in sys.stdlib_module_names or top == "__future__"):
            bad.append(f"{i}: a DAG calls pipeline.orchestration only")
    _fail_on(bad, "DAG imports")


def test_model_imports_nothing_from_pipeline() -> None:
    _fail_on([str(i) for i in imports() if _within(i.src, "model") and _within(i.dst, "pipeline")],
             "model/ imports pipeline")


def test_only_the_cli_imports_the_cli() -> None:
    """Jobs are built and run as objects (pipeline.job.Job), never through argv: nothing outside pipeline/cli/
    imports it (and the root package's __init__ neither)."""
    _fail_on([f"{i}: build the Job instead of going through the CLI" for i in imports()
              if _within(i.dst, "pipeline.cli") and not _within(i.src, "pipeline.cli")], "imports of pipeline.cli")


def test_orchestration_steps_call_jobs_not_processes_or_captured_output() -> None:
    path = ROOT / "pipeline" / "orchestration" / "steps.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in ("redirect_stdout", "redirect_stderr"):
            bad.append(f"pipeline/orchestration/steps.py:{node.lineno} uses {name}: use the job's typed result")
        if name == "argv":
            bad.append(f"pipeline/orchestration/steps.py:{node.lineno} touches argv: build the job, not a command line")
    bad += [f"{i}: steps run jobs in-process" for i in imports()
            if i.src == "pipeline.orchestration.steps" and i.dst.partition(".")[0] in ("subprocess", "multiprocessing")]
    _fail_on(bad, "pipeline/orchestration/steps.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    cycles = []
    for component in components:  # shortest path from the first member back to itself, inside the component
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        cycle: list[str] | None = None
        while frontier and cycle is None:
            nxt = []
            for node in frontier:
                for child in sorted(graph[node] & component):
                    if child == start:
                        cycle = [*paths[node], start]
                        break
                    if child not in paths:
                        paths[child] = [*paths[node], child]
                        nxt.append(child)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or sorted(component))
    return cycles


def test_cycle_finder_reports_the_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_pipeline_modules() -> None:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known if _within(m, "pipeline")}
    where: dict[tuple[str, str], Import] = {}
    for i in _pipeline_imports():
        if i.src in graph and i.dst in graph:
            graph[i.src].add(i.dst)
            where.setdefault((i.src, i.dst), i)
    bad = []
    for cycle in _cycles(graph):
        steps = [str(where[(a, b)]) for a, b in itertools.pairwise(cycle) if (a, b) in where]
        bad.append(" -> ".join(cycle) + "\n    " + "\n    ".join(steps))
    _fail_on(bad, "import cycles (function-level imports included)")
