"""Evaluation: the LDS ground truth (models retrained on random halves) and the LDS itself.

Ground truth (built once, resumably): N training images, a full-data model, Q queries generated
by it (with their sampling trajectories) plus real held-out images, M random 50% subsets each
trained with S seeds, and every query's loss under every model measured with common random
numbers (the same fixed draws for every model). Training also uses common random numbers: run
(subset j, seed s) uses the initialisation and per-step timestep/noise draws of seed s, whatever
the subset. Each finished model's measurements are saved as soon as it is done.

LDS of query q: Spearman over subsets j between Σ_{i∈S_j} τ(q, i) and −m(q; θ_{S_j}) (τ > 0 =
proponent, so a subset full of proponents should have a *low* loss), mean ± s.e. over queries.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from attribution.atomic import save_numpy
from attribution.conditions import Conditions
from attribution.data import mnist
from attribution.measurements import Measurement, evaluate
from attribution.model import build_model, load_model, save_model
from attribution.ranks import spearman
from attribution.sample import sample
from attribution.train import TrainConfig, train


@dataclass
class SubsetsConfig:
    """What every ground truth has: N training images, generated and real queries, M random
    subsets (a `fraction` of the images each) × S training seeds, the training schedule, and the
    draws of the measurement."""

    n_train: int = 1000
    n_generated: int = 50
    n_real: int = 10
    subsets: int = 32
    seeds: int = 2
    fraction: float = 0.5
    steps: int = 400
    full_steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    measure_draws: int = 256
    seed: int = 0


@dataclass
class GroundTruthConfig(SubsetsConfig):
    """The pixel model's: a `preset` model trained from scratch on `size`×`size` digits."""

    size: int = 16
    preset: str = "mnist16"
    trajectory_steps: int = 50


def measure(
    model, queries: torch.Tensor, draws: int, seed: int, cond: Conditions | None = None
) -> np.ndarray:
    """Each query's diffusion loss (Q,) under `model`, with draws fixed by (seed, query index); a
    conditional model's under the queries' conditions `cond`, m(q | c_q)."""
    rows = Measurement("loss").rows(
        queries,
        list(range(queries.shape[0])),
        draws,
        seed,
        model.alphas_cumprod(),
        cond=model.condition(cond),
        prediction=model.prediction_type,
    )
    return evaluate(model.unet, rows).numpy()


