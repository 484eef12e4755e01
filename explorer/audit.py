"""The memorisation audit: training images ranked by self-influence (stored in the index at build
time), and generated samples whose top proponent dominates the others, each paired with that
training image and their pixel distance (an independent check: attribution does not look at
pixels). No Gradio here; `explorer.views` puts it on the page, `explorer.api` serves it.

Self-influence τ(i, i) = ∇L_iᵀ (G + λ)⁻¹ ∇L_i / N is the first-order rise of image i's own loss if
it were removed: large for images the model fits by leaning on them alone (unusual or mislabelled
images, and copies: a duplicated image's copies raise each other's loss when one is removed, but
the first-order score of each copy counts only itself, so duplicates are also shown through the
samples, whose top proponent is a copy when the model reproduces it).

A conditional model's samples are drawn under conditions (a class or prompt given, or each class
in turn) with its guidance scale, and each is attributed under its own condition; a latent
model's sample is measured on its sampled latents, as a generated query on the Attribute tab is.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from attribution.conditions import Conditions
from attribution.data import to_uint8
from attribution.errors import DataError
from attribution.sample import SAMPLERS, sample
from index.conditions import manifest_family
from index.manifest import IndexLoadError
from index.store import Index

MAX_SAMPLES = 64
GROUP = 6  # group self-influence: an image and its 5 strongest proponents among the others
DOMINANCE = 2.0  # a sample's top proponent "dominates" when its score is ≥ this × the runner-up's
NEXT = 4  # the runner-ups a dominance figure is measured against


def self_influence_order(idx: Index, descending: bool = True) -> np.ndarray:
    """Training rows by self-influence, highest first (or lowest); IndexLoadError if the index
    stores none (an older index, or a method without independent halves: TRAK-style, pixel)."""
    if idx.self_influence is None:
        raise IndexLoadError(
            f"{idx.path.name} stores no self-influence (a method without independent halves of its "
            "draws, such as TRAK or pixel similarity, or an index built before it was stored); "
            "choose another index or rebuild it with `attribution index build … --overwrite`"
        )
    v = np.asarray(idx.self_influence, dtype=np.float64)
    return np.argsort(-v if descending else v, kind="stable")


def group_self_influence(idx: Index, group: int = GROUP, progress=None, chunk: int = 256) -> np.ndarray:
    """(N,) the first-order rise of each training image's loss if it and its `group` − 1 strongest
    proponents among the other training images were removed: τ(i, i) + the top `group` − 1 of
    τ(i, j) = N φ_i·φ_j (j ≠ i; independent draws, so unbiased). Exact copies of an image are
    each other's strongest proponents (their τ(i, j) estimates τ(i, i)), so a duplicated image
    stands out here, where its own self-influence does not. Needs training features that are
    query features too, up to the 1/N: the count sketch ((G+λ)^(−½) on both sides) or no
    preconditioner. N² D multiply-adds, in chunks of `chunk` rows."""
    order = self_influence_order(idx)  # refuses an index without self-influence
    att = idx.attributor
    if att is None or not (att.split or att.spec.preconditioner == "identity") or att.spec.normalize:
        raise IndexLoadError(
            f"{idx.path.name}: group self-influence needs training features with (G+λ)^(−½) on both "
            "sides (the default count sketch); this index's method or projection has other ones"
        )
    phi = idx.all_features()
    n, group = len(idx), max(1, min(int(group), len(idx)))
    out = np.asarray(idx.self_influence, dtype=np.float64).copy()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if progress is not None:
            progress(s / n, desc=f"group self-influence: {s} of {n} images")
        t = n * (phi[s:e] @ phi.T).astype(np.float64)
        t[np.arange(e - s), np.arange(s, e)] = -np.inf
        if group > 1:
            out[s:e] += np.partition(t, n - group + 1, axis=1)[:, n - group + 1 :].sum(1)
    del order
    return out


def self_influence(idx: Index, m: int = 20, group: np.ndarray | None = None) -> dict:
    """The `m` training images with the highest and the `m` with the lowest self-influence (with
    `group`, the (N,) group self-influence: ranked by it instead), and where the values lie
    (quantiles), as JSON-able lists of {rank, row, self_influence, group_self_influence, label, source}."""
    m = max(1, min(int(m), len(idx)))
    v = np.asarray(idx.self_influence if group is None else group, dtype=np.float64)
    own = np.asarray(idx.self_influence, dtype=np.float64)
    hi, lo = self_influence_order(idx, True), self_influence_order(idx, False)
    if group is not None:
        hi, lo = np.argsort(-v, kind="stable"), np.argsort(v, kind="stable")

    def rows(order) -> list[dict]:
        return [
            {
                "rank": r + 1,
                "row": int(i),
                "self_influence": float(own[i]),
                "group_self_influence": None if group is None else float(v[i]),
                "label": int(idx.items[i]["label"]),
                "source": idx.items[i]["source"],
            }
            for r, i in enumerate(order[:m])
        ]

    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {
        "n": len(idx),
        "ranked_by": "self_influence"
        if group is None
        else f"group_self_influence (itself and {GROUP - 1} strongest proponents)",
        "highest": rows(hi),
        "lowest": rows(lo),
        "quantiles": {k: float(x) for k, x in zip(("min", "q25", "median", "q75", "max"), q)},
    }


def pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference of two uint8 images, on a 0–1 scale."""
    d = np.asarray(a, dtype=np.float64) / 255 - np.asarray(b, dtype=np.float64) / 255
    return float(np.sqrt(np.mean(d**2)))


