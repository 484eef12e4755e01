"""The latent model's LDS ground truth (attribution/groundtruth_latent.py), at a tiny size: the
shipped autoencoder frozen, conditional measurements, resumable, and scored by `method_lds`."""

from __future__ import annotations

import numpy as np
import torch

from attribution import groundtruth_latent as gl
from attribution.conditions import Conditions
from attribution.evaluation import load_groundtruth, measure, method_lds
from attribution.influence import AttributionConfig
from attribution.model import load_model

CFG = gl.LatentGroundTruthConfig(
    n_train=40,
    n_generated=4,
    n_real=2,
    subsets=3,
    seeds=1,
    steps=8,
    full_steps=10,
    batch_size=16,
    measure_draws=8,
    sample_steps=4,
)


def test_latent_groundtruth_small(tmp_path):
    out = gl.build(tmp_path / "gt", CFG, log=lambda *_: None)
    gt = load_groundtruth(out)
    shipped = load_model("mnist-latent")
    assert gt.measurements.shape == (3, 1, 6) and np.isfinite(gt.measurements).all()
    assert gt.train_images.shape == (40, 2, 8, 8)  # latents of the shipped (frozen) autoencoder
    full = load_model(gt.model_dir)
    assert full.autoencoder is not None
    for a, b in zip(full.autoencoder.parameters(), shipped.autoencoder.parameters()):
        assert torch.equal(a, b)
    assert gt.query_conditions.labels[:4].tolist() == [0, 1, 2, 3]  # generated under classes i mod 10
    assert len(gt.train_conditions) == 40
    # the measurement is conditional: the same latents under other classes have other losses
    other = Conditions.classes((gt.query_conditions.labels + 5) % 10, full.class_map)
    same = measure(full, gt.queries, 8, CFG.seed + 3, cond=gt.query_conditions)
    assert np.allclose(same, np.load(out / "full_measurements.npy"))
    assert not np.allclose(same, measure(full, gt.queries, 8, CFG.seed + 3, cond=other))
    # resuming finds everything done and retrains nothing
    files = {p.name: p.stat().st_mtime_ns for p in (out / "measurements").iterdir()}
    gl.build(out, CFG, log=lambda *_: None)
    assert files == {p.name: p.stat().st_mtime_ns for p in (out / "measurements").iterdir()}
    # D-TRAK: the conditional scoring path without a curvature fit (EK-FAC's takes ~40 s here)
    r = method_lds(gt, AttributionConfig(method="dtrak", draws=2, query_draws=4, dim=256), False)
    assert r["scores"].shape == (6, 40) and np.isfinite(r["scores"]).all() and len(r["per_query"]) == 6
