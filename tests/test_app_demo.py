"""Issue 17: the app before its index is finished, and on a Space's first visit.

* while the index is built, queries are answered over the shards finished so far (labelled
  partial), with the scores the finished index gives those images; the finished index is the
  very one a plain `build_index` writes (identical features file);
* `ATTRIBUTION_INDEX` at a missing folder: built there in the background, reused after a restart;
* `spaces.GPU` wraps the query work when a `spaces` package is importable (a stub here), and
  nothing does when it is not;
* in a real browser: draw a digit on the sketchpad, use an example;
* the README's screenshot (`assets/screenshots/app.png`) is taken here, from the real app with the
  default model (written there when UPDATE_SCREENSHOTS=1; always to tests/artifacts/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attribution.data import load_dataset
from attribution.influence import AttributionConfig
from explorer import launch, ui
from explorer.build_job import BuildJob, partial_note
from explorer.service import Explorer
from index.build import build_index
from index.layout import IndexLayout
from index.store import load as load_index

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting'"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
CFG = {"method": "ekfac", "draws": 2, "curvature_draws": 1, "query_draws": 4, "dim": 128}
N = 600  # three shards of 256 (the last one short)

SPACES_STUB = '''"""A stand-in for Hugging Face's `spaces` package: GPU() records each call in $SPACES_STUB_LOG."""
import functools
import os


def GPU(fn=None, **kwargs):
    def wrap(f):
        @functools.wraps(f)
        def inner(*a, **k):
            log = os.environ.get("SPACES_STUB_LOG")
            if log:
                with open(log, "a") as fh:
                    fh.write(f.__name__ + "\\n")
            return f(*a, **k)
        inner.spaces_gpu = True
        return inner
    return wrap(fn) if callable(fn) else wrap
