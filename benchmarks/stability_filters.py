"""Two shrinkage filters tried for issue 13's seed stability, and rejected (README "How stable").

    python benchmarks/stability_filters.py lowrank      # needs benchmarks/stability_curve.py's K=16 halves
    python benchmarks/stability_filters.py coordinate   # computes 300-image unprojected halves first

- lowrank: the signal covariance of the training features estimated without noise from the
  cross-covariance of the two independent halves (their noises are independent, so it cancels),
  eigen-decomposed; query features are filtered to its top directions (Wiener weights, or a hard
  rank r) and scored against the unfiltered training features (the filter is symmetric, so this is
  the same as filtering the training side). D = 16384, N = 1,000, seeds 0 and 1.
- coordinate: per-coordinate empirical-Bayes shrinkage in the EK-FAC eigenbasis before any
  projection: each coordinate of φ shrunk towards the training-set mean by w = S / (S + N), the
  signal variance across images over signal plus noise, the noise from the half-differences.
  Unprojected (684,017 coordinates), N = 300, seeds 0 and 1.

Prints seed-to-seed Spearman and top-10 overlap of each variant; nothing is written.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.curvature import Curvature  # noqa: E402
from attribution.data import load_dataset  # noqa: E402
from attribution.features import FeatureMap, model_layer_shapes  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.model import load_model  # noqa: E402
from attribution.sample import sample  # noqa: E402
from attribution.stability import agreement  # noqa: E402

WORK = ROOT / "runs" / "stability-curve"


def show(name: str, mats: list[torch.Tensor]) -> None:
    g = agreement(mats[0].numpy(), mats[1].numpy())
    print(f"{name}: Spearman {g['spearman']:.3f}, top-10 overlap {g['top_k_overlap']:.2f}", flush=True)


def lowrank_filter(run: dict, rank: int | None) -> torch.Tensor:
    """Scores (Q, N) with the query filtered by the cross-fitted signal covariance."""
    tr, q = run["train"].double(), run["query"].double()
    a, b = tr[:, 0] - tr[:, 0].mean(0), tr[:, 1] - tr[:, 1].mean(0)
    phi, psi, n = tr.mean(1), q.mean(1), tr.shape[0]
    basis, _ = torch.linalg.qr(torch.cat([a, b]).T)  # D × 2N: the span of every half row
    pa, pb = a @ basis, b @ basis
    ev, vec = torch.linalg.eigh((pa.T @ pb + pb.T @ pa) / (2 * n))  # noise-free signal covariance
    dirs = basis @ vec
    noise = ((tr[:, 0] - tr[:, 1]) / 2 @ dirs).pow(2).mean(0)
    if rank is None:  # Wiener weights where the signal clears the noise edge (|most negative eigenvalue|)
        w = torch.where(ev > -ev.min(), ev / (ev + noise), torch.zeros_like(ev))
    else:
        w = torch.zeros_like(ev)
        w[-rank:] = 1
    filtered = ((psi @ dirs) * w) @ dirs.T
    mu = phi.mean(0)
    return (filtered @ phi.T + (psi @ mu - filtered @ mu)[:, None]).float()


def unprojected_halves(seed: int, n: int = 300) -> dict:
    """Training (n, 2, P) and query (12, 2, P) halves in the EK-FAC eigenbasis, unprojected."""
    f = WORK / f"u-n{n}-s{seed}.pt"
    if f.exists():
        return torch.load(f, weights_only=True)
    model = load_model()
    train = load_dataset("mnist", channels=model.channels, size=model.size, n=n)
    queries = sample(model, 12, seed=123, sampler="ddim", steps=50, progress=False).images
    att = Attributor(
        model, train, replace(AttributionConfig(dim=None, batch_size=8), seed=seed), progress=False
    )
    c = Curvature.load(ROOT / "runs" / "stability" / f"curv-s{seed}-c4-i1000-ekfac-stTrue.safetensors")
    att.fit(curvature=Curvature(replace(c.config, damping=0.1), c.t, c.meta))
    for side in ("train", "query"):  # (G+λ)^(−½) on both sides, features left in the eigenbasis
        fm = FeatureMap(
            model_layer_shapes(model.unet),
            att.projection,
            "ekfac",
            att.curvature,
            scale=1.0 if side == "query" else 1.0 / n,
            power=0.5,
        )
        for k, op in fm.ops.items():
            fm.ops[k] = (*op[:3], torch.eye(op[3].shape[0]), torch.eye(op[4].shape[0]))
        att._fmaps[side] = fm
    out = {
        "query": att._raw_query_features(queries, None, True).half(),
        "train": att.raw_train_features(halves=True).half(),
    }
    torch.save(out, f)
    return out


def coordinate(runs: list[dict]) -> None:
    variants: dict[str, list[torch.Tensor]] = {}
    for run in runs:
        tr, psi = run["train"], run["query"].float().mean(1)
        phi, delta = tr.float().mean(1), (tr[:, 0].float() - tr[:, 1].float()) / 2
        noise, var = delta.pow(2).mean(0), phi.var(0)
        signal = (var - noise).clamp(min=0)
        w = signal / (signal + noise).clamp(min=1e-30)
        for name, ww in (
            ("none", torch.ones_like(w)),
            ("Wiener w", w),
            ("w²", w**2),
            ("w > ½", (w > 0.5).float()),
        ):
            variants.setdefault(name, []).append(psi @ (ww * phi).T)  # the mean's share is the same for all
    for name, mats in variants.items():
        show(f"coordinate shrinkage, {name}", mats)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "lowrank"
    if what == "lowrank":
        runs = [torch.load(WORK / f"f-n1000-k16-q128-s{s}.pt", weights_only=True) for s in (0, 1)]
        show("no filter", [r["query"].float().mean(1) @ r["train"].float().mean(1).T for r in runs])
        for rank in (None, 20, 50, 200):
            show(
                f"low-rank filter, {'Wiener' if rank is None else f'rank {rank}'}",
                [lowrank_filter(r, rank) for r in runs],
            )
    else:
        coordinate([unprojected_halves(s) for s in (0, 1)])


if __name__ == "__main__":
    main()
