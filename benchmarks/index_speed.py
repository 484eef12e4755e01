"""Index efficiency and query latency (issue 4), measured side by side in one run.

    python benchmarks/index_speed.py [--model DIR] [--index DIR] [--big]

1. Feature-building throughput, in (image × draw)/s, of the K-FAC fast path (Kronecker
   projection), of K-FAC and EK-FAC with the count sketch (the default), each divided by plain
   batched forward+backward (with parameter gradients) of the same model on the same rows; all
   are interleaved round by round.
2. Build time of the default index and bytes per training image on disk (from its manifest).
3. Query latency with the default index: image -> top-16, median and p95 over 30 queries (the
   first 30 training images; how often each is its own top proponent is reported too).
4. FAISS search alone: the 5,000-vector flat index, and 1,000,000 synthetic vectors (IVF-PQ) with --big.

Writes benchmarks/results/index_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.data import mnist  # noqa: E402
from attribution.features import gradient_features  # noqa: E402
from attribution.influence import AttributionConfig, Attributor  # noqa: E402
from attribution.measurements import Measurement  # noqa: E402
from attribution.model import load_model  # noqa: E402


def plain_step(model, x0, keys, k, seed):
    """Plain batched forward + backward of the diffusion loss (parameter gradients), same rows."""
    rows = Measurement("loss").rows(x0, keys, k, seed, model.alphas_cumprod())
    unet = model.unet
    for p in unet.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss = (unet(rows.x, rows.t).sample - rows.y).pow(2).mean()
    loss.backward()
    for p in unet.parameters():
        p.requires_grad_(False)


def throughput(model, images, draws: int, batch: int, rounds: int) -> dict:
    def feature_map(method: str, projection: str, dim: int | str = "default"):
        att = Attributor(
            model,
            _Data(images),
            AttributionConfig(
                method=method, curvature_draws=2, batch_size=batch, projection=projection, dim=dim
            ),
            progress=False,
        )
        t0 = time.perf_counter()
        att.fit()
        return att.feature_map("train"), time.perf_counter() - t0

    maps = {
        "kfac-kronecker": feature_map("kfac", "kronecker", 8192),  # the fast path at its own size
        "kfac-sketch": feature_map("kfac", "sketch"),
        "ekfac-sketch": feature_map("ekfac", "sketch"),
        "ekfac-sketch-8192": feature_map("ekfac", "sketch", 8192),
    }
    x0 = images[:batch]
    keys = list(range(batch))
    meas = Measurement("loss")
    runs = {"plain": lambda: plain_step(model, x0, keys, draws, 0)}
    for name, (fm, _) in maps.items():
        runs[name] = lambda fm=fm: gradient_features(
            model, fm, x0, keys, meas, draws, 0, batch, progress=False
        )
    times = {n: [] for n in runs}
    for f in runs.values():  # warm-up
        f()
    for _ in range(rounds):
        for name, f in runs.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    rate = {n: batch * draws / statistics.median(v) for n, v in times.items()}
    return {
        "rows_per_s": rate,
        "ratio_to_plain": {n: rate[n] / rate["plain"] for n in maps},
        "batch_images": batch,
        "draws": draws,
        "feature_dim": {n: fm.dim for n, (fm, _) in maps.items()},
        "seconds_fit_on": {"images": len(images), **{n: t for n, (_, t) in maps.items()}},
    }


class _Data:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]


def query_latency(model, index_dir: Path, n: int = 30) -> dict:
    from index.store import load

    t0 = time.perf_counter()
    idx = load(index_dir, model)
    t_load = time.perf_counter() - t0
    qs = mnist(n=n).images  # the index's first n training images
    idx.query(qs[0])
    lat, search, self_top1 = [], [], 0
    for i, q in enumerate(qs):
        t = time.perf_counter()
        res = idx.query(q, k=16)
        lat.append(time.perf_counter() - t)
        search.append(res.timings["search"])
        self_top1 += res.proponents[0].row == i
    m = idx.manifest
    disk = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file() and "shards" not in p.parts)
    shards = sum(p.stat().st_size for p in (index_dir / "shards").glob("*"))
    return {
        "load_s": t_load,
        "median_s": statistics.median(lat),
        "p95_s": float(np.percentile(lat, 95)),
        "search_median_s": statistics.median(search),
        "self_top1": self_top1 / n,
        "n": len(idx),
        "dim": m["projection"]["total_dim"],
        "query_draws": m["method"]["query_draws"],
        "build": m["build"],
        "bytes_per_image": disk / len(idx),
        "bytes_per_image_with_shards": (disk + shards) / len(idx),
    }


def faiss_search(d: int, n: int, big: bool) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    out = {}
    x = rng.standard_normal((n, d), dtype=np.float32)
    q = rng.standard_normal((16, d), dtype=np.float32)
    idx = faiss.IndexFlatIP(d)
    idx.add(x)
    out[f"flat_{n}"] = _time_search(idx, q)
    del idx
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(x)
    sq.add(x)
    out[f"sq8_{n}"] = _time_search(sq, q)
    out[f"sq8_{n}_all_scores"] = _time_search(sq, q, k=n)  # what the app does: every score, one pass
    del sq, x
    if big:
        d = min(d, 8192)  # IVF-PQ at 1M vectors: the 8192-number features of a smaller D
        nbig, nlist, m = 1_000_000, 256, 64
        quant = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFPQ(quant, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        ivf.train(rng.standard_normal((20_000, d), dtype=np.float32))
        for _ in range(nbig // 50_000):
            ivf.add(rng.standard_normal((50_000, d), dtype=np.float32))
        ivf.nprobe = 16
        out["ivfpq_1000000"] = {
            **_time_search(ivf, q),
            "build_s": time.perf_counter() - t,
            "bytes_per_vector": m,
            "nlist": nlist,
            "nprobe": 16,
            "dim": d,
        }
    return out


def _time_search(index, q, k: int = 16) -> dict:
    index.search(q[:1], k)
    ts = []
    for i in range(len(q)):
        t = time.perf_counter()
        index.search(q[i : i + 1], k)
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--index", default=str(ROOT / "indexes" / "mnist-ekfac"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--big", action="store_true", help="also 1,000,000 synthetic vectors (IVF-PQ)")
    p.add_argument(
        "--faiss-only", action="store_true", help="only the FAISS search rows (merged into the results)"
    )
    a = p.parse_args()
    out = ROOT / "benchmarks" / "results" / "index_speed.json"
    if a.faiss_only:
        res = json.loads(out.read_text())
        res["faiss"] = faiss_search(res["throughput"]["feature_dim"]["ekfac-sketch"], 5000, a.big)
        out.write_text(json.dumps(res, indent=2))
        print(json.dumps(res["faiss"], indent=2))
        return
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model = load_model(a.model)
    images = mnist(n=256).images
    res = {
        "threads": torch.get_num_threads(),
        "model_parameters": sum(p.numel() for p in model.unet.parameters()),
    }
    res["throughput"] = throughput(model, images, draws=8, batch=32, rounds=a.rounds)
    if Path(a.index, "manifest.json").exists():
        res["query"] = query_latency(model, Path(a.index))
    res["faiss"] = faiss_search(res["throughput"]["feature_dim"]["ekfac-sketch"], 5000, a.big)
    out.write_text(json.dumps(res, indent=2))
    t = res["throughput"]
    print("| measure | value |\n|---|---|")
    print(f"| plain fwd+bwd, (image×draw)/s | {t['rows_per_s']['plain']:.0f} |")
    for n, label in (
        ("kfac-kronecker", "K-FAC, Kronecker fast path"),
        ("kfac-sketch", "K-FAC, sketch"),
        ("ekfac-sketch", "EK-FAC, sketch (default)"),
        ("ekfac-sketch-8192", "EK-FAC, sketch D=8192"),
    ):
        print(
            f"| {label} features, (image×draw)/s | {t['rows_per_s'][n]:.0f} (ratio {t['ratio_to_plain'][n]:.2f}) |"
        )
    if "query" in res:
        q = res["query"]
        print(
            f"| query image -> top-16, median / p95 | {q['median_s'] * 1e3:.0f} / {q['p95_s'] * 1e3:.0f} ms |"
        )
        print(f"| training image is its own top proponent | {q['self_top1']:.0%} of 30 |")
        print(
            f"| bytes per training image (index / with shards) | {q['bytes_per_image']:.0f} / "
            f"{q['bytes_per_image_with_shards']:.0f} |"
        )
        print(
            f"| default index build: curvature / features | {q['build']['seconds_curvature']:.0f} s / "
            f"{q['build']['seconds_features']:.0f} s |"
        )
    for k, v in res["faiss"].items():
        print(f"| FAISS search {k}, median | {v['median_s'] * 1e3:.2f} ms |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
