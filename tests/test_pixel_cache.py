"""The decoded-pixel cache (pretrain.pixel_cache) and the pixel stream reading it (generated JPEGs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.images import load_rgb, resize_center_crop
from pretrain.pixel_cache import build_pixel_cache, main, open_pixel_cache
from pretrain.pixels import PixelAugment, PixelFolderStream, list_split
from vqpt.sample_data import generate_imagenet_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = generate_imagenet_folder(tmp_path_factory.mktemp("px"), classes=2, per_class=5)
    (root / "train" / "n00000001" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root / "train"


def test_cache_holds_the_centre_crops_and_the_stream_reads_it(folder, tmp_path):
    listing = list_split(folder)
    cache = build_pixel_cache(folder, listing, 48, tmp_path / "c")
    assert cache.images.shape == (11, 48, 48, 3) and cache.images.dtype == np.uint8
    bad = [i for i, item in enumerate(listing.items) if item.path.endswith("broken.JPEG")]
    assert list(cache.bad) == bad and "cannot decode" in cache.bad[bad[0]]  # with the reason
    good = next(i for i in range(len(listing.items)) if i not in cache.bad)
    want = resize_center_crop(load_rgb(listing.items[good].path), 48)[0]
    assert np.array_equal(cache.image(good), want)
    # Built once: a second build reuses the files; a changed folder gets a new cache.
    mtime = cache.path.stat().st_mtime_ns
    assert build_pixel_cache(folder, listing, 48, tmp_path / "c").path.stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="python -m pretrain.pixel_cache"):
        open_pixel_cache(folder, listing, 64, tmp_path / "c")
    # Evaluation views: the cache's centre square resized equals decoding the file (square at 48 px).
    plain = PixelFolderStream(folder, 48, 4, train=False)
    cached = PixelFolderStream(folder, 48, 4, train=False, cache=tmp_path / "c", cache_side=48)
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.allclose(a["pixels"], b["pixels"], atol=0.05)
    # Training batches from the cache: same positions and labels, skipped file listed, seeded crops.
    aug = PixelAugment(rrc_scale=(0.35, 1.0), cutmix_alpha=1.0)
    one = list(PixelFolderStream(folder, 32, 4, augment=aug, seed=1, cache=tmp_path / "c", cache_side=48))
    two = list(PixelFolderStream(folder, 32, 4, augment=aug, seed=1, cache=tmp_path / "c", cache_side=48))
    assert sum(len(b["index"]) for b in one) == 10
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and a["pixels"].shape[1:] == (3, 32, 32)


def test_cli_builds_and_reports_a_bad_folder_in_one_line(folder, tmp_path, capsys):
    assert main(["--src", str(folder), "--side", "32", "--cache", str(tmp_path / "c")]) == 0
    assert "11 images, 1 not decodable" in capsys.readouterr().out
    assert open_pixel_cache(folder, list_split(folder), 32, tmp_path / "c").images.shape[1] == 32
    assert main(["--src", str(tmp_path / "nowhere"), "--side", "32", "--cache", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
