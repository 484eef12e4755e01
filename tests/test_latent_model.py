"""The second shipped model, `assets/mnist-latent` (a class-conditional latent diffusion model on the
embedded MNIST, attribution/train_latent.py): it loads by name as a latent, class-conditional
pipeline, samples the requested digits, a copy of a training image finds itself among the top 10%
of its scores under its own class; and its training recipe resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attribution.conditions import Cond, Conditions
from attribution.data import mnist
from attribution.influence import AttributionConfig, Attributor
from attribution.model import SHIPPED_MODELS, load_model
from attribution.sample import sample
from attribution.train_latent import NULL_CLASS, LatentConfig, train_latent_model

FOLDER = SHIPPED_MODELS["mnist-latent"]
N_TRAIN = 20  # top 10% = the top 2


@pytest.fixture(scope="module")
def model():
    return load_model("mnist-latent")


def test_the_shipped_folder_is_a_class_conditional_latent_pipeline(model):
    comps = json.loads((FOLDER / "model_index.json").read_text())
    assert {k for k in comps if not k.startswith("_")} == {"unet", "vae", "scheduler"}
    assert model.condition_kind == "class" and model.autoencoder is not None
    assert (model.channels, model.size, model.latent_shape) == (1, 16, (2, 8, 8))
    assert model.class_map == {str(d): d for d in range(10)}
    assert model.conditioning["null_class"] == NULL_CLASS == model.unet.config.num_class_embeds - 1
    assert model.prediction_type == "epsilon" and not model.scheduler.config.clip_sample
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size < 8_000_000, f"the shipped folder holds {size / 1e6:.1f} MB"
    info = json.loads((FOLDER / "training.json").read_text())
    assert info["weights_sha256"] == model.weights_sha256()


def test_it_samples_the_requested_digits(model):
    digits = torch.tensor([3, 7])
    s = sample(model, 2, seed=0, sampler="scheduler", steps=20, conditions=Cond(labels=digits),
               guidance_scale=2.0, progress=False)  # fmt: skip
    assert s.images.shape == (2, 1, 16, 16) and s.latents.shape == (2, 2, 8, 8)
    assert torch.isfinite(s.images).all() and s.images.min() >= -1 and s.images.max() <= 1
    other = sample(model, 2, seed=0, sampler="scheduler", steps=20, conditions=Cond(labels=digits.flip(0)),
                   guidance_scale=2.0, progress=False)  # fmt: skip
    assert (other.images - s.images).abs().mean() > 0.05  # the class changes the sample
    clf = _classifier()
    if clf is not None:  # the benchmark's cached classifier (benchmarks/latent_quality.py)
        from benchmarks.model_quality import predict_proba

        assert predict_proba(clf, s.images).argmax(1).tolist() == digits.tolist()


def _classifier():
    from benchmarks.latent_quality import CACHE, EPOCHS
    from benchmarks.model_quality import cache_key, load_classifier, split

    train_ds, holdout = split(mnist(size=16), seed=0)
    return load_classifier(CACHE, cache_key(train_ds, holdout, EPOCHS))


@pytest.mark.slow  # ≈ 11 s: an EK-FAC fit on 20 images
def test_a_copy_of_a_training_image_is_among_its_top_proponents(model):
    ds = mnist(size=16, n=N_TRAIN)
    ds.conditions = Conditions.classes(ds.labels, model.class_map)
    train = model.prepare(ds)
    cfg = AttributionConfig(method="ekfac", draws=16, query_draws=64, curvature_min_rows=320, dim=None)
    att = Attributor(model, train, cfg, progress=False).fit()
    rows = [3, 11]
    copy = model.encode(mnist(size=16, n=N_TRAIN).images[rows])  # encoded again, as an upload is
    s = att.scores(copy, cond=train.conditions.subset(rows))
    assert s.shape == (2, N_TRAIN) and torch.isfinite(s).all()
    for q, r in enumerate(rows):
        rank = int((s[q] > s[q, r]).sum())
        assert rank < N_TRAIN // 10, f"training image {r} ranks {rank + 1} of {N_TRAIN} for its copy"


def test_training_resumes_bit_for_bit(tmp_path: Path):
    cfg = LatentConfig(vae_steps=4, unet_steps=4, vae_batch_size=16, unet_batch_size=16, checkpoint_every=2)
    full = train_latent_model(cfg, tmp_path / "full", n=32, progress=False)
    assert (
        train_latent_model(cfg, tmp_path / "cut", n=32, progress=False, stop_after=3) is None
    )  # autoencoder
    assert train_latent_model(cfg, tmp_path / "cut", n=32, progress=False, stop_after=3) is None  # denoiser
    out = tmp_path / "model"
    resumed = train_latent_model(cfg, tmp_path / "cut", out=out, n=32, progress=False)
    assert resumed.weights_sha256() == full.weights_sha256()
    assert load_model(out).weights_sha256() == full.weights_sha256()


def test_it_has_its_own_default_index():
    from explorer.build_job import DEFAULT_INDEX
    from explorer.launch import default_index

    assert (
        default_index("mnist-latent")
        == default_index(str(FOLDER))
        == DEFAULT_INDEX.with_name("mnist-latent-ekfac")
    )
    assert default_index(None) == default_index("mnist-unet") == DEFAULT_INDEX


def test_the_cli_samples_it_by_name_under_a_class(tmp_path, capsys):
    from explorer.cli import main

    out = tmp_path / "samples"
    args = [
        "sample",
        "--model",
        "mnist-latent",
        "--n",
        "2",
        "--steps",
        "4",
        "--guidance",
        "2",
        "--out",
        str(out),
    ]
    assert main([*args, "--condition", "7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_00000.png", "sample_00001.png"]
    assert main([*args, "--condition", "seven"]) == 2
    assert "error: unknown class 'seven': one of 0, 1, 2" in capsys.readouterr().err
