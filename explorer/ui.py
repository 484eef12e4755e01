"""The explorer page (Gradio Blocks): generate, upload or pick a query image; see its proponents
and opponents, the histogram of all scores, timings; export a report. The same attribution is the
page's API (`/attribute`, `/attribute_generated`).

Every event fills the page through named outputs (`Page`): a handler returns a dict of the
components it changes; the others keep their values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np

from attribution.model import DiffusionModel
from explorer import bands_view, report
from explorer.api import EXPECTED, add_api
from explorer.build_job import BuildJob, partial_note
from explorer.page import Page, layout, rank_choices
from explorer.render import QUERY_PX, enlarge, gallery, index_md, plain, timings_md
from explorer.service import ALL_TIMESTEPS, Answer, Explorer, Query
from index.store import load as load_index

log = logging.getLogger("attribution.app")
ROOT = Path(__file__).resolve().parent.parent
# the example queries under each tab; their answers are cached once the index is finished
EXAMPLE_SEEDS = (0, 7, 21)
EXAMPLE_UPLOAD = ROOT / "assets" / "examples" / "drawn-seven.png"
EXAMPLE_ROWS = (0, 42)


class Handlers:
    """The page's event handlers: each returns {component: new value} for what it changes."""

    def __init__(self, ex: Explorer, page: Page):
        self.ex, self.page = ex, page
        self.cache: dict[tuple, dict] = {}  # the examples' answers (finished index only)
        self.upload_example = _sha256(EXAMPLE_UPLOAD) if EXAMPLE_UPLOAD.exists() else None

    def query(
        self,
        make: Callable[[], Query],
        label,
        k,
        bands,
        rank_by,
        previous: Answer | None,
        example: tuple | None = None,
    ) -> dict:
        """Make the query, attribute it, fill the page. Bad input: a warning, the page stays.
        `example`: the query is one of the page's examples, whose answers are kept once the
        index is finished (a partial index's answers are not)."""
        t0 = time.perf_counter()
        key = None if example is None or not self.ex.ready else (*example, label or None, k, bands, rank_by)
        if key in self.cache:
            return self.cache[key]
        try:
            q = make()
            out = self._filled(q, self.ex.attribute(q, label or None, k, bands, rank_by), t0)
            if key is not None and not out[self.page.answer].data.get("partial"):
                self.cache[key] = out
            return out
        except EXPECTED as e:
            msg = str(e)
        except Exception as e:  # keep answering; the log has the traceback
            log.exception("query failed")
            msg = f"something went wrong ({type(e).__name__}: {e})"
        gr.Warning(plain(msg))
        keep = "" if previous is None else " The results below are still those of the previous query."
        return {self.page.status: f"⚠️ **{msg}**{keep}"}

    def _filled(self, q: Query, ans: Answer, t0: float) -> dict:
        p, idx, data = self.page, self.ex.index(ans.index_label), ans.data
        fig = report.score_histogram(data)
        info = f"**{q.description}**" + ("" if not q.notes else " — " + "; ".join(q.notes))
        if q.notes:
            gr.Info("The image was converted: " + "; ".join(q.notes))
        data["timings_s"]["render"] = max(0.0, time.perf_counter() - t0 - sum(data["timings_s"].values()))
        top = data["proponents"][0]
        status = (
            f"**{partial_note(idx)}** (the index is still being built; this answer covers those "
            "images only) · "
            if data.get("partial")
            else ""
        ) + (
            f"Top proponent: id {top['row']} (label {top['label']}), score "
            f"{report.fmt_score(top['score'])} · {len(data['proponents'])} proponents and "
            f"{len(data['opponents'])} opponents of {len(idx)} training images, "
            f"method {ans.index_label}."
        )
        return {
            p.query_img: enlarge(q.u8, QUERY_PX),
            p.query_md: info,
            p.status: status,
            p.props: gallery(ans, "proponents", idx.thumbs),
            p.opps: gallery(ans, "opponents", idx.thumbs),
            p.plot: fig,
            p.timings: timings_md(data["timings_s"]),
            p.answer: ans,
            p.files: gr.update(value=None, visible=False),
            p.stability: report.stability_md(data),
            p.band_plot: bands_view.figure(data),
            p.band_md: bands_view.summary_md(data)
            or "No timestep split for this method (it draws no timesteps).",
        }

    def on_generate(self, seed, sampler, steps, condition, label, k, bands, rank_by, previous):
        example = (
            ("generate", seed, sampler, steps, condition) if seed in EXAMPLE_SEEDS and steps == 50 else None
        )
        make = lambda: self.ex.generated(seed, sampler, steps, condition)  # noqa: E731
        return self.query(make, label, k, bands, rank_by, previous, example)

    def on_upload(self, path, condition, label, k, bands, rank_by, previous):
        example = (
            ("upload", condition)
            if path and self.upload_example and _sha256(path) == self.upload_example
            else None
        )
        make = lambda: self.ex.uploaded(path, condition)  # noqa: E731
        return self.query(make, label, k, bands, rank_by, previous, example)

    def on_row(self, row, label, k, bands, rank_by, previous):
        example = ("training", row) if row in EXAMPLE_ROWS else None
        make = lambda: self.ex.training(row, label or None)  # noqa: E731
        return self.query(make, label, k, bands, rank_by, previous, example)

    def on_sketch(self, value, condition, label, k, bands, rank_by, previous):
        make = lambda: self.ex.drawn(_composite(value), condition)  # noqa: E731
        return self.query(make, label, k, bands, rank_by, previous)

    def on_rerun(self, label, k, bands, rank_by, previous):
        """The same query with another method, k or band setting (it was sampled or decoded before)."""
        if previous is None:
            return gr.skip()
        return self.query(lambda: replace(previous.query, seconds=0.0), label, k, bands, rank_by, previous)

    def on_bands(self, label, k, bands, previous):
        """Another band count: the band selector's choices follow (back to the whole score)."""
        out = {self.page.rank_by: gr.update(choices=rank_choices(self.ex, bands), value=ALL_TIMESTEPS)}
        if previous is not None:
            make = lambda: replace(previous.query, seconds=0.0)  # noqa: E731
            out.update(self.query(make, label, k, bands, ALL_TIMESTEPS, previous))
        return out

    def on_select(self, side: str):
        """A click on a gallery item of `side` makes that training image the query."""

        def pick(previous, label, k, bands, rank_by, evt: gr.SelectData):
            if previous is None or evt.index is None:
                return gr.skip()
            hit = previous.data[side][evt.index if isinstance(evt.index, int) else evt.index[0]]
            make = lambda: self.ex.training(hit["row"], previous.index_label)  # noqa: E731
            return self.query(make, label, k, bands, rank_by, previous)

        return pick

    def on_export(self, previous):
        if previous is None:
            gr.Warning("nothing to export yet: make a query first")
            return gr.update(visible=False)
        return gr.update(value=self.ex.export(previous), visible=True)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _composite(value) -> np.ndarray | None:
    """The Sketchpad's value (background, layers, composite) -> the drawing as (H, W) uint8."""
    img = value.get("composite") if isinstance(value, dict) else value
    if img is None:
        return None
    img = np.asarray(img)
    if img.ndim == 3:  # RGB(A): light strokes on a dark canvas; transparency counts as dark
        rgb = img[..., :3].astype(np.float32).mean(-1)
        img = rgb * (img[..., 3] / 255.0) if img.shape[2] == 4 else rgb
    return np.clip(img, 0, 255).astype(np.uint8)


