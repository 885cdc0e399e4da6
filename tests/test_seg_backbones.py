"""Every pre-trained backbone into ADE20K segmentation: ADDP's pixel-stem encoder on ids decoded to pixels, M3I's
token-stem encoder (and into classification), a backbone of another tokenizer refused. Generated scenes, tokenised
by the job's own steps; backbones pre-trained for a few steps in this process; fine-tuning on 2 DeepSpeed ranks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint import read_trainer_state, save_backbone
from pretrain.evaluate import main as evaluate_main
from pretrain.finetune import main as finetune_main
from pretrain.objectives import DataSpec, build_objective
from pretrain.objectives.addp import ADDP, ADDPConfig
from pretrain.provenance import identity_of_meta
from pretrain.vit import ViTConfig
from storage.dataset import TokenDataset
from storage.manifest import read_manifest
from tests.test_train import launch
from tests.token_splits import tokenise_here
from vqpt.sample_data import generate_ade20k

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"segment": "finetune_seg_tiny.yaml", "classify": "finetune_cls_tiny.yaml"}
# 64 px scenes -> 8 x 8 k-means ids (8 px each); token stem 2 x 2 ids per patch, ADDP's pixel stem 16 px patches.
VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, patch_size=2, vocab_size=32, token_dim=8)
MODEL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.token_dim=8"]
SEG = [*MODEL, "objective.head=upernet", "objective.channels=16", "data.batch_size=2", "run.steps=3",
       "run.log_every=1", "run.progress=false", "optim.warmup_steps=1", "optim.lr=1e-3"]


@dataclasses.dataclass(frozen=True)
class Data:
    training: Path
    validation: Path
    other: Path  # the validation scenes tokenised by another k-means fit: another tokenizer
    spec: DataSpec


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("segbb")
    src = generate_ade20k(root / "ade", train=8, val=4)
    training = tokenise_here(src, "ade20k", "training", root / "ds", labelmap_resolution=32)
    validation = tokenise_here(src, "ade20k", "validation", root / "ds", labelmap_resolution=32)  # same tokenizer
    other = tokenise_here(src, "ade20k", "validation", root / "other", labelmap_resolution=32)  # fitted anew
    meta = read_manifest(str(training)).meta
    return Data(training, validation, other, DataSpec(tuple(meta.grid), meta.vocab_size,
                                                      tokenizer_fingerprint=meta.tokenizer_fingerprint))


def _pretrain(objective: torch.nn.Module, split: Path, steps: int = 3) -> None:
    """A few AdamW steps of ``objective`` on the split's samples (batches of 4, in storage order)."""
    ds = TokenDataset(str(split))
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    objective.train()
    for step in range(steps):
        rows = [ds[(4 * step + i) % len(ds)] for i in range(4)]
        loss, _ = objective({"tokens": torch.stack([torch.from_numpy(r["tokens"]) for r in rows]),
                             "label": torch.full((4,), -1)})
        opt.zero_grad()
        loss.backward()
        opt.step()


def _backbone(kind: str, split: Path, out: Path, steps: int = 2) -> Path:
    """``kind`` ("m3i" | "addp") pre-trained on ``split`` for ``steps`` steps; its encoder saved as backbone.pt
    with the split's token identity, as the trainer does."""
    meta = read_manifest(str(split)).meta
    spec = DataSpec(tuple(meta.grid), meta.vocab_size, tokenizer_fingerprint=meta.tokenizer_fingerprint)
    small = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
    torch.manual_seed(0)
    if kind == "m3i":
        objective = build_objective("m3i", {**small, "w_cls": 0.0}, VIT, spec)
    else:
        predictor = build_objective("mtm", small, VIT, spec).eval()
        tokenizer = load_tokenizer(split.parent / "tokenizer.pt", meta.tokenizer_fingerprint)
        objective = ADDP(ADDPConfig(**small, pixel_patch=16), VIT, spec, tokenizer=tokenizer, predictor=predictor)
    _pretrain(objective, split, steps)
    path = out / f"{kind}.pt"
    save_backbone(path, objective.encoder, {"objective": kind, "step": steps, "tokens": identity_of_meta(meta)})
    return path


