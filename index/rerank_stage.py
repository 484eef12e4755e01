"""Retrieve and rerank as an option of an index (issue 19; the search itself: index/rerank.py).

    attribution index build … --rerank [--rerank-first auto] [--rerank-dim 1024] [--rerank-candidates 256]
    attribution index rerank INDEX_DIR [same options]        # add it to a finished index

A build with `--rerank` writes, after the store, a first stage (`rerank.faiss`: a principal
projection and a FAISS code, the only part held in memory) and the float16 full features
(`rerank_full.npy`, memory-mapped) into the index folder, then `rerank.json` (last: its presence
marks the stage finished, so a killed build resumes it; the full features, once written, are not
written again). The manifest records all three with their sha256 like every other file
(index/integrity.py), and `index/store.py`'s search then proposes candidates with the first stage
and scores them exactly. Without `--rerank` nothing here runs and the index has today's bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from safetensors.torch import load_file

from attribution.atomic import replace_with
from attribution.console import say
from attribution.errors import ConfigError, IndexLoadError
from index.checks import user_error
from index.faiss_build import _factory, _rows_needed, _sample_rows
from index.integrity import REBUILD, file_records, verify_files
from index.layout import IndexLayout
from index.manifest import read_manifest
from index.rerank import Reranked, build_reranked
from index.runlog import checkpoint

DEFAULT_FIRST = "PQ512x4fs,Refine(SQ8)"  # 1M rows: recall@16 ≈ 0.98 at C = 256, ≈ 1.3 KB a row
AUTO_PQ_ROWS = 100_000  # `auto`: below this many rows, 8-bit codes of the components (SQ8)
SAMPLE_ROWS = 8192  # rows the principal projection and the first stage are trained on
BLOCK = 4096  # rows read back from a finished store at a time


@dataclass(frozen=True)
class RerankOptions:
    """The first stage: `first` a FAISS factory string on `reduce` principal components (`auto`:
    SQ8 below AUTO_PQ_ROWS rows, else DEFAULT_FIRST); `candidates` rows per end reranked."""

    first: str = "auto"
    reduce: int = 1024
    candidates: int = 256

    def resolve(self, n: int, d: int) -> tuple[int, str, int]:
        """(components, factory string, candidates) for n rows of dimension d."""
        reduce = max(1, min(self.reduce, d, _sample_rows(n, d), SAMPLE_ROWS))
        first = self.first
        if first == "auto":
            first = DEFAULT_FIRST if n >= AUTO_PQ_ROWS and reduce % 512 == 0 else "SQ8"
        return reduce, first, max(1, min(self.candidates, n))

    def check(self, n: int, d: int) -> None:
        """ConfigError, before any work, for a first stage that cannot be built on these rows."""
        reduce, first, _ = self.resolve(n, d)
        if first != "Flat":
            need, have = _rows_needed(_factory(first, reduce)), min(_sample_rows(n, d), SAMPLE_ROWS)
            if need > have:
                raise ConfigError(
                    f"--rerank-first {first!r} needs {need} training rows, the index has {have}; "
                    "choose a smaller first stage (e.g. SQ8)"
                )


def add_rerank_args(p: argparse.ArgumentParser, flag: bool = True) -> None:
    from index.checks import POSITIVE

    if flag:
        p.add_argument(
            "--rerank",
            action="store_true",
            help="also write a retrieve-and-rerank first stage and float16 full features (million-image search)",
        )
    d = RerankOptions()
    p.add_argument(
        "--rerank-first",
        default=d.first,
        metavar="FACTORY",
        help=f"first stage: a FAISS factory string on the principal components (auto: SQ8 below "
        f"{AUTO_PQ_ROWS:,} images, else {DEFAULT_FIRST})",
    )
    p.add_argument("--rerank-dim", type=POSITIVE, default=d.reduce, help="principal components kept")
    p.add_argument(
        "--rerank-candidates", type=POSITIVE, default=d.candidates, help="candidates per end reranked exactly"
    )


def rerank_options(a: argparse.Namespace) -> RerankOptions | None:
    if not getattr(a, "rerank", True):
        return None
    return RerankOptions(a.rerank_first, a.rerank_dim, a.rerank_candidates)


def rerank_stage(lay: IndexLayout, opts: RerankOptions, n: int, d: int, chunks) -> None:
    """Write the first stage and full features of the rows `chunks()` streams (rank 0); nothing
    if rerank.json is there (finished by an earlier run)."""
    if lay.path(lay.RERANK_META).exists():
        return
    reduce, first, c = opts.resolve(n, d)
    say(
        f"writing the rerank first stage (PCA{reduce}, {first}, {c} candidates) and float16 features ({n} × {d})"
    )
    full_written = lay.path(lay.RERANK_FULL).exists()
    build_reranked(chunks, d, n, lay.root, reduce, first, c, full_written, SAMPLE_ROWS, timed=False)
    checkpoint("rerank-written")


def rerank_build_stage(b, opts: RerankOptions | None) -> None:
    """Stage 4c of index/build.py (rank 0), from the raw shards (exact float32 features)."""
    if opts is None:
        return
    t, att = time.time(), b.att

    def chunks():
        for s, e in b.shards:
            yield att.finish_train_features(load_file(str(b.lay.shard(s, e)))["raw"]).numpy()

    rerank_stage(b.lay, opts, b.n, att.dim, chunks)
    b.log.add(seconds_store=time.time() - t)


def add_rerank(index_dir: str | Path, opts: RerankOptions) -> Path:
    """Add the rerank files to a finished index (its rows read back from the store: exact for a
    flat store, the decoded codes for sq8) and record them in its manifest; resumable."""
    lay = IndexLayout(index_dir)
    manifest = read_manifest(lay.root)
    if not verify_files(lay, manifest):
        raise ConfigError(f"{lay.root}: built before indexes recorded checksums; {REBUILD}")
    if lay.RERANK_META in manifest["files"]:
        say(f"{lay.root} already has its rerank files")
        return lay.root
    n, d = manifest["data"]["n"], manifest["projection"]["total_dim"]
    opts.check(n, d)
    store = faiss.read_index(str(lay.features))
    try:
        store.reconstruct_n(0, 1)
    except RuntimeError:
        raise ConfigError(
            f"{lay.features}: a {manifest['faiss']['type']} store cannot give back its rows; "
            "rebuild the index with --rerank (the rows then come from the feature shards)"
        ) from None
    try:
        rows = lambda: (store.reconstruct_n(s, min(BLOCK, n - s)) for s in range(0, n, BLOCK))  # noqa: E731
        rerank_stage(lay, opts, n, d, rows)
        manifest["files"] = file_records(lay)
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        replace_with(lay.manifest, lambda t: Path(t).write_text(text))
    except Exception as e:  # a full disk or a read-only folder: a plain message
        if (plain := user_error(e, lay.root)) is None:
            raise
        raise plain from None
    say(f"rerank files added to {lay.root}")
    return lay.root


def load_rerank(lay: IndexLayout, manifest: dict) -> Reranked | None:
    """The index's first stage and memory-mapped full features (None unless the manifest lists
    them; their checksums were verified with the other files)."""
    if lay.RERANK_META not in (manifest.get("files") or {}):
        return None
    try:
        rr = Reranked.load(lay.root)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise IndexLoadError(f"{lay.root}: unreadable rerank files ({str(e)[:120]}); {REBUILD}") from None
    n, d = manifest["data"]["n"], manifest["projection"]["total_dim"]
    if rr.full.shape != (n, d) or rr.full.dtype != np.float16:
        raise IndexLoadError(
            f"{lay.path(lay.RERANK_FULL)}: {rr.full.dtype} {rr.full.shape}, expected float16 ({n}, {d}); {REBUILD}"
        )
    return rr
