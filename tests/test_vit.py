"""ViT backbone (pretrain.vit) and its export (pretrain.export): shapes, timm names, sin-cos table, drop path,
FLOPs, config checks, backbone files, timm export from backbone files and DeepSpeed checkpoint directories."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.checkpoint import read_backbone as load_checkpoint
from pretrain.export import (
    export,
    load_backbone,
    main,
    save_backbone,
    timm_create_kwargs,
    timm_key_names,
    timm_model_name,
)
from pretrain.vit import (
    PRESETS,
    DropPath,
    VisionTransformer,
    ViTConfig,
    interpolate_pos_embed,
    sincos_pos_embed_2d,
    vit_config,
)

K, TD = 16, 8
SMALL = dict(embed_dim=32, depth=2, num_heads=2, grid=8, patch_size=2, vocab_size=K, token_dim=TD)

# timm VisionTransformer's keys for a depth-2 model with qkv bias, cls pooling and a head, written out.
TIMM_KEYS_DEPTH2 = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "blocks.1.norm1.weight", "blocks.1.norm1.bias", "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias",
    "blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias",
    "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias",
    "norm.weight", "norm.bias", "head.weight", "head.bias",
]
TOKEN_EMBED_KEYS = ["token_embed.word_embeddings.weight", "token_embed.norm.weight", "token_embed.norm.bias"]


def small(**overrides) -> ViTConfig:
    return ViTConfig(**{**SMALL, **overrides})


def model(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(small(**overrides))


def ids(b: int = 3, grid: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (b, grid, grid), generator=torch.Generator().manual_seed(seed))


class _Opaque:
    """Stands for an arbitrary object a training script might put into a DeepSpeed client state."""


# -- shapes and pooling ---------------------------------------------------------------------------


def test_token_stem_shapes():
    m = model(num_classes=5).eval()
    x = ids()
    assert m.patchify(x).shape == (3, 16, 32)
    feats = m.forward_features(x)
    assert feats.shape == (3, 17, 32) and feats.dtype == torch.float32
    assert m(x).shape == (3, 5)
    assert m.forward_head(feats, pre_logits=True).shape == (3, 32)
    assert model(num_classes=0)(x).shape == (3, 32)


def test_pixel_stem_shapes_and_avg_pool_without_class_token():
    m = model(stem="pixel", grid=16, patch_size=4, in_chans=3, class_token=False, global_pool="avg",
              num_classes=4).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 32)
    assert not hasattr(m, "token_embed") and m.cls_token is None and m.pos_embed.shape == (1, 16, 32)
    pooled = m.fc_norm(feats.mean(dim=1))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), pooled)
    torch.testing.assert_close(m(x), m.head(pooled))


def test_pooling_token_uses_cls_and_avg_excludes_it():
    tok = model(num_classes=3).eval()
    feats = torch.randn(2, 17, 32)
    torch.testing.assert_close(tok.forward_head(feats), tok.head(feats[:, 0]))
    avg = model(global_pool="avg", num_classes=3).eval()
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    torch.testing.assert_close(avg.forward_head(feats), avg.head(avg.fc_norm(feats[:, 1:].mean(dim=1))))


def test_patchify_rejects_wrong_shapes():
    m = model()
    with pytest.raises(ValueError, match="token ids"):
        m.patchify(ids(grid=6))
    with pytest.raises(ValueError, match="float"):
        m.patchify(torch.randn(2, TD + 1, 8, 8))


def test_float_embedding_input_equals_id_input():
    m = model().eval()
    x = ids()
    emb = m.token_embed(x)
    assert emb.shape == (3, TD, 8, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(m.patchify(emb), m.patchify(x))
    torch.testing.assert_close(m(emb), m(x))
    # the embedding is normalised over token_dim: mean 0 / var 1 at every position (LayerNorm at init)
    torch.testing.assert_close(emb.mean(dim=1), torch.zeros(3, 8, 8), atol=1e-5, rtol=0)


# -- names, init, parameters ----------------------------------------------------------------------


def test_param_names_are_timm_names():
    m = model(num_classes=10)
    assert set(m.state_dict()) == set(TIMM_KEYS_DEPTH2) | set(TOKEN_EMBED_KEYS)
    assert timm_key_names(m.cfg) == TIMM_KEYS_DEPTH2
    avg = model(global_pool="avg", class_token=False, qkv_bias=False, stem="pixel")
    expected = [k for k in TIMM_KEYS_DEPTH2 if not k.startswith(("cls_token", "norm.", "head.", "blocks.0.attn.qkv.b",
                                                                  "blocks.1.attn.qkv.b"))]
    assert set(avg.state_dict()) == set(expected) | {"fc_norm.weight", "fc_norm.bias"}
    assert set(timm_key_names(avg.cfg)) == set(avg.state_dict())


def test_init_follows_mae():
    m = model(num_classes=5)
    qkv = m.blocks[0].attn.qkv
    bound = math.sqrt(6 / (32 + 96))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound
    assert torch.all(qkv.bias == 0) and torch.all(m.head.bias == 0)
    assert torch.all(m.blocks[1].norm2.weight == 1) and torch.all(m.norm.bias == 0)
    pw = m.patch_embed.proj.weight
    assert pw.abs().max() <= math.sqrt(6 / (TD * 4 + 32)) and torch.all(m.patch_embed.proj.bias == 0)
    assert 0.01 < m.cls_token.std() < 0.04
    assert 0.015 < m.token_embed.word_embeddings.weight.std() < 0.025


def test_sincos_pos_embed_analytic_values():
    table = sincos_pos_embed_2d(8, 4, class_token=True)
    assert table.shape == (17, 8) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    # dim 8 -> each axis gets 4 dims, omega = [1, 1/100]; first half encodes the column, second the row
    torch.testing.assert_close(table[1], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    r, c = 1, 2
    want = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
            math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    torch.testing.assert_close(table[1 + r * 4 + c], torch.tensor(want))
    assert sincos_pos_embed_2d(8, 4, class_token=False).shape == (16, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 4, class_token=True)


def test_sincos_matches_numpy_meshgrid_layout():
    """Independent numpy evaluation of MAE's layout: np.meshgrid(w, h) ('xy'); first half from grid[0]."""
    dim, g = 16, 5
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64)), axis=0)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1, 1) / 10000 ** (np.arange(d // 2) / (d / 2))
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    want = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g, class_token=False), torch.from_numpy(want).float())


