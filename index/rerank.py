"""Retrieve and rerank: a compact first-stage store for candidates, exact scores from full features
kept on disk (issue 19, million-image search).

    rr = build_reranked(chunks, d, n, folder)  # chunks(): (n_i, D) blocks; PCA1024,PQ512x4fs,Refine(SQ8)
    rr = Reranked.load(folder)
    top_s, top_i, bot_s, bot_i = rr.search(psi, k=16)                  # as `Index.search`

The first stage is a principal-component projection to `reduce` numbers (a randomised SVD of a
seeded, streamed sample: FAISS's own PCA eigen-decomposes a D × D matrix, hours at D = 16384)
followed by any FAISS factory string on the projected rows; one FAISS file, and only it lives in
memory. The full features are a float16 `.npy` file on disk, memory-mapped: for
each query the first stage proposes `candidates` rows at each end (top by ψ, top by −ψ), and
those rows alone are read and scored exactly, ⟨ψ, φ⟩ in float32. Recall against the exact top-k
is measured by `benchmarks/million_search.py`: the default first stage (1,024 principal
components; 4-bit fast-scan PQ proposes 16 × C rows, 8-bit codes keep C = 256; ≈ 1.3 KB per
image) reaches recall@16 ≈ 0.98 at 1M rows in ≈ 23 ms of one thread. In an index folder (the same
file names) it is written by `attribution index build --rerank` or `attribution index rerank` and
used by `Index.search` (index/rerank_stage.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np
import torch

from attribution.atomic import replace_with
from index.faiss_build import _factory, _sample, write_faiss
from index.layout import IndexLayout
from index.runlog import checkpoint

# the compact first stage; the (N, D) float16 full features, memory-mapped; the record (written
# last: its presence marks a finished first stage). The same names in an index folder.
FIRST, FULL, META = IndexLayout.RERANK_FIRST, IndexLayout.RERANK_FULL, IndexLayout.RERANK_META
REFINE_FACTOR = 16  # a two-level first stage re-scores this many times the candidates it returns


def _io_bytes(index: faiss.Index) -> int:
    """The serialised size of a FAISS index: what it holds in memory, give or take its buffers."""
    return int(faiss.serialize_index(index).nbytes)


class Reranked:
    """A first-stage FAISS index over N rows and the memory-mapped (N, D) float16 full features."""

    def __init__(self, first: faiss.Index, full: np.ndarray, candidates: int = 1024):
        if first.ntotal != full.shape[0] or first.d != full.shape[1]:
            raise ValueError(f"first stage {first.ntotal}×{first.d} vs full features {full.shape}")
        self.first, self.full, self.candidates = first, full, candidates

    def __len__(self) -> int:
        return self.first.ntotal

    @property
    def ram_bytes(self) -> int:
        """Bytes the first stage holds in memory (the full features stay on disk)."""
        return _io_bytes(self.first)

    def propose(self, psi: np.ndarray, c: int | None = None) -> np.ndarray:
        """psi (Q, D) -> the first stage's top `c` rows per query (Q, c), −1 where fewer."""
        c = min(c or self.candidates, len(self))
        return self.first.search(np.ascontiguousarray(psi, dtype=np.float32), c)[1]

    def exact(self, psi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """⟨ψ, φ_r⟩ in float32 for one query psi (D,) and rows (c,) ≥ 0, read from disk in row
        order (sequential where the rows are close)."""
        order = np.argsort(rows, kind="stable")
        feats = np.asarray(self.full[rows[order]], dtype=np.float32)
        out = np.empty(len(rows), dtype=np.float32)
        out[order] = feats @ np.asarray(psi, dtype=np.float32)
        return out

    def rerank(self, psi: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the candidate rows by exact score, descending: (scores, rows)."""
        rows = np.unique(rows[rows >= 0])
        s = self.exact(psi, rows)
        best = np.argsort(-s, kind="stable")[:k]
        return s[best], rows[best]

    def search(
        self, psi: np.ndarray, k: int = 16, candidates: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """psi (Q, D) -> (top scores, top rows, bottom scores, bottom rows), each (Q, k): the
        exact scores of the best of each end's first-stage candidates (bottom ascending)."""
        psi = np.ascontiguousarray(psi, dtype=np.float32)
        k = min(k, len(self))
        both = self.propose(np.concatenate([psi, -psi]), candidates)
        q = psi.shape[0]
        ts, ti = np.zeros((q, k), np.float32), np.full((q, k), -1, np.int64)
        bs, bi = ts.copy(), ti.copy()
        for j in range(q):
            s, r = self.rerank(psi[j], both[j], k)
            ts[j, : len(s)], ti[j, : len(r)] = s, r
            s, r = self.rerank(-psi[j], both[q + j], k)
            bs[j, : len(s)], bi[j, : len(r)] = -s, r
        return ts, ti, bs, bi

    def save(self, folder: str | Path, first: str, build_seconds: float | None = None) -> None:
        """The first stage, then rerank.json (last; without a time when `build_seconds` is None,
        so that an index's files have the same bytes whenever they are built)."""
        folder = Path(folder)
        write_faiss(self.first, folder / FIRST)
        meta = {
            "first": first,
            "n": len(self),
            "d": self.first.d,
            "candidates": self.candidates,
            "ram_bytes": self.ram_bytes,
        }
        if build_seconds is not None:
            meta["build_seconds"] = build_seconds
        replace_with(folder / META, lambda t: Path(t).write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, folder: str | Path, candidates: int | None = None) -> Reranked:
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        full = np.load(folder / FULL, mmap_mode="r")
        return cls(faiss.read_index(str(folder / FIRST)), full, candidates or meta["candidates"])


def write_full(chunks: Callable[[], Iterable[np.ndarray]], n: int, d: int, path: Path) -> None:
    """Stream the blocks into an (n, d) float16 .npy file (written under a temporary name)."""

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        start = 0
        for c in chunks():
            out[start : start + len(c)] = c
            start += len(c)
        if start != n:
            raise ValueError(f"the blocks hold {start} rows, not {n}")
        out.flush()
        del out

    replace_with(path, write)


def principal_transform(sample: np.ndarray, m: int, seed: int = 0) -> faiss.LinearTransform:
    """x ↦ Vᵀ(x − μ): the top m principal directions V of the sample (randomised SVD, seeded).
    Centring shifts every score of one query by the same ψ·μ, so rankings are unchanged."""
    x = torch.from_numpy(np.asarray(sample, dtype=np.float32))
    mu = x.mean(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        v = torch.svd_lowrank(x - mu, q=min(m + 32, *x.shape), niter=2)[2][:, :m]
    lt = faiss.LinearTransform(x.shape[1], m, True)
    faiss.copy_array_to_vector(np.ascontiguousarray(v.T.numpy()).ravel(), lt.A)
    faiss.copy_array_to_vector((-(mu @ v)).numpy().astype(np.float32), lt.b)
    lt.is_trained = True
    return lt


def first_stage(
    lt: faiss.LinearTransform, first: str, sample: np.ndarray, reduced: Callable[[], Iterable[np.ndarray]]
) -> faiss.IndexPreTransform:
    """The principal projection `lt`, then the FAISS factory index `first` trained on the projected
    sample and filled with the projected blocks `reduced()` (n_i, m)."""
    projected = lt.apply(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.IndexPreTransform(lt, coded_stage(first, lt.d_out, projected, reduced))


def coded_stage(
    first: str, m: int, projected_sample: np.ndarray, reduced: Callable[[], Iterable[np.ndarray]]
) -> faiss.Index:
    """The FAISS factory index `first` over m principal coordinates: trained on the projected
    sample (rows, m), filled with the blocks `reduced()` (n_i, m)."""
    inner = faiss.IndexFlatIP(m) if first == "Flat" else _factory(first, m)
    if isinstance(inner, faiss.IndexRefine):  # "PQ512x4fs,Refine(SQ8)": fast codes, then finer ones
        inner.k_factor = REFINE_FACTOR
    if not inner.is_trained:
        inner.train(np.ascontiguousarray(projected_sample, dtype=np.float32))
    for c in reduced():
        inner.add(np.ascontiguousarray(c, dtype=np.float32))
    return inner


def build_reranked(
    chunks: Callable[[], Iterable[np.ndarray]],
    d: int,
    n: int,
    folder: str | Path,
    reduce: int = 1024,
    first: str = "PQ512x4fs,Refine(SQ8)",
    candidates: int = 256,
    full_written: bool = False,
    sample_rows: int = 8192,
    timed: bool = True,
) -> Reranked:
    """The first stage (principal projection to `reduce`, then the FAISS factory string `first`,
    both trained on a streamed sample of `sample_rows`) and the float16 full features of the rows
    `chunks()` streams; `full_written`: the full file is already there. `timed`: record the build
    time in rerank.json (not in an index, whose files must not depend on the run)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not full_written:
        write_full(chunks, n, d, folder / FULL)
        checkpoint("rerank-full-written")
    sample = _sample(chunks, n, d)[:sample_rows]
    lt = principal_transform(sample, reduce)
    index = first_stage(
        lt, first, sample, lambda: (lt.apply(np.ascontiguousarray(c, np.float32)) for c in chunks())
    )
    rr = Reranked(index, np.load(folder / FULL, mmap_mode="r"), candidates)
    rr.save(folder, f"PCA{reduce}(svd),{first}", time.perf_counter() - t0 if timed else None)
    return rr
