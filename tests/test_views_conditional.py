"""The audit and compare views on conditional and latent models (issue 16): the audit's samples
are drawn under conditions (each class in turn, or one given) with the model's guidance scale and
attributed under their own condition, a latent model's on its sampled latents; the compare view
and `/compare` take the query's condition. Checked against independent queries of the index.

Models: a tiny class-conditional pixel UNet (3 named classes, tests/tiny_families.py) with an
EK-FAC and a pixel index over 20 images, and the shipped `mnist-latent` (class-conditional,
latent, guidance 2) over 24 MNIST images; all real, nothing mocked."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from tiny_families import as_model, class_data, class_unet, random_images

from attribution.conditions import Conditions
from attribution.errors import DataError
from attribution.influence import AttributionConfig
from attribution.model import load_model, save_model
from attribution.sample import sample
from explorer import compare, exports
from explorer.service import Explorer
from index.build import build_index
from index.conditions import training_data
from index.store import load

N = 20
SMALL = dict(draws=4, curvature_draws=1, query_draws=16, dim=512, curvature_min_rows=80)
CMAP = {"cat": 0, "dog": 1, "emu": 2}


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """The class-conditional pixel model, its EK-FAC and pixel indexes, an Explorer of both."""
    root = tmp_path_factory.mktemp("class-views")
    model = load_model(save_model(as_model(class_unet(3)), root / "model"))
    class_data(root / "train", random_images(N, 8, "L", 1), [("cat", "dog", "emu")[i % 3] for i in range(N)])
    data = training_data(str(root / "train"), model)
    idx = {}
    for method in ("ekfac", "pixel"):
        cfg = AttributionConfig(method=method, **SMALL)
        idx[method] = load(build_index(model, data, root / method, cfg, progress=False), model)
    return {"model": model, **idx, "ex": Explorer(model, [idx["ekfac"], idx["pixel"]]), "root": root}


def _scores(idx, image, condition: str, k: int = 5):
    """An independent query of the index under `condition` (a class name)."""
    return idx.query(image, k=k, with_all=True, cond=Conditions.classes([CMAP[condition]], CMAP))


def test_audit_samples_take_each_class_in_turn_and_are_attributed_under_it(cls, tmp_path):
    ex, idx, model = cls["ex"], cls["ekfac"], cls["model"]
    res = ex.audit_samples("ekfac", 4, seed=2, steps=4)
    names = ["cat", "dog", "emu", "cat"]
    assert res["settings"]["condition"] == "each class in turn"
    assert res["settings"]["condition_kind"] == "class" and "guidance_scale" not in res["settings"]
    assert {r["sample"]: r["condition"] for r in res["samples"]} == {
        j: f"{n} (class {CMAP[n]})" for j, n in enumerate(names)
    }
    # the same samples, drawn independently under those classes
    s = sample(model, 4, 2, "ddim", 4, progress=False, conditions=Conditions.classes([0, 1, 2, 0], CMAP))
    for r in res["samples"]:
        j = r["sample"]
        image = ex._from_u8(res["images"][j][:, :, 0])
        np.testing.assert_allclose(image.numpy(), s.images[j].numpy(), atol=1 / 127.5 + 1e-6)
        own = _scores(idx, image, names[j])
        assert own.proponents[0].row == r["top_row"]
        assert r["top_score"] == pytest.approx(own.proponents[0].score, rel=1e-4)
        other = _scores(idx, image, "emu" if names[j] != "emu" else "dog")
        assert np.linalg.norm(other.all_scores - own.all_scores) > 1e-2 * np.linalg.norm(own.all_scores)
    given = ex.audit_samples("ekfac", 2, seed=2, steps=4, condition="emu")
    assert {r["condition"] for r in given["samples"]} == {"emu (class 2)"}
    assert given["settings"]["condition"] == "emu (class 2)"
    with pytest.raises(DataError, match="unknown class 'owl'"):
        ex.audit_samples("ekfac", 2, steps=4, condition="owl")
    # the exported audit records each sample's condition
    png, js, csv_path = exports.write_audit_exports({"pairs": res, "method": "ekfac"}, idx, tmp_path)
    assert [r["condition"] for r in json.loads(open(js).read())["pairs"]["samples"]] == [
        r["condition"] for r in res["samples"]
    ]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == [r["condition"] for r in res["samples"]]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_takes_the_query_condition_and_refuses_none(cls, tmp_path):
    from PIL import Image

    from explorer import ui

    ex, root = cls["ex"], cls["root"]
    src = next(p for p in sorted((root / "train").rglob("*.png")) if p.parent.name == "dog")
    Image.open(src).save(tmp_path / "q.png")
    c = ex.compare(ex.uploaded(tmp_path / "q.png", "dog"), "ekfac", "pixel", 4)
    assert c["condition"] == c["query"]["condition"] == "dog (class 1)" and c["condition_kind"] == "class"
    assert "under dog (class 1)" in compare.comparison_md(c)
    direct = ex.attribute(ex.uploaded(tmp_path / "q.png", "dog"), "ekfac", 4, bands=0).data
    assert [h["row"] for h in c["a"]["proponents"]] == [h["row"] for h in direct["proponents"]]
    with pytest.raises(DataError, match="class-conditional: give the query a class"):
        ex.compare(ex.uploaded(tmp_path / "q.png"), "ekfac", "pixel", 4)
    # a training image under another class than its own (the compare tab's class box)
    q = ex.training(4)
    assert compare.under(q, ex.condition(q.params["condition"].split(" ")[0])) is q
    emu = compare.under(q, ex.condition("emu"))
    assert emu.params["condition"] == "emu (class 2)" and "attributed under emu" in emu.description
    c_emu = ex.compare(emu, "ekfac", "pixel", 4)
    assert c_emu["condition"] == "emu (class 2)" and c_emu["query"]["row"] == 4
    own = ex.attribute(q, "ekfac", 4, bands=0).data["scores"]
    under_emu = ex.attribute(emu, "ekfac", 4, bands=0).data["scores"]
    assert np.linalg.norm(np.subtract(own, under_emu)) > 1e-2 * np.linalg.norm(own)
    # the API: /compare with a condition; without one, the same plain refusal
    demo = ui.build_demo(cls["model"], explorer=ex)
    boxes = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    assert [ch[0] for ch in boxes["compare-condition"].choices] == ["its own", "cat", "dog", "emu"]
    assert [ch[0] for ch in boxes["audit-condition"].choices] == ["each class in turn", "cat", "dog", "emu"]
    fns = {f.api_name: f.fn for f in demo.fns.values()}
    api = fns["compare"](str(tmp_path / "q.png"), "ekfac", "pixel", 4, "dog")
    assert api["condition"] == "dog (class 1)" and api["a"]["proponents"] == c["a"]["proponents"]
    with pytest.raises(Exception, match="give the query a class") as e:
        fns["compare"](str(tmp_path / "q.png"), "ekfac", "pixel", 4, "")
    assert type(e.value).__name__ == "Error"  # gr.Error: a message for the caller, no traceback
    pairs = fns["self_influence"]("ekfac", 3, False, 2, 0, 3, "dog")["pairs"]
    assert [r["condition"] for r in pairs["samples"]] == ["dog (class 1)"] * 2
    # the tabs' events read their boxes: a training image compared under emu; samples by class
    events = [f for f in demo.fns.values() if f.fn is not None]
    on_row = next(f.fn for f in events if boxes["compare-condition"] in f.inputs)
    assert "(the query under emu (class 2))" in on_row(4, "emu", "ekfac", "pixel", 4)[0]
    on_samples = next(f.fn for f in events if boxes["audit-condition"] in f.inputs)
    md, gallery, _ = on_samples("ekfac", 2, 0, 3, "each class in turn", {}, progress=lambda *a, **k: None)
    assert "each class in turn" in md and {"cat (class 0)", "dog (class 1)"} == {
        c.split(" · ")[1] for _, c in gallery
    }


def test_an_unconditional_model_refuses_a_condition(tiny_workspace, tmp_path):
    model = tiny_workspace.model()
    ex = Explorer(model, [load(tiny_workspace.index("pixel"), model)])
    with pytest.raises(DataError, match="unconditional: it takes no class or prompt"):
        ex.audit_samples(None, 2, steps=2, condition="3")
    res = ex.audit_samples(None, 2, steps=2, condition="")
    assert "condition" not in res["settings"] and all("condition" not in r for r in res["samples"])
    with pytest.raises(DataError, match="unconditional: it takes no class or prompt"):
        ex.condition("3")


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """The shipped class-conditional latent model over 24 MNIST images (small settings)."""
    model = load_model("mnist-latent")
    cfg = AttributionConfig(method="ekfac", **SMALL)
    out = tmp_path_factory.mktemp("latent-views") / "index"
    data = training_data("mnist", model, 24)
    build_index(model, data, out, cfg, model_path="mnist-latent", data_spec="mnist", progress=False)
    return model, load(out, model)


def test_latent_audit_samples_are_measured_on_their_latents_with_guidance(latent):
    from index.conditions import model_input

    model, idx = latent
    ex = Explorer(model, [idx])
    res = ex.audit_samples(None, 2, seed=3, steps=5)
    assert res["settings"]["guidance_scale"] == model.guidance_scale == 2.0
    assert [r["condition"] for r in sorted(res["samples"], key=lambda r: r["sample"])] == [
        "class 0",
        "class 1",
    ]
    conds = Conditions.classes([0, 1], model.class_map)
    s = sample(model, 2, 3, "ddim", 5, progress=False, conditions=conds, guidance_scale=2.0)
    for r in res["samples"]:
        j = r["sample"]
        cond = conds.subset([j])
        psi = idx.query_features(s.latents[j : j + 1], None, cond)
        scores = idx.all_scores(psi)[0]
        assert r["top_row"] == int(np.argmax(scores))
        assert r["top_score"] == pytest.approx(float(scores.max()), rel=1e-4)
        # not the decoded image encoded again (a round trip the audit must not make)
        again = idx.query_features(model_input(model, s.images[j]).unsqueeze(0), None, cond)
        assert not np.allclose(again, psi, rtol=1e-3)
        assert res["images"][j].shape == (model.size, model.size, model.channels)
