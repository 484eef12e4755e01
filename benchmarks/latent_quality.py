"""The second shipped model (`assets/mnist-latent`): do its samples show the requested digit, and is
a training image its own top proponent?

    python benchmarks/latent_quality.py                       # 100 samples per class + self-attribution
    python benchmarks/latent_quality.py --per-class 10 --skip-self   # a quick look

1. A digit classifier (the CNN of `benchmarks/model_quality.py`) is trained on a seeded 80/20
   split of the embedded MNIST at the model's 16×16 (cached as classifier16.safetensors); its
   hold-out accuracy is reported, and its accuracy on the autoencoder's round trip of the hold-out
   images (what the decoder can show at best).
2. `--per-class` samples of each digit are drawn with the scheduler the folder ships (DDIM,
   `--steps`), under classifier-free guidance at each `--guidance` scale (1 = none); the share the
   classifier assigns to the requested class is the agreement (bar: ≥ 90% at the first scale).
3. Self-attribution: the default index (`attribution index build`, EK-FAC, count sketch) of the
   first `--self-n` training images; `--self-queries` of them (seeded choice), each queried as a
   copy of itself (its encoded latent) under its own class: is it its own top-1 proponent?
   (bar: ≥ 27 of 30).

Results go to benchmarks/results/latent_quality.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable without installing the package
    sys.path.insert(0, str(ROOT))

from benchmarks.model_quality import (  # noqa: E402
    CLASSIFIER_VERSION,
    accuracy,
    cache_key,
    load_classifier,
    predict_proba,
    save_classifier,
    split,
    train_classifier,
)

RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "classifier16.safetensors"
EPOCHS = 10
BARS = {"agreement": 0.90, "self_top1": 27 / 30}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def classifier(size: int, retrain: bool = False) -> tuple[torch.nn.Module, dict, object]:
    """(classifier, info, hold-out split) for size×size digits, cached beside the 28×28 one."""
    from attribution.data import mnist

    train_ds, holdout = split(mnist(size=size), seed=0)
    key = cache_key(train_ds, holdout, EPOCHS)
    clf = None if retrain else load_classifier(CACHE, key)
    info = {
        "cached": clf is not None,
        "train_rows": len(train_ds),
        "holdout_rows": len(holdout),
        "epochs": EPOCHS,
    }
    if clf is None:
        t0 = time.time()
        log(f"training the {size}x{size} digit classifier on {len(train_ds)} images ({EPOCHS} epochs)")
        clf = train_classifier(train_ds, epochs=EPOCHS, seed=0)
        info["train_seconds"] = round(time.time() - t0, 1)
        save_classifier(clf, CACHE, {"version": CLASSIFIER_VERSION, "data": key, "epochs": EPOCHS})
    info["holdout_accuracy"] = round(accuracy(clf, holdout), 4)
    return clf, info, holdout


def round_trip_accuracy(model, clf, holdout) -> float:
    """The classifier's accuracy on the autoencoder's reconstructions of the hold-out images."""
    recon = model.decode(model.encode(holdout.images))
    return round((predict_proba(clf, recon).argmax(1) == holdout.labels).float().mean().item(), 4)


def agreement(model, clf, per_class: int, scale: float, steps: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Samples of each digit under guidance `scale`: the share classified as the requested digit."""
    from attribution.conditions import Cond
    from attribution.sample import sample

    labels = torch.arange(10).repeat_interleave(per_class)
    t0 = time.time()
    s = sample(
        model,
        len(labels),
        seed=seed,
        sampler="scheduler",
        steps=steps,
        conditions=Cond(labels=labels),
        guidance_scale=scale,
        batch_size=250,
        progress=False,
    )
    pred = predict_proba(clf, s.images).argmax(1)
    hit = (pred == labels).float()
    return {
        "guidance_scale": scale,
        "samples": len(labels),
        "agreement": round(hit.mean().item(), 4),
        "per_class": [round(hit[labels == d].mean().item(), 3) for d in range(10)],
        "seconds": round(time.time() - t0, 1),
    }, s.images


