"""The explorer app: headless Chromium, the API, bad input, concurrent clients, exports.

Everything runs on the tiny (8×8, untrained) model with two 200-image indexes: EK-FAC (D = 256)
and pixel cosine. "A training image finds itself first" is checked with the pixel index, where
it holds by construction; an untrained model's EK-FAC scores need not rank it first.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.data import DataError, save_images
from attribution.sample import sample
from explorer import launch, render, ui
from explorer.report import fmt_score
from explorer.service import Busy, Explorer
from index.store import load as load_index

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting'"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
STEPS = 10  # sampling steps in these tests (the page default is 50)
CAPTION = re.compile(r"^#(\d+) · ([+-][0-9.e+-]+) · id (\d+) · label ([0-9?]+)$")


@pytest.fixture(scope="module")
def tiny(tiny_workspace):
    return {
        "model": tiny_workspace.model(),
        "ekfac": tiny_workspace.index("ekfac"),
        "pixel": tiny_workspace.index("pixel"),
        "ws": tiny_workspace,
    }


@pytest.fixture(scope="module")
def server(tiny, free_port):
    demo = ui.build_demo(tiny["model"], [tiny["ekfac"], tiny["pixel"]])
    port = free_port()
    launch.serve(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "demo": demo}
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """Good and bad upload files."""
    d = tmp_path_factory.mktemp("uploads")
    ds = tiny["ws"].data()
    out = {"train17": save_images(ds.images[17:18], d, prefix="train17_")[0]}
    good = np.zeros((28, 28), np.uint8)
    good[6:22, 12:16] = 255  # a "1"
    Image.fromarray(good).save(d / "one.png")
    out["good"] = d / "one.png"
    # bad and unusual files
    raw = (d / "one.png").read_bytes()
    (d / "corrupt.png").write_bytes(raw[: len(raw) // 2])
    out["corrupt"] = d / "corrupt.png"
    (d / "notes.png").write_text("this is a text file, not an image\n")
    out["text"] = d / "notes.png"
    (d / "empty.png").write_bytes(b"")
    out["empty"] = d / "empty.png"
    Image.new("L", (6000, 6000)).save(d / "huge.png")
    out["huge"] = d / "huge.png"
    Image.new("L", (7000, 7000)).save(d / "too-many-pixels.png")
    out["too_many_pixels"] = d / "too-many-pixels.png"
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[6:22, 12:16] = (255, 255, 255, 255)  # opaque white stroke on transparent
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    out["rgba"] = d / "rgba.png"
    Image.fromarray(good.astype(np.uint16) * 257).save(d / "sixteen.png")  # mode I;16
    out["16bit"] = d / "sixteen.png"
    assert Image.open(out["16bit"]).mode.startswith("I")
    return out


def attribute(client, path, k=8, method="ekfac") -> dict:
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), k, method, api_name="/attribute")


# --------------------------------------------------------------------------------- the browser


def captions(page, gallery: str) -> list[str]:
    return [c.strip() for c in page.locator(f"#{gallery} .caption-label").all_inner_texts()]


def wait_status(page, text: str, timeout: float = 120_000) -> str:
    try:
        page.wait_for_function(
            "t => (document.querySelector('#status') || {}).innerText?.includes(t)", arg=text, timeout=timeout
        )
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-failure.png"))
        state = {sel: page.inner_text(sel) for sel in ("#status", "#query-info", "#method")}
        state["row"] = page.input_value("#row input") if page.locator("#row input").count() else None
        raise AssertionError(f"waited for {text!r} in #status; the page shows {state}") from None
    return page.inner_text("#status")


def fill_number(page, selector: str, value) -> None:
    """Fill a number box; retried, because a tab's first render can reset a just-filled box."""
    for _ in range(10):
        page.fill(selector, str(value))
        page.wait_for_timeout(300)
        if page.input_value(selector) == str(value):
            return
    raise AssertionError(f"{selector} did not keep the value {value}")


def choose(page, dropdown: str, option: str) -> None:
    page.click(f"#{dropdown} input")
    page.get_by_role("option", name=option, exact=True).click()
    page.locator(f"#{dropdown} input").blur()
    assert page.input_value(f"#{dropdown} input") == option


