"""Seed stability of variance-reduction candidates (issue 13), on the issue's protocol.

    python benchmarks/stability_ablation.py [--n 1000] [--queries 12] [--only NAME ...]

The default model, the first N images of the default data, 12 DDIM-50 samples (seed 123) as
queries; every configuration is run under seeds 0 and 1 and compared (attribution/stability.py).
Curvatures are fitted once per seed and curvature setting and shared between rows (damping is
applied at use, so rows that differ only in damping share a fit). Resumable: each (row, seed)
score matrix is kept in runs/stability/. Writes benchmarks/results/stability_ablation.json and
prints the markdown table kept in the README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.curvature import Curvature  # noqa: E402
from attribution.data import load_dataset  # noqa: E402
from attribution.influence import AttributionConfig  # noqa: E402
from attribution.model import load_model  # noqa: E402
from attribution.sample import sample  # noqa: E402
from attribution.stability import agreement, seed_scores  # noqa: E402

AIS = dict(damping=0.1, antithetic=True, importance=True)
ROWS = [  # (name, config overrides); the first is the old default, most informative first
    ("old default: damping 1e-8, K=8, Kq=32", dict(damping=1e-8)),
    ("damping 0.1", dict(damping=0.1)),
    ("damping 0.1, antithetic", dict(damping=0.1, antithetic=True)),
    ("damping 0.1, antithetic, importance", AIS),
    ("damping 0.1, antithetic, importance, K=16, Kq=128", dict(AIS, draws=16, query_draws=128)),
    (
        "damping 0.1, antithetic, importance, K=16, Kq=128, D=16384",
        dict(AIS, draws=16, query_draws=128, dim=16384),
    ),
    (
        "damping 0.1, antithetic, importance, K=16, Kq=128, D=8192",
        dict(AIS, draws=16, query_draws=128, dim=8192),
    ),
    ("damping 0.1, antithetic, importance, Kq=128", dict(AIS, query_draws=128)),
    ("damping 0.1, antithetic, K=16, Kq=128", dict(damping=0.1, antithetic=True, draws=16, query_draws=128)),
    (
        "damping 1e-8, antithetic, importance, K=16, Kq=128",
        dict(AIS, damping=1e-8, draws=16, query_draws=128),
    ),
    ("damping 0.1, antithetic, importance, K=32, Kq=256", dict(AIS, draws=32, query_draws=256)),
    (
        "default (K=16, Kq=128, D=16384), common training draws",
        dict(AIS, draws=16, query_draws=128, dim=16384, common_draws=True),
    ),
    (
        "default (K=16, Kq=128, D=16384), one projection for both seeds",
        dict(AIS, draws=16, query_draws=128, dim=16384, projection_seed=0),
    ),
]


def curvature_key(cfg: AttributionConfig, seed: int) -> str:
    return f"s{seed}-c{cfg.curvature_draws}-i{cfg.curvature_images}-{cfg.method}-st{cfg.stratified}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "stability"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stability_ablation.json"))
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model()
    train = load_dataset("mnist", channels=model.channels, size=model.size, n=a.n)
    queries = sample(model, a.queries, seed=123, sampler="ddim", steps=50, progress=False).images
    out = Path(a.out)
    results = json.loads(out.read_text())["rows"] if out.exists() else {}
    for name, over in ROWS:
        if a.only and not any(name.startswith(o) for o in a.only):
            continue
        cfg = AttributionConfig(**over)
        mats, secs = [], []
        for seed in (0, 1):
            f = work / f"{hashlib.sha1(name.encode()).hexdigest()[:12]}-s{seed}.npy"
            meta = f.with_suffix(".json")
            if f.exists() and meta.exists():
                mats.append(np.load(f))
                secs.append(json.loads(meta.read_text())["scores_s"])
                continue
            ck = work / f"curv-{curvature_key(cfg, seed)}.safetensors"
            curv = None
            if ck.exists():
                c = Curvature.load(ck)
                curv = Curvature(replace(c.config, damping=cfg.damping), c.t, c.meta)
            t0 = time.time()
            scores, info = seed_scores(model, train, queries, cfg, seed, progress=False, curvature=curv)
            if curv is None and info["curvature"] is not None:
                info["curvature"].save(ck)
            np.save(f, scores)
            meta.write_text(json.dumps({"name": name, "fit_s": info["fit_s"], "scores_s": info["scores_s"]}))
            mats.append(scores)
            secs.append(info["scores_s"])
            print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
        r = agreement(mats[0], mats[1], a.k)
        r.update({"config": cfg.to_dict(), "feature_seconds_per_seed": float(np.mean(secs))})
        results[name] = r
        print(
            f"{name}: Spearman {r['spearman']:.3f}, top-{a.k} overlap {r['top_k_overlap']:.2f} "
            f"(per query {r['per_query_overlap']})",
            flush=True,
        )
        out.write_text(
            json.dumps(
                {
                    "protocol": {
                        "n_train": a.n,
                        "queries": a.queries,
                        "k": a.k,
                        "query_source": "DDIM-50 samples, seed 123",
                    },
                    "rows": results,
                },
                indent=2,
            )
        )
    base = results.get(ROWS[0][0], {}).get("feature_seconds_per_seed")
    print(
        f"\n| configuration | Spearman | top-{a.k} overlap | features + queries, s (× old default) |\n|---|---|---|---|"
    )
    for name, r in results.items():
        ratio = f" ({r['feature_seconds_per_seed'] / base:.2f}×)" if base else ""
        print(
            f"| {name} | {r['spearman']:.3f} | {r['top_k_overlap']:.2f} | "
            f"{r['feature_seconds_per_seed']:.0f}{ratio} |"
        )


if __name__ == "__main__":
    main()
