"""Offline index builder: curvature, features in resumable shards, FAISS store, manifest.

    attribution index build --model MODEL_DIR --data DATA --out INDEX_DIR [--method …]
    torchrun --nproc-per-node 2 -m index.build --out INDEX_DIR …      (data-parallel)

Stages (each a function below): prepare the folder (index/folder.py) and record the run in
build.json, curvature, projection (and timestep density), feature shards, FAISS store, items and
thumbnails, manifest (last: its presence marks a finished index). Every finished piece is renamed
into place atomically, and every run reads the curvature and projection back from their files, so
a build killed at any point and rerun with the same settings gives the same bytes as one never
interrupted (tests/test_index_resume.py kills it at each stage through INDEX_BUILD_KILL_AT,
index/runlog.py). Under torchrun each rank computes every world-size-th shard and its share of the
curvature sums (all-reduced); rank 0 assembles the index.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import torch
from safetensors.torch import load_file, save_file

from attribution.atomic import replace_with, save_numpy, save_tensors, save_text
from attribution.console import say
from attribution.curvature import Curvature, fit_curvature
from attribution.data import ImageDataset, to_uint8
from attribution.features import model_layer_shapes
from attribution.influence import AttributionConfig, Attributor
from attribution.model import DiffusionModel, pick_device
from attribution.projection import Projection, make_projection
from attribution.uncertainty import split as split_halves
from index.checks import check_build, check_model_family, user_error
from index.conditions import family_settings, item_conditions, training_set
from index.dist import Dist
from index.faiss_build import faiss_from_chunks, resolve_faiss_type
from index.folder import apply_plan, plan_folder, remove_temporaries
from index.integrity import canonical_safetensors, file_records
from index.layout import IndexLayout
from index.manifest import CODE_VERSION, FORMAT_VERSION, settings_key
from index.prefit import KEY, curvature_identity, curvature_key, find
from index.rerank_stage import RerankOptions, add_rerank, rerank_build_stage
from index.runlog import RunLog, checkpoint

SHARD = 256  # images per shard (a multiple of every batch size used)
STORE_DTYPES = {"flat": "float32", "ivf": "float32", "hnsw": "float32", "sq8": "uint8 (sq8)"}
SPREAD_STORE = "sq4"  # the half-differences behind the stability figures: 4 bits a number


def build_settings(
    model: DiffusionModel, data: ImageDataset, cfg: AttributionConfig, model_path: str, data_spec: str
) -> dict:
    settings = {
        "model": {
            "path": str(model_path),
            "weights_sha256": model.weights_sha256(),
            "config": dict(model.unet.config),
        },
        "data": {
            "source": data_spec,
            "n": len(data),
            "sha256": data.fingerprint(),
            "channels": int(data.images.shape[1]),
            "size": int(data.images.shape[2]),
        },
        "method": cfg.to_dict(),
        "format_version": FORMAT_VERSION,
    }
    return family_settings(settings, model, data)  # latent / conditional: family, conditions


@dataclass
class Build:
    """One run of a build: what it reads, where it writes, and its statistics."""

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
    log: RunLog | None = None
    fit_curvature: bool = False  # True: never copy a shipped curvature (index/prefit.py)
    prefit_dir: Path | None = None  # shipped curvatures (None: assets/curvature)
    t0: float = field(default_factory=time.time)

    @property
    def n(self) -> int:
        return len(self.data)

    @property
    def shards(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.shard_size)) for s in range(0, self.n, self.shard_size)]

    @property
    def chatty(self) -> bool:
        return self.progress and self.dist.main

    def written_by_main(self, path: Path, write) -> None:
        """`write(tmp)` on rank 0 unless `path` exists (atomic rename), then every rank waits."""
        if self.dist.main and not path.exists():
            replace_with(path, write)
        self.dist.barrier()


def prepare_folder(b: Build, overwrite: bool) -> bool:
    """Stage 0: check the output folder, start this run's record in build.json; False if the
    index is already built."""
    plan = plan_folder(b.lay, b.key, b.settings, overwrite)  # every rank: a refusal stops them all
    b.dist.barrier()
    if b.dist.main:
        apply_plan(b.lay, plan, b.key, say)
        if not b.lay.manifest.exists():
            remove_temporaries(b.lay)
            b.lay.shards.mkdir(exist_ok=True)
    b.dist.barrier()
    if b.lay.manifest.exists():
        return False
    b.log = RunLog(b.lay, b.key, b.settings, b.dist.world, write=b.dist.main)
    return True


def curvature_stage(b: Build) -> Curvature | None:
    """Stage 1: the curvature (each process sums over its share of the batches; all-reduced),
    written to curvature.safetensors. Every run then reads it back from that file, so features
    computed before and after a resume see the very same tensors (bit-identical indexes)."""
    att = b.att
    if not att.spec.needs_curvature:
        return None
    if b.lay.curvature.exists():
        say(f"reusing the fitted curvature in {b.lay.curvature}")
        return Curvature.load(b.lay.curvature)
    identity = curvature_identity(b.settings, att)
    key = curvature_key(identity)
    shipped = None if b.fit_curvature else find(key, b.prefit_dir)
    if shipped is not None:
        say(
            f"using the curvature shipped for these exact settings ({shipped}: the file a fit "
            "writes, checksum verified); --fit-curvature fits it afresh"
        )
        b.written_by_main(b.lay.curvature, lambda tmp: shutil.copyfile(shipped, tmp))
    else:
        t = time.time()
        crows = att.curvature_rows()
        cb = att.curvature_batch_size
        batches = [crows[i : i + cb] for i in range(0, len(crows), cb)]
        rows = [r for batch in batches[b.dist.rank :: b.dist.world] for r in batch]
        say(
            f"fitting {att.curvature_config().kind.upper()} curvature on {len(crows)} of {b.n} images "
            f"× {att.curvature_draws} draws ({b.dist.world} process(es))"
        )
        curvature = fit_curvature(
            b.model,
            att.train.images[rows],
            rows,
            att.curvature_config(),
            batch_size=cb,
            progress=b.chatty,
            device=b.device,
            allreduce=b.dist.allreduce,
            cond=att.train_cond(rows),
        )
        curvature.meta.update({"n_images": len(crows), KEY: key, "prefit_identity": identity})
        checkpoint("curvature-fitted")
        b.written_by_main(
            b.lay.curvature, lambda tmp: canonical_safetensors(curvature.save(tmp, factors=False) or tmp)
        )
        b.log.add(seconds_curvature=time.time() - t)
    checkpoint("curvature-written")
    return Curvature.load(b.lay.curvature)


def projection_stage(b: Build, curvature: Curvature | None) -> None:
    """Stage 2: the projection (seeded) to projection.safetensors and, with `importance`, the
    timestep density to density.safetensors; like the curvature, both are read back from file."""
    att, cfg = b.att, b.cfg
    projection = None
    if att.uses_model:
        shapes = model_layer_shapes(b.model.unet)
        proj = make_projection(shapes, cfg.dim, cfg.seed, cfg.projection)
        b.written_by_main(b.lay.projection, lambda tmp: canonical_safetensors(proj.save(tmp) or tmp))
        projection = Projection.load(b.lay.projection)
    density = load_file(str(b.lay.density))["density"] if b.lay.density.exists() else None
    att.fit(curvature=curvature, projection=projection, density=density)
    if att.density is not None and density is None:
        b.written_by_main(b.lay.density, lambda t: save_file({"density": att.density.contiguous()}, str(t)))
    checkpoint("projection-written")


def feature_shards_stage(b: Build) -> None:
    """Stage 3: raw training features, shard by shard; finished shards are skipped. Under torchrun
    each process takes every world-th shard."""
    from tqdm.auto import tqdm

    mine = b.shards[b.dist.rank :: b.dist.world]
    todo = [(s, e) for s, e in mine if not b.lay.shard(s, e).exists()]
    if b.dist.main:
        say(
            f"computing features for {b.n} images ({len(b.shards) - len(todo) * b.dist.world} of "
            f"{len(b.shards)} shards already done), D = {b.att.dim}, {b.cfg.draws} draws per image"
        )
    bar = tqdm(total=sum(e - s for s, e in todo), desc="features", unit="img", disable=not b.chatty)
    for k, (s, e) in enumerate(todo, 1):
        t = time.time()
        if b.att.spread_available:  # two independent halves of the draws: their mean and half-difference
            mean, delta = split_halves(
                b.att.raw_train_features(list(range(s, e)), progress=False, halves=True)
            )
            save_tensors(b.lay.shard(s, e), {"raw": mean.contiguous(), "raw_delta": delta.contiguous()})
        else:
            save_tensors(
                b.lay.shard(s, e), {"raw": b.att.raw_train_features(list(range(s, e)), progress=False)}
            )
        b.log.add(seconds_features=time.time() - t, rows=e - s if b.dist.world == 1 else 0)
        bar.update(e - s)
        checkpoint(f"shard-{k}")
    bar.close()
    if b.dist.world > 1:  # rows of every process, not only rank 0's
        b.log.add(rows=int(b.dist.allreduce(torch.tensor(sum(e - s for s, e in todo)))))
    b.dist.barrier()


def _shard_raw(b: Build, s: int, e: int, part: str = "raw") -> torch.Tensor:
    return load_file(str(b.lay.shard(s, e)))[part]


def spread_stage(b: Build) -> None:
    """Stage 4b (rank 0), for methods with independent halves: the half-differences δ of the
    finished features in an sq4 store (spread.faiss; the stability figures) and every training
    image's self-influence τ(i, i) = N φ_A·φ_B (self_influence.npy; independent halves, so the
    draws' own noise does not inflate it)."""
    att, t = b.att, time.time()
    if not att.spread_available:
        return

    def pairs():
        for s, e in b.shards:
            yield att.finish_pair(_shard_raw(b, s, e), _shard_raw(b, s, e, "raw_delta"))

    say(f"writing the stability store ({b.n} × {att.dim}, {SPREAD_STORE}) and self-influence")
    spread = faiss_from_chunks(lambda: (d.numpy() for _, d in pairs()), att.dim, SPREAD_STORE, n=b.n)
    replace_with(b.lay.spread, lambda tmp: faiss.write_index(spread, str(tmp)))
    self_inf = (
        torch.cat(
            [att.n_train * (phi.double().pow(2).sum(1) - d.double().pow(2).sum(1)) for phi, d in pairs()]
        )
        .float()
        .numpy()
    )
    save_numpy(b.lay.self_influence, self_inf)
    b.log.add(seconds_store=time.time() - t)
    checkpoint("spread-written")


