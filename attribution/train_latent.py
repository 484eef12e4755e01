"""The second shipped model: a class-conditional latent diffusion model on the embedded MNIST.

    python -m attribution.train_latent --workdir runs/train-latent --out assets/mnist-latent

Two resumable stages, each checkpointed in its own sub-folder of `--workdir` (a killed run
continues where its last checkpoint left it, bit for bit):

1. **autoencoder**: a small `AutoencoderKL` (16×16×1 images -> 8×8×2 latents), trained on L1 + L2
   reconstruction of a posterior sample plus a weak KL term. Its `scaling_factor` is then set to
   1 / std of the posterior means of the training set, so the denoiser sees unit-scale latents.
2. **denoiser**: a class-conditional `UNet2DModel` (`num_class_embeds` = 10 digits + 1 null class
   for classifier-free guidance) on the scaled posterior means of the 5,000 images (each image
   encoded once, as the attribution engine encodes it: `attribution/frozen.py`), ε-prediction on
   the DDPM linear schedule; each example's label is dropped to the null class with
   probability `label_dropout` (10%). AdamW, warm-up + cosine, EMA, gradient clipping.

Every random choice is seeded: the model inits by `seed`, batch order and draws by
(seed, salt, step) as in `attribution/train.py`. The result is a pipeline folder
(`model_index.json`, `vae/`, `unet/`, `scheduler/` (DDIM, no sample clipping: latents are not in
[-1, 1]), `conditioning.json` with the class map and the null class, `training.json`) that
`attribution.model.load_model` reads; `load_model("mnist-latent")` names the shipped copy.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from attribution import frozen
from attribution.atomic import save_json, save_torch
from attribution.conditions import Cond, denoise
from attribution.console import say
from attribution.model import DiffusionModel, save_model
from attribution.seeds import generator
from attribution.train import TrainConfig, batch_rows, lr_at, step_draws

# Salts of the latent model's training draws (values never change; see attribution/seeds.py).
VAE_STEP = 101  # autoencoder: the posterior sample of a step, keys (step,)
LABEL_DROP = 103  # denoiser: which labels of a step are dropped to the null class, keys (step,)

IMAGE_SIZE = 16
NULL_CLASS = 10
GUIDANCE = 2.0  # the app's classifier-free guidance scale (99.8% of samples the requested digit)
CLASS_MAP = {str(d): d for d in range(10)}

VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 2,
    in_channels=2,
    out_channels=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
    num_class_embeds=NULL_CLASS + 1,
)


@dataclass
class LatentConfig:
    """Both stages' settings (a checkpoint made under other settings is refused)."""

    seed: int = 0
    vae_steps: int = 2000
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3
    unet_steps: int = 5000
    unet_batch_size: int = 128
    unet_lr: float = 2e-3
    label_dropout: float = 0.1
    warmup: int = 100
    checkpoint_every: int = 200

    def stage(self, which: str) -> TrainConfig:
        """The `attribution.train` schedule (LR, batch order, draws) of one stage."""
        return TrainConfig(
            steps=self.vae_steps if which == "vae" else self.unet_steps,
            batch_size=self.vae_batch_size if which == "vae" else self.unet_batch_size,
            lr=self.vae_lr if which == "vae" else self.unet_lr,
            warmup=self.warmup,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
        )


def scheduler() -> DDIMScheduler:
    """DDPM's linear schedule (T = 1000, ε), sampled by DDIM; no clipping (latents are unbounded)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _seeded(cls, config: dict, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**config)


def _load_checkpoint(path: Path, cfg: LatentConfig, modules: dict) -> int:
    """Restore `modules` (name -> module or optimiser) from `path` if it exists; its step, else 0."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{path}: made with other training settings; use a new --workdir or delete it")
    for name, m in modules.items():
        m.load_state_dict(state[name])
    return int(state["step"])


def _save_checkpoint(path: Path, cfg: LatentConfig, modules: dict, step: int) -> None:
    state = {name: m.state_dict() for name, m in modules.items()}
    save_torch(path, {**state, "step": step, "config": asdict(cfg)})


def _bar(start: int, total: int, desc: str, progress: bool):
    return tqdm(range(start, total), initial=start, total=total, desc=desc, unit="step", disable=not progress)


