"""At the default budget D, projected EK-FAC scores rank like unprojected ones on the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from attribution.influence import AttributionConfig
from attribution.model import DEFAULT_MODEL_DIR, load_model

ROOT = Path(__file__).resolve().parent.parent


def _fidelity():
    spec = importlib.util.spec_from_file_location("projection_fidelity",
                                                  ROOT / "benchmarks" / "projection_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fidelity


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "unet").exists(), reason="default model not committed")
def test_default_dim_spearman_with_unprojected():
    d = AttributionConfig().dim
    res = _fidelity()(load_model(), n_train=96, n_queries=4, dims=[d], draws=2, query_draws=8,
                      curvature_draws=1)
    r = res["dims"][str(d)]
    assert r["spearman"] >= 0.9, r
