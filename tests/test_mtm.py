"""MTM objective (SeiT++): mask sampling, mask nesting, loss on masked patches only, the tied head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives import DataSpec, build_objective
from pretrain.objectives.mtm import MTMConfig
from pretrain.objectives.parts import patch_mean, random_masks, sample_mask_ratio
from pretrain.vit import ViTConfig

VIT = ViTConfig(embed_dim=32, depth=2, num_heads=2, grid=8, patch_size=2, vocab_size=40, token_dim=8)
DATA = DataSpec(grid=(8, 8), vocab_size=40)
SMALL = {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1}


def _model(**options):
    torch.manual_seed(0)
    return build_objective("mtm", {**SMALL, **options}, VIT, DATA)


def test_mask_ratio_follows_the_truncated_normal():
    cfg = MTMConfig()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_mask_ratio(cfg, g) for _ in range(4000)])
    assert draws.min() >= cfg.mask_ratio_min and draws.max() <= cfg.mask_ratio_max
    # Mean of N(0.45, 0.25) truncated to [0.4, 1.0]: mu + std * (phi(a) - phi(b)) / (Phi(b) - Phi(a)).
    a, b = (0.4 - 0.45) / 0.25, (1.0 - 0.45) / 0.25
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expected = 0.45 + 0.25 * (phi(a) - phi(b)) / (cdf(b) - cdf(a))
    assert abs(draws.mean().item() - expected) < 0.01


def test_random_masks_counts_and_nesting():
    g = torch.Generator().manual_seed(1)
    masked, dropped, keep = random_masks(5, 16, 11, 7, generator=g)
    assert masked.sum(1).tolist() == [11] * 5 and dropped.sum(1).tolist() == [7] * 5
    assert not (dropped & ~masked).any(), "a dropped patch must be masked"
    assert keep.shape == (5, 9)
    for row in range(5):
        assert keep[row].tolist() == sorted(set(range(16)) - set(dropped[row].nonzero().flatten().tolist()))
    with pytest.raises(ValueError, match="n_dropped"):
        random_masks(1, 4, 2, 3)


def test_patch_mean_groups_two_by_two():
    x = torch.arange(16.0).reshape(1, 4, 4)
    assert patch_mean(x, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]


def test_loss_ignores_unmasked_patches():
    model = _model()
    ids = torch.randint(0, 40, (2, 8, 8))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :5] = True
    logits = torch.randn(2, 8, 8, 40)
    loss, metrics = model.forward_loss(logits, ids, masked)
    other = logits.clone()
    other[:, 4:, :, :] = torch.randn(2, 4, 8, 40)  # rows 4..7 hold patches 8..15, all unmasked
    assert torch.equal(model.forward_loss(other, ids, masked)[0], loss)
    # By hand: CE per token, mean over each 2 x 2 patch, mean over the 5 masked patches of each sample.
    ce = F.cross_entropy(logits.reshape(-1, 40), ids.reshape(-1), reduction="none").reshape(2, 8, 8)
    per_patch = ce.reshape(2, 4, 2, 4, 2).mean((2, 4)).reshape(2, 16)
    torch.testing.assert_close(loss, per_patch[:, :5].mean())
    assert metrics["mask_ratio"].item() == pytest.approx(5 / 16)


def test_forward_shapes_masks_and_gradients():
    model = _model()
    ids = torch.randint(0, 40, (3, 8, 8))
    torch.manual_seed(3)
    latent, masked, keep = model.forward_encoder(ids)
    n_masked = masked.sum(1)
    assert (n_masked == n_masked[0]).all() and n_masked[0] >= math.ceil(16 * 0.4)
    n_dropped = 16 - keep.shape[1]
    assert n_dropped == math.ceil(16 * 0.4)
    assert latent.shape == (3, 1 + keep.shape[1], 32)
    logits = model.forward_decoder(latent, masked, keep)
    assert logits.shape == (3, 8, 8, 40)
    loss, metrics = model({"tokens": ids})
    loss.backward()
    assert {"masked_ce", "masked_acc", "mask_ratio"} <= metrics.keys()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # The head is tied to the token embedding with the gradient stopped (SeiT++): the table learns
    # only through the input path, so its gradient equals the one without the head's use of it.
    assert model.encoder.token_embed.word_embeddings.weight.grad is not None


def test_head_scores_against_the_token_embedding_table():
    model = _model().eval()
    z = torch.randn(1, 16, 32)
    logits = model.token_logits(z)
    table = model.encoder.token_embed.word_embeddings.weight
    with torch.no_grad():
        table.mul_(2.0)
    doubled = model.token_logits(z)
    bias = model.token_head.bias
    torch.testing.assert_close(doubled - bias, 2 * (logits - bias))


def test_same_seed_same_loss_and_config_errors():
    model = _model()
    ids = torch.randint(0, 40, (2, 8, 8))
    torch.manual_seed(7)
    a = model({"tokens": ids})[0]
    torch.manual_seed(7)
    b = model({"tokens": ids})[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown key"):
        build_objective("mtm", {"mask_ratio": 0.5}, VIT, DATA)
    with pytest.raises(ValueError, match="drop_ratio"):
        MTMConfig(drop_ratio=0.6)
    with pytest.raises(ValueError, match="do not match"):
        build_objective("mtm", SMALL, VIT, DataSpec(grid=(16, 16), vocab_size=40))
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("bert", {}, VIT, DATA)


def test_predict_with_nothing_masked_differs_from_all_masked_and_keeps_shape():
    model = _model().eval()
    ids = torch.randint(0, 40, (2, 8, 8))
    none = model.predict(ids, torch.zeros(2, 16, dtype=torch.bool))
    full = model.predict(ids, torch.ones(2, 16, dtype=torch.bool))
    assert none.shape == full.shape == (2, 8, 8, 40)
    # With every patch masked the ids cannot matter.
    other = torch.randint(0, 40, (2, 8, 8))
    torch.testing.assert_close(model.predict(other, torch.ones(2, 16, dtype=torch.bool)), full)
    assert not torch.allclose(none, full)


def test_checkpoints_from_before_the_head_was_a_part_still_load():
    """State dicts with the old flat head names (head_fc / head_norm / head_bias) load into token_head."""
    model = _model()
    legacy = {k.replace("token_head.fc.", "head_fc.").replace("token_head.norm.", "head_norm.")
              .replace("token_head.bias", "head_bias"): v for k, v in model.state_dict().items()}
    assert "head_bias" in legacy and not any(k.startswith("token_head") for k in legacy)
    torch.manual_seed(1)
    fresh = build_objective("mtm", SMALL, VIT, DATA)
    fresh.load_state_dict(legacy)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
