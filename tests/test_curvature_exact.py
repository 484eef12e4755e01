"""K-FAC and EK-FAC against the exact per-layer GGN block of a tiny U-Net.

The exact block is formed independently of the engine's capture: for every row (example, draw)
and every output cotangent c, torch.autograd.grad gives the gradient of ⟨ε̂, c⟩ with respect to
the layer's weight and bias; flattened as W (O, I') row-major with the bias as last column,
the block is the mean over rows of Σ_c vec vecᵀ. The cotangents are the ones that define the
matrix both approximations are fitted to:

    ggn="exact"  all d columns √(2/d)·e_j   -> (1/R) Σ_r J_rᵀ (2/d) J_r   (deterministic GGN)
    ggn="loss"   the residual (2/d)(ε̂ − y) -> (1/R) Σ_r ∇ℓ_r ∇ℓ_rᵀ      (empirical Fisher)

EK-FAC's refitted eigenvalues are the Frobenius-optimal diagonal, in K-FAC's eigenbasis, of the
very same matrix, so its error can never exceed K-FAC's. A Linear layer whose input is one
vector per row (the time embedding and every `time_emb_proj`) has no weight sharing, and with
a single row both approximations are exact there.
"""

from __future__ import annotations

import pytest
import torch

from attribution.capture import tracked_layers
from attribution.curvature import CurvatureConfig, fit_curvature
from attribution.data import mnist
from attribution.features import FeatureMap, model_layer_shapes
from attribution.measurements import Measurement
from attribution.model import build_model
from attribution.projection import make_projection

GGNS = ("exact", "loss")
DAMPING = 1e-2  # relative; for the inverse checks (a dense float32 matrix cannot resolve 1e-8)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def no_sharing(names) -> list[str]:
    """Linear layers that see one input vector per row (P = 1)."""
    out = [n for n in names if n.startswith("time_embedding.") or n.endswith(".time_emb_proj")]
    assert len(out) >= 4
    return out


def exact_blocks(model, images: torch.Tensor, draws: int, seed: int, ggn: str) -> dict[str, torch.Tensor]:
    """The exact per-layer GGN (or empirical-Fisher) block, (O·I')² in float64, by plain autograd."""
    rows = Measurement("loss").rows(images, list(range(images.shape[0])), draws, seed, model.alphas_cumprod())
    unet = model.unet
    layers = tracked_layers(unet)
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    vecs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    old = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True)
    try:
        n_rows = rows.x.shape[0]
        for r in range(n_rows):
            out = unet(rows.x[r : r + 1], rows.t[r : r + 1]).sample
            d = out.numel()
            if ggn == "exact":
                cots = list((2 / d) ** 0.5 * torch.eye(d).view(d, *out.shape))
            else:
                cots = [(2 / d) * (out.detach() - rows.y[r : r + 1])]
            for j, c in enumerate(cots):
                grads = iter(torch.autograd.grad(out, params, grad_outputs=c, retain_graph=j < len(cots) - 1))
                for name, m in layers.items():
                    gw = next(grads).reshape(m.weight.shape[0], -1)
                    if m.bias is not None:
                        gw = torch.cat([gw, next(grads)[:, None]], dim=1)
                    vecs[name].append(gw.reshape(-1).double())
    finally:
        for p, o in zip(unet.parameters(), old):
            p.requires_grad_(o)
    return {n: torch.stack(v).T @ torch.stack(v) / n_rows for n, v in vecs.items()}


def fits(model, images, draws, ggn, damping=DAMPING):
    cfgs = {
        k: CurvatureConfig(kind=k, ggn=ggn, sharing="expand", draws=draws, seed=0, damping=damping)
        for k in ("kfac", "ekfac")
    }
    return {k: fit_curvature(model, images, None, c, progress=False) for k, c in cfgs.items()}


@pytest.fixture(scope="module", params=GGNS)
def several_rows(request, model):
    """2 images × 2 draws: the exact blocks and both fitted approximations."""
    images = mnist(size=8, n=2).images
    return (
        request.param,
        exact_blocks(model, images, 2, 0, request.param),
        fits(model, images, 2, request.param),
    )


@pytest.fixture(scope="module", params=GGNS)
def one_row(request, model):
    """1 image × 1 draw."""
    images = mnist(size=8, n=1).images
    return (
        request.param,
        exact_blocks(model, images, 1, 0, request.param),
        fits(model, images, 1, request.param),
    )


def frob(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b).norm().item()


