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

from attribution.atomic import save_numpy
from attribution.conditions import Conditions
from attribution.data import mnist
from attribution.evaluation import SubsetsConfig
from attribution.measurements import Measurement, evaluate
from attribution.model import DiffusionModel, load_model
from attribution.sample import sample

KIND = "latent"


@dataclass
class LatentGroundTruthConfig(SubsetsConfig):
    kind: str = KIND
    model: str = "mnist-latent"  # whose autoencoder, class map and recipe are used
    steps: int = 600
    full_steps: int = 1200
    sample_steps: int = 50


def measure(
    model: DiffusionModel, latents: torch.Tensor, cond: Conditions, draws: int, seed: int
) -> np.ndarray:
    """Each query's conditional diffusion loss (Q,) under `model`, draws fixed by (seed, index)."""
    rows = Measurement("loss").rows(
        latents,
        list(range(latents.shape[0])),
        draws,
        seed,
        model.alphas_cumprod(),
        cond=model.condition(cond),
        prediction=model.prediction_type,
    )
    return evaluate(model.unet, rows).numpy()


def _train(base: DiffusionModel, latents, labels, cfg: LatentGroundTruthConfig, seed: int, steps: int):
    """A denoiser trained by the shipped recipe's denoiser stage, around `base`'s frozen parts."""
    from attribution.train_latent import LatentConfig, train_unet

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
    from attribution.evaluation import _masks, open_folder, train_subsets
    from attribution.train_latent import write_pipeline

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
    masks = _masks(out / "masks.npy", cfg)
    if not (out / "full_measurements.npy").exists():
        save_numpy(
            out / "full_measurements.npy", measure(full, queries, qcond, cfg.measure_draws, cfg.seed + 3)
        )

    def fit_and_measure(rows: torch.Tensor, seed: int) -> np.ndarray:
        model = _train(base, train_lat[rows], train_cond.labels[rows], cfg, seed, cfg.steps)
        return measure(model, queries, qcond, cfg.measure_draws, cfg.seed + 3)

    train_subsets(out, cfg, masks, fit_and_measure, worker, log)
    return out


def _queries(q_path: Path, cfg, full: DiffusionModel, real_lat, real_cond: Conditions, log):
    """(latents (Q, 2, 8, 8), their Conditions): guided samples of the full model, then real digits."""
    gen_labels = torch.arange(cfg.n_generated) % 10
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
            conditions=Conditions.classes(gen_labels, full.class_map),
            guidance_scale=full.guidance_scale,
        )
        tensors = {"generated": s.latents, "real": real_lat, "timesteps": s.timesteps, "states": s.states}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(q_path))
    q = load_file(str(q_path))
    labels = torch.cat([gen_labels, real_cond.labels])
    return torch.cat([q["generated"], q["real"]]), Conditions.classes(labels, full.class_map)


def load(path: str | Path):
    """The latent ground truth as an `evaluation.GroundTruth`: latents and conditions on both sides."""
    from attribution.evaluation import GroundTruth

    path = Path(path)
    cfg = LatentGroundTruthConfig(**json.loads((path / "config.json").read_text()))
    full = load_model(path / "full-model")
    train_lat, train_cond, _, real_cond = _data(cfg, full)
    labels = torch.cat([torch.arange(cfg.n_generated) % 10, real_cond.labels])
    qcond = Conditions.classes(labels, full.class_map)
    return GroundTruth.read(path, cfg, train_lat, train_conditions=train_cond, query_conditions=qcond)
