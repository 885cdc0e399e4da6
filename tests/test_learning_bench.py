"""bench/learning.py end to end on generated ImageNet-layout roots: every arm, a few steps each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vqpt.sample_data import generate_imagenet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_learning_bench_runs_every_arm_on_any_roots(tmp_path):
    data = generate_imagenet(tmp_path / "imgs", classes=3, train_per_class=6, val_per_class=3)
    sys.path.insert(0, str(ROOT))
    from bench.learning import main

    out = tmp_path / "learning.json"
    assert main(["--train", str(data / "train"), "--val", str(data / "val"), "--json", str(out),
                 "--work", str(tmp_path / "work"), "--resolution", "32", "--token-resolution", "32", "--vocab", "16",
                 "--depth", "1", "--batch-size", "4", "--pretrain-steps", "2", "--finetune-steps", "2",
                 "--equal-formats", "webp", "--frontier", "--pixel-budgets", "400", "--token-variants", "64:16"]) == 0
    result = json.loads(out.read_text())
    for arm in ("pixel", "token", "mtm", "m3i", "addp", "jpeg_equal"):
        assert 0.0 <= result[f"top1_{arm}"] <= 1.0, arm
        assert result["arms"][arm]["val_samples"] == 9, arm
        assert result["arms"][arm]["finetune_s"] > 0, arm
    assert 0 < result["bytes_tokens"] < result["bytes_jpeg"] and result["train_images"] == 18
    assert result["storage_fraction"] == pytest.approx(result["bytes_tokens"] / result["bytes_jpeg"])
    assert result["bytes_per_image_token"] == pytest.approx(result["bytes_tokens"] / 27, rel=1e-3)
    assert result["bytes_per_image_jpeg"] == pytest.approx(result["bytes_jpeg"] / 27)
    # The equal-byte arm trained on files within 5 % of the tokens' bytes/image, decodable at its side.
    equal = result["arms"]["jpeg_equal"]
    assert equal["format"] == "webp" and equal["setting"]["fmt"] == "webp"
    assert abs(result["bytes_per_image_jpeg_equal"] / result["bytes_per_image_token"] - 1) <= 0.05
    copies = sorted((tmp_path / "work" / "equal" / f"webp_{round(result['bytes_per_image_token'])}").glob("val/*/*"))
    assert len(copies) == 9
    # The frontier: one pixel budget and one token variant (64 px -> 8x8 grid, more bytes than 4x4).
    kinds = {p["kind"]: p for p in result["frontier"]}
    assert abs(kinds["pixel"]["bytes_per_image"] / 400 - 1) <= 0.05 and 0 <= kinds["pixel"]["top1"] <= 1
    assert kinds["token"]["label"] == "8x8 K=16" and kinds["token"]["bytes_per_image"] > result["bytes_per_image_token"]
    assert set(result["targets"]) == {"token >= 0.90 x pixel with <= 1200 B/image", "token >= jpeg_equal + 0.05",
                                      "mtm >= token + 0.03 (CPU budget)"}
    assert (tmp_path / "learning.png").stat().st_size > 0
