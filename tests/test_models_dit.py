"""A class-conditional DiT (`DiTTransformer2DModel`) pipeline folder, built from a config (no hub):
the capture of a layer called twice in one forward (DiT's final layer calls block 0's
timestep-and-class embedding again) against autograd, and issue 16's bar-1 checks (finite scores
of the right shape, a copied training image in its top 10%, a new condition moves the scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from test_models_conditional import N_TRAIN, _check_family
from tiny_families import class_data
from tiny_families import random_images as _images

from attribution.capture import example_gradients, forward, tracked_layers
from attribution.conditions import Cond, denoise
from attribution.data import image_folder
from attribution.errors import ModelError
from attribution.model import load_model

SHARED = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"


def _dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,  # learned variance, as DiT ships: the engine uses the ε half
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
        norm_num_groups=1,
    )


def dit_folder(path: Path) -> Path:
    """A DiTPipeline-style folder: transformer/, scheduler/ and model_index.json."""
    _dit().save_pretrained(path / "transformer", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, clip_sample=True).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def test_a_layer_called_twice_contributes_both_calls():
    """The capture's per-example gradient of block 0's embedding (called again by the final
    layer) equals autograd's parameter gradient of each example's loss."""
    dit = _dit().eval()
    layers = tracked_layers(dit)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990])
    cond, target = Cond(labels=torch.tensor([0, 2, 1])), torch.randn(3, 1, 8, 8)
    calls = []
    hook = layers[SHARED].register_forward_hook(lambda *_: calls.append(1))
    for p in dit.parameters():
        p.requires_grad_(True)
    out, rec = forward(dit, layers, x, t, cond)
    hook.remove()
    assert len(calls) == 2 and rec.inputs[SHARED].shape[1] == 2  # two calls: two positions
    cot = 2 * (out.detach() - target) / out[0].numel()  # d/d out of each example's mean squared error
    g = dict(rec.cotangents(out, cot))
    for name in (SHARED, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table", "proj_out_2"):
        m = layers[name]
        ours = example_gradients(m, rec.inputs[name].detach(), g[name], 3)
        for i in range(3):
            dit.zero_grad()
            loss = (
                (denoise(dit, x[i : i + 1], t[i : i + 1], cond[i : i + 1]) - target[i : i + 1]).pow(2).mean()
            )
            loss.backward()
            if isinstance(m, torch.nn.Embedding):
                want = m.weight.grad.T
            else:
                want = torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1)
            torch.testing.assert_close(ours[i], want, rtol=1e-4, atol=1e-7)


def test_dit_pipeline_folder(tmp_path):
    model = load_model(dit_folder(tmp_path / "dit"))
    assert model.condition_kind == "class" and model.conditioning["null_class"] == 3
    assert model.latent_shape == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    assert denoise(model.unet, x, torch.tensor([1, 2]), Cond(labels=torch.tensor([0, 1]))).shape == x.shape
    names = [("cat", "dog", "emu")[i % 3] for i in range(N_TRAIN)]
    data = class_data(tmp_path / "train", _images(N_TRAIN, 8, "L", 3), names)
    train = model.prepare(image_folder(data, 1, 8))
    _fit(
        model, train.images, train.conditions.labels
    )  # attribution is about a model that has learnt its data
    copy = train.sources.index(str(data / "dog" / "004.png"))
    other = type(train.conditions).classes([2], train.conditions.class_map)
    _check_family(model, train, copy, other)


def _fit(model, images: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> None:
    """A few hundred full-batch steps of the conditional ε loss (seeded), in place."""
    g = torch.Generator().manual_seed(0)
    acp = model.alphas_cumprod()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=2e-3)
    model.unet.train().requires_grad_(True)
    for _ in range(steps):
        t = torch.randint(0, 1000, (len(images),), generator=g)
        eps = torch.randn(images.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        loss = (
            (denoise(model.unet, a.sqrt() * images + (1 - a).sqrt() * eps, t, Cond(labels=labels)) - eps)
            .pow(2)
            .mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.unet.eval().requires_grad_(False)


def test_a_convolution_called_twice_is_refused():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, t):
            return self.conv(self.conv(x))

    with pytest.raises(RuntimeError, match="called twice"):
        forward(Twice(), {"conv": conv}, torch.randn(1, 1, 4, 4), torch.zeros(1))


def test_a_pipeline_with_both_unet_and_transformer_is_refused(tmp_path):
    folder = dit_folder(tmp_path / "dit")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ModelError, match="both unet and transformer"):
        load_model(folder)
