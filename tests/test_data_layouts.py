"""Folder layouts (attribution/layouts.py): flat as before, class sub-folders, metadata.jsonl;
rows in sorted relative-path order; the class map; refusals that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.data import DataError, image_folder
from attribution.layouts import layout_of


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8), mode="L").save(path)
    return path


def _value(images: torch.Tensor) -> list[int]:
    """The grey level each 4×4 constant image was written with."""
    return ((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_flat_folder_unchanged(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "3_c.png"]):
        _png(tmp_path / name, 10 * (i + 1))
    _png(tmp_path / "skipped" / "x.png", 200)  # a flat folder skips sub-folders, as before
    ds = image_folder(tmp_path, 1, 4)
    assert layout_of(tmp_path) == "flat" and ds.conditions is None
    assert [Path(s).name for s in ds.sources] == ["3_c.png", "a.png", "b.png"]
    assert _value(ds.images) == [30, 20, 10] and ds.labels.tolist() == [3, -1, -1]
    assert "class_map" not in ds.meta


def test_class_folders_names_sorted_ids(tmp_path):
    _png(tmp_path / "zebra" / "1.png", 1)
    _png(tmp_path / "ant" / "2.png", 2)
    _png(tmp_path / "ant" / "0.png", 3)
    _png(tmp_path / "moth" / "0.png", 4)
    ds = image_folder(tmp_path, 1, 4)
    assert layout_of(tmp_path) == "classes"
    # rows follow the sorted relative paths
    assert [Path(s).relative_to(tmp_path).as_posix() for s in ds.sources] == [
        "ant/0.png",
        "ant/2.png",
        "moth/0.png",
        "zebra/1.png",
    ]
    assert _value(ds.images) == [3, 2, 4, 1]
    assert ds.meta["class_map"] == {"ant": 0, "moth": 1, "zebra": 2}
    assert ds.conditions.labels.tolist() == [0, 0, 1, 2] == ds.labels.tolist()
    assert ds.conditions.shown(3) == "zebra (class 2)"
    sub = ds.subset([3, 0])
    assert sub.conditions.labels.tolist() == [2, 0] and sub.conditions.class_map == ds.meta["class_map"]


def test_class_folders_integer_names_are_ids(tmp_path):
    _png(tmp_path / "7" / "a.png", 1)
    _png(tmp_path / "2" / "a.png", 2)
    ds = image_folder(tmp_path, 1, 4)
    assert ds.conditions.labels.tolist() == [2, 7]  # "2/a.png" sorts first; ids are the names
    assert ds.meta["class_map"] == {"2": 2, "7": 7}


def test_queries_use_the_training_map(tmp_path):
    _png(tmp_path / "train" / "cat" / "a.png", 1)
    _png(tmp_path / "train" / "dog" / "a.png", 2)
    _png(tmp_path / "q" / "dog" / "q.png", 3)  # alone, its own sorted order would make dog 0
    train = image_folder(tmp_path / "train", 1, 4)
    q = image_folder(tmp_path / "q", 1, 4, class_map=train.conditions.class_map)
    assert q.conditions.labels.tolist() == [1]
    _png(tmp_path / "q2" / "eel" / "q.png", 3)
    with pytest.raises(DataError, match="'eel' is not one of the training classes"):
        image_folder(tmp_path / "q2", 1, 4, class_map=train.conditions.class_map)


def _metadata(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_metadata_text(tmp_path):
    _png(tmp_path / "b.png", 1)
    _png(tmp_path / "sub" / "a.png", 2)
    _png(tmp_path / "a.png", 3)
    _metadata(
        tmp_path,
        [
            {"file_name": "b.png", "text": "a bee"},
            {"file_name": "sub/a.png", "text": "an ant in a folder"},
            {"file_name": "a.png", "text": "an ant", "extra": 1},
        ],
    )
    ds = image_folder(tmp_path, 1, 4)
    assert layout_of(tmp_path) == "metadata"
    assert [Path(s).relative_to(tmp_path).as_posix() for s in ds.sources] == ["a.png", "b.png", "sub/a.png"]
    assert ds.conditions.texts == ["an ant", "a bee", "an ant in a folder"]
    assert _value(ds.images) == [3, 1, 2] and ds.labels.tolist() == [-1, -1, -1]


def test_metadata_labels(tmp_path):
    for i, name in enumerate(["x.png", "y.png", "z.png"]):
        _png(tmp_path / "ints" / name, i)
        _png(tmp_path / "names" / name, i)
    _metadata(
        tmp_path / "ints",
        [{"file_name": n, "label": v} for n, v in zip(["z.png", "x.png", "y.png"], [4, 0, 4])],
    )
    ds = image_folder(tmp_path / "ints", 1, 4)
    assert ds.conditions.labels.tolist() == [0, 4, 4]
    _metadata(
        tmp_path / "names", [{"file_name": n, "label": v} for n, v in zip(["x.png", "y.png", "z.png"], "bab")]
    )
    ds = image_folder(tmp_path / "names", 1, 4)
    assert ds.conditions.labels.tolist() == [1, 0, 1] and ds.meta["class_map"] == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"file_name": "a.png"}], "need a text or label"),
        ([{"file_name": "../a.png", "text": "x"}], "relative path inside the folder"),
        ([{"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}], "listed twice"),
        ([{"file_name": "gone.png", "text": "x"}], "does not exist"),
        ([{"file_name": "a.png", "text": "x"}, {"file_name": "b.png"}], "row 2: no text"),
        ([{"file_name": "a.png", "label": 1.5}], "label must be an integer or a name"),
        ([{"file_name": "a.png", "label": 1}], "b.png: has no row"),
    ],
)
def test_metadata_refusals(tmp_path, rows, message):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    _metadata(tmp_path, rows)
    if message != "b.png: has no row":
        (tmp_path / "b.png").unlink()  # only that case keeps an image without a row
    with pytest.raises(DataError, match=message):
        image_folder(tmp_path, 1, 4)


def test_metadata_not_json(tmp_path):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not JSON"):
        image_folder(tmp_path, 1, 4)


def test_empty_class_folder(tmp_path):
    _png(tmp_path / "a" / "1.png", 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="class folder is empty"):
        image_folder(tmp_path, 1, 4)
