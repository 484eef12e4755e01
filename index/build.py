"""Offline index builder: curvature, features in resumable shards, FAISS store, manifest.

    attribution index build --model MODEL_DIR --data DATA --out INDEX_DIR [--method …]
    torchrun --nproc-per-node 2 -m index.build --out INDEX_DIR …      (data-parallel)

A build writes `build.json` (its settings) first; finished pieces are renamed into place
atomically, so a killed build rerun with the same settings continues from its finished shards
and gives the same index. Different settings in the same folder start a new build. Under
torchrun each rank computes every world-size-th shard and its share of the curvature sums
(all-reduced); rank 0 assembles the index.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from attribution.atomic import replace_with, save_json, save_numpy, save_tensors, save_text
from attribution.curvature import Curvature
from attribution.data import ImageDataset, load_dataset, to_uint8
from attribution.errors import AttributionError
from attribution.influence import DEFAULT_DIM, TRAK_DIM, AttributionConfig, Attributor, dim_arg
from attribution.model import DiffusionModel, load_model, pick_device
from index.folder import apply_plan, plan_folder
from index.integrity import file_records
from index.layout import IndexLayout
from index.manifest import CODE_VERSION, FORMAT_VERSION, settings_key
from index.store import FAISS_TYPES, faiss_from_chunks, resolve_faiss_type, write_faiss

SHARD = 256  # images per shard (a multiple of every batch size used)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Dist:
    """torch.distributed when launched by torchrun (gloo on CPU, NCCL on GPUs), else one process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()



def build_settings(model: DiffusionModel, data: ImageDataset, cfg: AttributionConfig, model_path: str,
                   data_spec: str) -> dict:
    return {"model": {"path": str(model_path), "weights_sha256": model.weights_sha256(),
                      "config": dict(model.unet.config)},
            "data": {"source": data_spec, "n": len(data), "sha256": data.fingerprint(),
                     "channels": int(data.images.shape[1]), "size": int(data.images.shape[2])},
            "method": cfg.to_dict(), "format_version": FORMAT_VERSION}


