"""The chunked, masked-only token loss equals the full-logits path: loss, metrics and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives import DataSpec, build_objective
from pretrain.token_loss import full_logits_loss, patch_targets, tied_head_cross_entropy
from pretrain.vit import ViTConfig

K, E = 50, 8


def _inputs(rows: int, seed: int = 0, bias_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, E, generator=g, dtype=torch.float64).float().requires_grad_()
    table = (torch.randn(K, E, generator=g) * 2).requires_grad_()
    bias = (torch.randn(K, generator=g) * bias_scale).requires_grad_()
    target = torch.randint(0, K, (rows,), generator=g)
    return hidden, table, bias, target


def _grads(result, *tensors):
    return torch.autograd.grad(result.loss, tensors, allow_unused=True)


@pytest.mark.parametrize("rows, chunk, smoothing", [(37, 8, 0.0), (37, 8, 0.1), (64, 16, 0.0), (5, 4096, 0.2),
                                                    (1, 1, 0.0), (0, 8, 0.0), (0, 8, 0.1)])
def test_chunked_loss_and_gradients_equal_the_full_logits(rows, chunk, smoothing):
    hidden, table, bias, target = _inputs(rows)
    ref = full_logits_loss(hidden, table, bias, target, smoothing)
    got = tied_head_cross_entropy(hidden, table, bias, target, smoothing, chunk_rows=chunk)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.ce, ref.ce, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.correct, ref.correct)
    for a, b in zip(_grads(got, hidden, table, bias), _grads(ref, hidden, table, bias), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if rows == 0:
        assert got.loss.item() == 0.0


def test_gradient_scales_with_the_upstream_gradient_and_skips_detached_inputs():
    hidden, table, bias, target = _inputs(20, seed=1)
    got = tied_head_cross_entropy(hidden, table.detach(), bias, target, chunk_rows=6)
    (3.0 * got.loss).backward()
    h2, b2 = hidden.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref_h, ref_b = torch.autograd.grad(3.0 * full_logits_loss(h2, table.detach(), b2, target).loss, [h2, b2])
    torch.testing.assert_close(hidden.grad, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, ref_b, atol=1e-5, rtol=1e-5)
    assert table.grad is None


def test_a_wrong_gradient_would_be_caught():
    # The comparison above can fail: a bias shift changes the loss and the gradients measurably.
    hidden, table, bias, target = _inputs(30, seed=2)
    ref = full_logits_loss(hidden, table, bias, target)
    shifted = tied_head_cross_entropy(hidden, table, bias + 0.01 * torch.arange(K), target, chunk_rows=7)
    assert not torch.allclose(shifted.loss, ref.loss, atol=1e-5)


def test_no_grad_mode_gives_the_same_numbers_without_a_graph():
    hidden, table, bias, target = _inputs(33, seed=3)
    ref = full_logits_loss(hidden, table, bias, target, 0.1)
    with torch.no_grad():
        got = tied_head_cross_entropy(hidden, table, bias, target, 0.1, chunk_rows=10)
    assert got.loss.grad_fn is None
    torch.testing.assert_close(got.loss, ref.loss.detach(), atol=1e-5, rtol=1e-5)


def test_shape_errors():
    hidden, table, bias, target = _inputs(4)
    with pytest.raises(ValueError, match="hidden"):
        tied_head_cross_entropy(hidden[:, :3], table, bias, target)
    with pytest.raises(ValueError, match="target"):
        tied_head_cross_entropy(hidden, table, bias, target[:2])
    with pytest.raises(ValueError, match="chunk_rows"):
        tied_head_cross_entropy(hidden, table, bias, target, chunk_rows=0)


def test_patch_targets_follow_the_head_layout():
    ids = torch.arange(16).reshape(1, 4, 4)
    assert patch_targets(ids, 2).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]


VIT = ViTConfig(embed_dim=32, depth=1, num_heads=2, grid=8, patch_size=2, vocab_size=40, token_dim=8)
DATA = DataSpec(grid=(8, 8), vocab_size=40)


@pytest.mark.parametrize("n_masked", [0, 5, 16])
@pytest.mark.parametrize("detach_head, smoothing", [(True, 0.0), (False, 0.1)])
def test_mtm_masked_loss_equals_forward_loss_of_full_logits(n_masked, detach_head, smoothing):
    torch.manual_seed(0)
    model = build_objective("mtm", {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1,
                                    "detach_head": detach_head, "label_smoothing": smoothing}, VIT, DATA)
    ids = torch.randint(0, 40, (3, 8, 8))
    masked = torch.zeros(3, 16, dtype=torch.bool)
    masked[:, torch.randperm(16)[:n_masked]] = True
    masked[1] = masked[1].roll(3)
    z = torch.randn(3, 16, 32, requires_grad=True)
    head = model.token_head
    params = [z, head.fc.weight, head.fc.bias, head.norm.weight, head.bias,
              model.encoder.token_embed.word_embeddings.weight]

    ref_loss, ref_metrics = model.forward_loss(model.token_logits(z), ids, masked)
    ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
    loss, metrics = model.masked_loss(z, ids, masked)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name], atol=1e-5, rtol=1e-5)
    for a, b in zip(got, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (got[-1] is None) == detach_head


def test_m3i_intra_loss_equals_the_full_logits_formula():
    torch.manual_seed(0)
    model = build_objective("m3i", {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1, "w_inter": 0,
                                    "w_cls": 0}, VIT, DATA)
    ids = torch.randint(0, 40, (2, 8, 8))
    masked = torch.rand(2, 16) < 0.6
    z = torch.randn(2, 16, 32, requires_grad=True)
    logits = model.token_logits(z)
    ce = F.cross_entropy(logits.reshape(-1, 40), ids.reshape(-1), reduction="none").reshape(2, 8, 8)
    per_patch = ce.reshape(2, 4, 2, 4, 2).mean((2, 4)).reshape(2, 16)
    ref = per_patch[masked].mean()
    got = model.intra_loss(z, ids, masked)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    (ref_g,), (got_g,) = torch.autograd.grad(ref, [z]), torch.autograd.grad(got, [z])
    torch.testing.assert_close(got_g, ref_g, atol=1e-5, rtol=1e-5)


def test_mtm_forward_runs_the_masked_only_path():
    torch.manual_seed(0)
    model = build_objective("mtm", {"decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1}, VIT, DATA)
    ids = torch.randint(0, 40, (2, 8, 8))
    calls = []
    handle = model.token_head.fc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    torch.manual_seed(1)
    loss, metrics = model({"tokens": ids})
    handle.remove()
    loss.backward()
    n_masked = round(metrics["mask_ratio"].item() * 2 * 16)
    assert calls == [torch.Size([n_masked, 32])], "the head must see the masked patches only"
    assert model.token_head.bias.grad.abs().sum() > 0


def test_bfloat16_hidden_with_float32_parameters_matches_the_full_path_loosely():
    # DeepSpeed bf16 runs the head in bfloat16: logits in bf16, softmax in float32 on both paths.
    hidden, table, bias, target = _inputs(45, seed=4)
    h16 = hidden.detach().bfloat16().requires_grad_()
    ref = full_logits_loss(h16, table, bias, target, 0.1)
    got = tied_head_cross_entropy(h16, table, bias, target, 0.1, chunk_rows=16)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-2, rtol=1e-2)
    for a, b in zip(_grads(got, h16, table, bias), _grads(ref, h16, table, bias), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=5e-2)
