"""An index with stability figures: half-differences in spread.faiss, self-influence, and the
figures on every shown hit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.data import mnist

SPREAD_CFG = dict(draws=4, query_draws=4, antithetic=True, importance=True, profile_images=4, damping=0.1)


@pytest.fixture(scope="module")
def spread_index(tiny_workspace):
    return tiny_workspace.index("ekfac", **SPREAD_CFG)


def test_spread_files_and_self_influence(tiny_workspace, spread_index):
    from index.layout import IndexLayout
    from index.store import load

    lay = IndexLayout(spread_index)
    assert lay.spread.is_file() and lay.self_influence.is_file()
    idx = load(spread_index, tiny_workspace.model())
    assert idx.spread.ntotal == len(idx) and idx.spread.d == idx.faiss.d
    # τ(i, i) = N φ_A·φ_B from the image's own independent halves, as the library computes them
    att = idx.attributor
    data = tiny_workspace.data()
    att.train = data
    rows = [0, 7, 31]
    phi, delta = att.finish_with_spread(att.raw_train_features(rows, progress=False, halves=True))
    direct = len(data) * ((phi + delta) * (phi - delta)).sum(1)
    np.testing.assert_allclose(
        idx.self_influence[rows],
        direct.numpy(),
        rtol=1e-4,
        atol=1e-6 * float(np.abs(idx.self_influence).max()),
    )


def test_hits_carry_stability_figures(tiny_workspace, spread_index):
    from index.store import load

    idx = load(spread_index, tiny_workspace.model())
    q = mnist(size=8, n=210).images[205]
    res = idx.query(q, k=5)
    assert res.stability is not None and res.stability["pooled_se"] > 0
    for hits, desc in ((res.proponents, True), (res.opponents, False)):
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=desc)
        for h in hits:
            assert h.se > 0 and h.rank_a >= 1 and h.rank_b >= 1 and isinstance(h.distinct, bool)
    # the half ranks come from the same features: their mean score is the full score
    d = res.to_dict()
    assert {"se", "rank_a", "rank_b", "distinct"} <= d["proponents"][0].keys() and d["stability"]


def test_index_without_halves_has_no_figures(tiny_workspace):
    from index.layout import IndexLayout
    from index.store import load

    out = tiny_workspace.index("ekfac")  # 2 draws: cannot split evenly with antithetic off? it can: 1 + 1
    idx = load(out, tiny_workspace.model())
    if idx.attributor.spread_available:
        assert IndexLayout(out).spread.is_file()
    trak = load(tiny_workspace.index("trak"), tiny_workspace.model())
    assert trak.spread is None and not IndexLayout(trak.path).self_influence.exists()
    res = trak.query(mnist(size=8, n=210).images[205], k=3)
    assert res.stability is None and res.proponents[0].se is None
    assert torch.isfinite(torch.tensor([h.score for h in res.proponents])).all()
