"""What every method of the benchmark shares: the model, the training images and queries, the
seeded (x_t, t, ε) rows, the damping rules, and the typed result each adapter returns."""

from __future__ import annotations

import resource
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from benchmarks.peers.timer import Timer

OURS_DAMPING = 0.1  # relative to each layer's mean eigenvalue (attribution.influence.DAMPING)
TRAK_DAMPING = 1e-3  # TRAK ridge, relative to the mean eigenvalue of ΦᵀΦ (attribution.influence)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(pkg)
    except PackageNotFoundError:
        return "?"


@dataclass
class PeerResult:
    """One method's run: its (Q, N) scores and where its time and memory went."""

    scores: np.ndarray  # (Q, N) float32, positive = proponent
    total_s: float
    total_cpu_s: float
    stages_s: dict[str, float]
    stages_cpu_s: dict[str, float]
    settings: dict
    rss_after_setup_mb: float
    single_query_s: float | None = None  # one new query against the built index / fitted factors
    single_query_cpu_s: float | None = None
    single_query_all_s: list[float] | None = None
    peak_rss_build_mb: float | None = None
    peak_rss_factors_mb: float | None = None
    throughput: dict | None = None
    note: str | None = None

    @classmethod
    def from_timer(cls, scores, timer: Timer, settings: dict, rss_after_setup_mb: float, **kw) -> PeerResult:
        return cls(
            np.asarray(scores, dtype=np.float32),
            timer.total_s,
            timer.total_cpu_s,
            dict(timer.wall),
            dict(timer.cpu),
            settings,
            round(rss_after_setup_mb, 1),
            **kw,
        )

    def to_dict(self) -> dict:
        """The JSON record (without the scores, which go to an .npy file); unset fields left out."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "scores" and getattr(self, f.name) is not None
        }


# ---- the benchmark's model, images and queries ------------------------------------------------


@dataclass
class BenchInputs:
    model: object  # attribution.model.DiffusionModel
    data: object  # attribution.data.ImageDataset, the N training images
    queries: object  # torch.Tensor (Q, C, H, W)


def load_bench_model(setup: dict):
    """The benchmark model: the default, a folder, or an untrained seeded preset ("untrained" is
    the default's shape; "rgb32" is the larger 32×32 RGB U-Net with attention at 16² and 8²)."""
    from attribution.model import build_model, load_model

    if setup["model"] in ("untrained", "rgb32"):
        model = build_model("mnist" if setup["model"] == "untrained" else "rgb32", seed=0)
        model.unet.eval().requires_grad_(False)
        return model
    return load_model(None if setup["model"] == "default" else setup["model"])


def bench_images(setup: dict):
    """The embedded MNIST set as the benchmark model sees it: as is, or for "rgb32" padded to
    32×32 and tinted with a seeded colour per image (3 channels, still in [-1, 1])."""
    import torch

    from attribution.data import mnist

    data = mnist()
    if setup["model"] != "rgb32":
        return data
    x = torch.nn.functional.pad(data.images, (2, 2, 2, 2), value=-1.0)
    colour = (
        torch.rand(len(data), 3, 1, 1, generator=torch.Generator().manual_seed(setup["seed"])) * 0.7 + 0.3
    )
    data.images = ((x + 1) * colour - 1).contiguous()
    return data


def load_inputs(setup: dict) -> BenchInputs:
    """The model, the N training images and the Q queries exactly as the parent fixed them."""
    import torch

    model = load_bench_model(setup)
    data = bench_images(setup).subset(range(setup["n"]))
    return BenchInputs(model, data, torch.load(Path(setup["workdir"]) / "queries.pt"))


# ---- the rows every library sees ----------------------------------------------------------------


def example_rows(model, images, keys, k: int, seed: int):
    """Rows of examples `images` with their keys: x (B, K, C, H, W), t (B, K), y like x."""
    from attribution.measurements import Measurement

    r = Measurement("loss").rows(images, list(keys), k, seed, model.alphas_cumprod())
    b = images.shape[0]
    return r.x.view(b, k, *r.x.shape[1:]), r.t.view(b, k), r.y.view(b, k, *r.y.shape[1:])


class ExampleRows:
    """Dataset: item i = the K rows (x_t, t, ε) of image i, drawn lazily with key keys[i]."""

    def __init__(self, model, images, keys, k: int, seed: int):
        self.model, self.images, self.keys, self.k, self.seed = model, images, list(keys), k, seed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        x, t, y = example_rows(self.model, self.images[i : i + 1], [self.keys[i]], self.k, self.seed)
        return x[0], t[0], y[0]


def ggn_noise(key: int, k: int, shape: tuple[int, ...], seed: int):
    """Our MC-GGN sample z (K, *shape) of image `key` (attribution.curvature.output_cotangents)."""
    import torch

    from attribution.seeds import GGN_SAMPLES, generator

    return torch.randn((k, *shape), generator=generator(seed, GGN_SAMPLES, key))


class SingleRows:
    """Dataset: item j = one row (draw j % K of image j // K): x (C, H, W), t (), y, z.

    z is the MC-GGN sample our curvature back-propagates for that row, so a peer's sampled
    Fisher can use the very same samples (cotangent √(2/d)·z, i.e. target ε̂ − √(d/2)·z).
    """

    def __init__(self, model, images, keys, k: int, seed: int):
        self.ex = ExampleRows(model, images, keys, k, seed)
        self._cache: tuple[int, tuple] | None = None

    def __len__(self) -> int:
        return len(self.ex) * self.ex.k

    def __getitem__(self, j: int):
        i, r = divmod(j, self.ex.k)
        if self._cache is None or self._cache[0] != i:
            x, t, y = self.ex[i]
            z = ggn_noise(self.ex.keys[i], self.ex.k, tuple(x.shape[1:]), self.ex.seed)
            self._cache = (i, (x, t, y, z))
        x, t, y, z = self._cache[1]
        return x[r], t[r], y[r], z[r]
