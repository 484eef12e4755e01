"""kronfluence's EK-FAC: Analyzer.fit_all_factors(strategy="ekfac") + compute_pairwise_scores.

Factors are fitted on *rows* (one (x_t, t) draw per dataset item, as our EK-FAC's corrected
eigenvalues are per row); `compute_train_loss(sample=True)` returns Σ_r mean_pixels(ε̂_r − y_r)²
with y_r = ε̂_r.detach() − √(d/2)·z, z ~ N(0, I), whose gradient covariance is the GGN (2/d)·I of
the mean-pixel MSE (our MC-GGN, DESIGN §1); z is the very sample our curvature back-propagates
for that row (own-MC: kronfluence's fresh draws). Scores use *examples* (K rows per item, loss =
mean over the K rows); kronfluence's per-sample gradients are per row of the U-Net batch, so
`post_process_per_sample_gradient` sums each example's K rows. Damping: kronfluence's per-layer
heuristic (`damping_factor=None`, λ = c·mean(Λ*)) with c set from 0.1 to our 1e-8, i.e. exactly
our exact-damping rule (kronfluence has no argument for c: its module constant is set, in this
worker process only).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

from benchmarks.peers.common import (
    OURS_DAMPING,
    BenchInputs,
    ExampleRows,
    PeerResult,
    SingleRows,
    peak_rss_mb,
    version,
)
from benchmarks.peers.timer import Timer


def _tasks(k: int, d: float, fresh_mc: bool):
    """The model wrapper and kronfluence's two tasks: rows (factor fitting), examples (scores)."""
    import torch
    from kronfluence.task import Task

    class Net(torch.nn.Module):
        """ε̂ = unet(x_t, t).sample, so that the Task sees a plain (x, t) -> tensor model."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t).sample

    class RowTask(Task):
        """Items are single rows (factor fitting). sample=True: targets from the model's predictive."""

        def compute_train_loss(self, batch, model, sample=False):
            x, t, y, z = batch
            out = model(x, t)
            if sample:  # y ~ N(ε̂, (d/2)·I), with our own seeded sample z unless own-mc
                z = torch.randn_like(out) if fresh_mc else z
                y = out.detach() - math.sqrt(d / 2) * z
            return (out - y).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    class ExampleTask(Task):
        """Items are examples with K rows; per-row per-sample gradients are summed per example."""

        enable_post_process_per_sample_gradient = True

        def compute_train_loss(self, batch, model, sample=False):
            x, t, y = batch
            kk = x.shape[1]
            out = model(x.flatten(0, 1), t.flatten())
            y = y.flatten(0, 1)
            if sample:
                with torch.no_grad():
                    y = out.detach() + math.sqrt(d / 2) * torch.randn_like(out)
            return (out - y).pow(2).flatten(1).mean(1).sum() / kk

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient.view(-1, k, *gradient.shape[1:]).sum(1)

    return Net, RowTask, ExampleTask


def _analyzers(inp: BenchInputs, outdir: Path, k: int, d: float, fresh_mc: bool):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    net, row_task, example_task = _tasks(k, d, fresh_mc)
    base = net(inp.model.unet).eval()
    dl = DataLoaderKwargs(num_workers=0)
    a_fit = Analyzer(
        "vs_peers",
        prepare_model(copy.deepcopy(base), row_task()),
        row_task(),
        cpu=True,
        output_dir=str(outdir),
        disable_tqdm=True,
    )
    a_fit.set_dataloader_kwargs(dl)
    a_score = Analyzer(
        "vs_peers",
        prepare_model(copy.deepcopy(base), example_task()),
        example_task(),
        cpu=True,
        output_dir=str(outdir),
        disable_tqdm=True,
    )
    a_score.set_dataloader_kwargs(dl)
    return a_fit, a_score


def run(setup: dict, inp: BenchInputs, timer: Timer, fresh_mc: bool = False) -> PeerResult:
    import kronfluence.factor.config as kf_config
    import torch
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from attribution.influence import QUERY_KEY

    rss0 = peak_rss_mb()
    k, kc, seed, n, q = setup["k"], setup["kc"], setup["seed"], setup["n"], inp.queries.shape[0]
    torch.manual_seed(seed)
    kf_config.HEURISTIC_DAMPING_SCALE = OURS_DAMPING  # our exact-damping rule: 0.1 · mean Λ*, per layer
    outdir = Path(setup["workdir"]) / ("kronfluence-own-mc" if fresh_mc else "kronfluence")
    shutil.rmtree(outdir, ignore_errors=True)
    a_fit, a_score = _analyzers(inp, outdir, k, float(inp.queries[0].numel()), fresh_mc)
    factor_rows = SingleRows(inp.model, inp.data.images, range(n), kc, seed)
    train = ExampleRows(inp.model, inp.data.images, range(n), k, seed)
    query_set = ExampleRows(inp.model, inp.queries, [QUERY_KEY] * q, k, seed)
    bs = setup["batch_size"]
    with timer.stage("fit_all_factors"):
        a_fit.fit_all_factors(
            "ekfac",
            dataset=factor_rows,
            per_device_batch_size=bs * kc,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
    rss_fit = peak_rss_mb()
    with timer.stage("compute_pairwise_scores"):
        a_score.compute_pairwise_scores(
            "pairwise",
            "ekfac",
            query_dataset=query_set,
            train_dataset=train,
            per_device_query_batch_size=min(q, 8),
            per_device_train_batch_size=bs,
            overwrite_output_dir=True,
            score_args=ScoreArguments(
                damping_factor=None, query_gradient_accumulation_steps=max(1, math.ceil(q / 8))
            ),
        )
    scores = a_score.load_pairwise_scores("pairwise")["all_modules"].float().numpy()
    _, single, single_cpu = Timer.measure(
        lambda: a_score.compute_pairwise_scores(
            "single",
            "ekfac",
            query_dataset=query_set,
            train_dataset=train,
            per_device_query_batch_size=1,
            per_device_train_batch_size=bs,
            query_indices=[0],
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
    )
    settings = {
        "strategy": "ekfac",
        "damping_factor": None,
        "HEURISTIC_DAMPING_SCALE": OURS_DAMPING,
        "damping": f"{OURS_DAMPING} x mean corrected eigenvalue per layer (kronfluence "
        "heuristic damping with its scale set from 0.1 to ours)",
        "factor_items": "rows (one draw each)",
        "score_items": "examples (K rows, summed)",
        "mc_target": "y = eps_hat - sqrt(d/2) z, z = "
        + ("kronfluence's own draws" if fresh_mc else "our MC-GGN samples"),
        "version": version("kronfluence"),
    }
    return PeerResult.from_timer(
        scores,
        timer,
        settings,
        rss0,
        single_query_s=single,
        single_query_cpu_s=single_cpu,
        peak_rss_factors_mb=round(rss_fit, 1),
    )
