"""Variance reduction keeps the estimand: importance-sampled timesteps are unbiased, the two
independent halves of the draws average to the full feature, and the stability figures measure
what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.data import mnist
from attribution.features import gradient_features, half_order
from attribution.influence import AttributionConfig, Attributor
from attribution.measurements import Measurement, evaluate
from attribution.model import build_model
from attribution.stability import agreement, top_k
from attribution.timesteps import density_from_bins


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def data():
    ds = mnist(size=8, n=12)
    return ds.subset(range(8)), ds.images[8:12]


def test_density_is_a_density_with_bounded_weights():
    sq = torch.tensor([100.0, 50.0, 1.0, 0.0, 1e-4])
    p = density_from_bins(sq, 1000, floor=0.2)
    assert p.shape == (1000,) and abs(float(p.sum()) - 1) < 1e-9
    assert float((1 / (1000 * p)).max()) <= 1 / 0.2 + 1e-9  # no row weight above 1 / floor
    assert p[:200].sum() > p[200:400].sum() > p[400:].sum()


@pytest.mark.parametrize("antithetic", [False, True])
def test_importance_weighted_rows_are_unbiased(model, data, antithetic):
    """Rows drawn by importance, weighted by 1 / (T p(t)), estimate the uniform mean over t of any
    function of t; here ᾱ_t, which runs from 1 to 0. Unweighted, the same rows are far off."""
    x = data[0].images[:2]
    steep = density_from_bins(torch.tensor([400.0, 100.0, 1.0, 0.01]), model.num_timesteps, floor=0.1)
    acp = model.alphas_cumprod()
    k = 2000
    rows = Measurement("loss", density=steep).rows(x, [0, 1], k, 3, acp, antithetic=antithetic)
    f = (rows.w * acp[rows.t]).view(2, k)
    est, se = f.mean(1), f.std(1) / k**0.5
    truth = acp.mean()
    assert ((est - truth).abs() / se).max() < 4, (est, truth)
    unweighted = acp[rows.t].view(2, k).mean(1)
    assert ((unweighted - truth).abs() / se).min() > 10  # the weights matter
    loss_rows = Measurement("loss", density=steep).rows(x, [0, 1], 8, 3, acp, antithetic=antithetic)
    vals = evaluate(model.unet, loss_rows)  # the loss is the weighted mean over rows
    with torch.no_grad():
        out = model.unet(loss_rows.x, loss_rows.t).sample
    direct = (loss_rows.w * (out - loss_rows.y).pow(2).flatten(1).mean(1)).view(2, 8).mean(1)
    torch.testing.assert_close(vals, direct)


def test_half_order_alternates_strata():
    assert half_order(8, False).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert half_order(8, True).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError):
        half_order(6, True)


@pytest.mark.parametrize(
    "dim,projection,antithetic", [(None, "sketch", False), (512, "sketch", True), (512, "kronecker", False)]
)
def test_halves_average_to_the_full_feature(model, data, dim, projection, antithetic):
    train, _ = data
    cfg = AttributionConfig(
        method="ekfac",
        dim=dim,
        projection=projection,
        draws=4,
        curvature_draws=1,
        damping=0.1,
        antithetic=antithetic,
    )
    att = Attributor(model, train, cfg, progress=False).fit()
    keys = list(range(len(train)))
    args = (model, att.feature_map("train"), train.images, keys, Measurement("loss"), 4, 0)
    kw = dict(antithetic=antithetic, batch_size=3, progress=False)
    full = gradient_features(*args, **kw)
    halves = gradient_features(*args, halves=True, **kw)
    assert halves.shape == (len(train), 2, full.shape[1])
    torch.testing.assert_close(halves.mean(1), full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))
    assert (halves[:, 0] - halves[:, 1]).abs().max() > 1e-3 * full.abs().max()  # different draws


def test_importance_config_fits_a_density_and_scores(model, data):
    train, queries = data
    cfg = AttributionConfig(
        method="ekfac",
        dim=512,
        draws=4,
        query_draws=4,
        curvature_draws=1,
        damping=0.1,
        importance=True,
        profile_images=4,
    )
    att = Attributor(model, train, cfg, progress=False).fit()
    assert att.density is not None and abs(float(att.density.sum()) - 1) < 1e-9
    s = att.scores(queries)
    assert s.shape == (len(queries), len(train)) and torch.isfinite(s).all()


def test_agreement_figures():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50))
    same = agreement(a, a.copy(), k=10)
    assert same["spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0
    opp = agreement(a, -a, k=10)
    assert opp["spearman"] == pytest.approx(-1.0) and opp["top_k_overlap"] == 0.0
    assert (np.sort(a, axis=1)[:, ::-1][:, :5] == np.take_along_axis(a, top_k(a, 5), axis=1)).all()


@pytest.mark.parametrize("method", ["ekfac", "trak", "gradcos"])
def test_spread_scores_match_and_se_is_calibrated(model, data, method):
    """scores_with_spread gives the plain scores, and its standard error matches the spread of
    the scores over 16 seeds of the draws (curvature and projection held fixed)."""
    train, queries = data
    base = dict(
        method=method,
        dim=512,
        draws=4,
        # se² = (ψ·δ + δψ·φ)² carries tr(Σψ Σφ) on top of the variance: a second-order bias,
        # small once the query has more than a few draws (at 4 it put the ratio at 1.6–2.1)
        query_draws=16,
        curvature_draws=1,
        damping=0.1,
        antithetic=True,
        curvature_min_rows=0,
    )
    ref = Attributor(model, train, AttributionConfig(**base), progress=False).fit()
    runs, ses = [], []
    for seed in range(16):
        att = Attributor(model, train, AttributionConfig(**base, seed=seed), progress=False)
        att.fit(curvature=ref.curvature, projection=ref.projection)
        s, se = att.scores_with_spread(queries)
        if seed == 0:  # TRAK's inverse of an 8-image ΦᵀΦ amplifies float32 round-off of the halves
            plain = att.scores(queries)
            tol = 3e-2 if method == "trak" else 1e-3
            torch.testing.assert_close(s, plain, rtol=tol, atol=tol * 1e-2 * float(plain.abs().max()))
        runs.append(s)
        ses.append(se)
    if method == "trak":  # no half-split figure for TRAK-style methods (see scores_with_spread)
        assert torch.stack(ses).isnan().all()
        return
    emp_var = torch.stack(runs).var(0).mean()
    est_var = torch.stack(ses).pow(2).mean()
    ratio = float(est_var / emp_var)
    print(f"{method}: mean se² / variance over seeds = {ratio:.2f}")
    assert 0.5 < ratio < 2.0
