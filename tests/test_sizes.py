"""Files that fit in one's head: outside tests/, no source file is longer than 450 lines and no
function longer than 80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["app.py", "attribution", "index", "explorer", "benchmarks"]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _files() -> list[Path]:
    out = []
    for name in CHECKED:
        p = ROOT / name
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function (nested ones too) longer than `limit` lines."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    ]


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_functions_fit(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name}: {len(source.splitlines())} lines"
    assert not long_functions(source), (
        f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long_functions(source)}"
    )


def test_the_check_sees_a_long_function():
    assert long_functions("def f():\n" + "    x = 1\n" * 80) == [("f", 81)]
    assert long_functions("def f():\n" + "    x = 1\n" * 79) == []