def _optimizer_step(opt, loss: torch.Tensor, net: torch.nn.Module, step: int, sc) -> None:
    """One AdamW step at the schedule's learning rate, gradients clipped to `sc.grad_clip`."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, sc)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), sc.grad_clip)
    opt.step()


def _checkpoint(ckpt: Path, cfg, parts: dict, done: int, start: int, sc, stop_after: int | None) -> bool:
    """Saves every `checkpoint_every` steps, at the end and when `stop_after` steps ran; True to stop."""
    stop = bool(stop_after) and done - start >= stop_after
    if done % sc.checkpoint_every == 0 or done == sc.steps or stop:
        _save_checkpoint(ckpt, cfg, parts, done)
    return stop


def train_vae(
    images: torch.Tensor,
    cfg: LatentConfig,
    workdir: Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[AutoencoderKL, bool]:
    """Stage 1 (resumable): the autoencoder on `images` (N, 1, 16, 16) in [-1, 1], scaling_factor 1;
    and whether the stage ran to its last step (not stopped by `stop_after`)."""
    sc = cfg.stage("vae")
    vae = _seeded(AutoencoderKL, VAE_CONFIG, cfg.seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=sc.lr, weight_decay=0.0)
    ckpt = workdir / "vae" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    parts = {"vae": vae, "opt": opt}
    start = _load_checkpoint(ckpt, cfg, parts)
    bar, done = _bar(start, sc.steps, "autoencoder", progress), start
    for step in bar:
        x = images[batch_rows(step, len(images), sc)]
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=generator(cfg.seed, VAE_STEP, step))
        recon = vae.decode(post.mean + post.std * eps).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        _optimizer_step(opt, loss, vae, step, sc)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        done = step + 1
        if _checkpoint(ckpt, cfg, parts, done, start, sc, stop_after):
            break
    bar.close()
    return vae.eval().requires_grad_(False), done >= sc.steps


@torch.no_grad()
def set_scaling(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """scaling_factor := 1 / std of the training set's posterior means (all latent entries)."""
    means = torch.cat([vae.encode(images[i : i + 500]).latent_dist.mean for i in range(0, len(images), 500)])
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def dropped_labels(step: int, labels: torch.Tensor, cfg: LatentConfig) -> torch.Tensor:
    """The step's class ids with each dropped to the null class with probability label_dropout."""
    drop = torch.rand(len(labels), generator=generator(cfg.seed, LABEL_DROP, step)) < cfg.label_dropout
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def train_unet(
    latents: torch.Tensor,
    labels: torch.Tensor,
    cfg: LatentConfig,
    workdir: Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[UNet2DModel, bool]:
    """Stage 2 (resumable): the class-conditional denoiser on scaled latents: the EMA weights, and
    whether the stage ran to its last step."""
    sc = cfg.stage("unet")
    unet = _seeded(UNet2DModel, UNET_CONFIG, cfg.seed + 1).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=sc.lr, weight_decay=0.0)
    acp = scheduler().alphas_cumprod.float()
    ckpt = workdir / "unet" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    parts = {"unet": unet, "ema": ema, "opt": opt}
    start = _load_checkpoint(ckpt, cfg, parts)
    shape = tuple(latents.shape[1:])
    bar, done = _bar(start, sc.steps, "denoiser", progress), start
    ema_params = list(ema.parameters())
    for step in bar:
        rows = batch_rows(step, len(latents), sc)
        t, eps = step_draws(step, len(rows), shape, 1000, sc)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * latents[rows] + (1 - a).sqrt() * eps
        cond = Cond(labels=dropped_labels(step, labels[rows], cfg))
        loss = (denoise(unet, xt, t, cond) - eps).pow(2).mean()
        _optimizer_step(opt, loss, unet, step, sc)
        decay = min(sc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, list(unet.parameters()), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if _checkpoint(ckpt, cfg, parts, done, start, sc, stop_after):
            break
    bar.close()
    return ema.eval().requires_grad_(False), done >= sc.steps


def write_pipeline(model: DiffusionModel, out: Path, info: dict) -> Path:
    """The pipeline folder: unet/, vae/, scheduler/, conditioning.json, training.json, model_index.json."""
    save_model(model, out, extra=info)
    index = {
        "_class_name": "ClassConditionalLatentDiffusion",  # no diffusers pipeline class takes this pair
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", type(model.scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    save_json(out / "model_index.json", index)
    return out


def train_latent_model(
    cfg: LatentConfig,
    workdir: str | Path,
    out: str | Path | None = None,
    n: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> DiffusionModel | None:
    """Both stages on the first `n` (default all 5,000) embedded MNIST digits at 16×16; the model
    (also written to `out` as a pipeline folder), or None if `stop_after` stopped a stage early."""
    from attribution.data import mnist

    workdir = Path(workdir)
    ds = mnist(size=IMAGE_SIZE, n=n)
    t0 = time.time()
    say(f"autoencoder: {cfg.vae_steps} steps on {len(ds)} images ({workdir / 'vae'})")
    vae, finished = train_vae(ds.images, cfg, workdir, progress, stop_after)
    if not finished:
        return None
    scale = set_scaling(vae, ds.images)
    latents = frozen.encode(vae, ds.images)  # as the engine encodes training images
    say(f"denoiser: {cfg.unet_steps} steps on {tuple(latents.shape)} latents (scaling_factor {scale:.4f})")
    unet, finished = train_unet(latents, ds.labels, cfg, workdir, progress, stop_after)
    if not finished:
        return None
    model = DiffusionModel(
        unet,
        scheduler(),
        autoencoder=vae,
        conditioning={"class_map": CLASS_MAP, "null_class": NULL_CLASS, "guidance_scale": GUIDANCE},
    )
    info = {
        "recipe": "attribution/train_latent.py",
        "config": asdict(cfg),
        "images": len(ds),
        "image_size": IMAGE_SIZE,
        "scaling_factor": scale,
        "seconds_this_run": round(time.time() - t0, 1),
        "parameters": {
            "unet": sum(p.numel() for p in model.unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
        "weights_sha256": model.weights_sha256(),
    }
    if out is not None:
        write_pipeline(model, Path(out), info)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="checkpoints (a killed run resumes from here)")
    p.add_argument("--out", required=True, help="pipeline folder to write, e.g. assets/mnist-latent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=LatentConfig.vae_steps)
    p.add_argument("--unet-steps", type=int, default=LatentConfig.unet_steps)
    p.add_argument("--n", type=int, default=None, help="train on the first n images only")
    a = p.parse_args(argv)
    cfg = LatentConfig(seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps)
    t0 = time.time()
    train_latent_model(cfg, a.workdir, out=a.out, n=a.n)
    say(f"wrote {a.out} ({time.time() - t0:.0f} s this run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
