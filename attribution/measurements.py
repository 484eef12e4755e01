"""Measurements m(q) and training-side functions L(x), all as weighted squared errors.

Every function here is an average over K Monte-Carlo draws ("rows") of

    ℓ_r = w_r · mean_pixels (ε_θ(x_r, t_r) − y_r)²

and differs only in how a row (x_r, t_r, y_r, w_r) is built from an image x0 and a draw
(t, ε): `loss` (y = ε), `square_norm` (D-TRAK, y = 0), `loss_at_t` (t restricted to a range),
`elbo` (w = the ELBO weight of t, normalised to mean 1 over t) and `trajectory` (Journey-TRAK:
rows are the states of the query's own sampling trajectory, y is the noise they imply). The
output-space Hessian of ℓ_r is therefore (2 w_r / d) I for d = pixels per image, which is what
the GGN needs.

Draws are seeded per example (`key`), so the same image always gets the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.seeds import DRAWS, generator

MEASUREMENTS = ("loss", "square_norm", "loss_at_t", "elbo", "trajectory")
TRAIN_FUNCTIONS = ("loss", "square_norm")


@dataclass
class Rows:
    """K rows per example, example-major: x (B*K, C, H, W), t (B*K,), y like x, w (B*K,)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    k: int

    def to(self, device) -> Rows:
        return Rows(self.x.to(device), self.t.to(device), self.y.to(device), self.w.to(device), self.k)


def draw_timesteps(k: int, g: torch.Generator, lo: int, hi: int, stratified: bool) -> torch.Tensor:
    """k timesteps in [lo, hi): one per equal stratum if `stratified`, else i.i.d. uniform."""
    if stratified:
        u = torch.rand(k, generator=g, dtype=torch.float64)
        edges = lo + (torch.arange(k, dtype=torch.float64) + u) * (hi - lo) / k
        return edges.floor().long().clamp(lo, hi - 1)
    return torch.randint(lo, hi, (k,), generator=g)


def importance_timesteps(k: int, g: torch.Generator, density: torch.Tensor, stratified: bool) -> torch.Tensor:
    """k timesteps from the density (T,) over timesteps: stratified in its quantiles (one draw per
    equal-probability stratum) if `stratified`, else i.i.d."""
    u = torch.rand(k, generator=g, dtype=torch.float64)
    if stratified:
        u = (torch.arange(k, dtype=torch.float64) + u) / k
    cdf = density.double().cumsum(0)
    return torch.searchsorted(cdf / cdf[-1], u).clamp(max=density.shape[0] - 1)


