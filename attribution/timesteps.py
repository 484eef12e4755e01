"""Importance sampling of timesteps (issue 13; Xie et al., "Timestep-induced bias").

Per-row gradients differ in size by orders of magnitude over t, so uniformly drawn timesteps
(even stratified ones) spend most draws where the gradient is small, and the variance of a
feature comes from the few draws at large-gradient timesteps. For the mean of a random vector
g(t) over t, the density that minimises the estimator's variance is p(t) ∝ √E‖g(t)‖². We measure
E‖g(t)‖² of the *preconditioned* per-row feature (what the scores are made of) in `bins` equal
bins of t, on a seeded sample of training images, once per fit, and draw

    p(t) ∝ (1 − floor) · rms(bin(t)) / Σ_b rms(b) + floor / T

(a mixture with the uniform density, so no row weight exceeds 1 / floor). Each row is weighted
by 1 / (T · p(t)) (`measurements.Measurement.density`), so the mean over rows still estimates
the uniform mean over t: the score's expectation is unchanged, only its variance moves.
"""

from __future__ import annotations

import torch

from attribution.features import FeatureMap, gradient_features
from attribution.measurements import Measurement

BINS = 10
FLOOR = 0.2


def bin_sq_norms(
    model,
    fmap: FeatureMap,
    images: torch.Tensor,
    keys: list[int],
    train_fn: str,
    seed: int,
    bins: int = BINS,
    batch_size: int = 32,
    device=None,
    cond=None,
) -> torch.Tensor:
    """(bins,) mean squared norm of a one-row feature with t uniform in each bin, over `images`
    (under their conditions `cond`, for a conditional model)."""
    t_total = model.num_timesteps
    edges = torch.linspace(0, t_total, bins + 1).round().long()
    out = torch.empty(bins, dtype=torch.float64)
    for b in range(bins):
        inside = torch.zeros(t_total)
        inside[edges[b] : edges[b + 1]] = 1.0
        meas = Measurement(train_fn, density=inside / inside.sum())
        f = gradient_features(
            model,
            fmap,
            images,
            keys,
            meas,
            1,
            seed,
            batch_size,
            progress=False,
            device=device or "cpu",
            cond=cond,
        )
        out[b] = f.double().pow(2).sum(1).mean()
    return out


def density_from_bins(sq_norms: torch.Tensor, num_timesteps: int, floor: float = FLOOR) -> torch.Tensor:
    """(T,) float64 density over timesteps from per-bin mean squared norms (equal bins)."""
    bins = sq_norms.shape[0]
    edges = torch.linspace(0, num_timesteps, bins + 1).round().long()
    rms = sq_norms.double().clamp(min=0).sqrt()
    mass = rms / rms.sum() if rms.sum() > 0 else torch.full_like(rms, 1.0 / bins)
    p = torch.empty(num_timesteps, dtype=torch.float64)
    for b in range(bins):
        p[edges[b] : edges[b + 1]] = mass[b] / (edges[b + 1] - edges[b])
    return (1 - floor) * p + floor / num_timesteps
