"""LDS arithmetic on synthetic data with known answers, and the sign convention end to end."""

from __future__ import annotations

import numpy as np
import torch

from attribution.data import mnist
from attribution.evaluation import lds_per_query, mean_se, measure, seed_agreement
from attribution.influence import AttributionConfig, Attributor
from attribution.model import build_model
from attribution.train import TrainConfig, train


def _synthetic(q=30, n=60, m=50, seed=0):
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal((q, n))
    masks = rng.random((m, n)) < 0.5
    # the model's loss falls by τ for every proponent it was trained on
    meas = 1.0 - masks.astype(float) @ tau.T  # (M, Q)
    return tau, masks, meas, rng


def test_perfect_predictor_gives_one_and_reversed_minus_one():
    tau, masks, meas, _ = _synthetic()
    np.testing.assert_allclose(lds_per_query(tau, masks, meas), 1.0, atol=1e-12)
    np.testing.assert_allclose(lds_per_query(-tau, masks, meas), -1.0, atol=1e-12)


def test_noise_predictor_gives_about_zero():
    tau, masks, meas, rng = _synthetic(q=200)
    lds = lds_per_query(rng.standard_normal(tau.shape), masks, meas)
    mean, se = mean_se(lds)
    assert abs(mean) < 3 * se + 0.02 and se < 0.05


def test_partial_predictor_is_between():
    tau, masks, meas, rng = _synthetic(q=100)
    noisy = tau + 1.5 * rng.standard_normal(tau.shape)
    mean, _ = mean_se(lds_per_query(noisy, masks, meas))
    assert 0.2 < mean < 0.9


def test_seed_agreement_of_identical_seeds_is_one():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((20, 1, 5))
    assert np.allclose(seed_agreement(np.concatenate([m, m], axis=1)), 1.0)


def test_sign_convention_end_to_end_with_retrained_models():
    """Queries are training images; models trained on subsets that contain a query image fit it
    better, so Σ_{i∈S} τ(q, i) must correlate positively with −loss(q; θ_S)."""
    torch.manual_seed(0)
    data = mnist(size=8, n=12)
    x = data.images
    cfg = TrainConfig(steps=120, batch_size=6, lr=3e-3, warmup=10, ema_decay=0.9, checkpoint_every=10**9)
    rng = np.random.default_rng(0)
    masks = np.zeros((10, 12), dtype=bool)
    for j in range(10):
        masks[j, rng.choice(12, 6, replace=False)] = True
    losses = []
    for j in range(10):
        mj = train(build_model("tiny", seed=0), x[torch.from_numpy(np.flatnonzero(masks[j]))], cfg, progress=False)
        losses.append(measure(mj, x, 64, seed=1))
    meas = np.stack(losses)  # (M, Q)
    full = train(build_model("tiny", seed=0), x, cfg, progress=False)
    att = Attributor(full, data, AttributionConfig(method="ekfac", dim=None, draws=8, query_draws=16),
                     progress=False).fit()
    scores = att.scores(x).numpy()
    lds = lds_per_query(scores, masks, meas)
    assert lds.mean() > 0.3, lds
    # and the reversed sign is clearly wrong
    assert lds_per_query(-scores, masks, meas).mean() < -0.3
