"""Trainer configuration, optimizer groups, schedule and seeding: the parts that need no process group."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pretrain.config import MAX_CONFIG_BYTES, ConfigError, apply_overrides, load_config, parse_yaml
from pretrain.objectives import OBJECTIVES, DataSpec, build_objective
from pretrain.optim import base_lr, deepspeed_config, lr_at, param_groups
from pretrain.train import parse_args, step_seed
from pretrain.vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name, ["data.train=/x/train"])
    assert cfg.objective_name in OBJECTIVES and cfg.run.steps > 0
    assert isinstance(cfg.optim.blr, float)  # "1.5e-4" is a float here, not YAML 1.1's string


def test_overrides_are_yaml_and_nested():
    raw = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "optim.betas=[0.9, 0.99]", "augment=null",
                                                  "model.depth=6"])
    assert raw == {"optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "augment": None, "model": {"depth": 6}}
    assert parse_yaml("x: 1e3")["x"] == 1000.0
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["optim.lr"])


def test_config_errors_name_the_key(tmp_path):
    path = ROOT / "configs" / "mtm_vit_tiny.yaml"
    with pytest.raises(ValueError, match=r"learning_rate.*valid keys"):
        load_config(path, ["data.train=x", "optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optimiser'\]"):
        load_config(path, ["data.train=x", "optimiser.lr=1"])
    with pytest.raises(ValueError, match="lr must be a number"):
        load_config(path, ["data.train=x", "optim.lr=fast"])
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(path, ["data.train=x", "engine.zero_stage=4"])
    with pytest.raises(ValueError, match="zero_stage 3 is not supported"):
        load_config(path, ["data.train=x", "engine.zero_stage=3"])
    with pytest.raises(ValueError, match="data.train"):
        load_config(None, [])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_schedule_warmup_then_cosine():
    lr, total, warm = 1e-3, 100, 10
    assert lr_at(0, total, lr, warm, 0.0) == pytest.approx(1e-4)
    assert lr_at(9, total, lr, warm, 0.0) == pytest.approx(1e-3)
    assert lr_at(10, total, lr, warm, 1e-5) == pytest.approx(1e-3)
    mid = 10 + 45
    assert lr_at(mid, total, lr, warm, 0.0) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, total, lr, warm, 1e-5) == pytest.approx(1e-5)
    cfg = load_config(ROOT / "configs" / "mtm_vit_tiny.yaml", ["data.train=x"]).optim
    assert base_lr(cfg, 512) == pytest.approx(1.5e-4 * 2)


def test_no_weight_decay_on_norms_biases_and_positions():
    vit = ViTConfig(embed_dim=32, depth=1, num_heads=2, grid=8, vocab_size=16, token_dim=8, pos_embed="learned")
    model = build_objective("mtm", {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1}, vit,
                            DataSpec(grid=(8, 8), vocab_size=16))
    decay, no_decay = param_groups(model, 0.05, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed", "token_head.bias",
            "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.token_embed.word_embeddings.weight",
            "encoder.patch_embed.proj.weight"} <= decay_names
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_deepspeed_config_and_cli():
    cfg = load_config(ROOT / "configs" / "mtm_vit_tiny.yaml", ["data.train=x", "engine.zero_stage=2",
                                                                 "engine.precision=bf16", "optim.grad_accum=4"])
    ds = deepspeed_config(cfg.engine, cfg.optim, 16, 2)
    assert ds["train_batch_size"] == 16 * 4 * 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 3.0
    args = parse_args(["--config", "c.yaml", "--resume", "--local_rank=1", "optim.lr=1e-3"])
    assert args.resume == "" and args.overrides == ["optim.lr=1e-3"]
    assert parse_args(["--config", "c.yaml"]).resume is None


def test_step_seed_depends_on_every_part_of_the_key():
    base = step_seed(0, 0, 5, 0)
    assert step_seed(0, 0, 5, 0) == base
    others = {step_seed(1, 0, 5, 0), step_seed(0, 1, 5, 0), step_seed(0, 0, 6, 0), step_seed(0, 0, 5, 1)}
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


def test_layer_decay_scales_lr_by_depth():
    from pretrain.optim import layer_decay_groups, layer_id
    from pretrain.vit import VisionTransformer

    assert [layer_id(n, 12) for n in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                      "blocks.11.mlp.fc2.bias", "norm.weight", "head.weight")] == [0, 0, 1, 12, 13, 13]
    vit = VisionTransformer(ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, vocab_size=16, token_dim=8,
                                      num_classes=5))
    groups = layer_decay_groups(vit, 1e-3, 0.05, 0.5, depth=2, skip=vit.no_weight_decay())
    by_name = {id(p): g for g in groups for p in g["params"]}
    named = dict(vit.named_parameters())
    assert by_name[id(named["head.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_name[id(named["blocks.1.attn.qkv.weight"])]["lr"] == pytest.approx(0.5e-3)
    assert by_name[id(named["blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(0.25e-3)
    assert by_name[id(named["patch_embed.proj.weight"])]["lr"] == pytest.approx(0.125e-3)
    assert by_name[id(named["cls_token"])]["weight_decay"] == 0.0
    assert by_name[id(named["cls_token"])]["lr"] == pytest.approx(0.125e-3)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in vit.parameters() if p.requires_grad)


@pytest.mark.parametrize("override", [
    "optim.grad_accum=0", "run.log_every=0", "run.stop_at=-1", "run.stop_at=0", "optim.warmup_steps=-1",
    "run.save_every=-5", "run.keep_checkpoints=0", "data.prefetch_shards=-1", "data.batch_size=0",
    "data.num_workers=-1", "optim.lr=0", "optim.eps=-1.0", "optim.layer_decay=1.5", "optim.betas=[0.9,1.5]",
    "run.seed=-1", "data.partitions=0", "optim.grad_clip=-1", "run.steps=0"])
def test_out_of_range_values_are_refused_naming_section_and_key(override):
    key, value = override.split("=")
    first = re.escape(value.split(",")[0].strip("["))
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be .*got .?{first}"):
        load_config(ROOT / "configs" / "mtm_vit_tiny.yaml", ["data.train=x", override])


def test_free_sections_are_checked_before_launch():
    path = ROOT / "configs" / "mtm_vit_tiny.yaml"
    with pytest.raises(ValueError, match=r"objective.*mask_ratoi"):
        load_config(path, ["data.train=x", "objective.mask_ratoi=0.5"])
    with pytest.raises(ConfigError, match=r"model.dept"):
        load_config(path, ["data.train=x", "model.dept=3"])
    with pytest.raises(ConfigError, match=r"objective.name must be one of"):
        load_config(path, ["data.train=x", "objective.name=mae"])
    with pytest.warns(UserWarning, match="warmup_steps"):
        load_config(path, ["data.train=x", "run.steps=10", "optim.warmup_steps=10"])


def test_yaml_aliases_and_huge_files_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(lines) + "\ndata:\n  train: x\n  tokenizer: *i\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: YAML alias \*a at line 2"):
        load_config(bomb)
    big = tmp_path / "big.yaml"
    big.write_text("run:\n  steps: 1\n" + "#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="configs are at most"):
        load_config(big)


@pytest.mark.parametrize("override, key", [("data.batch_size=0", "data.batch_size"), ("model.depth=-1", "model.depth"),
                                           ("objective.mask_ratio_min=2", "objective.mask_ratio_min"),
                                           ("model.dpeth=3", "model.dpeth"), ("augment.hflip_p=x", "augment.hflip_p")])
def test_a_config_mistake_is_one_line_naming_the_key(override, key, capsys):
    """Refused by load_config, before any process group or engine: one ``error:`` line, no traceback."""
    from pretrain.train import main

    assert main(["--config", str(ROOT / "configs" / "mtm_vit_tiny.yaml"), "--data", "nowhere", override]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and "\n" not in err and "Traceback" not in err, err


def test_every_section_is_a_frozen_dataclass():
    import dataclasses

    from pretrain.augment import TokenAugConfig
    from pretrain.objectives.segment import SegmentConfig

    cfg = load_config(ROOT / "configs" / "finetune_seg_tiny.yaml", ["data.train=x", "augment={rrc: false, hflip_p: 0}"])
    assert isinstance(cfg.model, ViTConfig) and isinstance(cfg.objective, SegmentConfig)
    assert isinstance(cfg.augment, TokenAugConfig) and cfg.objective_name == "segment"
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
    again = load_config(None, [f"{s}={json.dumps(v)}" for s, v in cfg.to_dict().items()])
    assert again == cfg  # to_dict (config.yaml, checkpoints) reads back to the same config
