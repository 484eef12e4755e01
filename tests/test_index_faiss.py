"""--faiss accepts FAISS factory strings, trained on a streamed sample of the features (issue 14)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import index.faiss_build as fb
from attribution.data import load_dataset
from attribution.errors import ConfigError
from attribution.influence import AttributionConfig
from attribution.model import build_model
from index import IndexLayout
from index.build import build_index
from index.store import load

N = 64


def test_factory_index_trains_on_a_streamed_sample(monkeypatch):
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    calls, trained = [], []

    def chunks():
        calls.append(1)
        return (x[i : i + 50] for i in range(0, 300, 50))  # blocks, never the whole matrix

    monkeypatch.setattr(fb, "TRAIN_ROWS", 120)
    real = faiss.IndexIVFScalarQuantizer.train
    monkeypatch.setattr(
        faiss.IndexIVFScalarQuantizer, "train", lambda self, s: (trained.append(s.copy()), real(self, s))[1]
    )
    index = fb.faiss_from_chunks(chunks, 32, "IVF4,SQ8", n=300)
    assert len(calls) == 2 and index.ntotal == 300 and faiss.extract_index_ivf(index).nprobe == 1
    (sample,) = trained
    assert sample.shape == (120, 32)
    assert all((sample[i] == x).all(1).any() for i in range(120))  # rows of x, a seeded subset
    again = []
    monkeypatch.setattr(
        faiss.IndexIVFScalarQuantizer, "train", lambda self, s: (again.append(s.copy()), real(self, s))[1]
    )
    fb.faiss_from_chunks(chunks, 32, "IVF4,SQ8", n=300)
    np.testing.assert_array_equal(again[0], sample)


def test_named_ivf_trains_on_a_streamed_sample_too(monkeypatch):
    """`--faiss ivf` no longer concatenates every vector for k-means (issue 19): it trains on the
    same seeded sample as a factory string, and every stored vector is found by itself."""
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    calls, trained = [], []

    def chunks():
        calls.append(1)
        return (x[i : i + 50] for i in range(0, 300, 50))

    monkeypatch.setattr(fb, "TRAIN_ROWS", 100)
    real = faiss.IndexIVFFlat.train
    monkeypatch.setattr(
        faiss.IndexIVFFlat, "train", lambda self, s: (trained.append(s.copy()), real(self, s))[1]
    )
    index = fb.faiss_from_chunks(chunks, 16, "ivf", n=300)
    assert len(calls) == 2 and index.ntotal == 300 and trained[0].shape == (100, 16)
    index.nprobe = index.nlist
    _, i = index.search(x / np.linalg.norm(x, axis=1, keepdims=True), 1)
    norms = np.linalg.norm(x, axis=1)
    best = np.argmax((x / norms[:, None]) @ x.T, axis=1)  # inner product: the best row of each query
    np.testing.assert_array_equal(i[:, 0], best)


@pytest.fixture(scope="module")
def parts():
    return build_model("tiny", seed=0), load_dataset("mnist", channels=1, size=8, n=N)


def build(parts, out, faiss_type):
    model, data = parts
    cfg = AttributionConfig(method="gradsim", dim=64, draws=1, batch_size=16, query_draws=2)
    return build_index(model, data, out, cfg, faiss_type=faiss_type, shard_size=16, progress=False)


@pytest.mark.parametrize(
    "kind,cls",
    [
        ("IVF4,SQ8", faiss.IndexIVFScalarQuantizer),
        ("IVF4,PQ8x4", faiss.IndexIVFPQ),
        ("HNSW16", faiss.IndexHNSWFlat),
        ("Flat", faiss.IndexFlat),
    ],
)
def test_tiny_index_with_a_factory_string(parts, tmp_path, kind, cls):
    model, data = parts
    flat = load(build(parts, tmp_path / "flat", "flat"), model)
    idx = load(build(parts, tmp_path / "f", kind), model)
    assert isinstance(idx.faiss, cls) and len(idx) == N
    assert idx.manifest["faiss"]["type"] == kind and idx.manifest["faiss"]["requested"] == kind
    psi = idx.query_features(load_dataset("mnist", channels=1, size=8, n=N + 2).images[N:])
    exact = psi @ flat.all_features().T
    s_top, i_top, s_bot, i_bot = idx.search(psi, 5)
    assert (i_top >= 0).all() and (i_bot >= 0).all()
    for q in range(len(psi)):  # the rows found are scored close to their exact scores
        scale = np.abs(exact[q]).max()
        np.testing.assert_allclose(s_top[q], exact[q, i_top[q]], atol=0.2 * scale)
        assert s_top[q, 0] >= s_bot[q, 0]
    if kind in ("HNSW16", "Flat"):  # exact vectors: the true top rows
        np.testing.assert_array_equal(i_top[:, 0], exact.argmax(1))


def test_factory_string_that_cannot_be_trained_is_refused_before_the_features(parts, tmp_path):
    with pytest.raises(ConfigError, match="needs at least 256 training rows"):
        build(parts, tmp_path / "idx", "IVF256,Flat")
    assert IndexLayout(tmp_path / "idx").rows_done() == 0
    with pytest.raises(ConfigError, match="fits D = 64"):
        build(parts, tmp_path / "idx2", "PQ15")  # parses, but 64 is no multiple of 15
