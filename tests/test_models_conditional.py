"""Bring your own diffusers model (issue 16, bar 1): tiny, randomly initialised models of each
family, built from configs and saved as diffusers saves them (no hub), scored end to end:

- a Stable-Diffusion-style pipeline folder (UNet2DConditionModel + AutoencoderKL + CLIP text
  encoder + CLIPTokenizer + PNDM scheduler), data in a metadata.jsonl with texts;
- a class-conditional UNet2DModel (num_class_embeds), data in class sub-folders with names;
- a v-prediction DDPM pipeline folder whose UNet2DModel is class-conditional, data in a
  metadata.jsonl with labels (and, unconditional, a flat folder).

For each: scores have the right shape and are finite; a query that copies a training image, with
the same condition, finds it in its top 10%; changing the query's condition changes its scores.

The models and folders are built by tests/tiny_families.py (shared with the index's tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from tiny_families import (
    PROMPTS,
    class_data,
    class_unet,
    metadata_data,
    sd_folder,
    vpred_folder,
)
from tiny_families import as_model as _as_model
from tiny_families import random_images as _images

from attribution.data import image_folder
from attribution.errors import DataError, ModelError
from attribution.influence import AttributionConfig, Attributor
from attribution.model import load_model, save_model
from attribution.sample import sample

N_TRAIN = 20  # top 10% = the top 2


def _config() -> AttributionConfig:
    # unprojected (the models are tiny): the test is of the conditional math, not of the sketch
    return AttributionConfig(method="ekfac", draws=32, query_draws=128, curvature_min_rows=400, dim=None)


def _check_family(model, train, copy_row: int, other):
    """The three bar-1 checks for one model and training set; `other` is another condition of the
    copied row (Conditions of one image)."""
    att = Attributor(model, train, _config(), progress=False).fit()
    query = train.subset([copy_row])
    s = att.scores(query.images, cond=query.conditions)
    assert s.shape == (1, len(train)) and torch.isfinite(s).all()
    rank = int((s[0] > s[0, copy_row]).sum())
    assert rank < max(1, len(train) // 10), f"the copied image ranks {rank + 1} of {len(train)}"
    again = att.scores(query.images, cond=query.conditions)
    torch.testing.assert_close(again, s)  # deterministic: a change below is the condition's
    changed = att.scores(query.images, cond=other)
    assert torch.isfinite(changed).all()
    rel = (changed - s).norm() / s.norm()
    assert rel > 1e-2, f"a new condition moved the scores by only {rel:.2e} (relative)"
    return att, s


def test_sd_style_pipeline(tmp_path):
    folder = sd_folder(tmp_path / "sd")
    model = load_model(folder)
    assert model.condition_kind == "text" and model.autoencoder is not None
    assert (model.channels, model.size, model.latent_shape) == (3, 8, (4, 4, 4))
    texts = [PROMPTS[i % 2] for i in range(N_TRAIN)]
    data = metadata_data(tmp_path / "train", _images(N_TRAIN, 8, "RGB", 0), "text", texts)
    train = model.prepare(image_folder(data, model.channels, model.size))
    assert train.images.shape == (N_TRAIN, 4, 4, 4) and train.conditions.texts == texts
    other = type(train.conditions).prompts([PROMPTS[1]])  # row 4 has PROMPTS[0]
    _check_family(model, train, 4, other)


def test_class_conditional_unet(tmp_path):
    model = load_model(save_model(_as_model(class_unet(3)), tmp_path / "model"))
    assert model.condition_kind == "class"
    names = [("cat", "dog", "emu")[i % 3] for i in range(N_TRAIN)]
    data = class_data(tmp_path / "train", _images(N_TRAIN, 8, "L", 1), names)
    train = model.prepare(image_folder(data, 1, 8))
    assert train.meta["class_map"] == {"cat": 0, "dog": 1, "emu": 2}
    copy = train.sources.index(str(data / "dog" / "004.png"))
    assert int(train.conditions.labels[copy]) == 1
    other = type(train.conditions).classes([2], train.conditions.class_map)
    _check_family(model, train, copy, other)


def test_v_prediction_ddpm_folder(tmp_path):
    model = load_model(vpred_folder(tmp_path / "ddpm"))
    assert model.prediction_type == "v_prediction" and model.condition_kind == "class"
    labels = [i % 3 for i in range(N_TRAIN)]
    data = metadata_data(tmp_path / "train", _images(N_TRAIN, 8, "L", 2), "label", labels)
    train = model.prepare(image_folder(data, 1, 8))
    assert train.conditions.labels.tolist() == labels
    other = type(train.conditions).classes([(labels[7] + 1) % 3])
    _check_family(model, train, 7, other)


def test_sampling_through_the_folders_scheduler(tmp_path):
    """PNDM (the folder's class) and DDPM with classifier-free guidance: latents decoded, one
    generator per image (batching does not change a sample), conditions change the samples."""
    model = load_model(sd_folder(tmp_path / "sd"))
    prompts = _prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    for sampler in ("scheduler", "ddpm"):
        kw = dict(sampler=sampler, steps=4, progress=False, conditions=prompts, guidance_scale=3.0)
        s = sample(model, 3, seed=5, batch_size=3, **kw)
        assert s.images.shape == (3, 3, 8, 8) and s.latents.shape == (3, 4, 4, 4)
        torch.testing.assert_close(s.images, model.decode(s.latents))
        single = sample(model, 3, seed=5, batch_size=1, **kw)
        torch.testing.assert_close(single.latents, s.latents, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(s.latents[0], s.latents[1])  # another prompt (and noise)
    other = sample(
        model, 1, seed=5, sampler="ddpm", steps=4, progress=False, conditions=_prompts([PROMPTS[1]])
    )
    same = sample(
        model, 1, seed=5, sampler="ddpm", steps=4, progress=False, conditions=_prompts([PROMPTS[0]])
    )
    assert not torch.allclose(other.latents, same.latents)  # same noise, another prompt
    # a generated query is measured on its latents directly, under its prompt or the null prompt
    texts = [PROMPTS[i % 2] for i in range(6)]
    data = metadata_data(tmp_path / "train", _images(6, 8, "RGB", 3), "text", texts)
    train = model.prepare(image_folder(data, 3, 8))
    att = Attributor(model, train, AttributionConfig(draws=4, query_draws=8, dim=512), progress=False).fit()
    cond_scores = att.scores(same.model_inputs, cond=_prompts([PROMPTS[0]]))
    null_scores = att.scores(same.model_inputs, cond=model.null_condition(1))
    assert torch.isfinite(cond_scores).all() and not torch.allclose(cond_scores, null_scores)


def _prompts(texts):
    from attribution.conditions import Conditions

    return Conditions.prompts(texts)


def test_cli_scores_class_folders(tmp_path, capsys):
    from explorer.cli import main

    folder = save_model(_as_model(class_unet(2)), tmp_path / "model")
    names = ["ant", "bee"] * 4
    class_data(tmp_path / "train", _images(8, 8, "L", 4), names)
    class_data(tmp_path / "q", _images(2, 8, "L", 5), ["bee", "ant"])  # bee/000, ant/001
    out = tmp_path / "s.npy"
    args = [
        "scores",
        "--model",
        str(folder),
        "--data",
        str(tmp_path / "train"),
        "--queries",
        str(tmp_path / "q"),
    ]
    args += ["--out", str(out), "--method", "kfac", "--draws", "4", "--dim", "0"]
    assert main(args) == 0
    s = np.load(out)
    model = load_model(folder)
    train = image_folder(tmp_path / "train", 1, 8)
    q = image_folder(tmp_path / "q", 1, 8, class_map=train.conditions.class_map)
    assert q.conditions.labels.tolist() == [0, 1]  # rows by relative path: ant/001.png, bee/000.png
    att = Attributor(model, train, AttributionConfig(method="kfac", draws=4, dim=None), progress=False).fit()
    np.testing.assert_allclose(s, att.scores(q.images, cond=q.conditions).numpy(), rtol=1e-4, atol=1e-8)
    # no null class recorded: the unconditional measurement is refused with a message
    assert main(args + ["--null-condition"]) == 2
    assert "no null class" in capsys.readouterr().err


def test_refusals_name_what_is_supported(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": ')
    with pytest.raises(ModelError, match="not a readable JSON file"):
        load_model(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        load_model(bad)
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": ["transformers", "X"]})
    )
    with pytest.raises(
        ModelError, match="'text_encoder_2'.*supported: a UNet2DModel, UNet2DConditionModel or DiT"
    ):
        load_model(sdxl)
    other = tmp_path / "sd3" / "transformer"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ModelError, match="holds a SD3Transformer2DModel, which is not supported"):
        load_model(other.parent)
    folder = vpred_folder(tmp_path / "v")
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "prediction_type": "flow"})
    )
    with pytest.raises(ModelError, match="prediction_type 'flow'; supported: epsilon, v_prediction, sample"):
        load_model(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "_class_name": "LCMScheduler"})
    )
    with pytest.raises(ModelError, match="scheduler 'LCMScheduler' is not supported"):
        load_model(folder)
    # a class-conditional model refuses unconditional (flat) data, naming the layouts that carry classes
    model = _as_model(class_unet(2))
    with pytest.raises(DataError, match="class subfolders or metadata.jsonl"):
        model.prepare(image_folder(_flat(tmp_path / "flat"), 1, 8))


def _flat(path: Path) -> Path:
    path.mkdir()
    for i, im in enumerate(_images(2, 8, "L", 6)):
        im.save(path / f"{i}.png")
    return path


def _implied_eps(prediction: str, f: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """ε implied by an output f of the parameterisation at x_t (independent of measurements.py)."""
    if prediction == "v_prediction":
        return a.sqrt() * f + (1 - a).sqrt() * x
    if prediction == "sample":
        return (x - a.sqrt() * f) / (1 - a).sqrt()
    return f


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_targets_and_elbo_in_every_parameterisation(prediction):
    from attribution.measurements import Measurement, row_values

    acp = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for name in ("loss", "elbo"):
        rows = Measurement(name).rows(x0, [3, 4], 6, 0, acp, prediction=prediction)
        ref = Measurement(name).rows(x0, [3, 4], 6, 0, acp)  # ε-form rows with the same draws
        a = acp[rows.t].view(-1, 1, 1, 1)
        torch.testing.assert_close(rows.x, ref.x)
        # the target is the output that implies the drawn noise
        torch.testing.assert_close(_implied_eps(prediction, rows.y, rows.x, a), ref.y, rtol=1e-4, atol=1e-4)
        if name == "elbo":  # the ELBO is one function of the model, whatever its parameterisation
            f = torch.randn(rows.x.shape, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(
                row_values(f, rows),
                row_values(_implied_eps(prediction, f, rows.x, a), ref),
                rtol=1e-4,
                atol=1e-6,
            )
