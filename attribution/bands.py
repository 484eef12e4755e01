"""Influence by timestep band: a query's score split into the parts its timestep draws make.

The query measurement is a mean over K rows (draws of (t, ε), stratified in t), and its feature
ψ is linear in each row's cotangent: ψ = Σ_r ψ_r. Grouping the rows by the band of their timestep
gives band features ψ_b = Σ_{r: t_r ∈ b} ψ_r with Σ_b ψ_b = ψ, hence band scores τ_b(q, n) = ψ_b·φ_n
that add up to the score τ(q, n) = ψ·φ_n (the training features φ are unchanged). Normalising
methods divide every ψ_b by the same ‖ψ‖, so the parts still add up.

All band features of a query come from the one forward and backward pass that gives ψ (and the
half-difference δψ of the stability figures): the rows are grouped into cells (example, half,
band); the band features and δψ are sums of cells, formed (on the sketch path) from the cells'
gradients before they are preconditioned and sketched, so a query with n bands sketches n + 1
vectors per layer where the plain query sketches 2 (the halves).

`BandMeasurement` is the reference: the measurement with the weights of rows outside one band set
to zero, whose feature (a separate pass) is ψ_b by definition; the tests check the one-pass cells
against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.capture import example_gradients, forward, grad_enabled_params, layer_shape, tracked_layers
from attribution.conditions import as_cond
from attribution.errors import ConfigError
from attribution.features import example_cotangent, split_halves
from attribution.influence import QUERY_KEY, Attributor, _normalize_with_spread
from attribution.measurements import Measurement, Rows

BAND_COUNTS = (2, 4, 10)  # the band settings the explorer offers
DEFAULT_BANDS = 4


@dataclass(frozen=True)
class Bands:
    """Consecutive timestep bands [edges[i], edges[i+1]) covering [0, T)."""

    edges: tuple[int, ...]

    @classmethod
    def equal(cls, n: int, num_timesteps: int) -> Bands:
        """`n` bands of (nearly) equal width over [0, num_timesteps)."""
        n = int(n)
        if not 1 <= n <= num_timesteps:
            raise ConfigError(f"bands must be between 1 and {num_timesteps} (got {n})")
        edges = torch.linspace(0, num_timesteps, n + 1).round().long().tolist()
        return cls(tuple(int(e) for e in edges))

    def __len__(self) -> int:
        return len(self.edges) - 1

    @property
    def names(self) -> list[str]:
        """'t 0–499 (low noise)' …: the timestep range of each band, and its noise end."""
        out = []
        for b in range(len(self)):
            lo, hi = self.edges[b], self.edges[b + 1] - 1
            end = " (low noise)" if b == 0 else " (high noise)" if b == len(self) - 1 else ""
            out.append(f"t {lo}–{hi}{end}" if len(self) > 1 else f"t {lo}–{hi}")
        return out

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The band of each timestep (long, like t)."""
        inner = torch.tensor(self.edges[1:-1], dtype=torch.long, device=t.device)
        return torch.bucketize(t.long(), inner, right=True)

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "names": self.names}


class BandMeasurement(Measurement):
    """The measurement restricted to timesteps in [lo, hi): rows outside get weight 0 (the same
    draws, the same 1/K), so its feature is the band feature ψ_b by definition (the reference)."""

    def __init__(self, base: Measurement, lo: int, hi: int):
        super().__init__(base.name, base.t_range, base.density)
        self.lo, self.hi = lo, hi

    def rows(self, *args, **kwargs) -> Rows:
        r = super().rows(*args, **kwargs)
        inside = ((r.t >= self.lo) & (r.t < self.hi)).to(r.w.dtype)
        return Rows(r.x, r.t, r.y, r.w * inside, r.k, r.c)


def _cells(rows: Rows, examples: int, parts: int, bands: Bands) -> list[torch.Tensor | slice]:
    """Rows of each cell (example, part, band), example-major; rows are part-major per example
    (`parts` consecutive groups of `rows.k` rows each). A cell whose rows are consecutive (sorted
    draws: stratified timesteps, a trajectory) is a slice, so its activations are views, not copies."""
    band = bands.of(rows.t).view(examples, parts, rows.k)
    base = torch.arange(examples * parts * rows.k, device=rows.t.device).view(examples, parts, rows.k)
    cells = [
        base[e, p][band[e, p] == b] for e in range(examples) for p in range(parts) for b in range(len(bands))
    ]
    return [_as_slice(c) for c in cells]


