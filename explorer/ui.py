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
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import numpy as np

from attribution.errors import AttributionError
from attribution.model import DiffusionModel
from attribution.sample import SAMPLERS
from explorer import report
from explorer.build_job import BuildJob, partial_note
from explorer.render import QUERY_PX, enlarge, gallery, index_md, plain, timings_md
from explorer.service import MAX_K, Answer, Busy, Explorer, Query
from index.store import load as load_index

log = logging.getLogger("attribution.app")
ROOT = Path(__file__).resolve().parent.parent
# the example queries under each tab; their answers are cached once the index is finished
EXAMPLE_SEEDS = (0, 7, 21)
EXAMPLE_UPLOAD = ROOT / "assets" / "examples" / "drawn-seven.png"
EXAMPLE_ROWS = (0, 42)
SKETCH_PX = 224
EXPECTED = (AttributionError, Busy)  # failures whose message is for the user (no traceback)


def image_file(**kwargs) -> gr.Image:
    """`gr.Image` (preview, paste) that hands the uploaded file over as it is, undecoded: the
    library reads it and says in plain words what it cannot read (a text file, an empty one).
    (An instance attribute, not a subclass: Gradio writes a .pyi file next to any subclass.)"""
    img = gr.Image(**kwargs)
    decode = img.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return decode(payload)

    img.preprocess = preprocess
    return img


@dataclass
class Page:
    """The components that events read or fill, by name."""

    banner: gr.Markdown
    seed: gr.Number
    sampler: gr.Dropdown
    steps: gr.Number
    gen_btn: gr.Button
    upload: gr.Image
    row: gr.Number
    row_btn: gr.Button
    query_img: gr.Image
    query_md: gr.Markdown
    method: gr.Dropdown
    k: gr.Slider
    export_btn: gr.Button
    files: gr.File
    status: gr.Markdown
    props: gr.Gallery
    opps: gr.Gallery
    plot: gr.Plot
    timings: gr.Markdown
    answer: gr.State  # the last Answer (None before the first query)
    stability: gr.Markdown
    sketch: gr.Sketchpad
    sketch_btn: gr.Button
    query_col: gr.Column

    @property
    def outputs(self) -> list:
        """Everything a query fills (the order of the undocumented API endpoints' outputs)."""
        return [
            self.query_img,
            self.query_md,
            self.status,
            self.props,
            self.opps,
            self.plot,
            self.timings,
            self.answer,
            self.files,
            self.stability,
        ]


# ---- layout ---------------------------------------------------------------------------------------


def _query_tabs(n_rows: int | None) -> dict:
    with gr.Tabs():
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed", min_width=70)
                sampler = gr.Dropdown(
                    list(SAMPLERS), value="ddim", label="sampler", min_width=70, elem_id="sampler"
                )
                steps = gr.Number(
                    50, label="steps", precision=0, minimum=1, maximum=1000, min_width=70, elem_id="steps"
                )
            gen_btn = gr.Button("Generate and attribute", variant="primary", elem_id="generate-btn")
        with gr.Tab("Upload", id="upload"):
            upload = image_file(
                label="drop, paste or choose an image (PNG, JPEG, …): it is attributed at once",
                type="filepath",
                sources=["upload", "clipboard"],
                height=150,
                elem_id="upload",
            )
            sketch = gr.Sketchpad(
                np.zeros((SKETCH_PX, SKETCH_PX), np.uint8),
                label="or draw a digit (light on dark)",
                type="numpy",
                image_mode="L",
                canvas_size=(SKETCH_PX, SKETCH_PX),
                fixed_canvas=True,
                layers=False,
                transforms=(),
                height=SKETCH_PX + 70,
                brush=gr.Brush(colors=["#ffffff"], default_size=14, color_mode="fixed"),
                elem_id="sketch",
            )
            sketch_btn = gr.Button("Attribute the drawing", variant="primary", elem_id="sketch-btn")
        with gr.Tab("Training image", id="training"):
            row = gr.Number(
                0,
                label=f"training image id (0–{n_rows - 1})" if n_rows else "training image id",
                precision=0,
                minimum=0,
                elem_id="row",
            )
            row_btn = gr.Button("Attribute this training image", variant="primary", elem_id="row-btn")
    return {
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "gen_btn": gen_btn,
        "upload": upload,
        "row": row,
        "row_btn": row_btn,
        "sketch": sketch,
        "sketch_btn": sketch_btn,
    }