def build_index(model: DiffusionModel, data: ImageDataset, out: str | Path, cfg: AttributionConfig,
                faiss_type: str = "auto", model_path: str = "", data_spec: str = "",
                device: torch.device | str | None = None, progress: bool = True,
                thumbs: bool = True, shard_size: int = SHARD, keep_shards: bool = False,
                overwrite: bool = False) -> Path:
    """Build (or resume) an index of `data` under `out`; returns the folder.

    A finished index with other settings in `out` is refused (ConfigError) unless `overwrite`;
    an unfinished build with other settings is moved to `out/.aside/<its key>/` (index/folder.py).

    The raw feature shards exist for resuming; once the store is written they are removed unless
    `keep_shards` (they are N·D float32, four times the size of an sq8 store)."""
    out = Path(out)
    lay = IndexLayout(out)
    device = pick_device(str(device) if device else None)
    dist = Dist(device)
    settings = build_settings(model, data, cfg, model_path, data_spec)
    settings["faiss"] = faiss_type
    settings["shard_size"] = shard_size
    key = settings_key(settings)
    plan = plan_folder(lay, key, settings, overwrite)  # every rank: a refusal stops them all
    dist.barrier()
    if dist.rank == 0:
        apply_plan(lay, plan, key, _say)
        if not lay.manifest.exists():
            save_json(lay.build, {"key": key, "settings": settings})
            lay.shards.mkdir(exist_ok=True)
    dist.barrier()
    if lay.manifest.exists():
        dist.close()
        return out
    t0 = time.time()
    model.to(device)
    att = Attributor(model, data, cfg, device=device, progress=progress and dist.rank == 0)
    n = len(data)
    shards = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
    mine = shards[dist.rank::dist.world]

    # 1. curvature (all ranks contribute their shards' sums), 2. projection
    curv_path, proj_path = lay.curvature, lay.projection
    needs_curv = att.spec.preconditioner in ("kfac", "kfac-exact", "ekfac")
    curvature = None
    if needs_curv and curv_path.exists():
        curvature = Curvature.load(curv_path)
        _say(f"reusing the fitted curvature in {curv_path}")
    elif needs_curv:
        from attribution.curvature import fit_curvature

        crows = att.curvature_rows()
        batches = [crows[i:i + cfg.batch_size] for i in range(0, len(crows), cfg.batch_size)]
        rows = [r for b in batches[dist.rank::dist.world] for r in b]
        _say(f"fitting {att.curvature_config().kind.upper()} curvature on {len(crows)} of {n} images "
             f"× {cfg.curvature_draws} draws ({dist.world} process(es))")
        curvature = fit_curvature(model, data.images[rows], rows, att.curvature_config(),
                                  batch_size=cfg.batch_size, progress=progress and dist.rank == 0,
                                  device=device, allreduce=dist.allreduce)
        curvature.meta["n_images"] = len(crows)
        if dist.rank == 0:
            replace_with(curv_path, curvature.save)
    t_curv = time.time() - t0
    att.fit(curvature=curvature)
    if dist.rank == 0 and att.projection is not None and not proj_path.exists():
        replace_with(proj_path, att.projection.save)

    # 3. training features, shard by shard (finished shards are skipped)
    todo = [(s, e) for s, e in mine if not lay.shard(s, e).exists()]
    if dist.rank == 0:
        _say(f"computing features for {n} images ({len(shards) - len(todo) * dist.world} of "
             f"{len(shards)} shards already done), D = {att.dim}, {cfg.draws} draws per image")
    t1 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(e - s for s, e in todo), desc="features", unit="img",
               disable=not (progress and dist.rank == 0))
    for s, e in todo:
        raw = att.raw_train_features(list(range(s, e)), progress=False)
        save_tensors(lay.shard(s, e), {"raw": raw})
        bar.update(e - s)
    bar.close()
    t_feat = time.time() - t1
    dist.barrier()
    if dist.rank == 0:
        def shard_raw(s: int, e: int) -> torch.Tensor:
            return load_file(str(lay.shard(s, e)))["raw"]

        if att.spec.preconditioner == "trak":  # TRAK's inverse needs every raw feature at once
            att.fit_trak(torch.cat([shard_raw(s, e) for s, e in shards]))
            save_tensors(lay.trak, {"trak_inverse": att.trak_inverse})
        faiss_kind = resolve_faiss_type(faiss_type, n, att.dim)
        _say(f"writing the {faiss_kind} FAISS store ({n} × {att.dim})")
        index = faiss_from_chunks(lambda: (att.finish_train_features(shard_raw(s, e)).numpy() for s, e in shards),
                                  att.dim, faiss_kind)
        write_faiss(index, lay.features)
        save_text(lay.items, "".join(
            json.dumps({"row": i, "label": int(data.labels[i]), "source": data.sources[i]}) + "\n" for i in range(n)))
        if thumbs:
            save_numpy(lay.thumbs, to_uint8(data.images).squeeze(-1) if data.images.shape[1] == 1
                       else to_uint8(data.images))
        manifest = {**settings, "code_version": CODE_VERSION, "key": key,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "projection": {"kind": att.projection.kind if att.projection else None,
                                   "total_dim": att.dim,
                                   "per_layer": att.projection.dims if att.projection else None,
                                   "dtype": "uint8 (sq8)" if faiss_kind == "sq8" else "float32"},
                    "files": file_records(lay),
                    "faiss": {"type": faiss_kind, "requested": faiss_type, "metric": "inner_product", "ntotal": int(index.ntotal)},
                    "build": {"seconds_curvature": round(t_curv, 2), "seconds_features": round(t_feat, 2),
                              "processes": dist.world,
                              "peak_rss_mb_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                              "images_per_second": round(sum(e - s for s, e in todo) / max(t_feat, 1e-9), 2)}}
        save_json(lay.manifest, manifest)
        if not keep_shards:
            shutil.rmtree(lay.shards, ignore_errors=True)
        _say(f"index written to {out} ({n} images, D = {att.dim}, {time.time() - t0:.0f} s)")
    dist.barrier()
    dist.close()
    return out


def config_from_args(a: argparse.Namespace) -> AttributionConfig:
    return AttributionConfig(method=a.method, draws=a.draws, curvature_draws=a.curvature_draws,
                             curvature_images=a.curvature_images or None,
                             query_draws=a.query_draws, dim=dim_arg(a.dim), seed=a.seed,
                             batch_size=a.batch_size, projection=a.projection)


def add_build_args(p: argparse.ArgumentParser) -> None:
    d = AttributionConfig()
    p.add_argument("--model", default=None, help="model folder (default: assets/mnist-unet)")
    p.add_argument("--data", default="mnist", help="'mnist' (embedded, 5,000 images) or an image folder")
    p.add_argument("--out", required=True, help="index folder to write (resumed if present)")
    p.add_argument("--method", default=d.method)
    p.add_argument("--dim", type=int, default=None,
                   help=f"feature budget D per image (0: unprojected; default: the method's, {DEFAULT_DIM}, "
                        f"{TRAK_DIM} for TRAK-style methods)")
    p.add_argument("--projection", default=d.projection, choices=["sketch", "kronecker"],
                   help="count sketch (default, faithful) or Kronecker (the K-FAC fast path)")
    p.add_argument("--draws", type=int, default=d.draws, help="(t, ε) draws per training image")
    p.add_argument("--curvature-draws", type=int, default=d.curvature_draws)
    p.add_argument("--curvature-images", type=int, default=d.curvature_images,
                   help="fit the curvature on a seeded subset of this many images (0: all)")
    p.add_argument("--query-draws", type=int, default=d.query_draws)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--faiss", choices=FAISS_TYPES, default="auto",
                   help="auto: exact float32 'flat' up to 512 MiB of vectors, else 'sq8' (1 byte a number)")
    p.add_argument("--n", type=int, default=None, help="index only the first N images")
    p.add_argument("--shard-size", type=int, default=SHARD, help="images per resumable shard")
    p.add_argument("--keep-shards", action="store_true", help="keep the raw feature shards after the build")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished index with other settings in --out (refused otherwise)")
    p.add_argument("--device", default=None)


def run_build(a: argparse.Namespace) -> Path:
    device = pick_device(a.device)
    model = load_model(a.model, device=device)
    data = load_dataset(a.data, channels=model.channels, size=model.size, n=a.n)
    return build_index(model, data, a.out, config_from_args(a), a.faiss,
                       model_path=str(a.model or "default"), data_spec=a.data, device=device,
                       shard_size=a.shard_size, keep_shards=a.keep_shards,
                       overwrite=getattr(a, "overwrite", False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="index.build", description=__doc__)
    add_build_args(p)
    args = p.parse_args(argv)
    try:
        run_build(args)
    except AttributionError as e:
        _say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