def _as_slice(idx: torch.Tensor) -> torch.Tensor | slice:
    """`idx` (increasing row indices) as a slice if its rows are consecutive, i.e. span exactly
    `idx.numel()` rows (an empty cell stays an empty tensor)."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _size(cell: torch.Tensor | slice) -> int:
    return cell.stop - cell.start if isinstance(cell, slice) else cell.numel()


def _equal_runs(cells: list, n_rows: int) -> bool:
    """Whether the cells are consecutive slices of one size that tile all `n_rows` rows in order."""
    size = _size(cells[0])
    return all(
        isinstance(c, slice) and c.start == i * size and _size(c) == size for i, c in enumerate(cells)
    ) and (size * len(cells) == n_rows)


def _mix(examples: int, parts: int, n: int) -> torch.Tensor:
    """(V, cells): the wanted features as sums of cells (example, part, band). Per example: its n
    band features ψ_b (the mean over the parts of the band's cells) and, with two parts (the
    halves), the half-difference δψ = Σ_b (cell_A,b − cell_B,b) / 2 last."""
    per = n + (1 if parts == 2 else 0)
    mix = torch.zeros(examples * per, examples * parts * n)
    for e in range(examples):
        for p in range(parts):
            for b in range(n):
                c = (e * parts + p) * n + b
                mix[e * per + b, c] = 1.0 / parts
                if parts == 2:
                    mix[e * per + n, c] = 0.5 if p == 0 else -0.5
    return mix


def _mixed_features(
    fmap, layers: dict, rec, eps_hat, rows: Rows, cells: list, mix: torch.Tensor
) -> torch.Tensor:
    """(V, D) = mix @ (each cell's feature from its own rows of one recorded pass). The sketch
    path mixes the cells' gradients before preconditioning and sketching them (V sketches per
    layer, not one per cell); the Kronecker paths form each cell's feature, then mix."""
    out = torch.zeros(mix.shape[0], fmap.dim, device=eps_hat.device)
    mix = mix.to(eps_hat.device)
    parts: list[list] = [[] for _ in cells]
    tiled = _equal_runs(cells, rows.t.shape[0])
    for name, g in rec.cotangents(eps_hat, example_cotangent(eps_hat, rows)):
        x, m = rec.inputs[name].detach(), layers[name]
        if fmap.sketched:
            o, i = layer_shape(m)
            grads = (
                example_gradients(m, x, g, len(cells))
                if tiled
                else torch.stack(
                    [
                        example_gradients(m, x[idx], g[idx], 1)[0] if _size(idx) else x.new_zeros(o, i)
                        for idx in cells
                    ]
                )
            )
            fmap.sketch_gradients(name, (mix @ grads.flatten(1)).view(-1, o, i), out)
            continue
        for c, idx in enumerate(cells):
            ko, ki = fmap.projection.dims[name]
            parts[c].append(
                fmap.layer_from_input(name, m, x[idx], g[idx], 1) if _size(idx) else x.new_zeros(1, ko * ki)
            )
    if not fmap.sketched:
        out = mix @ torch.cat([torch.cat(p, dim=1) for p in parts])
    return out


def query_band_features(
    att: Attributor, images: torch.Tensor, bands: Bands, trajectory=None, cond=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ψ (Q, D), δψ (Q, D) or None, ψ_b (Q, bands, D)) for query images (Q, C, H, W) under
    `cond` (conditional models), from one pass: ψ and δψ are those of
    `att.query_features_with_spread` (δψ None where the method has no halves), and Σ_b ψ_b = ψ."""
    if not att.uses_model:
        raise ConfigError("pixel similarity draws no timesteps, so it has no timestep bands")
    fmap, meas, cfg = att.feature_map("query"), att.measurement("query"), att.config
    halves = att.spread_available
    device = att.device
    layers = tracked_layers(att.model.unet)
    q = images.shape[0]
    with grad_enabled_params(att.model.unet):
        x0 = images.to(device)
        traj = None if trajectory is None else (trajectory[0], trajectory[1])
        rows = meas.rows(
            x0,
            [QUERY_KEY] * q,
            cfg.query_draws,
            cfg.seed,
            att.model.alphas_cumprod(device),
            stratified=cfg.stratified,
            antithetic=cfg.antithetic,
            trajectory=traj,
            cond=as_cond(att.model, cond, q),
            prediction=att.model.prediction_type,
        )
        if halves:
            rows = split_halves(rows, cfg.antithetic)
        parts = 2 if halves else 1
        cells = _cells(rows, q, parts, bands)
        eps_hat, rec = forward(att.model.unet, layers, rows.x, rows.t, rows.c)
        f = _mixed_features(fmap, layers, rec, eps_hat, rows, cells, _mix(q, parts, len(bands))).cpu()
    f = f.view(q, len(bands) + (1 if halves else 0), -1)
    psi_b = f[:, : len(bands)]
    psi, dpsi = psi_b.sum(1), (f[:, -1] if halves else None)
    if att.spec.normalize:
        norm = psi.norm(dim=1, keepdim=True).clamp(min=1e-30)
        if dpsi is not None:
            psi, dpsi = _normalize_with_spread(psi, dpsi)
        else:
            psi = psi / norm
        psi_b = psi_b / norm.unsqueeze(1)
    return psi, dpsi, psi_b


def band_scores(psi_b, phi) -> torch.Tensor:
    """Band scores (Q, bands, N) of band features (Q, bands, D) and training features (N, D), in
    float64 so the parts add up to the score to float64 round-off."""
    psi_b = torch.as_tensor(psi_b).double()
    return psi_b @ torch.as_tensor(phi).double().T


__all__ = ["BAND_COUNTS", "DEFAULT_BANDS", "BandMeasurement", "Bands", "band_scores", "query_band_features"]
