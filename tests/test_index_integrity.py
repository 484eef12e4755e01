"""An index proves its integrity on load: one test per kind of tampering (issue 14)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from attribution.data import load_dataset
from attribution.errors import IndexLoadError
from attribution.influence import AttributionConfig
from attribution.model import build_model
from index import IndexLayout
from index.build import build_index
from index.integrity import sha256_file
from index.store import load

N = 48


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    """Tiny indexes: the one tampered with, and others whose files are copied into it."""
    root = tmp_path_factory.mktemp("integrity")

    def make(name: str, n: int = N, **kw) -> Path:
        c = AttributionConfig(
            **{"method": "ekfac", "dim": 64, "draws": 1, "curvature_draws": 1, "batch_size": 16, **kw}
        )
        return build_index(
            model,
            load_dataset("mnist", channels=1, size=8, n=n),
            root / name,
            c,
            shard_size=16,
            progress=False,
        )

    return {
        "ref": make("ref"),
        "seed1": make("seed1", seed=1),
        "small": make("small", n=32),
        "trak": make("trak", method="trak"),
        "trak1": make("trak1", method="trak", seed=1),
    }


@pytest.fixture
def copy(built, tmp_path):
    def f(name: str = "ref") -> IndexLayout:
        return IndexLayout(shutil.copytree(built[name], tmp_path / name))

    return f


def edit_manifest(lay: IndexLayout, change) -> None:
    m = json.loads(lay.manifest.read_text())
    change(m)
    lay.manifest.write_text(json.dumps(m))


def rehash(lay: IndexLayout, name: str) -> None:
    """Record the file's current checksum, as a consistent (but wrong) build would have."""

    def change(m):
        m["files"][name] = {"sha256": sha256_file(lay.path(name)), "bytes": lay.path(name).stat().st_size}

    edit_manifest(lay, change)


def refused(lay: IndexLayout, match: str, model=None) -> None:
    with pytest.raises(IndexLoadError, match=match):
        load(lay.root, model)


def test_untouched_index_loads_and_records_every_file(built, model):
    idx = load(built["ref"], model)
    files = idx.manifest["files"]
    # density.safetensors: the default draws timesteps by importance (issue 13)
    assert set(files) == {
        "curvature.safetensors",
        "projection.safetensors",
        "density.safetensors",
        "items.jsonl",
        "thumbs.npy",
        "features.faiss",
    }
    assert files["features.faiss"]["ntotal"] == N and files["features.faiss"]["d"] == 64
    assert "trak.safetensors" in load(built["trak"]).manifest["files"]


@pytest.mark.parametrize("text", ["[]", "null", '"index"', "3", "{not json"])
def test_manifest_that_is_not_an_object(copy, text):
    lay = copy()
    lay.manifest.write_text(text)
    refused(lay, "corrupted manifest")


@pytest.mark.parametrize("key", ["model", "data", "method", "projection", "faiss", "key", "shard_size"])
def test_manifest_missing_a_section(copy, key):
    lay = copy()
    edit_manifest(lay, lambda m: m.pop(key))
    refused(lay, f"corrupted manifest \\(missing or malformed: {key}")


@pytest.mark.parametrize("entry", ["model.weights_sha256", "data.n", "projection.total_dim", "faiss.type"])
def test_manifest_missing_an_entry(copy, entry):
    lay = copy()
    sec, key = entry.split(".")
    edit_manifest(lay, lambda m: m[sec].pop(key))
    refused(lay, f"missing or malformed: {entry}")


def test_manifest_without_format_version(copy):
    lay = copy()
    edit_manifest(lay, lambda m: m.pop("format_version"))
    refused(lay, "format version None")


@pytest.mark.parametrize(
    "path,value",
    [
        ("method.method", "kfac"),
        ("method.seed", 7),
        ("method.draws", 9),
        ("data.n", 47),
        ("data.sha256", "0" * 64),
    ],
)
def test_edited_settings_no_longer_match_the_key(copy, path, value):
    lay = copy()
    sec, key = path.split(".")
    edit_manifest(lay, lambda m: m[sec].__setitem__(key, value))
    refused(lay, "edited after the build")


@pytest.mark.parametrize(
    "name,other",
    [
        ("curvature.safetensors", "seed1"),
        ("projection.safetensors", "seed1"),
        ("thumbs.npy", "small"),
        ("items.jsonl", "small"),
        ("trak.safetensors", "trak1"),
    ],
)
def test_file_copied_from_another_build(copy, built, name, other):
    lay = copy("trak" if name.startswith("trak") else "ref")
    shutil.copy(built[other] / name, lay.path(name))
    refused(lay, f"{name}: its sha256 differs .* copied from another build")