def _examples(page: Page, h: Handlers) -> None:
    """Examples under the query column: a click fills the input and attributes it (answers cached
    in memory once the index is finished, so a second click shows them at once)."""
    p = page
    ui = {"outputs": p.outputs, "api_visibility": "private"}
    with p.query_col:
        gr.Markdown("**Examples** (click one):", elem_id="examples-title")
        gen = gr.Examples(
            [[s] for s in EXAMPLE_SEEDS],
            [p.seed],
            label="generated, by seed",
            api_visibility="private",
            example_labels=[f"seed {s}" for s in EXAMPLE_SEEDS],
            elem_id="examples-seed",
        )
        gen.load_input_event.then(
            lambda: ("ddim", 50), None, [p.sampler, p.steps], api_visibility="private"
        ).then(h.on_generate, [p.seed, p.sampler, p.steps, p.gen_condition, *_settings(p)], **ui)
        if EXAMPLE_UPLOAD.exists():
            up = gr.Examples(
                [[str(EXAMPLE_UPLOAD)]],
                [p.upload],
                label="an upload (a drawn 7)",
                api_visibility="private",
                elem_id="examples-upload",
            )
            up.load_input_event.then(h.on_upload, [p.upload, p.upload_condition, *_settings(p)], **ui)
        row = gr.Examples(
            [[r] for r in EXAMPLE_ROWS],
            [p.row],
            label="a training image, by id",
            api_visibility="private",
            example_labels=[f"training image {r}" for r in EXAMPLE_ROWS],
            elem_id="examples-row",
        )
        row.load_input_event.then(h.on_row, [p.row, *_settings(p)], **ui)


