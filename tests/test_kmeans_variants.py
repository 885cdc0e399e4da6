"""The three k-means tokenizer variants (pipeline/tokenizer/kmeans_variants.py): ids, checkpoints, and what
each one's construction promises. Fitted on a few small generated images (seconds); the tokenise job takes
them like any tokenizer (test_learning_bench.py runs kmeans_residual through it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tokenizer import load_tokenizer, psnr
from pipeline.tokenizer.kmeans import patches_to_images
from pipeline.tokenizer.kmeans_variants import LumaChromaTokenizer, ResidualKMeansTokenizer, ZCAKMeansTokenizer
from tests.conftest import synthetic_images

KINDS = {"kmeans_zca": ZCAKMeansTokenizer, "kmeans_residual": ResidualKMeansTokenizer,
         "luma_chroma": LumaChromaTokenizer}
K = 32


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_images(12, 32, seed=3)


@pytest.fixture(scope="module")
def fitted(images) -> dict:
    return {kind: cls.fit(images, vocab_size=K, iters=10, seed=0) for kind, cls in KINDS.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ids_codebook_and_checkpoint_round_trip(kind, fitted, images, tmp_path):
    tok = fitted[kind]
    ids = tok.encode(images)
    assert ids.dtype == np.int64 and ids.shape == (12, 4, 4) and tok.grid == (4, 4)
    assert ids.min() >= 0 and ids.max() < K and len(np.unique(ids)) > 4  # more than a handful of codes used
    assert tuple(tok.codebook.shape) == (K, 192) and torch.isfinite(tok.codebook).all()
    assert tok.decode(ids).shape == images.shape and tok.decode(ids).dtype == np.uint8
    tok.save(tmp_path / "tok.pt")
    back = load_tokenizer(tmp_path / "tok.pt", fingerprint=tok.fingerprint)
    assert type(back) is type(tok) and back.kind == kind and back.fingerprint == tok.fingerprint
    assert np.array_equal(back.encode(images), ids)
    again = KINDS[kind].fit(images, vocab_size=K, iters=10, seed=0)  # seeded: the same tokenizer
    assert again.fingerprint == tok.fingerprint
    other = KINDS[kind].fit(images, vocab_size=K, iters=10, seed=1)
    assert other.fingerprint != tok.fingerprint


def test_residual_stage_two_improves_on_stage_one(fitted, images):
    tok = fitted["kmeans_residual"]
    ids = tok.encode(images)
    stage1 = tok.tensors["stage1"].numpy()[ids // tok.config["stage2"]]  # (N, h, w, 192) in [0, 1]
    first_only = patches_to_images(np.clip(stage1 * 255, 0, 255).round().astype(np.uint8), 8)
    assert psnr(tok.decode(ids), images) > psnr(first_only, images) + 0.5


def test_luma_chroma_shares_one_chroma_code_per_16px_cell(fitted, images):
    tok = fitted["luma_chroma"]
    chroma = tok.encode(images) % tok.config["chroma_codes"]
    cells = chroma.reshape(12, 2, 2, 2, 2)  # (N, cell row, row in cell, cell col, col in cell)
    assert (cells == cells[:, :, :1, :, :1]).all()


def test_zca_ids_ignore_a_patch_brightness_shift(fitted, images):
    """Contrast normalisation removes each patch's mean: the same image 20 levels brighter (no clipping)
    gets the same ids."""
    tok = fitted["kmeans_zca"]
    low = (images.astype(np.int16) * 200 // 255).astype(np.uint8)  # 0..200: room for +20 without clipping
    assert (tok.encode(low) == tok.encode(low + 20)).mean() >= 0.95