def _query_column(ex: Explorer, default_label: str | None, n_rows: int | None) -> dict:
    c = _query_tabs(n_rows)
    c["query_img"] = gr.Image(
        label="query, as the model sees it",
        type="pil",
        format="png",
        interactive=False,
        height=QUERY_PX + 24,
        elem_id="query",
        buttons=["download"],
    )
    c["query_md"] = gr.Markdown("", elem_id="query-info")
    with gr.Row(equal_height=True):
        c["method"] = gr.Dropdown(
            ex.labels,
            value=default_label,
            label="method",
            min_width=100,
            visible=len(ex.labels) > 1 or ex.build is not None,
            elem_id="method",
        )
        c["k"] = gr.Slider(1, MAX_K, value=8, step=1, label="k (shown per side)", elem_id="k", min_width=100)
    c["export_btn"] = gr.Button("Export report (PNG, JSON, CSV)", size="sm", elem_id="export-btn")
    c["files"] = gr.File(
        label="report and scores", file_count="multiple", visible=False, elem_id="export-files", height=120
    )
    return c


def _results_column() -> dict:
    c = {"status": gr.Markdown("Choose a query on the left.", elem_id="status")}
    c["props"] = gr.Gallery(
        label="proponents (highest τ: make the query more likely)",
        columns=8,
        height="auto",
        format="png",
        object_fit="contain",
        allow_preview=False,
        elem_id="proponents",
        elem_classes=["hits"],
    )
    c["opps"] = gr.Gallery(
        label="opponents (lowest τ: make it less likely)",
        columns=8,
        height="auto",
        format="png",
        object_fit="contain",
        allow_preview=False,
        elem_id="opponents",
        elem_classes=["hits"],
    )
    c["stability"] = gr.Markdown("", elem_id="stability")
    with gr.Row(equal_height=False):
        c["plot"] = gr.Plot(label="all scores", elem_id="histogram", min_width=360, scale=3)
        c["timings"] = gr.Markdown("", elem_id="timings", min_height=40)
    return c


def _layout(ex: Explorer, default_label: str | None, n_rows: int | None) -> Page:
    answer = gr.State(None)
    gr.Markdown(
        "## Which training images made this?\nInfluence-function attribution for a "
        "diffusion model: generate, draw, upload or pick an image; see the training images "
        "that most raise (proponents) and lower (opponents) its likelihood.",
        elem_id="title",
    )
    banner = gr.Markdown(index_md(ex), elem_id="banner")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=290) as query_col:
            left = _query_column(ex, default_label, n_rows)
        with gr.Column(scale=3):
            right = _results_column()
    return Page(banner=banner, answer=answer, query_col=query_col, **left, **right)


# ---- events ---------------------------------------------------------------------------------------


class Handlers:
    """The page's event handlers: each returns {component: new value} for what it changes."""

    def __init__(self, ex: Explorer, page: Page):
        self.ex, self.page = ex, page
        self.cache: dict[tuple, dict] = {}  # the examples' answers (finished index only)
        self.upload_example = _sha256(EXAMPLE_UPLOAD) if EXAMPLE_UPLOAD.exists() else None

    def query(
        self, make: Callable[[], Query], label, k, previous: Answer | None, example: tuple | None = None
    ) -> dict:
        """Make the query, attribute it, fill the page. Bad input: a warning, the page stays.
        `example`: the query is one of the page's examples, whose answers are kept once the
        index is finished (a partial index's answers are not)."""
        t0 = time.perf_counter()
        key = None if example is None or not self.ex.ready else (*example, label or None, k)
        if key in self.cache:
            return self.cache[key]
        try:
            q = make()
            out = self._filled(q, self.ex.attribute(q, label or None, k), t0)
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
        }

    def on_generate(self, seed, sampler, steps, label, k, previous):
        example = ("generate", seed, sampler, steps) if seed in EXAMPLE_SEEDS and steps == 50 else None
        return self.query(lambda: self.ex.generated(seed, sampler, steps), label, k, previous, example)

    def on_upload(self, path, label, k, previous):
        example = (
            ("upload",) if path and self.upload_example and _sha256(path) == self.upload_example else None
        )
        return self.query(lambda: self.ex.uploaded(path), label, k, previous, example)

    def on_row(self, row, label, k, previous):
        example = ("training", row) if row in EXAMPLE_ROWS else None
        return self.query(lambda: self.ex.training(row, label or None), label, k, previous, example)

    def on_sketch(self, value, label, k, previous):
        return self.query(lambda: self.ex.drawn(_composite(value)), label, k, previous)

    def on_rerun(self, label, k, previous):
        """The same query with another method or k (it was sampled or decoded before)."""
        if previous is None:
            return gr.skip()
        return self.query(lambda: replace(previous.query, seconds=0.0), label, k, previous)

    def on_select(self, side: str):
        """A click on a gallery item of `side` makes that training image the query."""

        def pick(previous, label, k, evt: gr.SelectData):
            if previous is None or evt.index is None:
                return gr.skip()
            hit = previous.data[side][evt.index if isinstance(evt.index, int) else evt.index[0]]
            return self.query(lambda: self.ex.training(hit["row"], previous.index_label), label, k, previous)

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
        ).then(h.on_generate, [p.seed, p.sampler, p.steps, p.method, p.k, p.answer], **ui)
        if EXAMPLE_UPLOAD.exists():
            up = gr.Examples(
                [[str(EXAMPLE_UPLOAD)]],
                [p.upload],
                label="an upload (a drawn 7)",
                api_visibility="private",
                elem_id="examples-upload",
            )
            up.load_input_event.then(h.on_upload, [p.upload, p.method, p.k, p.answer], **ui)
        row = gr.Examples(
            [[r] for r in EXAMPLE_ROWS],
            [p.row],
            label="a training image, by id",
            api_visibility="private",
            example_labels=[f"training image {r}" for r in EXAMPLE_ROWS],
            elem_id="examples-row",
        )
        row.load_input_event.then(h.on_row, [p.row, p.method, p.k, p.answer], **ui)


