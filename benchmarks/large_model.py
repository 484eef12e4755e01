"""A large-model row (issue 19): the CIFAR-10 DDPM U-Net (35.7M parameters, 32×32 RGB), randomly
initialised, at N = 200 images (smooth random 32×32 RGB images generated here, seeded; or MNIST
digits upscaled to 32×32 and repeated over RGB with --data mnist).

    python benchmarks/large_model.py [--n 200] [--draws 16] [--curvature-draws 1]
        [--curvature-images 32] [--feature-images 4] [--batch 4]

Measures, in one run: the EK-FAC curvature fit time (on a seeded subset of `--curvature-images`
of the N images, 0 = all, at `--curvature-draws` per image); per image, the default features
(count sketch D = 16384, (G+λ)^(−½) on both sides) against a plain forward+backward of the
denoiser over the same rows (the same K draws per image, the same batches, alternated batch by
batch) on the first `--feature-images` images (0 = all); where the feature time goes (forward,
backward, per-example gradients, rotation into the eigenbasis, sketch); peak resident memory;
the sizes of the index's parts at N (the FAISS stores written for N rows: their size does not
depend on the values). Subsets to fit a CPU budget (stated in the result). Resumable per stage
(runs/large/). Writes benchmarks/results/large_model.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution import features as feat  # noqa: E402
from attribution.capture import grad_enabled_params  # noqa: E402
from attribution.curvature import Curvature, CurvatureConfig, fit_curvature  # noqa: E402
from attribution.data import mnist  # noqa: E402
from attribution.measurements import Measurement  # noqa: E402
from attribution.model import build_model  # noqa: E402
from attribution.projection import make_sketch  # noqa: E402

DIM = 16384


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timers:
    """Wall time spent inside named functions of attribution.features (wrapped in place)."""

    def __init__(self, names: list[str]):
        self.t = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(feat, name, self._wrap(name, getattr(feat, name)))

    def _wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.t[name] += time.perf_counter() - t0
            return out

        return timed


def plain_step(model, rows) -> None:
    """A plain forward+backward of the denoiser's loss over the rows (parameter gradients)."""
    model.unet.zero_grad(set_to_none=True)
    with grad_enabled_params(model.unet):
        out = model.unet(rows.x, rows.t).sample
        (rows.w * (out - rows.y).pow(2).flatten(1).mean(1)).mean().backward()
    model.unet.zero_grad(set_to_none=True)


def features_vs_plain(model, fmap, images, draws: int, batch: int, timers: Timers) -> dict:
    meas, acp = Measurement("loss"), model.alphas_cumprod()
    plain = feats = 0.0
    for i in range(0, len(images), batch):
        x0, keys = images[i : i + batch], list(range(i, min(i + batch, len(images))))
        t0 = time.perf_counter()
        plain_step(model, meas.rows(x0, keys, draws, 0, acp, antithetic=True))
        t1 = time.perf_counter()
        feat.gradient_features(model, fmap, x0, keys, meas, draws, 0, batch, antithetic=True, progress=False)
        t2 = time.perf_counter()
        plain, feats = plain + t1 - t0, feats + t2 - t1
        print(f"  {i + len(keys)}/{len(images)}: plain {plain:.0f} s, features {feats:.0f} s", flush=True)
    n = len(images)
    inner = {k: v for k, v in timers.t.items()}
    return {
        "plain_forward_backward_s_per_image": plain / n,
        "features_s_per_image": feats / n,
        "features_over_plain": feats / plain,
        "bar_features_at_least_half_of_plain_speed": feats / plain <= 2.0,
        "feature_time_split_s_per_image": {
            "forward_and_backward_rest": (feats - sum(inner.values())) / n,
            **{k: v / n for k, v in inner.items()},
        },
    }


def flops(model, shapes) -> dict:
    """Counted (torch's FlopCounterMode) forward and forward+backward flops of one row, and the
    flops of rotating one example's gradient into the Kronecker eigenbasis, Σ 2·O·I'(O + I')."""
    from torch.utils.flop_counter import FlopCounterMode

    c = model.unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size)
    with FlopCounterMode(display=False) as f:
        model.unet(x, torch.tensor([10])).sample.pow(2).mean().backward()
    model.unet.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as g, torch.no_grad():
        model.unet(x, torch.tensor([10]))
    return {
        "forward_per_row": g.get_total_flops(),
        "forward_backward_per_row": f.get_total_flops(),
        "eigenbasis_rotation_per_example": sum(2 * o * i * (o + i) for o, i in shapes.values()),
    }


def standin_curvature(shapes) -> Curvature:
    """An EK-FAC curvature with identity eigenbases and unit eigenvalues: the feature path does
    the same dense rotations (GEMMs do not skip an identity matrix) without the fit."""
    t = {}
    for n, (o, i) in shapes.items():
        t.update({f"{n}.QA": torch.eye(i), f"{n}.eA": torch.ones(i), f"{n}.QS": torch.eye(o)})
        t.update({f"{n}.eS": torch.ones(o), f"{n}.lam": torch.ones(o, i)})
    return Curvature(CurvatureConfig(kind="ekfac"), t)


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) smooth random RGB images in [-1, 1]: seeded 8×8 colour noise upsampled
    bilinearly, plus a little 32×32 noise (CIFAR-like in range and smoothness, generated here)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    up = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return (up + 0.1 * torch.randn(n, 3, 32, 32, generator=g)).clamp(-1, 1)


