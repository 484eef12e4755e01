"""Retraining without each query's top influences (`attribution evaluate retrain-top-k`): per query
and method, the top fraction of training images by τ (or a random set) is removed, a model is
retrained on the rest with the ground truth's recipe and seeds, and the rise of the query's loss
over the baseline model (same draws) is measured. Resumable: every model's measurements are saved
as soon as it is trained, and n workers can share the models (`worker`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from attribution.atomic import save_numpy
from attribution.evaluation import load_groundtruth, mean_se, measure, method_lds, train_config
from attribution.model import build_model
from attribution.train import train


def removal_sets(scores: np.ndarray, fraction: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """(Q, k) training rows to remove per query: the top-k by τ (proponents first), or random."""
    k = max(1, int(round(fraction * scores.shape[1])))
    if rng is not None:
        return np.stack([rng.choice(scores.shape[1], k, replace=False) for _ in range(scores.shape[0])])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def retrain_top_k(
    groundtruth: str | Path,
    out: str | Path,
    methods: list[str],
    fractions=(0.02, 0.10),
    n_queries: int = 5,
    configs: dict | None = None,
    log=print,
    worker: tuple[int, int] = (0, 1),
    seeds: int = 1,
) -> dict | None:
    """Remove each query's top-k influences (per method, and at random), retrain, measure the rise.

    Every retraining uses the subset models' recipe and seeds (`steps`, training seed s of the
    ground truth for s < `seeds`, so the same initialisations and draws); the baseline is that
    recipe on all N images, per seed. A removal's rise is its loss minus its seed's baseline,
    averaged over the seeds. Each finished model's losses are saved at once, so a restart loses at
    most one model. Returns the summary (also written to `out/retrain_top_k.json`) once every
    model is done.
    """
    gt = load_groundtruth(groundtruth)
    cfg, out = gt.config, Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    queries = gt.queries[:n_queries]
    tcfg = train_config(cfg, cfg.seed + 100)

    def tag(name: str, s: int) -> str:  # seed 0 keeps the plain name (models trained before seeds)
        return name if s == 0 else f"{name}-s{s}"

    def run(name: str, rows: np.ndarray, s: int) -> None:
        path = out / "models" / f"{tag(name, s)}.npy"
        if path.exists():
            return
        seed = cfg.seed + 100 + s
        model = train(
            build_model(cfg.preset, seed=seed),
            gt.train_images[torch.from_numpy(rows)],
            train_config(cfg, seed),
            progress=False,
        )
        save_numpy(path, measure(model, queries, cfg.measure_draws, cfg.seed + 3))

    removed = _removals(gt, out, methods, fractions, n_queries, configs, worker, log)
    # interleaved (fraction, query, method) so a partial run compares the methods on the same queries
    order = [f"{m}-{f:g}-{q}" for f in fractions for q in range(n_queries) for m in methods]
    every = [("baseline", np.arange(gt.train_images.shape[0]))]
    every += [
        (name, np.setdiff1d(np.arange(gt.train_images.shape[0]), removed[name]))
        for name in order
        if name in removed
    ]
    jobs = [
        (name, rows, s)
        for s in range(seeds)
        for name, rows in every
        if not (out / "models" / f"{tag(name, s)}.npy").exists()
    ][worker[0] :: worker[1]]
    t0 = time.time()
    for n_done, (name, rows, s) in enumerate(jobs):
        run(name, rows, s)
        log(
            f"{tag(name, s)} done ({n_done + 1}/{len(jobs)}; "
            f"{(time.time() - t0) / (n_done + 1) * (len(jobs) - n_done - 1) / 60:.0f} min left)"
        )
    names = ["baseline"] + [f"{m}-{f:g}-{q}" for m in methods for f in fractions for q in range(n_queries)]
    if any(not (out / "models" / f"{tag(n, s)}.npy").exists() for n in names for s in range(seeds)):
        log("some models are still being trained (by other workers, or scores are missing)")
        return None
    summary = _retrain_summary(
        lambda name, s: np.load(out / "models" / f"{tag(name, s)}.npy"), methods, fractions, n_queries, seeds
    )
    summary["recipe"] = asdict(tcfg)
    (out / "retrain_top_k.json").write_text(json.dumps(summary, indent=2))
    return summary


def _removals(gt, out: Path, methods, fractions, n_queries: int, configs, worker, log) -> dict:
    """{"<method>-<fraction>-<query>": rows removed}; worker 0 computes and saves each method's
    scores first (the other workers skip the methods whose scores are not on disk yet)."""
    from attribution.influence import AttributionConfig

    cfg = gt.config
    removed = {}
    for method in methods:
        path = out / f"scores-{method}.npy"
        if method != "random" and not path.exists() and worker[0] == 0:
            log(f"scores of {method} for {n_queries} queries")
            c = AttributionConfig(**{"method": method, **(configs or {}).get(method, {})})
            save_numpy(path, method_lds(gt, c, progress=False)["scores"][:n_queries])
        for frac in fractions:
            if method == "random":
                sets = removal_sets(
                    np.zeros((n_queries, gt.train_images.shape[0])), frac, np.random.default_rng(cfg.seed + 7)
                )
            elif path.exists():
                sets = removal_sets(np.load(path), frac)
            else:
                continue  # worker 0 computes the scores first
            for q in range(n_queries):
                removed[f"{method}-{frac:g}-{q}"] = sets[q]
    return removed


def _retrain_summary(loss, methods: list[str], fractions, n_queries: int, seeds: int) -> dict:
    """Rise of each query's loss per removal (mean over seeds of removed − that seed's baseline),
    mean ± s.e. over queries, and the first method's paired differences to the others."""
    base = np.mean([loss("baseline", s) for s in range(seeds)], axis=0)
    rise = {
        m: {
            f"{f:g}": [
                float(np.mean([loss(f"{m}-{f:g}-{q}", s)[q] - loss("baseline", s)[q] for s in range(seeds)]))
                for q in range(n_queries)
            ]
            for f in fractions
        }
        for m in methods
    }
    return {
        "n_queries": n_queries,
        "fractions": list(fractions),
        "seeds": seeds,
        "baseline_loss": base.tolist(),
        "rise": rise,
        "mean_se": {m: {f: mean_se(v) for f, v in r.items()} for m, r in rise.items()},
        "paired": {
            f"{a}-vs-{b}": {
                f"{f:g}": mean_se(np.array(rise[a][f"{f:g}"]) - np.array(rise[b][f"{f:g}"]))
                for f in fractions
            }
            for a in methods[:1]
            for b in methods[1:]
        },
    }
