"""Sampling with diffusers' DDPM and DDIM schedulers, keeping the trajectory when asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from attribution.model import DiffusionModel

SAMPLERS = ("ddim", "ddpm")


@dataclass
class Samples:
    """images (N, C, H, W) in [-1, 1]; trajectory: timesteps (S,) and states x_t (S, N, C, H, W)."""

    images: torch.Tensor
    timesteps: torch.Tensor | None = None
    states: torch.Tensor | None = None


def make_sampler(model: DiffusionModel, sampler: str, steps: int):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    sched = cls.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    keep_trajectory: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Samples:
    """Draw `n` images; sample i depends only on (seed, i, sampler, steps), not on batching."""
    device = torch.device(device) if device else next(model.unet.parameters()).device
    shape = (model.channels, model.size, model.size)
    imgs, states, ts = [], [], None
    total = ((n + batch_size - 1) // batch_size) * steps
    bar = tqdm(total=total, desc=f"sampling ({sampler}, {steps} steps)", disable=not progress)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        sched = make_sampler(model, sampler, steps)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in rows]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        traj = []
        for t in sched.timesteps:
            if keep_trajectory:
                traj.append(x.cpu())
            eps = model.unet(x, t.to(device).expand(x.shape[0])).sample
            if sampler == "ddpm":
                # per-image noise, so a sample does not depend on the batch it was drawn in
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                x = _ddpm_step(sched, eps, int(t), x, noise)
            else:
                x = sched.step(eps, t, x, eta=0.0).prev_sample
            bar.update(1)
        imgs.append(x.clamp(-1, 1).cpu())
        if keep_trajectory:
            states.append(torch.stack(traj))
            ts = sched.timesteps.clone()
    bar.close()
    out = Samples(torch.cat(imgs))
    if keep_trajectory:
        out.timesteps, out.states = ts, torch.cat(states, dim=1)
    return out


def _ddpm_step(
    sched: DDPMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One ancestral DDPM step with caller-supplied noise (same formula as DDPMScheduler.step)."""
    prev_t = sched.previous_timestep(t)
    acp = sched.alphas_cumprod
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else sched.one
    beta_t = 1 - a_t / a_prev
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)) * x
    if t > 0:
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        mean = mean + var.sqrt() * noise
    return mean