def test_pos_embed_trainability():
    fixed = model()
    assert not fixed.pos_embed.requires_grad and fixed.cls_token.requires_grad
    torch.testing.assert_close(fixed.pos_embed[0], sincos_pos_embed_2d(32, 4, class_token=True))
    assert fixed.num_params() - fixed.num_params(trainable_only=True) == 17 * 32
    learned = model(pos_embed="learned")
    assert learned.pos_embed.requires_grad and learned.num_params() == learned.num_params(trainable_only=True)
    assert 0.01 < learned.pos_embed.std() < 0.03
    assert fixed.no_weight_decay() == {"pos_embed", "cls_token"}
    assert model(class_token=False, global_pool="avg").no_weight_decay() == {"pos_embed"}


# -- drop path ------------------------------------------------------------------------------------


def test_drop_path_train_vs_eval():
    x = ids(b=8)
    m = model(drop_path=0.5).eval()
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(m(x), ref)  # eval is deterministic
        m.train()
        torch.manual_seed(0)
        assert not torch.allclose(m(x), ref)
        m0 = model(drop_path=0.0).train()
        torch.testing.assert_close(m0(x), m0.eval()(x))
    rates = [b.drop_path1.rate for b in m.blocks]
    assert rates == [0.0, 0.5]  # linear over blocks, timm rule


def test_drop_path_is_per_sample():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    out = dp(torch.ones(400, 3, 5))
    per_sample = out.reshape(400, -1)
    assert torch.all((per_sample == 0).all(dim=1) | (per_sample == 2).all(dim=1))
    assert 120 < int((per_sample[:, 0] == 0).sum()) < 280
    assert torch.equal(dp.eval()(out), out)


# -- FLOPs, presets, config -----------------------------------------------------------------------


def test_flops_per_sample_hand_formula_and_counter():
    m = model(num_classes=5).eval()
    n, seq, d, h = 16, 17, 32, 128
    stem = n * TD * 2 * 2 * d
    block = seq * (4 * d * d + 2 * d * h) + 2 * seq * seq * d
    assert m.flops_per_sample() == 2 * (stem + 2 * block + d * 5) == 942_656
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(ids(b=1))
    assert counter.get_total_flops() == m.flops_per_sample()
    with torch.device("meta"):
        big = VisionTransformer(vit_config("base", stem="pixel", grid=224, patch_size=16, num_classes=1000))
    assert big.num_params() == 86_567_656  # timm vit_base_patch16_224
    assert 17.5e9 < big.flops_per_sample() / 2 < 17.7e9  # the usual 17.6 GMACs


@pytest.mark.parametrize("preset, dims", [("tiny", (192, 12, 3)), ("small", (384, 12, 6)), ("base", (768, 12, 12)),
                                          ("large", (1024, 24, 16))])
