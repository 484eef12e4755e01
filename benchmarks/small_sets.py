"""Self-attribution on small training sets (issue 13, bar 2): the fine-tuning-set case.

    python benchmarks/small_sets.py [--sizes 20 40 200] [--copies 10] [--only NAME ...]

For each N, the first N images of the default data are the training set and exact copies of 10 of
them (evenly spaced rows) are the queries, scored with the default model. A copy's own image
should be its top-1 proponent. Rows: the old default (damping 1e-8) and the new one, so the table
shows what the damping and the other defaults change. Writes benchmarks/results/small_sets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.data import load_dataset  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.model import load_model  # noqa: E402

ROWS = [
    (
        "old default (damping 1e-8, K=8, Kq=32)",
        dict(
            damping=1e-8,
            draws=8,
            query_draws=32,
            antithetic=False,
            importance=False,
            dim=131072,
            curvature_min_rows=0,
        ),
    ),
    (
        "new default (damping 0.1, antithetic, importance, K=16, Kq=128, D=16384)",
        dict(damping=0.1, draws=16, query_draws=128, antithetic=True, importance=True, dim=16384),
    ),
]


def self_ranks(scores: np.ndarray, own: list[int]) -> list[int]:
    """1-based rank of each query's own training image among its scores (1 = top proponent)."""
    return [int((scores[q] > scores[q, i]).sum()) + 1 for q, i in enumerate(own)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="*", default=[20, 40, 200])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "small_sets.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    for name, over in ROWS:
        if a.only and not any(name.startswith(o) for o in a.only):
            continue
        for n in a.sizes:
            train = load_dataset("mnist", channels=model.channels, size=model.size, n=n)
            own = np.linspace(0, n - 1, a.copies).round().astype(int).tolist()
            queries = train.images[own].clone()
            cfg = AttributionConfig(**over)
            t0 = time.time()
            scores = Attributor(model, train, cfg, progress=False).fit().scores(queries).numpy()
            ranks = self_ranks(scores, own)
            top1 = sum(r == 1 for r in ranks)
            res.setdefault(name, {})[str(n)] = {
                "ranks": ranks,
                "top1": top1,
                "copies": a.copies,
                "seconds": round(time.time() - t0, 1),
                "config": cfg.to_dict(),
            }
            print(
                f"{name}, N={n}: own image top-1 for {top1}/{a.copies} (ranks {ranks}; "
                f"{time.time() - t0:.0f} s)",
                flush=True,
            )
            out.write_text(json.dumps(res, indent=2))
    print("\n| configuration | " + " | ".join(f"N = {n}" for n in a.sizes) + " |")
    print("|---|" + "---|" * len(a.sizes))
    for name, by_n in res.items():
        cells = [
            f"{by_n[str(n)]['top1']}/{by_n[str(n)]['copies']}" if str(n) in by_n else "–" for n in a.sizes
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
