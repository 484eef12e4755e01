"""Smoke test of benchmarks/vs_peers.py against kronfluence (skipped when it is not installed).

A tiny untrained 8×8 model stands in for the default one: kronfluence's EK-FAC and our unprojected
EK-FAC, fitted on the same rows with the same MC-GGN samples and the same per-layer damping,
must rank the training images alike, with the same sign convention.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None,
                                reason="kronfluence not installed (benchmarks/requirements-peers.txt)")

ROOT = Path(__file__).resolve().parent.parent


def test_kronfluence_agrees_with_ours_unprojected(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vs_peers

    monkeypatch.setattr(vs_peers, "load_bench_model", _tiny_model)
    monkeypatch.setattr(vs_peers, "load_inputs", _tiny_inputs)
    setup = {"n": 24, "q": 3, "k": 2, "kc": 2, "seed": 0, "batch_size": 8, "threads": 1,
             "workdir": str(tmp_path), "model": "tiny"}
    import torch

    from attribution.data import mnist

    torch.save(mnist(size=8).images[24:27].clone(), tmp_path / "queries.pt")
    _, ours = vs_peers.worker_ours(setup, "ours-unprojected")
    _, theirs = vs_peers.worker_kronfluence(setup)
    assert ours.shape == theirs.shape == (3, 24)
    rho = vs_peers.mean_spearman(np.asarray(ours), np.asarray(theirs))
    assert rho > 0.9, rho


def _tiny_model(setup):
    from attribution.model import build_model

    model = build_model("tiny", seed=0)
    model.unet.eval().requires_grad_(False)
    return model


def _tiny_inputs(setup):
    import torch

    from attribution.data import mnist

    data = mnist(size=8).subset(range(setup["n"]))
    return _tiny_model(setup), data, torch.load(Path(setup["workdir"]) / "queries.pt")
