"""Feature speed on the shipped latent model (issue 16, bar 4), measured side by side in one run.

    python benchmarks/latent_speed.py [--images 16] [--draws 16] [--rounds 3]

The class-conditional latent MNIST model (`mnist-latent`): training images encoded once (posterior
means), each under its digit. Times, interleaved round by round after a warm-up, (a) a plain
batched forward + backward of the conditional diffusion loss with parameter gradients and
(b) the default EK-FAC count-sketch features (K draws, halves) of the same rows; reports rows/s
and the ratio (bar: features ≥ 0.5 × the plain step). Writes benchmarks/results/latent_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.conditions import denoise  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.measurements import Measurement  # noqa: E402
from attribution.model import load_model  # noqa: E402
from index.conditions import training_data, training_set  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latent_speed.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_model("mnist-latent")
    data = training_set(model, training_data("mnist", model, n=256))
    att = Attributor(model, data, AttributionConfig(draws=a.draws, batch_size=a.images), progress=False)
    t0 = time.perf_counter()
    att.fit()
    fit_s = time.perf_counter() - t0
    rows_ids = list(range(a.images))
    cond = att.train_cond(rows_ids)
    x0 = data.images[: a.images]

    def plain() -> None:
        rows = Measurement("loss").rows(x0, rows_ids, a.draws, 0, model.alphas_cumprod(), cond=cond)
        for q in model.unet.parameters():
            q.requires_grad_(True)
            q.grad = None
        (denoise(model.unet, rows.x, rows.t, rows.c) - rows.y).pow(2).mean().backward()
        for q in model.unet.parameters():
            q.requires_grad_(False)

    def features() -> None:
        att.raw_train_features(rows_ids, progress=False)

    runs = {"plain": plain, "features": features}
    for f in runs.values():
        f()
    times = {n: [] for n in runs}
    for _ in range(a.rounds):
        for n, f in runs.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    rate = {n: a.images * a.draws / statistics.median(v) for n, v in times.items()}
    res = {
        "model": "mnist-latent",
        "latent_shape": list(x0.shape[1:]),
        "unet_parameters": sum(q.numel() for q in model.unet.parameters()),
        "images": a.images,
        "draws": a.draws,
        "threads": 1,
        "rows_per_s": rate,
        "features_over_plain": rate["features"] / rate["plain"],
        "fit_s_on_256_images": fit_s,
        "feature_dim": att.dim,
    }
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
