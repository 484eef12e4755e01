"""A build killed (SIGKILL) at any stage and resumed gives the very same bytes as one that was
never interrupted, and its manifest counts every run (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.model import build_model, save_model
from index import IndexLayout
from index.runlog import KILL_ENV

ROOT = Path(__file__).resolve().parent.parent
N = 64
# (kill point, what the folder holds afterwards)
POINTS = [
    ("curvature-fitted", lambda lay: lay.build.exists() and not lay.curvature.exists()),
    ("curvature-written", lambda lay: lay.curvature.exists() and not lay.projection.exists()),
    ("shard-2", lambda lay: lay.rows_done() == 32),
    ("store-tmp", lambda lay: not lay.features.exists() and any(lay.root.glob(".features.faiss.tmp*"))),
    ("manifest-tmp", lambda lay: not lay.manifest.exists()),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "model"
    save_model(build_model("tiny", seed=0), d)
    return d


def run(model_dir: Path, out: Path, kill_at: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    cmd = [
        sys.executable,
        "-m",
        "index.build",
        "--model",
        str(model_dir),
        "--data",
        "mnist",
        "--n",
        str(N),
        "--out",
        str(out),
        "--dim",
        "64",
        "--draws",
        "2",
        "--curvature-draws",
        "1",
        "--batch-size",
        "16",
        "--shard-size",
        "16",
        "--keep-shards",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def contents(root: Path) -> dict[str, bytes]:
    """Every file's bytes, the manifest without its timing and date, build.json without its runs."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    for name, drop in (("manifest.json", ("build", "created")), ("build.json", ("runs",))):
        d = json.loads(out[name])
        out[name] = json.dumps({k: v for k, v in d.items() if k not in drop}, sort_keys=True).encode()
    return out


@pytest.mark.slow
def test_killed_at_each_stage_then_resumed_is_byte_identical(model_dir, tmp_path):
    ref = tmp_path / "ref"
    assert run(model_dir, ref).returncode == 0
    lay = IndexLayout(tmp_path / "killed")
    for point, holds in POINTS:
        r = run(model_dir, lay.root, point)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-2000:])
        assert holds(lay), (point, sorted(p.name for p in lay.root.rglob("*")))
    r = run(model_dir, lay.root)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = contents(ref), contents(lay.root)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # features.faiss, shards, curvature, ...: the same bytes
    stats = json.loads(lay.manifest.read_text())["build"]
    assert stats["runs"] == len(POINTS) + 1
    assert stats["rows_per_run"] == [0, 0, 32, 32, 0, 0] and sum(stats["rows_per_run"]) == N
    assert [r["finished"] for r in stats["per_run"]] == [False] * len(POINTS) + [True]
    assert json.loads(lay.build.read_text())["runs"][-1]["finished"]
    assert stats["seconds_total"] >= stats["seconds_curvature"] + stats["seconds_features"] > 0
