"""Speed, memory and agreement against the attribution libraries people use today (issue 7).

    python benchmarks/vs_peers.py --quick            # N=100, Q=5, K=2: a smoke test (minutes)
    python benchmarks/vs_peers.py --jobs 2           # N=1,000, Q=100, K=8, the six DEFAULT_METHODS two
                                                     # at a time on 2 cores (about 25 min)
    python benchmarks/vs_peers.py --model rgb32      # the larger 32×32 RGB U-Net with attention
    python benchmarks/vs_peers.py --n 5000           # the size the speed goals are stated for
    pip install torch==2.13.0 -r benchmarks/requirements-peers.txt && pip uninstall -y torchvision

Every method sees the same model, the same N training images, the same Q queries and the same
rows: `Measurement("loss").rows(x0, keys, K, seed, alphas_cumprod)` with our keys (training
image i uses key i, every query uses `QUERY_KEY`), K draws per training image and per query and
K_c = max(1, K // 2) draws per image for the curvature. Each peer's loss / measurement function is
written around those exact (x_t, t, ε) rows, so the only differences are the algorithms.

Methods (each runs in its own subprocess, so its peak RSS is its own):
  ours-ekfac          build_index(method="ekfac", the product's D, --faiss auto) + load().all_scores
  ours-kfac           the same with method="kfac" (Kronecker fast path, D ≈ 8192, factored damping)
  ours-unprojected    Attributor(method="ekfac", dim=None).fit().scores(queries): the reference
  kronfluence-ekfac   Analyzer.fit_all_factors(strategy="ekfac") + compute_pairwise_scores
  kronfluence-ekfac-own-mc  the same with kronfluence drawing its own MC-GGN samples
  trak                traker TRAKer (BasicProjector on CPU), f = the diffusion loss, Q = 1
  dattri-trak         dattri TRAKAttributor, same function
  dattri-datainf      dattri IFAttributorDataInf: its influence function that handles Conv2d (every
                      parameter; the empirical Fisher inverted per layer from rank-one terms)
  dattri-ekfac        dattri IFAttributorEKFAC (nn.Linear layers only; see the JSON for why)

Kronfluence's task: factors are fitted on *rows* (one (x_t, t) draw per dataset item, as our
EK-FAC's corrected eigenvalues are per row); `compute_train_loss(sample=True)` returns
Σ_r mean_pixels(ε̂_r − y_r)² with y_r = ε̂_r.detach() + √(d/2)·z, z ~ N(0, I), whose gradient
covariance is the GGN (2/d)·I of the mean-pixel MSE (our MC-GGN, DESIGN §1); z is the very
sample our curvature back-propagates for that row (`kronfluence-ekfac-own-mc`: fresh draws). Scores use
*examples* (K rows per item, loss = mean over the K rows); kronfluence's per-sample gradients
are per row of the U-Net batch, so `post_process_per_sample_gradient` sums each example's K rows.
Damping: kronfluence's per-layer heuristic (`damping_factor=None`, λ = c·mean(Λ*)) with c set
from 0.1 to our 1e-8, i.e. exactly our exact-damping rule.

Timings are wall-clock, end to end (curvature, training-side work, scoring), single-threaded
(OMP_NUM_THREADS=1, torch.set_num_threads(1)) unless --threads says otherwise. Writes
benchmarks/results/vs_peers.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {
    "quick": dict(n=100, q=5, k=2, trak_dim=512),
    "medium": dict(n=300, q=20, k=4, trak_dim=2048),
    "full": dict(n=1000, q=100, k=8, trak_dim=2048),
}
METHODS = ("ours-ekfac", "ours-kfac", "ours-unprojected", "kronfluence-ekfac", "kronfluence-ekfac-own-mc",
           "trak", "dattri-trak", "dattri-datainf", "dattri-ekfac")
# The one-command run (--jobs 2: about 25 min at N = 1,000 on 2 cores); the rest on request
# (dattri-datainf alone takes about 30 min at N = 1,000: dattri forms every per-example gradient twice)
DEFAULT_METHODS = ("ours-ekfac", "ours-kfac", "ours-unprojected", "kronfluence-ekfac", "trak", "dattri-trak")
RELATIVE_COST = {"dattri-datainf": 4.5, "dattri-ekfac": 3.0, "dattri-trak": 2.2, "kronfluence-ekfac": 1.4,
                 "kronfluence-ekfac-own-mc": 1.4, "ours-unprojected": 1.2, "ours-ekfac": 1.0, "trak": 0.9,
                 "ours-kfac": 0.7}
PEER_PACKAGES = {"kronfluence-ekfac": "kronfluence", "kronfluence-ekfac-own-mc": "kronfluence", "trak": "trak",
                 "dattri-trak": "dattri", "dattri-datainf": "dattri", "dattri-ekfac": "dattri"}
REFERENCE = "ours-unprojected"
PEER_REFERENCE = "kronfluence-ekfac"
OURS_DAMPING = 1e-8  # relative to each layer's mean eigenvalue (attribution.curvature)
TRAK_DAMPING = 1e-3  # TRAK ridge, relative to the mean eigenvalue of ΦᵀΦ (attribution.influence)


# ---- shared set-up ----------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    colour = torch.rand(len(data), 3, 1, 1, generator=torch.Generator().manual_seed(setup["seed"])) * 0.7 + 0.3
    data.images = ((x + 1) * colour - 1).contiguous()
    return data


def load_inputs(setup: dict):
    """(model, training ImageDataset, queries (Q, C, H, W)) exactly as the parent fixed them."""
    import torch

    model = load_bench_model(setup)
    data = bench_images(setup).subset(range(setup["n"]))
    queries = torch.load(Path(setup["workdir"]) / "queries.pt")
    return model, data, queries


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
        x, t, y = example_rows(self.model, self.images[i:i + 1], [self.keys[i]], self.k, self.seed)
        return x[0], t[0], y[0]


def ggn_noise(key: int, k: int, shape: tuple[int, ...], seed: int):
    """Our MC-GGN sample z (K, *shape) of image `key` (attribution.curvature.output_cotangents)."""
    import torch

    from attribution.seeds import hash_seed

    return torch.randn((k, *shape), generator=torch.Generator().manual_seed(hash_seed(seed, 11, key)))


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


def row_loss(unet, x, t, y):
    """Σ over rows of mean_pixels (ε̂ − y)² for rows x (R, C, H, W)."""
    return (unet(x, t).sample - y).pow(2).flatten(1).mean(1).sum()


# ---- workers (one per method, each in its own process) ---------------------------------------

def worker_ours(setup: dict, method: str) -> dict:
    import numpy as np

    from attribution.influence import AttributionConfig, Attributor
    from index.build import build_index
    from index.store import load

    model, data, queries = load_inputs(setup)
    rss0 = peak_rss_mb()
    k, kc, seed = setup["k"], setup["kc"], setup["seed"]
    res: dict = {"rss_after_setup_mb": round(rss0, 1)}
    if method == "ours-unprojected":
        cfg = AttributionConfig(method="ekfac", draws=k, query_draws=k, curvature_draws=kc, dim=None,
                                seed=seed)
        t0 = time.perf_counter()
        c0 = time.process_time()
        att = Attributor(model, data, cfg, progress=False).fit()
        t1 = time.perf_counter()
        c1 = time.process_time()
        scores = att.scores(queries).numpy()
        t2 = time.perf_counter()
        c2 = time.process_time()
        res["stages_s"] = {"curvature": t1 - t0, "train_features_and_scores": t2 - t1}
        res["stages_cpu_s"] = {"curvature": c1 - c0, "train_features_and_scores": c2 - c1}
        res["total_s"], res["total_cpu_s"] = t2 - t0, c2 - c0
        res["settings"] = {"method": "ekfac", "dim": None, "damping": f"{OURS_DAMPING} x mean eigenvalue per layer"}
        return res, scores
    name = method.split("-", 1)[1]
    fast = name == "kfac"  # the K-FAC fast path: Kronecker projection, preconditioning folded in
    cfg = AttributionConfig(method=name, draws=k, query_draws=k, curvature_draws=kc,
                            dim=setup.get("kfac_dim", 8192) if fast else setup["dim"],
                            projection="kronecker" if fast else "sketch", seed=seed)
    out = Path(setup["workdir"]) / f"index-{name}"
    shutil.rmtree(out, ignore_errors=True)
    import attribution.curvature as curvature_module

    fit = curvature_module.fit_curvature
    curv_cpu = []

    def timed_fit(*args, **kwargs):  # CPU seconds of the curvature stage inside build_index
        c = time.process_time()
        try:
            return fit(*args, **kwargs)
        finally:
            curv_cpu.append(time.process_time() - c)

    curvature_module.fit_curvature = timed_fit
    t0 = time.perf_counter()
    c0 = time.process_time()
    build_index(model, data, out, cfg, faiss_type="auto", device="cpu", progress=False)
    t1 = time.perf_counter()
    c1 = time.process_time()
    rss_build = peak_rss_mb()
    idx = load(out, model, device="cpu")
    psi = idx.query_features(queries)
    scores = idx.all_scores(psi)  # (Q, N) from one exhaustive FAISS pass (top-k is a slice of it)
    t2 = time.perf_counter()
    c2 = time.process_time()
    # latency of one new query against the built index (image -> top-16 proponents/opponents)
    idx.query(queries[0])
    single, single_cpu = [], []
    for i in range(min(len(queries), setup["single_queries"])):
        s, sc = time.perf_counter(), time.process_time()
        idx.query(queries[i])
        single.append(time.perf_counter() - s)
        single_cpu.append(time.process_time() - sc)
    manifest = json.loads((out / "manifest.json").read_text())
    plain = plain_rows_per_s(model, data.images, k, seed, setup["batch_size"])
    feat = setup["n"] * k / manifest["build"]["seconds_features"]
    res["throughput"] = {"feature_rows_per_s": feat, "plain_fwd_bwd_rows_per_s": plain, "ratio": feat / plain,
                         "note": "features stage of the build (incl. writing the store) vs a plain batched "
                                 "forward+backward of the diffusion loss on the same rows, same process"}
    res["stages_s"] = {"build_index": t1 - t0, "build_curvature": manifest["build"]["seconds_curvature"],
                       "build_features": manifest["build"]["seconds_features"],
                       "load_and_query_all": t2 - t1}
    res["stages_cpu_s"] = {"build_index": c1 - c0, "build_curvature": sum(curv_cpu),
                           "build_features_and_store": c1 - c0 - sum(curv_cpu), "load_and_query_all": c2 - c1}
    res["total_s"], res["total_cpu_s"] = t2 - t0, c2 - c0
    res["single_query_s"] = statistics.median(single)
    res["single_query_cpu_s"] = statistics.median(single_cpu)
    res["single_query_all_s"] = single
    res["peak_rss_build_mb"] = round(rss_build, 1)
    res["settings"] = {"method": name, "dim": idx.manifest["projection"]["total_dim"],
                       "projection": idx.manifest["projection"]["kind"], "faiss": idx.manifest["faiss"]["type"],
                       "damping": (f"{OURS_DAMPING} x mean eigenvalue per layer (exact)" if name == "ekfac" else
                                   f"factored: sqrt({OURS_DAMPING}) x mean eigenvalue of A and of S")}
    return res, np.asarray(scores, dtype=np.float32)


def plain_rows_per_s(model, images, k: int, seed: int, batch_size: int, batches: int = 4) -> float:
    """(image×draw)/s of a plain batched forward + backward of the diffusion loss (parameter
    gradients, `index_speed.plain_step`) on the benchmark's own rows: the physical limit of
    gradient-based attribution. The first batch warms up; images wrap around when N is small."""
    from index_speed import plain_step

    rows, seconds = 0, 0.0
    for j in range(batches + 1):
        keys = list(range(j * batch_size, (j + 1) * batch_size))
        x0 = images[[i % len(images) for i in keys]]
        t0 = time.perf_counter()
        plain_step(model, x0, keys, k, seed)
        if j:
            rows, seconds = rows + len(keys) * k, seconds + time.perf_counter() - t0
    return rows / seconds


def worker_kronfluence(setup: dict, fresh_mc: bool = False) -> dict:
    import copy

    import kronfluence.factor.config as kf_config
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from attribution.influence import QUERY_KEY

    model, data, queries = load_inputs(setup)
    rss0 = peak_rss_mb()
    k, kc, seed, n, q = setup["k"], setup["kc"], setup["seed"], setup["n"], queries.shape[0]
    d = float(queries[0].numel())
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        """ε̂ = unet(x_t, t).sample, so that the Task sees a plain (x, t) -> tensor model."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t).sample

    class RowTask(Task):
        """Items are single rows (factor fitting). sample=True: targets from the model's predictive."""

        def compute_train_loss(self, batch, model, sample=False):
            x, t, y, z = batch
            out = model(x, t)
            if sample:  # y ~ N(ε̂, (d/2)·I), with our own seeded sample z unless own-mc
                z = torch.randn_like(out) if fresh_mc else z
                y = out.detach() - math.sqrt(d / 2) * z
            return (out - y).pow(2).flatten(1).mean(1).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    class ExampleTask(Task):
        """Items are examples with K rows; per-row per-sample gradients are summed per example."""

        enable_post_process_per_sample_gradient = True

        def compute_train_loss(self, batch, model, sample=False):
            x, t, y = batch
            kk = x.shape[1]
            out = model(x.flatten(0, 1), t.flatten())
            y = y.flatten(0, 1)
            if sample:
                with torch.no_grad():
                    y = out.detach() + math.sqrt(d / 2) * torch.randn_like(out)
            return (out - y).pow(2).flatten(1).mean(1).sum() / kk

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def post_process_per_sample_gradient(self, module_name, gradient):
            return gradient.view(-1, k, *gradient.shape[1:]).sum(1)

    # our exact-damping rule: λ = 1e-8 · mean corrected eigenvalue, per layer
    kf_config.HEURISTIC_DAMPING_SCALE = OURS_DAMPING
    score_args = ScoreArguments(damping_factor=None, query_gradient_accumulation_steps=max(1, math.ceil(q / 8)))
    factor_args = FactorArguments(strategy="ekfac")
    outdir = Path(setup["workdir"]) / ("kronfluence-own-mc" if fresh_mc else "kronfluence")
    shutil.rmtree(outdir, ignore_errors=True)
    base = Net(model.unet).eval()
    dl = DataLoaderKwargs(num_workers=0)

    fit_model = prepare_model(copy.deepcopy(base), RowTask())
    a_fit = Analyzer("vs_peers", fit_model, RowTask(), cpu=True, output_dir=str(outdir), disable_tqdm=True)
    a_fit.set_dataloader_kwargs(dl)
    score_model = prepare_model(copy.deepcopy(base), ExampleTask())
    a_score = Analyzer("vs_peers", score_model, ExampleTask(), cpu=True, output_dir=str(outdir),
                       disable_tqdm=True)
    a_score.set_dataloader_kwargs(dl)

    factor_rows = SingleRows(model, data.images, range(n), kc, seed)
    train = ExampleRows(model, data.images, range(n), k, seed)
    query_set = ExampleRows(model, queries, [QUERY_KEY] * q, k, seed)
    bs = setup["batch_size"]
    t0 = time.perf_counter()
    c0 = time.process_time()
    a_fit.fit_all_factors("ekfac", dataset=factor_rows, per_device_batch_size=bs * kc, factor_args=factor_args,
                          overwrite_output_dir=True)
    t1 = time.perf_counter()
    c1 = time.process_time()
    rss_fit = peak_rss_mb()
    a_score.compute_pairwise_scores("pairwise", "ekfac", query_dataset=query_set, train_dataset=train,
                                    per_device_query_batch_size=min(q, 8), per_device_train_batch_size=bs,
                                    score_args=score_args, overwrite_output_dir=True)
    t2 = time.perf_counter()
    c2 = time.process_time()
    scores = a_score.load_pairwise_scores("pairwise")["all_modules"].float().numpy()
    single_args = ScoreArguments(damping_factor=None)
    s0 = time.perf_counter()
    c0s = time.process_time()
    a_score.compute_pairwise_scores("single", "ekfac", query_dataset=query_set, train_dataset=train,
                                    per_device_query_batch_size=1, per_device_train_batch_size=bs,
                                    query_indices=[0], score_args=single_args, overwrite_output_dir=True)
    s1 = time.perf_counter()
    c1s = time.process_time()
    res = {"rss_after_setup_mb": round(rss0, 1), "peak_rss_factors_mb": round(rss_fit, 1),
           "stages_s": {"fit_all_factors": t1 - t0, "compute_pairwise_scores": t2 - t1},
           "stages_cpu_s": {"fit_all_factors": c1 - c0, "compute_pairwise_scores": c2 - c1},
           "total_s": t2 - t0, "total_cpu_s": c2 - c0, "single_query_s": s1 - s0,
           "single_query_cpu_s": c1s - c0s,
           "settings": {"strategy": "ekfac", "damping_factor": None,
                        "HEURISTIC_DAMPING_SCALE": OURS_DAMPING,
                        "damping": f"{OURS_DAMPING} x mean corrected eigenvalue per layer (kronfluence "
                                   "heuristic damping with its scale set from 0.1 to ours)",
                        "factor_items": "rows (one draw each)", "score_items": "examples (K rows, summed)",
                        "mc_target": "y = eps_hat - sqrt(d/2) z, z = "
                                     + ("kronfluence's own draws" if fresh_mc else "our MC-GGN samples"),
                        "version": _version("kronfluence")}}
    return res, scores


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def worker_trak(setup: dict) -> dict:
    import numpy as np
    import torch
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType
    from trak.score_computers import BasicScoreComputer

    from attribution.influence import QUERY_KEY

    model, data, queries = load_inputs(setup)
    rss0 = peak_rss_mb()
    k, seed, n, q = setup["k"], setup["seed"], setup["n"], queries.shape[0]
    unet = model.unet

    class DiffusionLossOutput(AbstractModelOutput):
        """f(z) = the example's diffusion loss over its K rows; out-to-loss gradient Q = 1."""

        def __init__(self):
            pass

        @staticmethod
        def get_output(model, weights, buffers, x, t, y):
            out = torch.func.functional_call(model, (weights, buffers), args=(x, t)).sample
            return (out - y).pow(2).flatten(1).mean(1).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    class RelativeRidge(BasicScoreComputer):
        """XᵀX + λI with λ = TRAK_DAMPING · mean eigenvalue of XᵀX (our TRAK's a-priori rule)."""

        def get_xtx(self, grads):
            xtx = super().get_xtx(grads)
            return xtx + TRAK_DAMPING * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)

    proj_dim = setup["trak_dim"]
    n_params = sum(p.numel() for p in unet.parameters())
    save = Path(setup["workdir"]) / "trak"
    shutil.rmtree(save, ignore_errors=True)
    for p in unet.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    c0 = time.process_time()
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float32, block_size=setup["trak_block"])
    traker = TRAKer(model=unet, task=DiffusionLossOutput(), train_set_size=n, save_dir=str(save),
                    device="cpu", projector=projector, use_half_precision=False, logging_level=40,
                    score_computer=RelativeRidge)
    traker.load_checkpoint(unet.state_dict(), model_id=0)
    bs = setup["batch_size"]
    for i in range(0, n, bs):
        x, t, y = example_rows(model, data.images[i:i + bs], range(i, min(n, i + bs)), k, seed)
        traker.featurize(batch=(x, t, y), num_samples=x.shape[0])
    traker.finalize_features()
    t1 = time.perf_counter()
    c1 = time.process_time()
    traker.start_scoring_checkpoint("queries", unet.state_dict(), model_id=0, num_targets=q)
    for i in range(0, q, bs):
        x, t, y = example_rows(model, queries[i:i + bs], [QUERY_KEY] * min(bs, q - i), k, seed)
        traker.score(batch=(x, t, y), num_samples=x.shape[0])
    scores = np.asarray(traker.finalize_scores("queries")).T  # (Q, N)
    t2 = time.perf_counter()
    c2 = time.process_time()
    res = {"rss_after_setup_mb": round(rss0, 1),
           "stages_s": {"featurize_and_finalize": t1 - t0, "score_queries": t2 - t1},
           "stages_cpu_s": {"featurize_and_finalize": c1 - c0, "score_queries": c2 - c1},
           "total_s": t2 - t0, "total_cpu_s": c2 - c0,
           "settings": {"proj_dim": proj_dim, "projector": "BasicProjector (normal, float32)",
                        "output_function": "diffusion loss (mean over K rows)",
                        "ridge": f"{TRAK_DAMPING} x mean eigenvalue of XtX (BasicScoreComputer.get_xtx)",
                        "version": _version("traker")}}
    return res, np.asarray(scores, dtype=np.float32)


