"""The code base stays ruff-clean and the core stays free of Ray and MLflow."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean():
    out = subprocess.run(["ruff", "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_imports_no_ray_or_mlflow():
    for path in (REPO / "metalstm").glob("*.py"):
        text = path.read_text()
        for banned in ("import ray", "from ray", "import mlflow", "from mlflow"):
            assert banned not in text, f"{path.name} must stay plain PyTorch: found {banned!r}"


# ----------------------------------------------------------------------------- the architecture's rules


def _modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted([*(REPO / "metalstm").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` imports the module; ``from pkg import name`` the package
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        found.update(n for n in names if n in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_core_never_imports_pipeline():
    for name, deps in _graph().items():
        if name.startswith("metalstm"):
            assert not [d for d in deps if d.startswith("pipeline")], f"{name} imports {deps}: metalstm/ is the core"


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cli_is_imported_by_nothing():
    importers = [name for name, deps in _graph().items() if "pipeline.cli" in deps]
    assert not importers, f"pipeline.cli sits on top; imported by {importers}"


def test_no_function_over_80_lines():
    """Short functions read top to bottom; the hand-written autograd of the recurrence is the one exception."""
    long = []
    for name, path in _modules().items():
        if name == "metalstm.rnn":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines: " + ", ".join(long)