def draws(
    keys: list[int],
    k: int,
    shape: tuple[int, ...],
    seed: int,
    num_timesteps: int,
    t_range: tuple[int, int] | None = None,
    stratified: bool = True,
    antithetic: bool = False,
    density: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example seeded draws: timesteps (B, K) and noise (B, K, *shape).

    Example b's draws depend only on (seed, keys[b], k, options). With `antithetic`, draw 2j+1
    uses −ε of draw 2j (same t). `density` (T,) draws timesteps by importance (the caller weights
    each row by 1 / (T·density[t]) so the mean over rows still estimates the uniform mean over t).
    """
    lo, hi = t_range or (0, num_timesteps)

    def timesteps(n: int, g: torch.Generator) -> torch.Tensor:
        if density is not None:
            return importance_timesteps(n, g, density, stratified)
        return draw_timesteps(n, g, lo, hi, stratified)

    ts, es = [], []
    for key in keys:
        g = generator(seed, DRAWS, key)
        if antithetic:
            half = (k + 1) // 2
            t = timesteps(half, g).repeat_interleave(2)[:k]
            e = torch.randn((half, *shape), generator=g)
            e = torch.stack([e, -e], dim=1).reshape(2 * half, *shape)[:k]
        else:
            t = timesteps(k, g)
            e = torch.randn((k, *shape), generator=g)
        ts.append(t)
        es.append(e)
    return torch.stack(ts), torch.stack(es)


def elbo_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """w(t) ∝ ½ (SNR(t−1) − SNR(t)) / SNR(t) (the ε-form ELBO weight), w(0) := w(1), mean 1."""
    acp = alphas_cumprod.double()
    snr = acp / (1 - acp)
    w = torch.empty_like(snr)
    w[1:] = 0.5 * (snr[:-1] - snr[1:]) / snr[1:]
    w[0] = w[1]
    return (w / w.mean()).float()


@dataclass
class Measurement:
    """How to turn images (and draws) into rows. `name` is one of MEASUREMENTS."""

    name: str = "loss"
    t_range: tuple[int, int] | None = None  # for loss_at_t
    density: torch.Tensor | None = None  # (T,) importance density of timesteps; None: uniform

    def __post_init__(self) -> None:
        if self.name not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {self.name!r}; choose one of {', '.join(MEASUREMENTS)}")
        if self.name == "loss_at_t" and self.t_range is None:
            raise ValueError("loss_at_t needs t_range=(lo, hi)")

    def rows(
        self,
        x0: torch.Tensor,
        keys: list[int],
        k: int,
        seed: int,
        alphas_cumprod: torch.Tensor,
        stratified: bool = True,
        antithetic: bool = False,
        trajectory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Rows:
        """x0 (B, C, H, W) -> Rows with K rows per image.

        `trajectory` = (timesteps (S,), states (S, B, C, H, W)) is required for `trajectory`;
        K of the S states are used (evenly spaced), or all S if K >= S.
        """
        b, shape = x0.shape[0], tuple(x0.shape[1:])
        acp = alphas_cumprod.to(x0.device)
        if self.name == "trajectory":
            if trajectory is None:
                raise ValueError(
                    "the trajectory measurement needs the query's sampling trajectory "
                    "(only images generated here have one)"
                )
            ts, states = trajectory
            s = ts.shape[0]
            pick = torch.linspace(0, s - 1, min(k, s)).round().long()
            kk = pick.numel()
            t = ts[pick].to(x0.device).long().view(1, kk).expand(b, kk)
            x = states[pick].to(x0.device).transpose(0, 1)  # (B, K, C, H, W)
            a = acp[t].view(b, kk, *([1] * len(shape)))
            y = (x - a.sqrt() * x0.unsqueeze(1)) / (1 - a).sqrt()
            w = torch.ones(b, kk, device=x0.device)
            return Rows(
                x.reshape(b * kk, *shape), t.reshape(-1), y.reshape(b * kk, *shape), w.reshape(-1), kk
            )
        t_range = self.t_range if self.name == "loss_at_t" else None
        density = self.density if t_range is None else None
        t, eps = draws(keys, k, shape, seed, acp.shape[0], t_range, stratified, antithetic, density)
        t, eps = t.to(x0.device), eps.to(x0.device)
        a = acp[t].view(b, k, *([1] * len(shape)))
        x = a.sqrt() * x0.unsqueeze(1) + (1 - a).sqrt() * eps
        y = torch.zeros_like(eps) if self.name == "square_norm" else eps
        w = elbo_weights(acp)[t] if self.name == "elbo" else torch.ones(b, k, device=x0.device)
        if density is not None:  # importance weights: the mean over rows stays the mean over t
            w = w / (acp.shape[0] * density.to(x0.device)[t])
        return Rows(x.reshape(b * k, *shape), t.reshape(-1), y.reshape(b * k, *shape), w.reshape(-1), k)


def row_values(out: torch.Tensor, rows: Rows) -> torch.Tensor:
    """ℓ_r = w_r · mean_pixels (out − y)², shape (R,)."""
    return rows.w * (out - rows.y).pow(2).flatten(1).mean(1)


def evaluate(unet: torch.nn.Module, rows: Rows, batch_rows: int = 512) -> torch.Tensor:
    """The measurement of each example: the mean of its K row values, shape (B,)."""
    vals = []
    with torch.no_grad():
        for i in range(0, rows.t.shape[0], batch_rows):
            sl = slice(i, i + batch_rows)
            part = Rows(rows.x[sl], rows.t[sl], rows.y[sl], rows.w[sl], rows.k)
            vals.append(row_values(unet(part.x, part.t).sample, part))
    return torch.cat(vals).view(-1, rows.k).mean(1)
