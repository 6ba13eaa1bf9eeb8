"""The package's dependency rule, read from every import (top-level and function-local alike):
each stage imports only from the stages before it, siblings not from each other, and no module
imports itself back through a cycle.

    core <- spec <- config, data <- backbone, featcache <- classifier <- outputs
         <- interop, pipelines <- cli

The root ``ddpmseg/__init__.py`` is outside the rule: it names the public functions and imports
them only when used.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpmseg"

# Rank of each stage; a module may import a stage of lower rank, or its own stage.
RANKS = {
    "core": 0, "spec": 1, "config": 2, "data": 2, "backbone": 3, "featcache": 3,
    "classifier": 4, "outputs": 5, "interop": 6, "pipelines": 6, "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    return module.split(".")[1]


def package_imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of each ddpmseg module this file imports, wherever the import is."""
    tree = ast.parse(path.read_text())
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in modules else base, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
    return [(m, line) for m, line in found if m.startswith("ddpmseg.")]


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))
            if p != PACKAGE / "__init__.py"}


def test_every_module_belongs_to_a_stage():
    assert {stage(m) for m in graph()} <= set(RANKS)


def test_no_import_against_the_rule():
    wrong = []
    for module, imports in graph().items():
        for target, line in imports:
            a, b = stage(module), stage(target)
            if a != b and RANKS[b] >= RANKS[a]:
                wrong.append(f"{module}:{line} imports {target} ({a} may not use {b})")
    assert wrong == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_cycles():
    edges = {module: {t for t, _ in imports} for module, imports in graph().items()}
    assert find_cycle(edges) is None


def test_find_cycle_finds_one():
    # The checker itself: a three-module loop is found, a chain is not.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_rule_catches_a_wrong_arrow(tmp_path, monkeypatch):
    # A spec module importing the classifier would be reported, with its line.
    fake = tmp_path / "ddpmseg"
    (fake / "spec").mkdir(parents=True)
    (fake / "classifier").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "classifier" / "__init__.py").write_text("")
    (fake / "spec" / "__init__.py").write_text("\n\ndef f():\n    from ddpmseg.classifier import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"ddpmseg.spec:4 imports ddpmseg.classifier"):
        test_no_import_against_the_rule()


@pytest.mark.parametrize("code", [
    "import ddpmseg",
    "import ddpmseg.spec, ddpmseg.config, ddpmseg.core.fileio, ddpmseg.core.locking",
    "import ddpmseg.cli.main",
])
def test_light_imports_need_no_torch(code):
    # `ddpmseg --help`, configs and the spec must not pay for torch (seconds).
    check = f"{code}; import sys; print(sorted(m for m in ('torch', 'zarr', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
