"""KMeansTokenizer, the tokenizer interface and the image helpers (synthetic data; one real-data test)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import list_images, load_resized, load_rgb, resize_center_crop
from pipeline.tokenizer import (
    KMeansTokenizer,
    Tokenizer,
    codebook_perplexity,
    fingerprint_of,
    load_tokenizer,
    psnr,
)
from tests import conftest

RES, PATCH, K = 64, 8, 32
# Measured 22.3-23.2 dB on held-out synthetic images (K=32, p=8, 64 px, fit seeds 0-3); ~1.5 dB margin.
SYNTH_PSNR_FLOOR = 21.0


def synthetic_images(n: int, size: int = RES, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): ``tests.conftest.synthetic_images`` at this file's resolution."""
    return conftest.synthetic_images(n, size, seed)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_images(48)


@pytest.fixture(scope="module")
def tok(images: np.ndarray) -> KMeansTokenizer:
    return KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)


# ---- tokenizer ----------------------------------------------------------------------------------
def test_shapes_dtypes_and_range(tok: KMeansTokenizer, images: np.ndarray) -> None:
    assert isinstance(tok, Tokenizer)
    assert tok.kind == "kmeans"
    assert tok.resolution == RES and tok.grid == (RES // PATCH, RES // PATCH) and tok.vocab_size == K
    cb = tok.codebook
    assert cb.dtype == torch.float32 and tuple(cb.shape) == (K, PATCH * PATCH * 3)
    ids = tok.encode(images[:5])
    assert ids.dtype == np.int64 and ids.shape == (5, *tok.grid)
    assert ids.min() >= 0 and ids.max() < K
    rec = tok.decode(ids)
    assert rec.dtype == np.uint8 and rec.shape == (5, RES, RES, 3)
    emb = tok.embed(torch.from_numpy(ids))
    assert emb.dtype == torch.float32 and tuple(emb.shape) == (5, *tok.grid, PATCH * PATCH * 3)
    assert torch.equal(emb[2, 3, 4], cb[ids[2, 3, 4]])
    assert tok.encode(images[:0]).shape == (0, *tok.grid)


def test_rejects_bad_inputs(tok: KMeansTokenizer, images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expects 64"):
        tok.encode(synthetic_images(1, size=32))
    with pytest.raises(ValueError):
        tok.encode(images.astype(np.float32))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.full((1, *tok.grid), K))
    with pytest.raises(ValueError, match="out of range"):
        tok.embed(torch.tensor([-1]))


def test_deterministic_for_a_seed(tok: KMeansTokenizer, images: np.ndarray) -> None:
    again = KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)
    assert tok.codebook.numpy().tobytes() == again.codebook.numpy().tobytes()
    assert tok.fingerprint == again.fingerprint
    other = KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=1, max_patches=2000)
    assert other.fingerprint != tok.fingerprint


def test_array_and_batches_give_the_same_fit(tok: KMeansTokenizer, images: np.ndarray) -> None:
    batches = (images[s : s + 7] for s in range(0, len(images), 7))
    streamed = KMeansTokenizer.fit(batches, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)
    assert streamed.fingerprint == tok.fingerprint