def store_stage(b: Build) -> faiss.Index:
    """Stage 4 (rank 0): TRAK's inverse if the method needs it, then the FAISS store, streamed
    from the shards one at a time (TRAK's (ΦᵀΦ/N + λ)⁻¹ needs all of Φ at once)."""
    att, t = b.att, time.time()
    if att.spec.preconditioner == "trak":
        att.fit_trak(torch.cat([_shard_raw(b, s, e) for s, e in b.shards]))
        save_tensors(b.lay.trak, {"trak_inverse": att.trak_inverse})
    kind = resolve_faiss_type(b.faiss_type, b.n, att.dim)
    say(f"writing the {kind} FAISS store ({b.n} × {att.dim})")
    index = faiss_from_chunks(
        lambda: (att.finish_train_features(_shard_raw(b, s, e)).numpy() for s, e in b.shards),
        att.dim,
        kind,
        n=b.n,
    )

    def write(tmp: Path) -> None:
        faiss.write_index(index, str(tmp))
        checkpoint("store-tmp")  # killed while the store is half-way to its place

    replace_with(b.lay.features, write)
    b.log.add(seconds_store=time.time() - t)
    checkpoint("store-written")
    return index


def items_stage(b: Build) -> None:
    """Stage 5 (rank 0): items.jsonl (row -> label, source) and thumbs.npy (uint8 thumbnails)."""
    data, conds = b.data, item_conditions(b.model, b.data)  # a conditional model's row conditions
    save_text(
        b.lay.items,
        "".join(
            json.dumps({"row": i, "label": int(data.labels[i]), "source": data.sources[i], **conds[i]}) + "\n"
            for i in range(b.n)
        ),
    )
    if b.thumbs:
        images = to_uint8(data.images)
        save_numpy(b.lay.thumbs, images.squeeze(-1) if data.images.shape[1] == 1 else images)
    checkpoint("items-written")


