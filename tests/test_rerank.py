"""Retrieve and rerank (index/rerank.py): a real FAISS first stage and float16 full features on disk.

- The reranked scores are the exact inner products with the stored (float16) rows.
- With every row a candidate, both ends are the exact top-k and bottom-k.
- Reranking the first stage's candidates never loses one of its own top-k that is an exact top-k.
- A saved folder loads back to the same answers; only the first stage is held in memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from index.rerank import FULL, Reranked, build_reranked

N, D, K = 3000, 64, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, D)) * np.linspace(3, 0.2, D)).astype(np.float32)
    q = (rng.standard_normal((5, D)) * np.linspace(3, 0.2, D)).astype(np.float32)
    return x, q


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    x, _ = data
    folder = tmp_path_factory.mktemp("rerank")
    rr = build_reranked(
        lambda: (x[i : i + 700] for i in range(0, N, 700)),
        D,
        N,
        folder,
        reduce=16,
        first="PQ8x4fs",
        candidates=300,
    )
    return folder, rr


def exact_ends(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.astype(np.float16).astype(np.float32).T
    return s, np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_reranked_scores_are_exact_and_all_candidates_give_the_exact_ends(data, built):
    x, q = data
    _, rr = built
    s, top = exact_ends(x, q, K)
    bot = np.argsort(s, axis=1, kind="stable")[:, :K]
    ts, ti, bs, bi = rr.search(q, K, candidates=N)
    np.testing.assert_allclose(ts, np.take_along_axis(s, ti, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(bs, np.take_along_axis(s, bi, 1), rtol=1e-5, atol=1e-4)
    assert (np.diff(ts, axis=1) <= 0).all() and (np.diff(bs, axis=1) >= 0).all()
    assert [set(r) for r in ti] == [set(r) for r in top]
    assert [set(r) for r in bi] == [set(r) for r in bot]


def test_rerank_keeps_what_the_first_stage_found(data, built):
    x, q = data
    _, rr = built
    _, top = exact_ends(x, q, K)
    prop = rr.propose(q, 300)
    _, ti, _, _ = rr.search(q, K, candidates=300)
    for j in range(len(q)):
        found_first = set(prop[j][:K]) & set(top[j])
        assert found_first <= set(ti[j])  # an exact top-k among the candidates stays in the top-k
        assert len(set(ti[j]) & set(top[j])) >= len(found_first)


def test_saved_folder_loads_back_and_only_the_first_stage_is_in_memory(data, built):
    _, q = data
    folder, rr = built
    again = Reranked.load(folder)
    assert isinstance(again.full, np.memmap) and again.full.dtype == np.float16
    for a, b in zip(rr.search(q, K), again.search(q, K)):
        np.testing.assert_array_equal(a, b)
    assert again.ram_bytes < (folder / FULL).stat().st_size


def test_a_two_level_first_stage_refines_its_fast_candidates(data, tmp_path):
    """The default kind of first stage, fast-scan PQ then 8-bit codes (`Refine`): the fast codes
    propose REFINE_FACTOR × C rows, and with every row proposed the ends are exact."""
    import faiss

    from index.rerank import REFINE_FACTOR

    x, q = data
    rr = build_reranked(
        lambda: (x[i : i + 700] for i in range(0, N, 700)),
        D,
        N,
        tmp_path,
        reduce=16,
        first="PQ8x4fs,Refine(SQ8)",
    )
    inner = faiss.downcast_index(faiss.downcast_index(rr.first).index)
    assert isinstance(inner, faiss.IndexRefine) and inner.k_factor == REFINE_FACTOR
    s, top = exact_ends(x, q, K)
    _, ti, _, _ = rr.search(q, K, candidates=N)
    assert [set(r) for r in ti] == [set(r) for r in top]
