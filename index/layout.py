"""The files of an index folder, named in one place (DESIGN.md §3, ARCHITECTURE.md "Index folder").

lay = IndexLayout(INDEX_DIR)
lay.manifest, lay.curvature, lay.features, …      # paths
lay.shard(0, 256)                                  # shards/0000000-0000256.safetensors
lay.finished_shards()                              # [(0, 256, path), …] sorted by start
"""

from __future__ import annotations

import re
from pathlib import Path

SHARD_RE = re.compile(r"^(\d{7,})-(\d{7,})\.safetensors$")


class IndexLayout:
    """Paths of the files in an index folder. Nothing is read or written here."""

    MANIFEST = "manifest.json"  # written last: an index without it is unfinished
    BUILD = "build.json"  # settings (and run statistics) of a build in progress
    CURVATURE = "curvature.safetensors"
    PROJECTION = "projection.safetensors"
    TRAK = "trak.safetensors"
    DENSITY = "density.safetensors"  # importance density of timesteps, for `importance` configs
    FEATURES = "features.faiss"
    SPREAD = "spread.faiss"  # half-differences δ of the features (stability figures), 4 bits a number
    SELF_INFLUENCE = "self_influence.npy"  # τ(i, i) of every training image, from independent halves
    ITEMS = "items.jsonl"
    THUMBS = "thumbs.npy"
    SHARDS = "shards"
    ASIDE = ".aside"  # unfinished builds with other settings are moved here, one folder per key
    # retrieve and rerank (--rerank, index/rerank.py): first stage, float16 full features, its record
    RERANK_FIRST, RERANK_FULL, RERANK_META = "rerank.faiss", "rerank_full.npy", "rerank.json"
    RERANK = (RERANK_FIRST, RERANK_FULL, RERANK_META)
    # every finished file but the store carries a sha256 in the manifest; the store (large) is
    # checked by its size and its FAISS header instead
    CHECKSUMMED = (CURVATURE, PROJECTION, TRAK, DENSITY, SPREAD, SELF_INFLUENCE, ITEMS, THUMBS, *RERANK)
    FILES = (
        MANIFEST,
        BUILD,
        CURVATURE,
        PROJECTION,
        TRAK,
        DENSITY,
        FEATURES,
        SPREAD,
        SELF_INFLUENCE,
        ITEMS,
        THUMBS,
        *RERANK,
    )

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"IndexLayout({str(self.root)!r})"

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def build(self) -> Path:
        return self.root / self.BUILD

    @property
    def curvature(self) -> Path:
        return self.root / self.CURVATURE

    @property
    def projection(self) -> Path:
        return self.root / self.PROJECTION

    @property
    def trak(self) -> Path:
        return self.root / self.TRAK

    @property
    def density(self) -> Path:
        return self.root / self.DENSITY

    @property
    def features(self) -> Path:
        return self.root / self.FEATURES

    @property
    def spread(self) -> Path:
        return self.root / self.SPREAD

    @property
    def self_influence(self) -> Path:
        return self.root / self.SELF_INFLUENCE

    @property
    def items(self) -> Path:
        return self.root / self.ITEMS

    @property
    def thumbs(self) -> Path:
        return self.root / self.THUMBS

    @property
    def shards(self) -> Path:
        return self.root / self.SHARDS

    @property
    def aside(self) -> Path:
        return self.root / self.ASIDE

    # ---- shards --------------------------------------------------------------------------------
    @staticmethod
    def shard_name(start: int, end: int) -> str:
        return f"{start:07d}-{end:07d}.safetensors"

    @staticmethod
    def parse_shard(path: str | Path) -> tuple[int, int] | None:
        """shards/0000256-0000512.safetensors -> (256, 512); None for any other name."""
        m = SHARD_RE.match(Path(path).name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def shard(self, start: int, end: int) -> Path:
        return self.shards / self.shard_name(start, end)

    def finished_shards(self) -> list[tuple[int, int, Path]]:
        """(start, end, path) of every finished shard file, by start row."""
        if not self.shards.is_dir():
            return []
        found = [(*se, p) for p in self.shards.iterdir() if (se := self.parse_shard(p)) is not None]
        return sorted(found)

    def rows_done(self) -> int:
        """Training rows whose features are in finished shards (build progress)."""
        return sum(e - s for s, e, _ in self.finished_shards())

    # ---- what the folder holds -------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.manifest.is_file()

    @property
    def is_unfinished_build(self) -> bool:
        return self.build.is_file() and not self.manifest.is_file()

    @classmethod
    def is_own_name(cls, name: str) -> bool:
        """Whether a folder entry is one an index build writes (its files, their temporaries)."""
        if name in (*cls.FILES, cls.SHARDS, cls.ASIDE):
            return True
        return any(name.startswith(f".{f}.tmp") or name == f"{f}.tmp" for f in cls.FILES)

    def foreign_entries(self) -> list[str]:
        """Entries of the folder that no index build writes (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not self.is_own_name(p.name))
