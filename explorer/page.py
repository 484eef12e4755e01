"""The explorer page's layout: the query tabs (generate, upload, draw, training image), the
results column, and `Page`, the components that events read or fill, by name. Wiring lives in
explorer/ui.py."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np

from attribution.bands import BAND_COUNTS, DEFAULT_BANDS, Bands
from attribution.sample import SAMPLERS
from explorer import views
from explorer.conditions_view import condition_box
from explorer.render import QUERY_PX, index_md
from explorer.service import ALL_TIMESTEPS, MAX_K, Explorer

SKETCH_PX = 224


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
    bands: gr.Dropdown  # timestep bands of the split (2, 4, 10)
    rank_by: gr.Dropdown  # all timesteps, or one band
    band_plot: gr.Plot
    band_md: gr.Markdown
    gen_condition: gr.Component  # a class or prompt for generation (hidden: unconditional model)
    upload_condition: gr.Component  # … for uploads and drawings

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
            self.band_plot,
            self.band_md,
        ]


# ---- layout ---------------------------------------------------------------------------------------


def _query_tabs(ex: Explorer, n_rows: int | None) -> dict:
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
            gen_condition = condition_box(ex, "gen-condition")
            gen_btn = gr.Button("Generate and attribute", variant="primary", elem_id="generate-btn")
        with gr.Tab("Upload", id="upload"):
            upload_condition = condition_box(ex, "upload-condition")  # set before the upload
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
        "gen_condition": gen_condition,
        "upload_condition": upload_condition,
    }


def _query_column(ex: Explorer, default_label: str | None, n_rows: int | None) -> dict:
    c = _query_tabs(ex, n_rows)
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


def rank_choices(ex: Explorer, n: int) -> list[str]:
    """The band selector's choices for `n` bands: the whole score, then each band."""
    return [ALL_TIMESTEPS, *Bands.equal(int(n), ex.model.num_timesteps).names]


def _results_column(ex: Explorer) -> dict:
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
        c["band_plot"] = gr.Plot(label="score by timestep band", elem_id="band-chart", min_width=360, scale=3)
    with gr.Row(equal_height=True):
        c["bands"] = gr.Dropdown(
            list(BAND_COUNTS),
            value=DEFAULT_BANDS,
            label="timestep bands",
            elem_id="bands",
            min_width=90,
            scale=1,
        )
        c["rank_by"] = gr.Dropdown(
            rank_choices(ex, DEFAULT_BANDS),
            value=ALL_TIMESTEPS,
            label="rank the top-k by",
            elem_id="rank-by",
            min_width=160,
            scale=2,
        )
        c["band_md"] = gr.Markdown("", elem_id="band-info", min_height=40)
    c["timings"] = gr.Markdown("", elem_id="timings", min_height=40)
    return c


def layout(ex: Explorer, default_label: str | None, n_rows: int | None) -> Page:
    answer = gr.State(None)
    gr.Markdown(
        "## Which training images made this?\nInfluence-function attribution for a "
        "diffusion model: generate, draw, upload or pick an image; see the training images "
        "that most raise (proponents) and lower (opponents) its likelihood.",
        elem_id="title",
    )
    banner = gr.Markdown(index_md(ex), elem_id="banner")
    with gr.Tabs(elem_id="views"):
        with gr.Tab("Attribute", id="attribute"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=290) as query_col:
                    left = _query_column(ex, default_label, n_rows)
                with gr.Column(scale=3):
                    right = _results_column(ex)
        page = Page(banner=banner, answer=answer, query_col=query_col, **left, **right)
        views.layout(ex, page)  # the memorisation audit and methods side by side (their own tabs)
    return page


# ---- events ---------------------------------------------------------------------------------------