def _wire(page: Page, h: Handlers) -> None:
    p = page
    ui = {"outputs": p.outputs, "api_visibility": "undocumented"}
    generate_in = [p.seed, p.sampler, p.steps, p.method, p.k, p.answer]
    p.gen_btn.click(h.on_generate, generate_in, **ui)
    p.seed.submit(h.on_generate, generate_in, **ui)
    # an upload or a paste shows its preview and is attributed at once
    p.upload.upload(h.on_upload, [p.upload, p.method, p.k, p.answer], **ui)
    p.sketch_btn.click(h.on_sketch, [p.sketch, p.method, p.k, p.answer], **ui)
    p.row_btn.click(h.on_row, [p.row, p.method, p.k, p.answer], **ui)
    p.row.submit(h.on_row, [p.row, p.method, p.k, p.answer], **ui)
    p.method.input(h.on_rerun, [p.method, p.k, p.answer], **ui)
    p.k.release(h.on_rerun, [p.method, p.k, p.answer], **ui)
    p.props.select(h.on_select("proponents"), [p.answer, p.method, p.k], **ui)
    p.opps.select(h.on_select("opponents"), [p.answer, p.method, p.k], **ui)
    p.export_btn.click(h.on_export, [p.answer], [p.files], api_visibility="undocumented")


def _add_api(ex: Explorer, default_label: str | None) -> gr.Dropdown:
    """The API: the same attribution as JSON (hidden components). Returns its method choice."""
    with gr.Row(visible=False):
        api_file = gr.File(type="filepath", label="image")
        api_k = gr.Number(8, precision=0, label="k")
        api_method = gr.Dropdown(ex.labels, value=default_label, label="method", allow_custom_value=True)
        api_seed = gr.Number(0, precision=0, label="seed")
        api_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler")
        api_steps = gr.Number(50, precision=0, label="steps")
        api_out = gr.JSON(label="result")
        api_btn = gr.Button("attribute")
        api_gen_btn = gr.Button("attribute_generated")

    def api_call(make: Callable[[], Query], method_label, kk) -> dict:
        try:
            kk = ex.check_k(kk)  # refused before any sampling
            return ex.attribute(make(), method_label or None, kk).data
        except EXPECTED as e:
            raise gr.Error(plain(str(e)), print_exception=False) from None

    def attribute(image, k, method):
        """Top-k proponents and opponents of an image file (PNG, JPEG, …), and all N scores.

        Returns {query, settings, index (provenance), proponents, opponents (each a list of
        {rank, row, score, label, source}), scores (all N, by training row), timings_s}.
        """
        return api_call(lambda: ex.uploaded(image), method, k)

    def attribute_generated(seed, sampler, steps, k, method):
        """Generate an image (seed, ddim|ddpm, steps) and attribute it; same JSON as /attribute."""
        return api_call(lambda: ex.generated(seed, sampler, steps), method, k)

    api_btn.click(attribute, [api_file, api_k, api_method], api_out, api_name="attribute")
    api_gen_btn.click(
        attribute_generated,
        [api_seed, api_sampler, api_steps, api_k, api_method],
        api_out,
        api_name="attribute_generated",
    )
    return api_method


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
        page = _layout(ex, default_label, n_rows)
        handlers = Handlers(ex, page)
        _wire(page, handlers)
        _examples(page, handlers)
        api_method = _add_api(ex, default_label)
        _follow_build(ex, page, api_method)
    demo.explorer = ex
    return demo
