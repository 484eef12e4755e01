"""The LDS table (issue 6): every method side by side on the committed ground truth.

    python benchmarks/lds_report.py [--groundtruth benchmarks/groundtruth] [--quick]
    python benchmarks/lds_report.py --set latent     # the shipped latent model (issue 16)

Writes benchmarks/results/lds.json (per-query LDS of every row, paired differences to EK-FAC)
and benchmarks/results/lds.png (`--set latent`: lds_latent.json and .png, on
benchmarks/groundtruth-latent), and prints the markdown table kept in the README.
Damping is never tuned here: every method runs at its a-priori default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution import evaluation as ev  # noqa: E402
from attribution.influence import DEFAULT_DIM, TRAK_DIM, AttributionConfig  # noqa: E402

K, D, DT = 8, DEFAULT_DIM, TRAK_DIM  # every method at its default D (TRAK-style: D × D inverse)
# issue 13's variance reduction: the same draws for every method (antithetic, importance-sampled
# timesteps, K = 16, Kq = 128); the K-FAC family's damping 0.1 × mean eigenvalue, D = 16384
NEW = dict(draws=16, query_draws=128, antithetic=True, importance=True)
NEW_ROWS = [
    (
        "EK-FAC, new default (damping 0.1, antithetic, importance, K=16, Kq=128, D=16384)",
        dict(method="ekfac", damping=0.1, dim=16384, **NEW),
    ),
    ("EK-FAC, new default, unprojected", dict(method="ekfac", damping=0.1, dim=None, **NEW)),
    (f"TRAK, D={DT}, new draws", dict(method="trak", **NEW)),
    (f"D-TRAK, D={DT}, new draws", dict(method="dtrak", **NEW)),
    ("EK-FAC, new default at D=8192", dict(method="ekfac", damping=0.1, dim=8192, **NEW)),
    (f"EK-FAC, damping 1e-8, new draws, D={D}", dict(method="ekfac", damping=1e-8, dim=D, **NEW)),
    # the same defaults after issue 19's table-free count sketch (a new hash: another projection)
    ("EK-FAC, default, table-free sketch", dict(method="ekfac", **NEW)),
    (f"TRAK, D={DT}, new draws, table-free sketch", dict(method="trak", **NEW)),
    (f"D-TRAK, D={DT}, new draws, table-free sketch", dict(method="dtrak", **NEW)),
]
ROWS = [  # (row label, config overrides), most important first (the run is resumable by row)
    (f"EK-FAC (expand, GGN_model), D={D}", dict(method="ekfac")),
    ("EK-FAC, unprojected", dict(method="ekfac", dim=None)),
    (f"TRAK, D={DT}", dict(method="trak")),
    (f"D-TRAK, D={DT}", dict(method="dtrak")),
    (f"K-FAC expand, D={D}", dict(method="kfac")),
    (f"K-FAC reduce, D={D}", dict(method="kfac-reduce")),
    (f"K-FAC empirical Fisher, D={D}", dict(method="kfac-empirical")),
    (f"EK-FAC empirical Fisher, D={D}", dict(method="ekfac-empirical")),
    (f"gradient cosine, D={D}", dict(method="gradcos")),
    ("pixel cosine", dict(method="pixel")),
    (f"Journey-TRAK, D={DT} (generated queries)", dict(method="journey-trak")),
    ("K-FAC expand, unprojected", dict(method="kfac", dim=None)),
    ("EK-FAC, D=8192", dict(method="ekfac", dim=8192)),
    ("EK-FAC, D=32768", dict(method="ekfac", dim=32768)),
    (f"EK-FAC, K=32, D={D}", dict(method="ekfac", draws=32)),
    (
        "K-FAC expand, Kronecker projection (fast path), D=8192",
        dict(method="kfac", projection="kronecker", dim=8192),
    ),
    (f"K-FAC expand, exact damping, D={D}", dict(method="kfac-exact-damping")),
    (f"EK-FAC, damping 1e-3 (ablation, not the default), D={D}", dict(method="ekfac", damping=1e-3)),
] + NEW_ROWS
# the shipped latent model (issue 16): the defaults, against the TRAK-style baselines
LATENT_ROWS = [
    ("EK-FAC, default (K=16, Kq=128, D=16384)", dict(method="ekfac", **NEW)),
    (f"TRAK, D={DT}", dict(method="trak", **NEW)),
    (f"D-TRAK, D={DT}", dict(method="dtrak", **NEW)),
    ("EK-FAC, unprojected", dict(method="ekfac", dim=None, **NEW)),
    (f"gradient cosine, D={D}", dict(method="gradcos", **NEW)),
    ("pixel cosine (on latents)", dict(method="pixel")),
]
SETS = {"pixel": (ROWS, "lds"), "latent": (LATENT_ROWS, "lds_latent")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--groundtruth", default=None, help="default: benchmarks/groundtruth[-latent]")
    p.add_argument(
        "--set", default="pixel", choices=sorted(SETS), help="latent: the shipped latent model's rows"
    )
    p.add_argument("--quick", action="store_true", help="only the first rows, K=2 (smoke test)")
    p.add_argument("--only", nargs="*", default=None, help="row labels (prefix match) to run")
    a = p.parse_args()
    table, name = SETS[a.set]
    default_gt = "groundtruth" if a.set == "pixel" else f"groundtruth-{a.set}"
    gt = ev.load_groundtruth(a.groundtruth or ROOT / "benchmarks" / default_gt)
    out_json = ROOT / "benchmarks" / "results" / (f"{name}_quick.json" if a.quick else f"{name}.json")
    done = (
        {r["label"]: r for r in json.loads(out_json.read_text())["rows"]}
        if out_json.exists() and not a.quick
        else {}
    )
    cache: dict = {}
    rows = table[:3] if a.quick else table
    for label, over in rows:
        if label in done or (a.only and not any(label.startswith(o) for o in a.only)):
            continue
        cfg = AttributionConfig(**{"draws": 2 if a.quick else K, **over})
        t0 = time.time()
        try:
            r = ev.method_lds(gt, cfg, progress=False, curvature_cache=cache)
        except Exception as e:  # one broken row must not lose the others
            print(f"{label}: FAILED ({type(e).__name__}: {e})", flush=True)
            continue
        r.pop("scores")
        r["label"] = label
        done[label] = r
        print(f"{label}: {r['lds']:.3f} ± {r['se']:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if not a.quick:
            _write(out_json, gt, done, table)
    order = [label for label, _ in table]
    done = dict(sorted(done.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    _write(out_json, gt, done, table, final=True)


def _write(out_json: Path, gt, done: dict, table: list, final: bool = False) -> None:
    noise = ev.seed_agreement(gt.measurements) if gt.measurements.shape[1] > 1 else None
    ref = done.get(table[0][0])
    for r in done.values():
        if ref is not None and r is not ref:
            n = min(len(r["per_query"]), len(ref["per_query"]))
            d = np.asarray(r["per_query"][:n]) - np.asarray(ref["per_query"][:n])
            r["paired_diff_vs_ekfac"] = dict(zip(("mean", "se"), ev.mean_se(d)))
    res = {
        "rows": list(done.values()),
        "groundtruth": vars(gt.config) if hasattr(gt.config, "__dict__") else {},
        "n_queries": int(gt.queries.shape[0]),
        "models": int(gt.measurements.shape[0] * gt.measurements.shape[1]),
    }
    if noise is not None:
        res["seed_agreement"] = dict(zip(("mean", "se"), ev.mean_se(noise)))
    out_json.write_text(json.dumps(res, indent=2))
    if not final:
        return
    print("\n| method | LDS (mean ± s.e.) | paired diff. vs EK-FAC | time |\n|---|---|---|---|")
    for r in done.values():
        pd = r.get("paired_diff_vs_ekfac")
        pd_s = f"{pd['mean']:+.3f} ± {pd['se']:.3f}" if pd else "—"
        print(f"| {r['label']} | {r['lds']:.3f} ± {r['se']:.3f} | {pd_s} | {r['seconds']:.0f} s |")
    if noise is not None:
        print(
            f"| exact retraining (seed-to-seed Spearman) | {res['seed_agreement']['mean']:.3f} ± "
            f"{res['seed_agreement']['se']:.3f} | | |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [r["label"] for r in done.values()]
        vals = [r["lds"] for r in done.values()]
        errs = [r["se"] for r in done.values()]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1))
        ax.barh(labels[::-1], vals[::-1], xerr=errs[::-1], color="#4c72b0")
        if noise is not None:
            ax.axvline(
                res["seed_agreement"]["mean"], color="k", ls="--", label="seed-to-seed (retraining noise)"
            )
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("LDS (Spearman), mean ± s.e. over queries")
        fig.tight_layout()
        fig.savefig(out_json.with_suffix(".png"), dpi=110)
    except Exception as e:  # the table matters more than the plot
        print(f"(no plot: {e})")


if __name__ == "__main__":
    main()