def cache_then_attribute(att, cache_loader, train, query_set, bs: int, res: dict, after_cache):
    """dattri's two stages, timed into `res`: att.cache(cache_loader), after_cache(), then
    att.attribute over the training and query items; returns the (N, Q) scores."""
    from torch.utils.data import DataLoader

    t0, c0 = time.perf_counter(), time.process_time()
    att.cache(cache_loader)
    after_cache()
    t1, c1 = time.perf_counter(), time.process_time()
    scores = att.attribute(DataLoader(train, batch_size=bs, shuffle=False),
                           DataLoader(query_set, batch_size=bs, shuffle=False))
    t2, c2 = time.perf_counter(), time.process_time()
    res.update({"stages_s": {"cache": t1 - t0, "attribute": t2 - t1}, "total_s": t2 - t0,
                "stages_cpu_s": {"cache": c1 - c0, "attribute": c2 - c1}, "total_cpu_s": c2 - c0})
    return scores


def worker_dattri(setup: dict, method: str) -> dict:
    import numpy as np
    import torch
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    from attribution.influence import QUERY_KEY

    model, data, queries = load_inputs(setup)
    rss0 = peak_rss_mb()
    k, kc, seed, n, q = setup["k"], setup["kc"], setup["seed"], setup["n"], queries.shape[0]
    unet = model.unet
    for p in unet.parameters():
        p.requires_grad_(True)
    train = ExampleRows(model, data.images, range(n), k, seed)
    query_set = ExampleRows(model, queries, [QUERY_KEY] * q, k, seed)
    bs = setup["batch_size"]
    res: dict = {"rss_after_setup_mb": round(rss0, 1)}

    def unet_rows(params, x, t):
        """ε̂ for rows given with any leading shape: x (..., C, H, W), t (...)."""
        out = torch.func.functional_call(unet, params, args=(x.reshape(-1, *x.shape[-3:]), t.reshape(-1)))
        return out.sample

    def loss_func(params, item):
        """The example's diffusion loss, mean over its K rows (dattri passes (K, ...) or (1, K, ...))."""
        x, t, y = item
        return (unet_rows(params, x, t) - y.reshape(-1, *y.shape[-3:])).pow(2).flatten(1).mean(1).mean()

    if method == "dattri-trak":
        from dattri.algorithm.trak import TRAKAttributor

        def zero_prob(params, item):  # TRAK's Q = 1 − p; f is the loss itself, so Q = 1
            return torch.zeros(())

        solve = torch.linalg.solve

        def ridge_solve(a, b, *args, **kwargs):  # our TRAK ridge: 1e-3 · mean eigenvalue of ΦᵀΦ
            a = a + TRAK_DAMPING * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
            return solve(a, b, *args, **kwargs)

        torch.linalg.solve = ridge_solve  # only this worker process; dattri's cache() calls it once
        task = AttributionTask(loss_func=loss_func, model=unet, checkpoints=unet.state_dict())
        att = TRAKAttributor(task, correct_probability_func=zero_prob, device="cpu",
                             projector_kwargs={"proj_dim": setup["trak_dim"], "device": "cpu", "proj_seed": seed})
        t0 = time.perf_counter()
        c0 = time.process_time()
        att.cache(DataLoader(train, batch_size=bs, shuffle=False))
        t1 = time.perf_counter()
        c1 = time.process_time()
        scores = att.attribute(DataLoader(query_set, batch_size=bs, shuffle=False))  # (N, Q)
        t2 = time.perf_counter()
        c2 = time.process_time()
        res.update({"stages_s": {"cache": t1 - t0, "attribute": t2 - t1}, "total_s": t2 - t0,
                    "stages_cpu_s": {"cache": c1 - c0, "attribute": c2 - c1},
                    "total_cpu_s": c2 - c0, "settings": {"proj_dim": setup["trak_dim"],
                                 "ridge": f"{TRAK_DAMPING} x mean eigenvalue of XtX (patched solve)",
                                 "version": _version("dattri")}})
        return res, np.asarray(scores.detach().T, dtype=np.float32)

    if method == "dattri-datainf":
        from dattri.algorithm.influence_function import IFAttributorDataInf

        task = AttributionTask(loss_func=loss_func, model=unet, checkpoints=unet.state_dict())
        att = IFAttributorDataInf(task, device="cpu", regularization=1.0)

        def datainf_damping():  # DataInf's rule: 0.1 × mean squared training-gradient entry (one value)
            att.regularization = float(0.1 * att._cached_train_reps[0].pow(2).mean())

        scores = cache_then_attribute(att, DataLoader(train, batch_size=bs, shuffle=False), train, query_set,
                                      bs, res, datainf_damping)
        res.update({"settings": {"regularization": att.regularization,
                                 "regularization_rule": "0.1 x mean squared training-gradient entry",
                                 "curvature": "empirical Fisher of the diffusion loss, DataInf's closed form",
                                 "version": _version("dattri")}})
        return res, np.asarray(scores.detach().T, dtype=np.float32)

    # dattri-ekfac: IFAttributorEKFAC handles nn.Linear only, and only 2-D Linear inputs
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    linear2d = [name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                and (name.startswith("time_embedding") or name.endswith("time_emb_proj"))]
    d = float(queries[0].numel())

    def target_func(params, item):
        """Rows with z (curvature fit): the MC-GGN loss with our samples; else the diffusion loss."""
        if len(item) == 3:
            return loss_func(params, item)
        x, t, y, z = item
        out = unet_rows(params, x, t)
        yy = out.detach() - math.sqrt(d / 2) * z
        return (out - yy).pow(2).flatten(1).mean(1).mean()

    task = AttributionTask(loss_func=loss_func, model=unet, checkpoints=unet.state_dict(),
                           target_func=target_func)
    att = IFAttributorEKFAC(task, module_name=linear2d, device="cpu", damping=0.0)
    def our_damping():  # per layer
        for name, lam in att.cached_lambdas.items():
            att.cached_lambdas[name] = lam + OURS_DAMPING * lam.mean()

    scores = cache_then_attribute(att, DataLoader(SingleRows(model, data.images, range(n), kc, seed),
                                                  batch_size=bs * kc, shuffle=False),
                                  train, query_set, bs, res, our_damping)
    n_par = sum(p.numel() for nm, p in unet.named_parameters() if nm.rsplit(".", 1)[0] in linear2d)
    res.update({"settings": {"layers": linear2d, "params_covered": n_par,
                             "params_total": sum(p.numel() for p in unet.parameters()),
                             "damping": f"{OURS_DAMPING} x mean corrected eigenvalue per layer",
                             "fisher": "MC GGN with our samples z (rows), test side: diffusion loss",
                             "version": _version("dattri")},
                "note": "dattri's EK-FAC supports nn.Linear only (no Conv2d) and fails on Linear layers "
                        "with 3-D inputs (attention tokens); run on the 2-D-input Linear layers only "
                        "(time embedding), so its scores cover a small part of the model"})
    return res, np.asarray(scores.detach().T, dtype=np.float32)


