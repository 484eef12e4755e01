"""Training an ε-prediction diffusion model: AdamW, warm-up + cosine LR, EMA, resumable.

Every random choice of step `s` (timesteps and noise) comes from a generator seeded by
(seed, s) and the batch order of epoch `e` from one seeded by (seed, e). A run resumed from a
checkpoint therefore continues exactly as the uninterrupted run would have, and two runs on
different subsets of the data share their initialisation and per-step draws (common random
numbers, used by the LDS ground truth).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attribution.atomic import save_torch
from attribution.model import DiffusionModel
from attribution.seeds import TRAIN_ORDER, TRAIN_STEP, generator


@dataclass
class TrainConfig:
    steps: int = 2400
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def batch_rows(step: int, n: int, cfg: TrainConfig) -> torch.Tensor:
    """Rows of the dataset used at `step`: epochs are seeded permutations, batches wrap around."""
    bs = min(cfg.batch_size, n)
    per_epoch = n // bs
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=generator(cfg.seed, TRAIN_ORDER, epoch))
    return perm[k * bs : (k + 1) * bs]


def step_draws(step: int, bs: int, shape: tuple[int, ...], num_timesteps: int, cfg: TrainConfig):
    """(timesteps (bs,), noise (bs, *shape)) of `step`, independent of which images are used."""
    g = generator(cfg.seed, TRAIN_STEP, step)
    t = torch.randint(0, num_timesteps, (bs,), generator=g)
    eps = torch.randn((bs, *shape), generator=g)
    return t, eps


def _resume(ckpt: Path | None, cfg: TrainConfig, unet, ema, opt, device) -> int:
    """Loads the checkpoint at `ckpt` (if any) into unet, ema and opt; returns its step (else 0)."""
    if ckpt is None:
        return 0
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, map_location=device, weights_only=True)
    if state["config"] != asdict(cfg):
        raise ValueError(
            f"{ckpt}: checkpoint was made with another training config; use a new work folder or delete it"
        )
    unet.load_state_dict(state["unet"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def train(
    model: DiffusionModel,
    images: torch.Tensor,
    cfg: TrainConfig,
    workdir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionModel:
    """Train `model` on `images` (N, C, H, W) in [-1, 1]; returns a model holding the EMA weights.

    With `workdir`, a checkpoint is written every `cfg.checkpoint_every` steps and at the end,
    and an existing checkpoint there is resumed. `stop_after` stops early after that many steps
    (a checkpoint is written), for tests of resumption.
    """
    device = torch.device(device)
    unet = model.unet.to(device).train().requires_grad_(True)
    if device.type == "cpu":
        unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = model.alphas_cumprod(device)
    ckpt = Path(workdir) / "checkpoint.pt" if workdir else None
    start = _resume(ckpt, cfg, unet, ema, opt, device)

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
            save_torch(ckpt, {**state, "step": step, "config": asdict(cfg)})

    n = images.shape[0]
    shape = tuple(images.shape[1:])
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not progress,
        desc="training",
        unit="step",
    )
    t0, seen = time.time(), 0
    ema_params = list(ema.parameters())
    for step in bar:
        rows = batch_rows(step, n, cfg)
        x0 = images[rows].to(device)
        t, eps = step_draws(step, len(rows), shape, model.num_timesteps, cfg)
        t, eps = t.to(device), eps.to(device)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        if device.type == "cpu":
            xt = xt.contiguous(memory_format=torch.channels_last)
        loss = (unet(xt, t).sample - eps).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, list(unet.parameters()), 1 - decay)
        seen += len(rows)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
        done = step + 1
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            checkpoint(done)
        if stop_after is not None and done - start >= stop_after:
            checkpoint(done)
            break
    bar.close()
    ema.to(memory_format=torch.contiguous_format)
    unet.eval().requires_grad_(False)
    return DiffusionModel(ema.eval().requires_grad_(False), model.scheduler)
