"""The package layering, read from the source: no import cycle among the project's modules, the
config and the pipeline's orchestration reach stages only through the graph's dispatch, stages and
helpers never import the graph or the fan-out, and the spectral math imports no config."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages", "cache", "losses", "spectralkd")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _import_statements(tree: ast.Module, module_level: bool) -> list[ast.stmt]:
    """Import statements that run when the module is imported (module level, inside if/try/with
    but not under ``if TYPE_CHECKING``), or all of them."""
    if not module_level:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out: list[ast.stmt] = []

    def visit(body: list[ast.stmt]) -> None:
        for st in body:
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                out.append(st)
            elif isinstance(st, ast.If) and not (isinstance(st.test, ast.Name) and st.test.id == "TYPE_CHECKING"):
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                for part in (st.body, st.orelse, st.finalbody, *[h.body for h in st.handlers]):
                    visit(part)
            elif isinstance(st, ast.With):
                visit(st.body)

    visit(tree.body)
    return out


def imports(name: str, path: Path, module_level: bool) -> set[str]:
    """The project modules ``name`` imports (at module level, or anywhere), ``from . import x`` and
    ``from .x import y`` resolved against its package; importing ``a.b`` from outside package ``a``
    runs ``a``'s ``__init__`` too (inside it, ``a`` is already being imported)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    known = modules()
    out = set()
    for n in _import_statements(ast.parse(path.read_text()), module_level):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
            continue
        base = n.module or ""
        if n.level:
            parts = package.split(".")[: len(package.split(".")) - n.level + 1]
            base = ".".join(parts + ([base] if base else []))
        out.add(base)
        out |= {f"{base}.{a.name}" for a in n.names}
    own = name.split(".")[0]
    return {m for i in out for m in (i, i.split(".")[0]) if m in known and m != name and not (m == own != name)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph (node -> nodes it points to) as a path, or None."""
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m, path + [m])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_cycle_among_the_projects_modules():
    graph = {name: imports(name, path, module_level=True) for name, path in modules().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # nor when a function's imports count too (packages aside: ``pipeline`` loads its names on use)
    lazy = {n: imports(n, p, module_level=False) - set(PACKAGES) for n, p in modules().items() if n not in PACKAGES}
    assert find_cycle(lazy) is None, " -> ".join(find_cycle(lazy))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


def test_the_pipeline_reaches_stages_only_through_the_graph():
    for name, path in modules().items():
        if name.startswith("pipeline") and name != "pipeline.graph":
            reached = {m for m in imports(name, path, module_level=False) if m.startswith("stages")}
            assert not reached, f"{name} imports {sorted(reached)}"
        if name == "pipeline.graph":
            assert not {m for m in imports(name, path, module_level=True) if m.startswith("stages")}


def test_stages_and_helpers_import_neither_the_graph_nor_the_fan_out():
    for name, path in modules().items():
        if name.split(".")[0] in ("stages", "cache", "losses"):
            bad = imports(name, path, module_level=False) & {"pipeline.graph", "pipeline.fanout", "pipeline.__main__"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_math_imports_no_config_and_cache_no_stage():
    spectral = imports("stages.spectral", ROOT / "stages" / "spectral.py", module_level=False)
    assert not {m for m in spectral if m.startswith("pipeline.config") or m.startswith("losses")}
    for name, path in modules().items():
        if name.startswith("cache"):
            assert not {m for m in imports(name, path, module_level=False) if m.startswith(("stages", "losses"))}, name


def test_no_stage_module_is_longer_than_about_450_lines():
    long = {f.name: n for f in (ROOT / "stages").glob("*.py") if (n := len(f.read_text().splitlines())) > 460}
    assert not long, long


def test_the_config_free_commands_import_no_torch(tmp_path):
    """``init`` and ``recipes`` answer in a fraction of a second: the CLI imports the config (whose
    loss configs import torch) and the graph only for the commands that read a pipeline file."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.__main__ import main\n"
            "assert main(['recipes']) == 0 and main(['init', '-c', 'p.yaml']) == 0\n"
            "print(sorted(m for m in ('torch', 'pipeline.config', 'pipeline.graph') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "p.yaml").read_text() == (ROOT / "configs" / "default.yaml").read_text()
