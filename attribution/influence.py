"""Influence scores τ(q, n) = ∇m(q)ᵀ (G + λI)⁻¹ ∇L(x_n) / N, and the methods built from them.

Sign and unit: τ(q, n) is the first-order predicted *increase* of the query's measurement (by
default its diffusion loss) if training image n were removed and the model retrained:
τ > 0 → n is a proponent (it makes q more likely). The training features carry the 1/N; scores
are inner products of query features ψ and training features φ. With the count sketch (default)
the preconditioner is split, ψ = P (G+λ)^(−½) ∇m and φ = P (G+λ)^(−½) ∇L / N; with the Kronecker
projection it sits on the training side only, ψ = P ∇m and φ = P (G+λ)⁻¹ ∇L / N. Unprojected,
both give the same numbers; projected, the split one is far more faithful (ARCHITECTURE.md).

Every method is a configuration of the same machinery (`attribution/methods.py`, re-exported
here): preconditioner × GGN type × weight sharing × training function × measurement × normalisation.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from attribution.conditions import Cond, as_cond, select
from attribution.curvature import Curvature, CurvatureConfig, fit_curvature
from attribution.data import ImageDataset
from attribution.features import FeatureMap, gradient_features, model_layer_shapes
from attribution.measurements import Measurement
from attribution.methods import (
    DAMPING,
    DEFAULT_DIM,
    METHODS,
    TRAK_DIM,
    AttributionConfig,
    MethodSpec,
    dim_arg,
)
from attribution.projection import Projection, make_projection
from attribution.seeds import CURVATURE_SUBSET, PROFILE_DRAWS, PROFILE_SUBSET, generator, hash_seed
from attribution.uncertainty import split as split_halves

QUERY_KEY = -1  # all queries share the same draws (common random numbers on the query side)
TRAIN_COMMON_KEY = -2  # with `common_draws`, every training image gets this key's draws


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-30)


def _normalize_with_spread(x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x/‖x‖ and its first-order change for a change dx: (dx − (dx·x̂) x̂) / ‖x‖."""
    norm = x.norm(dim=1, keepdim=True).clamp(min=1e-30)
    unit = x / norm
    return unit, (dx - (dx * unit).sum(1, keepdim=True) * unit) / norm


