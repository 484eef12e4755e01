"""Is the diffusion model any good? Classify its samples with a small CNN trained on the same digits.

    python benchmarks/model_quality.py                     # 500 DDIM-50 samples of assets/mnist-unet
    python benchmarks/model_quality.py --n 64 --steps 20   # a quick look

The classifier is a four-layer CNN trained (pure torch, CPU, well under 2 minutes) on a seeded 80/20
split of the embedded 5,000-image MNIST subset (`attribution.data.mnist()`); its hold-out accuracy is
reported and must reach 95%. It is cached as benchmarks/results/classifier.safetensors (~0.3 MB;
retrained when the cache is missing, stale or `--retrain` is given). The model's samples are then
classified, and we report the mean top-class probability (a sharpness/legibility proxy, bar 0.9) and
the fraction of samples in each class (a mode-coverage proxy, bar: every class within 5%-18%).
The top-class probability alone is easily fooled (the classifier calls the blobs of an untrained
model "8" with probability ~1.0); the class-fraction bar is what catches such a model.
Results go to benchmarks/results/model_quality.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable without installing the package
    sys.path.insert(0, str(ROOT))

from attribution.data import ImageDataset, mnist  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CLASSIFIER_PATH = RESULTS / "classifier.safetensors"
DEFAULT_MODEL = ROOT / "assets" / "mnist-unet"
CLASSIFIER_VERSION = "cnn-v1"  # bump when the architecture or the training recipe changes
MAX_CACHE_BYTES = 1_000_000
DEFAULT_EPOCHS = 10  # ~25 s on one core, 98.7% hold-out accuracy

BARS = {
    "holdout_accuracy": 0.95,
    "mean_top_prob": 0.90,
    "class_fraction_min": 0.05,
    "class_fraction_max": 0.18,
}


# ----------------------------------------------------------------------------- the classifier


def build_classifier() -> nn.Module:
    """A small CNN for 1x28x28 digits in [-1, 1] (80k parameters); returns logits (N, 10)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),  # 14x14
        *block(16, 32),
        nn.MaxPool2d(2),  # 7x7
        *block(32, 64),
        nn.MaxPool2d(2, ceil_mode=True),  # 4x4
        *block(64, 96),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(96, 10),
    )


