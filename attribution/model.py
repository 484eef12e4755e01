"""Diffusion models: a diffusers denoiser and its noise schedule (plus, for latent and text models,
the frozen autoencoder and text encoder), from named presets or local folders.

Presets are unconditional pixel-space `UNet2DModel`s with a DDPM linear schedule. Folders are
read by `attribution/pipelines.py` (bare denoiser, `unet/` + `scheduler/`, or pipeline folders:
DDPM/DDIM, latent, Stable-Diffusion-style); without a scheduler config the scheduler is DDPM with
linear betas and T = 1000. Weights are only ever read from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from attribution import frozen
from attribution.conditions import Cond, Conditions
from attribution.errors import ModelError  # noqa: F401  (re-exported)
from attribution.pipelines import load_parts

PRESETS: dict[str, dict] = {
    # The default: 28x28 grayscale MNIST, ~0.69M parameters, attention at 7x7 and in the middle.
    "mnist": dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # A few thousand parameters with attention: for tests against exact curvature.
    "tiny": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=2,
        attention_head_dim=4,
    ),
    # 32x32 RGB, ~2.6M parameters, attention at 16x16 and 8x8: the larger benchmark model.
    "rgb32": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # Ho et al.'s CIFAR-10 DDPM U-Net (35.7M parameters): for GPU users.
    "cifar-ddpm": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=None,
        dropout=0.1,
    ),
}
# 16x16 grayscale for the LDS benchmark (same shape of network, fewer positions).
PRESETS["mnist16"] = {**PRESETS["mnist"], "sample_size": 16}

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist-unet"
# The shipped models by name: `--model mnist-latent` anywhere a model folder is taken.
SHIPPED_MODELS = {
    "mnist-unet": DEFAULT_MODEL_DIR,  # the default: unconditional, pixel space, 28x28
    "mnist-latent": DEFAULT_MODEL_DIR.parent / "mnist-latent",  # class-conditional, latent, 16x16
}


@dataclass
class DiffusionModel:
    """A denoiser (`unet`), its noise schedule and, for latent or text-conditional models, the
    frozen autoencoder and text encoder. `channels` and `size` are those of the *images* (what data
    folders are converted to); `latent_shape` is what the denoiser works on (the same for pixel
    models). `encode` maps images to the denoiser's space once (the autoencoder's posterior mean),
    `decode` maps back; `condition` turns a dataset's `Conditions` into the denoiser's `Cond`."""

    unet: torch.nn.Module
    scheduler: object
    autoencoder: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    conditioning: dict = field(default_factory=dict)  # {"class_map": {...}, "null_class": id}
    _text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(self.unet.config.in_channels), int(h), int(w)

    @property
    def channels(self) -> int:
        if self.autoencoder is None:
            return self.latent_shape[0]
        return int(self.autoencoder.config.in_channels)

    @property
    def size(self) -> int:
        return self.latent_shape[1] * frozen.downsampling(self.autoencoder)

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def condition_kind(self) -> str:
        """ "text" (cross-attention), "class" (class embedding) or "none"."""
        if self.text_encoder is not None:
            return "text"
        c = self.unet.config
        if (
            c.get("num_class_embeds")
            or c.get("class_embed_type")
            or type(self.unet).__name__ == "DiTTransformer2DModel"
        ):
            return "class"
        return "none"

    @property
    def class_map(self) -> dict[str, int] | None:
        return self.conditioning.get("class_map")

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale the model recommends (conditioning.json), 1 = none."""
        return float(self.conditioning.get("guidance_scale", 1.0))

    def alphas_cumprod(self, device=None) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def to(self, device) -> DiffusionModel:
        for m in (self.unet, self.autoencoder, self.text_encoder):
            if m is not None:
                m.to(device)
        return self

    def weights_sha256(self) -> str:
        """The denoiser's weights hash; with an autoencoder or text encoder, a hash of all three."""
        parts = [m for m in (self.autoencoder, self.text_encoder) if m is not None]
        if not parts:
            return weights_sha256(self.unet)
        return hashlib.sha256(":".join(weights_sha256(m) for m in [self.unet, *parts]).encode()).hexdigest()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> the denoiser's x0 (the images themselves if pixel)."""
        return frozen.encode(self.autoencoder, images)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The denoiser's x0 -> images in [-1, 1] (pixel models: clamped)."""
        return frozen.decode(self.autoencoder, x0)

    def condition(self, conditions: Conditions | None) -> Cond | None:
        """A dataset's conditions -> the denoiser's (None for an unconditional model)."""
        return frozen.condition(self, conditions)

    def prepare(self, dataset):
        """A dataset in the denoiser's space: images encoded once (latent models), conditions checked."""
        return frozen.prepare(self, dataset)

    def null_condition(self, n: int) -> Cond:
        """The null condition of n examples: the empty prompt, or the recorded null class."""
        return frozen.null_condition(self, n)


def default_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        prediction_type="epsilon",
    )


def build_model(preset: str = "mnist", seed: int = 0, **overrides) -> DiffusionModel:
    """A freshly initialised model from a named preset (`PRESETS`); `seed` fixes the init."""
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[preset], **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**cfg)
    return DiffusionModel(unet, default_scheduler())


def weights_sha256(unet: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and float bytes), in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_dir(path: str | Path | None) -> Path:
    """A model folder: `path`, or a shipped model's name (`SHIPPED_MODELS`) where no such folder
    exists here, or the default model for None."""
    if path is None:
        return DEFAULT_MODEL_DIR
    if str(path) in SHIPPED_MODELS and not Path(path).is_dir():
        return SHIPPED_MODELS[str(path)]
    return Path(path)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a local diffusers model folder (`attribution/pipelines.py`) or a shipped model by name
    (`mnist-unet`, `mnist-latent`); `None` is the default model."""
    p = load_parts(model_dir(path))
    for m in (p.unet, p.autoencoder, p.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    model = DiffusionModel(p.unet, p.scheduler, p.autoencoder, p.text_encoder, p.tokenizer, p.conditioning)
    return model.to(device)


def save_model(model: DiffusionModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write a pipeline-style folder: unet/ (safetensors) and scheduler/ (and vae/ or vqvae/,
    text_encoder/ + tokenizer/, conditioning.json where the model has them), plus `extra` as JSON."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    model.scheduler.save_pretrained(tmp / "scheduler")
    frozen.save_parts(model, tmp)
    if extra is not None:
        (tmp / "training.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
