"""Loading and searching a built index; the query path shared by the CLI and the app.

idx = load(INDEX_DIR, model)                 # refuses another model / format / broken files
res = idx.query(image)                       # top-k proponents and opponents with scores
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors.torch import load_file

from attribution import uncertainty as uq
from attribution.bands import Bands, query_band_features
from attribution.console import say
from attribution.curvature import Curvature
from attribution.influence import AttributionConfig, Attributor
from attribution.projection import Projection
from index.faiss_build import (  # noqa: F401  (re-exported: the store's types and builders)
    AUTO_FLAT_BYTES,
    FAISS_TYPES,
    faiss_from_chunks,
    resolve_faiss_type,
    write_faiss,
)
from index.integrity import verify_files
from index.layout import IndexLayout
from index.manifest import IndexLoadError, check_data, check_model, read_manifest
from index.rerank_stage import load_rerank

EXHAUSTIVE = (faiss.IndexFlat, faiss.IndexScalarQuantizer)  # every vector scored on every search


@dataclass
class Hit:
    """One shown training image. The stability figures (None where the index has none):
    `se`, the standard error of the score under new draws; `rank_a`, `rank_b`, its rank under each
    of two independent halves of the draws; `distinct`, whether its score is more than two standard
    errors from the first one not shown (attribution/uncertainty.py)."""

    rank: int
    row: int
    score: float
    label: int
    source: str
    se: float | None = None
    rank_a: int | None = None
    rank_b: int | None = None
    distinct: bool | None = None
    bands: list[float] | None = None  # the score's parts by timestep band (they add up to it)


@dataclass
class QueryResult:
    proponents: list[Hit]
    opponents: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)
    all_scores: np.ndarray | None = None
    stability: dict | None = None  # pooled se, how many shown are distinguishable, how it was made
    bands: dict | None = None  # edges, names, ranked_by (a band's name, or None: the whole score)

    def to_dict(self) -> dict:
        return {
            "proponents": [h.__dict__ for h in self.proponents],
            "opponents": [h.__dict__ for h in self.opponents],
            "timings_s": self.timings,
            "stability": self.stability,
            "bands": self.bands,
        }


class Index:
    """A loaded index: FAISS store, items, thumbnails, and the query-side feature map."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        faiss_index: faiss.Index,
        items: list[dict],
        thumbs: np.ndarray | None,
        attributor: Attributor | None,
        spread: faiss.Index | None = None,
        self_influence: np.ndarray | None = None,
        rerank=None,
    ):
        self.path = path
        self.manifest = manifest
        self.faiss = faiss_index
        self.items = items
        self.thumbs = thumbs
        self.attributor = attributor
        self.spread = spread  # half-differences of the features (sq4), for the stability figures
        self.self_influence = self_influence  # (N,) τ(i, i), where the index has it
        self.rerank = rerank  # retrieve and rerank (index/rerank_stage.py): proposes, then scores exactly

    def __len__(self) -> int:
        return self.faiss.ntotal

    @property
    def method(self) -> str:
        return self.manifest["method"]["method"]

    def all_features(self) -> np.ndarray:
        """(N, D) stored training features (flat; sq8 decoded)."""
        return self.faiss.reconstruct_n(0, self.faiss.ntotal)

    @property
    def exhaustive(self) -> bool:
        """Whether every search scores every training image (flat, sq8)."""
        return isinstance(self.faiss, EXHAUSTIVE)

    def all_scores(self, psi: np.ndarray) -> np.ndarray:
        """psi (Q, D) -> τ (Q, N) for every training image, by one exhaustive FAISS search."""
        if not self.exhaustive:
            raise ValueError(
                f"all scores need an exhaustive (flat or sq8) index, not {type(self.faiss).__name__}"
            )
        psi = np.ascontiguousarray(psi, dtype=np.float32)
        s, i = self.faiss.search(psi, self.faiss.ntotal)
        out = np.empty_like(s)
        np.put_along_axis(out, i, s, axis=1)
        return out

    def search(self, psi: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """psi (Q, D) -> (top scores, top rows, bottom scores, bottom rows), each (Q, k).

        Top = largest τ (proponents, descending); bottom = smallest τ (opponents, ascending),
        found by searching with −ψ.
        """
        psi = np.ascontiguousarray(psi, dtype=np.float32)
        k = min(k, self.faiss.ntotal)
        if self.rerank is not None:
            return self.rerank.search(psi, k)
        if self.exhaustive:  # one pass over the vectors serves both ends
            return _ends(self.all_scores(psi), k)
        s_top, i_top = self.faiss.search(psi, k)
        s_bot, i_bot = self.faiss.search(-psi, k)
        return s_top, i_top, -s_bot, i_bot

    def query_features(self, images: torch.Tensor, trajectory=None, cond=None) -> np.ndarray:
        if self.attributor is None:
            raise IndexLoadError("this index was loaded without a model; pass the model to load()")
        return self.attributor.query_features(images, trajectory, cond).numpy()

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        return [
            Hit(r + 1, int(i), float(s), int(self.items[i]["label"]), self.items[i]["source"])
            for r, (s, i) in enumerate(zip(scores, rows))
            if i >= 0
        ]

    @property
    def has_spread(self) -> bool:
        return self.spread is not None and self.attributor is not None and self.attributor.spread_available

    def query(
        self,
        image: torch.Tensor,
        k: int = 16,
        trajectory=None,
        with_all: bool = False,
        bands: Bands | None = None,
        rank_by: int | None = None,
        cond=None,
    ) -> QueryResult:
        """One query (C, H, W) in the denoiser's space (pixels in [-1, 1], or latents: index.conditions
        `model_input`) under `cond` (`query_condition`) -> top-k proponents and opponents, with their
        stability figures where the index holds half-differences; with `bands`, each hit's score
        split by timestep band (attribution/bands.py) and, with `rank_by` (a band), the top-k by
        that band's part alone (their stability figures are then not given)."""
        if bands is not None:
            return self._query_bands(image, k, trajectory, with_all, bands, rank_by, cond)
        t0 = time.perf_counter()
        dpsi = None
        q = image.unsqueeze(0)
        if self.has_spread:
            psi, dpsi = (f.numpy() for f in self.attributor.query_features_with_spread(q, trajectory, cond))
        else:
            psi = self.query_features(q, trajectory, cond)
        t1 = time.perf_counter()
        scores = self.all_scores(psi) if self.exhaustive and (self.rerank is None or with_all) else None
        k = min(k, len(self))
        s_top, i_top, s_bot, i_bot = self.search(psi, k) if scores is None else _ends(scores, k)
        t2 = time.perf_counter()
        res = QueryResult(
            self.hits(s_top[0], i_top[0]),
            self.hits(s_bot[0], i_bot[0]),
            {"query_gradient": t1 - t0, "search": t2 - t1},
        )
        if dpsi is not None:
            res.stability = stability_figures(self, psi, dpsi, scores, res)
            res.timings["stability"] = time.perf_counter() - t2
        if with_all and scores is not None:
            res.all_scores = scores[0]
        return res

    def _query_bands(self, image, k, trajectory, with_all, bands: Bands, rank_by, cond=None) -> QueryResult:
        """`query` with band features from the same pass (ψ, δψ and ψ_b of every band)."""
        if self.attributor is None:
            raise IndexLoadError("this index was loaded without a model; pass the model to load()")
        if rank_by is not None and not 0 <= rank_by < len(bands):
            raise ValueError(f"rank_by must be a band between 0 and {len(bands) - 1}")
        t0 = time.perf_counter()
        psi, dpsi, psi_b = query_band_features(self.attributor, image.unsqueeze(0), bands, trajectory, cond)
        psi, psi_b = psi.numpy(), psi_b[0].numpy()
        dpsi = dpsi.numpy() if dpsi is not None and self.has_spread else None
        t1 = time.perf_counter()
        scores = self.all_scores(psi) if self.exhaustive and (self.rerank is None or with_all) else None
        k = min(k, len(self))
        if rank_by is None:
            s_top, i_top, s_bot, i_bot = self.search(psi, k) if scores is None else _ends(scores, k)
        else:  # the top-k of one band's part; their whole scores are shown
            _, i_top, _, i_bot = self.search(psi_b[rank_by : rank_by + 1], k)
            s_top, s_bot = (self._totals(psi, scores, rows[0])[None] for rows in (i_top, i_bot))
        t2 = time.perf_counter()
        res = QueryResult(
            self.hits(s_top[0], i_top[0]),
            self.hits(s_bot[0], i_bot[0]),
            {"query_gradient": t1 - t0, "search": t2 - t1},
        )
        shown = res.proponents + res.opponents
        if shown:
            parts = self.band_parts(psi_b, [h.row for h in shown])
            for h, p in zip(shown, parts):
                h.bands = [float(v) for v in p]
        res.bands = {**bands.to_dict(), "ranked_by": None if rank_by is None else bands.names[rank_by]}
        res.timings["bands"] = time.perf_counter() - t2
        if dpsi is not None and rank_by is None:
            t3 = time.perf_counter()
            res.stability = stability_figures(self, psi, dpsi, scores, res)
            res.timings["stability"] = time.perf_counter() - t3
        if with_all and scores is not None:
            res.all_scores = scores[0]
        return res

    def band_parts(self, psi_b: np.ndarray, rows) -> np.ndarray:
        """(len(rows), bands) band scores ψ_b·φ of training rows (their stored features), float64."""
        phi = np.stack([self.faiss.reconstruct(int(r)) for r in rows]).astype(np.float64)
        return phi @ np.asarray(psi_b, dtype=np.float64).T

    def _totals(self, psi: np.ndarray, scores: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        """The whole scores of `rows` (from all scores, or from their stored features)."""
        rows = rows[rows >= 0]
        if scores is not None:
            return scores[0, rows]
        return np.stack([self.faiss.reconstruct(int(r)) for r in rows]) @ psi[0]


def stability_figures(
    idx: Index, psi: np.ndarray, dpsi: np.ndarray, scores: np.ndarray | None, res: QueryResult, z: float = 2.0
) -> dict:
    """Fills each hit's se, ranks under the two halves and `distinct` (attribution/uncertainty.py);
    returns the summary. `scores` (1, N) are all scores when the store is exhaustive."""
    both = np.ascontiguousarray(np.concatenate([psi, dpsi]), dtype=np.float32)
    s, i = idx.spread.search(both, idx.spread.ntotal)  # ψ·δ and δψ·δ for every image
    on_spread = np.empty_like(s)
    np.put_along_axis(on_spread, i, s, axis=1)
    s_pd, s_dd = on_spread
    shown = np.array([h.row for h in res.proponents + res.opponents], dtype=np.int64)
    if scores is not None:
        s_pp, s_dp = scores[0], idx.all_scores(dpsi)[0]
        h_a, h_b = uq.half_estimates(s_pp, s_pd, s_dp, s_dd)
    else:  # an approximate store: δψ·φ from the shown images' reconstructed features, no ranks
        s_pp = h_a = h_b = None
        s_dp = np.zeros(len(idx))
        s_dp[shown] = np.stack([idx.faiss.reconstruct(int(r)) for r in shown]) @ dpsi[0]
    raw = uq.raw_se(s_pd, s_dp)
    for hits, desc in ((res.proponents, True), (res.opponents, False)):
        if not hits:
            continue
        rows = np.array([h.row for h in hits])
        nxt = None
        if s_pp is not None and len(hits) < len(idx):
            order = np.argsort(-s_pp if desc else s_pp, kind="stable")
            nxt = int(order[len(hits)])
        se = uq.pooled(raw[rows if nxt is None else np.append(rows, nxt)])
        flags = (
            uq.distinguishable(
                np.array([h.score for h in hits]), se[: len(hits)], float(s_pp[nxt]), se[-1], z, desc
            )
            if nxt is not None
            else [None] * len(hits)
        )
        ra = uq.ranks_of(h_a, rows, desc) if h_a is not None else [None] * len(hits)
        rb = uq.ranks_of(h_b, rows, desc) if h_b is not None else [None] * len(hits)
        for h, e, a, b, f in zip(hits, se, ra, rb, flags):
            h.se, h.distinct = float(e), None if f is None else bool(f)
            h.rank_a, h.rank_b = (None if a is None else int(a)), (None if b is None else int(b))
    pooled = float(np.sqrt(np.mean(raw[shown] ** 2))) if shown.size else None
    return {
        "pooled_se": pooled,
        "z": z,
        "distinct_proponents": sum(bool(h.distinct) for h in res.proponents),
        "distinct_opponents": sum(bool(h.distinct) for h in res.opponents),
        "method": "independent halves of the training and query draws (attribution/uncertainty.py)",
    }


def _ends(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All scores (Q, N) -> (top scores, top rows, bottom scores, bottom rows), each (Q, k)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    top, bot = order[:, :k], order[:, ::-1][:, :k]
    return (np.take_along_axis(scores, top, 1), top, np.take_along_axis(scores, bot, 1), bot)


def _read_store(lay: IndexLayout, manifest: dict) -> faiss.Index:
    try:
        fx = faiss.read_index(str(lay.features))
    except RuntimeError as e:
        raise IndexLoadError(
            f"{lay.features}: unreadable or truncated FAISS file "
            f"({str(e).splitlines()[0][:120]}); rebuild it with `attribution index build … --overwrite`"
        ) from None
    n, d = manifest["data"]["n"], manifest["projection"]["total_dim"]
    if fx.ntotal != n or fx.d != d:
        raise IndexLoadError(
            f"{lay.root}: {lay.FEATURES} holds {fx.ntotal}×{fx.d} vectors, the manifest "
            f"says {n}×{d}; rebuild it with `attribution index build … --overwrite`"
        )
    return fx


def _read_items(lay: IndexLayout, n: int) -> list[dict]:
    try:
        items = [json.loads(line) for line in lay.items.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise IndexLoadError(
            f"{lay.items}: unreadable ({e}); rebuild it with `attribution index build … --overwrite`"
        ) from None
    if len(items) != n:
        raise IndexLoadError(
            f"{lay.items}: {len(items)} items, expected {n}; rebuild it with `attribution index build … --overwrite`"
        )
    for i, it in enumerate(items):
        if not isinstance(it, dict) or it.get("row") != i or not {"label", "source"} <= it.keys():
            raise IndexLoadError(
                f"{lay.items}: line {i + 1} is not the item of row {i}; rebuild it with `attribution index build … --overwrite`"
            )
    return items


def _read_thumbs(lay: IndexLayout, n: int) -> np.ndarray:
    try:
        thumbs = np.load(lay.thumbs, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexLoadError(
            f"{lay.thumbs}: unreadable ({e}); rebuild it with `attribution index build … --overwrite`"
        ) from None
    if thumbs.ndim not in (3, 4) or thumbs.shape[0] != n or thumbs.dtype != np.uint8:
        raise IndexLoadError(
            f"{lay.thumbs}: {thumbs.dtype} {tuple(thumbs.shape)}, expected {n} uint8 "
            "thumbnails; rebuild it with `attribution index build … --overwrite`"
        )
    return thumbs


def load(
    index_dir: str | Path,
    model=None,
    data_fingerprint: str | None = None,
    device: str | torch.device | None = None,
) -> Index:
    """Load an index folder; with `model`, refuse an index built for another model.

    Every file is checked against the manifest (IndexLoadError on a mismatch): the settings
    against its key, each file against its sha256, the store against its size and header."""
    index_dir = Path(index_dir)
    lay = IndexLayout(index_dir)
    manifest = read_manifest(index_dir)
    if model is not None:
        check_model(manifest, model, index_dir)  # family, condition kind, class map, weights
    if data_fingerprint is not None:
        check_data(manifest, data_fingerprint, index_dir)
    verified = verify_files(lay, manifest)
    if not verified:
        say(
            f"note: {index_dir} was built before indexes recorded checksums, so its files are not "
            "verified; rebuild it to add them"
        )
    n = manifest["data"]["n"]
    fx = _read_store(lay, manifest)
    items = _read_items(lay, n)
    has_thumbs = lay.THUMBS in manifest["files"] if verified else lay.thumbs.exists()
    thumbs = _read_thumbs(lay, n) if has_thumbs else None
    att = _query_attributor(lay, manifest, model, device) if model is not None else None
    spread = (
        _read_faiss(lay.spread)
        if (lay.SPREAD in manifest["files"] if verified else lay.spread.exists())
        else None
    )
    self_inf = None
    if lay.SELF_INFLUENCE in manifest.get("files", {}):
        self_inf = _read_part(lay.self_influence, lambda p: np.load(p, allow_pickle=False))
        if self_inf.shape != (n,):
            raise IndexLoadError(
                f"{lay.self_influence}: shape {self_inf.shape}, expected ({n},); "
                "rebuild it with `attribution index build … --overwrite`"
            )
    return Index(index_dir, manifest, fx, items, thumbs, att, spread, self_inf, load_rerank(lay, manifest))


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise IndexLoadError(
            f"{path}: unreadable or truncated FAISS file ({str(e).splitlines()[0][:120]}); "
            "rebuild it with `attribution index build … --overwrite`"
        ) from None


def _read_part(path: Path, read):
    try:
        return read(path)
    except Exception as e:  # safetensors raises several types on a damaged file
        raise IndexLoadError(
            f"{path}: unreadable ({e}); rebuild it with `attribution index build … --overwrite`"
        ) from None


def _query_attributor(lay: IndexLayout, manifest: dict, model, device) -> Attributor:
    """The query side of the index's method, from its saved parts: the projection, the curvature
    (whose (G+λ)^(−½) the query side carries when the sketch projects), the timestep density."""
    try:
        cfg = AttributionConfig(**manifest["method"])
    except (TypeError, ValueError) as e:
        raise IndexLoadError(
            f"{lay.manifest}: its method settings are not understood ({e}); "
            "rebuild it with `attribution index build … --overwrite`"
        ) from None
    projection = curvature = trak = density = None
    if cfg.spec.preconditioner != "pixel":
        projection = _read_part(lay.projection, Projection.load)
    if cfg.spec.needs_curvature and projection is not None and projection.is_sketch:
        curvature = _read_part(lay.curvature, Curvature.load)
    if cfg.spec.preconditioner == "trak" and lay.trak.exists():
        trak = _read_part(lay.trak, lambda p: load_file(str(p))["trak_inverse"])
    if cfg.importance and cfg.spec.preconditioner != "pixel":  # pixel similarity draws nothing
        density = _read_part(lay.density, lambda p: load_file(str(p))["density"])
    return Attributor.from_parts(
        model, manifest["data"]["n"], cfg, curvature, projection, trak, density, device=device
    )