class Attributor:
    """Influence of training images on queries, for one model, training set and configuration.

    >>> att = Attributor(model, train_dataset, AttributionConfig(method="ekfac"))
    >>> scores = att.scores(query_images)          # (Q, N), positive = proponent
    """

    def __init__(
        self,
        model,
        train: ImageDataset,
        config: AttributionConfig | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        self.model = model
        self.train = train
        self.config = config or AttributionConfig()
        self.device = torch.device(device) if device else next(model.unet.parameters()).device
        self.progress = progress
        self.spec = self.config.spec
        self.curvature: Curvature | None = None
        self.projection: Projection | None = None
        self.trak_inverse: torch.Tensor | None = None
        self.density: torch.Tensor | None = None  # (T,) importance density of timesteps, if used
        self._fmaps: dict[str, FeatureMap] = {}
        if self.spec.preconditioner == "trak" and self.config.dim is None:
            raise ValueError("TRAK-style methods need a projection (dim); the unprojected ΦᵀΦ is too large")

    @classmethod
    def from_parts(
        cls,
        model,
        n_train: int,
        config: AttributionConfig,
        curvature: Curvature | None = None,
        projection: Projection | None = None,
        trak_inverse: torch.Tensor | None = None,
        density: torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> Attributor:
        """An Attributor from saved parts (an index), without the training set: only its size is
        needed on the query side. It computes query features, not training features."""
        att = cls(model, None, config, device=device, progress=False)
        att._n_train = n_train
        att.curvature, att.projection, att.trak_inverse, att.density = (
            curvature,
            projection,
            trak_inverse,
            density,
        )
        return att

    # ---- setup -------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return self._n_train if self.train is None else len(self.train)

    @property
    def uses_model(self) -> bool:
        return self.spec.preconditioner != "pixel"

    def curvature_config(self) -> CurvatureConfig:
        kind = "ekfac" if self.spec.preconditioner == "ekfac" else "kfac"
        return CurvatureConfig(
            kind=kind,
            ggn=self.spec.ggn,
            sharing=self.spec.sharing,
            draws=self.curvature_draws,
            seed=self.config.seed,
            damping=self.spec.damping,
            stratified=self.config.stratified,
        )

    @property
    def curvature_draws(self) -> int:
        """Draws per curvature image: `curvature_draws`, raised on small sets until the fit sees
        `curvature_min_rows` (image, draw) rows (a 20-image set gets 200 draws per image)."""
        n = len(self.curvature_rows())
        return max(self.config.curvature_draws, -(-self.config.curvature_min_rows // max(n, 1)))

    @property
    def curvature_batch_size(self) -> int:
        """Images per curvature batch: as many (image, draw) rows as `batch_size` images at
        `curvature_draws` give, so the raised draws of a small set do not grow the batch's memory."""
        return max(1, self.config.batch_size * self.config.curvature_draws // self.curvature_draws)

    def curvature_rows(self) -> list[int]:
        """The training rows the curvature is fitted on (sorted; a seeded subset if configured)."""
        n, k = self.n_train, self.config.curvature_images
        if k is None or k >= n:
            return list(range(n))
        g = generator(self.config.seed, CURVATURE_SUBSET)
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    def fit(
        self,
        curvature: Curvature | None = None,
        projection: Projection | None = None,
        density: torch.Tensor | None = None,
    ) -> Attributor:
        """Fit (or take) the curvature, make (or take) the projection and, with `importance`,
        measure (or take) the timestep density."""
        if not self.uses_model:
            return self
        shapes = model_layer_shapes(self.model.unet)
        self.projection = projection or make_projection(
            shapes, self.config.dim, self.projection_seed, self.config.projection
        )
        if self.spec.preconditioner in ("kfac", "kfac-exact", "ekfac"):
            rows = self.curvature_rows()
            self.curvature = curvature or fit_curvature(
                self.model,
                self.train.images[rows],
                rows,
                self.curvature_config(),
                batch_size=self.curvature_batch_size,
                progress=self.progress,
                device=self.device,
                cond=self.train_cond(rows),
            )
        if self.config.importance:
            self.density = density if density is not None else self.fit_density()
        return self

    def fit_density(self) -> torch.Tensor:
        """The importance density of timesteps (T,), from a seeded sample of training images."""
        from attribution.timesteps import bin_sq_norms, density_from_bins

        n, k = self.n_train, min(self.config.profile_images, self.n_train)
        rows = sorted(torch.randperm(n, generator=generator(self.config.seed, PROFILE_SUBSET))[:k].tolist())
        sq = bin_sq_norms(
            self.model,
            self.feature_map("train"),
            self.train.images[rows],
            rows,
            self.spec.train_fn,
            hash_seed(self.config.seed, PROFILE_DRAWS),
            batch_size=self.config.batch_size,
            device=self.device,
            cond=self.train_cond(rows),
        )
        return density_from_bins(sq, self.model.num_timesteps)

    def train_cond(self, rows: list[int]) -> Cond | None:
        """The denoiser's condition of training rows (from `train.conditions`; None if unconditional)."""
        if not hasattr(self, "_train_cond"):
            self._train_cond = as_cond(self.model, getattr(self.train, "conditions", None), self.n_train)
        return select(self._train_cond, rows)

    def measurement(self, side: str) -> Measurement:
        """The training function (side "train") or the query measurement, with the density."""
        if side == "train":
            return Measurement(self.spec.train_fn, density=self.density)
        return Measurement(self.spec.measurement, t_range=self.config.t_range, density=self.density)

    @property
    def split(self) -> bool:
        """Whether (G+λ)^(−½) sits on both sides (a sketch that projects) rather than (G+λ)⁻¹ on the
        training side (Kronecker, or unprojected: the same scores, and the query side stays plain)."""
        return self.projection is not None and self.projection.is_sketch

    def feature_map(self, side: str) -> FeatureMap:
        """The train-side (1/N) or query-side feature map; see the module docstring."""
        if self.projection is None:
            self.fit()
        if side not in self._fmaps:
            shapes = model_layer_shapes(self.model.unet)
            pre = self.spec.preconditioner
            scale = 1.0 if side == "query" else 1.0 / self.n_train
            if pre in ("identity", "trak") or (side == "query" and not self.split):
                fmap = FeatureMap(shapes, self.projection, "identity", device=self.device, scale=scale)
            else:
                fmap = FeatureMap(
                    shapes,
                    self.projection,
                    pre,
                    self.curvature,
                    scale=scale,
                    device=self.device,
                    power=0.5 if self.split else 1.0,
                )
            self._fmaps[side] = fmap
        return self._fmaps[side]

    @property
    def dim(self) -> int:
        if not self.uses_model:
            return self.train.images[0].numel()
        return self.feature_map("train").dim

    # ---- features ----------------------------------------------------------------------------
    def raw_train_features(
        self, rows: list[int] | None = None, progress: bool | None = None, halves: bool = False
    ) -> torch.Tensor:
        """Training features before any dataset-level transform (TRAK's ΦᵀΦ, normalisation):
        (n, D), or with `halves` (n, 2, D) from two independent halves of each image's draws. Where
        the method has halves (`spread_available`) the (n, D) features are their mean, so the index
        (which stores halves) and direct scoring see the very same numbers."""
        rows = list(range(self.n_train)) if rows is None else list(rows)
        images = self.train.images[rows]
        if not self.uses_model:
            flat = images.flatten(1).float()
            return torch.stack([flat, flat], 1) if halves else flat
        keys = [TRAIN_COMMON_KEY] * len(rows) if self.config.common_draws else rows
        f = gradient_features(
            self.model,
            self.feature_map("train"),
            images,
            keys,
            self.measurement("train"),
            self.config.draws,
            self.config.seed,
            self.config.batch_size,
            self.config.stratified,
            self.config.antithetic,
            progress=self.progress if progress is None else progress,
            desc="training features",
            device=self.device,
            halves=halves or self.spread_available,
            cond=self.train_cond(rows),
        )
        return f if halves or not self.spread_available else split_halves(f)[0]

    @property
    def projection_seed(self) -> int:
        c = self.config
        return c.seed if c.projection_seed is None else c.projection_seed

    @property
    def spread_available(self) -> bool:
        """Whether scores get stability figures from independent halves of the draws: a model-based
        method whose draws split evenly (antithetic pairs stay together), not TRAK-style (its
        refitted inverse makes a half-split meaningless) and not the trajectory measurement."""
        unit = 4 if self.config.antithetic else 2
        return (
            self.uses_model
            and self.spec.preconditioner != "trak"
            and self.spec.measurement != "trajectory"
            and self.config.draws % unit == 0
            and self.config.query_draws % unit == 0
        )

    def finish_with_spread(self, raw_halves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw half features (n, 2, D) -> (φ, δ): the finished features and their half-difference
        under the same transforms (normalisation to first order: `_normalize_with_spread`)."""
        return self.finish_pair(*split_halves(raw_halves))

    def finish_pair(self, phi: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `finish_with_spread`, from the raw mean φ (n, D) and half-difference δ (n, D)."""
        if self.spec.preconditioner == "trak":
            phi, delta = phi @ self.trak_inverse, delta @ self.trak_inverse
        return _normalize_with_spread(phi, delta) if self.spec.normalize else (phi, delta)

    def fit_trak(self, raw: torch.Tensor) -> None:
        """TRAK's preconditioner (ΦᵀΦ/N + λI)⁻¹ from all raw training features (N, D)."""
        f = (raw.double().T @ raw.double()) / raw.shape[0]
        lam = self.spec.damping * torch.linalg.eigvalsh(f).clamp(min=0).mean()
        self.trak_inverse = torch.linalg.inv(f + lam * torch.eye(f.shape[0], dtype=f.dtype)).float()

    def finish_train_features(self, raw: torch.Tensor) -> torch.Tensor:
        """Dataset-level transforms of raw training features: TRAK's inverse, normalisation."""
        if self.spec.preconditioner == "trak":
            if self.trak_inverse is None:
                raise RuntimeError("fit_trak() must see all training features first")
            raw = raw @ self.trak_inverse  # symmetric, so rows are (F+λI)⁻¹ φ
        return _normalize(raw) if self.spec.normalize else raw

    def train_features(self) -> torch.Tensor:
        """All training features (N, D), ready for inner products with query features."""
        raw = self.raw_train_features()
        if self.spec.preconditioner == "trak":
            self.fit_trak(raw)
        return self.finish_train_features(raw)

    def query_features(
        self, images: torch.Tensor, trajectory: tuple[torch.Tensor, torch.Tensor] | None = None, cond=None
    ) -> torch.Tensor:
        """ψ (Q, D) for query images (Q, C, H, W) in the denoiser's space (pixels in [-1, 1], or
        latents), under `cond` (a `Cond` or `Conditions`; conditional models only)."""
        if not self.uses_model:
            psi = images.flatten(1).float()
        elif self.spread_available:  # the mean of the halves: the same numbers as with the spread
            psi = split_halves(self._raw_query_features(images, trajectory, True, cond))[0]
        else:
            psi = self._raw_query_features(images, trajectory, False, cond)
        return _normalize(psi) if self.spec.normalize else psi

    def query_features_with_spread(
        self, images: torch.Tensor, trajectory=None, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ψ, δψ), each (Q, D): the query features and the half-difference of their draws. ψ is
        the same as `query_features` gives (up to float round-off); δψ is 0 for `pixel`."""
        if not self.uses_model or self.spec.measurement == "trajectory":
            psi = self.query_features(images, trajectory, cond)
            return psi, torch.zeros_like(psi)
        psi, dpsi = split_halves(self._raw_query_features(images, trajectory, True, cond))
        return _normalize_with_spread(psi, dpsi) if self.spec.normalize else (psi, dpsi)

    def _raw_query_features(self, images, trajectory, halves: bool, cond=None) -> torch.Tensor:
        return gradient_features(
            self.model,
            self.feature_map("query"),
            images,
            [QUERY_KEY] * images.shape[0],
            self.measurement("query"),
            self.config.query_draws,
            self.config.seed,
            self.config.batch_size,
            self.config.stratified,
            self.config.antithetic,
            trajectory=trajectory,
            progress=False,
            device=self.device,
            halves=halves,
            cond=as_cond(self.model, cond, images.shape[0]),
        )

    # ---- scores ------------------------------------------------------------------------------
    def scores(
        self, images: torch.Tensor, trajectory=None, train_features: torch.Tensor | None = None, cond=None
    ) -> torch.Tensor:
        """τ (Q, N) for query images, streaming over training batches (memory O(batch × D), not
        O(N × D)); TRAK-style methods need all features at once for their inverse."""
        psi = self.query_features(images, trajectory, cond)
        if train_features is not None:
            return psi @ train_features.T
        if self.uses_model and self.spec.preconditioner != "trak":
            out = torch.empty(psi.shape[0], self.n_train)
            for rows in self._train_batches():
                phi = self.finish_train_features(self.raw_train_features(rows, progress=False))
                out[:, rows] = psi @ phi.T
            return out
        return psi @ self.train_features().T

    def _train_batches(self):
        """Consecutive lists of training rows, `batch_size` at a time, with a progress bar."""
        bs = self.config.batch_size
        for i in tqdm(
            range(0, self.n_train, bs), desc="scores (training features)", disable=not self.progress
        ):
            yield list(range(i, min(self.n_train, i + bs)))

    def scores_with_spread(
        self, images: torch.Tensor, trajectory=None, cond=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ, se), each (Q, N): the scores and each score's one-dof standard error under new
        draws on both sides, from independent halves (attribution/uncertainty.py)."""
        if self.spec.preconditioner == "trak":
            # ΦᵀΦ is refitted on every draw, and (ΦᵀΦ+λ)⁻¹ blows up half-differences outside the span
            # of Φ that a refit would absorb: no honest half-split figure exists, so none is given
            scores = self.scores(images, trajectory, cond=cond)
            return scores, torch.full_like(scores, float("nan"))
        psi, dpsi = self.query_features_with_spread(images, trajectory, cond)
        out, se = torch.empty(psi.shape[0], self.n_train), torch.empty(psi.shape[0], self.n_train)
        for rows in self._train_batches():
            phi, delta = self.finish_with_spread(self.raw_train_features(rows, progress=False, halves=True))
            out[:, rows] = psi @ phi.T
            se[:, rows] = (psi @ delta.T + dpsi @ phi.T).abs()
        return out, se


__all__ = [
    "DAMPING",
    "DEFAULT_DIM",
    "METHODS",
    "QUERY_KEY",
    "TRAK_DIM",
    "AttributionConfig",
    "Attributor",
    "MethodSpec",
    "dim_arg",
]
