"""The layers import one way: attribution (the library) ← index (the store) ← explorer (CLI, app,
reports) ← app.py (the Spaces entry point). Every import statement counts, including those
inside functions, and importlib.import_module / __import__ calls with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# layer -> top-level names its modules must never import
FORBIDDEN = {
    "attribution": {"index", "explorer", "app"},
    "index": {"explorer", "app"},
    "explorer": {"app"},
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth. Relative imports
    stay inside their own package and are left out."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(layer: str, path: Path, source: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT) if path.is_absolute() else path}:{line} imports {name}"
        for line, name in imported_modules(source)
        if name.split(".")[0] in FORBIDDEN[layer]
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules found in {layer}/"
    bad = [v for f in files for v in violations(layer, f, f.read_text(encoding="utf-8"))]
    assert not bad, (
        "imports against the layering ("
        + layer
        + " must not import "
        + ", ".join(sorted(FORBIDDEN[layer]))
        + "):\n"
        + "\n".join(bad)
    )


@pytest.mark.parametrize(
    "source",
    [
        "import index.store\n",
        "from index.store import load\n",
        "def f():\n    from explorer import report\n",
        "class A:\n    def m(self):\n        import app\n",
        "import importlib\nimportlib.import_module('index.build')\n",
        "x = __import__('explorer.cli')\n",
    ],
)
def test_the_check_sees_every_kind_of_import(source):
    assert violations("attribution", Path("attribution/x.py"), source)


def test_the_check_allows_imports_downwards():
    ok = "import torch\nfrom attribution.data import mnist\nfrom . import seeds\ndef f():\n    import numpy\n"
    assert not violations("attribution", Path("attribution/x.py"), ok)
    assert not violations("index", Path("index/x.py"), "from attribution.influence import METHODS\n")
