"""Stability figures reach the user: the page's stability panel (headless Chromium), the API's
JSON, and every export (JSON, CSV, PNG report), on a tiny index with independent halves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from explorer import launch, ui
from explorer.service import Explorer
from index.store import load as load_index

SPREAD_CFG = dict(draws=4, query_draws=4, antithetic=True, importance=True, profile_images=4, damping=0.1)
K = 6


@pytest.fixture(scope="module")
def spread(tiny_workspace):
    return {"model": tiny_workspace.model(), "index": tiny_workspace.index("ekfac", **SPREAD_CFG)}


def test_exports_carry_stability(spread):
    ex = Explorer(spread["model"], [load_index(spread["index"], spread["model"])])
    ans = ex.attribute(ex.training(5, ex.labels[0]), ex.labels[0], k=K)
    st = ans.data["stability"]
    assert st and st["pooled_se"] > 0 and 0 <= st["distinct_proponents"] <= K
    for h in ans.data["proponents"] + ans.data["opponents"]:
        assert h["se"] > 0 and h["rank_a"] >= 1 and h["rank_b"] >= 1 and isinstance(h["distinct"], bool)
    report_png, js, csv_path, _ = [Path(p) for p in ex.export(ans)]
    assert json.loads(js.read_text())["proponents"][0]["se"] == ans.data["proponents"][0]["se"]
    rows = list(csv.DictReader(csv_path.open()))
    shown = {h["row"] for h in ans.data["proponents"] + ans.data["opponents"]}
    for r in rows:
        assert (r["se"] != "") == (int(r["row"]) in shown)
        if r["se"]:
            assert (
                float(r["se"]) > 0
                and int(r["rank_half_a"]) >= 1
                and r["distinguishable"] in ("True", "False")
            )
    assert report_png.stat().st_size > 10_000


@pytest.mark.browser
def test_page_and_api_show_stability(spread, browser, free_port):
    from gradio_client import Client

    demo = ui.build_demo(spread["model"], [spread["index"]])
    port = free_port()
    launch.serve(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(90_000)
        page.goto(url)
        page.wait_for_selector("#generate-btn")
        page.fill("#steps input", "10")
        page.click("#generate-btn")
        page.wait_for_function("() => (document.querySelector('#stability') || {}).innerText?.includes('±')")
        text = page.inner_text("#stability")
        assert "Stability" in text and "distinguishable" in text
        rows = [line for line in text.splitlines() if line.startswith(("proponent", "opponent"))]
        assert len(rows) == 2 * 8 and all("±" in r for r in rows)  # every shown image (k = 8 on the page)
        api = Client(url, verbose=False).predict(3, "ddim", 10, K, "ekfac", api_name="/attribute_generated")
        assert api["stability"]["pooled_se"] > 0
        assert all(h["se"] > 0 for h in api["proponents"] + api["opponents"])
    finally:
        demo.close()
