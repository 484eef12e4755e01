"""Retrieve and rerank as an index option (issue 19; index/rerank_stage.py): a tiny real index
built with and without `--rerank`.

- The reranked top-k and bottom-k equal the plain (flat, exhaustive) store's on a few queries,
  with C = 32 candidates of 64 rows; the other files keep the plain build's bytes.
- `attribution index rerank INDEX` adds the same files to a finished index.
- A damaged rerank file is refused on load with a plain message.
- A build killed inside the rerank stage and resumed gives the same bytes as one never killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attribution.data import load_dataset
from attribution.errors import IndexLoadError
from attribution.influence import AttributionConfig
from attribution.model import build_model, save_model
from index import IndexLayout
from index.build import build_index
from index.rerank_stage import RerankOptions
from index.runlog import KILL_ENV
from index.store import load

ROOT = Path(__file__).resolve().parent.parent
N, K, C = 64, 8, 32
RERANK = IndexLayout.RERANK


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("rerank-index")
    cfg = AttributionConfig(method="ekfac", dim=64, draws=4, curvature_draws=1, query_draws=8, batch_size=16)
    data = load_dataset("mnist", channels=1, size=8, n=N)
    out = {}
    for name, rerank in (("plain", None), ("rerank", RerankOptions(candidates=C))):
        out[name] = build_index(model, data, root / name, cfg, shard_size=16, progress=False, rerank=rerank)
    return out


@pytest.fixture(scope="module")
def queries():
    return load_dataset("mnist", channels=1, size=8, n=N + 4).images[N:]


def test_reranked_ends_equal_the_plain_store(built, model, queries):
    plain, rr = load(built["plain"], model), load(built["rerank"], model)
    assert plain.rerank is None and rr.rerank is not None and rr.rerank.candidates == C < N
    assert rr.has_spread  # halves of the draws: the stability figures
    assert rr.exhaustive  # the flat store is still there (all scores, audits), search goes through rerank
    psi = plain.query_features(queries)
    ts, ti, bs, bi = plain.search(psi, K)
    rs, ri, rbs, rbi = rr.search(psi, K)
    np.testing.assert_array_equal(ri, ti)
    np.testing.assert_array_equal(rbi, bi)
    scale = np.abs(ts).max()
    np.testing.assert_allclose(rs, ts, atol=2e-3 * scale)  # float16 rows
    np.testing.assert_allclose(rbs, bs, atol=2e-3 * scale)
    first = rr.rerank.propose(psi)  # the first stage alone proposes C of the N rows
    assert first.shape == (len(psi), C)


def test_query_keeps_its_contract(built, model, queries):
    plain, rr = load(built["plain"], model), load(built["rerank"], model)
    a, b = plain.query(queries[0], k=K), rr.query(queries[0], k=K)
    assert [h.row for h in b.proponents] == [h.row for h in a.proponents]
    assert [h.row for h in b.opponents] == [h.row for h in a.opponents]
    assert all(h.se is not None and h.se > 0 for h in b.proponents + b.opponents)
    assert b.stability is not None and b.stability["pooled_se"] > 0
    # without all N scores the ranks under the halves are not given (as for any approximate store)
    assert all(h.rank_a is None and h.distinct is None for h in b.proponents)
    assert b.all_scores is None
    full = rr.query(queries[0], k=K, with_all=True)  # all scores asked for: the exhaustive pass
    assert full.all_scores.shape == (N,) and [h.row for h in full.proponents] == [h.row for h in a.proponents]


def test_rerank_files_are_recorded_and_the_rest_unchanged(built):
    files = {n: json.loads((built[n] / "manifest.json").read_text())["files"] for n in built}
    assert not set(RERANK) & files["plain"].keys()
    assert set(RERANK) <= files["rerank"].keys()
    assert all(len(files["rerank"][f]["sha256"]) == 64 for f in RERANK)
    for f in files["plain"]:  # every other file: the plain build's bytes
        assert (built["plain"] / f).read_bytes() == (built["rerank"] / f).read_bytes(), f
    assert not any(n.startswith(".") and "tmp" in n for n in os.listdir(built["rerank"]))


def test_index_rerank_adds_the_same_files_to_a_finished_index(built, model, queries, tmp_path, capsys):
    from explorer.cli import main

    copy = shutil.copytree(built["plain"], tmp_path / "copy")
    assert main(["index", "rerank", str(copy), "--rerank-candidates", str(C)]) == 0
    for f in (IndexLayout.RERANK_FULL, IndexLayout.RERANK_META):  # a flat store gives back the shards' rows
        assert (copy / f).read_bytes() == (built["rerank"] / f).read_bytes(), f
    # the first stage's codes may differ in a last bit (the projection applied to other block sizes)
    added, rr = load(copy, model), load(built["rerank"], model)
    psi = rr.query_features(queries)
    for a, b in zip(added.search(psi, K), rr.search(psi, K)):
        np.testing.assert_array_equal(a, b)
    assert main(["index", "rerank", str(copy)]) == 0
    assert "already has its rerank files" in capsys.readouterr().err


def test_build_with_rerank_on_a_finished_index_adds_it(built, model, tmp_path):
    copy = shutil.copytree(built["plain"], tmp_path / "copy")
    cfg = AttributionConfig(method="ekfac", dim=64, draws=4, curvature_draws=1, query_draws=8, batch_size=16)
    data = load_dataset("mnist", channels=1, size=8, n=N)
    build_index(model, data, copy, cfg, shard_size=16, progress=False, rerank=RerankOptions(candidates=C))
    assert load(copy).rerank is not None
    assert (copy / IndexLayout.RERANK_FULL).read_bytes() == (
        built["rerank"] / IndexLayout.RERANK_FULL
    ).read_bytes()


@pytest.mark.parametrize("name", RERANK)
def test_a_damaged_rerank_file_is_refused(built, tmp_path, name):
    copy = shutil.copytree(built["rerank"], tmp_path / "copy")
    p = copy / name
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(IndexLoadError, match=f"{name}: its sha256 differs.*rebuild it"):
        load(copy)
    p.write_bytes(bytes(raw[:-8]))
    with pytest.raises(IndexLoadError, match=f"{name}: .*rebuild it"):
        load(copy)


def test_large_full_features_are_checked_by_size_on_load(built, tmp_path, monkeypatch):
    import index.integrity

    monkeypatch.setattr(index.integrity, "HASH_LIMIT", 0)  # as for a file over 2 GiB
    copy = shutil.copytree(built["rerank"], tmp_path / "copy")
    p = copy / IndexLayout.RERANK_FULL
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert load(copy).rerank is not None  # same size: not re-hashed on load (documented)
    p.write_bytes(bytes(raw[:-2]))
    with pytest.raises(IndexLoadError, match="rerank_full.npy: .* bytes, the manifest says"):
        load(copy)


def test_damaged_file_through_the_cli_is_one_line(built, tmp_path):
    copy = shutil.copytree(built["rerank"], tmp_path / "copy")
    (copy / IndexLayout.RERANK_FIRST).write_bytes(b"FAISS?")
    r = subprocess.run(
        [sys.executable, "-m", "explorer.cli", "index", "rerank", str(copy)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and "rerank.faiss" in r.stderr


def test_a_first_stage_that_cannot_be_trained_is_refused_before_the_features(model, tmp_path):
    from attribution.errors import ConfigError

    cfg = AttributionConfig(method="ekfac", dim=64, draws=2, curvature_draws=1, batch_size=16)
    with pytest.raises(ConfigError, match="needs 256 training rows"):
        build_index(
            model,
            load_dataset("mnist", channels=1, size=8, n=32),
            tmp_path / "x",
            cfg,
            shard_size=16,
            progress=False,
            rerank=RerankOptions(first="PQ8x8"),
        )
    assert not IndexLayout(tmp_path / "x").rows_done()


def _run(model_dir: Path, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    args = ["--model", str(model_dir), "--data", "mnist", "--n", "32", "--out", str(out), "--dim", "64"]
    args += ["--draws", "2", "--curvature-draws", "1", "--batch-size", "16", "--shard-size", "16"]
    cmd = [sys.executable, "-m", "index.build", *args, "--rerank", "--rerank-candidates", "8"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def _contents(root: Path) -> dict[str, bytes]:
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    for name, drop in (("manifest.json", ("build", "created")), ("build.json", ("runs",))):
        d = json.loads(out[name])
        out[name] = json.dumps({k: v for k, v in d.items() if k not in drop}, sort_keys=True).encode()
    return out


@pytest.mark.slow
def test_killed_in_the_rerank_stage_then_resumed_is_byte_identical(model, tmp_path):
    save_model(model, tmp_path / "model")
    ref = tmp_path / "ref"
    assert _run(tmp_path / "model", ref).returncode == 0
    lay = IndexLayout(tmp_path / "killed")
    r = _run(tmp_path / "model", lay.root, "rerank-full-written")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert lay.path(lay.RERANK_FULL).exists() and not lay.path(lay.RERANK_META).exists()
    r = _run(tmp_path / "model", lay.root, "rerank-written")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert lay.path(lay.RERANK_META).exists() and not lay.manifest.exists()
    r = _run(tmp_path / "model", lay.root)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _contents(ref), _contents(lay.root)
    assert a.keys() == b.keys() and set(RERANK) <= a.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert json.loads(lay.manifest.read_text())["build"]["runs"] == 3
