"""The explorer: which training images made the model produce this image? (Gradio Blocks)

    python app.py [--model DIR] [--index DIR[,DIR…]] [--host 127.0.0.1] [--port 7860]
    attribution demo                                  (the same, through the CLI)

Environment variables (used when the flag is not given): ATTRIBUTION_MODEL (model folder),
ATTRIBUTION_INDEX (comma-separated index folders; several give a method selector),
GRADIO_SERVER_NAME, GRADIO_SERVER_PORT. Without options the default model (assets/mnist-unet)
and the default index (indexes/mnist-ekfac) are used; a missing default index is built first,
in the background, while the page shows its progress.

This module is UI only: loading, preprocessing, sampling and scoring are the library's
(`attribution.*`, `index.*`); exports are `attribution.report`.
"""

# ruff: noqa: E402  (the environment is set before Gradio and diffusers are imported)
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from attribution import report
from attribution.data import DataError, image_to_tensor, load_dataset, open_image, to_uint8
from attribution.influence import METHODS, AttributionConfig, Attributor
from attribution.model import DEFAULT_MODEL_DIR, DiffusionModel, ModelError, load_model, pick_device
from attribution.sample import SAMPLERS, sample
from index.build import add_build_args, build_index, config_from_args
from index.manifest import IndexLoadError
from index.store import Index
from index.store import load as load_index

ROOT = Path(__file__).resolve().parent
DEFAULT_INDEX = ROOT / "indexes" / "mnist-ekfac"
DEFAULT_DATA = "mnist"
MAX_K = 64
GALLERY_PX = 96  # thumbnails are enlarged (nearest neighbour) to about this size
QUERY_PX = 168
EXPORT_ROOT = Path(tempfile.gettempdir()) / "attribution-exports"
log = logging.getLogger("attribution.app")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ helpers


def enlarge(u8: np.ndarray, px: int):
    """(H, W[, C]) uint8 -> PIL image enlarged by an integer factor, nearest neighbour."""
    from PIL import Image

    u8 = np.asarray(u8)
    if u8.ndim == 3 and u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    img = Image.fromarray(u8)
    f = max(1, round(px / max(img.size)))
    return img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)


def _u8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8."""
    u8 = to_uint8(image.unsqueeze(0))[0]
    return u8[:, :, 0] if u8.shape[2] == 1 else u8


def _conversion_notes(img, channels: int, size: int, u8: np.ndarray) -> list[str]:
    """Plain words for what the library's conversion did to an uploaded image."""
    w, h = img.size
    notes = []
    if (w, h) != (size, size):
        notes.append(f"resized from {w}×{h} to {size}×{size}"
                     + (" (aspect ratio not kept)" if w != h else ""))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append(f"{'16-bit' if img.mode.startswith('I;16') else img.mode + '-mode'} pixels scaled to 8 bits")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        notes.append("transparent pixels put on a black background")
    if channels == 1 and img.mode not in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F", "LA"):
        notes.append("converted to grayscale")
    if channels == 1 and u8.mean() > 127:
        notes.append("mostly light: the training images are light digits on black, so dark-on-light "
                     "images match poorly")
    return notes


def _plain(msg: str) -> str:
    """Markdown emphasis off, for toasts and API errors."""
    return msg.replace("**", "").replace("`", "")


class Busy(Exception):
    """The app cannot answer yet (the index is being built); the message says so."""


@dataclass
class Query:
    """One query image as the model sees it, and where it came from."""

    image: torch.Tensor  # (C, H, W) in [-1, 1], 8-bit levels
    kind: str  # generated | upload | training
    description: str
    params: dict = field(default_factory=dict)
    trajectory: tuple[torch.Tensor, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # time to make it (sampling, decoding)

    @property
    def u8(self) -> np.ndarray:
        return _u8(self.image)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "description": self.description, **self.params, "notes": self.notes,
                "has_trajectory": self.trajectory is not None}


@dataclass
class Answer:
    query: Query
    index_label: str
    k: int
    data: dict  # report.payload()