def _settings(p: Page) -> list:
    """The inputs every query reads after its own: method, k, band count, band to rank by, the last answer."""
    return [p.method, p.k, p.bands, p.rank_by, p.answer]


def _wire(page: Page, h: Handlers) -> None:
    p = page
    ui = {"outputs": p.outputs, "api_visibility": "undocumented"}
    generate_in = [p.seed, p.sampler, p.steps, p.gen_condition, *_settings(p)]
    p.gen_btn.click(h.on_generate, generate_in, **ui)
    p.seed.submit(h.on_generate, generate_in, **ui)
    # an upload or a paste shows its preview and is attributed at once
    p.upload.upload(h.on_upload, [p.upload, p.upload_condition, *_settings(p)], **ui)
    p.sketch_btn.click(h.on_sketch, [p.sketch, p.upload_condition, *_settings(p)], **ui)
    p.row_btn.click(h.on_row, [p.row, *_settings(p)], **ui)
    p.row.submit(h.on_row, [p.row, *_settings(p)], **ui)
    p.method.input(h.on_rerun, _settings(p), **ui)
    p.k.release(h.on_rerun, _settings(p), **ui)
    p.rank_by.input(h.on_rerun, _settings(p), **ui)
    p.bands.input(
        h.on_bands,
        [p.method, p.k, p.bands, p.answer],
        outputs=[*p.outputs, p.rank_by],
        api_visibility="undocumented",
    )
    p.props.select(h.on_select("proponents"), [p.answer, p.method, p.k, p.bands, p.rank_by], **ui)
    p.opps.select(h.on_select("opponents"), [p.answer, p.method, p.k, p.bands, p.rank_by], **ui)
    p.export_btn.click(h.on_export, [p.answer], [p.files], api_visibility="undocumented")


def _follow_build(ex: Explorer, page: Page, api_method: gr.Dropdown) -> None:
    """While a build runs: refresh the banner, then enable the method choices."""
    timer = gr.Timer(2.0, active=ex.build is not None and not ex.ready)

    def poll():
        if not ex.ready:
            return {page.banner: index_md(ex), timer: gr.Timer(active=True)}
        labels = ex.labels
        return {
            page.banner: index_md(ex),
            timer: gr.Timer(active=False),
            page.method: gr.update(choices=labels, value=labels[0], visible=len(labels) > 1),
            api_method: gr.update(choices=labels, value=labels[0]),
        }

    timer.tick(poll, None, [page.banner, page.method, api_method, timer], api_visibility="private")
    page.method.change(
        lambda m: index_md(ex, m or None) if ex.ready else gr.update(),
        page.method,
        page.banner,
        api_visibility="private",
    )


def build_demo(
    model: DiffusionModel,
    index_dirs: Sequence[str | Path] = (),
    *,
    explorer: Explorer | None = None,
    build: dict | None = None,
):
    """The Gradio Blocks app for `model` and the indexes in `index_dirs` (IndexLoadError if one
    does not fit the model). `build` = BuildJob keyword arguments (out, model_path, data, n,
    config): build that index in the background (`launch.serve()` starts it, or call
    `explorer.start_build()`); the page shows its progress."""
    ex = explorer or Explorer(model, [load_index(d, model) for d in index_dirs])
    if build is not None and ex.build is None:
        ex.build = BuildJob(ex, **build)  # started by serve(), once the page is up
    default_label = ex.labels[0] if ex.labels else None
    n_rows = len(ex.index(None)) if ex.ready else None
    with gr.Blocks(title="Training-data attribution explorer", delete_cache=(3600, 7200)) as demo:
        page = layout(ex, default_label, n_rows)
        handlers = Handlers(ex, page)
        _wire(page, handlers)
        _examples(page, handlers)
        api_method = add_api(ex, default_label)
        _follow_build(ex, page, api_method)
    demo.explorer = ex
    return demo
