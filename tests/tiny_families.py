"""Tiny, randomly initialised diffusers models of each family, built from configs and saved as
diffusers saves them (no hub), and image folders in each layout: shared by the conditional-model
tests (tests/test_models_conditional.py, tests/test_index_conditional.py).

The tokenizer is a real CLIPTokenizer over a character vocabulary written here (vocab.json with
the letters and their end-of-word forms, an empty merges.txt): every prompt tokenises to its
characters, so different prompts give different token ids, with nothing downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image

from attribution.model import PRESETS

PROMPTS = ("a red cat", "a blue dog")


def tiny_tokenizer(folder: Path, max_length: int = 12):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, width: int = 16, max_length: int = 12):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def tiny_cond_unet(**extra) -> UNet2DConditionModel:
    """A ~20k-parameter UNet2DConditionModel on 4×4×4 latents with cross-attention (width 16)."""
    return UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        **extra,
    )


def sd_folder(path: Path) -> Path:
    torch.manual_seed(0)
    tok = tiny_tokenizer(path.parent / "vocab")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=8,
    )
    # the latent scale as Stable Diffusion chose its 0.18215: 1 / std of the posterior means
    with torch.no_grad():
        z = vae.encode(torch.rand(32, 3, 8, 8) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    sched = PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(len(tok)),
        tokenizer=tok,
        unet=tiny_cond_unet(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def class_unet(n_classes: int, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**PRESETS["tiny"], num_class_embeds=n_classes)


def vpred_folder(path: Path) -> Path:
    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="linear")
    DDPMPipeline(unet=class_unet(3, seed=1), scheduler=sched).save_pretrained(path, safe_serialization=True)
    return path


def random_images(n: int, size: int, mode: str, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]


def metadata_data(path: Path, images, key: str, values) -> Path:
    path.mkdir(parents=True)
    lines = []
    for i, (im, v) in enumerate(zip(images, values)):
        name = f"img_{i:03d}.png"
        im.save(path / name)
        lines.append(json.dumps({"file_name": name, key: v}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


def class_data(path: Path, images, names) -> Path:
    for i, (im, c) in enumerate(zip(images, names)):
        (path / c).mkdir(parents=True, exist_ok=True)
        im.save(path / c / f"{i:03d}.png")
    return path


def as_model(unet, scheduler=None):
    """A DiffusionModel of a denoiser (default: DDPM, linear betas, T = 1000)."""
    from attribution.model import DiffusionModel, default_scheduler

    return DiffusionModel(unet, scheduler or default_scheduler())
