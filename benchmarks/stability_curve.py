"""Seed stability against cost (issue 13): more training and query draws on the issue's protocol.

    python benchmarks/stability_curve.py [--draws 64] [--query-draws 256] [--n 1000]

For seeds 0 and 1, the default configuration with K = `--draws` training and Kq = `--query-draws`
query draws computes every feature as two independent halves (alternating strata, antithetic pairs
together: each half is itself a valid estimate with half the draws). Comparing seed 0 with seed 1
at K/2 or K, Kq/2 or Kq gives four points of the curve from one run per seed. The halves are
kept in runs/stability-curve/ (resumable per seed; curvatures are those of
benchmarks/stability_ablation.py when present). The cost of a point is the feature time per image,
measured side by side for each K in one process (`--cost-images` images, alternating rounds).
Writes benchmarks/results/stability_curve.json and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.curvature import Curvature  # noqa: E402
from attribution.data import load_dataset  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.model import load_model  # noqa: E402
from attribution.sample import sample  # noqa: E402
from attribution.stability import agreement  # noqa: E402

CURVATURES = ROOT / "runs" / "stability"  # benchmarks/stability_ablation.py's fits, per seed


def attributor(model, train, draws: int, query_draws: int, seed: int) -> Attributor:
    """The default at K, Kq and `seed`, with the seed's 1,000-image curvature when it was fitted."""
    # batch_size 8: K = 64 draws of 32 images at once took 14 GB
    cfg = replace(AttributionConfig(draws=draws, query_draws=query_draws, batch_size=8), seed=seed)
    att = Attributor(model, train, cfg, progress=False)
    ck = CURVATURES / f"curv-s{seed}-c4-i1000-ekfac-stTrue.safetensors"
    curv = None
    if ck.exists():
        c = Curvature.load(ck)
        curv = Curvature(replace(c.config, damping=cfg.spec.damping), c.t, c.meta)
    att.fit(curvature=curv)
    return att


def halves(model, train, queries, a, seed: int, work: Path) -> dict:
    f = work / f"f-n{len(train)}-k{a.draws}-q{a.query_draws}-s{seed}.pt"
    if f.exists():
        return torch.load(f, weights_only=True)
    att = attributor(model, train, a.draws, a.query_draws, seed)
    t0 = time.time()
    q = att._raw_query_features(queries, None, True)
    t1 = time.time()
    tr = att.raw_train_features(halves=True)
    out = {"train": tr.half(), "query": q, "times": torch.tensor([t1 - t0, time.time() - t1])}
    torch.save(out, f)
    print(f"seed {seed}: queries {t1 - t0:.0f} s, training features {time.time() - t1:.0f} s", flush=True)
    return out


def cost(model, train, ks: list[int], images: int, rounds: int = 3) -> dict[int, float]:
    """Seconds per training image of the features at each K: each K warmed up once, then timed in
    alternating rounds in one process (the machine's load drifts; ratios are what to read)."""
    sub = train.subset(list(range(images)))
    atts = {k: attributor(model, sub, k, 32, 0) for k in ks}
    for att in atts.values():
        att.raw_train_features(halves=True)
    secs = {k: 0.0 for k in ks}
    for _ in range(rounds):
        for k in ks:
            t0 = time.perf_counter()
            atts[k].raw_train_features(halves=True)
            secs[k] += (time.perf_counter() - t0) / (rounds * images)
    return secs


def points(runs: list[dict], k: int, kq: int) -> dict[str, dict]:
    """Seed 0 against seed 1 at (K/2 or K) × (Kq/2 or Kq): the first half, or the mean of both."""
    out = {}
    for kt in (k // 2, k):
        for kqt in (kq // 2, kq):
            mats = []
            for r in runs:
                tr, q = r["train"].float(), r["query"].float()
                phi = tr[:, 0] if kt < k else tr.mean(1)
                psi = q[:, 0] if kqt < kq else q.mean(1)
                mats.append((psi @ phi.T).numpy())
            g = agreement(mats[0], mats[1])
            out[f"K={kt}, Kq={kqt}"] = {
                "draws": kt,
                "query_draws": kqt,
                "spearman": g["spearman"],
                "top_k_overlap": g["top_k_overlap"],
                "per_query_overlap": g["per_query_overlap"],
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--draws", type=int, default=64)
    p.add_argument("--query-draws", type=int, default=256)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--cost-images", type=int, default=24)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stability_curve.json"))
    a = p.parse_args()
    work = ROOT / "runs" / "stability-curve"
    work.mkdir(parents=True, exist_ok=True)
    model = load_model()
    train = load_dataset("mnist", channels=model.channels, size=model.size, n=a.n)
    queries = sample(model, 12, seed=123, sampler="ddim", steps=50, progress=False).images
    runs = [halves(model, train, queries, a, s, work) for s in (0, 1)]
    pts = points(runs, a.draws, a.query_draws)
    small = work / f"f-n{a.n}-k16-q128-s0.pt"
    if small.exists() and (work / f"f-n{a.n}-k16-q128-s1.pt").exists():  # the default itself
        pts.update(
            points(
                [torch.load(work / f"f-n{a.n}-k16-q128-s{s}.pt", weights_only=True) for s in (0, 1)], 16, 128
            )
        )
    ks = sorted({v["draws"] for v in pts.values()})
    secs = cost(model, train, ks, a.cost_images)
    for v in pts.values():
        v["seconds_per_image"] = secs[v["draws"]]
        v["cost_vs_default"] = secs[v["draws"]] / secs[16] if 16 in secs else None
    Path(a.out).write_text(
        json.dumps({"protocol": "issue 13 (stability_ablation.py)", "points": pts}, indent=2)
    )
    print(
        "| K | Kq | Spearman | top-10 overlap | training features, s per image (× K = 16) |\n|---|---|---|---|---|"
    )
    for v in sorted(pts.values(), key=lambda v: (v["draws"], v["query_draws"])):
        ratio = f" ({v['cost_vs_default']:.2f}×)" if v["cost_vs_default"] else ""
        print(
            f"| {v['draws']} | {v['query_draws']} | {v['spearman']:.3f} | {v['top_k_overlap']:.2f} | "
            f"{v['seconds_per_image']:.3f}{ratio} |"
        )


if __name__ == "__main__":
    main()
