"""K-FAC factors of a conditional denoiser against curvlinops' `KFACLinearOperator`.

A tiny `UNet2DConditionModel` with cross-attention (text states as keys and values: K-FAC
"expand" over the text tokens), a time embedding (Linear layers) and a class embedding
(`nn.Embedding`), v-prediction. The same rows (x_t, t, y, condition) go to the engine's
`fit_curvature` and to curvlinops on a wrapper whose forward is x_t -> f(x_t, t | c).flatten(1)
with the rows' timesteps and conditions fixed; the convention mapping is tests/test_kfac_oracle.py's.

curvlinops supports Linear and Conv2d only, so its model is a twin in which the class embedding
is what the engine says it is: a bias-free Linear applied to the one-hot class vector, with
weight = embedding weightᵀ. Its factors for that Linear are the oracle for the engine's
Embedding factors (A: the class frequencies on the diagonal).
"""

from __future__ import annotations

import copy

import pytest
import torch
from curvlinops import KFACLinearOperator
from diffusers import DDPMScheduler
from tiny_families import tiny_cond_unet
from torch import nn

from attribution.capture import tracked_layers
from attribution.conditions import Cond
from attribution.curvature import CurvatureConfig, fit_curvature
from attribution.measurements import Measurement
from attribution.model import DiffusionModel

RTOL = 1e-4
N_IMAGES, DRAWS, CLASSES, TOKENS, WIDTH = 3, 2, 4, 5, 16


class OneHotLinear(nn.Module):
    """The class embedding as a Linear on one-hot vectors (the engine's view of nn.Embedding)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.n = emb.num_embeddings
        self.linear = nn.Linear(self.n, emb.embedding_dim, bias=False).to(emb.weight.dtype)
        self.linear.weight.data = emb.weight.data.T.clone()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.one_hot(labels, self.n).to(self.linear.weight.dtype))


class FixedRows(nn.Module):
    """x_t (R, C, H, W) -> f (R, C·H·W) at the rows' fixed timesteps and conditions (one batch)."""

    def __init__(self, unet: nn.Module, t: torch.Tensor, cond: Cond):
        super().__init__()
        self.unet, self.t, self.kw = unet, t, cond.kwargs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.t, **self.kw).sample.flatten(1)


@pytest.fixture(scope="module")
def conditional():
    torch.manual_seed(0)
    unet = tiny_cond_unet(num_class_embeds=CLASSES).double()
    assert unet.config.cross_attention_dim == WIDTH  # the text states below are WIDTH wide
    model = DiffusionModel(unet.eval().requires_grad_(False), DDPMScheduler(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N_IMAGES, 4, 4, 4, generator=g, dtype=torch.float64)
    table = torch.randn(2, TOKENS, WIDTH, generator=g, dtype=torch.float64)  # two prompts' states
    cond = Cond(labels=torch.tensor([0, 2, 2]), table=table, ids=torch.tensor([1, 0, 1]))
    return model, images, cond


def curvlinops_factors(model, images, cond, cfg: CurvatureConfig, fisher_type: str):
    keys = list(range(images.shape[0]))
    rows = Measurement("loss").rows(
        images,
        keys,
        cfg.draws,
        cfg.seed,
        model.alphas_cumprod(),
        cfg.stratified,
        cond=cond,
        prediction="v_prediction",
    )
    twin = copy.deepcopy(model.unet)
    twin.class_embedding = OneHotLinear(twin.class_embedding)
    wrapper = FixedRows(twin, rows.t, rows.c)
    layers = tracked_layers(twin)
    assert not any(isinstance(m, nn.Embedding) for m in layers.values())
    params = [p for m in layers.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    op = KFACLinearOperator(
        wrapper,
        nn.MSELoss(reduction="mean"),
        params,
        [(rows.x, rows.y.flatten(1))],
        fisher_type=fisher_type,
        kfac_approx=cfg.sharing,
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=rows.x.shape[0],
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    d = rows.x[0].numel()
    out = {}
    for name in layers:
        a, s = op._input_covariances[f"unet.{name}"], op._gradient_covariances[f"unet.{name}"]
        ours = name.removesuffix(".linear") if name == "class_embedding.linear" else name
        out[ours] = (a, s / d if fisher_type == "empirical" else s)
    return out, rows


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("ggn,fisher_type", [("exact", "type-2"), ("loss", "empirical")])
def test_conditional_kfac_matches_curvlinops(conditional, sharing, ggn, fisher_type):
    model, images, cond = conditional
    cfg = CurvatureConfig(kind="kfac", ggn=ggn, sharing=sharing, draws=DRAWS, seed=0)
    ours = fit_curvature(model, images, None, cfg, batch_size=2, progress=False, cond=cond)
    theirs, rows = curvlinops_factors(model, images, cond, cfg, fisher_type)
    layers = tracked_layers(model.unet)
    names = list(layers)
    assert sorted(names) == ours.layer_names == sorted(theirs)
    # the new layer kinds are all there: cross-attention on text tokens, time and class embeddings
    assert isinstance(layers["class_embedding"], nn.Embedding)
    assert any(n.endswith("attn2.to_k") for n in names) and "time_embedding.linear_1" in names
    floor = {i: 1e-12 * max(theirs[n][i].abs().max().item() for n in names) for i in (0, 1)}
    for name in names:
        for i, (mine, ref) in enumerate(zip(ours.factors(name), theirs[name])):
            assert mine.shape == ref.shape, name
            torch.testing.assert_close(
                mine.double(), ref, rtol=RTOL, atol=floor[i], msg=lambda m, n=name, i=i: f"{n} {'AS'[i]}: {m}"
            )
    # the class embedding's A is the diagonal of class frequencies over the rows
    freq = torch.bincount(rows.c.labels, minlength=CLASSES).double() / rows.t.shape[0]
    torch.testing.assert_close(
        ours.factors("class_embedding")[0].double(), torch.diag(freq), rtol=1e-6, atol=0
    )
    # cross-attention keys see the text tokens: A of attn2.to_k (expand) is the token second moment
    if sharing == "expand":
        k = next(n for n in names if n.endswith("attn2.to_k"))
        states = rows.c.kwargs()["encoder_hidden_states"].reshape(-1, WIDTH)
        torch.testing.assert_close(
            ours.factors(k)[0].double(), states.T @ states / states.shape[0], rtol=1e-5, atol=1e-7
        )
