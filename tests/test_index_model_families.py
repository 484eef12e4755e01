"""Which model families an index handles (issue 16): UNet2DModel / UNet2DConditionModel denoisers,
pixel or latent, unconditional, class- or text-conditional (tests/test_index_conditional.py builds
and queries them), and class-conditional DiTs. What it refuses, it refuses in one plain line
before anything is written: another denoiser, and a conditional model given images without
conditions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from attribution.data import load_dataset
from attribution.errors import DataError, ModelError
from attribution.influence import AttributionConfig
from attribution.model import PRESETS, DiffusionModel, build_model, default_scheduler
from index.build import build_index
from index.conditions import family_settings, item_conditions, query_condition, training_data
from index.store import load

CFG = AttributionConfig(method="ekfac", dim=64, draws=4, curvature_draws=1)


def _class_model(n_classes: int = 10) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(UNet2DModel(**PRESETS["tiny"], num_class_embeds=n_classes), default_scheduler())


def test_a_dit_indexes_and_answers_under_its_class(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=1,
        out_channels=2,  # learned variance: the eps half is used
        num_layers=1,
        sample_size=8,
        patch_size=2,
        norm_num_groups=1,
        num_embeds_ada_norm=10,
    )
    model = DiffusionModel(dit, default_scheduler(), conditioning={"null_class": 10})
    data = training_data("mnist", model, n=16)  # the digits' labels are their classes
    idx = load(build_index(model, data, tmp_path / "idx", CFG, shard_size=16, progress=False), model)
    q = data.images[3]
    res = idx.query(q, k=4, cond=query_condition(idx.manifest, "7"))
    other = idx.query(q, k=4, cond=query_condition(idx.manifest, "1"))
    assert len(res.proponents) == 4 and all(np.isfinite(h.score) for h in res.proponents)
    assert [h.score for h in res.proponents] != [h.score for h in other.proponents]


def test_another_denoiser_is_refused_before_anything_is_written(tmp_path):
    model = DiffusionModel(torch.nn.Conv2d(1, 1, 3, padding=1), default_scheduler())
    data = load_dataset("mnist", channels=1, size=8, n=16)
    with pytest.raises(
        ModelError, match="UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel.*not Conv2d"
    ):
        build_index(model, data, tmp_path / "idx", CFG, shard_size=16, progress=False)
    assert not (tmp_path / "idx").exists()


def test_a_conditional_model_without_conditions_is_refused_before_anything_is_written(tmp_path):
    data = load_dataset("mnist", channels=1, size=8, n=16)  # no conditions: MNIST read as plain images
    with pytest.raises(DataError, match="class-conditional: the images need a class each"):
        build_index(_class_model(), data, tmp_path / "idx", CFG, shard_size=16, progress=False)
    assert not (tmp_path / "idx").exists()


def test_a_class_conditional_model_indexes_mnist_by_its_digits(tmp_path):
    model = _class_model()
    data = training_data("mnist", model, n=16)  # the digit labels are the classes
    assert data.conditions.labels.tolist() == data.labels.tolist()
    out = build_index(model, data, tmp_path / "idx", CFG, shard_size=16, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["condition_kind"] == "class" and m["model"]["class_map"]["7"] == 7
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [it["condition"]["class"] for it in items] == data.labels.tolist()


def test_an_unconditional_pixel_model_records_nothing_new():
    """Same settings (so the same key and files) as every index built before issue 16."""
    model = build_model("tiny", seed=0)
    data = training_data("mnist", model, n=4)
    settings = {"model": {"weights_sha256": "x"}, "data": {"n": 4}}
    assert family_settings(settings, model, data) is settings
    assert item_conditions(model, data) == [{}] * 4 and data.conditions is None
