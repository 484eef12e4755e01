"""Per-example gradient features: capture vs autograd, K-FAC fast path vs materialised, projection.

- Unprojected identity features are the per-example gradients of the mean-over-draws loss, for
  every tracked layer, as plain autograd on the parameters computes them.
- The K-FAC fast path (factored damping folded into the projections, G never formed) equals
  P_out (S + δ_S I)⁻¹ G (A + δ_A I)⁻¹ P_inᵀ formed densely from the explicit gradient G.
- Projected scores are unbiased: their mean over many projection seeds approaches the
  unprojected score, and more seeds get closer.
"""

from __future__ import annotations

import pytest
import torch

from attribution.capture import forward, grad_enabled_params, tracked_layers
from attribution.curvature import CurvatureConfig, fit_curvature
from attribution.data import mnist
from attribution.features import FeatureMap, example_cotangent, gradient_features, model_layer_shapes
from attribution.influence import QUERY_KEY, AttributionConfig, Attributor
from attribution.measurements import Measurement
from attribution.model import build_model
from attribution.projection import make_projection


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def shapes(model):
    return model_layer_shapes(model.unet)


def split_layers(f: torch.Tensor, dims: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """(N, D) features -> per layer (N, k_o, k_i)."""
    out, off = {}, 0
    for name, (ko, ki) in dims.items():
        out[name] = f[:, off : off + ko * ki].reshape(-1, ko, ki)
        off += ko * ki
    assert off == f.shape[1]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ capture vs plain autograd


def autograd_gradients(model, images, keys, meas: Measurement, draws: int, seed: int) -> torch.Tensor:
    """Per-example ∇_θ (1/K) Σ_k w·mean_pixels(ε̂ − y)², tracked layers only, (O, I') row-major."""
    unet = model.unet
    layers = tracked_layers(unet)
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    old = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(True)
    out = []
    try:
        for n in range(images.shape[0]):
            rows = meas.rows(images[n : n + 1], [keys[n]], draws, seed, model.alphas_cumprod())
            eps_hat = unet(rows.x, rows.t).sample
            loss = (rows.w * (eps_hat - rows.y).pow(2).flatten(1).mean(1)).mean()
            grads = iter(torch.autograd.grad(loss, params))
            parts = []
            for m in layers.values():
                gw = next(grads).reshape(m.weight.shape[0], -1)
                if m.bias is not None:
                    gw = torch.cat([gw, next(grads)[:, None]], dim=1)
                parts.append(gw.reshape(-1))
            out.append(torch.cat(parts))
    finally:
        for p, o in zip(unet.parameters(), old):
            p.requires_grad_(o)
    return torch.stack(out)


@pytest.mark.parametrize("measurement", ["loss", "elbo", "square_norm"])
def test_unprojected_features_are_autograd_gradients(model, shapes, measurement):
    images = mnist(size=8, n=3).images
    keys, draws, seed = [5, 7, 9], 3, 1
    meas = Measurement(measurement)
    fmap = FeatureMap(shapes, make_projection(shapes, None), "identity")
    feats = gradient_features(model, fmap, images, keys, meas, draws, seed, batch_size=2, progress=False)
    ref = autograd_gradients(model, images, keys, meas, draws, seed)
    assert feats.shape == ref.shape == (3, sum(o * i for o, i in shapes.values()))
    got, want = split_layers(feats, shapes), split_layers(ref, shapes)
    worst = 0.0
    for name in shapes:
        assert want[name].norm() > 0, name
        err = rel(got[name], want[name])
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
        worst = max(worst, err)
    gram, gram_ref = feats.double() @ feats.double().T, ref.double() @ ref.double().T
    assert rel(gram, gram_ref) < 1e-6
    print(f"{measurement}: worst per-layer relative error {worst:.1e}, Gram {rel(gram, gram_ref):.1e}")


def test_many_draws_batch_fewer_images_and_give_the_same_features(model, shapes):
    """Draws × images per forward are capped (`images_per_batch`): 5 images × 256 draws run 2 at a
    time, and give each image the features it gets alone (draws are seeded by the image's key)."""
    from attribution.features import MAX_ROWS, images_per_batch

    assert images_per_batch(32, 16) == 32 and images_per_batch(32, 256) == MAX_ROWS // 256 == 2
    assert images_per_batch(32, 4096) == 1
    images = mnist(size=8, n=5).images
    keys, meas = [3, 1, 4, 1, 5], Measurement("loss")
    fmap = FeatureMap(shapes, make_projection(shapes, None), "identity")
    together = gradient_features(model, fmap, images, keys, meas, 256, 0, batch_size=32, progress=False)
    alone = torch.cat(
        [
            gradient_features(model, fmap, images[i : i + 1], keys[i : i + 1], meas, 256, 0, progress=False)
            for i in range(5)
        ]
    )
    assert rel(together, alone) < 1e-5


# ------------------------------------------------------------------ K-FAC fast path

DIM = 4096  # of 11,301 numbers: some layers unprojected, some on one side, some on both


@pytest.mark.parametrize("damping,layer_tol,total_tol", [(1e-2, 1e-5, 1e-5), (1e-8, 5e-2, 1e-3)])
def test_kfac_fast_path_equals_materialised(model, shapes, damping, layer_tol, total_tol):
    """Fast path vs S̃⁻¹ G Ã⁻¹ formed densely in float64 from the explicit G, same P_out, P_in.

    At the default damping (1e-8, so δ = 1e-4 × mean eigenvalue per factor) the damped factors of
    the rank-deficient time_emb_proj inputs (16 rows, 17 inputs) have condition numbers ~1e5 and
    the two float32 paths round differently: per-layer agreement is then ~1e-2, overall ~1e-4.
    """
    images = mnist(size=8, n=8).images
    curv = fit_curvature(
        model, images, None, CurvatureConfig(kind="kfac", draws=2, damping=damping), progress=False
    )
    proj = make_projection(shapes, DIM, seed=3, kind="kronecker")
    sides = [(proj.p_out(n) is not None) + (proj.p_in(n) is not None) for n in shapes]
    assert {0, 1, 2} <= set(sides)  # unprojected, one-sided and two-sided layers all occur
    keys, meas = [0, 1, 2, 3], Measurement("loss")
    fast = gradient_features(
        model, FeatureMap(shapes, proj, "kfac", curv), images[:4], keys, meas, 4, 0, progress=False
    )
    plain = gradient_features(
        model,
        FeatureMap(shapes, make_projection(shapes, None), "identity"),
        images[:4],
        keys,
        meas,
        4,
        0,
        progress=False,
    )
    grads = split_layers(plain, shapes)
    mats = {}
    for name, (o, i) in shapes.items():
        a_mat, s_mat = curv.factors(name)
        da, ds = curv.factored_damping(name)
        a_inv = torch.linalg.inv(a_mat.double() + da * torch.eye(i, dtype=torch.float64))
        s_inv = torch.linalg.inv(s_mat.double() + ds * torch.eye(o, dtype=torch.float64))
        x = s_inv @ grads[name].double() @ a_inv
        if proj.p_out(name) is not None:
            x = proj.p_out(name).double() @ x
        if proj.p_in(name) is not None:
            x = x @ proj.p_in(name).double().T
        mats[name] = x
    got = split_layers(fast, proj.dims)
    errs = {name: rel(got[name], mats[name]) for name in shapes}
    worst = max(errs, key=errs.get)
    assert errs[worst] < layer_tol, f"{worst}: relative error {errs[worst]:.2e}"
    total = rel(fast, torch.cat([mats[n].flatten(1) for n in shapes], dim=1))
    assert total < total_tol
    print(f"damping {damping:g}: worst layer {errs[worst]:.1e} ({worst}), all layers {total:.1e}")


# ------------------------------------------------------------------ projection is unbiased

SEEDS = 64


def captured(model, images, keys, meas: Measurement, draws: int, seed: int):
    """(a, g) of every layer for the per-example cotangent, as gradient_features captures them."""
    rows = meas.rows(images, keys, draws, seed, model.alphas_cumprod())
    with grad_enabled_params(model.unet):
        out, rec = forward(model.unet, tracked_layers(model.unet), rows.x, rows.t)
        return {n: (a, g) for n, a, g in rec.backward(out, example_cotangent(out, rows))}


def features(fmap: FeatureMap, cap: dict, b: int) -> torch.Tensor:
    return fmap.combine([fmap.layer(n, *cap[n], b) for n in fmap.names])


@pytest.fixture(scope="module")
def attribution_data():
    ds = mnist(size=8, n=10)
    return ds.subset(range(6)), ds.images[6:10]


@pytest.mark.parametrize(
    "method,kind,tol64",
    [
        ("kfac", "kronecker", 0.05),
        ("ekfac", "kronecker", 0.2),
        ("ekfac", "sketch", 0.05),
        ("gradsim", "sketch", 0.05),
    ],
)
def test_projected_scores_are_unbiased(model, shapes, attribution_data, method, kind, tol64):
    """Over 64 projection seeds the mean projected score approaches the unprojected one.

    The sketch splits the preconditioner, ψ = P (G+λ)^(−½) ∇m, so a second pair of feature maps
    (on the query side too) goes through the public Attributor.feature_map.
    """
    train, queries = attribution_data
    cfg = AttributionConfig(
        method=method,
        dim=None,
        draws=2,
        query_draws=4,
        curvature_draws=2,
        antithetic=False,
        importance=False,  # the rows `captured` draws below
        damping=1e-2,
        seed=0,
        projection=kind,
    )
    exact_att = Attributor(model, train, cfg, progress=False).fit()
    exact = exact_att.scores(queries)
    assert exact.abs().min() > 0
    # the engine's gradients once; each seed's FeatureMaps project them
    q_cap = captured(
        model, queries, [QUERY_KEY] * len(queries), Measurement("loss"), cfg.query_draws, cfg.seed
    )
    t_cap = captured(model, train.images, list(range(len(train))), Measurement("loss"), cfg.draws, cfg.seed)
    scores = []
    for seed in range(1, SEEDS + 1):
        proj = make_projection(shapes, DIM, seed=seed, kind=kind)
        att = Attributor(
            model, train, AttributionConfig(**{**cfg.to_dict(), "dim": DIM}), progress=False
        ).fit(curvature=exact_att.curvature, projection=proj)
        q_map, t_map = att.feature_map("query"), att.feature_map("train")
        assert att.split == (kind == "sketch")
        scores.append(features(q_map, q_cap, len(queries)) @ features(t_map, t_cap, len(train)).T)
        if seed == 1:  # the same numbers as the public scoring path with that projection
            torch.testing.assert_close(
                att.scores(queries), scores[0], rtol=1e-4, atol=1e-6 * exact.abs().max()
            )
    s = torch.stack(scores)
    assert proj.total <= DIM < sum(o * i for o, i in shapes.values())
    err1 = sum(rel(x, exact) for x in s) / SEEDS
    err8 = sum(rel(s[k : k + 8].mean(0), exact) for k in range(0, SEEDS, 8)) / (SEEDS // 8)
    err64 = rel(s.mean(0), exact)
    z = ((s.mean(0) - exact) / (s.std(0) / SEEDS**0.5)).abs().max().item()
    print(
        f"{method}: mean relative error of 1 seed {err1:.3f}, of 8-seed means {err8:.3f}, "
        f"of the 64-seed mean {err64:.3f}; max |z| over {exact.numel()} pairs {z:.2f}"
    )
    assert err64 < tol64
    assert err64 < 0.6 * err8 < 0.6 * err1  # shrinking with more seeds (≈ 1/√n: 0.35 per 8×)
    assert z < 4.0  # no pair's mean is significantly off: unbiased


def test_sketch_is_more_faithful_than_kronecker(model, shapes, attribution_data):
    """At the same budget the count sketch (split preconditioner) tracks the unprojected EK-FAC
    scores far better than the Kronecker projection (preconditioner on the training side only)."""
    train, queries = attribution_data
    base = dict(method="ekfac", draws=2, query_draws=4, curvature_draws=2, seed=0)
    exact_att = Attributor(model, train, AttributionConfig(**base, dim=None), progress=False).fit()
    exact = exact_att.scores(queries)
    errs = {}
    for kind in ("sketch", "kronecker"):
        cfg = AttributionConfig(**base, dim=1024, projection=kind)
        errs[kind] = (
            sum(
                rel(
                    Attributor(model, train, cfg, progress=False)
                    .fit(
                        curvature=exact_att.curvature,
                        projection=make_projection(shapes, 1024, seed=s, kind=kind),
                    )
                    .scores(queries),
                    exact,
                )
                for s in range(1, 9)
            )
            / 8
        )
    print(f"mean relative error at D=1024: sketch {errs['sketch']:.3f}, Kronecker {errs['kronecker']:.3f}")
    assert errs["sketch"] < 0.5 * errs["kronecker"]
