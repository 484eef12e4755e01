"""The explorer's views (issue 18) without a browser: scores split by timestep band through the
index (parts add up to the score; re-ranking by one band), the memorisation audit (self-influence,
group self-influence, sample pairs) and methods side by side, each checked against an independent
computation; their exports; and the duplicated image the audit must find (slow: default model)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from attribution.bands import BAND_COUNTS, Bands, query_band_features
from attribution.errors import DataError
from explorer import audit, exports
from explorer.service import Explorer
from index.store import load as load_index

SPREAD_CFG = dict(draws=4, query_draws=4, antithetic=True, importance=True, profile_images=4, damping=0.1)


@pytest.fixture(scope="module")
def tiny(tiny_workspace):
    model = tiny_workspace.model()
    ekfac = load_index(tiny_workspace.index("ekfac", **SPREAD_CFG), model)
    pixel = load_index(tiny_workspace.index("pixel"), model)
    return {"model": model, "ekfac": ekfac, "pixel": pixel, "ex": Explorer(model, [ekfac, pixel])}


def test_band_parts_add_up_to_the_score_in_the_index_for_every_setting(tiny):
    idx, ex = tiny["ekfac"], tiny["ex"]
    image = ex.training(7).image
    plain = idx.query(image, k=8)
    for n in BAND_COUNTS:
        res = idx.query(image, k=8, bands=Bands.equal(n, tiny["model"].num_timesteps))
        # the same answer as without bands (ψ from the same draws, summed from cells)
        assert [h.row for h in res.proponents] == [h.row for h in plain.proponents]
        np.testing.assert_allclose(
            [h.score for h in res.proponents], [h.score for h in plain.proponents], rtol=1e-5
        )
        for h in res.proponents + res.opponents:
            assert len(h.bands) == n
            assert abs(sum(h.bands) - h.score) <= 1e-4 * abs(h.score), (n, h)
        assert res.bands["names"] == Bands.equal(n, 1000).names and res.bands["ranked_by"] is None
        assert res.stability is not None


def test_rank_by_a_band_is_the_top_k_of_that_band_alone(tiny):
    idx, ex = tiny["ekfac"], tiny["ex"]
    image = ex.training(11).image
    bands = Bands.equal(2, tiny["model"].num_timesteps)
    _, _, psi_b = query_band_features(idx.attributor, image.unsqueeze(0), bands)
    phi = idx.all_features().astype(np.float64)
    whole = idx.query(image, k=len(idx), with_all=True).all_scores
    for b in range(2):
        part = phi @ psi_b[0, b].double().numpy()  # independent: every image's band part
        res = idx.query(image, k=6, bands=bands, rank_by=b)
        assert [h.row for h in res.proponents] == list(np.argsort(-part, kind="stable")[:6])
        assert [h.row for h in res.opponents] == list(np.argsort(part, kind="stable")[:6])
        np.testing.assert_allclose(
            [h.bands[b] for h in res.proponents], part[[h.row for h in res.proponents]], rtol=1e-5
        )
        np.testing.assert_allclose(
            [h.score for h in res.proponents], whole[[h.row for h in res.proponents]], rtol=1e-6
        )
        assert res.bands["ranked_by"] == bands.names[b] and res.stability is None


def test_explorer_band_settings_and_refusals(tiny):
    ex = tiny["ex"]
    q = ex.training(3)
    ans = ex.attribute(q, "ekfac", 4, bands=10, rank_by="t 900–999 (high noise)")
    assert ans.data["bands"]["ranked_by"] == "t 900–999 (high noise)" and ans.data["settings"]["bands"] == 10
    assert ex.attribute(q, "ekfac", 4, bands=0).data["bands"] is None
    assert ex.attribute(q, "pixel", 4).data["bands"] is None  # pixel similarity draws no timesteps
    for bad, words in ((3, "bands must be one of"), ("x", "whole number"), (-1, "between")):
        with pytest.raises(DataError, match=words):
            ex.attribute(q, "ekfac", 4, bands=bad)
    with pytest.raises(DataError, match="between 0 and 1"):
        ex.attribute(q, "ekfac", 4, bands=2, rank_by=5)
    with pytest.raises(DataError, match="needs a method with timestep draws"):
        ex.attribute(q, "pixel", 4, rank_by=1)


def test_compare_overlap_and_spearman(tiny):
    ex = tiny["ex"]
    q = ex.training(21)
    c = ex.compare(q, "ekfac", "pixel", 8)
    a, b = ex.attribute(q, "ekfac", 8, bands=0).data, ex.attribute(q, "pixel", 8, bands=0).data
    assert c["spearman"] == pytest.approx(spearmanr(a["scores"], b["scores"]).statistic, abs=1e-12)
    for side in ("proponents", "opponents"):
        both = {h["row"] for h in a[side]} & {h["row"] for h in b[side]}
        assert set(c["overlap"][side]["rows"]) == both and c["overlap"][side]["count"] == len(both)
        assert [h["row"] for h in c["a"][side]] == [h["row"] for h in a[side]]
    self_c = ex.compare(q, "pixel", "ekfac", 8)
    assert self_c["spearman"] == pytest.approx(c["spearman"])
    with pytest.raises(DataError, match="two different methods"):
        ex.compare(q, "ekfac", "ekfac", 8)
    assert json.dumps(c)


def test_self_influence_and_group_self_influence_against_all_pairs(tiny):
    idx, ex = tiny["ekfac"], tiny["ex"]
    si = ex.self_influence("ekfac", 5)
    v = idx.self_influence.astype(np.float64)
    assert [r["row"] for r in si["highest"]] == list(np.argsort(-v, kind="stable")[:5])
    assert [r["row"] for r in si["lowest"]] == list(np.argsort(v, kind="stable")[:5])
    # group: itself + its 5 strongest proponents among the others, from every pair's τ = N φ_i·φ_j
    phi = idx.all_features().astype(np.float64)
    tau = len(idx) * phi @ phi.T
    np.fill_diagonal(tau, -np.inf)
    group = v + np.sort(tau, axis=1)[:, -(audit.GROUP - 1) :].sum(1)
    np.testing.assert_allclose(audit.group_self_influence(idx), group, rtol=1e-4, atol=1e-7)
    g = ex.self_influence("ekfac", 5, group=True)
    assert [r["row"] for r in g["highest"]] == list(np.argsort(-group, kind="stable")[:5])
    from index.manifest import IndexLoadError

    with pytest.raises(IndexLoadError, match="no self-influence"):
        ex.self_influence("pixel", 5)


def test_sample_pairs_against_independent_queries(tiny):
    ex, idx = tiny["ex"], tiny["ekfac"]
    res = ex.audit_samples("ekfac", 3, seed=2, steps=4)
    assert [r["dominance"] for r in res["samples"]] == sorted(
        (r["dominance"] for r in res["samples"]), reverse=True
    )
    flat = idx.thumbs.reshape(len(idx), -1).astype(np.float64) / 255
    for r in res["samples"]:
        u8 = res["images"][r["sample"]]
        q = ex._from_u8(u8[:, :, 0])
        top = idx.query(q, k=5)  # the same image as a query of its own
        assert top.proponents[0].row == r["top_row"]
        s = [h.score for h in top.proponents]
        assert r["dominance"] == pytest.approx(s[0] / np.mean(s[1:]), rel=1e-4)
        d = np.sqrt(np.mean((flat - u8.reshape(-1) / 255) ** 2, axis=1))
        assert r["pixel_distance"] == pytest.approx(d[r["top_row"]], rel=1e-5)
        assert r["nearest_row"] == int(np.argmin(d)) and r["nearest_distance"] == pytest.approx(
            d.min(), rel=1e-5
        )
    assert set(res["dominant"]) == {r["sample"] for r in res["samples"] if r["dominance"] >= audit.DOMINANCE}
    with pytest.raises(DataError, match="samples must be between"):
        ex.audit_samples("ekfac", 0)


def test_exports_carry_the_band_split_and_the_audit(tiny, tmp_path):
    ex = tiny["ex"]
    ans = ex.attribute(ex.training(9), "ekfac", 5, bands=4)
    files = ex.export(ans)
    js = json.loads(open(files[1]).read())
    assert js["bands"]["names"] == ans.data["bands"]["names"]
    with open(files[2]) as f:
        rows = list(csv.DictReader(f))
    cols = [f"band {n}" for n in js["bands"]["names"]]
    shown = [r for r in rows if r["proponent_rank"] or r["opponent_rank"]]
    assert len(shown) == 10
    for r in shown:
        assert abs(sum(float(r[c]) for c in cols) - float(r["score"])) <= 1e-4 * abs(float(r["score"]))
    st = {
        "self_influence": ex.self_influence("ekfac", 4),
        "pairs": ex.audit_samples("ekfac", 2, steps=3),
        "method": "ekfac",
    }
    png, jsn, csv_path = exports.write_audit_exports(st, ex.index("ekfac"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads(open(jsn).read())
    assert len(data["self_influence"]["highest"]) == 4 and len(data["pairs"]["samples"]) == 2
    assert "images" not in data["pairs"]
    text = open(csv_path).read()
    assert text.count("self_influence,highest") == 4 and text.count("\nsamples,") == 2


@pytest.mark.slow
def test_the_audit_finds_an_image_seeded_five_times(tmp_path):
    """200 training images of the default model plus 5 exact copies of image 0 (the first, not
    picked): the group ranking puts one of its copies in its top 10. (Plain self-influence does
    not: each copy's first-order self-influence counts only itself; measured 73rd–184th of 205.)"""
    from attribution.data import load_dataset
    from attribution.influence import AttributionConfig
    from attribution.model import load_model
    from index.build import build_index

    torch.manual_seed(0)
    model = load_model()
    data = load_dataset("mnist", 1, 28, 200)
    seeded = data.subset(list(range(200)) + [0] * 5)
    cfg = AttributionConfig(
        method="ekfac", draws=16, curvature_draws=1, query_draws=8, dim=4096, curvature_min_rows=400
    )
    build_index(
        model, seeded, tmp_path / "index", cfg, model_path="default", data_spec="mnist", progress=False
    )
    ex = Explorer(model, [load_index(tmp_path / "index", model)])
    top = [r["row"] for r in ex.self_influence(None, 10, group=True)["highest"]]
    copies = {0, 200, 201, 202, 203, 204}
    assert copies & set(top), top