@pytest.fixture(scope="module")
def backbones(ade, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bb")
    return {kind: _backbone(kind, ade.training, out) for kind in ("m3i", "addp")}


def test_addp_backbone_is_a_pixel_stem_segmenter_on_decoded_ids(ade, backbones, capsys):
    tokenizer = ade.training.parent / "tokenizer.pt"
    torch.manual_seed(0)
    model = build_objective("segment", {"head": "upernet", "channels": 16, "init": str(backbones["addp"]),
                                        "decoder": str(tokenizer)}, VIT, ade.spec)
    assert "init from" in capsys.readouterr().out
    enc = model.encoder.cfg
    assert (enc.stem, enc.grid, enc.patch_size, enc.grid_size) == ("pixel", 64, 16, 4)
    saved = torch.load(backbones["addp"], weights_only=True)["model"]
    for name, value in saved.items():  # every encoder tensor loaded as pre-trained
        torch.testing.assert_close(model.encoder.state_dict()[name], value, msg=name)
    rows = [TokenDataset(str(ade.training))[i] for i in range(3)]
    batch = {"tokens": torch.stack([torch.from_numpy(r["tokens"]) for r in rows]),
             "labelmap": torch.stack([torch.from_numpy(r["labelmap"]) for r in rows])}
    # The encoder reads the ids decoded by the data's tokenizer (k-means: centroid patches), normalised.
    pixels = torch.from_numpy(load_tokenizer(tokenizer).decode(batch["tokens"].numpy())).permute(0, 3, 1, 2)
    expected = (pixels / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.stem_input(batch["tokens"]), expected, atol=0.6 / 255 / 0.224, rtol=0)  # uint8
    loss, _ = model(batch)
    loss.backward()
    assert all(p.grad is None for p in model.vq.parameters()) and model.encoder.patch_embed.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        whole = model.predict(batch["tokens"], (32, 32), "whole")
        torch.testing.assert_close(model.predict(batch["tokens"], (32, 32), "slide"), whole)
        assert model.predict(batch["tokens"], (32, 32), "slide", window=4, stride=2).shape == (3, 150, 32, 32)
    # Without the decoder the pixel-stem backbone would load its blocks only: refused, saying what to add.
    with pytest.raises(ValueError, match="pixel-stem backbone.*objective.decoder"):
        build_objective("segment", {"init": str(backbones["addp"])}, VIT, ade.spec)


def test_m3i_backbone_loads_into_both_tasks(ade, backbones):
    saved = torch.load(backbones["m3i"], weights_only=True)["model"]
    spec = dataclasses.replace(ade.spec, num_classes=3)
    for task in ("segment", "classify"):
        torch.manual_seed(0)
        model = build_objective(task, {"init": str(backbones["m3i"])}, VIT, spec)
        for name, value in saved.items():
            if not name.startswith(("head.", "norm.", "fc_norm.")):  # classify pools by avg: a fresh fc_norm
                torch.testing.assert_close(model.encoder.state_dict()[name], value, msg=f"{task} {name}")
    with pytest.raises(ValueError, match="token-stem"):  # and a token-stem backbone cannot take a decoder
        build_objective("segment", {"init": str(backbones["m3i"]),
                                    "decoder": str(ade.training.parent / "tokenizer.pt")}, VIT, ade.spec)


def test_backbones_of_another_tokenizer_are_refused_in_one_line(ade, tmp_path, capsys):
    for kind in ("m3i", "addp"):
        foreign = _backbone(kind, ade.other, tmp_path, steps=0)  # what it learnt does not matter here
        for task in ("segment", "classify"):
            capsys.readouterr()
            rc = finetune_main(["--task", task, "--init", str(foreign), "--config",
                                str(ROOT / "configs" / CONFIGS[task]), "--data", str(ade.training),
                                "--out", str(tmp_path / "never"), *MODEL])
            err = capsys.readouterr().err
            assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, (kind, task, err)
            assert f"the --init backbone {foreign} was trained on tokens of tokenizer" in err
    assert not (tmp_path / "never").exists()


def _check_eval(report: dict, samples: int) -> None:
    present = [v for v in report["per_class_iou"].values() if v is not None]
    assert report["samples"] == samples and report["mode"] == "slide" and "wall" in report["per_class_iou"]
    assert present and report["miou"] == pytest.approx(sum(present) / len(present))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["addp", "m3i"])
def test_backbone_fine_tunes_for_segmentation_on_two_ranks_and_evaluates_slide(ade, backbones, kind, tmp_path):
    out = tmp_path / "seg"
    records = launch(ade.training, out, *SEG, config="finetune_seg_tiny.yaml", small=False,
                     module="pretrain.finetune", args=("--task", "segment", "--init", str(backbones[kind])))
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    state = read_trainer_state(out / "checkpoints")
    objective = state["config"]["objective"]
    if kind == "addp":  # --init of a pixel-stem backbone: decoded by the data's tokenizer, ADDP's patch
        assert objective["decoder"] == str(ade.training.parent / "tokenizer.pt") and objective["pixel_patch"] == 16
        assert state["encoder_config"]["stem"] == "pixel" and any(k.startswith("vq.") for k in state["module"])
    else:
        assert objective["decoder"] == "" and state["encoder_config"]["stem"] == "token"
    report_path = tmp_path / "eval.json"
    assert evaluate_main(["--ckpt", str(out / "checkpoints"), "--data", str(ade.validation), "--json",
                          str(report_path), "--mode", "slide", "--window", "4", "--stride", "2"]) == 0
    _check_eval(json.loads(report_path.read_text()), 4)


def test_seg_backbones_bench_builds_and_trains_each_arm(ade, backbones):
    """bench/seg_backbones.py's fine-tuning stage (its DeepSpeed pre-training is the trainer's, tested above)."""
    import argparse
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.seg_backbones import segmenter
    from bench.seg_heads import fit, load_samples, score

    tokens, maps, _ = load_samples([str(ade.training)])
    args = argparse.Namespace(head="pup", channels=16, seed=0)
    tokenizer = ade.training.parent / "tokenizer.pt"
    for init, stem in ((None, "token"), (backbones["m3i"], "token"), (backbones["addp"], "pixel")):
        model = segmenter(init, backbones["m3i"], tokenizer, ade.spec, args)
        assert model.encoder.cfg.stem == stem and (model.vq is not None) == (stem == "pixel")
        trained = fit(model, tokens, maps, 2, 4, 1e-3, 0, "test")
        assert len(trained["losses"]) == 2 and all(math.isfinite(v) for v in trained["losses"])
        cm = score(model, tokens, maps, "slide")
        assert int(cm.matrix.sum()) == int((maps > 0).sum())  # every labelled pixel of the 8 scenes scored once
