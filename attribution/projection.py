"""Random projections of per-layer gradients: a count sketch (default) or a Kronecker projection.

Both are linear maps P with E[PᵀP] = I, so inner products of features are unbiased estimates of
inner products of the (preconditioned) gradients. The random numbers are stored, never re-derived.

- ``sketch``: every coordinate (layer, o, i) of every layer's gradient G (O × I') is added, with
  a random sign, to one of D shared buckets (a count sketch of the whole gradient vector). Its
  inner-product error is that of a dense Gaussian projection to D numbers, ‖x‖‖y‖/√D, whatever
  the layer shapes; it needs G formed per example (the materialised path).
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
    Sketch: per-layer bucket (O, I') int32 in [0, size) and sign (O, I') int8."""

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
        """(bucket (O·I',) int64, sign (O·I',) float32) of a layer's flattened gradient."""
        return self.mats[f"{name}.bucket"].flatten().long(), self.mats[f"{name}.sign"].flatten().float()

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
    """Count sketch of the whole gradient vector into `total` buckets shared by all layers."""
    if _unprojected(shapes, total):
        return Projection(dict(shapes), dict(shapes), {}, seed, "sketch", 0)
    mats = {}
    for idx, (name, (o, i)) in enumerate(shapes.items()):
        g = generator(seed, SKETCH, idx)
        mats[f"{name}.bucket"] = torch.randint(0, total, (o, i), generator=g, dtype=torch.int32)
        mats[f"{name}.sign"] = (torch.randint(0, 2, (o, i), generator=g) * 2 - 1).to(torch.int8)
    return Projection(dict(shapes), dict(shapes), mats, seed, "sketch", total)
