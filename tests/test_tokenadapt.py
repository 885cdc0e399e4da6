"""TokenAdapt: geometry, the naive baseline and the model (synthetic images). Training, checkpoints and the CLI
are the one adapter trainer's: tests/test_adapter_train.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.adapters.tokenadapt import (
    TokenAdapt,
    TokenAdaptConfig,
    correction_gate,
    identity_theta,
    naive_adapt,
    sample_affine,
    warp,
    warp_images,
)
from pipeline.tokenizer import KMeansTokenizer
from tests import conftest
from tests.adapter_support import GRID, PATCH, RES, K

SMALL = {"width": 32, "heads": 2}


def synthetic_images(n: int, size: int = RES, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): ``tests.conftest.synthetic_images`` at this file's resolution."""
    return conftest.synthetic_images(n, size, seed)


def hflip_theta(batch: int) -> torch.Tensor:
    theta = identity_theta(batch)
    theta[:, 0, 0] = -1.0
    return theta


# ---- geometry ----------------------------------------------------------------------------------------
def test_sample_affine_shapes_and_determinism(adapter_tok: KMeansTokenizer) -> None:
    cfg = TokenAdapt.for_tokenizer(adapter_tok, **SMALL).cfg
    a = sample_affine(16, cfg, torch.Generator().manual_seed(3))
    b = sample_affine(16, cfg, torch.Generator().manual_seed(3))
    assert a.shape == (16, 2, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.allclose(a, identity_theta(16))
    # Identity ranges give identity matrices.
    still = TokenAdaptConfig(K, 3, GRID, flip_p=0.0, max_rotate_deg=0, max_translate=0, max_shear_deg=0,
                             scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    assert torch.allclose(sample_affine(4, still), identity_theta(4), atol=1e-7)
    # Always-flip: det < 0.
    flip = dataclasses.replace(still, flip_p=1.0)
    assert (torch.linalg.det(sample_affine(4, flip)[:, :, :2]) < 0).all()


def test_warp_hflip_is_exact_flip() -> None:
    emb = torch.randn(3, 5, 8, 8)
    theta = hflip_theta(3)
    assert torch.allclose(warp(emb, theta, (8, 8)), torch.flip(emb, [-1]), atol=1e-6)
    assert torch.equal(warp(emb, theta, (8, 8), mode="nearest"), torch.flip(emb, [-1]))


def test_same_theta_same_transform_across_resolutions(adapter_images: np.ndarray) -> None:
    """A 2x box-downsampled warp equals the warp of the 2x box-downsampled image (up to resampling)."""
    x = torch.from_numpy(adapter_images[:4]).permute(0, 3, 1, 2).float()
    theta = hflip_theta(4)
    theta[:, 0, 2] = 0.25  # flip + a shift by an exact number of low-res pixels
    hi = F.avg_pool2d(warp(x, theta, (RES, RES), "nearest"), 2)
    lo = warp(F.avg_pool2d(x, 2), theta, (RES // 2, RES // 2), "nearest")
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # away from the padded border
    assert torch.allclose(hi[inner], lo[inner], atol=1e-4)


def test_identity_warp_images_and_naive_adapt_are_exact(adapter_tok: KMeansTokenizer, adapter_images: np.ndarray,
                                                        adapter_ids: torch.Tensor) -> None:
    eye = identity_theta(len(adapter_images))
    assert np.array_equal(warp_images(adapter_images, eye), adapter_images)
    out = naive_adapt(adapter_ids, eye, adapter_tok.codebook)
    assert out.dtype == torch.int64 and out.shape == adapter_ids.shape
    assert torch.equal(out, adapter_ids)
    # Flipping tokens naively is exact too (grid-aligned), and matches flipping the ids.
    flipped = naive_adapt(adapter_ids, hflip_theta(len(adapter_ids)), adapter_tok.codebook)
    assert torch.equal(flipped, torch.flip(adapter_ids, [-1]))


# ---- the model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied_head", [True, False])
def test_shapes_dtypes(adapter_tok: KMeansTokenizer, adapter_ids: torch.Tensor, tied_head: bool) -> None:
    model = TokenAdapt.for_tokenizer(adapter_tok, **SMALL, tied_head=tied_head, residual=tied_head)
    assert model.cfg.grid == GRID and model.cfg.vocab_size == K and model.cfg.embed_dim == PATCH * PATCH * 3
    assert model.cfg.tokenizer_fingerprint == adapter_tok.fingerprint
    assert not model.codebook.requires_grad and "codebook" not in dict(model.named_parameters())
    theta = sample_affine(4, model.cfg, torch.Generator().manual_seed(0))
    feat = model.f(model.embed(adapter_ids[:4]))
    assert feat.shape == (4, SMALL["width"], 2 * GRID[0], 2 * GRID[1]) and feat.dtype == torch.float32
    logits = model(adapter_ids[:4], theta)
    assert logits.shape == (4, K, *GRID) and logits.dtype == torch.float32
    out = model.adapt(adapter_ids[:4], theta)
    assert out.shape == (4, *GRID) and out.dtype == torch.int64 and int(out.min()) >= 0 and int(out.max()) < K


def test_untrained_model_is_the_naive_operator(adapter_tok: KMeansTokenizer, adapter_ids: torch.Tensor) -> None:
    """The learned correction starts at zero: argmax = naive interpolation + nearest code, for random
    warps, and the input ids exactly at the identity warp."""
    torch.manual_seed(0)
    model = TokenAdapt.for_tokenizer(adapter_tok, **SMALL)
    assert model.cfg.residual
    theta = sample_affine(len(adapter_ids), model.cfg, torch.Generator().manual_seed(5))
    naive = naive_adapt(adapter_ids, theta, adapter_tok.codebook, model.cfg.padding_mode)
    agree = float((model.adapt(adapter_ids, theta) == naive).float().mean())
    assert agree > 0.999, agree  # float rounding may split an exact tie, nothing more
    assert torch.equal(model.adapt(adapter_ids, identity_theta(len(adapter_ids))), adapter_ids)
    # The from-scratch ablation does not have that property.
    scratch = TokenAdapt.for_tokenizer(adapter_tok, **SMALL, residual=False)
    assert float((scratch.adapt(adapter_ids, theta) == naive).float().mean()) < 0.9
    # A checkpoint config written before ``residual`` existed reads back as the from-scratch model.
    old = {k: v for k, v in model.cfg.to_dict().items() if k != "residual"}
    assert TokenAdaptConfig.from_dict(old).residual is False
    with pytest.raises(ValueError, match="tied_head"):
        TokenAdapt.for_tokenizer(adapter_tok, **SMALL, tied_head=False)
    # The gate: 0 at the identity, ~1 from a one-token shift on (2 / grid normalised units).
    shifted = identity_theta(2)
    shifted[1, 0, 2] = 2.0 / GRID[1]
    gate = correction_gate(shifted, GRID)
    assert gate[0] == 0.0 and gate[1] > 0.98
