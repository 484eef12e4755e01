"""Plain messages instead of tracebacks: the build's settings checked before any work, and the
errors of a full disk or a read-only folder turned into what the user should do.

    add_argument("--draws", type=POSITIVE)       # argparse: "argument --draws: at least 1, not 0"
    check_build(cfg, n, shard_size)              # ConfigError for calls that bypass argparse
    user_error(exc, out_dir)                     # AttributionError for a disk error, else None
"""

from __future__ import annotations

import argparse
import errno
import shutil
from pathlib import Path

from attribution.errors import AttributionError, ConfigError, ModelError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def _count(least: int, name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {v}")
        return v

    parse.__name__ = name  # argparse names the type in its messages
    return parse


POSITIVE = _count(1, "positive whole number")
NON_NEGATIVE = _count(0, "non-negative whole number")


def check_model_family(model) -> None:
    """ModelError for denoisers the index does not handle: anything but a diffusers `UNet2DModel`,
    `UNet2DConditionModel` (pixel or latent; unconditional, class- or text-conditional) or a
    class-conditional `DiTTransformer2DModel`."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    if not isinstance(model.unet, (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel)):
        raise ModelError(
            f"an index can be built for UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel "
            f"denoisers (pixel or latent; unconditional, class- or text-conditional), not "
            f"{type(model.unet).__name__}"
        )


def check_build(cfg, n: int, shard_size: int) -> None:
    """ConfigError for settings no build can use (the command line refuses them earlier)."""
    if n < 1:
        raise ConfigError("no training images to index (the data set is empty, or --n is 0)")
    counts = {
        "shard size": shard_size,
        "batch size": cfg.batch_size,
        "draws": cfg.draws,
        "query draws": cfg.query_draws,
        "curvature draws": cfg.curvature_draws,
    }
    bad = [f"{k} {v!r}" for k, v in counts.items() if not isinstance(v, int) or v < 1]
    if cfg.curvature_images is not None and (
        not isinstance(cfg.curvature_images, int) or cfg.curvature_images < 1
    ):
        bad.append(f"curvature images {cfg.curvature_images!r}")
    if bad:
        raise ConfigError(f"these settings must be positive whole numbers: {', '.join(bad)}")
    if cfg.spec.preconditioner == "trak" and cfg.dim is None:
        raise ConfigError(f"{cfg.method} needs a projection (its (ΦᵀΦ+λ)⁻¹ is D × D): give --dim above 0")


def _is_no_space(e: BaseException, text: str) -> bool:
    return (
        getattr(e, "errno", None) in NO_SPACE
        or "No space left" in text
        or "os error 28" in text
        or ("requested and" in text and "written" in text)
    )  # numpy's short write


def _is_not_writable(e: BaseException, text: str) -> bool:
    return (
        getattr(e, "errno", None) in NOT_WRITABLE
        or "Read-only file system" in text
        or "Permission denied" in text
        or "os error 30" in text
        or "os error 13" in text
    )


def user_error(e: BaseException, out: Path) -> AttributionError | None:
    """A plain error for a full disk or an unwritable --out folder (OSError, or the RuntimeError
    and SafetensorError that FAISS and safetensors raise for them); None for any other error."""
    text = str(e)
    if _is_no_space(e, text):
        try:
            free = f"{shutil.disk_usage(out).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return AttributionError(
            f"--out {out}: the disk is full ({free}); make room and rerun the same "
            "command: the build resumes from its finished parts"
        )
    if _is_not_writable(e, text):
        return ConfigError(
            f"--out {out}: cannot write there ({text.splitlines()[0][:160]}); give a folder you can write to"
        )
    return None
