"""`attribution evaluate`: the LDS ground truth (groundtruth), the LDS of methods on it (lds), and
retraining without each query's top influences (retrain-top-k)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attribution.console import say
from explorer.cli_args import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, output, worker, write


def cmd_groundtruth(a: argparse.Namespace) -> None:
    from attribution import evaluation as ev
    from attribution import groundtruth_latent as gl

    i, n = (int(x) for x in a.worker.split("/"))
    kind = gl.LatentGroundTruthConfig if a.model == "mnist-latent" else ev.GroundTruthConfig
    steps = {} if a.steps is None else {"steps": a.steps}
    cfg = kind(subsets=a.subsets, seeds=a.seeds, n_train=a.n_train, **steps)
    build = gl.build if a.model == "mnist-latent" else ev.build_groundtruth
    build(a.out, cfg, log=say, worker=(i, n))
    say(f"ground truth ready in {a.out}")


def cmd_retrain(a: argparse.Namespace) -> None:
    from attribution.retrain_top_k import retrain_top_k

    i, n = (int(x) for x in a.worker.split("/"))
    res = retrain_top_k(
        a.groundtruth,
        a.out,
        a.method,
        tuple(a.fractions),
        a.queries,
        log=say,
        worker=(i, n),
        seeds=a.seeds,
    )
    if res is not None:
        for m, r in res["mean_se"].items():
            say(
                f"{m}: "
                + ", ".join(
                    f"remove {float(f):.0%}: loss rise {v[0]:+.2e} ± {v[1]:.1e}" for f, v in r.items()
                )
            )
        say(f"wrote {Path(a.out) / 'retrain_top_k.json'}")


def cmd_lds(a: argparse.Namespace) -> None:
    from attribution import evaluation as ev
    from attribution.influence import AttributionConfig, dim_arg

    gt = ev.load_groundtruth(a.groundtruth)
    results = []
    for method in a.method:
        cfg = AttributionConfig(
            method=method,
            draws=a.draws,
            query_draws=a.query_draws,
            curvature_draws=a.curvature_draws,
            dim=dim_arg(a.dim),
            seed=a.seed,
            projection=a.projection,
            damping=a.damping,
        )
        r = ev.method_lds(gt, cfg)
        r.pop("scores")
        say(
            f"{method}: LDS {r['lds']:.3f} ± {r['se']:.3f} over {r['n_queries']} queries ({r['seconds']:.0f} s)"
        )
        results.append(r)
    noise = ev.seed_agreement(gt.measurements) if gt.measurements.shape[1] > 1 else None
    out = {"results": results}
    if noise is not None:
        out["seed_agreement"] = dict(zip(("mean", "se"), ev.mean_se(noise)))
        say(f"retraining noise: seed-to-seed Spearman {out['seed_agreement']['mean']:.3f}")
    if a.json:
        write(output(a.json, "--json"), "--json", lambda path: path.write_text(json.dumps(out, indent=2)))


def _add_groundtruth(evs) -> None:
    g = evs.add_parser("groundtruth", help="train the subset models and measure (resumable)")
    g.add_argument("--out", default="benchmarks/groundtruth")
    g.add_argument(
        "--model",
        default="mnist16",
        choices=["mnist16", "mnist-latent"],
        help="mnist16: a pixel model trained from scratch; mnist-latent: the shipped latent model's "
        "denoiser retrained around its frozen autoencoder, with class conditions",
    )
    g.add_argument("--subsets", type=POSITIVE, default=32)
    g.add_argument("--seeds", type=POSITIVE, default=2)
    g.add_argument(
        "--steps", type=POSITIVE, default=None, help="training steps per subset model (400 pixel, 600 latent)"
    )
    g.add_argument("--n-train", type=POSITIVE, default=1000)
    g.add_argument(
        "--worker", default="0/1", type=worker, help="i/n: train every n-th model from i (n processes)"
    )
    g.set_defaults(func=cmd_groundtruth)


def _add_lds(evs, methods: list[str]) -> None:
    lds = evs.add_parser("lds", help="LDS of one or more methods on a ground truth")
    lds.add_argument("--groundtruth", default="benchmarks/groundtruth")
    lds.add_argument("--method", nargs="+", default=["ekfac"], choices=methods)
    lds.add_argument("--draws", type=POSITIVE, default=8)
    lds.add_argument("--query-draws", type=POSITIVE, default=32)
    lds.add_argument("--curvature-draws", type=POSITIVE, default=4)
    lds.add_argument(
        "--dim", type=NON_NEGATIVE, default=None, help="0: unprojected (default: the method's D)"
    )
    lds.add_argument("--projection", default="sketch", choices=["sketch", "kronecker"])
    lds.add_argument(
        "--damping", type=POSITIVE_FLOAT, default=None, help="relative damping (default: the method's)"
    )
    lds.add_argument("--seed", type=int, default=0)
    lds.add_argument("--json", default=None)
    lds.set_defaults(func=cmd_lds)


def _add_retrain(evs) -> None:
    rt = evs.add_parser("retrain-top-k", help="retrain without each query's top influences (resumable)")
    rt.add_argument("--groundtruth", default="benchmarks/groundtruth")
    rt.add_argument("--out", default="benchmarks/retrain_top_k")
    rt.add_argument(
        "--method",
        nargs="+",
        default=["ekfac", "trak", "random"],
        help="the first is compared with the others; 'random' removes random images",
    )
    rt.add_argument("--fractions", type=FRACTION, nargs="+", default=[0.02, 0.10])
    rt.add_argument("--queries", type=POSITIVE, default=5)
    rt.add_argument("--seeds", type=POSITIVE, default=1, help="training seeds per removal")
    rt.add_argument(
        "--worker", default="0/1", type=worker, help="i/n: train every n-th model from i (n processes)"
    )
    rt.set_defaults(func=cmd_retrain)


def add_evaluate(sub, methods: list[str]) -> None:
    ev = sub.add_parser("evaluate", help="LDS ground truth and LDS of methods")
    evs = ev.add_subparsers(dest="eval_cmd", required=True)
    _add_groundtruth(evs)
    _add_lds(evs, methods)
    _add_retrain(evs)
