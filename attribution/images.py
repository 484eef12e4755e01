"""One image file -> a tensor: the format allow-list (checked on the file's first bytes before
any decoder runs), decoding with only those plugins, and the conversion of every PIL mode to the
model's channels and size in [-1, 1], with notes that say exactly what was done.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from attribution.errors import DataError

MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF"
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)
_OTHER_SIGNATURES = (  # refused; named in the message so the user knows what they sent
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML (SVG?)"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"gimp xcf", "GIMP (XCF)"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"v/1\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"\x0a\x05\x01", "PCX"),
    (b"icns", "ICNS"),
    (b"SIMPLE  =", "FITS"),
)
# Modes PIL converts to L and RGB directly (nothing to check when an image is opened).
_PLAIN_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# Modes whose grey levels are the pixels themselves (no colour conversion to grayscale).
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _shown(name) -> str:
    """A file name safe to print on one line: undecodable bytes as \\xNN, control characters escaped."""
    s = str(name)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a POSIX name that is not UTF-8 (surrogate-escaped bytes)
        try:
            s = os.fsencode(s).decode("utf-8", "backslashreplace")
        except UnicodeError:
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s


def _sniff(head: bytes) -> str | None:
    """The accepted format whose signature starts `head`, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _SIGNATURES if head.startswith(sig)), None)


def _describe(head: bytes) -> str | None:
    """What a refused file looks like (PDF, EPS, HEIF, ...), if its signature is a known one."""
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF (ISO media)"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n#":
        return "Netpbm (PBM/PGM/PPM)"
    return next((what for sig, what in _OTHER_SIGNATURES if head.startswith(sig)), None)


def _floor8(values: np.ndarray) -> np.ndarray:
    return np.floor(values).clip(0, 255).astype(np.uint8)


def _wide_to_8bit(img: Image.Image, shown: str) -> tuple[Image.Image, str]:
    """A float (F) or integer (I, I;16...) image -> 8-bit grey ('L'), and the mapping used, in words.

    - I;16 (16 bit): v × 255 / 65535.
    - I (32-bit integers): within 0..255 used as 8-bit levels; within 0..65535 read as 16 bit.
    - F (float): NaN or infinite pixels are refused. Within [0, 1]: v × 255; within [-1, 1] with
      negatives: (v + 1) × 127.5 (the model's own convention); within [0, 255]: v as 8-bit levels.
    - Anything else (negative, or above the range of the type) is stretched linearly from
      [min, max] to 0..255.
    Levels are rounded down. An image that is one value outside every range above (no stretch
    possible) is refused; one that becomes a single grey level is flagged by `conversion_notes`.
    """
    mode = img.mode
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim != 2:
        raise DataError(f"{shown}: {mode} image with {arr.shape[-1]} channels is not supported")
    if mode == "F":
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise DataError(
                f"{shown}: {bad:,} of {arr.size:,} pixels are not finite numbers (NaN or "
                "infinity); a float image must hold finite values"
            )
    lo, hi = float(arr.min()), float(arr.max())
    kind = "float" if mode == "F" else "16-bit" if mode.startswith("I;16") else "32-bit integer (I-mode)"
    if mode.startswith("I;16"):
        u8, note = _floor8(arr / 65535.0 * 255.0), "16-bit pixels scaled to 8 bits as v × 255 / 65535"
    elif mode == "F" and lo >= 0 and hi <= 1:
        u8, note = _floor8(arr * 255.0), "float pixels in [0, 1] scaled to 8 bits as v × 255"
    elif mode == "F" and lo >= -1 and hi <= 1:
        u8, note = _floor8((arr + 1.0) * 127.5), "float pixels in [-1, 1] mapped to 8 bits as (v + 1) × 127.5"
    elif lo >= 0 and hi <= 255:
        u8, note = _floor8(arr), f"{kind} pixels in [0, 255] used as 8-bit levels"
    elif mode != "F" and lo >= 0 and hi <= 65535:
        u8, note = (
            _floor8(arr / 65535.0 * 255.0),
            f"{kind} pixels in [0, 65535] read as 16 bit: v × 255 / 65535",
        )
    elif hi > lo:
        u8 = _floor8((arr - lo) / (hi - lo) * 255.0)
        shift = f"v + {-lo:g}" if lo < 0 else f"v − {lo:g}"
        note = (
            f"{kind} pixels from {lo:g} to {hi:g} fit none of the fixed ranges, so they were "
            f"stretched linearly to 8 bits as ({shift}) × 255 / {hi - lo:g}"
        )
    else:
        span = "[-1, 255]" if mode == "F" else "0..65535"
        raise DataError(
            f"{shown}: every pixel of this {kind} image is {lo:g}, outside {span}, so no "
            "mapping to 8 bits can show anything"
        )
    return Image.fromarray(u8, mode="L"), note + " (rounded down)"


