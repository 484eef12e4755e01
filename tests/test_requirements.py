"""requirements.txt (the Hugging Face Space install) and the README front matter the Space reads."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> tuple[list[str], dict[str, Requirement]]:
    options, reqs = [], {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip() if not line.startswith("--") else line.strip()
        if not line:
            continue
        if line.startswith("--"):
            options.append(line)
        else:
            r = Requirement(line)
            reqs[r.name.lower()] = r
    return options, reqs


def test_cpu_torch_preferred():
    options, reqs = _requirements()
    first = (ROOT / "requirements.txt").read_text().splitlines()[0]
    assert first.startswith("--extra-index-url ") and first.rstrip().endswith("/whl/cpu"), first
    assert len([o for o in options if o.startswith("--extra-index-url")]) == 1
    spec = reqs["torch"].specifier
    # the CPU build's local version matches and sorts above the same public (CUDA) release
    assert Version("2.13.0+cpu") in spec and Version("2.13.0+cpu") > Version("2.13.0")
    assert "torchvision" not in reqs


def test_no_mlxtend_at_runtime():
    _, reqs = _requirements()
    assert "mlxtend" not in reqs
    assert "mlxtend" not in (ROOT / "pyproject.toml").read_text()


def test_readme_front_matter_python():
    text = (ROOT / "README.md").read_text()
    front = text.split("---", 2)[1]
    assert re.search(r'^python_version: "3\.11"$', front, re.M), front
    assert re.search(r"^sdk: gradio$", front, re.M)