def dominance(top: np.ndarray) -> float:
    """The top proponent's score over the mean of the next `NEXT` (inf if those are ≤ 0)."""
    rest = float(np.mean(top[1 : 1 + NEXT])) if len(top) > 1 else 0.0
    return float(top[0] / rest) if rest > 0 else math.inf


def sample_conditions(idx: Index, n: int, condition: Conditions | None = None) -> Conditions | None:
    """The conditions of `n` audit samples on a conditional index: `condition` (Conditions of one,
    a class or prompt the user gave) for each, else (class models) sample j gets the j-th class,
    mod the number of classes, of the index's class map (by id; without a map, the classes of its
    training rows). None for an unconditional index. DataError: a condition for an unconditional
    index, or a text-conditional one without a prompt."""
    fam = manifest_family(idx.manifest)
    kind = fam["condition_kind"]
    if kind == "none":
        if condition is not None:
            raise DataError("this index's model is unconditional: its samples take no class or prompt")
        return None
    if condition is not None:
        return condition.subset([0] * n)
    if kind == "text":
        raise DataError("this index's model is text-conditional: give the samples a prompt")
    cmap = fam["class_map"] or {}
    ids = sorted(set(cmap.values())) or sorted(
        {int(it["condition"]["class"]) for it in idx.items if "condition" in it}
    )
    return Conditions.classes([ids[j % len(ids)] for j in range(n)], fam["class_map"])


def _sample_features(idx: Index, model, s, u8: np.ndarray, conds, trajectory: bool, say) -> np.ndarray:
    """ψ (n, D) of the samples `s`, each under its own condition: a latent model's sampled latents
    (no decode/encode round trip), a pixel model's images rounded to 8-bit levels (what is shown)."""
    n = len(u8)
    if s.latents is not None:
        queries = s.latents
    else:
        queries = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    device = next(model.unet.parameters()).device
    psi = []
    for j in range(n):  # one at a time: a query's K draws are K rows of activations already
        say(0.6 + 0.4 * j / n, desc=f"attributing sample {j + 1} of {n}")
        traj = (s.timesteps, s.states[:, j : j + 1]) if trajectory else None
        cond = None if conds is None else conds.subset([j])
        psi.append(idx.query_features(queries[j : j + 1].to(device), traj, cond))
    return np.concatenate(psi)


def _pair(idx: Index, flat: np.ndarray, img: np.ndarray, j: int, top_s, top_i) -> dict:
    """Sample j's row: its top proponent, dominance, pixel distances and pixel-nearest image."""
    row = int(top_i[0])
    d_all = np.sqrt(np.mean((flat - img.reshape(-1).astype(np.float32) / 255) ** 2, axis=1))
    near = int(np.argmin(d_all))
    return {
        "sample": j,
        "top_row": row,
        "top_score": float(top_s[0]),
        "next_scores": [float(x) for x in top_s[1:]],
        "dominance": dominance(top_s),
        "pixel_distance": pixel_distance(img, idx.thumbs[row].reshape(img.shape)),
        "pixel_rank_of_top": int((d_all < d_all[row]).sum()) + 1,
        "nearest_row": near,
        "nearest_distance": float(d_all[near]),
        "label": int(idx.items[row]["label"]),
        "source": idx.items[row]["source"],
    }


