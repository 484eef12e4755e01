"""The output folder of a build: nothing finished is deleted unless asked (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.data import load_dataset
from attribution.errors import ConfigError
from attribution.influence import AttributionConfig
from attribution.model import build_model, save_model
from index import IndexLayout
from index.build import build_index

ROOT = Path(__file__).resolve().parent.parent
N = 48


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")
    model = build_model("tiny", seed=0)
    save_model(model, d / "model")
    return d, model, load_dataset("mnist", channels=1, size=8, n=N)


def cfg(method: str = "gradcos", **kw) -> AttributionConfig:
    return AttributionConfig(method=method, dim=64, draws=1, curvature_draws=1, batch_size=16, **kw)


def build(parts, out: Path, c: AttributionConfig | None = None, **kw) -> Path:
    _, model, data = parts
    return build_index(model, data, out, c or cfg(), shard_size=16, progress=False, keep_shards=True, **kw)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_finished_index_with_other_settings_is_refused_unless_overwrite(parts, tmp_path):
    out = build(parts, tmp_path / "idx")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"finished index.*method\.seed: 0 there, 1 now.*--overwrite"):
        build(parts, out, cfg(seed=1))
    assert snapshot(out) == before  # untouched
    build(parts, out, cfg())  # same settings: nothing to do
    assert snapshot(out) == before
    build(parts, out, cfg(seed=1), overwrite=True)
    assert snapshot(out) != before and IndexLayout(out).is_finished


def test_overwrite_rebuilds_a_damaged_index_with_the_same_settings(parts, tmp_path, capfd):
    from attribution.errors import IndexLoadError
    from index.store import load

    lay = IndexLayout(build(parts, tmp_path / "idx"))
    lay.thumbs.write_bytes(b"damaged")
    with pytest.raises(IndexLoadError, match="--overwrite"):
        load(lay.root)
    build(parts, lay.root)  # same settings: left alone, with a hint
    assert "--overwrite rebuilds it" in capfd.readouterr().err and lay.thumbs.read_bytes() == b"damaged"
    build(parts, lay.root, overwrite=True)
    assert len(load(lay.root)) == N


def test_unfinished_build_with_other_settings_is_moved_aside_and_comes_back(parts, tmp_path, capfd):
    lay = IndexLayout(build(parts, tmp_path / "idx"))
    lay.manifest.unlink()  # as if killed before the end: build.json, shards, ...
    old = snapshot(lay.root)
    build(parts, lay.root, cfg(seed=1))
    err = capfd.readouterr().err
    assert "unfinished build with other settings" in err and "method.seed" in err and ".aside" in err
    (aside,) = lay.aside.iterdir()
    assert snapshot(aside) == old  # every file kept, byte for byte
    mtimes = {p.name: p.stat().st_mtime_ns for p in (aside / "shards").iterdir()}
    lay.manifest.unlink()  # the new build unfinished too; back to the old settings:
    build(parts, lay.root, cfg())  # the seed-1 build goes aside, the seed-0 one resumes from there
    assert "resuming the build" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for _, _, p in lay.finished_shards()} == mtimes
    assert lay.is_finished and not aside.exists() and len(list(lay.aside.iterdir())) == 1


def test_a_folder_that_is_not_an_index_is_refused(parts, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"not an index")
    with pytest.raises(ConfigError, match="not an index and is not empty.*cat.png"):
        build(parts, other)
    assert sorted(p.name for p in other.iterdir()) == ["cat.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert IndexLayout(build(parts, empty)).is_finished


def test_out_pointing_to_a_file_is_a_plain_error(parts, tmp_path):
    d, _, _ = parts
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        build(parts, f)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "index.build",
            "--model",
            str(d / "model"),
            "--data",
            "mnist",
            "--n",
            "16",
            "--out",
            str(f),
            "--method",
            "gradcos",
            "--dim",
            "16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert f.read_text() == "x"
