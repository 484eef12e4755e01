"""`attribution stability`: the seed-stability protocol on any folders, as JSON."""

from __future__ import annotations

import json

from attribution.data import mnist, save_images
from attribution.model import build_model, save_model
from explorer.cli import main


def test_stability_command_writes_the_protocol_figures(tmp_path):
    save_model(build_model("tiny", seed=0), tmp_path / "model")
    ds = mnist(size=8, n=14)
    save_images(ds.images[:12], tmp_path / "train")
    save_images(ds.images[12:], tmp_path / "queries")
    out = tmp_path / "stability.json"
    args = [
        "stability",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "train"),
        "--queries",
        str(tmp_path / "queries"),
        "--draws",
        "4",
        "--dim",
        "256",
        "--k",
        "3",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1] and res["k"] == 3 and res["n_train"] == 12 and res["n_queries"] == 2
    assert -1 <= res["spearman"] <= 1 and 0 <= res["top_k_overlap"] <= 1
    assert len(res["per_query_spearman"]) == 2 and all(0 <= o <= 3 for o in res["per_query_overlap"])
    assert res["config"]["draws"] == 4 and res["config"]["dim"] == 256