def sample_pairs(
    idx: Index,
    model,
    lock,
    n: int = 16,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    threshold: float = DOMINANCE,
    progress=None,
    condition: Conditions | None = None,
) -> dict:
    """Generate `n` samples, attribute each, pair it with its top proponent: its dominance (score
    over the mean of the next ones), the pixel distance of the pair, and the pixel-nearest training
    image (row, distance) as the independent check. Samples sorted by dominance, highest first;
    `dominant` = those at or above `threshold`. `lock` guards the shared model. A conditional
    model samples under `sample_conditions` (each row records its `condition`) at the guidance
    scale the model records (`DiffusionModel.guidance_scale`) and attributes each sample under
    its own condition."""
    if not 1 <= n <= MAX_SAMPLES:
        raise DataError(f"samples must be between 1 and {MAX_SAMPLES} (got {n})")
    if sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if idx.thumbs is None:
        raise DataError("this index stores no thumbnails, so its training images cannot be paired")
    conds = sample_conditions(idx, n, condition)
    cfg = {} if conds is None or model.guidance_scale == 1.0 else {"guidance_scale": model.guidance_scale}
    att = idx.attributor
    trajectory = att is not None and att.spec.measurement == "trajectory"
    t0 = time.perf_counter()
    say = progress or (lambda *_a, **_k: None)
    say(0.05, desc=f"sampling {n} images ({sampler}, {steps} steps)")
    with lock:
        kw = dict(keep_trajectory=trajectory, progress=False, conditions=conds, **cfg)
        s = sample(model, n, seed=seed, sampler=sampler, steps=steps, **kw)
        t1 = time.perf_counter()
        say(0.6, desc=f"attributing {n} samples")
        u8 = to_uint8(s.images)
        psi = _sample_features(idx, model, s, u8, conds, trajectory, say)
    t2 = time.perf_counter()
    top_s, top_i, _, _ = idx.search(psi, min(1 + NEXT, len(idx)))
    flat = idx.thumbs.reshape(len(idx), -1).astype(np.float32) / 255
    out = []
    for j in range(n):
        img = u8[j, :, :, 0] if u8.shape[3] == 1 else u8[j]
        out.append(_pair(idx, flat, img, j, top_s[j], top_i[j]))
        if conds is not None:
            out[-1]["condition"] = conds.shown(j)
    out.sort(key=lambda r: -r["dominance"])
    say(1.0, desc="done")
    settings = {"n": n, "seed": seed, "sampler": sampler, "steps": steps, "threshold": threshold}
    if conds is not None:
        given = "each class in turn" if condition is None else conds.shown(0)
        settings.update(condition=given, condition_kind=conds.kind, **cfg)
    return {
        "settings": settings,
        "samples": out,
        "dominant": [r["sample"] for r in out if r["dominance"] >= threshold],
        "images": u8,  # (n, H, W, C) uint8 by sample index (not JSON: dropped by `to_json`)
        "timings_s": {"sampling": t1 - t0, "attribution": t2 - t1, "pairs": time.perf_counter() - t2},
    }


def to_json(audit: dict) -> dict:
    """The audit without its image arrays (JSON-able)."""
    return {k: (to_json(v) if isinstance(v, dict) else v) for k, v in audit.items() if k != "images"}


def write_csv(audit: dict, path: str | Path) -> Path:
    """Self-influence rankings (both ends) and the sample pairs, one table each, in one CSV (the
    pairs of a conditional model with each sample's condition)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        si = audit.get("self_influence")
        if si:
            w.writerow(["table", "end", "rank", "row", "self_influence", "label", "source"])
            for end in ("highest", "lowest"):
                for r in si[end]:
                    w.writerow(
                        [
                            "self_influence",
                            end,
                            r["rank"],
                            r["row"],
                            repr(r["self_influence"]),
                            r["label"],
                            r["source"],
                        ]
                    )
        pairs = audit.get("pairs")
        if pairs:
            cols = ["sample", "top_row", "top_score", "dominance", "pixel_distance", "pixel_rank_of_top"]
            cols += ["nearest_row", "nearest_distance", "label", "source"]
            cols += ["condition"] if any("condition" in r for r in pairs["samples"]) else []
            w.writerow(["table", "dominant", *cols])
            dom = set(pairs["dominant"])
            for r in pairs["samples"]:
                w.writerow(["samples", r["sample"] in dom, *[r[c] for c in cols]])
    return path
