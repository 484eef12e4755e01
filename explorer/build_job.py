"""The background build of a missing index: the app starts at once, shows the build's progress,
and answers queries when the index is ready. It builds exactly what `attribution index build`
builds with the same options (`default_build_config`), so either can resume the other's build.
"""

from __future__ import annotations

import argparse
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from attribution.console import say
from attribution.data import load_dataset
from attribution.influence import METHODS, AttributionConfig, Attributor
from attribution.model import DiffusionModel
from index.build import add_build_args, build_index, config_from_args
from index.layout import IndexLayout
from index.store import load as load_index

if TYPE_CHECKING:
    from explorer.service import Explorer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INDEX = ROOT / "indexes" / "mnist-ekfac"
DEFAULT_DATA = "mnist"


def default_build_config(out: Path = DEFAULT_INDEX) -> AttributionConfig:
    """Exactly what `attribution index build --data mnist --out OUT` uses, so that the app and the
    CLI build (and resume) the same index."""
    p = argparse.ArgumentParser()
    add_build_args(p)
    return config_from_args(p.parse_args(["--data", DEFAULT_DATA, "--out", str(out)]))


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
                say(f"building the index at {self.out}: {len(data)} images, method {self.cfg.method}; "
                     f"about {max(1, round(self.estimate_s / 60))} minute(s). Progress follows; the page "
                     "shows it too. This happens once; later starts load the index in seconds.")
                self.phase = "building"
                build_index(model, data, self.out, self.cfg, model_path=self.model_path,
                            data_spec=self.data_spec, progress=True)
                idx = load_index(self.out, model)
                torch.set_num_threads(serving_threads)
            ex.add_index(idx)
            ex.warmup()
            say(f"index ready ({time.time() - self.started_at:.0f} s); the page now answers queries")
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
            layout = IndexLayout(self.out)
            if needs_curvature and not layout.curvature.exists():
                parts.append("step 1 of 2: fitting the curvature")
            else:
                parts.append(f"step 2 of 2: features of {layout.rows_done()} / {self.n_images} images")
        return " · ".join(parts) + ". This page updates by itself; queries work once it is done."
