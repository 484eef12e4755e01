"""A shipped curvature (index/prefit.py) replaces the fit only for the exact settings it was fitted
with, only while its checksum holds, and gives the very index a fresh fit gives (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attribution.data import load_dataset
from attribution.influence import AttributionConfig
from attribution.model import build_model
from index import prefit
from index.build import build_index

N = 48


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist", channels=1, size=8, n=N)


def _build(model, data, out: Path, shipped: Path, seed: int = 0, **kw) -> Path:
    cfg = AttributionConfig(
        method="ekfac", dim=64, draws=4, curvature_draws=1, curvature_min_rows=0, batch_size=16, seed=seed
    )
    return build_index(model, data, out, cfg, shard_size=16, progress=False, prefit_dir=shipped, **kw)


@pytest.fixture(scope="module")
def fitted(model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefit")
    shipped = root / "shipped"
    ref = _build(model, data, root / "ref", shipped)  # nothing shipped yet: fitted
    prefit.ship(ref, shipped)
    return ref, shipped


def _bytes(index: Path, name: str) -> bytes:
    return (index / name).read_bytes()


def test_a_shipped_curvature_gives_the_index_a_fresh_fit_gives(model, data, fitted, tmp_path, capsys):
    ref, shipped = fitted
    [record] = shipped.glob("*.json")
    assert json.loads(record.read_text())["identity"]["n"] == N
    capsys.readouterr()
    copied = _build(model, data, tmp_path / "copied", shipped)
    assert "using the curvature shipped for these exact settings" in capsys.readouterr().err
    refit = _build(model, data, tmp_path / "refit", shipped, fit_curvature=True)
    assert "using the curvature shipped" not in capsys.readouterr().err
    for name in ("curvature.safetensors", "projection.safetensors", "features.faiss", "spread.faiss"):
        assert _bytes(copied, name) == _bytes(ref, name), name
    assert _bytes(refit, "curvature.safetensors") == _bytes(ref, "curvature.safetensors")
    assert prefit.check(refit, shipped)


def test_other_settings_fit_their_own_curvature(model, data, fitted, tmp_path, capsys):
    ref, shipped = fitted
    capsys.readouterr()
    other = _build(model, data, tmp_path / "seed1", shipped, seed=1)
    assert "using the curvature shipped" not in capsys.readouterr().err
    assert _bytes(other, "curvature.safetensors") != _bytes(ref, "curvature.safetensors")
    assert not prefit.check(other, shipped)


def test_the_rows_conditions_are_part_of_the_key(model, data):
    """Same images, other labels: another key (a conditional build never takes another's fit)."""
    from attribution.influence import Attributor

    att = Attributor(model, data, AttributionConfig(method="ekfac", dim=64, draws=4, curvature_draws=1))
    settings = {"model": {"weights_sha256": "w"}, "data": {"sha256": "d", "n": N}}
    plain = prefit.curvature_identity(settings, att)
    assert "conditions" not in plain  # unconditional: the key the shipped default was made with
    a, b = (
        {**settings, "data": {**settings["data"], "conditions": {"kind": "class", "sha256": h}}} for h in "ab"
    )
    keys = {
        prefit.curvature_key(x)
        for x in (plain, prefit.curvature_identity(a, att), prefit.curvature_identity(b, att))
    }
    assert len(keys) == 3


def test_a_damaged_shipped_curvature_is_ignored_and_the_fit_runs(model, data, fitted, tmp_path, capsys):
    ref, shipped = fitted
    bad = tmp_path / "bad"
    bad.mkdir()
    [src] = shipped.glob("*.safetensors")
    blob = bytearray(src.read_bytes())
    blob[-1] ^= 0xFF  # a flipped bit in the last eigenvalue
    (bad / src.name).write_bytes(bytes(blob))
    (bad / src.with_suffix(".json").name).write_text(src.with_suffix(".json").read_text())
    capsys.readouterr()
    out = _build(model, data, tmp_path / "fresh", bad)
    err = capsys.readouterr().err
    assert "checksum does not match" in err and "using the curvature shipped" not in err
    assert _bytes(out, "curvature.safetensors") == _bytes(ref, "curvature.safetensors")


def test_the_default_index_has_a_current_shipped_curvature():
    """`make demo` skips the fit only while assets/curvature/ holds the file for the default build
    with today's fit code; after an edit to that code, refit and ship it (index/prefit.py)."""
    from attribution.data import load_dataset
    from attribution.influence import Attributor
    from attribution.model import load_model
    from explorer.build_job import default_build_config
    from index.build import build_settings

    model = load_model()
    data = load_dataset("mnist", channels=model.channels, size=model.size)
    cfg = default_build_config()
    att = Attributor(model, data, cfg, progress=False)
    key = prefit.curvature_key(prefit.curvature_identity(build_settings(model, data, cfg, "", "mnist"), att))
    assert prefit.find(key) is not None, (
        f"no shipped curvature for the default build (key {key}); refit and ship it: see index/prefit.py"
    )
