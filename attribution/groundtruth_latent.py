"""The LDS ground truth of the class-conditional latent model (`mnist-latent`).

Built like the pixel ground truth (`attribution/evaluation.py`), with what differs for a latent,
conditional model:

- the shipped model's autoencoder is frozen and shared by every retrained model: each of the first
  N embedded MNIST digits (16×16) is encoded once (the scaled posterior mean, as the engine encodes
  it, `attribution/frozen.py`); only the denoiser is retrained, by the shipped recipe's denoiser
  stage (`attribution.train_latent.train_unet`: class labels, 10% label dropout to the null class,
  EMA), on all N latents (the full model) and on M random halves × S seeds;
- queries: `n_generated` latents sampled by the full model (DDIM, classifier-free guidance at the
  shipped scale) under classes i mod 10, used as latents (no decode/encode round trip), then
  `n_real` held-out digits, encoded, with their true class;
- the measurement is the conditional diffusion loss m(q | c_q), with the same fixed draws for
  every model (common random numbers, as for the pixel model).

    attribution evaluate groundtruth --model mnist-latent --out benchmarks/groundtruth-latent
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from attribution.conditions import Conditions
from attribution.data import mnist
from attribution.evaluation import GroundTruth, SubsetsConfig, measure, open_folder, train_subsets
from attribution.model import DiffusionModel, load_model
from attribution.sample import sample
from attribution.train_latent import LatentConfig, train_unet, write_pipeline

KIND = "latent"


@dataclass
class LatentGroundTruthConfig(SubsetsConfig):
    kind: str = KIND
    model: str = "mnist-latent"  # whose autoencoder, class map and recipe are used
    steps: int = 600
    full_steps: int = 1200
    sample_steps: int = 50


def _train(base: DiffusionModel, latents, labels, cfg: LatentGroundTruthConfig, seed: int, steps: int):
    """A denoiser trained by the shipped recipe's denoiser stage, around `base`'s frozen parts."""
    lc = LatentConfig(
        seed=seed,
        unet_steps=steps,
        unet_batch_size=cfg.batch_size,
        unet_lr=cfg.lr,
        checkpoint_every=10**9,
    )
    with tempfile.TemporaryDirectory() as work:
        unet, _ = train_unet(latents, labels, lc, Path(work), progress=False)
    return DiffusionModel(unet, base.scheduler, autoencoder=base.autoencoder, conditioning=base.conditioning)


def _data(cfg: LatentGroundTruthConfig, base: DiffusionModel):
    """(train latents (N, 2, 8, 8), train conditions, held-out real latents, their conditions)."""
    data = mnist(size=base.size)
    cmap = base.class_map
    lo, hi = cfg.n_train, cfg.n_train + cfg.n_real
    return (
        base.encode(data.images[:lo]),
        Conditions.classes(data.labels[:lo], cmap),
        base.encode(data.images[lo:hi]),
        Conditions.classes(data.labels[lo:hi], cmap),
    )


def build(out: str | Path, cfg: LatentGroundTruthConfig | None = None, log=print, worker=(0, 1)) -> Path:
    """Build (or resume) the latent ground truth under `out`; `worker` as in `build_groundtruth`."""
    cfg = cfg or LatentGroundTruthConfig()
    out = open_folder(out, cfg)
    base = load_model(cfg.model)
    train_lat, train_cond, real_lat, real_cond = _data(cfg, base)
    if not (out / "full-model" / "unet").exists():
        log(f"training the full-data denoiser on {cfg.n_train} latents ({cfg.full_steps} steps)")
        full = _train(base, train_lat, train_cond.labels, cfg, cfg.seed, cfg.full_steps)
        write_pipeline(full, out / "full-model", {"groundtruth": asdict(cfg)})
    full = load_model(out / "full-model")
    queries, qcond = _queries(out / "queries.safetensors", cfg, full, real_lat, real_cond, log)

    def fit(rows: torch.Tensor, seed: int) -> DiffusionModel:
        return _train(base, train_lat[rows], train_cond.labels[rows], cfg, seed, cfg.steps)

    def measure_of(model: DiffusionModel) -> np.ndarray:
        return measure(model, queries, cfg.measure_draws, cfg.seed + 3, cond=qcond)

    train_subsets(out, cfg, full, fit, measure_of, worker, log)
    return out


def _query_conditions(cfg, full: DiffusionModel, real_cond: Conditions) -> Conditions:
    """The queries' classes: generated query i under class i mod the number of classes, then the
    real digits' own."""
    labels = torch.cat([torch.arange(cfg.n_generated) % len(full.class_map), real_cond.labels])
    return Conditions.classes(labels, full.class_map)


def _queries(q_path: Path, cfg, full: DiffusionModel, real_lat, real_cond: Conditions, log):
    """(latents (Q, 2, 8, 8), their Conditions): guided samples of the full model, then real digits."""
    qcond = _query_conditions(cfg, full, real_cond)
    if not q_path.exists():
        log(
            f"generating {cfg.n_generated} queries (DDIM {cfg.sample_steps} steps, guidance {full.guidance_scale})"
        )
        s = sample(
            full,
            cfg.n_generated,
            seed=cfg.seed + 1,
            steps=cfg.sample_steps,
            keep_trajectory=True,
            progress=False,
            conditions=qcond.subset(list(range(cfg.n_generated))),
            guidance_scale=full.guidance_scale,
        )
        tensors = {"generated": s.latents, "real": real_lat, "timesteps": s.timesteps, "states": s.states}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(q_path))
    q = load_file(str(q_path))
    return torch.cat([q["generated"], q["real"]]), qcond


def load(path: str | Path):
    """The latent ground truth as an `evaluation.GroundTruth`: latents and conditions on both sides."""
    path = Path(path)
    cfg = LatentGroundTruthConfig(**json.loads((path / "config.json").read_text()))
    full = load_model(path / "full-model")
    train_lat, train_cond, _, real_cond = _data(cfg, full)
    qcond = _query_conditions(cfg, full, real_cond)
    return GroundTruth.read(path, cfg, train_lat, train_conditions=train_cond, query_conditions=qcond)
