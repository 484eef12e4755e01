"""An index proves its integrity on load: the manifest records a sha256 of every file but the
store, and the store's size and FAISS header (ntotal, d); `verify_files` refuses any difference.

    files = file_records(layout)           # at build time, once every file is written
    verify_files(layout, manifest)         # at load time; IndexLoadError on any mismatch
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from attribution.errors import IndexLoadError
from index.layout import IndexLayout

REBUILD = "rebuild it with `attribution index build … --overwrite`"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_safetensors(path: str | Path) -> Path:
    """Rewrite a safetensors file's header with its metadata in sorted order, in place. The library
    writes metadata in hash-map order, which differs from process to process, so the same tensors
    would give different bytes (and checksums) in a resumed build."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if "__metadata__" in header:
            header = {
                "__metadata__": dict(sorted(header["__metadata__"].items())),
                **{k: v for k, v in header.items() if k != "__metadata__"},
            }
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:  # never so for the same content; refuse rather than shift the data
            raise RuntimeError(f"{path}: canonical safetensors header longer than the original")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))
    return Path(path)


def faiss_header(path: str | Path) -> tuple[int, int]:
    """(ntotal, d) from a FAISS file's first bytes, without reading the vectors: every index
    type writes a four-character code, then d (int32) and ntotal (int64)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16:
        raise IndexLoadError(f"{path}: only {len(head)} bytes, not a FAISS index; {REBUILD}")
    d, ntotal = struct.unpack("<iq", head[4:16])
    return ntotal, d


def file_records(lay: IndexLayout) -> dict[str, dict]:
    """What the manifest records of the finished files present in the folder."""
    out: dict[str, dict] = {}
    for name in lay.CHECKSUMMED:
        p = lay.path(name)
        if name in lay.RERANK and not lay.path(lay.RERANK_META).is_file():
            continue  # a rerank stage that has not finished (rerank.json is written last)
        if p.is_file():
            out[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    ntotal, d = faiss_header(lay.features)
    out[lay.FEATURES] = {"bytes": lay.features.stat().st_size, "ntotal": ntotal, "d": d}
    return out


def _check_store(lay: IndexLayout, rec, n: int, dim: int) -> None:
    p = lay.features
    if not isinstance(rec, dict) or not {"bytes", "ntotal", "d"} <= rec.keys():
        raise IndexLoadError(f"{lay.manifest}: no size and header recorded for {lay.FEATURES}; {REBUILD}")
    if not p.is_file():
        raise IndexLoadError(f"{p}: missing (the manifest lists it); {REBUILD}")
    size = p.stat().st_size
    if size != rec["bytes"]:
        raise IndexLoadError(
            f"{p}: {size} bytes, the manifest says {rec['bytes']} (truncated, or "
            f"from another build); {REBUILD}"
        )
    ntotal, d = faiss_header(p)
    if (ntotal, d) != (rec["ntotal"], rec["d"]) or (ntotal, d) != (n, dim):
        raise IndexLoadError(f"{p}: holds {ntotal}×{d} vectors, the manifest says {n}×{dim}; {REBUILD}")


HASH_LIMIT = 1 << 31  # larger full features (rerank_full.npy) are checked by size on load


def _size_only(p: Path, rec: dict) -> bool:
    """For the rerank's full features: refuse another size; True (no sha256 read on load) above
    HASH_LIMIT bytes, where reading the whole file each time would defeat its memory map."""
    if p.stat().st_size != rec.get("bytes"):
        raise IndexLoadError(
            f"{p}: {p.stat().st_size} bytes, the manifest says {rec.get('bytes')} (truncated, or "
            f"from another build); {REBUILD}"
        )
    return rec["bytes"] > HASH_LIMIT


def verify_files(lay: IndexLayout, manifest: dict) -> bool:
    """Refuse (IndexLoadError) any listed file that is missing or differs from the manifest's
    record. False for an index built before checksums were recorded (nothing to verify)."""
    files = manifest.get("files")
    if files is None:
        return False
    if not isinstance(files, dict):
        raise IndexLoadError(f"{lay.manifest}: 'files' is not a JSON object; {REBUILD}")
    _check_store(lay, files.get(lay.FEATURES), manifest["data"]["n"], manifest["projection"]["total_dim"])
    for name, rec in files.items():
        if name == lay.FEATURES:
            continue
        if name not in lay.CHECKSUMMED or not isinstance(rec, dict) or "sha256" not in rec:
            raise IndexLoadError(f"{lay.manifest}: unexpected entry {name!r} in 'files'; {REBUILD}")
        p = lay.path(name)
        if not p.is_file():
            raise IndexLoadError(f"{p}: missing (the manifest lists it); {REBUILD}")
        if name == lay.RERANK_FULL and _size_only(p, rec):
            continue
        if sha256_file(p) != rec["sha256"]:
            raise IndexLoadError(
                f"{p}: its sha256 differs from the one in the manifest: the file was "
                f"changed or copied from another build; {REBUILD}"
            )
    if lay.ITEMS not in files:
        raise IndexLoadError(f"{lay.manifest}: no checksum recorded for {lay.ITEMS}; {REBUILD}")
    return True
