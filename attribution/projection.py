"""Random projections of per-layer gradients: a count sketch (default) or a Kronecker projection.

Both are linear maps P with E[PᵀP] = I, so inner products of features are unbiased estimates of
inner products of the (preconditioned) gradients. The random numbers are stored, never re-derived.

- ``sketch``: every coordinate (layer, o, i) of every layer's gradient G (O × I') is added, with
  a random sign, to one of D shared buckets (a count sketch of the whole gradient vector). Its
  inner-product error is that of a dense Gaussian projection to D numbers, ‖x‖‖y‖/√D, whatever
  the layer shapes; it needs G formed per example (the materialised path). No per-parameter table
  is kept (issue 19): each layer stores O + I' random 32-bit words r(o), c(i), and the bucket and
  sign of (o, i) are bits of h = mix(r(o) ⊕ c(i)), computed per batch (`sketch_add`). For distinct
  coordinates the words r(o) ⊕ c(i) are pairwise independent and uniform (o ≠ o': r(o) ⊕ r(o')
  is uniform; o = o', i ≠ i': c(i) ⊕ c(i') is), and `mix` is a bijection of 32-bit words, so the
  buckets collide with probability 1/D (D a power of two) and the signs are pairwise independent:
  E[⟨Px, Py⟩] = ⟨x, y⟩ exactly. The nonlinear mix breaks the rectangle correlations a product
  sign s₁(o)s₂(i) would have (tensor sketch), which add variance on low-rank gradients.
- ``kronecker``: vec(P_out G P_inᵀ) with P_out (k_o × O), P_in (k_i × I') Gaussian, entries
  N(0, 1/k); where k ≥ the dimension the side is identity. G is never formed (the K-FAC fast
  path), but the error of a product of two small projections is far larger than that of one
  projection of the same total size (see ARCHITECTURE.md, "Projection").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attribution.errors import IndexLoadError
from attribution.seeds import KRONECKER_PROJECTION, SKETCH, generator


def _unprojected(shapes: dict[str, tuple[int, int]], total: int | None) -> bool:
    """No projection: no budget, or one at least the number of parameters."""
    return total is None or total >= sum(o * i for o, i in shapes.values())


def split_budget(shapes: dict[str, tuple[int, int]], total: int | None) -> dict[str, tuple[int, int]]:
    """Per-layer (k_o, k_i): the largest common side s with Σ min(O, s)·min(I', s) ≤ total.

    `total` None (or ≥ the number of parameters) leaves every layer unprojected.
    """
    full = {n: (o, i) for n, (o, i) in shapes.items()}
    if _unprojected(shapes, total):
        return full

    def size(s: int) -> int:
        return sum(min(o, s) * min(i, s) for o, i in shapes.values())

    lo, hi = 1, max(max(o, i) for o, i in shapes.values())
    if size(lo) > total:
        raise ValueError(f"feature budget {total} is below one number per layer ({len(shapes)} layers)")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= total else (lo, mid - 1)
    return {n: (min(o, lo), min(i, lo)) for n, (o, i) in shapes.items()}


KINDS = ("sketch", "kronecker")


@dataclass
class Projection:
    """Kronecker: per-layer P_out (k_o × O), P_in (k_i × I'), a missing matrix means identity.
    Sketch: per-layer words r (O,) and c (I',), int64 in [0, 2³²): the bucket and sign of (o, i)
    are bits of mix(r(o) ⊕ c(i)) (`sketch_add`); nothing per parameter is stored."""

    shapes: dict[str, tuple[int, int]]
    dims: dict[str, tuple[int, int]]
    mats: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    kind: str = "kronecker"
    size: int = 0  # the sketch's number of buckets D

    @property
    def total(self) -> int:
        if self.is_sketch:
            return self.size
        return sum(ko * ki for ko, ki in self.dims.values())

    @property
    def is_sketch(self) -> bool:
        """A count sketch that actually projects (not the identity)."""
        return self.kind == "sketch" and not self.is_identity

    def sketch(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's words (r (O,), c (I',)) int64, for `sketch_add`."""
        return self.mats[f"{name}.sketch_out"], self.mats[f"{name}.sketch_in"]

    @property
    def is_identity(self) -> bool:
        return not self.mats

    def p_out(self, name: str) -> torch.Tensor | None:
        return self.mats.get(f"{name}.P_out")

    def p_in(self, name: str) -> torch.Tensor | None:
        return self.mats.get(f"{name}.P_in")

    def save(self, path: str | Path) -> None:
        meta = {
            "shapes": json.dumps(self.shapes),
            "dims": json.dumps(self.dims),
            "seed": str(self.seed),
            "kind": self.kind,
            "size": str(self.size),
        }
        save_file(
            {k: v.contiguous() for k, v in self.mats.items()} or {"_empty": torch.zeros(1)},
            str(path),
            metadata=meta,
        )

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
            mats = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
        if any(k.endswith(".bucket") for k in mats):
            raise IndexLoadError(
                f"{path}: a count sketch with per-parameter tables (before issue 19); this code "
                "derives buckets from per-layer words: rebuild the index with `attribution index build … --overwrite`"
            )
        shapes = {k: tuple(v) for k, v in json.loads(md["shapes"]).items()}
        dims = {k: tuple(v) for k, v in json.loads(md["dims"]).items()}
        return cls(shapes, dims, mats, int(md["seed"]), md.get("kind", "kronecker"), int(md.get("size", 0)))


def make_projection(
    shapes: dict[str, tuple[int, int]], total: int | None, seed: int = 0, kind: str = "sketch"
) -> Projection:
    """A projection to ≈ `total` numbers per example (None, or ≥ the parameter count: none)."""
    if kind not in KINDS:
        raise ValueError(f"unknown projection {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "sketch":
        return make_sketch(shapes, total, seed)
    dims = split_budget(shapes, total)
    mats = {}
    for idx, (name, (o, i)) in enumerate(shapes.items()):
        ko, ki = dims[name]
        g = generator(seed, KRONECKER_PROJECTION, idx)
        if ko < o:
            mats[f"{name}.P_out"] = torch.randn(ko, o, generator=g) / ko**0.5
        if ki < i:
            mats[f"{name}.P_in"] = torch.randn(ki, i, generator=g) / ki**0.5
    return Projection(dict(shapes), dims, mats, seed, "kronecker")


def make_sketch(shapes: dict[str, tuple[int, int]], total: int | None, seed: int = 0) -> Projection:
    """Count sketch of the whole gradient vector into `total` buckets shared by all layers: per
    layer, O + I' random 32-bit words seeded by (seed, SKETCH, layer index)."""
    if _unprojected(shapes, total):
        return Projection(dict(shapes), dict(shapes), {}, seed, "sketch", 0)
    if total > 1 << 31:
        raise ValueError(f"a count sketch has at most 2³¹ buckets, not {total}")
    mats = {}
    for idx, (name, (o, i)) in enumerate(shapes.items()):
        g = generator(seed, SKETCH, idx)
        mats[f"{name}.sketch_out"] = torch.randint(0, 1 << 32, (o,), generator=g, dtype=torch.int64)
        mats[f"{name}.sketch_in"] = torch.randint(0, 1 << 32, (i,), generator=g, dtype=torch.int64)
    return Projection(dict(shapes), dict(shapes), mats, seed, "sketch", total)


_M32 = 0xFFFFFFFF
# multipliers below 2³¹, so that a 32-bit word times one stays below 2⁶³ (no int64 overflow)
_MIX = (0x7FEB352D, 0x1B873593)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words held in int64 (xor-shift-multiply, after lowbias32), in place."""
    h ^= h >> 16
    h.mul_(_MIX[0]).bitwise_and_(_M32)
    h ^= h >> 15
    h.mul_(_MIX[1]).bitwise_and_(_M32)
    h ^= h >> 16
    return h


CHUNK = 1 << 20  # coordinates hashed at a time: the sketch's scratch memory is O(CHUNK), not O(layer)


def sketch_add(
    into: torch.Tensor, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """into (B, D) += alpha · count sketch of x (B, O, I'): coordinate (o, i) goes to bucket
    h mod D with sign ± by bit 31 of h = mix(r(o) ⊕ c(i)). Hashes a block of rows of x at a time."""
    size, (b, o, i) = into.shape[1], x.shape
    step = max(1, CHUNK // max(i, 1))
    for lo in range(0, o, step):
        h = _mix(r[lo : lo + step, None] ^ c[None, :])
        sign = (h >> 31).to(x.dtype).mul_(-2 * alpha).add_(alpha)  # ±alpha
        h &= 0x7FFFFFFF
        bucket = (h.bitwise_and_(size - 1) if size & (size - 1) == 0 else h.remainder_(size)).flatten()
        # alpha rides on the signs: index_add_ with alpha != 1 takes a scalar path ~18x slower on CPU
        into.index_add_(1, bucket, (x[:, lo : lo + step] * sign).reshape(b, -1))
    return into