def test_ekfac_frobenius_error_at_most_kfac_on_every_layer(several_rows):
    ggn, blocks, curv = several_rows
    assert set(blocks) == set(curv["kfac"].layer_names) == set(curv["ekfac"].layer_names)
    ratios = []
    for name, block in blocks.items():
        nb = block.norm().item()
        assert nb > 0, name
        e_kfac = frob(curv["kfac"].dense(name), block)
        e_ekfac = frob(curv["ekfac"].dense(name), block)
        assert e_ekfac <= e_kfac + 1e-6 * nb, f"{name}: EK-FAC {e_ekfac / nb:.4f} > K-FAC {e_kfac / nb:.4f}"
        ratios.append((e_ekfac / nb, e_kfac / nb))
    mean_e = sum(r[0] for r in ratios) / len(ratios)
    mean_k = sum(r[1] for r in ratios) / len(ratios)
    assert mean_e < 0.9 * mean_k  # and strictly better overall: the check is not vacuous
    print(f"{ggn}: mean relative Frobenius error EK-FAC {mean_e:.3f}, K-FAC {mean_k:.3f}")


def test_single_row_no_sharing_layers_are_exact(one_row):
    ggn, blocks, curv = one_row
    names = no_sharing(blocks)
    worst = 0.0
    for name in names:
        nb = blocks[name].norm().item()
        for kind in ("kfac", "ekfac"):
            err = frob(curv[kind].dense(name), blocks[name]) / nb
            assert err < 1e-5, f"{kind} {name}: relative error {err:.2e}"
            worst = max(worst, err)
    # ... whereas a layer with weight sharing is not (so the check can fail)
    assert frob(curv["kfac"].dense("conv_in"), blocks["conv_in"]) > 1e-2 * blocks["conv_in"].norm().item()
    print(f"{ggn}: worst relative error on {len(names)} unshared layers {worst:.1e}")


def preconditioned(curv, pre: str, name: str, shape, seed: int = 0):
    """Precond(G) through FeatureMap (unprojected) and the G = Σ_p g aᵀ it was given."""
    o, i = shape
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 16, i, generator=g_)
    g = torch.randn(1, 16, o, generator=g_)
    fmap = FeatureMap({name: shape}, make_projection({name: shape}, None), pre, curv)
    return fmap.layer(name, a, g, 1).view(o, i).double(), (g[0].T @ a[0]).double()


def damped_solve(matrix: torch.Tensor, lam: float, v: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return torch.linalg.solve(
        matrix.double() + lam * torch.eye(n, dtype=torch.float64), v.reshape(-1)
    ).view_as(v)


@pytest.mark.parametrize("kind,pre", [("kfac", "kfac-exact"), ("ekfac", "ekfac")])
def test_inverse_vector_products_match_dense_solve(several_rows, model, kind, pre):
    _, _, curv = several_rows
    c = curv[kind]
    worst = 0.0
    for idx, (name, shape) in enumerate(model_layer_shapes(model.unet).items()):
        got, v = preconditioned(c, pre, name, shape, seed=idx)
        want = damped_solve(c.dense(name), c.damping(name), v)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-3, f"{pre} {name}: relative error {err:.2e}"
        worst = max(worst, err)
    print(f"{pre}: worst relative error vs dense solve {worst:.1e}")


@pytest.mark.parametrize(
    "kind,pre,damping,tol",
    [
        ("kfac", "kfac-exact", DAMPING, 1e-4),
        ("ekfac", "ekfac", DAMPING, 1e-4),
        ("ekfac", "ekfac", 1e-8, 1e-4),
    ],
)
def test_inverse_vector_products_match_exact_block(one_row, model, kind, pre, damping, tol):
    """Unshared layers, one row: Precond(G) = (exact block + λI)⁻¹ vec G."""
    ggn, blocks, curv = one_row
    c = curv[kind] if damping == DAMPING else fits(model, mnist(size=8, n=1).images, 1, ggn, damping)[kind]
    shapes = model_layer_shapes(model.unet)
    worst = 0.0
    for idx, name in enumerate(no_sharing(blocks)):
        got, v = preconditioned(c, pre, name, shapes[name], seed=idx)
        want = damped_solve(blocks[name], c.damping(name), v)
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, f"{pre} {name}: relative error {err:.2e}"
        worst = max(worst, err)
    print(f"{ggn} {pre} damping {damping:g}: worst relative error vs exact solve {worst:.1e}")
