"""Per-example projected (and preconditioned) gradient features.

For example n with rows r (its K draws) and layer l, the gradient is
G_n = Σ_{r,p} g_{r,p} a_{r,p}ᵀ (the cotangent already carries the 1/K of the mean over draws),
and the feature is vec(P_out · Precond(G_n) · P_inᵀ) · scale. Two paths:

- Kronecker (``identity``, ``kfac``): Precond(G) = S̃⁻¹ G Ã⁻¹ with factored damping, folded into
  M_out = P_out S̃⁻¹ and M_in = P_in Ã⁻¹, so φ = Σ_{r,p} (M_out g)(M_in a)ᵀ: G_n is never formed.
- Materialised (``ekfac``, ``kfac-exact``): Precond(G) = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ with
  exact damping, so φ = (P_out Q_S) [rot / (Λ + λ)] (P_in Q_A)ᵀ with rot formed per example.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from attribution.capture import (
    forward,
    grad_enabled_params,
    inputs_as_rows,
    layer_shape,
    project_inputs,
    tracked_layers,
)
from attribution.curvature import Curvature, rotated_gradient
from attribution.measurements import Measurement, Rows
from attribution.projection import Projection

PRECONDITIONERS = ("identity", "kfac", "kfac-exact", "ekfac")


def _mat(p: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.eye(n) if p is None else p


class FeatureMap:
    """Maps captured (a, g) of each layer to projected, preconditioned per-example features."""

    def __init__(self, layer_shapes: dict[str, tuple[int, int]], projection: Projection,
                 preconditioner: str = "identity", curvature: Curvature | None = None,
                 scale: float = 1.0, device: str | torch.device = "cpu"):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}")
        if preconditioner != "identity" and curvature is None:
            raise ValueError(f"preconditioner {preconditioner!r} needs a fitted curvature")
        self.names = list(layer_shapes)
        self.projection = projection
        self.kind = preconditioner
        self.scale = scale
        self.ops: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, (o, i) in layer_shapes.items():
            p_out, p_in = _mat(projection.p_out(name), o), _mat(projection.p_in(name), i)
            if preconditioner == "identity":
                self.ops[name] = (p_out, p_in)
            elif preconditioner == "kfac":
                ea, qa, es, qs = curvature.eig(name)
                da, ds = curvature.factored_damping(name)
                a_inv = (qa / (ea + da)) @ qa.T
                s_inv = (qs / (es + ds)) @ qs.T
                self.ops[name] = (p_out @ s_inv, p_in @ a_inv)
            else:
                _, qa, _, qs = curvature.eig(name)
                lam = curvature.eigenvalues(name) + curvature.damping(name)
                self.ops[name] = (qs, qa, 1.0 / lam, p_out @ qs, p_in @ qa)
            self.ops[name] = tuple(t.float().to(device) for t in self.ops[name])
        self.dims = {n: projection.dims[n] for n in self.names}

    @property
    def dim(self) -> int:
        return sum(ko * ki for ko, ki in self.dims.values())

    def layer(self, name: str, a: torch.Tensor, g: torch.Tensor, b: int) -> torch.Tensor:
        """a (B·K, P, I'), g (B·K, P, O) -> (B, k_o·k_i) for B examples with K rows each."""
        op = self.ops[name]
        a = a.reshape(b, -1, a.shape[-1])
        g = g.reshape(b, -1, g.shape[-1])
        if len(op) == 2:
            m_out, m_in = op
            f = (g @ m_out.T).transpose(1, 2) @ (a @ m_in.T)
        else:
            qs, qa, inv, r_out, r_in = op
            f = r_out @ (rotated_gradient(g, a, qs, qa) * inv) @ r_in.T
        return f.flatten(1) * self.scale

    def layer_from_input(self, name: str, module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor,
                         b: int) -> torch.Tensor:
        """As `layer`, from the layer's raw input x: the Kronecker path never forms im2col patches."""
        op = self.ops[name]
        if len(op) != 2:
            return self.layer(name, inputs_as_rows(module, x), g, b)
        m_out, m_in = op
        ai = project_inputs(module, x, m_in)
        g = g.reshape(b, -1, g.shape[-1])
        f = (g @ m_out.T).transpose(1, 2) @ ai.reshape(b, -1, ai.shape[-1])
        return f.flatten(1) * self.scale


def example_cotangent(out: torch.Tensor, rows: Rows) -> torch.Tensor:
    """d/dε̂ of the per-example mean over K rows of ℓ_r: (2 w / d)(ε̂ − y) / K."""
    d = out[0].numel()
    w = rows.w.view(-1, *([1] * (out.dim() - 1)))
    return (2 * w / d) * (out.detach() - rows.y) / rows.k


def gradient_features(model, fmap: FeatureMap, images: torch.Tensor, keys: list[int],
                      measurement: Measurement, draws: int, seed: int, batch_size: int = 32,
                      stratified: bool = True, antithetic: bool = False,
                      trajectory: tuple[torch.Tensor, torch.Tensor] | None = None,
                      progress: bool = True, desc: str = "features",
                      device: str | torch.device = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Features (N, D) of `images` (N, C, H, W) for the function `measurement`.

    `trajectory` = (timesteps (S,), states (S, N, C, H, W)) for the trajectory measurement.
    Streams in batches of `batch_size` images; writes into `out` if given.
    """
    device = torch.device(device)
    layers = tracked_layers(model.unet)
    acp = model.alphas_cumprod(device)
    n = images.shape[0]
    out = torch.empty(n, fmap.dim) if out is None else out
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    with grad_enabled_params(model.unet):
        for i in range(0, n, batch_size):
            x0 = images[i:i + batch_size].to(device)
            b = x0.shape[0]
            traj = None if trajectory is None else (trajectory[0], trajectory[1][:, i:i + batch_size])
            rows = measurement.rows(x0, keys[i:i + batch_size], draws, seed, acp, stratified=stratified,
                                    antithetic=antithetic, trajectory=traj)
            eps_hat, rec = forward(model.unet, layers, rows.x, rows.t)
            parts = {name: fmap.layer_from_input(name, layers[name], rec.inputs[name].detach(), g, b)
                     for name, g in rec.cotangents(eps_hat, example_cotangent(eps_hat, rows))}
            out[i:i + b] = torch.cat([parts[name] for name in fmap.names], dim=1).cpu()
            bar.update(b)
    bar.close()
    return out


def model_layer_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(O, I') of every tracked layer, in module order."""
    return {n: layer_shape(m) for n, m in tracked_layers(unet).items()}
