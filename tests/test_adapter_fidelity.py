"""bench/adapter_fidelity.py: each token augmentation scored against the real tokens of the augmented image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.adapters import LearnedColorAdapt, TokenAdapt, save_coloradapt, save_tokenadapt
from vqpt.sample_data import generate_imagenet

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.adapter_fidelity import main, measure  # noqa: E402


def _adapters(tok, learned: bool):
    torch.manual_seed(0)
    ta = TokenAdapt.for_tokenizer(tok, width=32, heads=2)
    ca = LearnedColorAdapt.for_tokenizer(tok, width=32, blocks=1, cond_dim=32)
    if learned:  # non-zero corrections, as training leaves them
        with torch.no_grad():
            ta.head[-1].weight.normal_(0, 0.5)
            ca.out.weight.normal_(0, 0.5)
    return ta, ca


def test_scores_each_operator_against_the_real_augmented_tokens(adapter_tok, adapter_images):
    untrained = measure(adapter_tok, *_adapters(adapter_tok, learned=False), adapter_images)
    # An untrained TokenAdapt is the bilinear warp + nearest code: the same ids, so the same scores.
    assert untrained["crop_tokenadapt"] == untrained["crop_bilinear_nearest_code"]
    # Copying the input keeps the clean code statistics exactly and misses the jittered tokens.
    assert untrained["colour_copy"]["kl_vs_clean"] == pytest.approx(0.0, abs=1e-9)
    assert untrained["colour_copy"]["entropy"] == pytest.approx(untrained["clean_entropy"])
    for name in ("crop_nearest_ids", "crop_bilinear_nearest_code", "crop_affine_tokenadapt", "colour_copy",
                 "colour_coloradapt", "crop_tokenadapt_sampled", "colour_coloradapt_sampled"):
        r = untrained[name]
        assert 0.0 < r["agreement"] < 1.0 and r["code_dist2"] > 0 and r["kl_vs_clean"] >= 0, name
    assert untrained["real_crop_kl_vs_clean"] >= 0 and untrained["real_colour_kl_vs_clean"] > 0
    learned = measure(adapter_tok, *_adapters(adapter_tok, learned=True), adapter_images)
    assert learned["crop_tokenadapt"] != learned["crop_bilinear_nearest_code"]
    assert learned["crop_nearest_ids"] == untrained["crop_nearest_ids"]  # the same fixed-seed draw


def test_cli_writes_the_json(adapter_tok, tmp_path):
    data = generate_imagenet(tmp_path / "imgs", classes=2, train_per_class=4, val_per_class=1)
    ta, ca = _adapters(adapter_tok, learned=True)
    adapter_tok.save(tmp_path / "tok.pt")
    save_tokenadapt(ta, tmp_path / "ta.pt")
    save_coloradapt(ca, tmp_path / "ca.pt")
    out = tmp_path / "fidelity.json"
    main(["--tokenizer", str(tmp_path / "tok.pt"), "--tokenadapt", str(tmp_path / "ta.pt"), "--coloradapt",
          str(tmp_path / "ca.pt"), "--images", str(data / "train"), "--limit", "6", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["images"] == 6 and set(result["crop_tokenadapt"]) == {"agreement", "code_dist2", "entropy",
                                                                         "kl_vs_clean"}