@functools.lru_cache(maxsize=1)
def _lab_transform():
    from PIL import ImageCms

    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )


def _prepare(img: Image.Image, shown: str) -> Image.Image:
    """Bring unusual modes to L, RGB or RGBA (alpha on black); common modes pass unchanged."""
    mode = img.mode
    if mode == "F" or mode.startswith("I"):
        return _wide_to_8bit(img, shown)[0]
    try:
        if mode == "LAB":
            from PIL import ImageCms

            return ImageCms.applyTransform(img, _lab_transform())
        if mode in ("La", "RGBa"):  # premultiplied alpha: on black, the stored colours are the result
            arr = np.asarray(img)[..., :-1]
            return Image.fromarray(np.ascontiguousarray(arr[..., 0] if mode == "La" else arr))
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
        return img
    except Exception as e:  # ImageCms.PyCMSError, ValueError, OSError from a damaged palette
        raise DataError(f"{shown}: its {mode} pixels cannot be converted to grey or RGB ({e})") from None


def image_to_tensor(
    img: Image.Image, channels: int, size: int | tuple[int, int], name: str | None = None
) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 in [-1, 1]; DataError (naming `name`) if it cannot be.

    Transparent pixels become black (MNIST-style background); 16-bit, 32-bit integer and float
    modes are mapped to 8 bits as `_wide_to_8bit` says; LAB goes to sRGB through LittleCMS, CMYK,
    YCbCr and the rest through PIL. The image is resized (bicubic, antialiased) to `size`
    ignoring aspect ratio. `conversion_notes` says in words what was done.
    """
    shown = _shown(name) if name is not None else "image"
    h, w = (size, size) if isinstance(size, int) else size
    if img.size[0] <= 0 or img.size[1] <= 0:
        raise DataError(f"{shown}: image has zero size ({img.size[0]}x{img.size[1]})")
    img = _prepare(img, shown)
    target = "L" if channels == 1 else "RGB"
    try:
        try:
            img = img.convert(target)
        except ValueError:  # no direct conversion (e.g. HSV -> L): go through RGB
            img = img.convert("RGB").convert(target)
    except (ValueError, OSError) as e:
        raise DataError(f"{shown}: its {img.mode} pixels cannot be converted to {target} ({e})") from None
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def conversion_notes(img: Image.Image, channels: int, size: int | tuple[int, int]) -> list[str]:
    """Plain words for what `image_to_tensor(img, channels, size)` does to an image from `open_image`.

    Each note is one phrase (no final full stop), e.g. "resized from 64×48 to 28×28 (aspect ratio
    not kept)" or the exact mapping used for float and 16-bit pixels. The last note flags an image
    that is one grey level everywhere after conversion. The app can show these next to a query.
    """
    notes = []
    mode = img.mode
    if img.info.get("animated"):
        notes.append(f"{img.info.get('source_format', 'animated')} with several frames: the first is used")
    h, w = (size, size) if isinstance(size, int) else size
    if img.size != (w, h):
        notes.append(
            f"resized from {img.size[0]}×{img.size[1]} to {w}×{h}"
            + (" (aspect ratio not kept)" if img.size[0] * h != img.size[1] * w else "")
        )
    if mode == "F" or mode.startswith("I"):
        try:
            notes.append(_wide_to_8bit(img, "image")[1])
        except DataError as e:
            return notes + [str(e)]
    elif mode == "LAB":
        notes.append("CIELAB colours converted to sRGB (LittleCMS, D50 white)")
    elif mode == "CMYK":
        notes.append(
            "CMYK converted to RGB without a colour profile: R = (255 − C) × (255 − K) / 255, "
            "G and B likewise from M and Y"
        )
    elif mode == "YCbCr":
        notes.append("YCbCr converted to RGB (full-range ITU-R BT.601, as in JPEG)")
    elif mode == "1":
        notes.append("1-bit pixels: 0 is black, 1 is white")
    elif mode in ("La", "RGBa"):
        notes.append("premultiplied alpha: the stored colours are used as they are, i.e. on black")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        notes.append("transparent pixels put on a black background")
    if channels == 1 and mode not in _GREY_MODES:
        notes.append("converted to grayscale as 0.299 R + 0.587 G + 0.114 B")
    elif channels == 3 and mode in _GREY_MODES:
        notes.append("grey copied into the red, green and blue channels")
    try:
        flat = _prepare(img, "image").convert("L" if channels == 1 else "RGB")
        lo, hi = (
            flat.getextrema()
            if channels == 1
            else (min(e[0] for e in flat.getextrema()), max(e[1] for e in flat.getextrema()))
        )
        if lo == hi:
            notes.append(
                f"every pixel is the same (grey level {lo} of 255) after conversion: a blank "
                "image, which no training image can explain"
            )
    except (DataError, ValueError, OSError):
        pass
    return notes


def _read_head(path_or_bytes, is_bytes: bool, shown: str):
    """(source for PIL, its first 16 bytes); DataError if the file cannot be read."""
    try:
        if is_bytes:
            src = io.BytesIO(bytes(path_or_bytes))
            head = src.getvalue()[:16]
        elif hasattr(path_or_bytes, "read"):
            src = path_or_bytes
            head = src.read(16)
            src.seek(0)
        else:
            src = Path(path_or_bytes)
            with open(src, "rb") as f:
                head = f.read(16)
    except FileNotFoundError:
        raise DataError(f"{shown}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: is a folder, not an image") from None
    except PermissionError:
        raise DataError(f"{shown}: cannot be read (permission denied)") from None
    except OSError as e:
        raise DataError(f"{shown}: cannot be read ({e.strerror or type(e).__name__})") from None
    return src, head


def open_image(path_or_bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode one image (a path, its bytes or a binary file object); DataError naming
    it on anything wrong, never another exception.

    Only ACCEPTED_FORMATS are decoded (checked from the file's first bytes, then PIL runs with
    only those decoders). Images over MAX_PIXELS are refused from their header, before decoding
    (decompression bombs). Of an animated GIF/PNG/WebP or a multi-page TIFF the first frame is
    used (`info["animated"]` is then True). Float images with NaN or infinite pixels, float or
    wide-integer images that no mapping to 8 bits can show, and modes that cannot be converted
    are refused (see `_wide_to_8bit`); `info["source_format"]` names the format.
    """
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    shown = _shown(name if name is not None else "image" if is_bytes else path_or_bytes)
    src, head = _read_head(path_or_bytes, is_bytes, shown)
    if not head:
        raise DataError(f"{shown}: the file is empty (0 bytes)")
    fmt = _sniff(head)
    if fmt is None:
        what = _describe(head)
        raise DataError(
            f"{shown}: not a readable image: "
            + (f"{what} is not an accepted format" if what else "not in an accepted format")
            + f" (accepted: {ACCEPTED_NAMES})"
        )
    try:
        with Image.open(src, formats=ACCEPTED_FORMATS) as img:
            if img.size[0] <= 0 or img.size[1] <= 0:
                raise DataError(f"{shown}: image has zero size ({img.size[0]}x{img.size[1]})")
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise DataError(
                    f"{shown}: image is {img.size[0]}x{img.size[1]}, larger than the "
                    f"{MAX_PIXELS:,}-pixel limit"
                )
            img.load()
            out = img.copy()
            try:
                animated = bool(getattr(img, "is_animated", False))
            except Exception:  # a damaged later frame: the first one decoded, so use it
                animated = True
            detected = img.format or fmt
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(
            f"{shown}: image dimensions are far too large (over PIL's decompression-bomb "
            f"limit; this project accepts up to {MAX_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{shown}: corrupt or truncated {fmt} image (it starts like one, but its header cannot be read)"
        ) from None
    except MemoryError:
        raise DataError(f"{shown}: too large to decode in memory") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise DataError(
            f"{shown}: corrupt or truncated {fmt} image ({type(e).__name__}: {_shown(e)[:200]})"
        ) from None
    out.info["source_format"] = detected
    out.info["animated"] = animated
    if out.mode not in _PLAIN_MODES:  # refuses non-finite floats, unmappable wide images, odd modes
        _prepare(out, shown)
    return out


def load_image(path: str | Path, channels: int, size: int | tuple[int, int]) -> torch.Tensor:
    """One image file -> (C, H, W) in [-1, 1]."""
    return image_to_tensor(open_image(Path(path), name=str(path)), channels, size, name=str(path))
