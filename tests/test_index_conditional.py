"""Indexes of latent and conditional models (issue 16 item 6): tiny, randomly initialised diffusers
models built from configs (tests/tiny_families.py, no hub), real FAISS stores.

- a class-conditional UNet2DModel, training images in class sub-folders with names;
- a Stable-Diffusion-style pipeline (latent, text-conditional), training images in a
  metadata.jsonl with prompts.

For each: the manifest records the family, condition kind and class map, items.jsonl each row's
condition; a query that copies a training image, under its condition, finds it in the top 10%;
another condition changes the scores; a model of another family is refused on load; the query's
condition reaches the exports (JSON, CSV, report) and the command line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_families import PROMPTS, as_model, class_data, class_unet, metadata_data, random_images, sd_folder

from attribution.errors import DataError, IndexLoadError
from attribution.influence import AttributionConfig
from attribution.model import load_model, save_model
from explorer.service import Explorer
from index.build import build_index
from index.conditions import model_input, query_condition
from index.store import load

N = 20  # top 10% = the top 2
CFG = dict(method="ekfac", draws=32, query_draws=128, curvature_min_rows=400, dim=None)


def _indexed(root: Path, folder: Path) -> dict:
    """The model saved in `folder` and its index of root/train (built in root/idx)."""
    from index.conditions import training_data

    model = load_model(folder)
    data = training_data(str(root / "train"), model)
    index = build_index(model, data, root / "idx", AttributionConfig(**CFG), progress=False, shard_size=16)
    return {"root": root, "folder": folder, "model": model, "index": index}


@pytest.fixture(scope="module")
def class_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("class-index")
    folder = save_model(as_model(class_unet(3)), root / "model")
    names = [("cat", "dog", "emu")[i % 3] for i in range(N)]
    class_data(root / "train", random_images(N, 8, "L", 1), names)
    return _indexed(root, folder)


@pytest.fixture(scope="module")
def latent_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-index")
    folder = sd_folder(root / "sd")
    texts = [PROMPTS[i % 2] for i in range(N)]
    metadata_data(root / "train", random_images(N, 8, "RGB", 0), "text", texts)
    return _indexed(root, folder)


def _rank(scores: np.ndarray, row: int) -> int:
    return int((scores > scores[row]).sum())


def _copy_query(idx, model, row: int, condition):
    """All N scores of training image `row` (read back from its file, encoded where latent)."""
    from attribution.data import load_image

    image = load_image(Path(idx.items[row]["source"]), model.channels, model.size)
    res = idx.query(
        model_input(model, image), k=3, with_all=True, cond=query_condition(idx.manifest, condition)
    )
    return res.all_scores


def test_class_conditional_index(class_index):
    m = json.loads((class_index["index"] / "manifest.json").read_text())
    assert (m["model"]["family"], m["model"]["condition_kind"]) == ("pixel", "class")
    assert m["model"]["class_map"] == {"cat": 0, "dog": 1, "emu": 2}
    assert m["data"]["conditions"]["kind"] == "class"
    model = class_index["model"]
    idx = load(class_index["index"], model)
    row = next(i for i, it in enumerate(idx.items) if it["source"].endswith("dog/004.png"))
    assert idx.items[row]["condition"] == {"class": 1, "name": "dog"}
    s = _copy_query(idx, model, row, "dog")
    assert s.shape == (N,) and np.isfinite(s).all()
    assert _rank(s, row) < N // 10, f"the copied image ranks {_rank(s, row) + 1} of {N}"
    np.testing.assert_allclose(_copy_query(idx, model, row, "1"), s)  # an id is the same class
    other = _copy_query(idx, model, row, "emu")
    assert np.linalg.norm(other - s) / np.linalg.norm(s) > 1e-2
    with pytest.raises(DataError, match="class-conditional: give the query a class"):
        _copy_query(idx, model, row, None)
    with pytest.raises(DataError, match="unknown class 'owl'.*cat, dog, emu"):
        _copy_query(idx, model, row, "owl")


def test_latent_text_index(latent_index):
    m = json.loads((latent_index["index"] / "manifest.json").read_text())
    assert (m["model"]["family"], m["model"]["condition_kind"], m["model"]["class_map"]) == (
        "latent",
        "text",
        None,
    )
    model = latent_index["model"]
    idx = load(latent_index["index"], model)
    assert idx.thumbs.shape == (N, 8, 8, 3)  # thumbnails of the images, not of their latents
    row = 4
    assert idx.items[row]["condition"] == {"text": PROMPTS[0]}
    s = _copy_query(idx, model, row, PROMPTS[0])
    assert _rank(s, row) < N // 10, f"the copied image ranks {_rank(s, row) + 1} of {N}"
    other = _copy_query(idx, model, row, PROMPTS[1])
    assert np.linalg.norm(other - s) / np.linalg.norm(s) > 1e-2


def test_a_model_of_another_family_is_refused(class_index, latent_index, tmp_path):
    with pytest.raises(
        IndexLoadError,
        match="built for a pixel, class-conditional .3 classes. model, this model is latent, text",
    ):
        load(class_index["index"], latent_index["model"])
    with pytest.raises(
        IndexLoadError, match="built for a latent, text-conditional model, this model is pixel, class"
    ):
        load(latent_index["index"], class_index["model"])
    plain = load_model(save_model(as_model(class_unet(3)), tmp_path / "same"))
    plain.conditioning = {"class_map": {"cat": 2}}  # the same weights, another class map
    with pytest.raises(IndexLoadError, match="class map gives 'cat' id 0, the model's gives 2"):
        load(class_index["index"], plain)


def test_the_app_attributes_under_a_condition_and_exports_it(class_index, tmp_path):
    model = class_index["model"]
    ex = Explorer(model, [load(class_index["index"], model)])
    q = ex.training(3)  # a training image: under its own condition
    assert (
        q.params["condition"]
        == f"{ex.index(None).items[3]['condition']['name']} (class {ex.index(None).items[3]['condition']['class']})"
    )
    ans = ex.attribute(q, None, k=4)
    assert ans.data["proponents"][0]["row"] in range(N)
    gen = ex.generated(0, "ddim", 4, "emu")
    assert gen.params["condition"] == "emu (class 2)" and gen.latent is None
    ans = ex.attribute(gen, None, k=4)
    assert ans.data["query"]["condition"] == "emu (class 2)"
    assert ans.data["index"]["model"]["family"] == "pixel"
    assert ans.data["index"]["model"]["condition_kind"] == "class"
    with pytest.raises(DataError, match="give the query a class"):
        ex.generated(0, "ddim", 4, "")
    report_png, js, csv_path, _ = (Path(p) for p in ex.export(ans))
    data = json.loads(js.read_text())
    assert data["query"]["condition"] == "emu (class 2)" and data["index"]["model"]["class_map"]["emu"] == 2
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == N and {r["query_condition"] for r in rows} == {"emu (class 2)"}
    assert {r["model_family"] for r in rows} == {"pixel"} and {r["condition_kind"] for r in rows} == {"class"}
    assert {r["condition"] for r in rows} == {"cat (class 0)", "dog (class 1)", "emu (class 2)"}
    assert report_png.stat().st_size > 0


def test_the_app_encodes_uploads_and_uses_generated_latents(latent_index, tmp_path):
    from PIL import Image

    model = latent_index["model"]
    ex = Explorer(model, [load(latent_index["index"], model)])
    gen = ex.generated(1, "ddim", 4, PROMPTS[1])
    assert gen.latent is not None and gen.latent.shape == (4, 4, 4)
    ans = ex.attribute(gen, None, k=3)
    assert ans.data["query"]["condition"] == PROMPTS[1] and ans.data["index"]["model"]["family"] == "latent"
    src = Path(ex.index(None).items[4]["source"])  # a training image uploaded under its prompt
    Image.open(src).save(tmp_path / "q.png")
    ans = ex.attribute(ex.uploaded(tmp_path / "q.png", PROMPTS[0]), None, k=2)
    assert 4 in [h["row"] for h in ans.data["proponents"]]


def test_cli_query_takes_a_class(class_index, tmp_path, capsys):
    from explorer.cli import main

    idx = load(class_index["index"])
    row = next(i for i, it in enumerate(idx.items) if it["source"].endswith("dog/004.png"))
    args = ["query", "--index", str(class_index["index"]), "--model", str(class_index["folder"])]
    args += ["--image", idx.items[row]["source"], "--top-k", "2"]
    assert main([*args, "--class", "dog", "--json", str(tmp_path / "q.json")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["condition"] == "dog (class 1)" and out["model_family"]["condition_kind"] == "class"
    assert row in [h["row"] for h in out["proponents"]]
    capsys.readouterr()
    assert main(args) == 2
    assert "error: this index's model is class-conditional: give the query a class" in capsys.readouterr().err


def test_the_page_shows_a_class_box_and_the_api_takes_a_condition(class_index, tiny_workspace):
    from explorer import ui

    model = class_index["model"]
    demo = ui.build_demo(model, [class_index["index"]])
    boxes = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    for name in ("gen-condition", "upload-condition"):
        assert boxes[name].visible and [c[0] for c in boxes[name].choices] == ["cat", "dog", "emu"]
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    data = fns["attribute_generated_conditional"](0, "ddim", 4, "dog", 3, None)
    assert data["query"]["condition"] == "dog (class 1)" and len(data["proponents"]) == 3
    plain = ui.build_demo(tiny_workspace.model(), [tiny_workspace.index("pixel")])
    boxes = {c.elem_id: c for c in plain.blocks.values() if getattr(c, "elem_id", None)}
    assert not boxes["gen-condition"].visible and not boxes["upload-condition"].visible
