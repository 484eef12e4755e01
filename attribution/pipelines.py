"""Local diffusers folders -> the parts of a `DiffusionModel`, with no hub access.

Accepted folders (weights from safetensors only, every config read as JSON):

- a bare denoiser folder (config.json + safetensors), or a `unet/` (+ `scheduler/`) pair;
- a pipeline folder (`model_index.json`) whose components are a denoiser `unet`, a `scheduler`,
  optionally an autoencoder `vae` (AutoencoderKL) or `vqvae` (VQModel), and optionally a
  `text_encoder` (CLIPTextModel) with its `tokenizer` (CLIPTokenizer): DDPM/DDIM pipelines,
  latent (LDM) pipelines and Stable-Diffusion-style pipelines. Safety checkers and feature
  extractors are not needed and not loaded.

Denoisers: `UNet2DModel` (unconditional, or class-conditional through `num_class_embeds` or
`class_embed_type="timestep"`), `UNet2DConditionModel` (text, through cross-attention) and
`DiTTransformer2DModel` (class-conditional DiT, adaLN-Zero; a `transformer` component; its null
class is `num_embeds_ada_norm` unless conditioning.json says otherwise; a learned-variance
output's ε half is what the engine uses, as DiTPipeline does).
`prediction_type` epsilon, v_prediction or sample. Anything else is refused with a `ModelError`
that names what is supported. `conditioning.json` (optional, in the model folder) records the
class map {"class_map": {name: id}} and a null class id {"null_class": id} for class models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)

from attribution.errors import ModelError

DENOISERS = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
}
DENOISER_DIRS = ("unet", "transformer")
AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
SUPPORTED = (
    "supported: a UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel folder, or a pipeline "
    "folder with unet/ (or a DiT's transformer/), scheduler/, optionally vae/ (AutoencoderKL) or "
    "vqvae/ (VQModel) and text_encoder/ (CLIPTextModel) + tokenizer/ (CLIPTokenizer); "
    "prediction_type epsilon, v_prediction or sample"
)


@dataclass
class Parts:
    """What a folder holds: the denoiser, its scheduler and the frozen helpers."""

    unet: torch.nn.Module
    scheduler: object
    autoencoder: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    conditioning: dict = field(default_factory=dict)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; ModelError (naming the file) if it is unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: could not be loaded: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def reason(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _class_name(path: Path, default: str | None = None) -> str:
    cfg = read_json(path)
    name = cfg.get("_class_name", default)
    if name is None and isinstance(cfg.get("architectures"), list) and cfg["architectures"]:
        name = cfg["architectures"][0]  # transformers configs
    if not isinstance(name, str):
        raise ModelError(f"{path}: no model class named (_class_name); {SUPPORTED}")
    return name


def _weights(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder}: no .safetensors weights (pickled .bin weights are refused)")


def _from_pretrained(cls, folder: Path, what: str, **kw):
    _weights(folder)
    try:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kw)
    except Exception as e:  # diffusers / transformers raise many types; the user needs the reason
        raise ModelError(f"{folder}: could not load the {what} ({reason(e)})") from None


def load_denoiser(folder: Path) -> torch.nn.Module:
    name = _class_name(folder / "config.json", "UNet2DModel")
    if name not in DENOISERS:
        raise ModelError(f"{folder}: holds a {name}, which is not supported; {SUPPORTED}")
    unet = _from_pretrained(
        DENOISERS[name], folder, f"{'transformer' if 'Transformer' in name else 'U-Net'} ({name})"
    )
    check_denoiser(unet, folder)
    return unet


def check_denoiser(unet: torch.nn.Module, where) -> None:
    """Refuse the denoiser options the engine cannot condition or attribute."""
    c = unet.config
    if isinstance(unet, UNet2DModel) and c.get("class_embed_type") not in (None, "timestep"):
        raise ModelError(
            f"{where}: class_embed_type {c.class_embed_type!r} is not supported (class ids through "
            "num_class_embeds or class_embed_type 'timestep' are)"
        )
    if isinstance(unet, UNet2DConditionModel):
        extra = [k for k in ("addition_embed_type", "encoder_hid_dim_type", "class_embed_type") if c.get(k)]
        extra += ["num_class_embeds"] if c.get("num_class_embeds") else []
        if extra:
            raise ModelError(
                f"{where}: a UNet2DConditionModel with {', '.join(extra)} is not supported (text "
                "conditioning through cross-attention only, as in Stable Diffusion 1.x/2.x)"
            )


def load_scheduler(folder: Path):
    """The folder's scheduler (an allow-listed diffusers class) or DDPM linear, T = 1000."""
    cfg_path = folder / "scheduler_config.json"
    if not cfg_path.is_file():
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            clip_sample=True,
            prediction_type="epsilon",
        )
    cfg = read_json(cfg_path)
    name = cfg.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ModelError(f"{cfg_path}: scheduler {name!r} is not supported; one of {', '.join(SCHEDULERS)}")
    try:
        sched = getattr(diffusers, name).from_config(cfg)
    except Exception as e:
        raise ModelError(f"{cfg_path}: the {name} could not be loaded ({reason(e)})") from None
    pred = sched.config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ModelError(f"{cfg_path}: prediction_type {pred!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return sched


def _components(path: Path) -> dict[str, str]:
    """model_index.json -> {component: class name} of the components that are present."""
    index = read_json(path / "model_index.json")
    out = {}
    for key, val in index.items():
        if key.startswith("_") or not isinstance(val, list) or (val and val[-1] is None):
            continue  # private keys, pipeline options (requires_safety_checker), absent components
        if not (len(val) == 2 and all(isinstance(v, str) for v in val)):
            raise ModelError(f"{path / 'model_index.json'}: component {key!r} is not [library, class]")
        out[key] = val[1]
    return out


def check_components(path: Path, comps: dict[str, str]) -> None:
    """Refuse a pipeline whose components the engine does not know (an SDXL `text_encoder_2`, …)."""
    known = {*DENOISER_DIRS, "scheduler", "vae", "vqvae", "text_encoder", "tokenizer", *IGNORED}
    unknown = sorted(set(comps) - known)
    if sum(d in comps for d in DENOISER_DIRS) != 1 or unknown:
        what = (
            f"component {unknown[0]!r} ({comps[unknown[0]]})"
            if unknown
            else "no unet (or both unet and transformer)"
        )
        raise ModelError(f"{path}: a pipeline with {what} is not supported; {SUPPORTED}")
    if "vae" in comps and "vqvae" in comps:
        raise ModelError(f"{path}: both vae/ and vqvae/; a latent pipeline has one autoencoder")
    if ("text_encoder" in comps) != ("tokenizer" in comps):
        raise ModelError(f"{path}: a text encoder needs its tokenizer (text_encoder/ and tokenizer/)")
    if comps.get("text_encoder", TEXT_ENCODERS[0]) not in TEXT_ENCODERS:
        raise ModelError(f"{path}: text encoder {comps['text_encoder']} is not supported; {SUPPORTED}")
    if comps.get("tokenizer", TOKENIZERS[0]) not in TOKENIZERS:
        raise ModelError(f"{path}: tokenizer {comps['tokenizer']} is not supported; {SUPPORTED}")


def load_text(path: Path):
    """(CLIPTextModel, CLIPTokenizer) from text_encoder/ and tokenizer/ (JSON and safetensors)."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError(
            f"{path}: a text encoder needs the transformers package (pip install transformers)"
        ) from None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    name = _class_name(path / "text_encoder" / "config.json")
    if name not in TEXT_ENCODERS:
        raise ModelError(f"{path / 'text_encoder'}: {name} is not supported; {SUPPORTED}")
    enc = _from_pretrained(CLIPTextModel, path / "text_encoder", "text encoder")
    try:
        tok = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path / 'tokenizer'}: could not load the tokenizer ({reason(e)})") from None
    return enc, tok


def load_parts(path: Path) -> Parts:
    """Every part of the model folder `path` (see the module docstring)."""
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    comps = _components(path) if (path / "model_index.json").is_file() else {}
    if comps:
        check_components(path, comps)
    sub = next((d for d in DENOISER_DIRS if (path / d / "config.json").is_file()), None)
    unet_dir = path / sub if sub else path
    if not (unet_dir / "config.json").is_file():
        raise ModelError(
            f"{path}: no config.json here or in unet/ or transformer/ (expected a diffusers denoiser folder or a "
            f"pipeline folder); {SUPPORTED}"
        )
    unet = load_denoiser(unet_dir)
    parts = Parts(unet, load_scheduler(path / "scheduler"))
    ae = next((k for k in ("vae", "vqvae") if (path / k / "config.json").is_file()), None)
    if ae is not None:
        name = _class_name(path / ae / "config.json")
        if name not in AUTOENCODERS:
            raise ModelError(f"{path / ae}: autoencoder {name} is not supported; {SUPPORTED}")
        parts.autoencoder = _from_pretrained(AUTOENCODERS[name], path / ae, name)
    if (path / "text_encoder" / "config.json").is_file() or "text_encoder" in comps:
        parts.text_encoder, parts.tokenizer = load_text(path)
    if (path / "conditioning.json").is_file():
        parts.conditioning = read_json(path / "conditioning.json")
    if isinstance(unet, DiTTransformer2DModel):  # LabelEmbedding's extra row is the null class
        parts.conditioning.setdefault("null_class", int(unet.config.num_embeds_ada_norm))
    check_fit(path, parts)
    return parts


def check_fit(path: Path, p: Parts) -> None:
    """The parts must fit together: text encoder for a cross-attention U-Net, latent channels."""
    cross = isinstance(p.unet, UNet2DConditionModel)
    if cross and p.text_encoder is None:
        raise ModelError(f"{path}: a UNet2DConditionModel needs text_encoder/ and tokenizer/")
    if not cross and p.text_encoder is not None:
        raise ModelError(f"{path}: a text encoder with a {type(p.unet).__name__} (no cross-attention)")
    if cross and p.text_encoder.config.hidden_size != p.unet.config.cross_attention_dim:
        raise ModelError(
            f"{path}: text encoder width {p.text_encoder.config.hidden_size} != the U-Net's "
            f"cross_attention_dim {p.unet.config.cross_attention_dim}"
        )
    if p.autoencoder is not None:
        latent = p.autoencoder.config.latent_channels
        if latent != p.unet.config.in_channels:
            raise ModelError(
                f"{path}: autoencoder latents have {latent} channels, the U-Net takes {p.unet.config.in_channels}"
            )
    cmap = p.conditioning.get("class_map")
    if cmap is not None and not (
        isinstance(cmap, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in cmap.values())
    ):
        raise ModelError(f"{path / 'conditioning.json'}: class_map must map names to integer ids")
