"""The query service behind the explorer page: the model, its indexes, and queries made from a
generated, uploaded or training image; safe for concurrent requests.

Loading, preprocessing, sampling and scoring are the library's (`attribution.*`, `index.*`); the
page is `explorer.ui`, exports `explorer.exports`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from attribution.bands import BAND_COUNTS, DEFAULT_BANDS, Bands
from attribution.data import image_to_tensor, open_image, to_uint8
from attribution.errors import DataError
from attribution.model import DiffusionModel
from attribution.sample import SAMPLERS, sample
from explorer import audit, compare, exports, report
from index.conditions import model_input, query_condition, shown
from index.store import Index

if TYPE_CHECKING:
    from explorer.build_job import BuildJob

MAX_K = 64
ALL_TIMESTEPS = "all timesteps"
log = logging.getLogger("attribution.app")


def on_gpu(fn):
    """`spaces.GPU(fn)` where the `spaces` package is importable (a Hugging Face ZeroGPU Space
    lends a GPU for each call), `fn` itself where it is not."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


@on_gpu
def query_index(
    idx: Index, image: torch.Tensor, k: int, trajectory=None, bands=None, rank_by=None, cond=None
):
    """The query-gradient work and the search of one query (on a Space's GPU where it lends one)."""
    return idx.query(
        image, k=k, trajectory=trajectory, with_all=True, bands=bands, rank_by=rank_by, cond=cond
    )


def _under(cond) -> str:
    """', class cat (class 0)' / ', prompt "a red cat"' for a query's description; '' if none."""
    if cond is None:
        return ""
    return f", prompt {cond.texts[0]!r}" if cond.kind == "text" else f", {shown(cond)}"


def _cond_param(cond) -> dict:
    """The query's condition for its JSON: {"condition": shown, "condition_kind": kind} or {}."""
    return {} if cond is None else {"condition": shown(cond), "condition_kind": cond.kind}


def band_settings(idx: Index, bands, rank_by) -> tuple[Bands | None, int | None]:
    """A band count (2, 4 or 10; 0 or None: no split) and a band to rank by (its index or name;
    None or '' or 'all timesteps': the whole score) -> (Bands or None, band index or None).
    Indexes without timestep draws (pixel similarity) get no bands. DataError for others."""
    n = whole(bands, "bands", 0, max(BAND_COUNTS), default=DEFAULT_BANDS)
    if n and n not in BAND_COUNTS:
        raise DataError(f"bands must be one of {', '.join(map(str, BAND_COUNTS))} (or 0: none), not {n}")
    att = idx.attributor
    if not n or att is None or not att.uses_model:
        if rank_by not in (None, "", ALL_TIMESTEPS):
            raise DataError("ranking by a timestep band needs a method with timestep draws and bands > 0")
        return None, None
    b = Bands.equal(n, att.model.num_timesteps)
    if rank_by in (None, "", ALL_TIMESTEPS):
        return b, None
    if isinstance(rank_by, str) and rank_by in b.names:
        return b, b.names.index(rank_by)
    return b, whole(rank_by, "the band to rank by", 0, n - 1)


def whole(value, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """`value` from a form or an API call (a number or its text) as a whole number in [lo, hi];
    DataError for a missing value (unless `default`), text, NaN, a fraction or one out of range."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is not None:
            return default
        raise DataError(f"{name} is missing: give a whole number between {lo} and {hi}")
    bad = DataError(f"{name} must be a whole number between {lo} and {hi} (got {str(value)[:40]!r})")
    if isinstance(value, bool):
        raise bad
    try:
        v = value if isinstance(value, int) else float(str(value).strip())
    except (TypeError, ValueError):
        raise bad from None
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise bad
        v = int(v)
    if not lo <= v <= hi:
        raise DataError(f"{name} must be between {lo} and {hi} (got {v})")
    return v


def _u8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8."""
    u8 = to_uint8(image.unsqueeze(0))[0]
    return u8[:, :, 0] if u8.shape[2] == 1 else u8


def _conversion_notes(img, channels: int, size: int, u8: np.ndarray) -> list[str]:
    """Plain words for what the library's conversion did to an uploaded image."""
    w, h = img.size
    notes = []
    if (w, h) != (size, size):
        notes.append(
            f"resized from {w}×{h} to {size}×{size}" + (" (aspect ratio not kept)" if w != h else "")
        )
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append(
            f"{'16-bit' if img.mode.startswith('I;16') else img.mode + '-mode'} pixels scaled to 8 bits"
        )
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        notes.append("transparent pixels put on a black background")
    if channels == 1 and img.mode not in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F", "LA"):
        notes.append("converted to grayscale")
    if channels == 1 and u8.mean() > 127:
        notes.append(
            "mostly light: the training images are light digits on black, so dark-on-light "
            "images match poorly"
        )
    return notes


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
    condition: object = None  # a conditional model's condition (Conditions of one), or None
    latent: torch.Tensor | None = None  # a generated query's latent (a latent model: used directly)

    @property
    def u8(self) -> np.ndarray:
        return _u8(self.image)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "description": self.description,
            **self.params,
            "notes": self.notes,
            "has_trajectory": self.trajectory is not None,
        }