def run_worker(method: str, workdir: Path) -> int:
    import numpy as np
    import torch

    setup = json.loads((workdir / "setup.json").read_text())
    setup["batch_size"] = setup.get("batch_size_overrides", {}).get(method, setup["batch_size"])
    torch.set_num_threads(setup["threads"])
    try:
        if method.startswith("ours-"):
            res, scores = worker_ours(setup, method)
        elif method.startswith("kronfluence-ekfac"):
            res, scores = worker_kronfluence(setup, fresh_mc=method.endswith("own-mc"))
        elif method == "trak":
            res, scores = worker_trak(setup)
        elif method.startswith("dattri-"):
            res, scores = worker_dattri(setup, method)
        else:
            raise ValueError(f"unknown method {method}")
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
        res["batch_size_images"] = setup["batch_size"]
        res["ok"] = True
        np.save(workdir / f"{method}.npy", scores)
    except Exception as e:  # the parent records why a peer could not run, then moves on
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:], "peak_rss_mb": round(peak_rss_mb(), 1)}
    (workdir / f"{method}.json").write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["ok"] else 1


# ---- parent: set-up, subprocesses, agreement, table -------------------------------------------

def mean_spearman(a, b) -> float | None:
    """Mean over queries of the Spearman correlation between two (Q, N) score matrices."""
    import numpy as np
    from scipy.stats import spearmanr

    if a is None or b is None or a.shape != b.shape:
        return None
    vals = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def make_setup(a: argparse.Namespace, workdir: Path) -> dict:
    import torch

    from attribution.model import DEFAULT_MODEL_DIR

    mode = dict(MODES[a.mode])
    for key in ("n", "q", "k", "trak_dim"):
        if getattr(a, key) is not None:
            mode[key] = getattr(a, key)
    if a.model:
        model_spec = a.model
    elif (DEFAULT_MODEL_DIR / "unet" / "config.json").is_file() or (DEFAULT_MODEL_DIR / "config.json").is_file():
        model_spec = "default"
    else:
        model_spec = "untrained"
    setup = {"mode": a.mode, **mode, "kc": a.kc or max(1, mode["k"] // 2), "seed": 0, "dim": a.dim or _default_dim(),
             "trak_block": a.trak_block, "batch_size": a.batch_size,
             "batch_size_overrides": {m: int(b) for m, b in (kv.split("=") for kv in a.batch_override)},
             "threads": a.threads, "single_queries": a.single_queries, "model": model_spec,
             "workdir": str(workdir)}
    all_images = bench_images(setup)
    n, q = setup["n"], setup["q"]
    if n + q <= len(all_images):
        queries = all_images.images[n:n + q]
        setup["queries"] = f"mnist() rows {n}..{n + q - 1} (not in the training set)"
    else:
        from attribution.sample import sample

        model = load_bench_model(setup)
        queries = sample(model, q, seed=1, sampler="ddim", steps=50, progress=False).images
        setup["queries"] = f"{q} DDIM samples (50 steps, seed 1) of the model"
    torch.save(queries.clone(), workdir / "queries.pt")
    (workdir / "setup.json").write_text(json.dumps(setup, indent=2))
    return setup


def fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ratio(r: dict, ref: dict, key: str) -> float | None:
    if not (r.get("ok") and ref.get("ok")) or r.get(key) is None or not ref.get(key):
        return None
    return r[key] / ref[key]


def table(results: dict, setup: dict) -> str:
    """Markdown table; ratios are this method's time over ours-ekfac's (> 1: ours is faster)."""
    ours = results.get("ours-ekfac", {})
    lines = [f"N = {setup['n']} training images, Q = {setup['q']} queries, K = {setup['k']} draws "
             f"(curvature K_c = {setup['kc']}), model: {setup['model']}, threads: {setup['threads']}. "
             "Ratios: method / ours-ekfac (wall; CPU in brackets).",
             "",
             "| method | total s (CPU s) | ratio | one new query s (CPU s) | ratio | peak RSS MB | "
             f"Spearman vs {REFERENCE} | Spearman vs {PEER_REFERENCE} | features / plain fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        if not r.get("ok"):
            lines.append(f"| {m} | failed: {r.get('error', '?')[:90]} | | | | {fmt(r.get('peak_rss_mb'), 0)} | | | |")
            continue
        tr, tc = _ratio(r, ours, "total_s"), _ratio(r, ours, "total_cpu_s")
        qr, qc = _ratio(r, ours, "single_query_s"), _ratio(r, ours, "single_query_cpu_s")
        lines.append(
            f"| {m} | {fmt(r['total_s'])} ({fmt(r.get('total_cpu_s'))}) | {fmt(tr, 2)}× ({fmt(tc, 2)}×) | "
            f"{fmt(r.get('single_query_s'), 3)} ({fmt(r.get('single_query_cpu_s'), 3)}) | "
            f"{fmt(qr, 0)}× ({fmt(qc, 0)}×) | {fmt(r.get('peak_rss_mb'), 0)} | "
            f"{fmt(r.get('spearman_vs_' + REFERENCE), 3)} | {fmt(r.get('spearman_vs_' + PEER_REFERENCE), 3)} | "
            + (f"{r['throughput']['feature_rows_per_s']:.0f} / {r['throughput']['plain_fwd_bwd_rows_per_s']:.0f} "
               f"= {r['throughput']['ratio']:.2f} |" if r.get("throughput") else "– |"))
    return "\n".join(lines)


def _default_dim() -> int:
    from attribution.influence import DEFAULT_DIM

    return DEFAULT_DIM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_const", dest="mode", const="quick")
    p.add_argument("--medium", action="store_const", dest="mode", const="medium")
    p.add_argument("--mode", choices=tuple(MODES))
    p.set_defaults(mode="full")  # after --quick/--medium, whose store_const would default it to None
    p.add_argument("--n", type=int, default=None, help="training images (default by mode)")
    p.add_argument("--q", type=int, default=None, help="queries (default by mode)")
    p.add_argument("--k", type=int, default=None, help="draws per image and per query (default by mode)")
    p.add_argument("--kc", type=int, default=None, help="curvature draws per image (default K // 2)")
    p.add_argument("--dim", type=int, default=None, help="our EK-FAC feature budget D (default: the product's)")
    p.add_argument("--trak-dim", type=int, default=None,
                   help="TRAK projection dimension, traker and dattri (> 100 on CPU; default 512 quick, else 2048)")
    p.add_argument("--trak-block", type=int, default=100, help="traker BasicProjector block size")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, every method")
    p.add_argument("--batch-override", action="append", default=[], metavar="METHOD=B",
                   help="another batch size for one method (e.g. dattri-ekfac=8, which runs out of memory at 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run at once, each in its own process with --threads threads "
                        "(--jobs 2 on 2 cores halves the wall time; every method then shares the machine alike)")
    p.add_argument("--single-queries", type=int, default=5, help="queries timed one by one against the index")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated, any of " + ", ".join(METHODS) + " (default: " + ", ".join(DEFAULT_METHODS) + ")")
    p.add_argument("--model", default=None,
                   help="model folder, 'untrained' (the default's shape) or 'rgb32' (the larger 32×32 RGB "
                        "U-Net with attention, untrained, on tinted MNIST); default: assets/mnist-unet")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per method")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_peers.json"))
    p.add_argument("--workdir", default=None, help="keep intermediate files here (default: a temp dir)")
    p.add_argument("--resume", action="store_true",
                   help="with --workdir: reuse the methods that already finished there (others rerun)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, Path(a.workdir))

    import importlib.util

    import numpy as np

    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="vs_peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    setup = make_setup(a, workdir)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TQDM_DISABLE": "1"}
    results: dict = {}
    todo: list[str] = []
    for m in methods:
        pkg = PEER_PACKAGES.get(m)
        if pkg and importlib.util.find_spec(pkg) is None:
            results[m] = {"ok": False, "error": f"{pkg} is not installed (benchmarks/requirements-peers.txt)"}
            print(f"{m}: skipped ({pkg} not installed)", file=sys.stderr)
            continue
        done = workdir / f"{m}.json"
        if a.resume and done.exists() and json.loads(done.read_text()).get("ok"):
            results[m] = json.loads(done.read_text())
            print(f"{m}: reusing {done}", file=sys.stderr)
            continue
        todo.append(m)

    def run_one(m: str) -> None:
        print(f"{m}: running ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", m, "--workdir", str(workdir)],
                                  env=env, timeout=a.timeout, capture_output=True, text=True)
            rfile = workdir / f"{m}.json"
            if rfile.exists():
                results[m] = json.loads(rfile.read_text())
            else:
                results[m] = {"ok": False, "error": f"worker exited with {proc.returncode}",
                              "stderr_tail": proc.stderr[-3000:]}
            if proc.returncode == -9 and not results[m].get("ok"):
                results[m]["error"] += (" (SIGKILL: killed by the kernel, most likely out of memory; "
                                        "try a smaller --batch-size)")
        except subprocess.TimeoutExpired:
            results[m] = {"ok": False, "error": f"timed out after {a.timeout:.0f} s"}
        results[m]["wall_s_subprocess"] = round(time.perf_counter() - t0, 1)
        results[m]["concurrent_jobs"] = a.jobs
        r = results[m]
        print(f"{m}: {'ok' if r.get('ok') else 'FAILED: ' + r.get('error', '')[:300]} "
              f"({r['wall_s_subprocess']} s)", file=sys.stderr, flush=True)

    # longest first, so that parallel jobs end together (relative one-thread times at N = 1,000)
    todo.sort(key=lambda m: -RELATIVE_COST.get(m, 1.0))
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each worker is its own process
        list(pool.map(run_one, todo))
    setup["wall_s_all_methods_run_now"] = round(time.perf_counter() - t_all, 1)
    results = {m: results[m] for m in methods if m in results}

    scores = {m: np.load(workdir / f"{m}.npy") for m in results
              if results[m].get("ok") and (workdir / f"{m}.npy").exists()}
    for m, r in results.items():
        if m in scores:
            for ref in (REFERENCE, PEER_REFERENCE):
                if ref != m and ref in scores:
                    r[f"spearman_vs_{ref}"] = mean_spearman(scores[m], scores[ref])
    names = sorted(scores)
    spearman_matrix = {m: {o: (1.0 if o == m else mean_spearman(scores[m], scores[o])) for o in names}
                       for m in names}
    ours, kf = results.get("ours-ekfac", {}), results.get("kronfluence-ekfac", {})
    goals = {}
    if ours.get("ok") and kf.get("ok"):
        for key, name in (("total_s", "total"), ("single_query_s", "single_query")):
            goals[f"{name}_speedup_vs_kronfluence_wall"] = _ratio(kf, ours, key)
            goals[f"{name}_speedup_vs_kronfluence_cpu"] = _ratio(kf, ours, key.replace("_s", "_cpu_s"))
        goals["goal_total_5x"] = goals["total_speedup_vs_kronfluence_wall"] >= 5
        goals["goal_single_query_100x"] = goals["single_query_speedup_vs_kronfluence_wall"] >= 100
    unp = results.get(REFERENCE, {})
    if unp.get(f"spearman_vs_{PEER_REFERENCE}") is not None:
        goals["spearman_unprojected_vs_kronfluence"] = unp[f"spearman_vs_{PEER_REFERENCE}"]
        goals["goal_spearman_0.9"] = goals["spearman_unprojected_vs_kronfluence"] >= 0.9
    if goals.get("total_speedup_vs_kronfluence_wall") is not None and setup["n"] < 5000:
        goals["note"] = (f"the goals are stated for N = 5,000; measured at N = {setup['n']} "
                         "(the index's query cost is independent of N apart from the FAISS scan)")
    out = {"setup": setup, "results": results, "goals": goals, "spearman_matrix": spearman_matrix,
           "machine": {"python": platform.python_version(), "platform": platform.platform(),
                       "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for m in results:
        results[m].pop("traceback", None) if results[m].get("ok") else None
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(table(results, setup))
    if goals:
        print("\n" + json.dumps(goals, indent=2))
    print(f"\nwrote {a.out}", file=sys.stderr)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
