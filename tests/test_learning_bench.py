"""bench/learning.py end to end on generated ImageNet-layout roots: every new arm and flag, a few steps each.

The generated classes differ in colour and shape, so a few dozen steps learn them: arms must beat chance (1/3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vqpt.sample_data import generate_imagenet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CHANCE = 1 / 3
COMMON = ["--resolution", "32", "--token-resolution", "64", "--depth", "1", "--batch-size", "8",
          "--pretrain-steps", "4", "--finetune-steps", "12", "--equal-formats", "webp", "--adapter-steps", "2",
          "--adapter-images", "12"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_imagenet(tmp_path_factory.mktemp("imgs"), classes=3, train_per_class=10, val_per_class=6)


def _main():
    sys.path.insert(0, str(ROOT))
    from bench.learning import main

    return main


def test_arms_the_curve_the_budget_scale_and_the_targets(data, tmp_path):
    """pixel, pixel_matched, token with the ids and the seitpp augmentation, MTM with seitpp: the new arms
    and flags (m3i, addp and jpeg_equal run the same run_arm / launch path; their objectives and the
    equal-byte copies have their own tests)."""
    out = tmp_path / "learning.json"
    assert _main()(["--train", str(data / "train"), "--val", str(data / "val"), "--json", str(out), "--work",
                    str(tmp_path / "work"), *COMMON, "--arms", "pixel,pixel_matched,token,token:seitpp,mtm:seitpp",
                    "--vocab", "16", "--budget-scale", "2"]) == 0
    result = json.loads(out.read_text())
    keys = ("pixel", "pixel_matched", "token", "token_seitpp", "mtm_seitpp")
    for key in keys:
        arm = result["arms"][key]
        assert arm["val_samples"] == 18 and arm["finetune_s"] > 0, key
        assert arm["finetune_steps"] == 24, key  # --budget-scale 2
        # 25 / 50 / 75 / 100 % of the fine-tuning steps, in epochs of the 30 train images.
        assert [round(e, 2) for e, _ in result["curve"][key]] == [1.6, 3.2, 4.8, 6.4], key
        assert result["curve"][key][-1][1] == result[f"top1_{key}"], key
    for key in ("pixel", "pixel_matched", "token", "token_seitpp"):  # learned the classes: better than chance
        assert result[f"top1_{key}"] > CHANCE + 0.1, (key, result[f"top1_{key}"])
    assert result["arms"]["mtm_seitpp"]["pretrain_steps"] == 8 and result["arms"]["token_seitpp"]["aug"] == "seitpp"
    assert result["adapters"]["seconds"] > 0 and result["adapters"]["tokenadapt_train"]["steps"] == 2
    best = max(result["top1_pixel"], result["top1_pixel_matched"])
    assert result["top1_pixel_best"] == best and result["pixel_best"] in ("pixel", "pixel_matched")
    assert result["top1_token_best"] == max(result["top1_token"], result["top1_token_seitpp"])
    assert result["token_vs_pixel_best_top1"] == pytest.approx(result["top1_token_best"] / best)
    gain = 100 * (result["top1_token_seitpp"] - result["top1_token"])
    assert result["seitpp_minus_ids_points"] == pytest.approx(gain)
    assert set(result["targets"]) == {"token (best aug) >= 0.90 x top1_pixel_best with <= 1200 B/image",
                                      "seitpp aug >= ids aug + 2 points", "mtm >= token + 3 points (best aug each)"}
    assert 0 < result["bytes_tokens"] < result["bytes_jpeg"] and result["train_images"] == 30
    assert result["bytes_per_image_token"] == pytest.approx(result["bytes_tokens"] / 48, rel=1e-3)
    # Pixel arms read the decoded cache, at the tokens' source resolution, for train and val.
    assert len(list((tmp_path / "work" / "pixel_cache").glob("*_64_*.u8"))) == 2
    assert (tmp_path / "learning.png").stat().st_size > 0


def test_dev_split_and_a_frontier_with_another_tokenizer(data, tmp_path):
    out = tmp_path / "dev.json"
    assert _main()(["--train", str(data / "train"), "--val", str(data / "val"), "--json", str(out), "--work",
                    str(tmp_path / "work"), *COMMON, "--arms", "token", "--dev-fraction", "0.3",
                    "--tokenizer-kind", "kmeans_residual", "--vocab", "32", "--frontier",
                    "--pixel-budgets", "400", "--token-variants", "64:16:luma_chroma"]) == 0
    result = json.loads(out.read_text())
    assert result["evaluated_on"].startswith("dev") and result["reported_val"] == str(data / "val")
    assert result["train_images"] == 21 and result["val_images"] == 9 and result["arms"]["token"]["val_samples"] == 9
    dev = {p.name for p in (tmp_path / "work" / "dev_split" / "dev").rglob("*.JPEG")}
    rest = {p.name for p in (tmp_path / "work" / "dev_split" / "train").rglob("*.JPEG")}
    assert len(dev) == 9 and not dev & rest and len(rest) == 21  # disjoint, every train image in one of them
    # The residual tokenizer made the tokens through the tokenise job: K = 8 x 4 ids.
    assert result["tokenizer_kind"] == "kmeans_residual" and result["budget"]["vocab"] == 32
    assert result["top1_token"] > CHANCE
    kinds = {p["kind"]: p for p in result["frontier"]}
    assert abs(kinds["pixel"]["bytes_per_image"] / 400 - 1) <= 0.05 and kinds["pixel"]["top1"] > CHANCE
    assert kinds["token"]["label"] == "8x8 K=16 luma_chroma" and kinds["token"]["top1"] > CHANCE