@pytest.mark.browser
def test_browser(server, client, browser, tiny, files, tmp_path):
    k = 8
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(60_000)
    page.goto(server["url"])
    page.wait_for_selector("#generate-btn")

    # 1. generate with a seed: k scored images on each side, and the API agrees on the top score
    fill_number(page, "#seed input", 3)
    fill_number(page, "#steps input", STEPS)
    page.click("#generate-btn")
    wait_status(page, "Top proponent")
    page.wait_for_function(
        "k => document.querySelectorAll('#proponents .caption-label').length == k "
        "&& document.querySelectorAll('#opponents .caption-label').length == k",
        arg=k,
    )
    props, opps = captions(page, "proponents"), captions(page, "opponents")
    assert len(props) == k and len(opps) == k
    parsed = [CAPTION.match(c) for c in props + opps]
    assert all(parsed), props + opps
    assert [int(m.group(1)) for m in parsed[:k]] == list(range(1, k + 1))
    assert page.locator("#proponents img").count() == k
    assert "seed 3" in page.inner_text("#query-info")
    assert "query gradient" in page.inner_text("#timings")
    page.wait_for_selector("#histogram img, #histogram svg, #histogram canvas")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#query img, #proponents img, #opponents img')]"
        ".every(i => i.complete && i.naturalWidth > 0) "
        "&& document.querySelectorAll('#query img').length == 1"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"))

    api = client.predict(3, "ddim", STEPS, k, "ekfac", api_name="/attribute_generated")
    assert fmt_score(api["proponents"][0]["score"]) == parsed[0].group(2)
    assert int(parsed[0].group(3)) == api["proponents"][0]["row"]
    assert [fmt_score(h["score"]) for h in api["opponents"]] == [m.group(2) for m in parsed[k:]]
    # the query is the 8-bit image: the same sample, saved as a PNG and uploaded, scores the same
    s = sample(tiny["model"], 1, seed=3, sampler="ddim", steps=STEPS, progress=False)
    png = save_images(s.images, tmp_path, prefix="generated_")[0]
    up = attribute(client, png, k)
    assert up["scores"] == api["scores"]
    assert up["proponents"][0]["score"] == api["proponents"][0]["score"]

    # 2. export: a PNG report, JSON and CSV of the scores, the query
    page.click("#export-btn")
    page.wait_for_function("() => document.querySelectorAll('#export-files a').length >= 4")
    names = page.eval_on_selector_all(
        "#export-files a", "els => els.map(e => e.getAttribute('download') || e.href)"
    )
    assert any(n.endswith(".png") and "report" in n for n in names), names
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".csv") for n in names)

    # 3. a bad upload: a friendly message, and the page keeps the previous results
    page.get_by_role("tab", name="Upload").click()
    page.set_input_files("#upload input[type=file]", str(files["text"]))
    status = wait_status(page, "not a readable image")
    assert "notes.png" in status and "previous query" in status
    assert captions(page, "proponents") == props
    page.set_input_files("#upload input[type=file]", str(files["empty"]))
    status = wait_status(page, "empty.png: the file is empty")
    assert captions(page, "proponents") == props

    # 4. pick the pixel method, upload a training image's PNG: it is its own top proponent
    choose(page, "method", "pixel")
    wait_status(page, "method pixel")
    page.set_input_files("#upload input[type=file]", str(files["train17"]))
    wait_status(page, "Top proponent: id 17 ")
    assert "train17_" in page.inner_text("#query-info")

    # 5. pick a training image by id: it finds itself first
    page.get_by_role("tab", name="Training image").click()
    fill_number(page, "#row input", 42)
    assert page.input_value("#method input") == "pixel"
    page.click("#row-btn")
    status = wait_status(page, "Top proponent: id 42 ")
    assert captions(page, "proponents")[0].startswith("#1 · +1 · id 42 ")  # cosine 1 with itself
    assert "training image id 42" in page.inner_text("#query-info")

    # 6. clicking a gallery item makes that training image the query
    opp_row = int(CAPTION.match(captions(page, "opponents")[0]).group(3))
    page.locator("#opponents .thumbnail-item").nth(0).click()
    wait_status(page, f"Top proponent: id {opp_row} ")
    assert f"training image id {opp_row} " in page.inner_text("#query-info")
    page.close()


# --------------------------------------------------------------------------------- API, bad input


