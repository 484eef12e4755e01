"""Building the FAISS store of an index from streamed row blocks.

    kind = resolve_faiss_type("auto", n, d)         # auto | flat | sq8 | ivf | hnsw | factory string
    index = faiss_from_chunks(chunks, d, kind, n=n)  # chunks(): iterable of (n_i, D) float32 blocks

Besides the named types, any FAISS factory string (`IVF64,SQ8`, `IVF256,PQ16`, `HNSW32`, …) is
accepted; an index that needs training is trained on a seeded sample of the rows, gathered while
streaming the blocks (never all vectors at once), then the blocks are streamed again and added.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from attribution.atomic import replace_with
from attribution.errors import ConfigError

FAISS_TYPES = ("auto", "flat", "sq8", "sq4", "ivf", "hnsw")
SCALAR_BITS = {"sq8": faiss.ScalarQuantizer.QT_8bit, "sq4": faiss.ScalarQuantizer.QT_4bit}
AUTO_FLAT_BYTES = 1 << 28  # "auto": flat float32 up to 256 MiB of vectors, 8-bit scalar quantizer above
TRAIN_ROWS = 65536  # the most rows a factory index is trained on ...
TRAIN_BYTES = 1 << 30  # ... and the most memory that sample may take
PROBE_D = 960  # a dimension divisible by most sub-quantizer counts, to check a factory string's syntax


def is_factory(kind: str) -> bool:
    return kind not in FAISS_TYPES


def _why(e: RuntimeError) -> str:
    """FAISS's reason, without its C++ signature and source location."""
    text = str(e).strip().splitlines()[-1]
    text = text.split(" failed: ", 1)[-1] if " failed: " in text else text
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text)[:200]


def _factory(kind: str, d: int | None) -> faiss.Index:
    try:
        return faiss.index_factory(d or PROBE_D, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        fits = f" that fits D = {d}" if d else ""
        raise ConfigError(
            f"unknown FAISS index type {kind!r} ({_why(e)}); choose one of "
            f"{', '.join(FAISS_TYPES)} or a FAISS factory string such as IVF64,SQ8{fits}"
        ) from None


def _sample_rows(n: int, d: int) -> int:
    return max(1, min(n, TRAIN_ROWS, TRAIN_BYTES // (4 * d)))


def _rows_needed(index: faiss.Index) -> int:
    """The fewest training rows FAISS accepts: one per IVF list and per PQ centroid."""
    need, parts = 1, [faiss.downcast_index(index)]
    try:
        ivf = faiss.extract_index_ivf(index)
        need, parts = max(need, ivf.nlist), [*parts, faiss.downcast_index(ivf)]
    except RuntimeError:
        pass
    for p in parts:
        pq = getattr(p, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
    return need


def resolve_faiss_type(kind: str, n: int, d: int | None = None) -> str:
    """'auto' -> 'flat' when N·D float32 fit in AUTO_FLAT_BYTES, else 'sq8'; the other names and
    factory strings unchanged (a factory string is checked for D, or for its syntax if D is None)."""
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"unknown FAISS index type {kind!r}; choose one of {', '.join(FAISS_TYPES)}")
    if is_factory(kind):
        if kind.islower() and "," not in kind:  # a misspelt name, not a factory string
            raise ConfigError(
                f"unknown FAISS index type {kind!r}; choose one of {', '.join(FAISS_TYPES)} "
                "or a FAISS factory string such as IVF64,SQ8"
            )
        index = _factory(kind, d)
        if d and not index.is_trained and _sample_rows(n, d) < _rows_needed(index):
            raise ConfigError(
                f"FAISS index {kind!r} needs at least {_rows_needed(index)} training rows, "
                f"it would be trained on {_sample_rows(n, d)} (of {n}): choose fewer lists "
                "or centroids"
            )
        return kind
    if kind != "auto":
        return kind
    return "flat" if 4 * n * (d or 1) <= AUTO_FLAT_BYTES else "sq8"


def faiss_arg(text: str) -> str:
    """argparse type of --faiss: a named type or a factory string (its syntax checked)."""
    try:
        resolve_faiss_type(text, 1, None)
        return text
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sample(chunks: Callable[[], Iterable[np.ndarray]], n: int, d: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of the rows (at most TRAIN_ROWS and TRAIN_BYTES), gathered in one pass."""
    k = _sample_rows(n, d)
    want = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    out, start = [], 0
    for c in chunks():
        lo, hi = np.searchsorted(want, [start, start + len(c)])
        out.append(np.asarray(c, dtype=np.float32)[want[lo:hi] - start])
        start += len(c)
    return np.ascontiguousarray(np.concatenate(out))


def _from_factory(
    chunks: Callable[[], Iterable[np.ndarray]], d: int, kind: str, n: int | None
) -> faiss.Index:
    index = _factory(kind, d)
    if not index.is_trained:
        if n is None:
            n = sum(len(c) for c in chunks())
        sample = _sample(chunks, n, d)
        try:
            index.train(sample)
        except RuntimeError as e:
            why = _why(e)
            raise ConfigError(
                f"FAISS index {kind!r} cannot be trained on {len(sample)} rows ({why}); "
                "choose fewer lists or centroids"
            ) from None
    try:  # IVF: search an eighth of the lists, as the named 'ivf' type does (saved with the index)
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = max(1, ivf.nlist // 8)
    except RuntimeError:
        pass
    for c in chunks():
        index.add(np.ascontiguousarray(c, dtype=np.float32))
    return index


def faiss_from_chunks(
    chunks: Callable[[], Iterable[np.ndarray]],
    d: int,
    kind: str = "flat",
    nlist: int | None = None,
    n: int | None = None,
) -> faiss.Index:
    """An inner-product FAISS index over row blocks (n_i, D) float32; `chunks()` is called once
    (flat, hnsw), twice (sq8: per-dimension min/max first, so no value is clipped; a factory
    string or ivf: a seeded training sample of at most TRAIN_ROWS rows and TRAIN_BYTES first, then
    the blocks are added). `n`: the number of rows, if known (else one more pass counts them).

    sq8 stores 1 byte per number; its inner-product error is ≈ 1% of the count sketch's own. sq4
    (half a byte) holds the half-differences behind the stability figures."""
    if is_factory(kind):
        return _from_factory(chunks, d, kind, n)
    if kind == "ivf":  # k-means on a streamed sample (issue 19: never all vectors at once)
        n = n if n is not None else sum(len(c) for c in chunks())
        sample = _sample(chunks, n, d)
        nlist = nlist or max(1, min(4096, int(4 * np.sqrt(n)), len(sample)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.nprobe = max(1, nlist // 8)
    elif kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind in SCALAR_BITS:
        index = faiss.IndexScalarQuantizer(d, SCALAR_BITS[kind], faiss.METRIC_INNER_PRODUCT)
        lo, hi = np.full(d, np.inf, np.float32), np.full(d, -np.inf, np.float32)
        for c in chunks():
            lo, hi = np.minimum(lo, c.min(0)), np.maximum(hi, c.max(0))
        index.train(np.stack([lo, hi]).astype(np.float32))  # min/max ranges: exactly these bounds
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ConfigError(f"unknown FAISS index type {kind!r}; choose one of {', '.join(FAISS_TYPES[1:])}")
    for c in chunks():
        index.add(np.ascontiguousarray(c, dtype=np.float32))
    return index


def write_faiss(index: faiss.Index, path: Path) -> None:
    replace_with(path, lambda t: faiss.write_index(index, str(t)))
