"""M3I objective: relative-position geometry, sin-cos at continuous points, the EMA teacher, the category
term against a hand computation, both view sources, mixing, and determinism. Tiny models: each test < 5 s."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives import DataSpec
from pretrain.objectives.m3i import (
    M3I,
    M3IConfig,
    cutmix_region,
    ema_momentum_at,
    relative_positions,
    sincos_at,
    soft_labels,
    two_views,
)
from pretrain.vit import ViTConfig, sincos_pos_embed_2d

VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, patch_size=2, vocab_size=40, token_dim=8)
DATA = DataSpec(grid=(8, 8), vocab_size=40, num_classes=10)
G = VIT.grid_size  # 4 patches per side
SMALL = {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1}


def _model(**options) -> M3I:
    torch.manual_seed(0)
    return M3I(M3IConfig(**{**SMALL, **options}), VIT, DATA)


def _batch(b: int = 4, views: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"tokens": torch.randint(0, 40, (b, 8, 8), generator=g),
             "label": torch.tensor([3, -1, 7, 0, 9, 2][:b]),
             "crop_box": torch.tensor([[16, 0, 256, 256]] * b)}
    if views:
        batch["view_tokens"] = torch.randint(0, 40, (b, 2, 8, 8), generator=g)
        batch["view_box"] = torch.tensor([[[40, 30, 120, 150], [0, 0, 288, 256]]] * b)
        batch["view_flip"] = torch.tensor([[True, False], [False, False]] * (b // 2))
    return batch


# -- geometry -------------------------------------------------------------------------------------


def test_identical_boxes_give_the_integer_patch_grid():
    box = torch.tensor([[10.0, 20.0, 64.0, 48.0], [0.0, 0.0, 1.0, 1.0]])
    for flip in (torch.tensor([False, False]), torch.tensor([True, True])):
        pos = relative_positions(box, box, flip, flip, G)
        rows, cols = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
        grid = torch.stack([rows, cols], -1).reshape(1, -1, 2).double().expand(2, -1, -1)
        assert pos.shape == (2, G * G, 2) and pos.dtype == torch.float64
        torch.testing.assert_close(pos, grid, atol=1e-9, rtol=0)


def test_left_half_maps_into_the_left_half_and_flips_mirror_x():
    ref = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    half = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    pos = relative_positions(half, ref, no, no, G)
    x, y = pos[0, :, 1].reshape(G, G), pos[0, :, 0].reshape(G, G)
    # Reference patch c spans [c - 0.5, c + 0.5): the left half of view 1 is [-0.5, G/2 - 0.5).
    assert ((x + 0.5 >= 0) & (x + 0.5 < G / 2)).all()
    torch.testing.assert_close(x[0], (torch.arange(G).double() + 0.5) / 2 - 0.5)
    torch.testing.assert_close(y[:, 0], torch.arange(G).double())
    # Flipping the query view mirrors its columns; flipping the reference mirrors about its centre.
    flipped_q = relative_positions(half, ref, yes, no, G)[0, :, 1].reshape(G, G)
    torch.testing.assert_close(flipped_q, x.flip(1))
    flipped_ref = relative_positions(half, ref, no, yes, G)[0, :, 1].reshape(G, G)
    torch.testing.assert_close(flipped_ref, (G - 1) - x)


def test_sincos_at_integer_points_equals_the_table():
    for dim, g in ((32, 4), (64, 7)):
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        coords = torch.stack([rows, cols], -1).reshape(1, -1, 2)
        assert torch.equal(sincos_at(coords, dim)[0], sincos_pos_embed_2d(dim, g, class_token=True)[1:])
        assert torch.equal(sincos_at(coords.double(), dim)[0], sincos_pos_embed_2d(dim, g, class_token=False))


def test_made_views_are_crops_of_the_tokens_with_their_boxes():
    ids = torch.arange(64).reshape(1, 8, 8).repeat(3, 1, 1)
    torch.manual_seed(0)
    views = two_views({"tokens": ids}, (0.25, 1.0), (3 / 4, 4 / 3), 0.5)
    for v_ids, box, flip in ((views.ids1, views.box1, views.flip1), (views.ids2, views.box2, views.flip2)):
        assert v_ids.shape == ids.shape
        top, left, h, w = box.unbind(1)
        centre = (torch.arange(8).double() + 0.5) / 8
        rows = ((top[:, None] + centre * h[:, None]) * 8).floor().long()
        cols = ((left[:, None] + centre * w[:, None]) * 8).floor().long()
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        assert torch.equal(v_ids, rows[:, :, None] * 8 + cols[:, None, :])


# -- EMA teacher ----------------------------------------------------------------------------------


def test_ema_schedule_endpoints():
    assert ema_momentum_at(0, 0.996, 100) == pytest.approx(0.996)
    assert ema_momentum_at(100, 0.996, 100) == 1.0
    assert ema_momentum_at(50, 0.996, 100) == pytest.approx(0.998)
    assert ema_momentum_at(500, 0.9, 0) == 0.9  # total_steps 0: constant


def test_after_step_is_the_ema_update():
    model = _model(total_steps=10, ema_momentum=0.9)
    assert list(model.teacher.parameters()) == []
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in model.teacher.module.named_buffers()}
    student = dict(model.encoder.named_parameters())
    model.after_step(4)
    m = ema_momentum_at(3, 0.9, 10)
    assert 0.9 < m < 1.0
    for name, t in model.teacher.module.named_buffers():
        torch.testing.assert_close(t, m * old[name] + (1 - m) * student[name])
    assert model.ema_next.item() == pytest.approx(ema_momentum_at(4, 0.9, 10))


def test_teacher_stays_float32_and_eval_when_parameters_go_bf16():
    model = _model(mix_images=True)
    model.train()
    assert not model.teacher.training
    for p in model.parameters():  # what DeepSpeed's bf16 cast does: parameters only
        p.data = p.data.bfloat16()
    loss, _ = model(_batch())
    loss.backward()
    assert torch.isfinite(loss) and all(b.dtype == torch.float32 for b in model.teacher.buffers()
                                        if b.is_floating_point())
    model.after_step(1)


# -- the loss -------------------------------------------------------------------------------------


def test_category_term_alone_is_plain_cross_entropy():
    model = _model(w_intra=0.0, w_inter=0.0, mask_ratio_min=0.0, mask_ratio_max=0.0, token_dropout=0.0)
    batch = _batch(views=True)
    loss, metrics = model(batch)
    enc = model.encoder
    pooled = enc.forward_head(enc.forward_features(batch["tokens"]), pre_logits=True)
    valid = batch["label"] >= 0
    expected = F.cross_entropy(model.cls_head(pooled)[valid], batch["label"][valid])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["loss_cls"], expected)
    assert metrics["loss_intra"] == 0 and metrics["loss_inter"] == 0


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("options", [{}, {"mix_images": True, "feature_loss": "smooth_l1", "cls_mode": "contrastive"}])
def test_forward_trains_the_encoder_not_the_teacher(views, options):
    model = _model(**options)
    loss, metrics = model(_batch(views=views))
    assert set(metrics) == {"loss_intra", "loss_inter", "loss_cls", "cls_acc", "ema_momentum"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) and v.ndim == 0 for v in metrics.values())
    assert metrics["loss_intra"] > 0 and metrics["loss_inter"] > 0 and metrics["loss_cls"] > 0
    loss.backward()
    enc = model.encoder
    for p in (enc.patch_embed.proj.weight, enc.blocks[0].attn.qkv.weight, enc.token_embed.word_embeddings.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not b.requires_grad and b.grad is None for b in model.teacher.buffers() if b is not None)


def test_mixing_regions_and_soft_targets():
    torch.manual_seed(0)
    region, lam = cutmix_region(64, G)
    assert region.shape == (64, G * G) and torch.equal(lam, region.float().mean(1))
    for row in region.reshape(64, G, G):  # a filled axis-aligned square
        r, c = row.any(1).nonzero().flatten(), row.any(0).nonzero().flatten()
        assert row.sum() == len(r) * len(c) and len(r) == len(c)
    labels = torch.tensor([1, 2, -1, 4])
    lam = torch.tensor([0.25, 0.5, 0.75, 1.0])
    target, valid = soft_labels(labels, lam, 5)
    assert valid.tolist() == [True, True, True, False]  # sample 3 is all pasted, and that image has no label
    torch.testing.assert_close(target[valid].sum(1), torch.ones(3))
    torch.testing.assert_close(target[0], torch.tensor([0.0, 0.75, 0.0, 0.0, 0.25]))  # (1 - lam) own + lam rolled
    torch.testing.assert_close(target[2], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))  # own label missing
    smoothed, _ = soft_labels(labels, lam, 5, smoothing=0.1)
    torch.testing.assert_close(smoothed[valid].sum(1), torch.ones(3))


def test_same_seed_same_loss():
    model = _model(mix_images=True)
    batch = _batch()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(model(batch)[0])
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(8)
    assert not torch.equal(model(batch)[0], losses[0])


def test_config_checks():
    with pytest.raises(ValueError, match="not all 0"):
        M3IConfig(w_intra=0.0, w_inter=0.0, w_cls=0.0)
    with pytest.raises(ValueError, match="feature_loss"):
        M3IConfig(feature_loss="l3")
    with pytest.raises(ValueError, match="labelled"):
        M3I(M3IConfig(**SMALL), VIT, dataclasses.replace(DATA, num_classes=0))
    model = M3I(M3IConfig(**SMALL, w_cls=0.0, w_inter=0.0), VIT, dataclasses.replace(DATA, num_classes=0))
    assert not hasattr(model, "teacher") and not hasattr(model, "cls_head")


def test_every_attention_in_the_objectives_goes_through_sdpa(monkeypatch):
    """Encoder, decoder and teacher attention are ``pretrain.vit.Attention`` (F.scaled_dot_product_attention):
    one SDPA call per block run, no hand-written attention in the objectives."""
    from torch import nn

    from pretrain import vit as vit_module
    from pretrain.objectives import build_objective

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    ids = torch.randint(0, 40, (2, 8, 8))
    for name, options, blocks in (("mtm", SMALL, VIT.depth + 1), ("m3i", SMALL, 2 * VIT.depth + 1)):
        torch.manual_seed(0)
        model = build_objective(name, options, VIT, DATA)
        attention = [m for m in model.modules() if "attention" in type(m).__name__.lower()
                     or isinstance(m, nn.MultiheadAttention)]
        assert attention and all(isinstance(m, vit_module.Attention) for m in attention), name
        calls.clear()
        model({"tokens": ids, "label": torch.tensor([1, 2])})
        assert len(calls) == blocks, (name, len(calls))  # encoder + decoder (+ M3I's EMA teacher)


def test_a_checkpoint_from_before_the_ema_teacher_part_loads():
    """The teacher's state-dict names were ``teacher.*`` before ``parts.EMATeacher`` (now ``teacher.module.*``)."""
    torch.manual_seed(0)
    model = M3I(M3IConfig(**SMALL), VIT, DATA)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.after_step(1)
    old = {k.replace("teacher.module.", "teacher."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("teacher.blocks.") for k in old)
    fresh = M3I(M3IConfig(**SMALL), VIT, DATA)
    fresh.load_state_dict(old)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], t, msg=name)
