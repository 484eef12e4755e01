"""Seed stability: how much an attribution changes when only the dice change.

Protocol (issue 13): the same model, training images and queries, one configuration run under two
seeds (every random choice differs: curvature subset and draws, projection, training and query
draws). Per query: Spearman between the two score rows over all training images, and the overlap
of the two top-k proponent lists (|A ∩ B| / k). Means over queries are the figures.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from attribution.ranks import spearman


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) row indices of the k largest scores of each query (largest first)."""
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """Per-query Spearman and top-k overlap between two (Q, N) score matrices."""
    if a.shape != b.shape:
        raise ValueError(f"score matrices differ in shape: {a.shape} vs {b.shape}")
    k = min(k, a.shape[1])
    rho = np.array([spearman(a[q], b[q]) for q in range(a.shape[0])])
    ta, tb = top_k(a, k), top_k(b, k)
    overlap = np.array([len(set(ta[q]) & set(tb[q])) / k for q in range(a.shape[0])])
    return {
        "spearman": float(np.nan_to_num(rho).mean()),
        "top_k_overlap": float(overlap.mean()),
        "k": k,
        "per_query_spearman": np.nan_to_num(rho).tolist(),
        "per_query_overlap": (overlap * k).round().astype(int).tolist(),
    }


def seed_scores(
    model, train, queries: torch.Tensor, config, seed: int, progress: bool = True, curvature=None, device=None
) -> tuple[np.ndarray, dict]:
    """Scores (Q, N) of `config` under `seed`, and timings; `curvature` may be passed in (fitted
    for the same seed and curvature settings) to skip the fit."""
    from attribution.influence import Attributor

    cfg = replace(config, seed=seed)
    att = Attributor(model, train, cfg, progress=progress, device=device)
    t0 = time.time()
    att.fit(curvature=curvature)
    t1 = time.time()
    scores = att.scores(queries).numpy()
    t2 = time.time()
    return scores, {"fit_s": t1 - t0, "scores_s": t2 - t1, "curvature": att.curvature}


def seed_stability(
    model,
    train,
    queries: torch.Tensor,
    config,
    seeds: tuple[int, int] = (0, 1),
    k: int = 10,
    progress: bool = True,
    device=None,
) -> dict:
    """The protocol above for one configuration: agreement of its scores under two seeds."""
    runs = [seed_scores(model, train, queries, config, s, progress=progress, device=device) for s in seeds]
    out = agreement(runs[0][0], runs[1][0], k)
    out.update(
        {
            "seeds": list(seeds),
            "config": config.to_dict(),
            "n_train": len(train),
            "n_queries": int(queries.shape[0]),
            "seconds": [round(r[1]["fit_s"] + r[1]["scores_s"], 1) for r in runs],
        }
    )
    return out
