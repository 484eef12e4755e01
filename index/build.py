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
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import torch
from safetensors.torch import load_file

from attribution.atomic import replace_with, save_json, save_numpy, save_tensors, save_text
from attribution.curvature import Curvature
from attribution.data import ImageDataset, load_dataset, to_uint8
from attribution.errors import AttributionError
from attribution.influence import DEFAULT_DIM, TRAK_DIM, AttributionConfig, Attributor, dim_arg
from attribution.model import DiffusionModel, load_model, pick_device
from index.dist import Dist
from index.folder import apply_plan, plan_folder
from index.integrity import file_records
from index.layout import IndexLayout
from index.manifest import CODE_VERSION, FORMAT_VERSION, settings_key
from index.store import FAISS_TYPES, faiss_from_chunks, resolve_faiss_type, write_faiss

SHARD = 256  # images per shard (a multiple of every batch size used)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_settings(model: DiffusionModel, data: ImageDataset, cfg: AttributionConfig, model_path: str,
                   data_spec: str) -> dict:
    return {"model": {"path": str(model_path), "weights_sha256": model.weights_sha256(),
                      "config": dict(model.unet.config)},
            "data": {"source": data_spec, "n": len(data), "sha256": data.fingerprint(),
                     "channels": int(data.images.shape[1]), "size": int(data.images.shape[2])},
            "method": cfg.to_dict(), "format_version": FORMAT_VERSION}


@dataclass
class Build:
    """One run of a build: what it reads, where it writes, and what it has made so far."""

    model: DiffusionModel
    data: ImageDataset
    cfg: AttributionConfig
    lay: IndexLayout
    dist: Dist
    device: torch.device
    settings: dict
    key: str
    faiss_type: str = "auto"
    shard_size: int = SHARD
    progress: bool = True
    thumbs: bool = True
    att: Attributor | None = None
    t0: float = field(default_factory=time.time)
    times: dict = field(default_factory=dict)  # seconds per stage of this run
    rows_computed: int = 0  # feature rows this run computed (all processes)

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def shards(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.shard_size)) for s in range(0, self.n, self.shard_size)]

    @property
    def chatty(self) -> bool:
        return self.progress and self.dist.main


def prepare_folder(b: Build, overwrite: bool) -> bool:
    """Stage 0: check the output folder, write build.json; False if the index is already built."""
    plan = plan_folder(b.lay, b.key, b.settings, overwrite)  # every rank: a refusal stops them all
    b.dist.barrier()
    if b.dist.main:
        apply_plan(b.lay, plan, b.key, _say)
        if not b.lay.manifest.exists():
            save_json(b.lay.build, {"key": b.key, "settings": b.settings})
            b.lay.shards.mkdir(exist_ok=True)
    b.dist.barrier()
    return not b.lay.manifest.exists()


def fit_curvature_stage(b: Build) -> Curvature | None:
    """Stage 1: the curvature (each process sums over its share of the batches; all-reduced),
    reused from curvature.safetensors when a previous run wrote it."""
    att, cfg, t = b.att, b.cfg, time.time()
    if not att.spec.needs_curvature:
        return None
    if b.lay.curvature.exists():
        _say(f"reusing the fitted curvature in {b.lay.curvature}")
        return Curvature.load(b.lay.curvature)
    from attribution.curvature import fit_curvature

    crows = att.curvature_rows()
    batches = [crows[i:i + cfg.batch_size] for i in range(0, len(crows), cfg.batch_size)]
    rows = [r for batch in batches[b.dist.rank::b.dist.world] for r in batch]
    _say(f"fitting {att.curvature_config().kind.upper()} curvature on {len(crows)} of {b.n} images "
         f"× {cfg.curvature_draws} draws ({b.dist.world} process(es))")
    curvature = fit_curvature(b.model, b.data.images[rows], rows, att.curvature_config(),
                              batch_size=cfg.batch_size, progress=b.chatty, device=b.device,
                              allreduce=b.dist.allreduce)
    curvature.meta["n_images"] = len(crows)
    if b.dist.main:
        replace_with(b.lay.curvature, curvature.save)
    b.times["curvature"] = time.time() - t
    return curvature


def projection_stage(b: Build, curvature: Curvature | None) -> None:
    """Stage 2: the feature maps' projection (seeded), written to projection.safetensors, and
    with `importance` the timestep density, written to density.safetensors."""
    density = load_file(str(b.lay.density))["density"] if b.lay.density.exists() else None
    b.att.fit(curvature=curvature, density=density)
    if b.dist.main and b.att.projection is not None and not b.lay.projection.exists():
        replace_with(b.lay.projection, b.att.projection.save)
    if b.dist.main and b.att.density is not None and density is None:
        save_tensors(b.lay.density, {"density": b.att.density})


