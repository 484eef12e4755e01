"""Measurements m(q) and training-side functions L(x), all as weighted squared errors.

Every function here is an average over K Monte-Carlo draws ("rows") of

    ℓ_r = w_r · mean_pixels (f_θ(x_r, t_r | c_r) − y_r)²

with f_θ the denoiser's output in its own parameterisation (`prediction_type`: ε, v = √ᾱ ε −
√(1−ᾱ) x0, or x0) under the example's condition c (class ids or text states, `attribution/
conditions.py`; none for unconditional models), and differs only in how a row (x_r, t_r, y_r,
w_r) is built from an image x0 and a draw (t, ε): `loss` (y = the target of the
parameterisation: ε, v or x0; the loss the model was trained with), `square_norm` (D-TRAK, y = 0),
`loss_at_t` (t restricted to a range),
`elbo` (w = the ELBO weight of t, normalised to mean 1 over t, in ε terms: since ε̂ − ε =
√ᾱ (v̂ − v) = −√(ᾱ/(1−ᾱ)) (x̂0 − x0), a v-model's weight is multiplied by ᾱ and an x0-model's by
ᾱ/(1−ᾱ), so the ELBO is the same function in every parameterisation) and `trajectory`
(Journey-TRAK: rows are the states of the query's own sampling trajectory, y is the target they
imply given the final x0). The
output-space Hessian of ℓ_r is therefore (2 w_r / d) I for d = pixels per image, which is what
the GGN needs.

Draws are seeded per example (`key`), so the same image always gets the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.conditions import Cond, denoise, select
from attribution.seeds import DRAWS, generator

MEASUREMENTS = ("loss", "square_norm", "loss_at_t", "elbo", "trajectory")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TRAIN_FUNCTIONS = ("loss", "square_norm")


@dataclass
class Rows:
    """K rows per example, example-major: x (B*K, C, H, W), t (B*K,), y like x, w (B*K,), and
    the rows' condition c (B*K examples; None for an unconditional model)."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    k: int
    c: Cond | None = None

    def to(self, device) -> Rows:
        c = None if self.c is None else self.c.to(device)
        return Rows(self.x.to(device), self.t.to(device), self.y.to(device), self.w.to(device), self.k, c)


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The regression target of a parameterisation for x_t = √a x0 + √(1−a) ε: ε, v or x0."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if prediction == "sample":
        return x0.expand_as(eps)
    raise ValueError(f"unknown prediction_type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def epsilon_weight(prediction: str, a: torch.Tensor) -> torch.Tensor:
    """c(a) with ‖ε̂ − ε‖² = c(a) ‖f̂ − f‖² for the parameterisation f (1, ᾱ or ᾱ/(1−ᾱ))."""
    if prediction == "v_prediction":
        return a
    if prediction == "sample":
        return a / (1 - a)
    return torch.ones_like(a)


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
        cond: Cond | None = None,
        prediction: str = "epsilon",
    ) -> Rows:
        """x0 (B, C, H, W) -> Rows with K rows per image, each row under its image's `cond`.

        `trajectory` = (timesteps (S,), states (S, B, C, H, W)) is required for `trajectory`;
        K of the S states are used (evenly spaced), or all S if K >= S. `prediction` is the
        denoiser's parameterisation (its scheduler's prediction_type).
        """
        b, shape = x0.shape[0], tuple(x0.shape[1:])
        acp = alphas_cumprod.to(x0.device)
        if self.name == "trajectory":
            x, t, kk = self._trajectory_states(x0, k, trajectory)
            a = acp[t].view(b, kk, *([1] * len(shape)))
            eps = (x - a.sqrt() * x0.unsqueeze(1)) / (1 - a).sqrt()
            y = target(prediction, x0.unsqueeze(1), eps, a)
            w = torch.ones(b, kk, device=x0.device)
            return Rows(
                x.reshape(b * kk, *shape),
                t.reshape(-1),
                y.reshape(b * kk, *shape),
                w.reshape(-1),
                kk,
                None if cond is None else cond.repeat(kk),
            )
        t_range = self.t_range if self.name == "loss_at_t" else None
        density = self.density if t_range is None else None
        t, eps = draws(keys, k, shape, seed, acp.shape[0], t_range, stratified, antithetic, density)
        t, eps = t.to(x0.device), eps.to(x0.device)
        a = acp[t].view(b, k, *([1] * len(shape)))
        x = a.sqrt() * x0.unsqueeze(1) + (1 - a).sqrt() * eps
        y = (
            torch.zeros_like(eps)
            if self.name == "square_norm"
            else target(prediction, x0.unsqueeze(1), eps, a)
        )
        w = torch.ones(b, k, device=x0.device)
        if self.name == "elbo":
            w = elbo_weights(acp)[t] * epsilon_weight(prediction, acp[t])
        if density is not None:  # importance weights: the mean over rows stays the mean over t
            w = w / (acp.shape[0] * density.to(x0.device)[t])
        c = None if cond is None else cond.repeat(k)
        return Rows(x.reshape(b * k, *shape), t.reshape(-1), y.reshape(b * k, *shape), w.reshape(-1), k, c)

    @staticmethod
    def _trajectory_states(x0: torch.Tensor, k: int, trajectory) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(states (B, K', C, H, W), timesteps (B, K'), K') of K evenly spaced trajectory states."""
        if trajectory is None:
            raise ValueError(
                "the trajectory measurement needs the query's sampling trajectory "
                "(only images generated here have one)"
            )
        ts, states = trajectory
        s = ts.shape[0]
        pick = torch.linspace(0, s - 1, min(k, s)).round().long()
        kk = pick.numel()
        t = ts[pick].to(x0.device).long().view(1, kk).expand(x0.shape[0], kk)
        return states[pick].to(x0.device).transpose(0, 1), t, kk


def row_values(out: torch.Tensor, rows: Rows) -> torch.Tensor:
    """ℓ_r = w_r · mean_pixels (out − y)², shape (R,)."""
    return rows.w * (out - rows.y).pow(2).flatten(1).mean(1)


def evaluate(unet: torch.nn.Module, rows: Rows, batch_rows: int = 512) -> torch.Tensor:
    """The measurement of each example: the mean of its K row values, shape (B,)."""
    vals = []
    with torch.no_grad():
        for i in range(0, rows.t.shape[0], batch_rows):
            sl = slice(i, i + batch_rows)
            part = Rows(rows.x[sl], rows.t[sl], rows.y[sl], rows.w[sl], rows.k, select(rows.c, sl))
            vals.append(row_values(denoise(unet, part.x, part.t, part.c), part))
    return torch.cat(vals).view(-1, rows.k).mean(1)
