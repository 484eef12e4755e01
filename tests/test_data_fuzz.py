"""Generated hostile and odd image files: each one converts to a finite tensor in [-1, 1] of the
right shape, or is refused with a DataError naming it. Any other exception is a failure.

The cases (a few hundred, seeded, small so the whole run takes seconds): every PIL mode x accepted
format that PIL can write, animated and multi-page files, truncations of valid files at many
offsets, corrupted bytes, random bytes with and without an accepted signature, float TIFFs with
non-finite or out-of-range values, zero-size and huge headers, files of refused formats, and
wrong or odd file names in folders.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.data import (
    DataError,
    conversion_notes,
    image_folder,
    image_to_tensor,
    load_image,
    open_image,
)

ACCEPTED = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
MODES = (
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
    "I;16",
    "I;16L",
    "I;16B",
)
SHAPES = ((1, 8, (8, 8)), (3, (6, 10), (6, 10)))  # (channels, size argument, (H, W))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_image(mode: str, rng: np.random.Generator, w: int = 9, h: int = 7) -> Image.Image:
    """A small image of `mode` with varied pixels."""
    if mode == "F":
        return Image.fromarray(rng.uniform(0, 1, (h, w)).astype(np.float32), mode="F")
    if mode.startswith("I;16"):
        dt = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, (w, h), rng.integers(0, 65536, (h, w)).astype(dt).tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 70000, (h, w)).astype(np.int32), mode="I")
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    if mode == "PA":
        return rgb.quantize(16).convert("PA")
    return rgb.convert(mode)


def _png(w: int, h: int, depth: int = 8, color: int = 0, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _cases() -> list[tuple[str, str, bytes]]:
    """(case id, file name, bytes)."""
    rng = np.random.default_rng(0)
    cases: list[tuple[str, str, bytes]] = []
    base: dict[str, bytes] = {}
    # every mode x accepted format PIL can write
    for mode in MODES:
        img = _noise_image(mode, rng)
        for fmt in ACCEPTED:
            try:
                data = _bytes(img, fmt)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            cases.append((f"mode {mode} as {fmt}", f"m_{mode.replace(';', '_')}.{EXT[fmt]}", data))
            base.setdefault(fmt, data)
    # format options
    rgb = _noise_image("RGB", rng, 24, 20)
    for fmt, kw in [
        ("JPEG", {"progressive": True}),
        ("JPEG", {"quality": 5, "subsampling": 2}),
        ("WEBP", {"lossless": True}),
        ("PNG", {"optimize": True, "bits": 4}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("TIFF", {"compression": "tiff_deflate"}),
        ("TIFF", {"compression": "packbits"}),
        ("TIFF", {"compression": "jpeg"}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
        ("BMP", {"bitmap_format": "bmp"}),
    ]:
        try:
            cases.append((f"{fmt} {kw}", f"opt.{EXT[fmt]}", _bytes(rgb, fmt, **kw)))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    cases.append(("JPEG big", "big.jpg", _bytes(_noise_image("RGB", rng, 64, 48), "JPEG", quality=90)))
    base["JPEG big"] = cases[-1][2]
    # animated and multi-page
    frames = [_noise_image("RGB", rng) for _ in range(3)]
    for fmt in ("GIF", "PNG", "WEBP", "TIFF"):
        data = _bytes(frames[0], fmt, save_all=True, append_images=frames[1:])
        cases.append((f"animated {fmt}", f"anim.{EXT[fmt]}", data))
        base[f"anim {fmt}"] = data
    # truncations of valid files at many offsets
    for key, data in base.items():
        offsets = sorted(
            {
                0,
                1,
                2,
                3,
                7,
                8,
                12,
                16,
                24,
                33,
                50,
                100,
                len(data) // 3,
                len(data) // 2,
                len(data) - 10,
                len(data) - 1,
            }
            & set(range(len(data)))
        )
        for off in offsets:
            cases.append((f"{key} cut at {off}", f"cut_{off}.{EXT.get(key.split()[-1], 'png')}", data[:off]))
    # corrupted bytes (header and body)
    for key, data in base.items():
        for k in range(6):
            b = bytearray(data)
            for pos in rng.integers(0, min(len(b), 64 if k < 3 else len(b)), 1 + k):
                b[pos] = rng.integers(0, 256)
            cases.append((f"{key} corrupted #{k}", f"bad{k}.{EXT.get(key.split()[-1], 'png')}", bytes(b)))
    # random bytes, with and without an accepted signature
    sigs = [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"GIF89a",
        b"BM",
        b"II*\x00",
        b"MM\x00*",
        b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    ]
    for i in range(48):
        sig = sigs[i % len(sigs)]
        n = int(rng.integers(0, 600))
        cases.append((f"random {sig[:4]!r}+{n}", f"rand{i}.png", sig + rng.bytes(n)))
    # float TIFFs: non-finite and odd ranges
    ramp = np.linspace(0, 1, 20).reshape(4, 5)
    floats = {
        "nan": np.where(ramp > 0.5, np.nan, ramp),
        "inf": np.where(ramp > 0.9, np.inf, ramp),
        "-inf": np.where(ramp < 0.1, -np.inf, ramp),
        "all nan": np.full((4, 5), np.nan),
        "negative": -1 - ramp,
        "const negative": np.full((4, 5), -2.0),
        "const zero": np.zeros((4, 5)),
        "const 0.5": np.full((4, 5), 0.5),
        "symmetric": ramp * 2 - 1,
        "0..255": ramp * 255,
        "huge": ramp * 3e38,
        "-huge..huge": (ramp * 2 - 1) * 3e38,
        "subnormal": ramp * 1e-40,
        "tiny range": 0.5 + ramp * 1e-6,
        "max float": np.full((4, 5), 3.4e38),
    }
    for key, arr in floats.items():
        with np.errstate(over="ignore"):
            f32 = arr.astype(np.float32)
        cases.append((f"float {key}", "f.tif", _bytes(Image.fromarray(f32, mode="F"), "TIFF")))
    # zero-size and huge headers
    for w, h in [
        (0, 5),
        (5, 0),
        (0, 0),
        (7000, 7000),
        (100_000, 100_000),
        (2**31 - 1, 1),
        (1, 2**31 - 1),
        (40_000_001, 1),
        (6325, 6325),
    ]:
        cases.append((f"PNG header {w}x{h}", "hdr.png", _png(w, h)))
    gif = bytearray(base["GIF"])
    for w, h in [(0, 0), (65535, 65535)]:
        g = bytearray(gif)
        g[6:10] = struct.pack("<HH", w, h)
        cases.append((f"GIF screen {w}x{h}", "hdr.gif", bytes(g)))
    bmp = bytearray(base["BMP"])
    for w, h in [(0, 7), (100_000, 100_000), (-9, 7), (9, -7)]:
        b = bytearray(bmp)
        b[18:26] = struct.pack("<ii", w, h)
        cases.append((f"BMP {w}x{h}", "hdr.bmp", bytes(b)))
    tif = _bytes(Image.new("L", (3, 2), 9), "TIFF")
    for w, h in [(0, 2), (60_000, 60_000)]:
        t = tif.replace(struct.pack("<HHII", 256, 4, 1, 3), struct.pack("<HHII", 256, 4, 1, w))
        t = t.replace(struct.pack("<HHII", 257, 4, 1, 2), struct.pack("<HHII", 257, 4, 1, h))
        cases.append((f"TIFF {w}x{h}", "hdr.tif", t))
    # refused formats (PIL can write them; none may be decoded)
    for fmt in (
        "PPM",
        "ICO",
        "TGA",
        "PCX",
        "SGI",
        "IM",
        "PDF",
        "EPS",
        "JPEG2000",
        "DDS",
        "QOI",
        "MSP",
        "XBM",
    ):
        src = rgb.convert("1") if fmt in ("MSP", "XBM") else rgb
        try:
            cases.append((f"refused {fmt}", f"x.{fmt.lower()}", _bytes(src, fmt)))
        except (OSError, ValueError, KeyError):
            pass
    # wrong extensions: content decides for image names; a non-image name is refused in folders
    for key, ext in [
        ("PNG", "jpg"),
        ("JPEG", "png"),
        ("GIF", "tif"),
        ("TIFF", "webp"),
        ("BMP", "gif"),
        ("WEBP", "bmp"),
        ("PNG", "txt"),
        ("JPEG", "JPG"),
        ("PNG", ""),
    ]:
        cases.append((f"{key} named .{ext}", f"wrong.{ext}" if ext else "noext", base[key]))
    cases += [
        ("text", "t.png", b"hello\n"),
        ("svg", "s.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("html", "h.png", b"<!doctype html><p>hi"),
        ("empty", "e.png", b""),
    ]
    return cases


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # PIL: saving I-mode PNGs is deprecated
    CASES = _cases()


def _check_tensor(t, channels: int, hw: tuple[int, int]) -> None:
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert tuple(t.shape) == (channels, *hw), t.shape
    assert torch.isfinite(t).all()
    assert t.min() >= -1 and t.max() <= 1


def _try(fn, name: str, counts: Counter, failures: list) -> object | None:
    try:
        out = fn()
    except DataError as e:
        msg = str(e)
        if "\n" in msg or not msg or (name and name not in msg):
            failures.append((name, f"unclear DataError: {msg!r}"))
        counts["clear error"] += 1
        return None
    except Exception as e:  # a traceback for the user: the thing this test is here to find
        failures.append((name, f"{type(e).__name__}: {e}"))
        return None
    counts["converted"] += 1
    return out


def test_generated_hostile_images(tmp_path: Path):
    assert len(CASES) >= 300, len(CASES)
    counts: Counter = Counter()
    failures: list = []
    folder_counts: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning and friends
        for i, (case, fname, data) in enumerate(CASES):
            counts["tried"] += 1
            name = f"case{i}_{fname}"
            img = _try(lambda data=data, name=name: open_image(data, name=name), name, counts, failures)
            if img is not None:
                for channels, size, hw in SHAPES:
                    try:
                        t = image_to_tensor(img, channels, size, name=name)
                        _check_tensor(t, channels, hw)
                        notes = conversion_notes(img, channels, size)
                        assert all(isinstance(n, str) and n for n in notes)
                    except DataError as e:
                        failures.append((f"{case}", f"opened, then refused: {e}"))
                    except Exception as e:
                        failures.append((f"{case}", f"{type(e).__name__}: {e}"))
            # the same bytes from a file, and (every 4th case) in a folder next to a good image
            p = tmp_path / name
            p.write_bytes(data)
            t = _try(lambda p=p: load_image(p, 1, 8), name, Counter(), failures)
            if t is not None:
                try:
                    _check_tensor(t, 1, (8, 8))
                except AssertionError as e:
                    failures.append((case, f"bad tensor: {e}"))
            if (img is None) != (t is None):
                failures.append((case, "bytes and file disagree"))
            if i % 4 == 0:
                d = tmp_path / f"folder{i}"
                d.mkdir()
                Image.new("L", (5, 5), 99).save(d / "0_good.png")
                (d / fname).write_bytes(data)
                ds = _try(lambda d=d: image_folder(d, 3, 6), "", folder_counts, failures)
                if ds is not None:
                    assert len(ds) == 2 and ds.images.shape == (2, 3, 6, 6)
                    assert torch.isfinite(ds.images).all() and ds.images.abs().max() <= 1
            p.unlink()
    print(
        f"\nfuzz: {counts['tried']} tried, {counts['clear error']} clear errors, "
        f"{counts['converted']} converted; folders: {dict(folder_counts)}; failures: {len(failures)}"
    )
    assert not failures, failures[:20]
    assert counts["clear error"] + counts["converted"] == counts["tried"]
    assert counts["converted"] >= 60 and counts["clear error"] >= 100


@pytest.mark.parametrize("fmt", ["PPM", "EPS", "PDF", "ICO", "TGA", "JPEG2000", "QOI"])
def test_refused_formats_name_the_allow_list(fmt):
    data = _bytes(Image.new("RGB", (8, 8), 7), fmt)
    with pytest.raises(DataError, match="accepted: PNG, JPEG, WebP, GIF, BMP, TIFF"):
        open_image(data, name="x")