@pytest.mark.parametrize(
    "kind, words",
    [
        ("corrupt", "corrupt or truncated"),
        ("text", "not a readable image"),
        ("empty", "empty"),
        ("too_many_pixels", "pixel limit"),
    ],
)
def test_api_refuses_bad_files_with_a_plain_message(client, files, kind, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        attribute(client, files[kind])
    msg = str(e.value)
    assert words in msg and files[kind].name in msg, msg
    assert "Traceback" not in msg and "/tmp" not in msg, msg
    assert attribute(client, files["good"], k=3)["proponents"], "the app stopped answering"


@pytest.mark.parametrize(
    "kind, words",
    [
        ("huge", "resized from 6000×6000 to 8×8"),
        ("rgba", "transparent pixels put on a black background"),
        ("16bit", "16-bit pixels scaled to 8 bits"),
    ],
)
def test_api_converts_unusual_images_and_says_how(client, files, kind, words):
    res = attribute(client, files[kind], k=4)
    assert words in "; ".join(res["query"]["notes"]), res["query"]
    assert len(res["proponents"]) == 4 and len(res["scores"]) == 200
    assert attribute(client, files["good"], k=3)["proponents"]


def test_api_rgba_and_16bit_match_their_plain_version(client, files):
    """Conversion is the library's: the RGBA and 16-bit files score like the 8-bit grey file."""
    plain = attribute(client, files["good"])
    for kind in ("rgba", "16bit"):
        assert attribute(client, files[kind])["scores"] == plain["scores"], kind


def test_api_bad_arguments_and_empty_upload(client, files):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no file was uploaded"):
        client.predict(None, 8, "ekfac", api_name="/attribute")
    with pytest.raises(AppError, match="k must be between"):
        attribute(client, files["good"], k=0)
    with pytest.raises(AppError, match="steps must be between"):
        client.predict(0, "ddim", 0, 8, "ekfac", api_name="/attribute_generated")
    res = attribute(client, files["good"], k=5, method="pixel")
    assert res["settings"] == {"method": "pixel", "k": 5} and res["index"]["method"] == "pixel"
    assert json.dumps(res)  # plain JSON


def test_api_payload(client, tiny, files):
    res = attribute(client, files["train17"], k=6, method="pixel")
    assert [h["rank"] for h in res["proponents"]] == list(range(1, 7))
    assert res["proponents"][0]["row"] == 17 and res["proponents"][0]["score"] == pytest.approx(1, abs=1e-5)
    scores = np.asarray(res["scores"])
    assert scores.shape == (200,)
    np.testing.assert_allclose(sorted(scores)[::-1][:6], [h["score"] for h in res["proponents"]], rtol=1e-6)
    np.testing.assert_allclose(sorted(scores)[:6], [h["score"] for h in res["opponents"]], rtol=1e-6)
    assert res["index"]["data"]["n"] == 200 and res["index"]["model"]["weights_sha256"]
    assert {"query_gradient", "search", "decoding"} <= set(res["timings_s"])


# --------------------------------------------------------------------------------- load


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("app_load", ROOT / "benchmarks" / "app_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concurrent_clients_get_the_single_client_answers(server, tmp_path):
    bench = _load_benchmark()
    files = bench.query_files(tmp_path, 1, 8)
    res = bench.run_load(server["url"], files, clients=8, queries=5, k=8)
    print(
        f"\napp load (tiny model, in-process server): {res['ok']}/{res['calls']} ok, latency p50 "
        f"{res['latency_s']['p50']} s, p95 {res['latency_s']['p95']} s, single-client p50 "
        f"{res['single_client_latency_s']['p50']} s, wall {res['wall_s']} s"
    )
    assert res["errors"] == [] and res["mismatches"] == []
    assert res["ok"] == 40


# --------------------------------------------------------------------------------- library-level


def test_explorer_queries_and_exports(tiny, files, tmp_path):
    ex = Explorer(
        tiny["model"], [load_index(tiny["ekfac"], tiny["model"]), load_index(tiny["pixel"], tiny["model"])]
    )
    assert ex.labels == ["ekfac", "pixel"]
    ans = ex.attribute(ex.training(5, "pixel"), "pixel", k=4)
    assert ans.data["proponents"][0]["row"] == 5
    out = [Path(p) for p in ex.export(ans)]
    report_png, js, csv_path, query_png = out
    img = Image.open(report_png)
    assert img.size[0] >= 1000 and img.size[1] >= 500
    assert json.loads(js.read_text())["proponents"][0]["row"] == 5
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("rank,row,score") and len(lines) == 201
    assert lines[1].split(",")[1] == "5"
    assert Image.open(query_png).size == (8, 8)
    with pytest.raises(DataError, match="between 0 and 199"):
        ex.training(200, "pixel")
    with pytest.raises(DataError, match="unknown method"):
        ex.index("nope")


@pytest.mark.slow
def test_default_index_is_built_in_the_background(tiny, tmp_path):
    """A missing index: the page shows the build state, then answers."""
    out = tmp_path / "built"
    cfg = {"method": "ekfac", "draws": 2, "curvature_draws": 1, "query_draws": 4, "dim": 128}
    ex = Explorer(tiny["model"])
    demo = ui.build_demo(
        tiny["model"],
        explorer=ex,
        build={"out": out, "model_path": "tiny", "data": "mnist", "n": 64, "config": cfg},
    )
    assert not ex.ready
    ex.start_build()
    assert "Building the index" in render.index_md(ex)
    with pytest.raises(Busy, match="Building the index"):
        ex.generated(0, "ddim", STEPS)
    t0 = time.time()
    while not ex.ready and time.time() - t0 < 120:
        assert ex.build.error is None, ex.build.error
        time.sleep(0.2)
    assert ex.ready and ex.build.estimate_s > 0
    ex.build.join(timeout=300)  # its warm-up queries run the module's shared model
    assert not ex.build.is_alive()
    assert len(ex.index(None)) == 64 and (out / "manifest.json").exists()
    assert "64 training images" in render.index_md(ex)
    demo.close()


def test_main_refuses_a_missing_model_or_index(tiny, tmp_path, capsys):
    args = launch.parse_args(["--model", str(tmp_path / "nope"), "--port", "0"])
    assert launch.main(args) == 2
    assert "model folder not found" in capsys.readouterr().err
    args = launch.parse_args(["--model", str(tiny["ws"].model_dir), "--index", str(tmp_path / "none")])
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert "index folder not found" in err and "attribution index build" in err


# --------------------------------------------------------------------------------- hostile API calls (issue 14)


@pytest.fixture
def samples(monkeypatch):
    """Counts the sampling runs of the in-process server."""
    import explorer.service as service

    calls = []
    real = service.sample
    monkeypatch.setattr(service, "sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize(
    "seed, steps, words",
    [
        (None, 10, "the seed is missing"),
        (-1, 10, "the seed must be between 0 and"),
        (2**40, 10, "the seed must be between 0 and"),
        (0, None, "steps is missing"),
        (0, -5, "steps must be between 1 and 1000"),
        (0, 10**9, "steps must be between 1 and 1000"),
    ],
)
def test_generated_refuses_bad_seed_and_steps_before_sampling(client, samples, seed, steps, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(seed, "ddim", steps, 8, "ekfac", api_name="/attribute_generated")
    assert words in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    assert samples == []


@pytest.mark.parametrize("k", [0, -1, 10**9])
def test_generated_refuses_bad_k_before_sampling(client, samples, k):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="k must be between 1 and"):
        client.predict(0, "ddim", STEPS, k, "ekfac", api_name="/attribute_generated")
    assert samples == [], "sampled before refusing k"


def test_generated_with_missing_k_uses_the_default(client):
    res = client.predict(0, "ddim", STEPS, None, "ekfac", api_name="/attribute_generated")
    assert res["settings"]["k"] == 8 and len(res["proponents"]) == 8


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_api_file_given_as_a_url_is_refused_never_fetched(server, client, files, scheme):
    """A raw API call whose file payload is a URL (here: a local server that counts requests)."""
    import http.server
    import threading

    import httpx

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(files["good"].read_bytes())

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"{scheme}://127.0.0.1:{web.server_address[1]}/one.png"
    try:
        payload = {"path": url, "url": url, "orig_name": "one.png", "meta": {"_type": "gradio.FileData"}}
        api = server["url"] + "gradio_api/call/attribute"
        event = httpx.post(api, json={"data": [payload, 4, "pixel"]}, timeout=60).json()["event_id"]
        text = httpx.get(f"{api}/{event}", timeout=60).text
    finally:
        web.shutdown()
    assert "event: error" in text and launch.URL_REFUSED in text, text
    assert hits == [], hits
    assert attribute(client, files["good"], k=3)["proponents"], "the app stopped answering"


def test_api_refuses_an_eps_upload_before_decoding(client, tmp_path):
    import io

    from gradio_client.exceptions import AppError

    b = io.BytesIO()
    Image.new("L", (8, 8), 255).save(b, "EPS")
    for name in ("drawing.eps", "drawing.png"):  # the name does not matter: the bytes are checked
        (tmp_path / name).write_bytes(b.getvalue())
        with pytest.raises(AppError) as e:
            attribute(client, tmp_path / name)
        msg = str(e.value)
        assert "accepted: PNG, JPEG, WebP, GIF, BMP, TIFF" in msg and name in msg, msg
        assert "Traceback" not in msg and "/tmp" not in msg, msg