class BuildJob(threading.Thread):
    """Builds a missing index in the background (holding the model lock), then adds it."""

    def __init__(self, explorer: Explorer, out: Path, model_path: str, data: str = DEFAULT_DATA,
                 n: int | None = None, config: dict | AttributionConfig | None = None):
        super().__init__(daemon=True, name="index-build")
        self.explorer, self.out, self.model_path = explorer, Path(out), model_path
        self.data_spec, self.n = data, n
        self.cfg = config if isinstance(config, AttributionConfig) else AttributionConfig(**(config or {}))
        self.threads = torch.get_num_threads()  # the build uses every core; queries may use fewer
        self.started_at = time.time()
        self.estimate_s: float | None = None
        self.phase = "loading the training data"
        self.n_images: int | None = None
        self.error: str | None = None
        self.done = False

    def calibrate(self, model: DiffusionModel, data) -> float:
        """Seconds for the whole build, extrapolated from the same work on a few images."""
        m = min(len(data), 16)  # small: this time is spent before the build starts
        t0 = time.perf_counter()
        att = Attributor(model, data.subset(range(m)), self.cfg, progress=False).fit()
        t1 = time.perf_counter()
        att.raw_train_features()
        t2 = time.perf_counter()
        n_curv = min(len(data), self.cfg.curvature_images or len(data))  # the curvature sees a subset
        return ((t1 - t0) * n_curv + (t2 - t1) * len(data)) / m * 1.15

    def run(self) -> None:
        ex, model = self.explorer, self.explorer.model
        serving_threads = torch.get_num_threads()
        try:
            with ex.lock:
                torch.set_num_threads(self.threads)
                data = load_dataset(self.data_spec, model.channels, model.size, self.n)
                self.n_images = len(data)
                self.phase = "estimating the build time"
                self.estimate_s = self.calibrate(model, data)
                _say(f"building the index at {self.out}: {len(data)} images, method {self.cfg.method}; "
                     f"about {max(1, round(self.estimate_s / 60))} minute(s). Progress follows; the page "
                     "shows it too. This happens once; later starts load the index in seconds.")
                self.phase = "building"
                build_index(model, data, self.out, self.cfg, model_path=self.model_path,
                            data_spec=self.data_spec, progress=True)
                idx = load_index(self.out, model)
                torch.set_num_threads(serving_threads)
            ex.add_index(idx)
            ex.warmup()
            _say(f"index ready ({time.time() - self.started_at:.0f} s); the page now answers queries")
        except Exception as e:  # shown on the page; the app stays up
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            torch.set_num_threads(serving_threads)
            self.done = True

    def status(self) -> str:
        el = time.time() - self.started_at
        if self.error:
            return (f"**The index build failed:** {self.error}. Fix the cause and restart the app; "
                    f"the build resumes from its finished parts in `{self.out}`.")
        parts = [f"**Building the index** `{self.out.name}` (first start only): {self.phase}, "
                 f"{el / 60:.1f} min elapsed"]
        if self.estimate_s:
            left = self.estimate_s - el
            parts.append(f"about {max(1, round(self.estimate_s / 60))} min in all, "
                         + (f"about {round(left / 60)} min left" if left > 90 else "almost done"))
        if self.phase == "building" and self.n_images:
            needs_curvature = METHODS[self.cfg.method].preconditioner in ("kfac", "kfac-exact", "ekfac")
            if needs_curvature and not (self.out / "curvature.safetensors").exists():
                parts.append("step 1 of 2: fitting the curvature")
            else:
                shards = (self.out / "shards").glob("*.safetensors") if (self.out / "shards").is_dir() else []
                done = sum(int(p.stem.split("-")[1]) - int(p.stem.split("-")[0]) for p in shards)
                parts.append(f"step 2 of 2: features of {done} / {self.n_images} images")
        return " · ".join(parts) + ". This page updates by itself; queries work once it is done."


