"""Seeds: every random choice (draws, projections, subsets) is seeded by a tuple of integers.

A tuple starts with the user's seed and a *salt* that says which choice it seeds, then the
choice's own keys (an image, a layer, a step). The salts are named here; their values are part of
every stored index and ground truth (changing one changes the scores), so they never change.
"""

from __future__ import annotations

import torch

# ---- salts: (seed, SALT, *keys) -----------------------------------------------------------------
TRAIN_ORDER = 1  # training: the batch order of an epoch, keys (epoch,)
TRAIN_STEP = 2  # training: the timesteps and noise of a step, keys (step,)
DRAWS = 7  # measurements: the (t, ε) draws of one example, keys (example key,)
GGN_SAMPLES = 11  # curvature: the MC-GGN output samples of one example, keys (example key,)
KRONECKER_PROJECTION = 13  # projection: the Gaussian P_out, P_in of a layer, keys (layer index,)
CURVATURE_SUBSET = 17  # the seeded subset of training images the curvature is fitted on
SKETCH = 29  # projection: the count sketch's buckets and signs of a layer, keys (layer index,)
PROFILE_SUBSET = 31  # timesteps: the training images that measure the importance density
PROFILE_DRAWS = 37  # timesteps: the draws of those images (a seed of its own, not DRAWS')


def hash_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def generator(*keys: int) -> torch.Generator:
    """A CPU torch generator seeded by `hash_seed(*keys)`."""
    return torch.Generator().manual_seed(hash_seed(*keys))