def test_presets(preset, dims):
    cfg = vit_config(preset, grid=16, num_classes=7)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == dims
    assert (cfg.grid, cfg.num_classes, cfg.grid_size, cfg.num_patches) == (16, 7, 8, 64)
    assert timm_model_name(cfg) == f"vit_{preset}_patch16_224"
    assert set(PRESETS) == {"tiny", "small", "base", "large"}


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny, small, base, large"):
        vit_config("huge")


@pytest.mark.parametrize("field, overrides", [
    ("grid", {"grid": 9}),
    ("embed_dim", {"num_heads": 3}),
    ("stem", {"stem": "conv"}),
    ("pos_embed", {"pos_embed": "rope"}),
    ("global_pool", {"global_pool": "max"}),
    ("global_pool", {"class_token": False}),
    ("drop_path", {"drop_path": 1.0}),
    ("depth", {"depth": 0}),
    ("num_classes", {"num_classes": -1}),
    ("embed_dim", {"embed_dim": 34, "num_heads": 2}),  # sincos needs dim % 4 == 0
])
def test_bad_config_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        small(**overrides)


def test_reset_classifier_switches_pooling_and_round_trips(tmp_path):
    m = model()
    with torch.no_grad():
        m.norm.weight.fill_(3.0)
    m.reset_classifier(4)  # same pooling: the trained final norm is kept
    assert torch.all(m.norm.weight == 3.0) and m.head.weight.shape == (4, 32) and m.cfg.num_classes == 4
    m.reset_classifier(7, global_pool="avg")
    assert m.cfg.num_classes == 7 and m.cfg.global_pool == "avg"
    assert isinstance(m.norm, torch.nn.Identity) and isinstance(m.fc_norm, torch.nn.LayerNorm)
    assert m(ids()).shape == (3, 7)
    save_backbone(tmp_path / "b.pt", m)
    torch.testing.assert_close(load_backbone(tmp_path / "b.pt").eval()(ids()), m.eval()(ids()))
    with pytest.raises(ValueError, match="global_pool"):
        model(class_token=False, global_pool="avg").reset_classifier(3, global_pool="token")


def test_interpolate_pos_embed_shape_contract():
    pos = sincos_pos_embed_2d(32, 4, class_token=True).unsqueeze(0)
    out = interpolate_pos_embed(pos, 6, num_prefix=1)
    assert out.shape == (1, 37, 32) and out.dtype == pos.dtype
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    torch.testing.assert_close(interpolate_pos_embed(pos, 4, num_prefix=1), pos)
    const = torch.full((1, 9, 4), 0.5)
    torch.testing.assert_close(interpolate_pos_embed(const, 5, num_prefix=0), torch.full((1, 25, 4), 0.5))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos, 6, num_prefix=0)
    # the resized table drops into a model built for the new grid
    m = model(grid=12, pos_embed="learned")
    m.pos_embed.data.copy_(interpolate_pos_embed(model(pos_embed="learned").pos_embed.data, 6, 1))
    assert m(ids(grid=12)).shape == (3, 32)


# -- backbone files and export --------------------------------------------------------------------


def test_save_load_backbone_round_trip(tmp_path):
    m = model(num_classes=4, pos_embed="learned").eval()
    save_backbone(tmp_path / "sub" / "backbone.pt", m, {"step": 12, "objective": "mtm"})
    raw = torch.load(tmp_path / "sub" / "backbone.pt", weights_only=True)
    assert raw["step"] == 12 and raw["vit_config"] == dataclasses.asdict(m.cfg)
    back = load_backbone(tmp_path / "sub" / "backbone.pt").eval()
    assert back.cfg == m.cfg
    x = ids()
    assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match="reserved"):
        save_backbone(tmp_path / "x.pt", m, {"model": 1})
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pt")


def test_export_timm_from_backbone_file(tmp_path, capsys):
    m = model(num_classes=10)
    save_backbone(tmp_path / "backbone.pt", m)
    assert main(["--ckpt", str(tmp_path / "backbone.pt"), "--out", str(tmp_path / "timm.pth")]) == 0
    state = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert list(state) == TIMM_KEYS_DEPTH2
    assert not any(k.startswith("token_embed") for k in state)
    for k, v in state.items():
        assert v.dtype == torch.float32 and torch.equal(v, m.state_dict()[k])
    assert state["patch_embed.proj.weight"].shape == (32, TD, 2, 2)
    printed = capsys.readouterr().out
    assert "token_embed.word_embeddings.weight" in printed and "in_chans=8" in printed
    kwargs = timm_create_kwargs(m.cfg)
    assert (kwargs["img_size"], kwargs["patch_size"], kwargs["in_chans"]) == (8, 2, TD)


