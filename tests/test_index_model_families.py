"""The index refuses model families it does not handle yet, in one plain line, before any work."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from attribution.data import load_dataset
from attribution.errors import ModelError
from attribution.influence import AttributionConfig
from attribution.model import PRESETS, DiffusionModel, default_scheduler
from index.build import build_index


def test_a_class_conditional_model_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(UNet2DModel(**PRESETS["tiny"], num_class_embeds=3), default_scheduler())
    data = load_dataset("mnist", channels=1, size=8, n=16)
    cfg = AttributionConfig(method="ekfac", dim=64, draws=4, curvature_draws=1)
    with pytest.raises(ModelError, match="unconditional pixel-space models only.*class-conditional"):
        build_index(model, data, tmp_path / "idx", cfg, shard_size=16, progress=False)
    assert not (tmp_path / "idx").exists()
