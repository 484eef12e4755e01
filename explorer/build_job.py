"""The background build of a missing index: the app starts at once, shows the build's progress,
and answers queries when the index is ready. It builds exactly what `attribution index build`
builds with the same options (`default_build_config`), so either can resume the other's build.

While it builds, queries are answered over the images indexed so far (`BuildJob.partial()`): once
the curvature, the projection and the first feature shard are written, an in-memory flat FAISS
index over the finished shards (refreshed as new shards appear) serves them, labelled as partial.
The build runs on its own copy of the model, so these queries do not wait for it.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch

from attribution.console import say
from attribution.curvature import Curvature
from attribution.data import to_uint8
from attribution.influence import METHODS, AttributionConfig, Attributor
from attribution.projection import Projection
from index.build import build_index
from index.build_cli import add_build_args, config_from_args
from index.conditions import item_conditions, training_data
from index.layout import IndexLayout
from index.store import Index
from index.store import load as load_index

if TYPE_CHECKING:
    from explorer.service import Explorer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INDEX = ROOT / "indexes" / "mnist-ekfac"
DEFAULT_DATA = "mnist"
PARTIAL_MAX_BYTES = 1 << 30  # the partial index stops growing here (2,048 images at D = 131072)


def default_build_config(out: Path = DEFAULT_INDEX) -> AttributionConfig:
    """Exactly what `attribution index build --data mnist --out OUT` uses, so that the app and the
    CLI build (and resume) the same index."""
    p = argparse.ArgumentParser()
    add_build_args(p)
    return config_from_args(p.parse_args(["--data", DEFAULT_DATA, "--out", str(out)]))


def build_spec(out: Path, extra: str = "") -> dict:
    """BuildJob arguments for `out`: the default settings plus `extra` `attribution index build`
    options (a string, e.g. "--data my_images --n 500 --draws 8"), as the CLI would build them."""
    import shlex

    from attribution.errors import ConfigError

    p = argparse.ArgumentParser(prog="ATTRIBUTION_BUILD_ARGS", exit_on_error=False)
    add_build_args(p)
    try:
        a = p.parse_args(["--data", DEFAULT_DATA, *shlex.split(extra), "--out", str(out)])
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigError(f"ATTRIBUTION_BUILD_ARGS={extra!r}: {e}") from None
    return {"out": Path(out), "data": a.data, "n": a.n, "config": config_from_args(a)}


class BuildJob(threading.Thread):
    """Builds a missing index in the background (holding the model lock), then adds it."""

    def __init__(
        self,
        explorer: Explorer,
        out: Path,
        model_path: str,
        data: str = DEFAULT_DATA,
        n: int | None = None,
        config: dict | AttributionConfig | None = None,
    ):
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
        self.data = None
        self._partial: Index | None = None
        self._partial_lock = threading.Lock()

    def run(self) -> None:
        ex = self.explorer
        serving_threads = torch.get_num_threads()
        try:
            # the build's own copy of the model (its feature hooks), so that queries over the
            # partial index use the served model under ex.lock meanwhile; the same weights
            with ex.lock:
                model = copy.deepcopy(ex.model)
            torch.set_num_threads(self.threads)
            data = training_data(self.data_spec, model, self.n)  # a conditional model's conditions too
            self.data, self.n_images = data, len(data)
            say(
                f"building the index at {self.out}: {len(data)} images, method {self.cfg.method}. Progress "
                "follows; the page shows it too, with an estimate once the first shard is done, and answers "
                "over the images indexed so far from then on. This happens once; later starts load the "
                "index in seconds."
            )
            self.phase = "building"
            build_index(
                model,
                data,
                self.out,
                self.cfg,
                model_path=self.model_path,
                data_spec=self.data_spec,
                progress=True,
            )
            del model
            torch.set_num_threads(serving_threads)
            idx = load_index(self.out, ex.model)
            ex.add_index(idx)
            with self._partial_lock:
                self._partial = None
            self.estimate_s = time.time() - self.started_at
            say(
                f"index ready ({time.time() - self.started_at:.0f} s); the page now answers queries "
                "over every image"
            )
            ex.warmup()
        except Exception as e:  # shown on the page; the app stays up
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            torch.set_num_threads(serving_threads)
            self.done = True

    def estimate(self, lay: IndexLayout) -> float | None:
        """Seconds for the whole build, from its own progress: the features started when the last
        of the curvature, projection and density files was written; the rate of the shards done
        since then gives the rest (no estimate before the first shard)."""
        if self.estimate_s is not None or not self.n_images:
            return self.estimate_s
        shards = lay.finished_shards()
        parts = [f.stat().st_mtime for f in (lay.curvature, lay.projection, lay.density) if f.exists()]
        fresh = [
            p.stat().st_mtime for _, _, p in shards if p.stat().st_mtime > max(parts + [self.started_at])
        ]
        if not parts or not fresh:
            return None
        start = max(parts + [self.started_at])
        per_shard = (max(fresh) - start) / len(fresh)
        left = len(range(lay.rows_done(), self.n_images, shards[0][1] - shards[0][0]))
        return max(fresh) - self.started_at + per_shard * (left + 0.3)  # + 0.3: the store at the end

    def status(self) -> str:
        el = time.time() - self.started_at
        if self.error:
            return (
                f"**The index build failed:** {self.error}. Fix the cause and restart the app; "
                f"the build resumes from its finished parts in `{self.out}`."
            )
        parts = [
            f"**Building the index** `{self.out.name}` (first start only): {self.phase}, "
            f"{el / 60:.1f} min elapsed"
        ]
        layout = IndexLayout(self.out)
        try:
            est = self.estimate(layout)
        except OSError:  # a shard removed at the end of the build
            est = None
        if est:
            left = est - el
            parts.append(
                f"about {max(1, round(est / 60))} min in all, "
                + (f"about {round(left / 60)} min left" if left > 90 else "almost done")
            )
        if self.phase == "building" and self.n_images:
            needs_curvature = METHODS[self.cfg.method].preconditioner in ("kfac", "kfac-exact", "ekfac")
            if needs_curvature and not layout.curvature.exists():
                parts.append("step 1 of 2: fitting the curvature (a few minutes on 2 CPU cores)")
            else:
                parts.append(f"step 2 of 2: features of {layout.rows_done()} / {self.n_images} images")
        p = self.partial()
        if p is not None:
            parts.append(f"queries are answered now over the images indexed so far ({partial_note(p)})")
            return " · ".join(parts) + ". This page updates by itself."
        return " · ".join(parts) + (
            ". This page updates by itself; queries work once the first images are indexed."
        )

    # ---- the partial index ------------------------------------------------------------------------
    def partial(self) -> Index | None:
        """An in-memory flat index over the feature shards finished so far (None before the
        curvature, the projection and the first shard are written, and once the build is done);
        new shards are added on each call. Its manifest's `partial` says how many images it holds."""
        if self.done or self.data is None or self.phase != "building" or self.explorer.indexes:
            return None
        with self._partial_lock:
            try:
                self._grow_partial()
            except Exception:  # a shard removed or half-read at the end of the build: keep what we have
                pass
            return self._partial

    def _grow_partial(self) -> None:
        from safetensors.torch import load_file

        lay, n, p = IndexLayout(self.out), len(self.data), self._partial
        start, new = (0 if p is None else len(p)), []
        for s, e, path in lay.finished_shards():  # the contiguous run of new shards from `start`
            if s == start:
                new.append((e, path))
                start = e
        if not new:
            return
        if p is None:
            att = self._partial_attributor(lay)
            if att is None:
                return
            d = att.dim if att.uses_model else self.data.images[0].numel()
            settings = json.loads(lay.build.read_text()).get("settings", {})
            thumbs = to_uint8(self.data.images)
            thumbs = thumbs.squeeze(-1) if self.data.images.shape[1] == 1 else thumbs
            conds = item_conditions(self.explorer.model, self.data)  # as items.jsonl will hold them
            items = [
                {"row": i, "label": int(self.data.labels[i]), "source": self.data.sources[i], **conds[i]}
                for i in range(n)
            ]
            p = Index(
                self.out,
                {
                    **settings,
                    "projection": {"total_dim": d},
                    "faiss": {"type": "flat (in memory, partial)"},
                    "partial": {"indexed": 0, "of": n},
                },
                faiss.IndexFlatIP(d),
                items,
                thumbs,
                att,
            )
        for e, path in new:
            if e * p.faiss.d * 4 > PARTIAL_MAX_BYTES and len(p) > 0:
                break  # the finished index is coming; memory stays bounded meanwhile
            feats = p.attributor.finish_train_features(load_file(str(path))["raw"])
            p.faiss.add(np.ascontiguousarray(feats.numpy(), dtype=np.float32))
        p.manifest["partial"]["indexed"] = len(p)
        p.manifest["data"] = {**p.manifest.get("data", {}), "n": len(p)}
        self._partial = p

    def _partial_attributor(self, lay: IndexLayout) -> Attributor | None:
        """The query side from the parts written so far (as index/store.py loads a finished index)."""
        from safetensors.torch import load_file

        cfg, spec = self.cfg, METHODS[self.cfg.method]
        if spec.preconditioner == "trak" or not lay.build.exists():
            return None  # TRAK's inverse needs every training image
        projection = curvature = density = None
        if spec.preconditioner != "pixel":
            if not lay.projection.exists():
                return None
            projection = Projection.load(lay.projection)
        if cfg.spec.needs_curvature and projection is not None and projection.is_sketch:
            if not lay.curvature.exists():
                return None
            curvature = Curvature.load(lay.curvature)
        if cfg.importance:
            if not lay.density.exists():
                return None
            density = load_file(str(lay.density))["density"]
        return Attributor.from_parts(
            self.explorer.model,
            len(self.data),
            cfg,
            curvature,
            projection,
            None,
            density,
            device=next(self.explorer.model.unet.parameters()).device,
        )


def partial_note(idx: Index) -> str:
    """'partial: 768 of 5,000 images indexed' for a partial index; '' for a finished one."""
    p = idx.manifest.get("partial")
    return f"partial: {p['indexed']:,} of {p['of']:,} images indexed" if p else ""
