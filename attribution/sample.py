"""Sampling through diffusers' own scheduler classes, keeping the trajectory when asked.

`sampler` is "ddim" (deterministic, eta 0) or "ddpm" (ancestral), each built from the model's
scheduler config, or "scheduler": the class the model folder names (PNDM, Euler, DPM-Solver, …),
built from the same config. Every step is the scheduler's own `step` (so `clip_sample`,
`thresholding`, `variance_type` and the prediction type are honoured); stochastic steps get one
generator per image, so a sample depends only on (seed, its index, sampler, steps), not on
batching. Conditional models sample under `conditions` (one per image), with classifier-free
guidance at `guidance_scale` != 1 against the model's null condition (the empty prompt, or the
class recorded as `null_class`). Latent models sample latents and decode them; `Samples.latents`
keeps the latents (what a generated query is measured on: no decode/encode round trip).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from attribution.conditions import Cond, Conditions, as_cond, denoise, select
from attribution.model import DiffusionModel

SAMPLERS = ("ddim", "ddpm", "scheduler")


@dataclass
class Samples:
    """images (N, C, H, W) in [-1, 1]; trajectory: timesteps (S,) and states x_t (S, N, ...) in the
    denoiser's space; latents (N, ...): the final latents of a latent model (None for pixel models)."""

    images: torch.Tensor
    timesteps: torch.Tensor | None = None
    states: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @property
    def model_inputs(self) -> torch.Tensor:
        """What the denoiser's measurements take: the latents, or the images of a pixel model."""
        return self.images if self.latents is None else self.latents


def make_sampler(model: DiffusionModel, sampler: str, steps: int):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(sampler, type(model.scheduler))
    sched = cls.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    return sched


def _step_kwargs(sched, gens: list[torch.Generator]) -> dict:
    """eta 0 for DDIM; the per-image generators for any scheduler whose step draws noise."""
    params = inspect.signature(sched.step).parameters
    if isinstance(sched, DDIMScheduler):
        return {"eta": 0.0}
    return {"generator": gens} if "generator" in params else {}


def _guided(model, x, t, cond: Cond | None, null: Cond | None, scale: float) -> torch.Tensor:
    out = denoise(model.unet, x, t, cond)
    if null is None:
        return out
    base = denoise(model.unet, x, t, null)
    return base + scale * (out - base)


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
    conditions: Conditions | Cond | None = None,
    guidance_scale: float = 1.0,
) -> Samples:
    """Draw `n` images; sample i depends only on (seed, i, sampler, steps, its condition)."""
    device = torch.device(device) if device else next(model.unet.parameters()).device
    shape = model.latent_shape
    cond = as_cond(model, conditions, n)
    null = model.null_condition(n) if cond is not None and guidance_scale != 1.0 else None
    xs, states, ts = [], [], None
    total = ((n + batch_size - 1) // batch_size) * steps
    bar = tqdm(total=total, desc=f"sampling ({sampler}, {steps} steps)", disable=not progress)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        sched = make_sampler(model, sampler, steps)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in rows]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        if float(sched.init_noise_sigma) != 1.0:
            x = x * sched.init_noise_sigma
        c, nc = select(cond, rows), select(null, rows)
        kw = _step_kwargs(sched, gens)
        traj = []
        for t in sched.timesteps:
            if keep_trajectory:
                traj.append(x.cpu())
            xin = sched.scale_model_input(x, t)
            out = _guided(model, xin, t.to(device).expand(x.shape[0]), c, nc, guidance_scale)
            x = sched.step(out, t, x, **kw).prev_sample
            bar.update(1)
        xs.append(x.cpu())
        if keep_trajectory:
            states.append(torch.stack(traj))
            ts = sched.timesteps.clone()
    bar.close()
    final = torch.cat(xs)
    latent = model.autoencoder is not None
    out = Samples(model.decode(final), latents=final if latent else None)
    if keep_trajectory:
        out.timesteps, out.states = ts, torch.cat(states, dim=1)
    return out
