"""Smoke tests of the peers benchmark (benchmarks/peers/).

A tiny untrained 8×8 model stands in for the default one: kronfluence's EK-FAC and our unprojected
EK-FAC, fitted on the same rows with the same MC-GGN samples and the same per-layer damping,
must rank the training images alike, with the same sign convention (skipped when kronfluence is
not installed). Our index adapter and the runner's tables run on the same tiny inputs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from benchmarks.peers import ours, tables
from benchmarks.peers.common import BenchInputs
from benchmarks.peers.timer import Timer

pytestmark = pytest.mark.peers


def _tiny_inputs(n: int = 24, q: int = 3) -> BenchInputs:
    from attribution.data import mnist
    from attribution.model import build_model

    model = build_model("tiny", seed=0)
    model.unet.eval().requires_grad_(False)
    images = mnist(size=8)
    return BenchInputs(model, images.subset(range(n)), images.images[n : n + q].clone())


def _setup(tmp_path) -> dict:
    return {
        "n": 24,
        "q": 3,
        "k": 2,
        "kc": 2,
        "seed": 0,
        "batch_size": 8,
        "threads": 1,
        "dim": 256,
        "single_queries": 2,
        "workdir": str(tmp_path),
        "model": "tiny",
    }


@pytest.mark.skipif(
    importlib.util.find_spec("kronfluence") is None,
    reason="kronfluence not installed (benchmarks/requirements-peers.txt)",
)
def test_kronfluence_agrees_with_ours_unprojected(tmp_path):
    from benchmarks.peers import peer_kronfluence

    setup = _setup(tmp_path)
    ours_res = ours.run(setup, _tiny_inputs(), Timer(), "ours-unprojected")
    theirs = peer_kronfluence.run(setup, _tiny_inputs(), Timer())
    assert ours_res.scores.shape == theirs.scores.shape == (3, 24)
    rho = tables.mean_spearman(np.asarray(ours_res.scores), np.asarray(theirs.scores))
    assert rho > 0.9, rho
    assert set(theirs.stages_s) == {"fit_all_factors", "compute_pairwise_scores"}
    assert theirs.total_s == pytest.approx(sum(theirs.stages_s.values()))


def test_ours_index_adapter_and_table(tmp_path):
    """ours-ekfac through the product's index: the same scores as its Attributor (to the sketch's
    sq8/flat store precision), stages timed through the timer passed in, one table row."""
    setup = _setup(tmp_path)
    res = ours.run(setup, _tiny_inputs(), Timer(), "ours-ekfac")
    assert res.scores.shape == (3, 24) and res.scores.dtype == np.float32
    assert {"build_index", "load_and_query_all"} <= set(res.stages_s)
    assert res.total_s == pytest.approx(res.stages_s["build_index"] + res.stages_s["load_and_query_all"])
    assert len(res.single_query_all_s) == 2 and res.throughput["ratio"] > 0
    record = {**res.to_dict(), "ok": True, "peak_rss_mb": 1.0}
    assert "scores" not in record
    row = tables.table({"ours-ekfac": record}, {**setup, "model": "tiny"}).splitlines()[-1]
    assert row.startswith("| ours-ekfac | ") and "1.00×" in row


def test_timer_sums_stages():
    timer = Timer()
    with timer.stage("a"):
        torch.ones(10).sum()
    with timer.stage("a"):
        pass
    with timer.stage("b"):
        pass
    assert set(timer.wall) == {"a", "b"} and timer.total_s == pytest.approx(sum(timer.wall.values()))
    out, wall, cpu = Timer.measure(lambda: 3)
    assert out == 3 and wall >= 0 and cpu >= 0 and set(timer.wall) == {"a", "b"}


def test_dattri_relative_ridge_is_our_trak_ridge():
    """dattri adds its `regularization` to XᵀX's diagonal; ours adds 1e-3 × that diagonal's mean."""
    from benchmarks.peers.peer_dattri import relative_ridge

    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernel = x.T @ x
    expected = kernel + 1e-3 * kernel.diagonal().mean() * torch.eye(5, dtype=kernel.dtype)
    kernel.diagonal().add_(relative_ridge(1e-3))
    assert torch.equal(kernel, expected)