def test_items_edited_by_hand(copy):
    lay = copy()
    lay.items.write_text(lay.items.read_text().replace('"label": 5', '"label": 6', 1))
    refused(lay, "items.jsonl: its sha256 differs")


def test_listed_file_missing(copy):
    lay = copy()
    lay.curvature.unlink()
    refused(lay, "curvature.safetensors: missing")


def test_thumbs_with_the_wrong_row_count(copy):
    lay = copy()
    np.save(lay.thumbs, np.load(lay.thumbs)[:-1])
    rehash(lay, "thumbs.npy")
    refused(lay, f"thumbs.npy: uint8 \\({N - 1}, 8, 8\\), expected {N}")


def test_items_with_the_wrong_row_count(copy):
    lay = copy()
    lay.items.write_text("".join(lay.items.read_text().splitlines(keepends=True)[:-2]))
    rehash(lay, "items.jsonl")
    refused(lay, f"{N - 2} items, expected {N}")


def test_items_out_of_order(copy):
    lay = copy()
    lines = lay.items.read_text().splitlines(keepends=True)
    lay.items.write_text("".join([lines[1], lines[0], *lines[2:]]))
    rehash(lay, "items.jsonl")
    refused(lay, "line 1 is not the item of row 0")


def test_items_not_utf8(copy):
    lay = copy()
    lay.items.write_bytes(lay.items.read_bytes().replace(b'"source": "', b'"source": "\xff\xfe', 1))
    rehash(lay, "items.jsonl")
    refused(lay, "items.jsonl: unreadable")


def test_store_truncated(copy):
    lay = copy()
    data = lay.features.read_bytes()
    lay.features.write_bytes(data[: len(data) // 2])
    refused(lay, "features.faiss: .* bytes, the manifest says")


def test_store_from_another_build_of_another_size(copy, built):
    lay = copy()
    shutil.copy(built["small"] / "features.faiss", lay.features)
    refused(lay, "features.faiss")


def test_store_header_edited(copy):
    lay = copy()
    data = bytearray(lay.features.read_bytes())
    data[8:16] = (N + 1).to_bytes(8, "little")  # ntotal
    lay.features.write_bytes(bytes(data))
    refused(lay, f"holds {N + 1}×64 vectors, the manifest says {N}×64")


def test_files_record_malformed(copy, built):
    lay = copy()
    edit_manifest(lay, lambda m: m.__setitem__("files", []))
    refused(lay, "'files' is not a JSON object")
    lay = IndexLayout(shutil.copytree(built["ref"], lay.root.with_name("again")))
    edit_manifest(lay, lambda m: m["files"].pop("features.faiss"))
    refused(lay, "no size and header recorded for features.faiss")


def test_index_without_checksums_still_loads(copy, model, capfd):
    """Indexes built before checksums were recorded load (cheaply: their other checks still run)."""
    lay = copy()
    edit_manifest(lay, lambda m: m.pop("files"))
    idx = load(lay.root, model)
    assert len(idx) == N and "not verified" in capfd.readouterr().err


def test_importance_index_keeps_its_timestep_density(tmp_path, model):
    """An index built with importance-sampled timesteps stores the density, and its query side
    uses it (a query side without it would draw uniform timesteps)."""
    from safetensors.torch import load_file

    from attribution.curvature import Curvature
    from attribution.influence import Attributor
    from attribution.projection import Projection

    data = load_dataset("mnist", channels=1, size=8, n=32)
    c = AttributionConfig(
        method="ekfac", dim=64, draws=2, curvature_draws=1, batch_size=16, importance=True, profile_images=8
    )
    lay = IndexLayout(build_index(model, data, tmp_path / "imp", c, shard_size=16, progress=False))
    idx = load(lay.root, model)
    assert "density.safetensors" in idx.manifest["files"] and idx.attributor.density is not None
    parts = dict(curvature=Curvature.load(lay.curvature), projection=Projection.load(lay.projection))
    q = load_dataset("mnist", channels=1, size=8, n=36).images[32:]
    same = Attributor(model, data, c, progress=False).fit(**parts, density=load_file(lay.density)["density"])
    np.testing.assert_array_equal(idx.query_features(q), same.query_features(q).numpy())
    uniform = Attributor(model, data, replace(c, importance=False), progress=False).fit(**parts)
    assert not np.allclose(idx.query_features(q), uniform.query_features(q).numpy(), rtol=1e-2)
