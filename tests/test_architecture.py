"""The house: rooms import only the rooms below them (import-linter's contracts in pyproject.toml),
no module takes part in an import circle (type-only imports included), and the stable import
paths of docs/architecture.md still answer."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the distcluster package found under `package_parent`."""
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_parent, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(package_parent), "PATH": str(LINT_IMPORTS.parent)})


def test_every_import_contract_is_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line"), [
    ("core/metrics.py", "import distcluster.engine.loop"),  # the core reaching up into the engine
    ("engine/loop.py", "import ray"),  # a pure room importing Ray
    ("tracking/plots.py", "from distcluster.commands import train"),  # a room importing a command
])
def test_a_back_arrow_breaks_a_contract(tmp_path, module, line):
    shutil.copytree(ROOT / "distcluster", tmp_path / "distcluster")
    path = tmp_path / "distcluster" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stdout[-2000:]


def import_circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of modules that reach each other through imports (strongly connected, Tarjan)."""
    modules = sorted(m for m in graph.modules if m.startswith("distcluster"))
    edges = {m: [n for n in graph.find_modules_directly_imported_by(m) if n.startswith("distcluster")]
             for m in modules}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                circles.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return circles


def test_no_module_is_in_an_import_circle():
    graph = grimp.build_graph("distcluster", exclude_type_checking_imports=False)
    assert import_circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("distcluster.a", "distcluster.b", "distcluster.c"):
        graph.add_module(module)
    graph.add_import(importer="distcluster.a", imported="distcluster.b")
    graph.add_import(importer="distcluster.b", imported="distcluster.a")
    graph.add_import(importer="distcluster.c", imported="distcluster.a")
    assert import_circles(graph) == [["distcluster.a", "distcluster.b"]]


def test_the_stable_import_paths_answer():
    from distcluster.metrics import cluster_scores
    from distcluster.objectives import iic_loss, sinkhorn

    assert cluster_scores([0, 0, 1], [1, 1, 0])["acc"] == 1.0
    assert callable(iic_loss) and callable(sinkhorn)
