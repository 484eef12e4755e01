"""Shared fixtures: a tiny model folder and tiny indexes over a few MNIST images, built once."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # app.py lives at the repository root (a Space entry point, not a package)
    sys.path.insert(0, str(ROOT))

TINY_N = 200
TINY_SIZE = 8


@dataclass
class TinyWorkspace:
    """A tiny (8×8, untrained) model folder and the first `TINY_N` MNIST images at 8×8.

    `index(method)` builds (once per session) and returns an index folder for that method with
    small settings (D = 256, 2 draws, 1 curvature draw, 4 query draws).
    """

    root: Path
    model_dir: Path
    n: int = TINY_N
    size: int = TINY_SIZE
    _indexes: dict = field(default_factory=dict)

    def model(self):
        from attribution.model import load_model

        return load_model(self.model_dir)

    def data(self):
        from attribution.data import load_dataset

        return load_dataset("mnist", channels=1, size=self.size, n=self.n)

    def index(self, method: str = "ekfac", **config) -> Path:
        from attribution.influence import AttributionConfig
        from index.build import build_index

        cfg = {
            "method": method,
            "draws": 2,
            "curvature_draws": 1,
            "query_draws": 4,
            "dim": 256,
            "batch_size": 32,
            **config,
        }
        key = tuple(sorted(cfg.items()))
        if key not in self._indexes:
            out = self.root / f"index-{method}-{len(self._indexes)}"
            build_index(
                self.model(),
                self.data(),
                out,
                AttributionConfig(**cfg),
                model_path=str(self.model_dir),
                data_spec="mnist",
                progress=False,
            )
            self._indexes[key] = out
        return self._indexes[key]


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> TinyWorkspace:
    from attribution.model import build_model, save_model

    root = tmp_path_factory.mktemp("tiny-workspace")
    save_model(build_model("tiny", seed=0), root / "model")
    return TinyWorkspace(root, root / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a currently unused local TCP port."""
    return _free_port


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (skipped if either is missing)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (install it with .ci/install-browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: one torch thread. Two OpenMP threads on two busy cores spin-wait on each
    other and run 10-300x slower; one thread also keeps seeded results bitwise reproducible."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_default_index():
    """`build(out, model, n=500) -> out`: a cheap index of the default model over the first n
    default images (the README screenshots' settings)."""
    from attribution.data import load_dataset
    from attribution.influence import AttributionConfig
    from index.build import build_index

    def build(out: Path, model, n: int = 500) -> Path:
        cfg = AttributionConfig(
            method="ekfac",
            draws=4,
            curvature_draws=1,
            query_draws=8,
            dim=4096,
            curvature_images=250,
            curvature_min_rows=250,
        )
        data = load_dataset("mnist", 1, 28, n)
        return build_index(model, data, out, cfg, model_path="default", data_spec="mnist", progress=False)

    return build
