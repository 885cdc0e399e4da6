"""`vqpt show` (decoded samples as a PNG grid, originals beside them, ADE20K overlays) and `vqpt inspect --png`,
on small generated datasets tokenised by the job's own steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.tokenizer import load_tokenizer
from pipeline.tokenizer.codebook_only import CodebookTokenizer
from storage.codec import fit_codec
from storage.dataset import TokenDataset
from storage.manifest import DatasetMeta, write_split
from storage.shard import Sample
from tests.token_splits import tokenise_here
from vqpt import draw
from vqpt.cli import main
from vqpt.sample_data import generate_ade20k, generate_imagenet_folder


@pytest.fixture(scope="module")
def kmeans_split(tmp_path_factory) -> tuple[Path, Path]:
    """12 generated ImageNet-layout JPEGs (3 classes) -> k-means tokens at 64 px (8 x 8, K = 32); (split, images)."""
    root = tmp_path_factory.mktemp("show")
    images = generate_imagenet_folder(root / "imgs", classes=3, per_class=4)
    return tokenise_here(images, "imagenet", "train", root / "ds"), images


@pytest.fixture(scope="module")
def ade_split(tmp_path_factory) -> Path:
    """6 generated ADE20K scenes with label maps -> k-means tokens at 64 px, label maps at 32 px."""
    root = tmp_path_factory.mktemp("showade")
    ade = generate_ade20k(root / "ade", train=6, val=1)
    return tokenise_here(ade, "ade20k", "training", root / "ds", labelmap_resolution=32)


def _tiles(png: Path, sidecar: dict) -> list[list[np.ndarray]]:
    pixels = np.asarray(Image.open(png).convert("RGB"))
    return [[pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in s["boxes"]] for s in sidecar["samples"]]


def _original(images: Path, key: str, crop_box, side: int) -> np.ndarray:
    """The original as the tokenizer saw it, recomputed here with PIL from the stored crop box."""
    top, left, h, w = (int(v) for v in crop_box)
    with Image.open(images / f"{key}.JPEG") as img:
        out = img.convert("RGB").resize((side, side), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return np.asarray(out)


def test_show_draws_reconstructions_beside_originals_with_their_psnr(kmeans_split, tmp_path, capsys):
    split, images = kmeans_split
    png = tmp_path / "grid.png"
    assert main(["show", str(split), "--n", "5", "--seed", "1", "--source", str(images), "--out", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert len(sidecar["samples"]) == 5 and len({s["key"] for s in sidecar["samples"]}) == 5
    # 64 px tiles doubled to 128; 2 images per tile; 3 caption lines (key, class, PSNR); 4 columns -> 2 rows.
    assert sidecar["side"] == 128 and Image.open(png).size == draw.grid_size(5, 2, 3, 128, 4) == (1080, 358)
    tokenizer = load_tokenizer(split.parent / "tokenizer.pt")
    ds = TokenDataset(str(split))
    tiles = _tiles(png, sidecar)
    for s, (original_tile, recon_tile) in zip(sidecar["samples"], tiles):
        sample = ds.get(s["key"])
        assert s["class"] == s["key"].split("/")[1] and s["label"] == int(s["key"].split("/")[1][1:])
        recon = tokenizer.decode(sample["tokens"][None])[0]
        original = _original(images, s["key"], sample["crop_box"], 64)
        mse = np.mean((original.astype(np.float64) - recon.astype(np.float64)) ** 2)
        assert s["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
        assert np.array_equal(recon_tile, recon.repeat(2, 0).repeat(2, 1))  # the tile is the decoded sample
        assert np.array_equal(original_tile, original.repeat(2, 0).repeat(2, 1))
    recons = [t[1] for t in tiles]
    assert all(t.std() > 10 for t in recons)  # not blank
    assert all(not np.array_equal(a, b) for i, a in enumerate(recons) for b in recons[i + 1:])
    assert sidecar["psnr_db_mean"] == pytest.approx(np.mean([s["psnr_db"] for s in sidecar["samples"]]))
    # --keys picks exactly those samples, in that order; the same seed draws the same samples.
    keys = [s["key"] for s in sidecar["samples"]][:2][::-1]
    assert main(["show", str(split), "--keys", ",".join(keys), "--out", str(tmp_path / "k.png")]) == 0
    assert [s["key"] for s in json.loads((tmp_path / "k.json").read_text())["samples"]] == keys
    assert main(["show", str(split), "--n", "5", "--seed", "1", "--out", str(tmp_path / "again.png")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [s["key"] for s in again["samples"]] == [s["key"] for s in sidecar["samples"]]


def test_show_mistakes_are_one_line(kmeans_split, tmp_path, capsys):
    split, images = kmeans_split
    other = tmp_path / "other.pt"
    CodebookTokenizer(torch.randn(32, 4), resolution=64, grid=(8, 8)).save(other)
    for argv, says in ((["--keys", "train/nope"], "no sample with key 'train/nope'"),
                       (["--tokenizer", str(other)], "did not make the tokens"),
                       (["--source", str(tmp_path)], "ImageNet split folder")):
        capsys.readouterr()
        assert main(["show", str(split), "--out", str(tmp_path / "x.png"), *argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_show_ade20k_draws_label_maps_over_the_images_with_a_legend(ade_split, tmp_path):
    png = tmp_path / "ade.png"
    assert main(["show", str(ade_split), "--n", "3", "--out", str(png)]) == 0
    sidecar = json.loads(png.with_suffix(".json").read_text())
    samples = sidecar["samples"]
    ds = TokenDataset(str(ade_split))
    maps = [ds.get(s["key"])["labelmap"] for s in samples]
    present = sorted({int(c) for m in maps for c in np.unique(m) if c > 0})
    names = ["wall", "floor, flooring", "tree", "bed", "person", "door", "car", "chair"]
    by_index = dict(zip((1, 4, 5, 8, 13, 15, 20, 24), names))  # vqpt.sample_data's objectInfo150
    assert sidecar["legend"] == [by_index[c] for c in present] and {"wall", "floor, flooring"} <= set(sidecar["legend"])
    rows = sidecar["legend_rows"]
    assert 1 <= rows <= len(present) and Image.open(png).size == draw.grid_size(3, 1, 2, 128, 3, rows)
    tokenizer = load_tokenizer(ade_split.parent / "tokenizer.pt")
    tiles = _tiles(png, sidecar)
    flat = [t[0] for t in tiles]
    assert all(t.std() > 10 for t in flat) and all(not np.array_equal(a, b) for i, a in enumerate(flat)
                                                   for b in flat[i + 1:])
    for s, lm, (tile,) in zip(samples, maps, tiles):
        recon = tokenizer.decode(ds.get(s["key"])["tokens"][None])[0].repeat(2, 0).repeat(2, 1)
        labels = lm.repeat(4, 0).repeat(4, 1)  # 32 px label map on the 128 px tile
        other = labels == 0
        assert np.array_equal(tile[other], recon[other])  # "other" is not painted
        colour = draw.ADE20K_PALETTE[np.maximum(labels, 1) - 1].astype(float)
        near_tile = np.abs(tile[~other] - colour[~other]).mean()
        near_recon = np.abs(recon[~other].astype(float) - colour[~other]).mean()
        assert near_tile < 0.75 * near_recon  # labelled pixels are pulled towards their class colour
        assert s["classes"] == [by_index[c] for c in sorted({int(c) for c in np.unique(lm) if c > 0})]


def test_show_refuses_an_embedding_only_tokenizer_in_one_line(tmp_path, capsys):
    tokenizer = CodebookTokenizer(torch.randn(16, 8), resolution=64, grid=(8, 8), source="SeiT codebook.ckpt")
    rng = np.random.default_rng(0)
    samples = [Sample(key=f"train/{i}", tokens=rng.integers(0, 16, (8, 8)), label=0) for i in range(3)]
    meta = DatasetMeta(split="train", codec=fit_codec("zstd2d", None, 16, grid=(8, 8)).spec,
                       tokenizer_fingerprint=tokenizer.fingerprint, grid=(8, 8), vocab_size=16, resolution=64,
                       class_names=("a",))
    write_split(str(tmp_path / "seit" / "train"), samples, meta)
    tokenizer.save(tmp_path / "seit" / "tokenizer.pt")
    assert main(["show", str(tmp_path / "seit" / "train"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "embedding-only" in err and "--vitvqgan" in err
    assert not (tmp_path / "x.png").exists()


def test_inspect_png_draws_the_token_and_bytes_histograms(kmeans_split, tmp_path, capsys):
    split, _ = kmeans_split
    png = tmp_path / "hist.png"
    assert main(["inspect", str(split), "--png", str(png)]) == 0
    info = json.loads(capsys.readouterr().out)
    hist = info["histograms"]
    ds = TokenDataset(str(split))
    ids = np.stack([ds[i]["tokens"] for i in range(len(ds))])
    counts = np.bincount(ids.ravel(), minlength=32)
    assert hist["samples_read"] == 12 and hist["codes_used"] == int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum()
    assert hist["entropy_bits_per_token"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert hist["bytes_per_image_alone_mean"] > 0 and hist["bytes_per_image_split"] == info["bytes_per_sample"]
    assert Image.open(png).size == (1100, 380) and np.asarray(Image.open(png).convert("L")).std() > 5