def feature_shards_stage(b: Build) -> None:
    """Stage 3: raw training features, shard by shard; finished shards are skipped. Under torchrun
    each process takes every world-th shard."""
    from tqdm.auto import tqdm

    mine = b.shards[b.dist.rank::b.dist.world]
    todo = [(s, e) for s, e in mine if not b.lay.shard(s, e).exists()]
    if b.dist.main:
        _say(f"computing features for {b.n} images ({len(b.shards) - len(todo) * b.dist.world} of "
             f"{len(b.shards)} shards already done), D = {b.att.dim}, {b.cfg.draws} draws per image")
    t = time.time()
    bar = tqdm(total=sum(e - s for s, e in todo), desc="features", unit="img", disable=not b.chatty)
    for s, e in todo:
        raw = b.att.raw_train_features(list(range(s, e)), progress=False)
        save_tensors(b.lay.shard(s, e), {"raw": raw})
        bar.update(e - s)
    bar.close()
    b.times["features"] = time.time() - t
    b.rows_computed = sum(e - s for s, e in todo)
    b.dist.barrier()


def _shard_raw(b: Build, s: int, e: int) -> torch.Tensor:
    return load_file(str(b.lay.shard(s, e)))["raw"]


def store_stage(b: Build) -> faiss.Index:
    """Stage 4 (rank 0): TRAK's inverse if the method needs it, then the FAISS store, streamed
    from the shards one at a time (TRAK's (ΦᵀΦ/N + λ)⁻¹ needs all of Φ at once)."""
    att = b.att
    if att.spec.preconditioner == "trak":
        att.fit_trak(torch.cat([_shard_raw(b, s, e) for s, e in b.shards]))
        save_tensors(b.lay.trak, {"trak_inverse": att.trak_inverse})
    kind = resolve_faiss_type(b.faiss_type, b.n, att.dim)
    _say(f"writing the {kind} FAISS store ({b.n} × {att.dim})")
    index = faiss_from_chunks(lambda: (att.finish_train_features(_shard_raw(b, s, e)).numpy()
                                       for s, e in b.shards), att.dim, kind)
    write_faiss(index, b.lay.features)
    return index


def items_stage(b: Build) -> None:
    """Stage 5 (rank 0): items.jsonl (row -> label, source) and thumbs.npy (uint8 thumbnails)."""
    data = b.data
    save_text(b.lay.items, "".join(
        json.dumps({"row": i, "label": int(data.labels[i]), "source": data.sources[i]}) + "\n"
        for i in range(b.n)))
    if b.thumbs:
        images = to_uint8(data.images)
        save_numpy(b.lay.thumbs, images.squeeze(-1) if data.images.shape[1] == 1 else images)


def manifest_stage(b: Build, index: faiss.Index) -> dict:
    """Stage 6 (rank 0): manifest.json, written last; its presence marks a finished index."""
    att, kind = b.att, resolve_faiss_type(b.faiss_type, b.n, b.att.dim)
    proj = att.projection
    t_feat = b.times.get("features", 0.0)
    manifest = {**b.settings, "code_version": CODE_VERSION, "key": b.key,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "projection": {"kind": proj.kind if proj else None, "total_dim": att.dim,
                               "per_layer": proj.dims if proj else None,
                               "dtype": "uint8 (sq8)" if kind == "sq8" else "float32"},
                "files": file_records(b.lay),
                "faiss": {"type": kind, "requested": b.faiss_type, "metric": "inner_product",
                          "ntotal": int(index.ntotal)},
                "build": {"seconds_curvature": round(b.times.get("curvature", 0.0), 2),
                          "seconds_features": round(t_feat, 2), "processes": b.dist.world,
                          "peak_rss_mb_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "images_per_second": round(b.rows_computed / max(t_feat, 1e-9), 2)}}
    save_json(b.lay.manifest, manifest)
    return manifest


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
    device = pick_device(str(device) if device else None)
    settings = {**build_settings(model, data, cfg, model_path, data_spec), "faiss": faiss_type,
                "shard_size": shard_size}
    b = Build(model, data, cfg, IndexLayout(out), Dist(device), device, settings, settings_key(settings),
              faiss_type, shard_size, progress, thumbs)
    try:
        if not prepare_folder(b, overwrite):
            return b.lay.root
        model.to(device)
        b.att = Attributor(model, data, cfg, device=device, progress=b.chatty)
        projection_stage(b, fit_curvature_stage(b))
        feature_shards_stage(b)
        if b.dist.main:
            index = store_stage(b)
            items_stage(b)
            manifest_stage(b, index)
            if not keep_shards:
                shutil.rmtree(b.lay.shards, ignore_errors=True)
            _say(f"index written to {b.lay.root} ({b.n} images, D = {b.att.dim}, {time.time() - b.t0:.0f} s)")
        b.dist.barrier()
    finally:
        b.dist.close()
    return b.lay.root


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