def test_save_load_round_trip(tok: KMeansTokenizer, images: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "tok.pt"
    tok.save(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"kind", "config", "state_dict"} and raw["kind"] == "kmeans"
    loaded = load_tokenizer(path)
    assert isinstance(loaded, KMeansTokenizer)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.config == tok.config
    np.testing.assert_array_equal(loaded.encode(images), tok.encode(images))


def test_fingerprint_tracks_weights_and_config(tok: KMeansTokenizer) -> None:
    fp = tok.fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    cb = tok.codebook.clone()
    cb[3, 5] = torch.nextafter(cb[3, 5], torch.tensor(2.0))  # a 1-ulp change
    assert KMeansTokenizer(tok.config, cb).fingerprint != fp
    assert KMeansTokenizer(tok.config, tok.codebook.clone()).fingerprint == fp
    cfg, sd = tok.config_dict(), tok.state_dict()
    assert fingerprint_of("kmeans", {**cfg, "seed": 99}, sd) != fp
    assert fingerprint_of("kmeans", dict(reversed(list(cfg.items()))), sd) == fp  # key order irrelevant


def test_reconstruction_psnr_on_synthetic(tok: KMeansTokenizer) -> None:
    held_out = synthetic_images(16, seed=123)
    rec = tok.decode(tok.encode(held_out))
    value = psnr(held_out, rec)
    assert value > SYNTH_PSNR_FLOOR, value
    mean = np.broadcast_to(held_out.reshape(-1, 3).mean(0).round().astype(np.uint8), held_out.shape)
    assert value > psnr(held_out, np.ascontiguousarray(mean)) + 5


def test_degenerate_data_reseeds_dead_clusters() -> None:
    flat = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    flat[2:] = 200  # only two distinct patches for 8 codes
    tok = KMeansTokenizer.fit(flat, vocab_size=8, patch=8, iters=5, seed=0)
    assert torch.isfinite(tok.codebook).all()
    assert psnr(flat, tok.decode(tok.encode(flat))) == math.inf


def test_metrics() -> None:
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE = 255^2 / 96
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(10 * math.log10(96))
    assert codebook_perplexity(np.zeros(10, dtype=np.int64), 4) == pytest.approx(1.0)
    assert codebook_perplexity(np.arange(8) % 4, 4) == pytest.approx(4.0)


# ---- image helpers --------------------------------------------------------------------------------
def _jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    Image.new("L", (20, 10), 128).save(tmp_path / "grey.png")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red
    Image.new("RGBA", (20, 10), (0, 0, 255, 0)).save(tmp_path / "rgba.png")  # fully transparent
    Image.new("RGB", (20, 10), (10, 200, 30)).save(tmp_path / "actually_png.JPEG", format="PNG")
    Image.new("P", (20, 10), 3).save(tmp_path / "palette.png")
    for name in ("grey.png", "cmyk.jpg", "rgba.png", "actually_png.JPEG", "palette.png"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (20, 10), name
    assert load_rgb(tmp_path / "grey.png").getpixel((3, 3)) == (128, 128, 128)
    r, g, b = load_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # over white
    assert load_rgb(tmp_path / "actually_png.JPEG").getpixel((1, 1)) == (10, 200, 30)


def test_load_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (tmp_path / "rot.jpg").write_bytes(_jpeg_bytes(Image.new("RGB", (40, 20), (90, 90, 90)), exif=exif))
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_load_rgb_rejects_bad_files(tmp_path: Path) -> None:
    good = _jpeg_bytes(Image.fromarray(synthetic_images(1, size=128)[0]))
    cases = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "notes.JPEG": b"this is not an image\n" * 10,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_rgb(tmp_path / name)
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big\.png.*max_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=19_999)
    assert load_rgb(tmp_path / "big.png", max_pixels=20_000).size == (200, 100)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.jpg")


def test_resize_center_crop_box() -> None:
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # the central square is white, the sides black
    out, box = resize_center_crop(Image.fromarray(arr), 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    assert box == (0, 100, 100, 100)
    # Only the white centre survives; the bicubic kernel may read just outside crop_box at the border,
    # exactly as resize-then-crop would.
    assert out[:, 1:-1].min() == 255 and out.min() > 200
    out, box = resize_center_crop(Image.new("RGB", (30, 61)), 64)  # upsampling, odd excess
    assert out.shape == (64, 64, 3) and box == (15, 0, 30, 30)


def test_list_images_is_sorted_recursive_and_filtered(tmp_path: Path) -> None:
    names = ("b/z.PNG", "a/y.jpeg", "a/x.Jpg", "c.webp", "d.bmp", "notes.txt", "a/.hidden.jpg", ".git/e.jpg")
    for rel in names:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a/x.Jpg", "a/y.jpeg", "b/z.PNG", "c.webp", "d.bmp"]


# ---- real data ------------------------------------------------------------------------------------
DATA_ROOT = Path(os.environ.get("VQPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATA = DATA_ROOT / "imagenette"


@pytest.mark.realdata
def test_imagenette_beats_mean_colour_baseline() -> None:
    if not (DATA / "train").is_dir() or not (DATA / "val").is_dir():
        pytest.skip(f"imagenette not found at {DATA} (set VQPT_DATA to the folder holding imagenette/)")
    train = list_images(DATA / "train")[::10]  # 150 images, every class
    val = list_images(DATA / "val")[::8]  # 50 images
    tok = KMeansTokenizer.fit(load_resized(train, 128), vocab_size=128, patch=8, iters=10, max_patches=50_000)
    x = load_resized(val, 128)
    ids = tok.encode(x)
    value = psnr(x, tok.decode(ids))
    mean = np.broadcast_to(x.reshape(-1, 3).mean(0).round().astype(np.uint8), x.shape)
    baseline = psnr(x, np.ascontiguousarray(mean))
    assert value > baseline + 5, (value, baseline)
    assert codebook_perplexity(ids, 128) > 16
