"""How stable a score is: standard errors from two independent halves of the draws.

Each training image's draws are split into two independent halves A and B (alternating strata,
`features.half_order`), and so are the query's. Features are stored as the mean φ = (φ_A + φ_B)/2
and the half-difference δ = (φ_A − φ_B)/2; likewise ψ and δψ on the query side. Then

    score            s  = ψ·φ                      (exactly the full-draw estimate)
    half estimates   h_A = ψ_A·φ_A = s + ψ·δ + δψ·φ + δψ·δ,   h_B = s − ψ·δ − δψ·φ + δψ·δ
    standard error   se = |h_A − h_B| / 2 = |ψ·δ + δψ·φ|

To first order the noise of s is n_ψ·φ + ψ·n_φ with n = (n_A + n_B)/2, and ψ·δ + δψ·φ has the
same distribution (δ = (n_A − n_B)/2), so se is an unbiased one-degree-of-freedom estimate of the
score's standard deviation under new draws (both sides). One degree of freedom is noisy; the
shown figure pools it with the shown list's mean: se_shown² = (se² + mean(se²)) / 2.
"""

from __future__ import annotations

import numpy as np


def split(halves):
    """(…, 2, D) half features -> (mean, half-difference), each (…, D)."""
    return (halves[..., 0, :] + halves[..., 1, :]) / 2, (halves[..., 0, :] - halves[..., 1, :]) / 2


def half_estimates(s_pp, s_pd, s_dp, s_dd):
    """h_A, h_B from ψ·φ, ψ·δ, δψ·φ, δψ·δ (arrays of one shape)."""
    noise = np.asarray(s_pd) + np.asarray(s_dp)
    return s_pp + noise + s_dd, s_pp - noise + s_dd


def raw_se(s_pd, s_dp) -> np.ndarray:
    """One-degree-of-freedom standard error of each score, |ψ·δ + δψ·φ|."""
    return np.abs(np.asarray(s_pd, dtype=np.float64) + np.asarray(s_dp, dtype=np.float64))


def pooled(se: np.ndarray) -> np.ndarray:
    """Shrinks each one-dof se towards the list's root-mean-square: √((se² + mean se²)/2)."""
    se = np.asarray(se, dtype=np.float64)
    if se.size == 0:
        return se
    return np.sqrt((se**2 + np.mean(se**2)) / 2)


def ranks_of(values: np.ndarray, rows: np.ndarray, descending: bool = True) -> np.ndarray:
    """1-based rank of values[rows] among all values (1 = largest if descending)."""
    v = np.asarray(values)
    sel = v[rows]
    if descending:
        return (v[None, :] > sel[:, None]).sum(1) + 1
    return (v[None, :] < sel[:, None]).sum(1) + 1


def distinguishable(
    scores: np.ndarray,
    se: np.ndarray,
    next_score: float,
    next_se: float,
    z: float = 2.0,
    descending: bool = True,
) -> np.ndarray:
    """Whether each shown score is separated from the first one not shown by more than z standard
    errors of their difference (independent noise assumed)."""
    gap = (np.asarray(scores) - next_score) * (1 if descending else -1)
    return gap > z * np.sqrt(np.asarray(se) ** 2 + next_se**2)