'''


@pytest.fixture(scope="module")
def plain(tiny_workspace, tmp_path_factory):
    """A plain build of N tiny images that keeps its shards."""
    out = tmp_path_factory.mktemp("plain") / "index"
    build_index(
        tiny_workspace.model(),
        load_dataset("mnist", 1, tiny_workspace.size, N),
        out,
        AttributionConfig(**CFG),
        model_path="tiny",
        data_spec="mnist",
        progress=False,
        keep_shards=True,
    )
    return out


def test_partial_index_answers_over_the_finished_shards(tiny_workspace, plain, tmp_path):
    """A build caught after its first shard: the page's index holds those 256 images, says so,
    scores them as the finished index does, and grows when the next shard appears."""
    model = tiny_workspace.model()
    lay, part = IndexLayout(plain), IndexLayout(tmp_path / "building")
    part.shards.mkdir(parents=True)
    for f in (lay.build, lay.curvature, lay.projection, lay.density):
        if f.exists():
            shutil.copy(f, part.root / f.name)
    shards = lay.finished_shards()
    shutil.copy(shards[0][2], part.shards)
    ex = Explorer(model)
    job = BuildJob(ex, part.root, "tiny", n=N, config=CFG)
    ex.build = job
    assert ex.partial() is None and not ex.answering  # not started: nothing to serve
    job.data, job.n_images, job.phase = load_dataset("mnist", 1, tiny_workspace.size, N), N, "building"
    idx = ex.partial()
    assert len(idx) == 256 and partial_note(idx) == "partial: 256 of 600 images indexed"
    assert "partial: 256 of 600" in job.status() and ex.answering and not ex.ready
    full = load_index(plain, model)
    q = ex.training(100)
    ans = ex.attribute(q, None, 8)
    assert ans.data["partial"] == {"indexed": 256, "of": N} and ans.index_label == "ekfac (partial)"
    want = full.query(q.image, k=8, with_all=True).all_scores[:256]
    np.testing.assert_allclose(ans.data["scores"], want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert [h["row"] for h in ans.data["proponents"]] == list(np.argsort(-want, kind="stable")[:8])
    shutil.copy(shards[1][2], part.shards)  # the next shard appears: the next query sees it
    assert len(ex.index(None)) == 512
    assert ex.attribute(q, None, 8).data["partial"]["indexed"] == 512


@pytest.mark.slow
def test_background_build_serves_partial_answers_and_equals_a_plain_build(tiny_workspace, plain, tmp_path):
    """The app's background build (its own model copy, answering meanwhile) writes the very
    features file of a plain build; 20 queries get the same top-16."""
    model = tiny_workspace.model()
    ex = Explorer(model)
    demo = ui.build_demo(
        model,
        explorer=ex,
        build={"out": tmp_path / "app-built", "model_path": "tiny", "data": "mnist", "n": N, "config": CFG},
    )
    ex.start_build()
    seen, t0 = set(), time.time()
    while not ex.ready and time.time() - t0 < 300:
        assert ex.build.error is None, ex.build.error
        if (p := ex.partial()) is not None:
            seen.add(len(p))
        time.sleep(0.02)
    assert ex.ready
    ex.build.join(timeout=300)  # its warm-up queries run the shared model; ours below do too
    assert not ex.build.is_alive()
    assert seen <= {256, 512, 600}, seen  # 600: all shards done, the store being written
    built = tmp_path / "app-built"
    assert (built / "features.faiss").read_bytes() == (plain / "features.faiss").read_bytes()
    a, b = load_index(built, model), load_index(plain, model)
    for row in range(20):
        q = ex.training(row)
        ra, rb = a.query(q.image, k=16), b.query(q.image, k=16)
        assert [h.row for h in ra.proponents] == [h.row for h in rb.proponents]
    demo.close()


def test_spaces_gpu_wraps_the_query_work_only_where_spaces_is_importable(tmp_path):
    stub = tmp_path / "stub"
    (stub / "spaces").mkdir(parents=True)
    (stub / "spaces" / "__init__.py").write_text(SPACES_STUB)
    code = "import explorer.service as s; print(getattr(s.query_index, 'spaces_gpu', False))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    absent = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    present = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": f"{stub}:{ROOT}"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert absent.stdout.strip() == "False", absent.stderr
    assert present.stdout.strip() == "True", present.stderr


# --------------------------------------------------------------------------------- in a browser


def wait_status(page, text: str, timeout: float = 120_000) -> str:
    try:
        page.wait_for_function(
            "t => (document.querySelector('#status') || {}).innerText?.includes(t)", arg=text, timeout=timeout
        )
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-demo-failure.png"))
        raise AssertionError(
            f"waited for {text!r} in #status; it shows {page.inner_text('#status')!r}"
        ) from None
    return page.inner_text("#status")


def _start_app(env: dict, log: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < 120:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise AssertionError("the app did not come up: " + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while text not in log.read_text():
        assert proc.poll() is None and time.time() - t0 < timeout, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        time.sleep(0.5)


def _draw(page, selector: str) -> None:
    """A stroke (a '1' with a foot) across the sketchpad's canvas."""
    canvas = page.locator(f"{selector} canvas").first
    canvas.wait_for()
    box = canvas.bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.5 * w, y + 0.2 * h)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x + 0.5 * w, y + (0.2 + 0.06 * i) * h)
    page.mouse.move(x + 0.65 * w, y + 0.8 * h)
    page.mouse.up()


@pytest.mark.browser
@pytest.mark.slow
def test_space_first_visit_builds_then_reuses_the_index(tiny_workspace, browser, free_port, tmp_path):
    """ATTRIBUTION_INDEX at a missing folder (a Space's persistent /data/index): the app starts,
    builds it there and answers (a drawing, an example); restarted, it loads it; `spaces` present
    (a stub: the query work goes through spaces.GPU) on the first start, absent on the second."""
    from gradio_client import Client

    stub = tmp_path / "stub"
    (stub / "spaces").mkdir(parents=True)
    (stub / "spaces" / "__init__.py").write_text(SPACES_STUB)
    index, gpu_log, port = tmp_path / "data" / "index", tmp_path / "gpu.log", free_port()
    env = {
        **os.environ,
        "ATTRIBUTION_MODEL": str(tiny_workspace.model_dir),
        "ATTRIBUTION_INDEX": str(index),
        "ATTRIBUTION_BUILD_ARGS": "--n 200 --dim 128 --draws 2 --curvature-draws 1 --query-draws 4",
        "GRADIO_SERVER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "SPACES_STUB_LOG": str(gpu_log),
        "PYTHONPATH": f"{stub}:{ROOT}",
    }
    env.pop("GRADIO_SERVER_NAME", None)
    log1 = tmp_path / "first.log"
    proc = _start_app(env, log1, port)
    try:
        assert not (index / "manifest.json").exists()
        _wait_log(log1, "index ready", proc)
        assert (index / "manifest.json").exists() and "building the index at" in log1.read_text()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#generate-btn")
        page.wait_for_function(
            "() => document.querySelector('#banner').innerText.includes('200 training images')"
        )
        # draw a digit and attribute it
        page.get_by_role("tab", name="Upload").click()
        _draw(page, "#sketch")
        page.click("#sketch-btn")
        wait_status(page, "Top proponent")
        assert "your drawing" in page.inner_text("#query-info")
        assert page.locator("#proponents img").count() == 8
        # an example: a training image, then again (its answer now comes from the cache)
        page.get_by_text("training image 42", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#query-info').innerText.includes('training image id 42')"
        )
        wait_status(page, "Top proponent")
        first = page.inner_text("#status")
        page.get_by_text("training image 0", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#query-info').innerText.includes('training image id 0 ')"
        )
        page.get_by_text("training image 42", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#query-info').innerText.includes('training image id 42')"
        )
        page.wait_for_function("t => document.querySelector('#status').innerText == t", arg=first)
        page.close()
        assert "query_index" in gpu_log.read_text()  # spaces.GPU wrapped the query work
    finally:
        _stop(proc)
    calls = gpu_log.read_text()
    env2 = {k: v for k, v in env.items() if k != "SPACES_STUB_LOG"}
    env2["PYTHONPATH"] = str(ROOT)  # no `spaces` package now
    log2 = tmp_path / "second.log"
    proc = _start_app(env2, log2, port)
    try:
        assert "1 index(es) loaded" in log2.read_text() and "building" not in log2.read_text()
        r = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            3, "ddim", 5, 4, None, api_name="/attribute_generated"
        )
        assert len(r["proponents"]) == 4 and r["index"]["data"]["n"] == 200 and "partial" not in r
    finally:
        _stop(proc)
    assert gpu_log.read_text() == calls


@pytest.mark.browser
@pytest.mark.slow
def test_screenshot_of_the_app_with_the_default_model(browser, free_port, tmp_path, small_default_index):
    """The README's screenshot: the real app, the default model, a small index of it (500 images,
    cheap settings), an example clicked. UPDATE_SCREENSHOTS=1 writes assets/screenshots/app.png."""
    from PIL import Image

    from attribution.model import load_model

    model = load_model()
    out = small_default_index(tmp_path / "index", model)
    demo = ui.build_demo(model, [out])
    port = free_port()
    launch.serve(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True, warmup=False)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#generate-btn")
        page.get_by_text("seed 7", exact=True).click()
        wait_status(page, "Top proponent", timeout=180_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#query img, #proponents img, #opponents img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        page.wait_for_timeout(500)
        ARTIFACTS.mkdir(exist_ok=True)
        raw = ARTIFACTS / "app-demo-1280.png"
        page.screenshot(path=str(raw))
        page.close()
    finally:
        demo.close()
    img = Image.open(raw).convert("RGB")
    small = img.resize((960, round(img.size[1] * 960 / img.size[0])), Image.LANCZOS).quantize(96)
    small.save(ARTIFACTS / "app.png", optimize=True)
    assert (ARTIFACTS / "app.png").stat().st_size < 250_000
    if os.environ.get("UPDATE_SCREENSHOTS"):
        (ROOT / "assets" / "screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / "app.png", ROOT / "assets" / "screenshots" / "app.png")