def curvature_subset(n: int, m: int, seed: int = 0) -> list[int]:
    """A seeded subset of m of the n images (all when m is 0 or ≥ n), sorted."""
    if m <= 0 or m >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].tolist())


def fit_or_load(model, images, a, curv_path: Path, res: dict) -> Curvature:
    if curv_path.exists():
        res.update(json.loads((a.work / "curvature.json").read_text()))
        return Curvature.load(curv_path)
    keys = curvature_subset(len(images), a.curvature_images)
    t0 = time.perf_counter()
    cfg = CurvatureConfig(kind="ekfac", draws=a.curvature_draws)
    curv = fit_curvature(model, images[keys], keys, config=cfg, batch_size=a.batch, progress=True)
    fit = {
        "curvature_fit_s": time.perf_counter() - t0,
        "curvature_images": len(keys),
        "curvature_rows": len(keys) * a.curvature_draws,
        "peak_rss_mib_after_curvature": peak_mib(),
    }
    curv.save(curv_path, factors=False)
    (a.work / "curvature.json").write_text(json.dumps(fit))
    res.update(fit)
    return curv


def store_files(n: int, work: Path) -> dict:
    """Bytes of the index's stores at N = n, D = DIM, written as the build writes them (sq8
    features, sq4 half-differences) from seeded random rows: a FAISS file's size depends on n
    and D, not on the values."""
    from index.faiss_build import faiss_from_chunks, write_faiss

    rows = torch.randn(n, DIM, generator=torch.Generator().manual_seed(0)).numpy()
    out = {"features_flat_float32": n * DIM * 4}
    for name, kind in (("features_sq8", "sq8"), ("spread_sq4", "sq4")):
        write_faiss(faiss_from_chunks(lambda: iter([rows]), DIM, kind, n=n), work / f"{name}.faiss")
        out[name] = (work / f"{name}.faiss").stat().st_size
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--draws", type=int, default=16, help="draws per image for features (default build: 16)")
    p.add_argument("--curvature-draws", type=int, default=1)
    p.add_argument("--curvature-images", type=int, default=0, help="fit on a seeded subset (0: all N)")
    p.add_argument("--feature-images", type=int, default=0, help="time features on the first F (0: all N)")
    p.add_argument("--data", default="random", choices=["random", "mnist"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "large")
    p.add_argument(
        "--preconditioner",
        default="ekfac",
        choices=["ekfac", "identity", "ekfac-standin"],
        help="identity: no curvature; ekfac-standin: the EK-FAC feature path with a stand-in eigenbasis "
        "(identity matrices: the same dense GEMMs, no fit; the fit's eigendecompositions, ≈ 11 TFLOP "
        "here, do not fit a shared CPU)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    model = build_model("cifar-ddpm", seed=0)
    model.unet.eval()
    if a.data == "mnist":
        images = mnist(size=32, n=a.n).images.repeat(1, 3, 1, 1)
    else:
        images = random_images(a.n)
    nf = a.feature_images if 0 < a.feature_images < a.n else a.n
    shapes = feat.model_layer_shapes(model.unet)
    res = {
        "model": "cifar-ddpm (diffusers UNet2DModel, Ho et al. CIFAR-10 configuration), random init seed 0",
        "parameters": sum(p.numel() for p in model.unet.parameters()),
        "tracked_layer_parameters": sum(o * i for o, i in shapes.values()),
        "data": f"{a.n} MNIST digits upscaled to 32x32, repeated over RGB"
        if a.data == "mnist"
        else f"{a.n} smooth random 32x32 RGB images (seeded 8x8 colour noise upsampled + 0.1 noise)",
        "n": a.n,
        "feature_images": nf,
        "method": f"{a.preconditioner}, count sketch D = 16384"
        + (
            ", split preconditioner (the default)"
            if a.preconditioner == "ekfac"
            else " of the plain gradients"
        ),
        "flops": flops(model, shapes),
        "draws": a.draws,
        "curvature_draws": a.curvature_draws,
        "batch": a.batch,
        "threads": 1,
        "device": "cpu (shared 2-core machine); no GPU measured",
    }
    curv_path = a.work / "curvature.safetensors"
    if a.preconditioner == "ekfac":
        curv = fit_or_load(model, images, a, curv_path, res)
    else:
        curv = None if a.preconditioner == "identity" else standin_curvature(shapes)
    proj = make_sketch(shapes, DIM, seed=0)
    proj.save(a.work / "projection.safetensors")
    pre = "ekfac" if a.preconditioner == "ekfac-standin" else a.preconditioner
    fmap = feat.FeatureMap(shapes, proj, pre, curv, power=0.5)
    timers = Timers(["forward", "example_gradients", "rotate", "sketch_add"])
    res.update(features_vs_plain(model, fmap, images[:nf], a.draws, a.batch, timers))
    res["peak_rss_mib"] = peak_mib()
    res["store_bytes"] = {
        **store_files(a.n, a.work),
        "projection_file": (a.work / "projection.safetensors").stat().st_size,
        "curvature_file": curv_path.stat().st_size if curv_path.exists() else None,
    }
    out = ROOT / "benchmarks" / "results" / "large_model.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    rows = rows if "rows" in rows else {"rows": {}}
    rows["rows"][f"{a.preconditioner}-K{a.draws}-N{a.n}" + (f"-F{nf}" if nf < a.n else "")] = res
    out.write_text(json.dumps(rows, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
