"""Classification fine-tuning from a pre-trained backbone under the 2-rank CPU trainer, and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.evaluate import main as evaluate_main
from pretrain.export import save_backbone
from pretrain.objectives import DataSpec
from pretrain.objectives.classify import Classify, ClassifyConfig
from pretrain.objectives.parts import load_pretrained
from pretrain.vit import VisionTransformer, ViTConfig
from tests.job_support import local_ray
from tests.test_train import launch

VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, vocab_size=16, token_dim=8)


def test_load_pretrained_copies_the_backbone_and_leaves_the_head_fresh(tmp_path):
    torch.manual_seed(0)
    source = VisionTransformer(VIT)
    save_backbone(tmp_path / "b.pt", source)
    model = Classify(ClassifyConfig(init=str(tmp_path / "b.pt")), VIT, DataSpec((8, 8), 16, num_classes=5))
    enc = model.encoder
    torch.testing.assert_close(enc.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(enc.token_embed.word_embeddings.weight, source.token_embed.word_embeddings.weight)
    assert enc.head.weight.shape == (5, 32) and enc.head.weight.abs().max() < 1e-3  # fresh, std 2e-5
    report = load_pretrained(VisionTransformer(VIT), str(tmp_path / "b.pt"))
    assert not report["skipped"] and not report["fresh"]
    probe = Classify(ClassifyConfig(linear_probe=True), VIT, DataSpec((8, 8), 16, num_classes=5))
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"encoder.head.weight", "encoder.head.bias"}
    with pytest.raises(ValueError, match="class names"):
        Classify(ClassifyConfig(), VIT, DataSpec((8, 8), 16, num_classes=0))


def test_soft_targets_and_hard_labels_agree_without_smoothing():
    torch.manual_seed(0)
    model = Classify(ClassifyConfig(label_smoothing=0.0), VIT, DataSpec((8, 8), 16, num_classes=3))
    tokens = torch.randint(0, 16, (4, 8, 8))
    labels = torch.tensor([0, 2, 1, -1])
    hard, _ = model({"tokens": tokens, "label": labels})
    soft = torch.nn.functional.one_hot(labels.clamp_min(0), 3).float()
    soft_loss, _ = model({"tokens": tokens, "label": labels, "target": soft})
    torch.testing.assert_close(hard, soft_loss)


@pytest.fixture(scope="module")
def generated_tokens(token_data, tmp_path_factory) -> Path:
    """A generated 4-class ImageNet-layout folder (one background colour per class; 24 train, 8 val
    images per class) tokenised by the job with ``token_data``'s tokenizer, so that a backbone
    pre-trained on ``token_data`` fine-tunes on it. Returns the dataset root (train/, val/)."""
    from pipeline.tokenise import parse_args, run
    from vqpt.sample_data import generate_imagenet

    root = tmp_path_factory.mktemp("gen")
    generate_imagenet(root / "imgs", classes=4, train_per_class=24, val_per_class=8)
    with local_ray():
        for split in ("train", "val"):
            run(parse_args(["--dataset", "imagenet", "--src", str(root / "imgs"), "--split", split, "--out",
                            str(root / "tok"), "--tokenizer", str(token_data.parent / "tokenizer.pt"),
                            "--resolution", "64", "--shard-size", "32"]))
    return root / "tok"


@pytest.mark.slow
@pytest.mark.realdata
def test_two_rank_finetune_from_mtm_then_evaluate(token_data, generated_tokens, tmp_path):
    launch(token_data, tmp_path / "mtm", "run.steps=6")
    init = ("--task", "classify", "--init", str(tmp_path / "mtm" / "checkpoints"))
    records = launch(generated_tokens / "train", tmp_path / "ft", "run.steps=12", "optim.lr=1e-3",
                     "optim.warmup_steps=2", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
                     "data.batch_size=16", "run.log_every=1", "run.progress=false", config="finetune_cls_tiny.yaml",
                     small=False, module="pretrain.finetune", args=init)
    assert len(records) == 12 and all(0.0 <= r["acc"] <= 1.0 and r["loss"] == r["loss"] for r in records)
    out = tmp_path / "eval.json"
    assert evaluate_main(["--ckpt", str(tmp_path / "ft" / "checkpoints"), "--data", str(generated_tokens / "val"),
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["objective"] == "classify" and result["samples"] == 32
    # held-out images of 4 classes: chance is 0.25 top-1 (top-5 of 4 classes is always 1)
    assert 0.5 <= result["top1"] <= result["top5"] <= 1.0, result