def manifest_stage(b: Build, index: faiss.Index) -> dict:
    """Stage 6 (rank 0): manifest.json, written last; its presence marks a finished index. Its
    build statistics cover every run of the build (build.json keeps them between runs)."""
    att, kind = b.att, resolve_faiss_type(b.faiss_type, b.n, b.att.dim)
    proj = att.projection
    b.log.finish(save=False)  # build.json records the finish once the manifest is in place
    stats = {
        **b.log.summary(),
        "processes": b.dist.world,
        "peak_rss_mb_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    manifest = {
        **b.settings,
        "code_version": CODE_VERSION,
        "key": b.key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "projection": {
            "kind": proj.kind if proj else None,
            "total_dim": att.dim,
            "per_layer": proj.dims if proj else None,
            "dtype": STORE_DTYPES.get(kind, f"as encoded by {kind}"),
        },
        "files": file_records(b.lay),
        "faiss": {
            "type": kind,
            "requested": b.faiss_type,
            "metric": "inner_product",
            "ntotal": int(index.ntotal),
        },
        "build": stats,
    }
    replace_with(
        b.lay.manifest,
        lambda t: (
            t.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str)),
            checkpoint("manifest-tmp"),
        ),
    )
    b.log.save()
    return manifest


def build_index(
    model: DiffusionModel,
    data: ImageDataset,
    out: str | Path,
    cfg: AttributionConfig,
    faiss_type: str = "auto",
    model_path: str = "",
    data_spec: str = "",
    device: torch.device | str | None = None,
    progress: bool = True,
    thumbs: bool = True,
    shard_size: int = SHARD,
    keep_shards: bool = False,
    overwrite: bool = False,
    fit_curvature: bool = False,
    prefit_dir: str | Path | None = None,
    rerank: RerankOptions | None = None,
) -> Path:
    """Build (or resume) an index of `data` under `out`; returns the folder.

    A finished index with other settings in `out` is refused (ConfigError) unless `overwrite`;
    an unfinished build with other settings is moved to `out/.aside/<its key>/` (index/folder.py).

    The raw feature shards exist for resuming; once the store is written they are removed unless
    `keep_shards` (they are N·D float32, four times the size of an sq8 store). A curvature shipped
    for these exact settings (index/prefit.py) is copied instead of fitted unless `fit_curvature`.
    `rerank`: also the retrieve-and-rerank files (index/rerank_stage.py; a finished index too)."""
    check_model_family(model)
    check_build(cfg, len(data), shard_size)
    resolve_faiss_type(faiss_type, len(data))  # an unknown store type: refused before any work
    dist = Dist(pick_device(str(device) if device else None))
    device = dist.device  # cuda:LOCAL_RANK under torchrun
    settings = {
        **build_settings(model, data, cfg, model_path, data_spec),
        "faiss": faiss_type,
        "shard_size": shard_size,
    }
    b = Build(
        model,
        data,
        cfg,
        IndexLayout(out),
        dist,
        device,
        settings,
        settings_key(settings),
        faiss_type,
        shard_size,
        progress,
        thumbs,
        fit_curvature=fit_curvature,
        prefit_dir=None if prefit_dir is None else Path(prefit_dir),
    )
    try:
        if not prepare_folder(b, overwrite):
            return add_rerank(b.lay.root, rerank) if rerank is not None and b.dist.main else b.lay.root
        model.to(device)
        b.att = Attributor(model, training_set(model, data), cfg, device=device, progress=b.chatty)
        projection_stage(b, curvature_stage(b))
        resolve_faiss_type(faiss_type, b.n, b.att.dim)  # a factory string that does not fit D
        if rerank is not None:
            rerank.check(b.n, b.att.dim)
        feature_shards_stage(b)
        if b.dist.main:
            index = store_stage(b)
            spread_stage(b)
            rerank_build_stage(b, rerank)
            items_stage(b)
            manifest_stage(b, index)
            if not keep_shards:
                shutil.rmtree(b.lay.shards, ignore_errors=True)
            say(f"index written to {b.lay.root} ({b.n} images, D = {b.att.dim}, {time.time() - b.t0:.0f} s)")
        b.dist.barrier()
    except Exception as e:  # a full disk or a read-only folder: a plain message
        if (plain := user_error(e, b.lay.root)) is None:
            raise
        raise plain from None
    finally:
        b.dist.close()
    return b.lay.root


def main(argv: list[str] | None = None) -> int:
    """`python -m index.build` and torchrun's entry point (index/build_cli.py)."""
    from index.build_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
