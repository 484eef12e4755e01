"""Projection fidelity (issue 3): projected vs unprojected EK-FAC scores on the default model.

    python benchmarks/projection_fidelity.py [--n-train 500] [--n-queries 20] [--dims 4096 8192 16384]
        [--kinds sketch kronecker] [--damping 1e-8]

The curvature is fitted once and shared; for each projection kind and D the projected scores are
compared with the unprojected ones by Spearman and Pearson per query (mean over queries), and by
the overlap of the top-10 proponents. The queries are held-out real images (rows 4000+).
Writes benchmarks/results/projection_fidelity_<method>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.data import mnist  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.model import load_model  # noqa: E402


def fidelity(
    model,
    n_train: int,
    n_queries: int,
    dims: list[int],
    kinds: list[str],
    draws: int | None = None,
    query_draws: int | None = None,
    curvature_draws: int | None = None,
    curvature_min_rows: int | None = None,
    method: str = "ekfac",
    damping: float | None = None,
    progress: bool = False,
    tag: str = "",
) -> dict:
    """None: the configuration's default (AttributionConfig)."""
    data = mnist()
    train = data.subset(range(n_train))
    queries = data.images[4000 : 4000 + n_queries]
    given = dict(
        draws=draws,
        query_draws=query_draws,
        curvature_draws=curvature_draws,
        curvature_min_rows=curvature_min_rows,
    )
    base = dict(method=method, damping=damping, **{k: v for k, v in given.items() if v is not None})
    t0 = time.time()
    full = Attributor(model, train, AttributionConfig(**base, dim=None), progress=progress).fit()
    exact = full.scores(queries).numpy()
    out = {
        "n_train": n_train,
        "n_queries": n_queries,
        "method": method,
        "draws": full.config.draws,
        "config": full.config.to_dict(),
        "damping": full.spec.damping,
        "seconds_unprojected": time.time() - t0,
        "dims": {},
    }
    for kind, d in [(k, d) for k in kinds for d in dims]:
        att = Attributor(model, train, AttributionConfig(**base, dim=d, projection=kind), progress=progress)
        att.fit(curvature=full.curvature)
        s = att.scores(queries).numpy()
        sp = [spearmanr(a, b).statistic for a, b in zip(s, exact)]
        pe = [pearsonr(a, b).statistic for a, b in zip(s, exact)]
        top = [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(s, exact)]
        print(f"{kind} D={att.dim}: Spearman {np.mean(sp):.3f}", flush=True)
        out["dims"][f"{kind}-{d}"] = {
            "kind": kind,
            "actual_dim": att.dim,
            "spearman": float(np.mean(sp)),
            "spearman_min": float(np.min(sp)),
            "pearson": float(np.mean(pe)),
            "top10_overlap": float(np.mean(top)),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-queries", type=int, default=20)
    p.add_argument("--dims", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--kinds", nargs="+", default=["sketch", "kronecker"])
    p.add_argument("--method", default="ekfac")
    p.add_argument("--damping", type=float, default=None, help="relative damping (default: the method's)")
    p.add_argument("--draws", type=int, default=None, help="default: the configuration's")
    p.add_argument("--query-draws", type=int, default=None)
    p.add_argument("--curvature-draws", type=int, default=None)
    p.add_argument("--curvature-min-rows", type=int, default=None, help="default: the configuration's")
    p.add_argument("--tag", default="", help="appended to the result file's name")
    a = p.parse_args()
    res = fidelity(
        load_model(a.model),
        a.n_train,
        a.n_queries,
        a.dims,
        a.kinds,
        draws=a.draws,
        query_draws=a.query_draws,
        curvature_draws=a.curvature_draws,
        curvature_min_rows=a.curvature_min_rows,
        method=a.method,
        damping=a.damping,
        progress=True,
    )
    tag = (a.method if a.damping is None else f"{a.method}_damping{a.damping:g}") + a.tag
    out = ROOT / "benchmarks" / "results" / f"projection_fidelity_{tag}.json"
    out.write_text(json.dumps(res, indent=2))
    print("| projection | D | Spearman (mean / min) | Pearson | top-10 overlap |\n|---|---|---|---|---|")
    for r in res["dims"].values():
        print(
            f"| {r['kind']} | {r['actual_dim']} | {r['spearman']:.3f} / {r['spearman_min']:.3f} | {r['pearson']:.3f} | "
            f"{r['top10_overlap']:.2f} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
