"""The methods: each is a configuration of the same influence machinery, and the config that
fixes a run's scores.

A method (`MethodSpec`) is preconditioner × GGN type × weight sharing × training function ×
measurement × normalisation; `METHODS` names the ones the tool offers (EK-FAC, K-FAC variants,
TRAK, D-TRAK, Journey-TRAK, gradient similarity, pixel similarity). `AttributionConfig` adds the
draws, the projection, the damping and the seed: everything that changes the scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from attribution.errors import ConfigError

DEFAULT_DIM = 16384  # count-sketch buckets at damping 0.1 (ARCHITECTURE.md "Damping, draws and D")
DAMPING = 0.1  # relative to each layer's mean eigenvalue; chosen a priori (ARCHITECTURE.md)
TRAK_DIM = 8192  # TRAK-style methods invert a D × D matrix


@dataclass(frozen=True)
class MethodSpec:
    preconditioner: str  # identity | kfac | kfac-exact | ekfac | trak | pixel
    ggn: str = "model"
    sharing: str = "expand"
    train_fn: str = "loss"
    measurement: str = "loss"
    normalize: bool = False
    damping: float = DAMPING
    description: str = ""
    dim: int = DEFAULT_DIM  # default feature budget D

    @property
    def needs_curvature(self) -> bool:
        """Whether the method preconditions with a fitted curvature (K-FAC, EK-FAC)."""
        return self.preconditioner in ("kfac", "kfac-exact", "ekfac")


METHODS: dict[str, MethodSpec] = {
    "ekfac": MethodSpec("ekfac", description="EK-FAC influence, K-FAC-expand, MC GGN (recommended)"),
    "kfac": MethodSpec("kfac", description="K-FAC-expand influence, MC GGN, factored damping (fast path)"),
    "kfac-exact-damping": MethodSpec("kfac-exact", description="K-FAC-expand, exact damping"),
    "kfac-reduce": MethodSpec("kfac", sharing="reduce", description="K-FAC-reduce influence, MC GGN"),
    "kfac-empirical": MethodSpec("kfac", ggn="loss", description="K-FAC-expand, empirical Fisher"),
    "ekfac-empirical": MethodSpec("ekfac", ggn="loss", description="EK-FAC-expand, empirical Fisher"),
    "trak": MethodSpec(
        "trak",
        ggn="loss",
        damping=1e-3,
        dim=TRAK_DIM,
        description="TRAK: (ΦᵀΦ+λ)⁻¹ in projected space, loss both sides",
    ),
    "dtrak": MethodSpec(
        "trak",
        ggn="loss",
        train_fn="square_norm",
        measurement="square_norm",
        damping=1e-3,
        dim=TRAK_DIM,
        description="D-TRAK: TRAK with the square-norm function both sides",
    ),
    "journey-trak": MethodSpec(
        "trak",
        ggn="loss",
        measurement="trajectory",
        damping=1e-3,
        dim=TRAK_DIM,
        description="Journey-TRAK: TRAK, loss along the query's own trajectory",
    ),
    "gradcos": MethodSpec("identity", normalize=True, description="gradient cosine similarity"),
    "gradsim": MethodSpec("identity", description="gradient dot product (TracIn, one checkpoint)"),
    "pixel": MethodSpec("pixel", normalize=True, description="pixel-space cosine similarity (no model)"),
}


@dataclass
class AttributionConfig:
    """Everything that fixes the scores. `dim=None` means no projection (small models only);
    "default" resolves to the method's D when the config is made."""

    method: str = "ekfac"
    draws: int = 16  # (t, ε) draws per training image: two independent halves of 8
    query_draws: int = 128
    curvature_draws: int = 4
    curvature_min_rows: int = 4000  # small sets: more curvature draws per image, up to this many rows
    curvature_images: int | None = 1000  # a seeded random subset fits the curvature; None: all
    dim: int | str | None = "default"
    projection: str = "sketch"  # "sketch" (count sketch, split preconditioner) | "kronecker" (fast path)
    damping: float | None = None  # relative; None: the method's default
    measurement: str | None = None  # None: the method's default
    t_range: tuple[int, int] | None = None
    normalize: bool | None = None
    seed: int = 0
    projection_seed: int | None = None  # the sketch's seed; None: `seed`
    batch_size: int = 32
    stratified: bool = True
    antithetic: bool = True  # draw 2j+1 uses −ε of draw 2j
    importance: bool = True  # timesteps drawn by importance (attribution/timesteps.py)
    common_draws: bool = False  # every training image gets the same (t, ε) draws (common random numbers)
    profile_images: int = 32  # training images that measure the importance density
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dim == "default":
            self.dim = METHODS[self.method].dim
        elif self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"dim must be a positive int, None (unprojected) or 'default', not {self.dim!r}")
        if self.t_range is not None:
            self.t_range = tuple(self.t_range)
        if self.damping is not None and not (self.damping > 0 and self.damping < float("inf")):
            raise ConfigError(
                f"damping must be a positive number (relative to the mean eigenvalue), not {self.damping!r}"
            )

    @property
    def spec(self) -> MethodSpec:
        s = METHODS[self.method]
        return replace(
            s,
            damping=self.damping if self.damping is not None else s.damping,
            measurement=self.measurement or s.measurement,
            normalize=s.normalize if self.normalize is None else self.normalize,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def dim_arg(dim: int | None) -> int | str | None:
    """A command line's --dim: absent -> the method's default D, 0 -> unprojected."""
    return "default" if dim is None else (dim or None)
