"""Diffusion models: diffusers `UNet2DModel` + `DDPMScheduler`, from named presets or local folders.

A model folder is either a `UNet2DModel.save_pretrained` folder (config.json + safetensors) or a
pipeline folder with `unet/` and optional `scheduler/`. Without a scheduler config the scheduler
is DDPM with linear betas and T = 1000. Weights are only ever read from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from attribution.errors import ModelError  # noqa: F401  (re-exported)

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
    # 16x16 grayscale for the LDS benchmark (same shape of network, fewer positions).
    "mnist16": dict(
        sample_size=16,
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

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist-unet"


@dataclass
class DiffusionModel:
    """An ε-prediction U-Net and its noise schedule."""

    unet: UNet2DModel
    scheduler: DDPMScheduler

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def size(self) -> int:
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self, device=None) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def to(self, device) -> DiffusionModel:
        self.unet.to(device)
        return self

    def weights_sha256(self) -> str:
        return weights_sha256(self.unet)


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


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a local diffusers U-Net (bare or pipeline folder); `None` is the default model."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (unet_dir / "config.json").is_file():
        raise ModelError(
            f"{path}: no config.json here or in unet/ (expected a diffusers "
            "UNet2DModel folder or a pipeline folder)"
        )
    cfg = json.loads((unet_dir / "config.json").read_text())
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelError(f"{unet_dir}: holds a {cfg['_class_name']}, only UNet2DModel is supported")
    if not any(unet_dir.glob("*.safetensors")):
        raise ModelError(f"{unet_dir}: no .safetensors weights (pickled .bin weights are refused)")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
    except Exception as e:  # diffusers raises many types; the user needs the path and the reason
        raise ModelError(f"{unet_dir}: could not load the U-Net ({e})") from None
    sched_dir = path / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    else:
        scheduler = default_scheduler()
    pred = scheduler.config.prediction_type
    if pred != "epsilon":
        raise ModelError(f"{path}: prediction_type {pred!r}; only epsilon-prediction is supported")
    unet.eval().requires_grad_(False)
    return DiffusionModel(unet.to(device), scheduler)


def save_model(model: DiffusionModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write a pipeline-style folder: unet/ (safetensors) and scheduler/, plus `extra` as JSON."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    model.scheduler.save_pretrained(tmp / "scheduler")
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
