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
                 "--work", str(tmp_path / "work"), "--resolution", "32", "--vocab", "16", "--depth", "1",
                 "--batch-size", "4", "--pretrain-steps", "2", "--finetune-steps", "2"]) == 0
    result = json.loads(out.read_text())
    for arm in ("pixel", "token", "mtm", "m3i", "addp"):
        assert 0.0 <= result[f"top1_{arm}"] <= 1.0, arm
        assert result["arms"][arm]["val_samples"] == 9, arm
        assert result["arms"][arm]["finetune_s"] > 0, arm
    assert 0 < result["bytes_tokens"] < result["bytes_jpeg"] and result["train_images"] == 18
    assert result["storage_fraction"] == pytest.approx(result["bytes_tokens"] / result["bytes_jpeg"])
    assert (tmp_path / "learning.png").stat().st_size > 0
