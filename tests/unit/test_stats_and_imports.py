"""One softmax and one percentile for all of coe; no import cycles between coe's own modules."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from coe.stats import percentile, softmax

ROOT = Path(__file__).resolve().parents[2]


def test_percentile_is_nearest_rank() -> None:
    xs = [15, 20, 35, 40, 50]
    assert percentile(xs, 30) == 20 and percentile(xs, 40) == 20 and percentile(xs, 50) == 35
    assert percentile(xs, 100) == 50 and percentile(xs, 0) == 15
    assert percentile(list(range(1, 101)), 99) == 99 and percentile(list(range(1, 1001)), 99) == 990
    assert math.isnan(percentile([], 50))
    assert percentile([1.0, math.inf], 99) == math.inf  # a failure counts as the slowest


def test_softmax_with_temperature() -> None:
    p = softmax(np.array([[1.0, 2.0, 3.0]]), 0.5)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(np.exp([2.0, 4.0, 6.0]) / np.exp([2.0, 4.0, 6.0]).sum())
    assert softmax(np.array([1000.0, 1000.0])) == pytest.approx([0.5, 0.5])


def _imports(path: Path) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("coe", "deployments", "router_models")}


def test_no_import_cycles_between_project_modules() -> None:
    modules: dict[str, set[str]] = {}
    for pkg in ("coe", "deployments", "router_models"):
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = _imports(f)
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in graph[m]:
            if seen.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
