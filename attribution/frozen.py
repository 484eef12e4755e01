"""The frozen parts around a denoiser: the autoencoder (images <-> latents) and the text encoder
(prompts -> encoder states), and conditions in the denoiser's terms.

Nothing here is attributed: curvature and gradients cover the denoiser only (the autoencoder and
the text encoder are frozen, as in the latent experiments of the paper this follows).

Encoding takes the autoencoder's **posterior mean**, once per image, scaled as the pipelines scale
latents (`(z − shift_factor) · scaling_factor`; a VQ model's pre-quantisation latents times its
scaling factor, which its pipeline divides out before decoding). Why the mean and not a sample per
draw: (1) a training image then has one fixed latent, so its draws are (t, ε) only and its loss is
a deterministic function of (seed, image), as for pixel models; a posterior sample per draw would
add a third source of Monte-Carlo noise to every feature, for the same estimand up to the tiny
posterior spread; (2) the posterior spread of a KL autoencoder is small next to the forward-process
noise at every timestep that carries weight (Stable Diffusion's posterior std is ≈ 1e-2 of the
latent scale), so the mean's loss differs from the expected loss over samples by a second-order
term; (3) an image is encoded once, not once per draw: the encoder is as costly as the denoiser.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from attribution.conditions import Cond, Conditions
from attribution.errors import DataError, ModelError

BATCH = 16


def downsampling(ae) -> int:
    """Image size / latent size of an autoencoder (1 for none)."""
    return 1 if ae is None else 2 ** (len(ae.config.block_out_channels) - 1)


def _scale(ae) -> tuple[float, float]:
    shift = ae.config.get("shift_factor", None) if isinstance(ae, AutoencoderKL) else None
    return float(ae.config.get("scaling_factor", 1.0) or 1.0), float(shift or 0.0)


@torch.no_grad()
def encode(ae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> x0 of the denoiser: scaled posterior means (pixel: as is)."""
    if ae is None:
        return images
    dev = next(ae.parameters()).device
    scale, shift = _scale(ae)
    out = []
    for i in range(0, images.shape[0], BATCH):
        x = images[i : i + BATCH].to(dev, next(ae.parameters()).dtype)
        enc = ae.encode(x)
        z = enc.latent_dist.mean if isinstance(ae, AutoencoderKL) else enc.latents
        out.append(((z - shift) * scale).float().to(images.device))
    return torch.cat(out)


@torch.no_grad()
def decode(ae, x0: torch.Tensor) -> torch.Tensor:
    """The denoiser's x0 -> images in [-1, 1] (a VQ model quantises first, as its pipeline does)."""
    if ae is None:
        return x0.clamp(-1, 1)
    dev = next(ae.parameters()).device
    scale, shift = _scale(ae)
    out = []
    for i in range(0, x0.shape[0], BATCH):
        z = x0[i : i + BATCH].to(dev, next(ae.parameters()).dtype) / scale + shift
        out.append(ae.decode(z).sample.float().clamp(-1, 1).to(x0.device))
    return torch.cat(out)


@torch.no_grad()
def text_cond(model, texts: list[str]) -> Cond:
    """Prompts -> Cond: the encoder states of the distinct prompts (cached on the model, each
    prompt encoded once) and one index per prompt. Tokenised as Stable Diffusion does: padded
    and truncated to the tokenizer's model_max_length."""
    tok, enc = model.tokenizer, model.text_encoder
    distinct = sorted(set(texts))
    todo = [t for t in distinct if t not in model._text_cache]
    if todo:
        ids = tok(
            todo, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        states = enc(ids.to(next(enc.parameters()).device))[0].float()
        for t, s in zip(todo, states):
            model._text_cache[t] = s
    table = torch.stack([model._text_cache[t] for t in distinct])
    pos = {t: i for i, t in enumerate(distinct)}
    return Cond(table=table, ids=torch.tensor([pos[t] for t in texts], dtype=torch.long))


def condition(model, conditions: Conditions | None) -> Cond | None:
    """A dataset's conditions -> the denoiser's. A text model takes class conditions as prompts
    (the class names); an unconditional model ignores conditions."""
    kind = model.condition_kind
    if kind == "none":
        return None
    if conditions is None:
        how = (
            "class subfolders or metadata.jsonl with label" if kind == "class" else "metadata.jsonl with text"
        )
        raise DataError(f"the model is {kind}-conditional: the images need a {kind} each ({how})")
    if kind == "text":
        return text_cond(model, conditions.texts if conditions.kind == "text" else conditions.class_names())
    if conditions.kind != "class":
        raise DataError("the model is class-conditional but the images carry texts (metadata.jsonl text)")
    labels = conditions.labels.clone()
    n = model.unet.config.get("num_class_embeds") or model.unet.config.get("num_embeds_ada_norm")
    if n and (labels.min() < 0 or labels.max() >= n):
        raise DataError(f"class ids must be in 0..{n - 1} for this model, found {int(labels.max())}")
    return Cond(labels=labels)


def null_condition(model, n: int) -> Cond | None:
    """n null conditions: the empty prompt (text), the recorded null class (class), None (none)."""
    kind = model.condition_kind
    if kind == "text":
        return text_cond(model, [""] * n)
    if kind == "none":
        return None
    null = model.conditioning.get("null_class")
    if null is None:
        raise ModelError(
            "this class-conditional model records no null class (conditioning.json: null_class), "
            "so it has no unconditional (null-condition) measurement"
        )
    return Cond(labels=torch.full((n,), int(null), dtype=torch.long))


def save_parts(model, folder: Path) -> None:
    """The frozen parts and the conditioning record into a model folder (none for pixel models)."""
    import json

    if model.autoencoder is not None:
        sub = "vae" if isinstance(model.autoencoder, AutoencoderKL) else "vqvae"
        model.autoencoder.save_pretrained(folder / sub, safe_serialization=True)
    if model.text_encoder is not None:
        model.text_encoder.save_pretrained(folder / "text_encoder")
        model.tokenizer.save_pretrained(folder / "tokenizer")
    if model.conditioning:
        (folder / "conditioning.json").write_text(json.dumps(model.conditioning, indent=2, sort_keys=True))


def prepare(model, dataset):
    """A dataset in the denoiser's terms: its images encoded once (latent models; pixel models keep
    them), its conditions checked against the model (an unconditional model ignores them)."""
    from dataclasses import replace

    from attribution.console import say

    if dataset.conditions is not None and model.condition_kind == "none":
        say(
            f"{dataset.name}: the model is unconditional; the folder's {dataset.conditions.kind} conditions are not used"
        )
    elif model.condition_kind != "none":
        condition(model, dataset.conditions)  # refuses missing or mismatched conditions now
    if model.autoencoder is None:
        return dataset
    return replace(
        dataset, images=encode(model.autoencoder, dataset.images), meta={**dataset.meta, "encoded": True}
    )