@dataclass
class Answer:
    query: Query
    index_label: str
    k: int
    data: dict  # report.payload()


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
        self._group: dict[str, np.ndarray] = {}  # group self-influence by index label
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

    def partial(self) -> Index | None:
        """While the only index is being built: the index over the images done so far, or None."""
        return self.build.partial() if self.build is not None and not self.indexes else None

    @property
    def answering(self) -> bool:
        """Whether queries are answered now (a finished index, or a partial one during the build)."""
        return self.ready or self.partial() is not None

    def index(self, label: str | None) -> Index:
        if not self.indexes and (part := self.partial()) is not None:
            return part
        if not self.indexes:
            raise Busy(self.build.status() if self.build else "No index is loaded.")
        if not label:
            return next(iter(self.indexes.values()))
        if label not in self.indexes:
            raise DataError(f"unknown method {label!r}; choose one of {', '.join(self.indexes)}")
        return self.indexes[label]

    # ---- queries ------------------------------------------------------------------------------
    def generated(self, seed: int, sampler: str = "ddim", steps: int = 50, condition=None) -> Query:
        """Sample one image (under `condition`: a class or prompt, conditional models); it is rounded
        to 8-bit levels (what you see and download is what is attributed; a latent model's query
        is its sampled latent); its sampling trajectory is kept for trajectory measurements."""
        seed, steps = whole(seed, "the seed", 0, 2**31 - 1), whole(steps, "steps", 1, 1000)
        if sampler not in SAMPLERS:
            raise DataError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not self.answering:
            raise Busy(self.build.status() if self.build else "No index is loaded.")
        cond, t0 = self.condition(condition), time.perf_counter()
        g = self.model.guidance_scale if cond is not None else 1.0  # the model's own (conditioning.json)
        cfg, how = ({"guidance_scale": g}, f", guidance {g:g}") if g != 1.0 else ({}, "")
        kw = dict(keep_trajectory=True, progress=False, conditions=cond, **cfg)
        with self.lock:
            s = sample(self.model, 1, seed, sampler, steps, **kw)
        image = self._from_u8(_u8(s.images[0]))
        return Query(
            image,
            "generated",
            f"generated: seed {seed}, {sampler.upper()} {steps} steps{how}" + _under(cond),
            {"seed": seed, "sampler": sampler, "steps": steps, **cfg, **_cond_param(cond)},
            trajectory=(s.timesteps, s.states[:, :1]),
            seconds=time.perf_counter() - t0,
            condition=cond,
            latent=None if s.latents is None else s.latents[0],
        )

    def condition(self, value, label: str | None = None):
        """A query's class or prompt for the index `label` (Conditions of one; None for an
        unconditional model); DataError if a conditional model gets none."""
        if self.model.condition_kind == "none" and (value is None or str(value).strip() == ""):
            return None  # an unconditional model: nothing to read (no index needed)
        return query_condition(self.index(label).manifest, value)

    def uploaded(self, path: str | Path | None, condition=None) -> Query:
        """An image file, converted by the library as the model needs it (a latent model encodes it
        when attributing), under `condition`; DataError if unusable."""
        if path is None or str(path) == "":
            raise DataError("no file was uploaded; choose an image file first")
        cond = self.condition(condition)
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
        return Query(
            image,
            "upload",
            f"upload: {name} ({img.size[0]}×{img.size[1]} {img.mode})" + _under(cond),
            {"file": name, "original_size": list(img.size), "original_mode": img.mode, **_cond_param(cond)},
            notes=notes,
            seconds=time.perf_counter() - t0,
            condition=cond,
        )

    def drawn(self, u8: np.ndarray | None, condition=None) -> Query:
        """A drawing (H, W[, C]) uint8, light strokes on a dark canvas, converted as an upload is."""
        from PIL import Image

        if u8 is None or np.asarray(u8).max(initial=0) == 0:
            raise DataError("the drawing is empty: draw a digit first")
        cond = self.condition(condition)
        img = Image.fromarray(np.asarray(u8, dtype=np.uint8))
        image = image_to_tensor(img, self.model.channels, self.model.size)
        notes = [
            n
            for n in _conversion_notes(img, self.model.channels, self.model.size, _u8(image))
            if "transparent" not in n and "grayscale" not in n
        ]
        return Query(
            image,
            "drawing",
            f"your drawing ({img.size[0]}×{img.size[1]})" + _under(cond),
            {"original_size": list(img.size), **_cond_param(cond)},
            notes=notes,
            condition=cond,
        )

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
        item = idx.items[row]  # a conditional model's training image: under its own condition
        c = item.get("condition") or {}
        cond = query_condition(idx.manifest, c.get("text", c.get("class")))
        return Query(
            self._from_u8(idx.thumbs[row]),
            "training",
            f"training image id {row} ({item['source']}, label {item['label']})" + _under(cond),
            {"row": row, "source": item["source"], "label": item["label"], **_cond_param(cond)},
            condition=cond,
        )

    def _from_u8(self, u8: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return image_to_tensor(Image.fromarray(np.asarray(u8)), self.model.channels, self.model.size)

    @staticmethod
    def check_k(k) -> int:
        """k as a whole number in [1, MAX_K] (8 when missing); DataError otherwise. Callers check
        it before making a query, so that a refused request costs no sampling."""
        return whole(k, "k", 1, MAX_K, default=8)

    def attribute(
        self, q: Query, label: str | None = None, k: int = 8, bands=DEFAULT_BANDS, rank_by=None
    ) -> Answer:
        """Top-k proponents and opponents of `q` with the index `label` (the default: the first),
        each score split into `bands` timestep bands; with `rank_by` (a band), the top-k by that
        band's part alone (`band_settings`)."""
        idx = self.index(label)
        label = label or (self.labels[0] if self.labels else f"{idx.method} (partial)")
        k = self.check_k(k)
        band, rank = band_settings(idx, bands, rank_by)
        traj = None
        if idx.attributor is not None and idx.attributor.spec.measurement == "trajectory":
            if q.trajectory is None:
                raise DataError(
                    f"{label} measures the loss along the query's own sampling trajectory; "
                    "only generated queries have one — generate a query or pick another method"
                )
            traj = q.trajectory
        cond, t0 = query_condition(idx.manifest, q.condition), time.perf_counter()
        with self.lock:
            t1 = time.perf_counter()
            x = q.latent if q.latent is not None else model_input(self.model, q.image)  # encoded: latent
            x = x.to(next(self.model.unet.parameters()).device)
            res = query_index(idx, x, min(k, len(idx)), traj, band, rank, cond)
            t2 = time.perf_counter()
        timings = {"wait_for_model": t1 - t0, "all_scores": max(0.0, t2 - t1 - sum(res.timings.values()))}
        if q.seconds:
            timings = {("sampling" if q.kind == "generated" else "decoding"): q.seconds, **timings}
        data = report.payload(
            res,
            idx.manifest,
            index_path=idx.path,
            query=q.to_dict(),
            settings={"method": label, "k": k, **({"bands": len(band)} if band else {})},
            timings=timings,
        )
        if idx.manifest.get("partial"):  # answered while the index is being built
            data["partial"] = dict(idx.manifest["partial"])
        return Answer(q, label, k, data)

    # ---- the audit and the comparison (explorer/audit.py, explorer/compare.py) ----------------
    def self_influence(self, label: str | None = None, m=20, group: bool = False, progress=None) -> dict:
        """The `m` training images with the highest and lowest self-influence (`group`: group
        self-influence, computed once per index and kept)."""
        idx = self.index(label)
        m = min(whole(m, "m", 1, 100_000, default=20), len(idx))
        values = None
        if group:
            key = label or self.labels[0]
            if key not in self._group:
                self._group[key] = audit.group_self_influence(idx, progress=progress)
            values = self._group[key]
        return {"method": label or self.labels[0], **audit.self_influence(idx, m, values)}

    def audit_samples(
        self, label=None, n=16, seed=0, sampler="ddim", steps=50, progress=None, condition=None
    ) -> dict:
        """`n` generated samples paired with their top proponents (explorer/audit.py); a conditional
        model's under `condition` (a class or prompt; none: each class in turn, class models)."""
        n = whole(n, "samples", 1, audit.MAX_SAMPLES)
        seed, steps = whole(seed, "the seed", 0, 2**31 - 1), whole(steps, "steps", 1, 1000)
        idx = self.index(label)
        cond = None if condition is None or not str(condition).strip() else self.condition(condition, label)
        kw = {"progress": progress, "condition": cond}
        return audit.sample_pairs(idx, self.model, self.lock, n, seed, sampler, steps, **kw)

    def compare(self, q: Query, label_a: str, label_b: str, k=8) -> dict:
        """One query attributed by two indexes, side by side (explorer/compare.py)."""
        if len(self.indexes) < 2:
            raise DataError("side by side needs two indexes; start the app with two --index folders")
        label_a = label_a or self.labels[0]  # the first index where none is named
        if not label_a or not label_b or label_a == label_b:
            raise DataError("choose two different methods to compare")
        a, b = (self.attribute(q, lab, k, bands=0) for lab in (label_a, label_b))
        return compare.comparison(a.data, b.data, label_a, label_b)

    def export(self, ans: Answer) -> list[str]:
        """report.png, scores.json, scores.csv and query.png in a fresh folder (`explorer.exports`)."""
        return exports.write_exports(
            ans.data, ans.query.u8, self.indexes.get(ans.index_label) or self.index(None)
        )
