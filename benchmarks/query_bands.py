"""What the per-timestep view costs (issue 18): one query of the app, side by side in one run.

    python benchmarks/query_bands.py [--index DIR] [--rounds 15] [--threads 1]

Variants, interleaved round by round on the same queries (training images as the app's
"Training image" tab makes them), each through `Explorer.attribute` (the app's query: features,
search, stability figures, payload) plus what the page adds for the answer (the score histogram
and, with bands, the band chart, each rendered to PNG as Gradio does):

* `plain`: no band split (what the app did before issue 18);
* `bands-4`: the default view, 4 bands and the chart;
* `bands-10`: 10 bands;
* `rank-high-noise`: 4 bands, the top-k re-ranked by the high-noise band alone (one more search).

Reports medians and p95 of each and their ratios to `plain`; writes
benchmarks/results/query_bands.json. The app queries on one torch thread (explorer/launch.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.model import load_model  # noqa: E402
from explorer import bands_view, report  # noqa: E402
from explorer.service import Explorer  # noqa: E402
from index.store import load  # noqa: E402

VARIANTS = {
    "plain": {"bands": 0},
    "bands-4": {"bands": 4},
    "bands-10": {"bands": 10},
    "rank-high-noise": {"bands": 4, "rank_by": 3},
}


def _png(fig) -> None:
    if fig is not None:
        fig.savefig(io.BytesIO(), format="png")


def one(ex: Explorer, q, settings: dict) -> float:
    t0 = time.perf_counter()
    ans = ex.attribute(q, None, 8, **settings)
    _png(report.score_histogram(ans.data))
    if settings["bands"]:
        _png(bands_view.figure(ans.data))
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=str(ROOT / "indexes" / "mnist-ekfac-n1000"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "query_bands.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model()
    idx = load(a.index, model)
    ex = Explorer(model, [idx])
    queries = [ex.training(r) for r in range(a.rounds + 2)]
    for q in queries[:2]:  # warm-up (the app warms up likewise)
        for s in VARIANTS.values():
            one(ex, q, s)
    times = {v: [] for v in VARIANTS}
    for q in queries[2:]:
        for v, s in VARIANTS.items():
            times[v].append(one(ex, q, s))
    med = {v: statistics.median(t) for v, t in times.items()}
    out = {
        "index": Path(a.index).name,
        "n": len(idx),
        "dim": idx.faiss.d,
        "faiss": type(idx.faiss).__name__,
        "query_draws": idx.manifest["method"]["query_draws"],
        "threads": a.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rounds": a.rounds,
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine during the run
        "median_s": med,
        "p95_s": {v: sorted(t)[max(0, round(0.95 * len(t)) - 1)] for v, t in times.items()},
        "ratio_to_plain": {v: med[v] / med["plain"] for v in VARIANTS},
        "all_s": times,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    for v in VARIANTS:
        print(f"{v:16s} median {med[v] * 1e3:6.0f} ms  ×{out['ratio_to_plain'][v]:.2f}")
    return out


if __name__ == "__main__":
    main()