def train_config(cfg: GroundTruthConfig, seed: int, steps: int | None = None) -> TrainConfig:
    return TrainConfig(
        steps=steps or cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        warmup=min(100, (steps or cfg.steps) // 10),
        ema_decay=0.995,
        checkpoint_every=10**9,
    )


def build_groundtruth(
    out: str | Path,
    cfg: GroundTruthConfig | None = None,
    progress: bool = True,
    log=print,
    worker: tuple[int, int] = (0, 1),
) -> Path:
    """Build (or resume) the ground truth under `out`.

    `worker` = (i, n): this process trains every n-th remaining model starting at i, so n
    processes can share the work; the one that finds all models done assembles the result.
    """
    cfg = cfg or GroundTruthConfig()
    out = open_folder(out, cfg)
    data = mnist(size=cfg.size)
    train_images = data.images[: cfg.n_train]
    real = data.images[cfg.n_train : cfg.n_train + cfg.n_real]
    full = _full_model(out / "full-model", cfg, train_images, progress, log)
    queries = _queries(out / "queries.safetensors", cfg, full, real, progress, log)

    def fit(rows: torch.Tensor, seed: int):
        return train(
            build_model(cfg.preset, seed=seed), train_images[rows], train_config(cfg, seed), progress=False
        )

    train_subsets(
        out, cfg, full, fit, lambda m: measure(m, queries, cfg.measure_draws, cfg.seed + 3), worker, log
    )
    return out


def open_folder(out: str | Path, cfg) -> Path:
    """`out`, created, holding `cfg` as config.json; ValueError if it holds another config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != asdict(cfg):
        raise ValueError(f"{out}: holds a ground truth with another config; use another folder")
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    return out


def train_subsets(out: Path, cfg, full, fit, measure_of, worker, log) -> None:
    """The subsets' masks and the full-data model's measurements (each made once), then this
    worker's share of the missing (subset j, seed s) models, each one's query measurements saved as
    soon as it is trained: `fit(rows, seed)` is the model trained on `rows` with training seed
    `cfg.seed + 100 + s` (common to every subset), `measure_of(model)` its queries' losses (Q,).
    The worker that finds every model done assembles measurements.npy (M, S, Q)."""
    masks = _masks(out / "masks.npy", cfg)
    if not (out / "full_measurements.npy").exists():
        save_numpy(out / "full_measurements.npy", measure_of(full))
    mdir = out / "measurements"
    mdir.mkdir(exist_ok=True)
    missing = _missing(mdir, cfg)
    todo = missing[worker[0] :: worker[1]]
    total = cfg.subsets * cfg.seeds
    log(f"{total - len(missing)} of {total} subset models done; this worker trains {len(todo)}")
    t0 = time.time()
    for n_done, (j, s) in enumerate(todo):
        rows = torch.from_numpy(np.flatnonzero(masks[j]))
        save_numpy(mdir / f"{j:03d}-{s}.npy", measure_of(fit(rows, cfg.seed + 100 + s)))
        left = (time.time() - t0) / (n_done + 1) * (len(todo) - n_done - 1)
        log(f"model {n_done + 1}/{len(todo)} (subset {j}, seed {s}) done; {left / 60:.0f} min left")
    if _missing(mdir, cfg):
        log("other workers are still training subset models")
        return
    meas = np.stack(
        [np.stack([np.load(mdir / f"{j:03d}-{s}.npy") for s in range(cfg.seeds)]) for j in range(cfg.subsets)]
    )  # (M, S, Q)
    save_numpy(out / "measurements.npy", meas.astype(np.float32))


def _full_model(full_dir: Path, cfg: GroundTruthConfig, train_images: torch.Tensor, progress: bool, log):
    """The model trained on all N images (trained once, then loaded)."""
    if not (full_dir / "unet").exists():
        log(f"training the full-data model on {cfg.n_train} images ({cfg.full_steps} steps)")
        model = train(
            build_model(cfg.preset, seed=cfg.seed),
            train_images,
            train_config(cfg, cfg.seed, cfg.full_steps),
            progress=progress,
        )
        save_model(model, full_dir, extra={"groundtruth": asdict(cfg)})
    return load_model(full_dir)


def _queries(
    q_path: Path, cfg: GroundTruthConfig, full, real: torch.Tensor, progress: bool, log
) -> torch.Tensor:
    """(n_generated + n_real, C, H, W): DDIM samples of the full model, then held-out real images."""
    if not q_path.exists():
        log(f"generating {cfg.n_generated} queries (DDIM {cfg.trajectory_steps} steps)")
        s = sample(
            full,
            cfg.n_generated,
            seed=cfg.seed + 1,
            sampler="ddim",
            steps=cfg.trajectory_steps,
            keep_trajectory=True,
            progress=progress,
        )
        save_file(
            {
                "generated": s.images,
                "real": real.contiguous(),
                "timesteps": s.timesteps,
                "states": s.states.contiguous(),
            },
            str(q_path),
        )
    q = load_file(str(q_path))
    return torch.cat([q["generated"], q["real"]])


def _masks(mask_path: Path, cfg: GroundTruthConfig) -> np.ndarray:
    """(subsets, n_train) bool: the seeded random subsets, each a `fraction` of the images."""
    if not mask_path.exists():
        rng = np.random.default_rng(cfg.seed + 2)
        k = int(round(cfg.fraction * cfg.n_train))
        masks = np.zeros((cfg.subsets, cfg.n_train), dtype=bool)
        for j in range(cfg.subsets):
            masks[j, rng.choice(cfg.n_train, k, replace=False)] = True
        save_numpy(mask_path, masks)
    return np.load(mask_path)


def _missing(mdir: Path, cfg: GroundTruthConfig) -> list[tuple[int, int]]:
    """(subset, seed) pairs whose measurements are not on disk yet."""
    return [
        (j, s)
        for s in range(cfg.seeds)
        for j in range(cfg.subsets)
        if not (mdir / f"{j:03d}-{s}.npy").exists()
    ]


@dataclass
class GroundTruth:
    masks: np.ndarray  # (M, N) bool
    measurements: np.ndarray  # (M, S, Q) query losses
    queries: torch.Tensor  # (Q, C, H, W)
    trajectory: tuple[torch.Tensor, torch.Tensor] | None  # for the generated queries only
    n_generated: int
    train_images: torch.Tensor
    model_dir: Path
    config: GroundTruthConfig
    train_conditions: Conditions | None = None  # conditional models (attribution/groundtruth_latent.py)
    query_conditions: Conditions | None = None

    @classmethod
    def read(cls, path: Path, cfg, train_images: torch.Tensor, **conditions) -> GroundTruth:
        """The folder's masks, measurements and queries (generated, then real) with `train_images`."""
        q = load_file(str(path / "queries.safetensors"))
        return cls(
            np.load(path / "masks.npy"),
            np.load(path / "measurements.npy"),
            torch.cat([q["generated"], q["real"]]),
            (q["timesteps"], q["states"]),
            q["generated"].shape[0],
            train_images,
            path / "full-model",
            cfg,
            **conditions,
        )


def load_groundtruth(path: str | Path) -> GroundTruth:
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("kind") == "latent":
        from attribution import groundtruth_latent

        return groundtruth_latent.load(path)
    cfg = GroundTruthConfig(**raw)
    return GroundTruth.read(path, cfg, mnist(size=cfg.size).images[: cfg.n_train])


def lds_per_query(scores: np.ndarray, masks: np.ndarray, measurements: np.ndarray) -> np.ndarray:
    """Spearman per query between Σ_{i∈S_j} τ(q,i) and −m(q; θ_{S_j}).

    scores (Q, N); masks (M, N); measurements (M, Q) (already averaged over seeds).
    """
    pred = masks.astype(np.float64) @ scores.T.astype(np.float64)  # (M, Q)
    out = np.empty(scores.shape[0])
    for q in range(scores.shape[0]):
        out[q] = spearman(pred[:, q], -measurements[:, q])
    return np.nan_to_num(out)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def seed_agreement(measurements: np.ndarray) -> np.ndarray:
    """Per query, Spearman over subsets between seed 0 and seed 1 losses (the retraining noise)."""
    m = measurements
    return np.nan_to_num(np.array([spearman(m[:, 0, q], m[:, 1, q]) for q in range(m.shape[2])]))


def method_lds(
    gt: GroundTruth, cfg, progress: bool = True, device=None, curvature_cache: dict | None = None
) -> dict:
    """Scores of one method on the ground truth's queries, and its LDS (mean ± s.e., per query).

    `curvature_cache` (a dict) shares fitted curvatures between configurations that agree on them.
    """
    from attribution.data import ImageDataset
    from attribution.influence import Attributor

    model = load_model(gt.model_dir, device=device or "cpu")
    n = gt.train_images.shape[0]
    train_ds = ImageDataset(
        gt.train_images, torch.full((n,), -1), [str(i) for i in range(n)], conditions=gt.train_conditions
    )
    t0 = time.time()
    att = Attributor(model, train_ds, cfg, progress=progress)
    key = repr(att.curvature_config())
    att.fit(curvature=(curvature_cache or {}).get(key))
    if curvature_cache is not None and att.curvature is not None:
        curvature_cache[key] = att.curvature
    queries, cond = gt.queries, gt.query_conditions
    traj = None
    if att.spec.measurement == "trajectory":  # only generated queries have a trajectory
        queries, traj = gt.queries[: gt.n_generated], gt.trajectory
        cond = None if cond is None else cond.subset(list(range(gt.n_generated)))
    scores = att.scores(queries, trajectory=traj, cond=cond).numpy()
    seconds = time.time() - t0
    target = gt.measurements.mean(axis=1)[:, : queries.shape[0]]
    per_q = lds_per_query(scores, gt.masks, target)
    mean, se = mean_se(per_q)
    return {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "lds": mean,
        "se": se,
        "per_query": per_q.tolist(),
        "seconds": seconds,
        "n_queries": int(queries.shape[0]),
        "scores": scores,
    }
