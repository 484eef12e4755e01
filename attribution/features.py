"""Per-example projected (and preconditioned) gradient features.

For example n with rows r (its K draws) and layer l, the gradient is
G_n = Σ_{r,p} g_{r,p} a_{r,p}ᵀ (the cotangent already carries the 1/K of the mean over draws),
and the feature is Proj(Precond(G_n)) · scale, with Precond = (G + λ)^(−power) per layer
(power 1: the full inverse on one side; power ½ on both sides, so ⟨ψ, φ⟩ = ∇mᵀ (G + λ)⁻¹ ∇L).
Three paths:

- Kronecker fast path (``identity``, ``kfac`` with a Kronecker projection): Precond(G) =
  S̃^(−p) G Ã^(−p) with factored damping, folded into M_out = P_out S̃^(−p) and M_in = P_in Ã^(−p),
  so φ = Σ_{r,p} (M_out g)(M_in a)ᵀ: G_n is never formed.
- Materialised Kronecker (``ekfac``, ``kfac-exact``): φ = (P_out Q_S) [rot · (Λ + λ)^(−p)] (P_in Q_A)ᵀ
  with rot = Q_Sᵀ G Q_A formed per example.
- Sketch (any preconditioner): the count sketch of rot · w (or of G itself for ``identity``),
  w = (Λ + λ)^(−p) in the Kronecker eigenbasis; each layer adds into the same D buckets.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from attribution.capture import (
    example_gradients,
    forward,
    grad_enabled_params,
    inputs_as_rows,
    layer_shape,
    project_inputs,
    tracked_layers,
)
from attribution.conditions import Cond, select
from attribution.curvature import Curvature, rotate, rotated_gradient
from attribution.measurements import Measurement, Rows
from attribution.projection import Projection, sketch_add

PRECONDITIONERS = ("identity", "kfac", "kfac-exact", "ekfac")


def _mat(p: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.eye(n) if p is None else p


def eigen_weights(curvature: Curvature, name: str, kind: str, power: float) -> torch.Tensor:
    """(O, I') weights (Λ + λ)^(−power) in the layer's Kronecker eigenbasis."""
    if kind == "kfac":
        ea, _, es, _ = curvature.eig(name)
        da, ds = curvature.factored_damping(name)
        return torch.outer((es + ds) ** -power, (ea + da) ** -power)
    return (curvature.eigenvalues(name) + curvature.damping(name)) ** -power


class FeatureMap:
    """Maps captured (a, g) of each layer to projected, preconditioned per-example features."""

    def __init__(
        self,
        layer_shapes: dict[str, tuple[int, int]],
        projection: Projection,
        preconditioner: str = "identity",
        curvature: Curvature | None = None,
        scale: float = 1.0,
        device: str | torch.device = "cpu",
        power: float = 1.0,
    ):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}")
        if preconditioner != "identity" and curvature is None:
            raise ValueError(f"preconditioner {preconditioner!r} needs a fitted curvature")
        self.names = list(layer_shapes)
        self.projection = projection
        self.kind = preconditioner
        self.scale = scale
        self.sketched = projection.is_sketch
        self.ops: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, (o, i) in layer_shapes.items():
            if self.sketched:
                r, c = projection.sketch(name)
                if preconditioner == "identity":
                    self.ops[name] = (r, c)
                else:
                    _, qa, _, qs = curvature.eig(name)
                    w = eigen_weights(curvature, name, preconditioner, power)
                    self.ops[name] = (qs, qa, w, r, c)
                continue
            p_out, p_in = _mat(projection.p_out(name), o), _mat(projection.p_in(name), i)
            if preconditioner == "identity":
                self.ops[name] = (p_out, p_in)
            elif preconditioner == "kfac":
                ea, qa, es, qs = curvature.eig(name)
                da, ds = curvature.factored_damping(name)
                a_inv = (qa * (ea + da) ** -power) @ qa.T
                s_inv = (qs * (es + ds) ** -power) @ qs.T
                self.ops[name] = (p_out @ s_inv, p_in @ a_inv)
            else:
                _, qa, _, qs = curvature.eig(name)
                w = eigen_weights(curvature, name, preconditioner, power)
                self.ops[name] = (qs, qa, w, p_out @ qs, p_in @ qa)
        self.ops = {
            n: tuple(t.to(device) if t.dtype == torch.long else t.float().to(device) for t in op)
            for n, op in self.ops.items()
        }
        self.dims = {n: projection.dims[n] for n in self.names}

    @property
    def dim(self) -> int:
        if self.sketched:
            return self.projection.size
        return sum(ko * ki for ko, ki in self.dims.values())

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer features (in `names` order) -> (B, D): summed buckets, or concatenated."""
        if not self.sketched:
            return torch.cat(parts, dim=1)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def layer(self, name: str, a: torch.Tensor, g: torch.Tensor, b: int) -> torch.Tensor:
        """a (B·K, P, I'), g (B·K, P, O) -> (B, k_o·k_i), or (B, D) for a sketch."""
        op = self.ops[name]
        a = a.reshape(b, -1, a.shape[-1])
        g = g.reshape(b, -1, g.shape[-1])
        if self.sketched:
            x = rotated_gradient(g, a, *op[:2]) * op[2] if len(op) == 5 else g.transpose(1, 2) @ a
            return self._sketch(x, *op[-2:], b, None)
        if len(op) == 2:
            m_out, m_in = op
            f = (g @ m_out.T).transpose(1, 2) @ (a @ m_in.T)
        else:
            qs, qa, w, r_out, r_in = op
            f = r_out @ (rotated_gradient(g, a, qs, qa) * w) @ r_in.T
        return f.flatten(1) * self.scale

    def _sketch(
        self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor, b: int, into: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, O, I') per-example matrices -> (B, D) buckets times the scale, added into `into`."""
        if into is None:
            into = torch.zeros(b, self.projection.size, dtype=x.dtype, device=x.device)
        return sketch_add(into, x, r, c, alpha=self.scale)

    def layer_from_input(
        self,
        name: str,
        module: torch.nn.Module,
        x: torch.Tensor,
        g: torch.Tensor,
        b: int,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As `layer`, from the layer's raw input x: no im2col patches are formed (the Kronecker
        path convolves x with M_in; the sketch path takes each example's conv weight gradient).
        A sketch adds into `into` (B, D) when given and returns it."""
        op = self.ops[name]
        if self.sketched:
            grad = example_gradients(module, x, g, b)
            if len(op) == 5:
                grad = rotate(grad, *op[:2]) * op[2]
            return self._sketch(grad, *op[-2:], b, into)
        if len(op) != 2:
            return self.layer(name, inputs_as_rows(module, x), g, b)
        m_out, m_in = op
        ai = project_inputs(module, x, m_in)
        g = g.reshape(b, -1, g.shape[-1])
        f = (g @ m_out.T).transpose(1, 2) @ ai.reshape(b, -1, ai.shape[-1])
        return f.flatten(1) * self.scale

    def sketch_gradients(self, name: str, grad: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Sketch path only: per-example gradients (B, O, I') of layer `name`, as
        `capture.example_gradients` forms them, preconditioned and added into `into` (B, D) (the
        second half of `layer_from_input`; attribution/bands.py combines gradients first)."""
        op = self.ops[name]
        if len(op) == 5:
            grad = rotate(grad, *op[:2]) * op[2]
        return self._sketch(grad, *op[-2:], grad.shape[0], into)


def example_cotangent(out: torch.Tensor, rows: Rows) -> torch.Tensor:
    """d/dε̂ of the per-example mean over K rows of ℓ_r: (2 w / d)(ε̂ − y) / K."""
    d = out[0].numel()
    w = rows.w.view(-1, *([1] * (out.dim() - 1)))
    return (2 * w / d) * (out.detach() - rows.y) / rows.k


def half_order(k: int, antithetic: bool) -> torch.Tensor:
    """A permutation of an example's k draws: half A's draws first, then half B's. Draws (pairs of
    antithetic draws) alternate between the halves, so each half spans every timestep stratum."""
    unit = 2 if antithetic else 1
    if k % (2 * unit):
        raise ValueError(f"independent halves need draws divisible by {2 * unit}, not {k}")
    groups = torch.arange(k).view(-1, unit)
    return torch.cat([groups[0::2].flatten(), groups[1::2].flatten()])


def split_halves(rows: Rows, antithetic: bool) -> Rows:
    """Rows of B examples × K draws -> rows of 2B half-examples × K/2 draws (A then B per example);
    each half's feature is then the mean over its own draws, an independent estimate."""
    k = rows.k
    order = half_order(k, antithetic)
    idx = (torch.arange(rows.t.shape[0] // k).view(-1, 1) * k + order.view(1, -1)).flatten().to(rows.t.device)
    return Rows(rows.x[idx], rows.t[idx], rows.y[idx], rows.w[idx], k // 2, select(rows.c, idx))


MAX_ROWS = 512  # rows in one forward + backward: 32 images × the default 16 draws


def images_per_batch(batch_size: int, draws: int) -> int:
    """Images per forward: `batch_size`, fewer where their draws would pass `MAX_ROWS` rows (the
    activations of 2,048 rows took 14 GB); every image's draws are seeded by its key, so the
    features do not depend on the batching."""
    return max(1, min(batch_size, MAX_ROWS // max(draws, 1)))


def gradient_features(
    model,
    fmap: FeatureMap,
    images: torch.Tensor,
    keys: list[int],
    measurement: Measurement,
    draws: int,
    seed: int,
    batch_size: int = 32,
    stratified: bool = True,
    antithetic: bool = False,
    trajectory: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "features",
    device: str | torch.device = "cpu",
    out: torch.Tensor | None = None,
    halves: bool = False,
    cond: Cond | None = None,
) -> torch.Tensor:
    """Features (N, D) of `images` (N, C, H, W) for the function `measurement`; with `halves`,
    (N, 2, D): the features of two independent halves of each image's draws (their mean is the
    N × D feature).

    `trajectory` = (timesteps (S,), states (S, N, C, H, W)) for the trajectory measurement.
    Streams in batches of `batch_size` images (fewer for many draws: `images_per_batch`); writes
    into `out` if given. `cond`: the images' conditions (N examples; None for an unconditional
    model), in the denoiser's terms.
    """
    device = torch.device(device)
    layers = tracked_layers(model.unet)
    acp = model.alphas_cumprod(device)
    n = images.shape[0]
    batch_size = images_per_batch(batch_size, draws)
    parts_per = 2 if halves else 1
    if out is None:
        out = torch.empty(n, 2, fmap.dim) if halves else torch.empty(n, fmap.dim)
    flat = out.view(n * parts_per, fmap.dim)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    with grad_enabled_params(model.unet):
        for i in range(0, n, batch_size):
            x0 = images[i : i + batch_size].to(device)
            b = x0.shape[0]
            traj = None if trajectory is None else (trajectory[0], trajectory[1][:, i : i + batch_size])
            rows = measurement.rows(
                x0,
                keys[i : i + batch_size],
                draws,
                seed,
                acp,
                stratified=stratified,
                antithetic=antithetic,
                trajectory=traj,
                cond=select(cond, slice(i, i + batch_size)),
                prediction=model.prediction_type,
            )
            if halves:
                rows = split_halves(rows, antithetic)
            b = b * parts_per
            eps_hat, rec = forward(model.unet, layers, rows.x, rows.t, rows.c)
            acc = torch.zeros(b, fmap.dim, device=device) if fmap.sketched else None
            parts = {
                name: fmap.layer_from_input(name, layers[name], rec.inputs[name].detach(), g, b, acc)
                for name, g in rec.cotangents(eps_hat, example_cotangent(eps_hat, rows))
            }
            flat[i * parts_per : i * parts_per + b] = (
                acc if fmap.sketched else fmap.combine([parts[n] for n in fmap.names])
            ).cpu()
            bar.update(b // parts_per)
    bar.close()
    return out


def model_layer_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(O, I') of every tracked layer, in module order."""
    return {n: layer_shape(m) for n, m in tracked_layers(unet).items()}
