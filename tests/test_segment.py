"""Semantic segmentation on token grids: heads, loss, augmentation, whole/slide inference, backbone
loading, and (slow, real data) ADE20K end to end: tokenise, 2-rank DeepSpeed fine-tune, mIoU report."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.tokenise import main as tokenise_main
from pretrain.config import load_config
from pretrain.evaluate import main as evaluate_main
from pretrain.export import save_backbone
from pretrain.finetune import main as finetune_main
from pretrain.metrics import IGNORE_INDEX, ade20k_targets
from pretrain.objectives import DataSpec, build_objective
from pretrain.objectives import segment as segment_module
from pretrain.objectives.segment import Segment, SegmentConfig, evaluate_segmentation
from pretrain.train import build_model
from pretrain.vit import VisionTransformer, ViTConfig
from storage.dataset import TokenDataset
from storage.stream import TokenStream
from tests.conftest import shared_data_dir
from tests.job_support import local_ray
from tests.test_train import launch
from tests.token_splits import tokenise_here
from vqpt.sample_data import generate_ade20k

ROOT = Path(__file__).resolve().parents[1]
VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, vocab_size=16, token_dim=8)
SPEC = DataSpec((8, 8), 16)


def _model(head: str = "upernet", **options) -> Segment:
    torch.manual_seed(0)
    return build_objective("segment", {"head": head, "channels": 16, **options}, VIT, SPEC)


def _batch(b: int = 3, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 16, (b, 8, 8), generator=g),
            "labelmap": torch.randint(0, 151, (b, size, size), generator=g).to(torch.uint8)}


@pytest.mark.parametrize(("head", "options", "logits_hw"), [("upernet", {}, 16), ("pup", {}, 16),
                                                            ("pup", {"pup_stages": 3}, 32),
                                                            ("upernet", {"norm": "bn"}, 16)])
def test_heads_output_shapes_and_train_every_parameter(head, options, logits_hw):
    model = _model(head, **options)
    batch = _batch()
    assert model.logits(batch["tokens"]).shape == (3, 150, logits_hw, logits_hw)
    loss, metrics = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(metrics) == {"acc", "miou_batch"}
    assert all(m.ndim == 0 and torch.isfinite(m) for m in metrics.values())  # learning: test_fits_generated_scenes
    loss.backward()
    # DeepSpeed all-reduces every trainable parameter: none may be left without a gradient.
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert model.predict(batch["tokens"], (50, 70)).shape == (3, 150, 50, 70)
    assert set(model.encoder.state_dict()) == set(VisionTransformer(VIT).state_dict())  # exportable as is


def test_default_out_indices_and_config_errors():
    assert _model("upernet").out_indices == (0, 0, 0, 1) and _model("pup").out_indices == (1,)
    deep_vit = ViTConfig(embed_dim=32, depth=12, num_heads=2, grid=8, vocab_size=16, token_dim=8)
    deep = build_objective("segment", {"head": "upernet", "channels": 16}, deep_vit, SPEC)
    assert deep.out_indices == (2, 5, 8, 11)
    with pytest.raises(ValueError, match="head"):
        SegmentConfig(head="fcn")
    with pytest.raises(ValueError, match="crop_side"):
        SegmentConfig(crop_side=(0.0, 1.0))
    with pytest.raises(ValueError, match="out_indices"):
        _model("upernet", out_indices=[0, 0, 1, 0])
    with pytest.raises(ValueError, match="last block"):
        _model("upernet", out_indices=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown key"):
        _model(linear_probe=True)
    with pytest.raises(ValueError, match="labelmap"):
        _model()({"tokens": torch.zeros(2, 8, 8, dtype=torch.long)})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ignored_pixels_do_not_contribute_to_the_loss(smoothing):
    model = _model(label_smoothing=smoothing).eval()  # eval: no augmentation, no dropout
    batch = _batch()
    batch["labelmap"][:, :20] = 0  # "other" -> ignore 255
    loss, metrics = model(batch)
    logits = model.predict(batch["tokens"], (64, 64))  # (B, C, 64, 64)
    target = ade20k_targets(batch["labelmap"])
    keep = target != IGNORE_INDEX
    flat = logits.permute(0, 2, 3, 1)[keep]  # (labelled pixels, C)
    by_hand = F.cross_entropy(flat, target[keep], label_smoothing=smoothing)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(metrics["acc"], (flat.argmax(1) == target[keep]).float().mean())
    # Unlike a plain mean over all pixels, which would count the ignored rows.
    assert not torch.allclose(loss, F.cross_entropy(logits, target.clamp_max(149), label_smoothing=smoothing))
    # A batch with no labelled pixel: loss 0 (not NaN), metrics 0, and backward still works.
    empty, m = model({**batch, "labelmap": torch.zeros_like(batch["labelmap"])})
    empty.backward()
    assert float(empty.detach()) == 0.0 and float(m["acc"]) == 0.0 and float(m["miou_batch"]) == 0.0


def test_slide_with_the_training_window_equals_whole():
    for head in ("upernet", "pup"):
        model = _model(head).eval()
        tokens = _batch()["tokens"]
        with torch.no_grad():
            whole = model.predict(tokens, (64, 64), "whole")
            slide = model.predict(tokens, (64, 64), "slide")
        torch.testing.assert_close(slide, whole)


@pytest.mark.parametrize("head", ["pup", "upernet"])
def test_slide_on_a_larger_grid_covers_every_pixel_and_matches_windows_by_hand(head):
    model = _model(head).eval()
    tokens = torch.randint(0, 16, (2, 20, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.predict(tokens, (160, 112), "slide", window=8, stride=5)
        total = torch.zeros(2, 150, 160, 112)
        count = torch.zeros(160, 112)
        for y in (0, 5, 10, 12):  # the last window of each axis is moved back to end at the border
            for x in (0, 5, 6):
                crop = model.logits(tokens[:, y:y + 8, x:x + 8])
                total[:, :, y * 8:y * 8 + 64, x * 8:x * 8 + 64] += F.interpolate(crop, size=(64, 64), mode="bilinear")
                count[y * 8:y * 8 + 64, x * 8:x * 8 + 64] += 1
        assert count.min() >= 1  # every output pixel is covered by at least one window
        torch.testing.assert_close(got, total / count)
        # Another output size: accumulated at 8 px per token, then resized.
        assert model.predict(tokens, (150, 100), "slide", window=8, stride=5).shape == (2, 150, 150, 100)
        # Whole on another square grid resizes the position embeddings; non-square grids need slide.
        assert model.predict(tokens[:, :12, :12], (96, 96), "whole").shape == (2, 150, 96, 96)
        with pytest.raises(ValueError, match="square"):
            model.predict(tokens, (160, 112), "whole")
        with pytest.raises(ValueError, match="window"):
            model.predict(tokens[:, :6, :6], (48, 48), "slide")


def test_loading_a_backbone_keeps_the_encoder_weights(tmp_path, capsys):
    torch.manual_seed(3)
    source = VisionTransformer(VIT)
    save_backbone(tmp_path / "b.pt", source)
    model = _model(init=str(tmp_path / "b.pt"))
    assert "init from" in capsys.readouterr().out
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], value, msg=name)
    fresh = _model()
    assert not torch.equal(fresh.encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_augment_moves_tokens_and_label_maps_together(monkeypatch):
    model = _model(crop_side=(1.0, 1.0), hflip_p=1.0)
    tokens = torch.randint(0, 150, (6, 8, 8), generator=torch.Generator().manual_seed(2))
    labels = tokens.to(torch.uint8).repeat_interleave(8, 1).repeat_interleave(8, 2)  # each token's 8x8 px
    t, lm = model.augment(tokens, labels)
    assert torch.equal(t, tokens.flip(-1)) and torch.equal(lm, labels.flip(-1))
    seen = []  # (input, boxes) of every crop the objective makes
    real = segment_module.crop_ids
    monkeypatch.setattr(segment_module, "crop_ids", lambda x, boxes: seen.append((x, boxes)) or real(x, boxes))
    model = _model(crop_side=(0.5, 0.9), hflip_p=0.5)
    torch.manual_seed(0)
    t, lm = model.augment(tokens, labels)
    assert [x.shape for x, _ in seen] == [tokens.shape, labels.shape] and torch.equal(seen[0][1], seen[1][1])
    box = seen[0][1]
    assert ((box[:, 2] - box[:, 0] - (box[:, 3] - box[:, 1])).abs() < 1e-12).all()  # square
    assert ((box[:, 2] - box[:, 0] >= 0.5) & (box[:, 2] - box[:, 0] <= 0.9)).all() and (box >= 0).all()
    assert (box <= 1).all()
    crop_t, crop_l = real(tokens, box), real(labels, box)
    flipped = [not torch.equal(t[i], crop_t[i]) for i in range(len(t))]
    assert 0 < sum(flipped) < len(t)  # p = 0.5 over 6 samples with this seed: some of each
    for i, f in enumerate(flipped):  # the same flip for the tokens and the label map of each sample
        assert torch.equal(t[i], crop_t[i].flip(-1) if f else crop_t[i])
        assert torch.equal(lm[i], crop_l[i].flip(-1) if f else crop_l[i])


def test_trainer_augmentation_that_moves_tokens_is_refused(capsys):
    config = str(ROOT / "configs" / "finetune_seg_tiny.yaml")
    load_config(config, ["data.train=x", "augment=null"])
    load_config(config, ["data.train=x", 'augment={"rrc": false, "hflip_p": 0.0, "replace_p": 0.1}'])
    for bad in ({}, {"rrc": False}, {"rrc": False, "hflip_p": 0, "cutmix_alpha": 1.0, "num_classes": 3}):
        with pytest.raises(ValueError, match="per-pixel targets"):
            load_config(config, ["data.train=x", f"augment={json.dumps(bad)}"])
    # refused before anything starts, in one line
    assert finetune_main(["--task", "segment", "--config", config, "--data", "nowhere", "augment.rrc=true"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "augment.rrc" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        finetune_main(["--task", "segment", "--linear-probe", "--config", config, "--data", "nowhere"])


def test_shipped_config_builds_the_segment_model():
    cfg = load_config(ROOT / "configs" / "finetune_seg_tiny.yaml", ["data.train=x", "model.depth=2"])
    model, vit = build_model(cfg, DataSpec((16, 16), 64))
    assert isinstance(model, Segment) and model.cfg.head == "pup" and vit.grid == 16 and cfg.augment is None


def test_fits_generated_scenes_better_than_chance(tmp_path):
    """12 full-batch steps on 8 generated scenes: pixel accuracy and mIoU on them beat the best constant
    prediction (every pixel the most frequent class), not just a uniform guess."""
    src = generate_ade20k(tmp_path / "ade", train=8, val=1)
    split = tokenise_here(src, "ade20k", "training", tmp_path / "ds", labelmap_resolution=32)
    ds = TokenDataset(str(split))
    tokens = torch.stack([torch.from_numpy(ds[i]["tokens"]) for i in range(len(ds))])
    maps = torch.stack([torch.from_numpy(ds[i]["labelmap"]) for i in range(len(ds))])
    target = ade20k_targets(maps)
    counts = torch.bincount(target[target != IGNORE_INDEX])
    majority = counts.max().item() / counts.sum().item()  # pixel accuracy of the best constant prediction
    present = int((counts > 0).sum())  # its mIoU is majority / present (IoU 0 on every other class)
    vit = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, vocab_size=ds.manifest.meta.vocab_size, token_dim=8)
    torch.manual_seed(0)
    model = build_objective("segment", {"channels": 16, "dropout": 0.0}, vit, DataSpec((8, 8), vit.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        loss, _ = model({"tokens": tokens, "labelmap": maps})
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = evaluate_segmentation(model, TokenStream(str(split), 8, shuffle=False, rank=0, world_size=1))
    assert report["samples"] == 8
    assert report["pixel_accuracy"] > majority + 0.1, (report["pixel_accuracy"], majority)
    assert report["miou"] > 2 * majority / present, (report["miou"], majority / present)


# -- real data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ade_tokens(tmp_path_factory) -> Path:
    """ade20k_sample (1 training, 3 validation images + annotations) tokenised at 64 px, label maps 64 px."""
    import ray

    src = shared_data_dir("ade20k_sample")
    out = tmp_path_factory.mktemp("ade")
    # one Ray instance for both splits (each job would start and stop its own)
    with contextlib.nullcontext() if ray.is_initialized() else local_ray():
        for split in ("training", "validation"):  # the second run reuses the k-means tokenizer of the first
            assert tokenise_main(["--dataset", "ade20k", "--src", str(src), "--split", split, "--out", str(out),
                                  "--resolution", "64", "--labelmap-resolution", "64", "--vocab", "32"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.realdata
def test_ade20k_tokenise_finetune_two_ranks_then_miou_report(ade_tokens, tmp_path):
    steps = 6
    records = launch(ade_tokens / "training", tmp_path / "seg", f"run.steps={steps}", "optim.lr=1e-3",
                     "optim.warmup_steps=2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                     "objective.channels=16", "data.batch_size=2", "run.log_every=1", "run.progress=false",
                     config="finetune_seg_tiny.yaml", small=False, module="pretrain.finetune",
                     args=("--task", "segment"))
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["acc"]) for r in records)
    assert (tmp_path / "seg" / "backbone.pt").is_file()
    reports = {}
    for mode, extra in (("whole", []), ("slide", ["--window", "4", "--stride", "2"])):
        out = tmp_path / f"eval_{mode}.json"
        assert evaluate_main(["--ckpt", str(tmp_path / "seg" / "checkpoints"), "--data",
                              str(ade_tokens / "validation"), "--json", str(out), "--mode", mode, *extra]) == 0
        reports[mode] = result = json.loads(out.read_text())
        assert result["objective"] == "segment" and result["samples"] == 3 and result["mode"] == mode
        per_class = result["per_class_iou"]
        assert len(per_class) == 150 and "wall" in per_class  # objectInfo150 names from the manifest
        assert all(v is None or 0.0 <= v <= 1.0 for v in per_class.values())
        present = [v for v in per_class.values() if v is not None]
        assert present and result["miou"] == pytest.approx(sum(present) / len(present))
