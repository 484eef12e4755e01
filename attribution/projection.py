"""Kronecker random projections of per-layer gradients.

For a layer gradient G (O × I') the feature is vec(P_out G P_inᵀ) with P_out (k_o × O) and
P_in (k_i × I') Gaussian, entries N(0, 1/k), so E[PᵀP] = I and inner products of features are
unbiased estimates of inner products of gradients. Where k ≥ the dimension the side is not
projected at all (identity, exact). The matrices are stored, never re-derived.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attribution.train import hash_seed


def split_budget(shapes: dict[str, tuple[int, int]], total: int | None) -> dict[str, tuple[int, int]]:
    """Per-layer (k_o, k_i): the largest common side s with Σ min(O, s)·min(I', s) ≤ total.

    `total` None (or ≥ the number of parameters) leaves every layer unprojected.
    """
    full = {n: (o, i) for n, (o, i) in shapes.items()}
    if total is None or total >= sum(o * i for o, i in shapes.values()):
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


@dataclass
class Projection:
    """Per-layer P_out (k_o × O) and P_in (k_i × I'); a missing matrix means identity."""

    shapes: dict[str, tuple[int, int]]
    dims: dict[str, tuple[int, int]]
    mats: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0

    @property
    def total(self) -> int:
        return sum(ko * ki for ko, ki in self.dims.values())

    @property
    def is_identity(self) -> bool:
        return not self.mats

    def p_out(self, name: str) -> torch.Tensor | None:
        return self.mats.get(f"{name}.P_out")

    def p_in(self, name: str) -> torch.Tensor | None:
        return self.mats.get(f"{name}.P_in")

    def save(self, path: str | Path) -> None:
        meta = {"shapes": json.dumps(self.shapes), "dims": json.dumps(self.dims), "seed": str(self.seed)}
        save_file({k: v.contiguous() for k, v in self.mats.items()} or {"_empty": torch.zeros(1)},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
            mats = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
        shapes = {k: tuple(v) for k, v in json.loads(md["shapes"]).items()}
        dims = {k: tuple(v) for k, v in json.loads(md["dims"]).items()}
        return cls(shapes, dims, mats, int(md["seed"]))


def make_projection(shapes: dict[str, tuple[int, int]], total: int | None, seed: int = 0) -> Projection:
    """Gaussian Kronecker projection with ≈ `total` numbers per example (None: no projection)."""
    dims = split_budget(shapes, total)
    mats = {}
    for idx, (name, (o, i)) in enumerate(shapes.items()):
        ko, ki = dims[name]
        g = torch.Generator().manual_seed(hash_seed(seed, 13, idx))
        if ko < o:
            mats[f"{name}.P_out"] = torch.randn(ko, o, generator=g) / ko ** 0.5
        if ki < i:
            mats[f"{name}.P_in"] = torch.randn(ki, i, generator=g) / ki ** 0.5
    return Projection(dict(shapes), dims, mats, seed)