def test_export_pixel_backbone_drops_nothing(tmp_path):
    m = model(stem="pixel", grid=16, patch_size=4, global_pool="avg")
    save_backbone(tmp_path / "b.pt", m)
    summary = export(tmp_path / "b.pt", tmp_path / "t.pth", "timm")
    assert summary["dropped"] == [] and summary["timm_kwargs"]["in_chans"] == 3
    assert set(torch.load(tmp_path / "t.pth", weights_only=True)) == set(m.state_dict())


def _fake_deepspeed(root, enc: VisionTransformer, tag: str = "global_step40", extra: dict | None = None) -> None:
    """What DeepSpeed writes: <root>/latest and <root>/<tag>/mp_rank_00_model_states.pt, client state on top."""
    module = {f"encoder.{k}": v.to(torch.bfloat16) for k, v in enc.state_dict().items()}
    module["decoder_pos_embed"] = torch.zeros(1, 17, 16)
    module["mask_token"] = torch.zeros(1, 1, 32)
    (root / tag).mkdir(parents=True)
    (root / "latest").write_text(tag + "\n")
    state = {"module": module, "buffer_names": [], "optimizer": None, "global_steps": 40, "ds_version": "0.19.8",
             "ds_config": {"bf16": {"enabled": True}}, "vit_config": dataclasses.asdict(enc.cfg),
             "objective": "mtm", **(extra or {})}
    torch.save(state, root / tag / "mp_rank_00_model_states.pt")


def test_export_timm_from_deepspeed_directory(tmp_path, capsys):
    enc = model(pos_embed="learned")
    _fake_deepspeed(tmp_path / "ckpt", enc, extra={"best_acc": np.float64(0.5)})  # numpy scalar: the fallback path
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "timm.pth"), "--format", "timm"]) == 0
    state = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert list(state) == [k for k in TIMM_KEYS_DEPTH2 if not k.startswith("head.")]
    for k, v in state.items():
        assert v.dtype == torch.float32 and torch.equal(v, enc.state_dict()[k].to(torch.bfloat16).float())
    printed = capsys.readouterr().out
    assert "deepspeed" in printed and "bfloat16" in printed and "token_embed.norm.bias" in printed


def test_export_vqpt_from_deepspeed_directory(tmp_path):
    enc = model()
    _fake_deepspeed(tmp_path / "ckpt", enc)
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b.pt"), "--format", "vqpt"]) == 0
    back = load_backbone(tmp_path / "b.pt").eval()
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert raw["global_steps"] == 40 and back.cfg == enc.cfg
    ref = model()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in enc.state_dict().items()})
    assert torch.equal(back(ids()), ref.eval()(ids()))
    # the bare model-states file works too, and so does an explicit tag
    m, info = load_checkpoint(tmp_path / "ckpt" / "global_step40" / "mp_rank_00_model_states.pt")
    assert info["kind"] == "deepspeed" and torch.equal(m.eval()(ids()), back(ids()))
    assert load_checkpoint(tmp_path / "ckpt", tag="global_step40")[1]["global_steps"] == 40


def test_deepspeed_unsafe_object_is_refused(tmp_path):
    _fake_deepspeed(tmp_path / "ckpt", model(), extra={"state": _Opaque()})
    with pytest.raises(ValueError, match="_Opaque"):
        load_checkpoint(tmp_path / "ckpt")


def test_export_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not found"):
        export(tmp_path / "nope.pt", tmp_path / "o.pth")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match="latest"):
        export(tmp_path / "dir", tmp_path / "o.pth")
    (tmp_path / "dir" / "latest").write_text("global_step1")
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt"):
        export(tmp_path / "dir", tmp_path / "o.pth")
    (tmp_path / "dir" / "global_step1").mkdir()
    (tmp_path / "dir" / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_model_states.pt: not a readable torch checkpoint"):
        export(tmp_path / "dir", tmp_path / "o.pth")
    save_backbone(tmp_path / "b.pt", model())
    with pytest.raises(ValueError, match="unknown format"):
        export(tmp_path / "b.pt", tmp_path / "o.pth", "onnx")
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "b.pt"), "--out", str(tmp_path / "o.pth"), "--format", "onnx"])
    capsys.readouterr()
    assert main(["--ckpt", str(tmp_path / "dir"), "--out", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "zero_to_fp32" not in err and err.count("\n") == 1 and "Traceback" not in err
    torch.save({"module": {}, "vit_config": {**dataclasses.asdict(small()), "bogus": 1}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bogus"):
        export(tmp_path / "bad.pt", tmp_path / "o.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a backbone file"):
        load_backbone(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        export(tmp_path / "junk.pt", tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()


def test_attention_uses_sdpa_and_equals_the_explicit_formula(monkeypatch):
    import torch.nn.functional as F

    from pretrain.vit import Attention

    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]