def self_attribution(model_arg: str, model, n: int, queries: int, index_dir: Path, seed: int) -> dict:
    """Build (or reuse) the default index of the first n images; query `queries` of them as copies."""
    from attribution.data import mnist
    from explorer.cli import main as cli
    from index.conditions import model_input, query_condition
    from index.store import load

    t0 = time.time()
    rc = cli(
        ["index", "build", "--model", model_arg, "--data", "mnist", "--n", str(n), "--out", str(index_dir)]
    )
    if rc:
        raise SystemExit(f"index build failed ({rc})")
    build_s = time.time() - t0
    idx = load(index_dir, model)
    ds = mnist(size=model.size, n=n)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:queries].tolist()
    ranks, t1 = [], time.time()
    for r in rows:
        cond = query_condition(idx.manifest, str(int(ds.labels[r])))
        res = idx.query(model_input(model, ds.images[r]), k=5, with_all=True, cond=cond)
        ranks.append(int((res.all_scores > res.all_scores[r]).sum()) + 1)
    top1 = sum(k == 1 for k in ranks)
    return {
        "index": str(index_dir.resolve().relative_to(ROOT))
        if index_dir.resolve().is_relative_to(ROOT)
        else str(index_dir),
        "n": n,
        "queries": queries,
        "rows": rows,
        "self_ranks": ranks,
        "top1": top1,
        "top1_fraction": round(top1 / queries, 4),
        "build_seconds_this_run": round(build_s, 1),
        "query_seconds": round((time.time() - t1) / queries, 3),
        "index_settings": "attribution index build defaults (EK-FAC, count sketch D = 16384, 16 draws, 128 per query)",
    }


def markdown(res: dict) -> str:
    c = res["classifier"]
    out = [
        "| measure | value | bar |",
        "|---|---|---|",
        f"| classifier hold-out accuracy (16×16) | {c['holdout_accuracy']:.1%} | |",
        f"| … on the autoencoder's round trip | {c['round_trip_accuracy']:.1%} | |",
    ]
    for i, a in enumerate(res["agreement"]):
        bar = f"≥ {BARS['agreement']:.0%}" if i == 0 else ""
        out.append(
            f"| samples of the requested digit, guidance {a['guidance_scale']:g} | {a['agreement']:.1%} | {bar} |"
        )
    if "self_attribution" in res:
        s = res["self_attribution"]
        out.append(f"| own top-1 proponent (n = {s['n']}) | {s['top1']} of {s['queries']} | ≥ 27 of 30 |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-latent", help="model folder or shipped name")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="steps of the folder's scheduler")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-n", type=int, default=1000)
    p.add_argument("--self-queries", type=int, default=30)
    p.add_argument("--index", default=str(ROOT / "indexes" / "mnist-latent-n1000"))
    p.add_argument("--skip-self", action="store_true")
    p.add_argument("--retrain", action="store_true", help="retrain the classifier")
    p.add_argument("--grid", default=str(ROOT / "assets" / "samples" / "latent-grid.png"))
    p.add_argument("--out", default=str(RESULTS / "latent_quality.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from attribution.data import grid
    from attribution.model import load_model

    model = load_model(a.model)
    clf, info, holdout = classifier(model.size, a.retrain)
    info["round_trip_accuracy"] = round_trip_accuracy(model, clf, holdout)
    log(f"classifier: hold-out {info['holdout_accuracy']:.2%}, round trip {info['round_trip_accuracy']:.2%}")
    res = {"model": {"path": a.model, "weights_sha256": model.weights_sha256()}, "classifier": info}
    args = argv if argv is not None else sys.argv[1:]
    res["command"] = " ".join(["python benchmarks/latent_quality.py", *args])
    res["sampling"] = {"scheduler": type(model.scheduler).__name__, "steps": a.steps, "seed": a.seed}
    res["agreement"] = []
    for i, g in enumerate(a.guidance):
        r, images = agreement(model, clf, a.per_class, g, a.steps, a.seed)
        log(f"guidance {g:g}: {r['agreement']:.2%} of {r['samples']} samples show the requested digit")
        res["agreement"].append(r)
        if i == 0 and a.grid:  # ten of each digit, one row per digit
            keep = (
                torch.cat([torch.arange(10) + d * a.per_class for d in range(10)])
                if a.per_class >= 10
                else None
            )
            if keep is not None:
                grid(images[keep], nrow=10).resize((10 * 18 * 3, 10 * 18 * 3), 0).save(a.grid)
    if not a.skip_self:
        res["self_attribution"] = self_attribution(
            a.model, model, a.self_n, a.self_queries, Path(a.index), a.seed
        )
        log(f"self-attribution: {res['self_attribution']['top1']} of {a.self_queries} are their own top-1")
    res["bars"] = BARS
    res["pass"] = {"agreement": res["agreement"][0]["agreement"] >= BARS["agreement"]}
    if "self_attribution" in res:
        res["pass"]["self_top1"] = res["self_attribution"]["top1_fraction"] >= BARS["self_top1"]
    out = Path(a.out)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