class Explorer:
    """The model, its indexes (by label) and the query functions; safe for concurrent requests.

    Torch modules (and the feature hooks put on them) are shared, so everything that runs the
    model holds `lock`; decoding uploads, rendering and exports run outside it.
    """

    def __init__(self, model: DiffusionModel, indexes: Sequence[Index] = ()):
        self.model = model
        self.lock = threading.Lock()
        self.indexes: dict[str, Index] = {}
        self.build: BuildJob | None = None
        for idx in indexes:
            self.add_index(idx)

    def add_index(self, idx: Index) -> None:
        label = idx.method
        if label in self.indexes:
            label = f"{idx.method} ({idx.path.name})"
        self.indexes[label] = idx

    @property
    def ready(self) -> bool:
        return bool(self.indexes)

    def warmup(self, rounds: int = 3) -> float:
        """A few throw-away queries per index: the first queries of a process are several times
        slower than later ones (allocations, kernel caches). Returns the seconds spent."""
        t0 = time.perf_counter()
        for label in self.labels:
            try:
                q = self.training(0, label)
                for _ in range(rounds):
                    self.attribute(q, label, 1)
            except Exception:  # e.g. an index without thumbnails, or one that needs a trajectory
                log.debug("warm-up of %s skipped", label, exc_info=True)
        return time.perf_counter() - t0

    def start_build(self) -> None:
        if self.build is not None and not self.build.is_alive() and not self.build.done:
            self.build.start()

    @property
    def labels(self) -> list[str]:
        return list(self.indexes)

    def index(self, label: str | None) -> Index:
        if not self.indexes:
            raise Busy(self.build.status() if self.build else "No index is loaded.")
        if not label:
            return next(iter(self.indexes.values()))
        if label not in self.indexes:
            raise DataError(f"unknown method {label!r}; choose one of {', '.join(self.indexes)}")
        return self.indexes[label]

    # ---- queries ------------------------------------------------------------------------------
    def generated(self, seed: int, sampler: str = "ddim", steps: int = 50) -> Query:
        """Sample one image; it is rounded to 8-bit levels (what you see and download is what is
        attributed); its sampling trajectory is kept for trajectory measurements."""
        seed, steps = int(seed), int(steps)
        if sampler not in SAMPLERS:
            raise DataError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= 1000:
            raise DataError(f"steps must be between 1 and 1000 (got {steps})")
        if not 0 <= seed < 2**31:
            raise DataError(f"the seed must be between 0 and {2**31 - 1} (got {seed})")
        if not self.ready:
            raise Busy(self.build.status() if self.build else "No index is loaded.")
        t0 = time.perf_counter()
        with self.lock:
            s = sample(self.model, 1, seed=seed, sampler=sampler, steps=steps, keep_trajectory=True,
                       progress=False)
        image = self._from_u8(_u8(s.images[0]))
        return Query(image, "generated", f"generated: seed {seed}, {sampler.upper()} {steps} steps",
                     {"seed": seed, "sampler": sampler, "steps": steps},
                     trajectory=(s.timesteps, s.states[:, :1]), seconds=time.perf_counter() - t0)

    def uploaded(self, path: str | Path | None) -> Query:
        """An image file, converted by the library as the model needs it; DataError if unusable."""
        if path is None or str(path) == "":
            raise DataError("no file was uploaded; choose an image file first")
        name = Path(path).name
        t0 = time.perf_counter()
        try:
            nbytes = Path(path).stat().st_size
        except OSError:
            raise DataError(f"{name}: the upload could not be read; please try again") from None
        if nbytes == 0:
            raise DataError(f"{name}: the file is empty (0 bytes)")
        img = open_image(Path(path), name=name)
        image = image_to_tensor(img, self.model.channels, self.model.size)
        notes = _conversion_notes(img, self.model.channels, self.model.size, _u8(image))
        return Query(image, "upload", f"upload: {name} ({img.size[0]}×{img.size[1]} {img.mode})",
                     {"file": name, "original_size": list(img.size), "original_mode": img.mode},
                     notes=notes, seconds=time.perf_counter() - t0)

    def training(self, row, label: str | None = None) -> Query:
        """Training image `row` of the selected index (from its stored thumbnails)."""
        idx = self.index(label)
        if row is None or str(row).strip() == "":
            raise DataError("enter a training image id (row)")
        row = int(row)
        if not 0 <= row < len(idx):
            raise DataError(f"training image id must be between 0 and {len(idx) - 1} (got {row})")
        if idx.thumbs is None:
            raise DataError("this index stores no thumbnails, so its training images cannot be shown")
        return Query(self._from_u8(idx.thumbs[row]), "training",
                     f"training image id {row} ({idx.items[row]['source']}, label {idx.items[row]['label']})",
                     {"row": row, "source": idx.items[row]["source"], "label": idx.items[row]["label"]})

    def _from_u8(self, u8: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return image_to_tensor(Image.fromarray(np.asarray(u8)), self.model.channels, self.model.size)

    def attribute(self, q: Query, label: str | None = None, k: int = 8) -> Answer:
        """Top-k proponents and opponents of `q` with the index `label` (the default: the first)."""
        idx = self.index(label)
        label = label or self.labels[0]
        k = int(k) if k is not None else 8
        if not 1 <= k <= MAX_K:
            raise DataError(f"k must be between 1 and {MAX_K} (got {k})")
        traj = None
        if idx.attributor is not None and idx.attributor.spec.measurement == "trajectory":
            if q.trajectory is None:
                raise DataError(f"{label} measures the loss along the query's own sampling trajectory; "
                                "only generated queries have one — generate a query or pick another method")
            traj = q.trajectory
        t0 = time.perf_counter()
        with self.lock:
            t1 = time.perf_counter()
            res = idx.query(q.image.to(next(self.model.unet.parameters()).device), k=min(k, len(idx)),
                            trajectory=traj, with_all=True)
            t2 = time.perf_counter()
        timings = {"wait_for_model": t1 - t0, "all_scores": max(0.0, t2 - t1 - sum(res.timings.values()))}
        if q.seconds:
            timings = {("sampling" if q.kind == "generated" else "decoding"): q.seconds, **timings}
        data = report.payload(res, idx.manifest, index_path=idx.path, query=q.to_dict(),
                              settings={"method": label, "k": k}, timings=timings)
        return Answer(q, label, k, data)

    def export(self, ans: Answer) -> list[str]:
        """report.png, scores.json, scores.csv and query.png in a fresh temporary folder (folders
        older than an hour are removed)."""
        from PIL import Image

        idx = self.indexes[ans.index_label]
        EXPORT_ROOT.mkdir(parents=True, exist_ok=True)
        for old in EXPORT_ROOT.iterdir():  # Gradio has copied older exports to its own cache
            if old.is_dir() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        out = Path(tempfile.mkdtemp(prefix="export-", dir=EXPORT_ROOT))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        files = [
            report.render_report(ans.data, ans.query.u8, idx.thumbs, out / f"report-{stamp}.png"),
            report.write_json(ans.data, out / f"scores-{stamp}.json"),
            report.write_csv(ans.data, out / f"scores-{stamp}.csv",
                             sources=[it["source"] for it in idx.items], labels=[it["label"] for it in idx.items]),
        ]
        Image.fromarray(ans.query.u8).save(out / f"query-{stamp}.png")
        return [str(p) for p in files] + [str(out / f"query-{stamp}.png")]


# ------------------------------------------------------------------------------------ the UI

CSS = """
.gradio-container {max-width: 1280px !important; padding-top: 4px !important; padding-bottom: 4px !important}
#title h2 {margin: 0; font-size: 1.35em} #title p {margin: 0; font-size: 0.9em}
#banner p, #status p {margin: 0; font-size: 0.9em}
#timings p {font-size: 0.8em; margin: 0; color: var(--body-text-color-subdued)}
#query-info p {font-size: 0.85em; margin: 0}
.hits, .hits .grid-wrap, .hits .gallery-container {height: auto !important; min-height: 0 !important;
  max-height: none !important}
.hits .grid-container {gap: 6px !important; padding-top: 26px !important}
.hits .thumbnail-item {aspect-ratio: auto !important; display: flex !important; flex-direction: column !important;
  height: auto !important; box-shadow: none !important; border: none !important}
.hits .thumbnail-item img {aspect-ratio: 1 / 1; width: 100%; height: auto !important; image-rendering: pixelated}
.hits .caption-label {position: static !important; white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important; max-width: none !important; width: 100% !important; font-size: 10.5px !important;
  line-height: 1.25 !important; padding: 2px 0 0 0 !important; margin: 0 !important; background: none !important;
  color: var(--body-text-color) !important; text-align: center; border: none !important; box-shadow: none !important}
footer {display: none !important}
"""


def _gallery(ans: Answer, side: str, thumbs) -> list:
    return [(enlarge(thumbs[h["row"]], GALLERY_PX) if thumbs is not None else None, report.caption(h))
            for h in ans.data[side]]


TIMING_NAMES = {"sampling": "sampling", "decoding": "decoding", "wait_for_model": "waiting for the model",
                "query_gradient": "query gradient", "search": "FAISS search", "all_scores": "all N scores",
                "render": "page"}


def _timings_md(t: dict) -> str:
    def fmt(v: float) -> str:
        return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.0f} ms" if v >= 0.01 else f"{v * 1e3:.1f} ms"

    keys = [k for k in TIMING_NAMES if k in t] + [k for k in t if k not in TIMING_NAMES]
    return "**Timings:** " + " · ".join(f"{TIMING_NAMES.get(k, k)} {fmt(t[k])}" for k in keys)


