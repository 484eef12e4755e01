"""The `attribution scores` CLI contract: any image size, 1 or 3 channels, file-name order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.data import image_folder
from attribution.influence import AttributionConfig, Attributor
from attribution.model import build_model, load_model, save_model

ROOT = Path(__file__).resolve().parent.parent


def _folder(path: Path, n: int, size: tuple[int, int], mode: str, seed: int) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
            path / f"img_{n - i:03d}.png"
        )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_scores_cli_contract(tmp_path, channels):
    model = build_model("tiny", seed=0, in_channels=channels, out_channels=channels)
    save_model(model, tmp_path / "model")
    # a bare UNet folder (no scheduler config) must load as DDPM linear, T = 1000
    model.unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    mode = "L" if channels == 1 else "RGB"
    train = _folder(tmp_path / "train", 12, (13, 9), mode, 0)  # another size: converted to 8×8
    queries = _folder(tmp_path / "queries", 3, (8, 8), mode, 1)
    out = tmp_path / "scores.npy"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "explorer.cli",
            "scores",
            "--model",
            str(tmp_path / "bare"),
            "--data",
            str(train),
            "--queries",
            str(queries),
            "--out",
            str(out),
            "--method",
            "kfac",
            "--draws",
            "2",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    s = np.load(out)
    assert s.dtype == np.float32 and s.shape == (3, 12)
    # the same numbers from the Python API, rows in sorted file-name order
    m = load_model(tmp_path / "bare")
    assert m.scheduler.config.num_train_timesteps == 1000 and m.scheduler.config.beta_schedule == "linear"
    tr = image_folder(train, channels, 8)
    assert [Path(p).name for p in tr.sources] == sorted(p.name for p in train.iterdir())
    att = Attributor(m, tr, AttributionConfig(method="kfac", draws=2, seed=3), progress=False).fit()
    ref = att.scores(image_folder(queries, channels, 8).images).numpy()
    np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_scores_cli_bad_input_is_one_clear_line(tmp_path):
    save_model(build_model("tiny", seed=0), tmp_path / "model")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "explorer.cli",
            "scores",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(tmp_path / "train"),
            "--queries",
            str(tmp_path / "train"),
            "--out",
            str(tmp_path / "s.npy"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "notes.txt" in r.stderr and "Traceback" not in r.stderr


def test_projected_scores_are_seeded(tmp_path):
    model = build_model("tiny", seed=0)
    train = image_folder(_folder(tmp_path / "t", 8, (8, 8), "L", 0), 1, 8)
    q = torch.zeros(1, 1, 8, 8)
    a = Attributor(
        model, train, AttributionConfig(method="kfac", draws=2, dim=64, seed=5), progress=False
    ).fit()
    b = Attributor(
        model, train, AttributionConfig(method="kfac", draws=2, dim=64, seed=5), progress=False
    ).fit()
    c = Attributor(
        model, train, AttributionConfig(method="kfac", draws=2, dim=64, seed=6), progress=False
    ).fit()
    assert torch.equal(a.scores(q), b.scores(q))
    assert not torch.equal(a.scores(q), c.scores(q))


def test_default_dim_is_the_methods():
    from attribution.influence import DEFAULT_DIM, TRAK_DIM, AttributionConfig

    assert AttributionConfig().dim == DEFAULT_DIM
    assert AttributionConfig(method="trak").dim == AttributionConfig(method="dtrak").dim == TRAK_DIM
    assert AttributionConfig(method="kfac", dim=None).dim is None
    assert (
        AttributionConfig(**AttributionConfig(method="trak").to_dict()).dim == TRAK_DIM
    )  # manifests round-trip
    with pytest.raises(ValueError, match="dim must be"):
        AttributionConfig(dim=0)


def test_streamed_scores_equal_materialised_features():
    """scores() streams over training batches; it must equal ψ Φᵀ with every feature formed."""
    from attribution.data import mnist

    data = mnist(size=8, n=40)
    model = build_model("tiny", seed=0)
    att = Attributor(
        model,
        data.subset(range(36)),
        AttributionConfig(dim=512, draws=2, curvature_draws=1, query_draws=2, batch_size=8),
        progress=False,
    ).fit()
    q = data.images[36:]
    np.testing.assert_allclose(
        att.scores(q).numpy(), (att.query_features(q) @ att.train_features().T).numpy(), rtol=1e-4, atol=1e-6
    )
