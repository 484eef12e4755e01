"""Seeds: every random choice (draws, projections, subsets) is seeded by a tuple of integers."""

from __future__ import annotations

import torch


def hash_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by `hash_seed(*keys)`."""
    return torch.Generator().manual_seed(hash_seed(*keys))
