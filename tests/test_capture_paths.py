"""The Kronecker fast path on raw layer inputs (a convolution) equals the im2col path."""

from __future__ import annotations

import pytest
import torch

from attribution.capture import forward, grad_enabled_params, tracked_layers
from attribution.curvature import CurvatureConfig, fit_curvature
from attribution.data import mnist
from attribution.features import FeatureMap, example_cotangent, model_layer_shapes
from attribution.measurements import Measurement
from attribution.model import build_model
from attribution.projection import make_projection


@pytest.mark.parametrize(
    "pre,dim,kind",
    [
        ("identity", None, "kronecker"),
        ("identity", 256, "kronecker"),
        ("kfac", 256, "kronecker"),
        ("ekfac", 256, "kronecker"),
        ("kfac", 256, "sketch"),
        ("ekfac", 256, "sketch"),
        ("identity", 256, "sketch"),
    ],
)
def test_input_path_equals_rows_path(pre, dim, kind):
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    x = mnist(size=8, n=6).images
    shapes = model_layer_shapes(model.unet)
    curv = (
        None
        if pre == "identity"
        else fit_curvature(
            model,
            x,
            config=CurvatureConfig(kind="ekfac" if pre == "ekfac" else "kfac", draws=2, damping=1e-3),
            progress=False,
        )
    )
    fmap = FeatureMap(shapes, make_projection(shapes, dim, seed=1, kind=kind), pre, curv)
    rows = Measurement("loss").rows(x, list(range(6)), 3, 0, model.alphas_cumprod())
    layers = tracked_layers(model.unet)
    with grad_enabled_params(model.unet):
        out, rec = forward(model.unet, layers, rows.x, rows.t)
        cot = example_cotangent(out, rows)
        via_rows = {n: fmap.layer(n, a, g, 6) for n, a, g in rec.backward(out, cot, retain_graph=True)}
        via_input = {
            n: fmap.layer_from_input(n, layers[n], rec.inputs[n].detach(), g, 6)
            for n, g in rec.cotangents(out, cot)
        }
    assert via_rows.keys() == via_input.keys() == set(shapes)
    # the sketch path rotates the formed G, the rows path may rotate g and a first: float32
    # rounding, amplified by (Λ+λ)^(−½) on near-null directions, differs by ~1e-5 of the scale
    tol = 1e-4 if kind == "sketch" and pre != "identity" else 1e-5
    for n in shapes:
        scale = via_rows[n].abs().max().clamp(min=1e-30)
        assert (via_rows[n] - via_input[n]).abs().max() / scale < tol, n


@pytest.mark.parametrize(
    "c,h,o,bias,branch",
    [
        (2, 3, 16, True, "rotate-first"),
        (2, 12, 3, True, "conv-weight"),
        (2, 12, 3, False, "conv-weight"),
        (8, 6, 4, True, "unfold"),
        (8, 6, 4, False, "unfold"),
    ],
)
def test_rotated_row_gradients_equal_formed_and_rotated(c, h, o, bias, branch):
    """Q_Sᵀ G_r Q_A per row from the raw input, on every branch, against G_r formed from im2col."""
    from attribution.capture import inputs_as_rows, layer_shape, outputs_as_rows
    from attribution.curvature import rotated_row_gradients, rotates_first

    torch.manual_seed(0)
    m = torch.nn.Conv2d(c, o, 3, padding=1, bias=bias).double()
    x = torch.randn(5, c, h, h, dtype=torch.float64)
    g = outputs_as_rows(m, torch.randn(5, o, h, h, dtype=torch.float64))
    i = layer_shape(m)[1]
    p = h * h
    rotate_first = rotates_first(p, o, i)
    assert {
        "rotate-first": rotate_first,
        "conv-weight": not rotate_first and p >= i,
        "unfold": not rotate_first and p < i,
    }[branch]
    qa = torch.linalg.qr(torch.randn(i, i, dtype=torch.float64))[0]
    qs = torch.linalg.qr(torch.randn(o, o, dtype=torch.float64))[0]
    formed = g.transpose(1, 2) @ inputs_as_rows(m, x)  # (R, O, I')
    torch.testing.assert_close(rotated_row_gradients(m, x, g, qs, qa), qs.T @ formed @ qa)
