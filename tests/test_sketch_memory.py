"""The count sketch keeps no per-parameter table (issue 19).

- It is a count sketch: every coordinate lands in exactly one bucket with a sign ±1, and hashing a
  layer in blocks of rows gives the same map as hashing it at once.
- Inner products are unbiased, with the variance of a count sketch with independent buckets and
  signs, also on rank-one gradients (where a product sign s₁(o)s₂(i) would add variance).
- What the sketch holds at D = 131072 does not grow with the parameter count: compared on two real
  model sizes (0.7M and 35.7M parameters), and its scratch memory is bounded by a block size, not
  by the layer.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attribution import projection as pj
from attribution.features import FeatureMap, model_layer_shapes
from attribution.model import build_model
from attribution.projection import Projection, make_sketch, sketch_add


def words(o: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 1 << 32, (n,), generator=g, dtype=torch.int64) for n in (o, i))


def sketch_matrix(o: int, i: int, d: int, seed: int) -> torch.Tensor:
    """The (D, O·I') matrix of the sketch: the sketch of every unit vector."""
    r, c = words(o, i, seed)
    eye = torch.eye(o * i, dtype=torch.float64).reshape(o * i, o, i)
    return sketch_add(torch.zeros(o * i, d, dtype=torch.float64), eye, r, c).T


def test_every_coordinate_goes_to_one_bucket_with_a_sign(monkeypatch):
    s = sketch_matrix(7, 13, 32, seed=1)
    assert ((s != 0).sum(0) == 1).all() and set(s.unique().tolist()) == {-1.0, 0.0, 1.0}
    monkeypatch.setattr(pj, "CHUNK", 20)  # blocks of one row of 13 coordinates
    assert torch.equal(sketch_matrix(7, 13, 32, seed=1), s)
    assert not torch.equal(sketch_matrix(7, 13, 32, seed=2), s)
    s = sketch_matrix(7, 13, 30, seed=1)  # D not a power of two
    assert ((s != 0).sum(0) == 1).all() and (s != 0).any(1).sum() > 25


def count_sketch_variance(x: torch.Tensor, y: torch.Tensor, d: int) -> float:
    """Var⟨Px, Py⟩ of a count sketch with independent uniform buckets and independent signs."""
    x, y = x.flatten().double(), y.flatten().double()
    diag = (x * x * y * y).sum()
    return float(((x @ x) * (y @ y) - diag + (x @ y) ** 2 - diag) / d)


@pytest.mark.parametrize("rank", [1, 12])
def test_inner_products_are_unbiased_with_count_sketch_variance(rank):
    """Over 2,000 seeds at D = 16: the mean of ⟨Px, Py⟩ is ⟨x, y⟩ within 4 standard errors and
    its variance is that of a count sketch; x = U Aᵀ, y = U Bᵀ share their left factor (gradients
    of one example's rows share cotangent directions), the worst case for a product sign."""
    g = torch.Generator().manual_seed(0)
    o, i, d, seeds = 12, 20, 16, 2000
    u = torch.randn(o, rank, generator=g, dtype=torch.float64)
    x = u @ torch.randn(rank, i, generator=g, dtype=torch.float64)
    y = u @ torch.randn(rank, i, generator=g, dtype=torch.float64)
    est = []
    for s in range(seeds):
        r, c = words(o, i, 100 + s)
        p = sketch_add(torch.zeros(2, d, dtype=torch.float64), torch.stack([x, y]), r, c)
        est.append(float(p[0] @ p[1]))
    est = torch.tensor(est, dtype=torch.float64)
    var = count_sketch_variance(x, y, d)
    exact = float((x * y).sum())
    assert abs(est.mean() - exact) < 4 * (var / seeds) ** 0.5
    assert 0.8 < est.var() / var < 1.25, (float(est.var()), var)


def held_bytes(preset: str, d: int) -> tuple[int, int, int, int]:
    """(parameters of the tracked layers, Σ (O + I'), bytes of the projection's tensors, bytes of
    a sketch feature map's own tensors) for a freshly built model of `preset`."""
    shapes = model_layer_shapes(build_model(preset, seed=0).unet)
    proj = make_sketch(shapes, d, seed=0)
    fmap = FeatureMap(shapes, proj, "identity")  # no factors: every tensor it holds is the sketch's
    nbytes = sum(t.numel() * t.element_size() for t in proj.mats.values())
    fbytes = sum(t.numel() * t.element_size() for op in fmap.ops.values() for t in op)
    return sum(o * i for o, i in shapes.values()), sum(o + i for o, i in shapes.values()), nbytes, fbytes


def test_sketch_memory_does_not_grow_with_parameters(tmp_path):
    """At D = 131072, on the 0.7M-parameter default and the 35.7M-parameter CIFAR-10 DDPM: the
    sketch holds 8 bytes per row and column of each layer and nothing per parameter (the
    per-parameter tables took 5 bytes per parameter on disk and 12 in memory)."""
    small, big = held_bytes("mnist", 1 << 17), held_bytes("cifar-ddpm", 1 << 17)
    assert big[0] > 40 * small[0]
    for params, sides, nbytes, fbytes in (small, big):
        assert nbytes == fbytes == 8 * sides
        assert nbytes < params / 4  # 12 bytes per parameter before
    # growth with the model: the rows and columns, ≈ √(parameters), not the parameters
    assert big[2] / small[2] < 0.25 * big[0] / small[0]
    shapes = model_layer_shapes(build_model("cifar-ddpm", seed=0).unet)
    make_sketch(shapes, 1 << 17, seed=0).save(tmp_path / "p.safetensors")
    assert (tmp_path / "p.safetensors").stat().st_size < 0.05 * big[0]
    assert Projection.load(tmp_path / "p.safetensors").sketch(next(iter(shapes)))[0].numel() > 0


class LargestNew(TorchDispatchMode):
    """The largest tensor an operation returns that is not one of `keep` (modified in place)."""

    def __init__(self, keep: list[torch.Tensor]):
        super().__init__()
        self.keep = {t.untyped_storage().data_ptr() for t in keep}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.keep:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_sketch_scratch_is_bounded_by_a_block_not_by_the_layer():
    """Sketching a 16M-coordinate layer allocates no more scratch than a 1M-coordinate one."""
    into = torch.zeros(2, 1 << 17)
    largest = {}
    for o in (256, 4096):
        x = torch.randn(2, o, 4096)
        r, c = words(o, 4096, 0)
        with LargestNew([into, x, r, c]) as m:
            sketch_add(into, x, r, c)
        largest[o] = m.largest
    assert largest[4096] <= largest[256] <= 8 * pj.CHUNK
    assert largest[4096] < x.numel() * x.element_size() / 8


def test_a_projection_with_per_parameter_tables_is_refused(tmp_path):
    """A projection file written before issue 19 (bucket and sign per parameter) is not read as
    if its sketch were the same map."""
    from safetensors.torch import save_file

    from attribution.errors import IndexLoadError

    meta = {"shapes": '{"l": [2, 3]}', "dims": '{"l": [2, 3]}', "seed": "0", "kind": "sketch", "size": "4"}
    tables = {"l.bucket": torch.zeros(2, 3, dtype=torch.int32), "l.sign": torch.ones(2, 3, dtype=torch.int8)}
    save_file(tables, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(IndexLoadError, match="rebuild"):
        Projection.load(tmp_path / "old.safetensors")