def _index_md(ex: Explorer, label: str | None = None) -> str:
    if not ex.ready:
        return ex.build.status() if ex.build else "No index is loaded."
    idx = ex.index(label)
    p = report.provenance(idx.manifest, idx.path)
    return (f"Index **{label or ex.labels[0]}** — {METHODS[p['method']].description}; "
            f"{p['data']['n']} training images ({p['data']['source']}), D = {p['projection_dim']}, "
            f"model sha256 `{str(p['model']['weights_sha256'])[:12]}…`")


def build_demo(model: DiffusionModel, index_dirs: Sequence[str | Path] = (), *,
               explorer: Explorer | None = None, build: dict | None = None):
    """The Gradio Blocks app for `model` and the indexes in `index_dirs` (IndexLoadError if one
    does not fit the model). `build` = BuildJob keyword arguments (out, model_path, data, n,
    config): build that index in the background (`serve()` starts it, or call
    `explorer.start_build()`); the page shows its progress."""
    ex = explorer or Explorer(model, [load_index(d, model) for d in index_dirs])
    if build is not None and ex.build is None:
        ex.build = BuildJob(ex, **build)  # started by serve(), once the page is up
    default_label = ex.labels[0] if ex.labels else None
    n_rows = len(ex.index(None)) if ex.ready else None

    def run(make: Callable[[], Query], label, k, ans_state):
        """Make the query, attribute it, fill the page. Bad input: a warning, the page stays."""
        t0 = time.perf_counter()
        try:
            q = make()
            ans = ex.attribute(q, label or None, k)
            idx = ex.index(ans.index_label)
            fig = report.score_histogram(ans.data)
            info = f"**{q.description}**" + ("" if not q.notes else " — " + "; ".join(q.notes))
            if q.notes:
                gr.Info("The image was converted: " + "; ".join(q.notes))
            ans.data["timings_s"]["render"] = max(0.0, time.perf_counter() - t0 - sum(ans.data["timings_s"].values()))
            top = ans.data["proponents"][0]
            status = (f"Top proponent: id {top['row']} (label {top['label']}), score "
                      f"{report.fmt_score(top['score'])} · {len(ans.data['proponents'])} proponents and "
                      f"{len(ans.data['opponents'])} opponents of {len(idx)} training images, "
                      f"method {ans.index_label}.")
            return (enlarge(q.u8, QUERY_PX), info, status, _gallery(ans, "proponents", idx.thumbs),
                    _gallery(ans, "opponents", idx.thumbs), fig, _timings_md(ans.data["timings_s"]), ans,
                    gr.update(value=None, visible=False))
        except (DataError, Busy, IndexLoadError) as e:
            msg = str(e)
        except Exception as e:  # keep answering; the log has the traceback
            log.exception("query failed")
            msg = f"something went wrong ({type(e).__name__}: {e})"
        gr.Warning(_plain(msg))
        keep = "" if ans_state is None else " The results below are still those of the previous query."
        return (gr.update(),) * 2 + (f"⚠️ **{msg}**{keep}",) + (gr.update(),) * 6

    with gr.Blocks(title="Training-data attribution explorer", delete_cache=(3600, 7200)) as demo:
        ans_state = gr.State(None)
        gr.Markdown("## Which training images made this?\nInfluence-function attribution for a "
                    "diffusion model: generate, upload or pick an image; see the training images "
                    "that most raise (proponents) and lower (opponents) its likelihood.",
                    elem_id="title")
        banner = gr.Markdown(_index_md(ex), elem_id="banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=290):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        with gr.Row():
                            seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed",
                                             min_width=70)
                            sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler", min_width=70,
                                                  elem_id="sampler")
                            steps = gr.Number(50, label="steps", precision=0, minimum=1, maximum=1000,
                                              min_width=70, elem_id="steps")
                        gen_btn = gr.Button("Generate and attribute", variant="primary", elem_id="generate-btn")
                    with gr.Tab("Upload", id="upload"):
                        upload = gr.File(label="drop an image (PNG, JPEG, …): it is attributed at once",
                                         type="filepath", height=128, elem_id="upload")
                    with gr.Tab("Training image", id="training"):
                        row = gr.Number(0, label=f"training image id (0–{n_rows - 1})" if n_rows else
                                        "training image id", precision=0, minimum=0, elem_id="row")
                        row_btn = gr.Button("Attribute this training image", variant="primary",
                                            elem_id="row-btn")
                query_img = gr.Image(label="query, as the model sees it", type="pil", format="png",
                                     interactive=False, height=QUERY_PX + 24, elem_id="query",
                                     buttons=["download"])
                query_md = gr.Markdown("", elem_id="query-info")
                with gr.Row(equal_height=True):
                    method = gr.Dropdown(ex.labels, value=default_label, label="method", min_width=100,
                                         visible=len(ex.labels) > 1 or ex.build is not None,
                                         elem_id="method")
                    k = gr.Slider(1, MAX_K, value=8, step=1, label="k (shown per side)", elem_id="k", min_width=100)
                export_btn = gr.Button("Export report (PNG, JSON, CSV)", size="sm", elem_id="export-btn")
                files = gr.File(label="report and scores", file_count="multiple", visible=False,
                                elem_id="export-files", height=120)
            with gr.Column(scale=3):
                status = gr.Markdown("Choose a query on the left.", elem_id="status")
                props = gr.Gallery(label="proponents (highest τ: make the query more likely)", columns=8,
                                   height="auto", format="png", object_fit="contain", allow_preview=False,
                                   elem_id="proponents", elem_classes=["hits"])
                opps = gr.Gallery(label="opponents (lowest τ: make it less likely)", columns=8, height="auto",
                                  format="png", object_fit="contain", allow_preview=False,
                                  elem_id="opponents", elem_classes=["hits"])
                with gr.Row(equal_height=False):
                    plot = gr.Plot(label="all scores", elem_id="histogram", min_width=360, scale=3)
                    timings = gr.Markdown("", elem_id="timings", min_height=40)

        outs = [query_img, query_md, status, props, opps, plot, timings, ans_state, files]
        ui = {"outputs": outs, "api_visibility": "undocumented"}

        def on_generate(s, sm, st, m, kk, a):
            return run(lambda: ex.generated(s, sm, st), m, kk, a)

        def on_upload(f, m, kk, a):
            return run(lambda: ex.uploaded(f), m, kk, a)

        def on_row(r, m, kk, a):
            return run(lambda: ex.training(r, m or None), m, kk, a)

        def on_rerun(m, kk, a):
            if a is None:
                return (gr.update(),) * 3 + (gr.update(),) * 6
            return run(lambda: replace(a.query, seconds=0.0), m, kk, a)  # sampled/decoded before

        def on_select(side: str):
            def pick(a, m, kk, evt: gr.SelectData):
                if a is None or evt.index is None:
                    return (gr.update(),) * 9
                hit = a.data[side][evt.index if isinstance(evt.index, int) else evt.index[0]]
                return run(lambda: ex.training(hit["row"], a.index_label), m, kk, a)
            return pick

        def on_export(a):
            if a is None:
                gr.Warning("nothing to export yet: make a query first")
                return gr.update(visible=False)
            return gr.update(value=ex.export(a), visible=True)

        gen_btn.click(on_generate, [seed, sampler, steps, method, k, ans_state], **ui)
        seed.submit(on_generate, [seed, sampler, steps, method, k, ans_state], **ui)
        # the drop zone is emptied after each upload, ready for the next one
        upload.upload(on_upload, [upload, method, k, ans_state], **ui).then(
            lambda: None, None, upload, api_visibility="private")
        row_btn.click(on_row, [row, method, k, ans_state], **ui)
        row.submit(on_row, [row, method, k, ans_state], **ui)
        method.input(on_rerun, [method, k, ans_state], **ui)
        k.release(on_rerun, [method, k, ans_state], **ui)
        props.select(on_select("proponents"), [ans_state, method, k], **ui)
        opps.select(on_select("opponents"), [ans_state, method, k], **ui)
        export_btn.click(on_export, [ans_state], [files], api_visibility="undocumented")

        # ---- the API: the same attribution as JSON ------------------------------------------
        with gr.Row(visible=False):
            api_file = gr.File(type="filepath", label="image")
            api_k = gr.Number(8, precision=0, label="k")
            api_method = gr.Dropdown(ex.labels, value=default_label, label="method",
                                     allow_custom_value=True)
            api_seed = gr.Number(0, precision=0, label="seed")
            api_sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="sampler")
            api_steps = gr.Number(50, precision=0, label="steps")
            api_out = gr.JSON(label="result")
            api_btn = gr.Button("attribute")
            api_gen_btn = gr.Button("attribute_generated")

        def api_call(make: Callable[[], Query], method_label, kk) -> dict:
            try:
                return ex.attribute(make(), method_label or None, 8 if kk is None else kk).data
            except (DataError, Busy, IndexLoadError) as e:
                raise gr.Error(_plain(str(e)), print_exception=False) from None

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
        api_gen_btn.click(attribute_generated, [api_seed, api_sampler, api_steps, api_k, api_method],
                          api_out, api_name="attribute_generated")

        # ---- while a build runs: refresh the banner, then enable the method choices ---------
        timer = gr.Timer(2.0, active=ex.build is not None and not ex.ready)

        def poll():
            if ex.ready:
                labels = ex.labels
                return (_index_md(ex), gr.update(choices=labels, value=labels[0], visible=len(labels) > 1),
                        gr.update(choices=labels, value=labels[0]), gr.Timer(active=False))
            return _index_md(ex), gr.update(), gr.update(), gr.Timer(active=True)

        timer.tick(poll, None, [banner, method, api_method, timer], api_visibility="private")
        method.change(lambda m: _index_md(ex, m or None) if ex.ready else gr.update(), method, banner,
                      api_visibility="private")
    demo.explorer = ex
    return demo


