"""Influence by timestep band (attribution/bands.py): the one-pass band features against the
reference (a separate pass of the measurement with the rows outside the band weighted 0), their
sum against the query features, and band scores that add up to the score, for every band setting
and for methods on each feature path (sketch with halves, Kronecker, normalised, TRAK)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.bands import BAND_COUNTS, BandMeasurement, Bands, band_scores, query_band_features
from attribution.errors import ConfigError
from attribution.features import gradient_features
from attribution.influence import QUERY_KEY, AttributionConfig, Attributor

SMALL = {"draws": 4, "curvature_draws": 1, "query_draws": 16, "dim": 256, "curvature_min_rows": 64}


@pytest.fixture(scope="module")
def setup(tiny_workspace):
    model = tiny_workspace.model()
    data = tiny_workspace.data()
    return model, data.subset(range(24)), data.images[100:103]


def _attributor(setup, method: str, **extra) -> Attributor:
    model, train, _ = setup
    cfg = AttributionConfig(method=method, **{**SMALL, **extra})
    return Attributor(model, train, cfg, progress=False).fit()


def _reference(att: Attributor, images: torch.Tensor, bands: Bands) -> torch.Tensor:
    """ψ_b (Q, bands, D) by separate passes of the band-restricted measurement."""
    cfg, meas, halves = att.config, att.measurement("query"), att.spread_available
    out = []
    for b in range(len(bands)):
        f = gradient_features(
            att.model,
            att.feature_map("query"),
            images,
            [QUERY_KEY] * images.shape[0],
            BandMeasurement(meas, bands.edges[b], bands.edges[b + 1]),
            cfg.query_draws,
            cfg.seed,
            cfg.batch_size,
            cfg.stratified,
            cfg.antithetic,
            progress=False,
            halves=halves,
        )
        out.append(f.mean(1) if halves else f)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "method, extra",
    [("ekfac", {}), ("kfac", {"projection": "kronecker", "dim": 64}), ("gradsim", {}), ("trak", {})],
)
def test_band_features_match_the_reference_and_sum_to_the_query_feature(setup, method, extra):
    att = _attributor(setup, method, **extra)
    images = setup[2]
    if method == "trak":
        att.fit_trak(att.raw_train_features())
    psi_ref, dpsi_ref = att.query_features_with_spread(images)
    phi = att.train_features()
    full = (psi_ref @ phi.T).double()
    for n in (1, *BAND_COUNTS):
        bands = Bands.equal(n, att.model.num_timesteps)
        psi, dpsi, psi_b = query_band_features(att, images, bands)
        scale = psi_ref.abs().max()
        torch.testing.assert_close(psi, psi_ref, atol=1e-5 * scale, rtol=1e-4)
        if att.spread_available:
            torch.testing.assert_close(dpsi, dpsi_ref, atol=1e-5 * dpsi_ref.abs().max(), rtol=1e-4)
        else:
            assert dpsi is None
        ref = _reference(att, images, bands)
        if att.spec.normalize:  # every band divided by the same ‖ψ‖ of the whole measurement
            ref = ref / ref.sum(1).norm(dim=1)[:, None, None]
        torch.testing.assert_close(psi_b, ref, atol=1e-5 * scale, rtol=1e-4)
        # the band scores add up to the score, within 1e-4 relative, for every training image
        parts = band_scores(psi_b, phi)
        total = parts.sum(1)
        rel = ((total - full).abs() / full.abs().clamp(min=1e-12)).numpy()
        big = np.abs(full.numpy()) > 1e-3 * np.abs(full.numpy()).max()  # away from round-off level
        assert rel[big].max() < 1e-4, (n, rel[big].max())
        assert len(parts[0]) == n


def test_bands_cover_every_timestep_once():
    for n in (1, *BAND_COUNTS, 7):
        b = Bands.equal(n, 1000)
        t = torch.arange(1000)
        which = b.of(t)
        assert which.min() == 0 and which.max() == n - 1
        for i in range(n):  # band i is exactly [edges[i], edges[i+1])
            assert torch.equal(t[which == i], torch.arange(b.edges[i], b.edges[i + 1]))
        assert len(b.names) == n
    assert "high noise" in Bands.equal(2, 1000).names[1] and "low noise" in Bands.equal(2, 1000).names[0]
    with pytest.raises(ConfigError):
        Bands.equal(0, 1000)


def test_pixel_similarity_has_no_bands(setup):
    att = _attributor(setup, "pixel")
    with pytest.raises(ConfigError, match="no timestep bands"):
        query_band_features(att, setup[2], Bands.equal(2, 1000))
