"""The index: exact top-k, resume after SIGKILL, torchrun equality, refusals of bad indexes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attribution.data import image_folder, mnist, save_images
from attribution.influence import AttributionConfig, Attributor
from attribution.model import build_model, load_model, save_model
from index.build import build_index
from index.manifest import IndexLoadError
from index.store import load

ROOT = Path(__file__).resolve().parent.parent
N = 192
ARGS = [
    "--dim",
    "128",
    "--draws",
    "2",
    "--curvature-draws",
    "1",
    "--batch-size",
    "16",
    "--shard-size",
    "32",
    "--query-draws",
    "4",
    "--keep-shards",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("index")
    save_model(build_model("tiny", seed=0), d / "model")
    ds = mnist(size=8, n=N)
    save_images(ds.images, d / "data", labels=ds.labels)
    return d


def build_cmd(d: Path, out: Path, method: str = "ekfac") -> list[str]:
    return [
        "-m",
        "index.build",
        "--model",
        str(d / "model"),
        "--data",
        str(d / "data"),
        "--out",
        str(out),
        "--method",
        method,
        *ARGS,
    ]


def run_build(d: Path, out: Path, method: str = "ekfac") -> None:
    subprocess.run(
        [sys.executable, *build_cmd(d, out, method)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )


def features(out: Path) -> np.ndarray:
    shards = sorted((out / "shards").glob("*.safetensors"))
    return torch.cat([load_file(str(p))["raw"] for p in shards]).numpy()


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "ref"
    run_build(setup, out)
    return out


def test_flat_index_top_k_is_dense_top_k(setup, reference):
    model = load_model(setup / "model")
    train = image_folder(setup / "data", 1, 8)
    idx = load(reference, model)
    cfg = AttributionConfig(**idx.manifest["method"])
    att = Attributor(model, train, cfg, progress=False).fit()
    queries = mnist(size=8, n=N + 20).images[N:]
    dense = att.scores(queries).numpy()
    psi = idx.query_features(queries)
    k = 10
    s_top, i_top, s_bot, i_bot = idx.search(psi, k)
    np.testing.assert_array_equal(i_top, np.argsort(-dense, axis=1)[:, :k])
    np.testing.assert_array_equal(i_bot, np.argsort(dense, axis=1)[:, :k])
    np.testing.assert_allclose(s_top, -np.sort(-dense, axis=1)[:, :k], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_index(setup, reference):
    out = setup / "killed"
    rng = random.Random(0)
    finished_before: dict[str, float] = {}
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, *build_cmd(setup, out)],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(3.0, 9.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        shards = (
            {q.name: q.stat().st_mtime_ns for q in (out / "shards").glob("*.safetensors")}
            if (out / "shards").exists()
            else {}
        )
        for name, mtime in finished_before.items():  # finished shards are never recomputed
            assert shards[name] == mtime
        finished_before = shards
    run_build(setup, out)
    after = {q.name: q.stat().st_mtime_ns for q in (out / "shards").glob("*.safetensors")}
    for name, mtime in finished_before.items():
        assert after[name] == mtime
    np.testing.assert_allclose(features(out), features(reference), rtol=0, atol=1e-6)
    assert (out / "manifest.json").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(setup, reference):
    out = setup / "dist"
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", *build_cmd(setup, out)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    np.testing.assert_allclose(features(out), features(reference), rtol=1e-5, atol=1e-7)
    a = load(out).all_features()
    b = load(reference).all_features()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_refuses_another_model(setup, reference):
    other = build_model("tiny", seed=1)
    with pytest.raises(IndexLoadError, match="another model"):
        load(reference, other)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_refuses_unknown_format_and_corruption(setup, reference, tmp_path):
    model = load_model(setup / "model")
    bad = _copy(reference, tmp_path / "version")
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match="format version"):
        load(bad, model)

    bad = _copy(reference, tmp_path / "truncated")
    data = (bad / "features.faiss").read_bytes()
    (bad / "features.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexLoadError, match="features.faiss"):
        load(bad, model)

    bad = _copy(reference, tmp_path / "manifest")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(IndexLoadError, match="corrupted manifest"):
        load(bad, model)

    bad = _copy(reference, tmp_path / "unfinished")
    (bad / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="not finished"):
        load(bad, model)

    with pytest.raises(IndexLoadError, match="another model|other training data"):
        load(reference, model, data_fingerprint="0" * 64)


def test_query_cli_prints_table_and_json(setup, reference, tmp_path):
    q = save_images(mnist(size=8, n=1).images, tmp_path / "q")[0]
    out = tmp_path / "res.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "explorer.cli",
            "query",
            "--index",
            str(reference),
            "--model",
            str(setup / "model"),
            "--image",
            str(q),
            "--top-k",
            "5",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "proponent" in r.stdout
    res = json.loads(out.read_text())
    assert len(res["proponents"]) == 5 and len(res["opponents"]) == 5
    scores = [h["score"] for h in res["proponents"]]
    assert scores == sorted(scores, reverse=True)


def test_changed_settings_start_a_new_build(setup, reference, tmp_path):
    model = load_model(setup / "model")
    train = image_folder(setup / "data", 1, 8)
    out = _copy(reference, tmp_path / "changed")
    cfg = AttributionConfig(method="gradcos", dim=128, draws=2, batch_size=16)
    build_index(model, train, out, cfg, shard_size=32, progress=False, overwrite=True)
    idx = load(out, model)
    assert idx.method == "gradcos"
    assert not (out / "shards").exists()  # removed once the store is written (no --keep-shards)
    feats = idx.all_features()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-4)


@pytest.mark.slow
def test_sq8_store_tracks_the_flat_one(setup, reference, tmp_path):
    """The 8-bit store (1 byte a number, the default for big indexes) keeps the ranking: its
    quantisation error is tiny next to the spread of the scores, and no value is clipped."""
    model = load_model(setup / "model")
    out = tmp_path / "sq8"
    subprocess.run(
        [sys.executable, *build_cmd(setup, out), "--faiss", "sq8"],
        check=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    flat, sq8 = load(reference, model), load(out, model)
    assert sq8.manifest["faiss"]["type"] == "sq8" and flat.manifest["faiss"]["type"] == "flat"
    assert (out / "features.faiss").stat().st_size < (reference / "features.faiss").stat().st_size / 3
    psi = flat.query_features(mnist(size=8, n=N + 8).images[N:])
    exact, approx = flat.all_scores(psi), sq8.all_scores(psi)
    np.testing.assert_allclose(exact, (psi @ features(reference).T), rtol=1e-4, atol=1e-6)
    rel = (approx - exact) / exact.std(axis=1, keepdims=True)  # theory: rms ≈ 0.007, from 1/255 steps
    assert np.sqrt((rel**2).mean()) < 0.01 and np.abs(rel).max() < 0.04, rel
    s_top, i_top, s_bot, i_bot = sq8.search(psi, 5)
    np.testing.assert_array_equal(s_top, -np.sort(-approx, axis=1)[:, :5])
    np.testing.assert_array_equal(s_bot, np.sort(approx, axis=1)[:, :5])


def test_auto_store_type_by_size():
    from index.store import AUTO_FLAT_BYTES, resolve_faiss_type

    assert resolve_faiss_type("auto", 5000, 8192) == "flat"
    assert resolve_faiss_type("auto", 5000, 131072) == "sq8"
    assert resolve_faiss_type("auto", AUTO_FLAT_BYTES // 4, 1) == "flat"
    assert resolve_faiss_type("hnsw", 10**9, 10**6) == "hnsw"
    with pytest.raises(ValueError, match="unknown FAISS"):
        resolve_faiss_type("pq", 1, 1)
