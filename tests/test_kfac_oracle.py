"""K-FAC factors against an independent implementation: curvlinops' `KFACLinearOperator`.

The same rows (x_t, t, y) go to both: the engine's `fit_curvature` and curvlinops on a wrapper
whose forward is x_t -> ε̂(x_t, t).flatten(1) with the rows' timesteps fixed, and whose loss is
`nn.MSELoss(reduction="mean")` against y.

Convention mapping (curvlinops 3.x, read from `curvlinops/kfac.py`, `kfac_utils.py`):

- Output (R, d) with d = pixels: R data points, one loss term each (`num_per_example_loss_terms`
  = 1). Mean-reduced MSE is (1/(R·d)) Σ (ε̂ − y)², i.e. the mean over rows of our ℓ_r (w = 1).
- Input factor: expand Σ_{r,p} a aᵀ / (R·P); reduce Σ_r ā āᵀ / R (ā = mean_p a); the bias is a
  constant-1 *last* input (separate_weight_and_bias=False). Identical to ours.
- type-2: the per-datum Hessian square root of mean-MSE is √(2/d)·I, scaled by 1/R for the batch
  mean, and the gradient covariance is multiplied back by R²/R: S = (1/R) Σ_{r,j,p} g gᵀ with g
  back-propagated from √(2/d)·e_j, our ggn="exact" exactly (reduce: Σ_p g first, as ours).
- empirical: curvlinops multiplies the mean-MSE loss by √d (so that for MSE its empirical and MC
  Fishers share the scale of the type-2 one), so its cotangent is √d·(2/(R·d))(ε̂ − y) and its
  S is d × ours (ours back-propagates (2/d)(ε̂ − y), the literal gradient of ℓ_r). We compare
  S_ours = S_curvlinops / d; A is unchanged.

Everything runs in float64 (the engine stores float32 factors, so agreement is ~1e-7).
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

from attribution.capture import tracked_layers
from attribution.curvature import CurvatureConfig, fit_curvature
from attribution.data import mnist
from attribution.measurements import Measurement
from attribution.model import build_model

RTOL = 1e-4
N_IMAGES, DRAWS = 2, 2


class FixedTimestep(nn.Module):
    """x_t (R, C, H, W) -> ε̂ (R, C·H·W) at the rows' fixed timesteps (one batch)."""

    def __init__(self, unet: nn.Module, t: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.t).sample.flatten(1)


@pytest.fixture(scope="module")
def double_model():
    model = build_model("tiny", seed=0)
    model.unet.double()
    images = mnist(size=8, n=N_IMAGES).images.double()
    return model, images


def curvlinops_factors(model, images, cfg: CurvatureConfig, fisher_type: str):
    """curvlinops' (A, S) per tracked layer (by our module names), on the engine's rows."""
    keys = list(range(images.shape[0]))
    rows = Measurement("loss").rows(
        images, keys, cfg.draws, cfg.seed, model.alphas_cumprod(), stratified=cfg.stratified
    )
    assert rows.x.dtype == torch.float64
    wrapper = FixedTimestep(model.unet, rows.t)
    layers = tracked_layers(model.unet)
    params = [p for m in layers.values() for p in m.parameters()]
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        op = KFACLinearOperator(
            wrapper,
            nn.MSELoss(reduction="mean"),
            params,
            [(rows.x, rows.y.flatten(1).double())],
            fisher_type=fisher_type,
            kfac_approx=cfg.sharing,
            separate_weight_and_bias=False,
            check_deterministic=False,
            num_data=rows.x.shape[0],
            num_per_example_loss_terms=1,
        )
        op.compute_kronecker_factors()
    finally:
        for p, r in zip(params, old):
            p.requires_grad_(r)
    d = rows.x[0].numel()
    out = {}
    for name in layers:
        a = op._input_covariances[f"unet.{name}"]
        s = op._gradient_covariances[f"unet.{name}"]
        if fisher_type == "empirical":
            s = s / d
        out[name] = (a, s)
    return out


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("ggn,fisher_type", [("exact", "type-2"), ("loss", "empirical")])
def test_kfac_factors_match_curvlinops(double_model, sharing, ggn, fisher_type):
    model, images = double_model
    cfg = CurvatureConfig(kind="kfac", ggn=ggn, sharing=sharing, draws=DRAWS, seed=0)
    # two batches of one image on our side, one batch of all rows on curvlinops' side
    ours = fit_curvature(model, images, None, cfg, batch_size=1, progress=False)
    theirs = curvlinops_factors(model, images, cfg, fisher_type)
    names = list(tracked_layers(model.unet))
    assert sorted(names) == ours.layer_names
    kinds = sum(isinstance(m, nn.Conv2d) for m in tracked_layers(model.unet).values())
    assert kinds > 0 and any(".to_q" in n for n in names)  # convs and attention both covered
    # An absolute floor far below every real entry: in reduce, S of attention keys is exactly 0
    # (softmax is shift-invariant, so Σ_p ∂/∂k_p = 0) and both sides hold round-off (~1e-35).
    floor = {i: 1e-12 * max(theirs[n][i].abs().max().item() for n in names) for i in (0, 1)}
    worst = 0.0
    for name in names:
        for i, (mine, ref) in enumerate(zip(ours.factors(name), theirs[name])):
            assert mine.shape == ref.shape, name
            torch.testing.assert_close(
                mine.double(), ref, rtol=RTOL, atol=floor[i], msg=lambda m, n=name, i=i: f"{n} {'AS'[i]}: {m}"
            )
            big = ref.abs() > 1e6 * floor[i]
            if big.any():
                worst = max(worst, ((mine.double() - ref).abs()[big] / ref.abs()[big]).max().item())
    assert worst < RTOL
    print(f"{ggn}/{sharing}: max elementwise relative error {worst:.2e}")
