"""LDS arithmetic on synthetic data with known answers, and the sign convention end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.data import mnist
from attribution.evaluation import (
    GroundTruthConfig,
    build_groundtruth,
    lds_per_query,
    load_groundtruth,
    mean_se,
    measure,
    seed_agreement,
)
from attribution.influence import AttributionConfig, Attributor
from attribution.model import build_model
from attribution.retrain_top_k import removal_sets, retrain_top_k
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


@pytest.mark.slow
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
        mj = train(
            build_model("tiny", seed=0), x[torch.from_numpy(np.flatnonzero(masks[j]))], cfg, progress=False
        )
        losses.append(measure(mj, x, 64, seed=1))
    meas = np.stack(losses)  # (M, Q)
    full = train(build_model("tiny", seed=0), x, cfg, progress=False)
    att = Attributor(
        full, data, AttributionConfig(method="ekfac", dim=None, draws=8, query_draws=16), progress=False
    ).fit()
    scores = att.scores(x).numpy()
    lds = lds_per_query(scores, masks, meas)
    assert lds.mean() > 0.3, lds
    # and the reversed sign is clearly wrong
    assert lds_per_query(-scores, masks, meas).mean() < -0.3


def test_removal_sets_take_the_top_proponents():
    scores = np.array([[0.1, 3.0, -2.0, 0.5, 2.0], [5.0, -1.0, 0.0, 1.0, 4.0]])
    assert removal_sets(scores, 0.4).tolist() == [[1, 4], [0, 4]]
    r1 = removal_sets(scores, 0.4, np.random.default_rng(0))
    assert r1.shape == (2, 2) and (r1 == removal_sets(scores, 0.4, np.random.default_rng(0))).all()


def test_groundtruth_and_retrain_top_k_end_to_end(tmp_path):
    """A tiny ground truth, then removal of the top 10% per query and at random; resumable."""
    cfg = GroundTruthConfig(
        n_train=20,
        size=8,
        preset="tiny",
        n_generated=2,
        n_real=1,
        subsets=3,
        seeds=2,
        steps=15,
        full_steps=15,
        batch_size=8,
        measure_draws=8,
        trajectory_steps=5,
    )
    gt_dir = build_groundtruth(tmp_path / "gt", cfg, progress=False, log=lambda *_: None)
    gt = load_groundtruth(gt_dir)
    assert gt.measurements.shape == (3, 2, 3) and gt.masks.sum(1).tolist() == [10, 10, 10]
    out = tmp_path / "rt"
    res = retrain_top_k(
        gt_dir,
        out,
        ["gradsim", "random"],
        fractions=(0.1,),
        n_queries=2,
        configs={"gradsim": {"dim": None, "draws": 2, "query_draws": 4}},
        log=lambda *_: None,
    )
    assert set(res["rise"]) == {"gradsim", "random"} and len(res["rise"]["gradsim"]["0.1"]) == 2
    scores = np.load(out / "scores-gradsim.npy")
    assert scores.shape == (2, 20)
    # the rise is measured against the baseline model with the same draws
    base = np.load(out / "models" / "baseline.npy")
    got = np.load(out / "models" / "gradsim-0.1-1.npy")[1] - base[1]
    assert res["rise"]["gradsim"]["0.1"][1] == float(got)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    again = retrain_top_k(
        gt_dir, out, ["gradsim", "random"], fractions=(0.1,), n_queries=2, log=lambda *_: None
    )
    assert again["rise"] == res["rise"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}  # nothing retrained