def split(ds: ImageDataset, seed: int = 0, holdout: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """A seeded (train, hold-out) split of the rows."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    k = int(round(len(ds) * holdout))
    return ds.subset(perm[k:]), ds.subset(perm[:k])


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (background -1 fills in)."""
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * p)
    out = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def predict_proba(clf: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class probabilities (N, 10) of images (N, 1, 28, 28) in [-1, 1]."""
    clf.eval()
    out = [
        F.softmax(clf(images[i : i + batch_size].float()), dim=1) for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def accuracy(clf: nn.Module, ds: ImageDataset) -> float:
    return (predict_proba(clf, ds.images).argmax(1) == ds.labels).float().mean().item()


def train_classifier(
    train_ds: ImageDataset,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    log=None,
) -> nn.Module:
    """AdamW with a one-cycle LR schedule and small random shifts; deterministic given `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = build_classifier()
    g = torch.Generator().manual_seed(seed + 1)
    n = len(train_ds)
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    x_all, y_all = train_ds.images, train_ds.labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # dropout
        for epoch in range(epochs):
            clf.train()
            perm = torch.randperm(n, generator=g)
            total = 0.0
            for i in range(0, n, batch_size):
                rows = perm[i : i + batch_size]
                x = _shift(x_all[rows], g) if augment else x_all[rows]
                loss = F.cross_entropy(clf(x), y_all[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(rows)
            if log:
                log(f"  classifier epoch {epoch + 1}/{epochs}: loss {total / n:.4f}")
    return clf.eval()


def cache_key(train_ds: ImageDataset, holdout_ds: ImageDataset, epochs: int = DEFAULT_EPOCHS) -> str:
    """What a cached classifier must have been trained on and how (besides CLASSIFIER_VERSION)."""
    return f"{train_ds.fingerprint()}:{holdout_ds.fingerprint()}:epochs={epochs}"


def save_classifier(clf: nn.Module, path: Path, meta: dict) -> bool:
    """Write safetensors with `meta` as metadata; kept only if under MAX_CACHE_BYTES."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().contiguous() for k, v in clf.state_dict().items()},
        str(tmp),
        metadata={k: str(v) for k, v in meta.items()},
    )
    if tmp.stat().st_size >= MAX_CACHE_BYTES:
        tmp.unlink()
        return False
    tmp.replace(path)
    return True


def load_classifier(path: Path, data_key: str) -> nn.Module | None:
    """The cached classifier, or None if missing, unreadable, or made for other code or data."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") != CLASSIFIER_VERSION or meta.get("data") != data_key:
            return None
        clf = build_classifier()
        clf.load_state_dict(load_file(str(path)))
        return clf.eval()
    except Exception:  # a missing or broken cache just means: train again
        return None


def get_classifier(
    cache: Path | None = CLASSIFIER_PATH,
    retrain: bool = False,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    log=print,
) -> tuple[nn.Module, float, dict]:
    """(classifier, hold-out accuracy, info): from the cache when valid, else trained (and cached)."""
    ds = mnist()
    train_ds, holdout_ds = split(ds, seed=seed)
    key = cache_key(train_ds, holdout_ds, epochs)
    t0 = time.time()
    clf = None if (retrain or cache is None) else load_classifier(Path(cache), key)
    info = {
        "cached": clf is not None,
        "train_rows": len(train_ds),
        "holdout_rows": len(holdout_ds),
        "split_seed": seed,
        "epochs": epochs,
    }
    if clf is None:
        if log:
            log(f"training the digit classifier on {len(train_ds)} images ({epochs} epochs)")
        clf = train_classifier(train_ds, epochs=epochs, seed=seed, log=log)
        info["train_seconds"] = round(time.time() - t0, 1)
    acc = accuracy(clf, holdout_ds)
    info["parameters"] = sum(p.numel() for p in clf.parameters())
    if not info["cached"] and cache is not None:
        info["saved"] = save_classifier(
            clf,
            Path(cache),
            {"version": CLASSIFIER_VERSION, "data": key, "epochs": epochs, "holdout_accuracy": acc},
        )
    return clf, acc, info


# ----------------------------------------------------------------------------- the measurement


def class_stats(probs: torch.Tensor) -> dict:
    """Mean top-class probability and per-class fractions of argmax predictions."""
    top, cls = probs.max(dim=1)
    frac = torch.bincount(cls, minlength=10).float() / len(cls)
    return {
        "mean_top_prob": top.mean().item(),
        "confident_fraction": (top >= 0.9).float().mean().item(),
        "class_fractions": [round(v, 4) for v in frac.tolist()],
    }


def verdict(holdout_acc: float, stats: dict) -> dict:
    fr = stats["class_fractions"]
    return {
        "holdout_accuracy": holdout_acc >= BARS["holdout_accuracy"],
        "mean_top_prob": stats["mean_top_prob"] >= BARS["mean_top_prob"],
        "class_fractions": all(BARS["class_fraction_min"] <= f <= BARS["class_fraction_max"] for f in fr),
    }


def markdown(result: dict) -> str:
    ok = result["pass"]
    mark = {True: "pass", False: "FAIL"}
    fr = result["samples"]["class_fractions"]
    rows = [
        "| measure | value | bar | |",
        "|---|---|---|---|",
        f"| classifier hold-out accuracy | {result['classifier']['holdout_accuracy']:.2%} | "
        f"≥ {BARS['holdout_accuracy']:.0%} | {mark[ok['holdout_accuracy']]} |",
        f"| mean top-class probability | {result['samples']['mean_top_prob']:.3f} | "
        f"≥ {BARS['mean_top_prob']:.2f} | {mark[ok['mean_top_prob']]} |",
        f"| class fractions (min … max) | {min(fr):.1%} … {max(fr):.1%} | "
        f"{BARS['class_fraction_min']:.0%}–{BARS['class_fraction_max']:.0%} | "
        f"{mark[ok['class_fractions']]} |",
        "",
        "| digit | " + " | ".join(str(d) for d in range(10)) + " |",
        "|---" * 11 + "|",
        "| fraction | " + " | ".join(f"{f:.1%}" for f in fr) + " |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusion model folder")
    p.add_argument("--n", type=int, default=500, help="samples to draw")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="classifier epochs (when trained)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached classifier")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a bar is missed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(RESULTS / "model_quality.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from attribution.model import ModelError, load_model
    from attribution.sample import sample

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        model = load_model(a.model)
    except ModelError as e:
        log(f"error: {e}")
        return 2
    if model.channels != 1 or model.size != 28:
        log(
            f"error: {a.model}: the classifier needs 1x28x28 images, the model makes "
            f"{model.channels}x{model.size}x{model.size}"
        )
        return 2
    clf, acc, info = get_classifier(retrain=a.retrain, epochs=a.epochs, log=log)
    log(f"classifier hold-out accuracy {acc:.2%} ({'cached' if info['cached'] else 'trained'})")
    t0 = time.time()
    s = sample(model, a.n, seed=a.seed, sampler="ddim", steps=a.steps, batch_size=a.batch_size)
    sample_seconds = time.time() - t0
    stats = class_stats(predict_proba(clf, s.images))
    result = {
        "model": {"path": str(a.model), "weights_sha256": model.weights_sha256()},
        "sampling": {
            "sampler": "ddim",
            "steps": a.steps,
            "n": a.n,
            "seed": a.seed,
            "seconds": round(sample_seconds, 1),
        },
        "classifier": {"holdout_accuracy": round(acc, 4), **info},
        "samples": stats,
        "bars": BARS,
    }
    result["pass"] = verdict(acc, stats)
    result["all_pass"] = all(result["pass"].values())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n{'all bars met' if result['all_pass'] else 'SOME BARS MISSED'}; wrote {out}")
    return 1 if a.strict and not result["all_pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