def serve(demo, host: str = "127.0.0.1", port: int = 7860, prevent_thread_lock: bool = False,
          concurrency: int = 1, warmup: bool = True, **kwargs):
    """Queue (`concurrency` requests per event at once; the model runs one at a time anyway, and
    8 clients × 5 queries ran ~10% faster with 1 than with 4, which only adds waiting threads;
    Gradio's queue shows a waiting user its position), launch,
    then warm the model up and start a pending index build (both in the background, after launch,
    so that the page answers at once)."""
    demo.queue(default_concurrency_limit=concurrency)
    out = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, css=CSS,
                      show_error=True, max_file_size="64mb", footer_links=["api"],
                      state_session_capacity=500, **kwargs)  # a session's state is ~0.3 MB
    ex = getattr(demo, "explorer", None)
    if ex is not None and warmup and ex.ready:
        threading.Thread(target=ex.warmup, daemon=True, name="warm-up").start()
    if ex is not None:
        ex.start_build()
    if not prevent_thread_lock:
        demo.block_thread()
    return out


# ------------------------------------------------------------------------------------ startup


def default_build_config(out: Path = DEFAULT_INDEX) -> AttributionConfig:
    """Exactly what `attribution index build --data mnist --out OUT` uses, so that the app and the
    CLI build (and resume) the same index."""
    p = argparse.ArgumentParser()
    add_build_args(p)
    return config_from_args(p.parse_args(["--data", DEFAULT_DATA, "--out", str(out)]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (env ATTRIBUTION_MODEL; default assets/mnist-unet)")
    p.add_argument("--index", default=None, help="index folder(s), comma-separated (env ATTRIBUTION_INDEX; "
                   "default indexes/mnist-ekfac, built if missing)")
    p.add_argument("--host", default=None, help="address to bind (env GRADIO_SERVER_NAME; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (env GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests per event handled at once (the model runs one at a time; default 1)")
    return p.parse_args(argv)


def main(args: argparse.Namespace | None = None) -> int:
    """Start the app (`args` from `parse_args` or the CLI's serve/demo: model, index, host, port)."""
    args = args if args is not None else parse_args()
    model_path = getattr(args, "model", None) or os.environ.get("ATTRIBUTION_MODEL") or None
    index_arg = getattr(args, "index", None) or os.environ.get("ATTRIBUTION_INDEX") or ""
    index_dirs = [Path(s.strip()) for s in index_arg.split(",") if s.strip()] or [DEFAULT_INDEX]
    host = getattr(args, "host", None)
    if host in (None, "127.0.0.1"):  # the CLI's default; a Space sets GRADIO_SERVER_NAME=0.0.0.0
        host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = getattr(args, "port", None)
    if port in (None, 7860):
        port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    device = pick_device(getattr(args, "device", None))
    t0 = time.time()
    try:
        model = load_model(model_path, device=device)
    except ModelError as e:
        hint = "" if model_path else " (train it with `attribution train --out assets/mnist-unet`)"
        _say(f"error: {e}{hint}")
        return 2
    indexes, build = [], None
    for d in index_dirs:
        try:
            indexes.append(load_index(d, model, device=device))
        except IndexLoadError as e:
            is_default = d.resolve() == DEFAULT_INDEX.resolve() and model_path in (None, str(DEFAULT_MODEL_DIR))
            if not is_default:
                _say(f"error: {e}\nbuild it with: attribution index build --model {model_path or 'assets/mnist-unet'} "
                     f"--out {d}")
                return 2
            _say(f"{e}\nbuilding the default index in the background; the page shows its progress")
            build = {"out": d, "model_path": "default", "data": DEFAULT_DATA, "config": default_build_config(d)}
    ex = Explorer(model, indexes)
    demo = build_demo(model, explorer=ex, build=build)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # One query is many small ops: on a shared 2-core machine two OpenMP threads made it
        # 4-10x slower than one (0.6-2.5 s vs 0.13-0.19 s per query, default model); an index
        # build still uses every core. Set OMP_NUM_THREADS to choose.
        torch.set_num_threads(1)
    _say(f"model and {len(indexes)} index(es) loaded in {time.time() - t0:.1f} s; "
         f"open http://{host}:{port} (Ctrl+C to stop)")
    serve(demo, host, port, concurrency=getattr(args, "concurrency", None) or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
