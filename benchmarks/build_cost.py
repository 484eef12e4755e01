"""What the new default costs at build time, against the old one, measured side by side (issue 13).

    python benchmarks/build_cost.py [--images 96] [--rounds 2]

On the default model, one torch thread: the training features of the same images with the old
default (K = 8, D = 131072, no halves) and the new one (K = 16 antithetic and importance-sampled
draws, two independent halves, D = 16384), alternating rounds so machine noise hits both alike,
plus the new default's importance-density fit. The curvature fit is the same for both (1,000
images × 4 draws). The default build's time is then projected from the last measured old build
(README: curvature 210 s + features 449 s for 5,000 images). Writes
benchmarks/results/build_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.data import load_dataset  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.model import load_model  # noqa: E402

OLD = dict(damping=1e-8, draws=8, query_draws=32, antithetic=False, importance=False, dim=131072)
OLD_BUILD = {"curvature_s": 210.0, "features_s": 449.0, "n": 5000}  # README, the N = 5,000 peers run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    train = load_dataset("mnist", n=1000)
    rows = list(range(a.images))
    atts = {}
    for name, over in (("old", OLD), ("new", {})):
        att = Attributor(model, train, AttributionConfig(**over, curvature_images=200), progress=False)
        t0 = time.perf_counter()
        att.fit()
        atts[name] = (att, time.perf_counter() - t0)
    t0 = time.perf_counter()
    atts["new"][0].fit_density()
    density_s = time.perf_counter() - t0
    times = {"old": [], "new": []}
    for _ in range(a.rounds):
        for name in ("old", "new"):
            t0 = time.perf_counter()
            atts[name][0].raw_train_features(rows, progress=False)
            times[name].append(time.perf_counter() - t0)
    per_image = {k: min(v) / a.images for k, v in times.items()}
    ratio = per_image["new"] / per_image["old"]
    old_total = OLD_BUILD["curvature_s"] + OLD_BUILD["features_s"]
    new_total = OLD_BUILD["curvature_s"] + OLD_BUILD["features_s"] * ratio + density_s
    res = {
        "images": a.images,
        "rounds": a.rounds,
        "seconds_per_image": per_image,
        "feature_time_ratio_new_over_old": ratio,
        "density_fit_s": density_s,
        "old_build_s": old_total,
        "projected_new_build_s": new_total,
        "projected_ratio": new_total / old_total,
        "old_config": OLD,
        "new_config": atts["new"][0].config.to_dict(),
    }
    out = ROOT / "benchmarks" / "results" / "build_cost.json"
    out.write_text(json.dumps(res, indent=2))
    print(
        f"features per image: old {per_image['old']:.3f} s, new {per_image['new']:.3f} s ({ratio:.2f}×); "
        f"density fit {density_s:.0f} s; default build projected {old_total:.0f} s → {new_total:.0f} s "
        f"({new_total / old_total:.2f}×)"
    )


if __name__ == "__main__":
    main()
