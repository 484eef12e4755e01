"""The index builder's command line: `attribution index build` and `python -m index.build`
(torchrun's entry point) parse the same arguments into an AttributionConfig and call
`index.build.build_index`."""

from __future__ import annotations

import argparse
from pathlib import Path

import index.build
from attribution.console import say
from attribution.errors import AttributionError
from attribution.influence import DEFAULT_DIM, METHODS, TRAK_DIM, AttributionConfig, dim_arg
from attribution.model import load_model, pick_device
from index.build import SHARD, build_index
from index.checks import NON_NEGATIVE, POSITIVE
from index.conditions import training_data
from index.faiss_build import faiss_arg
from index.rerank_stage import add_rerank_args, rerank_options


def config_from_args(a: argparse.Namespace) -> AttributionConfig:
    return AttributionConfig(
        method=a.method,
        draws=a.draws,
        curvature_draws=a.curvature_draws,
        curvature_images=a.curvature_images or None,
        query_draws=a.query_draws,
        dim=dim_arg(a.dim),
        seed=a.seed,
        batch_size=a.batch_size,
        projection=a.projection,
        damping=a.damping,
    )


def add_build_args(p: argparse.ArgumentParser) -> None:
    d = AttributionConfig()
    p.add_argument("--model", default=None, help="model folder (default: assets/mnist-unet)")
    p.add_argument("--data", default="mnist", help="'mnist' (embedded, 5,000 images) or an image folder")
    p.add_argument("--out", required=True, help="index folder to write (resumed if present)")
    p.add_argument(
        "--method",
        default=d.method,
        choices=list(METHODS),
        metavar="METHOD",
        help=f"one of {', '.join(METHODS)} (default {d.method})",
    )
    p.add_argument(
        "--dim",
        type=NON_NEGATIVE,
        default=None,
        help=f"feature budget D per image (0: unprojected; default: the method's, {DEFAULT_DIM}, "
        f"{TRAK_DIM} for TRAK-style methods)",
    )
    p.add_argument(
        "--projection",
        default=d.projection,
        choices=["sketch", "kronecker"],
        help="count sketch (default, faithful) or Kronecker (the K-FAC fast path)",
    )
    p.add_argument("--draws", type=POSITIVE, default=d.draws, help="(t, ε) draws per training image")
    p.add_argument("--curvature-draws", type=POSITIVE, default=d.curvature_draws)
    p.add_argument(
        "--curvature-images",
        type=NON_NEGATIVE,
        default=d.curvature_images,
        help="fit the curvature on a seeded subset of this many images (0: all)",
    )
    p.add_argument("--query-draws", type=POSITIVE, default=d.query_draws)
    p.add_argument(
        "--damping",
        type=float,
        default=None,
        help="relative damping λ / mean eigenvalue (default: the method's, 0.1 for K-FAC/EK-FAC)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=POSITIVE, default=d.batch_size)
    p.add_argument(
        "--faiss",
        type=faiss_arg,
        default="auto",
        metavar="TYPE",
        help="auto (default): exact float32 'flat' up to 512 MiB of vectors, else 'sq8' (1 byte "
        "a number); flat, sq8, ivf, hnsw; or a FAISS factory string such as IVF64,SQ8, "
        "IVF256,PQ16 or HNSW32 (trained on a sample of the features)",
    )
    p.add_argument("--n", type=POSITIVE, default=None, help="index only the first N images")
    p.add_argument("--shard-size", type=POSITIVE, default=SHARD, help="images per resumable shard")
    p.add_argument("--keep-shards", action="store_true", help="keep the raw feature shards after the build")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished index with other settings in --out (refused otherwise)",
    )
    p.add_argument(
        "--fit-curvature",
        action="store_true",
        help="fit the curvature even where one is shipped for these exact settings (assets/curvature/)",
    )
    p.add_argument("--device", default=None)
    add_rerank_args(p)


def run_build(a: argparse.Namespace) -> Path:
    device = pick_device(a.device)
    model = load_model(a.model, device=device)
    data = training_data(a.data, model, a.n)  # a conditional model's classes or prompts too
    return build_index(
        model,
        data,
        a.out,
        config_from_args(a),
        a.faiss,
        model_path=str(a.model or "default"),
        data_spec=a.data,
        device=device,
        shard_size=a.shard_size,
        keep_shards=a.keep_shards,
        overwrite=getattr(a, "overwrite", False),
        fit_curvature=getattr(a, "fit_curvature", False),
        rerank=rerank_options(a) if hasattr(a, "rerank") else None,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="index.build", description=index.build.__doc__)
    add_build_args(p)
    args = p.parse_args(argv)
    try:
        run_build(args)
    except AttributionError as e:
        say(f"error: {e}")
        return 2
    return 0
