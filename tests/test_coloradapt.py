"""Learned ColorAdapt: colour jitter and the model (synthetic images). Training, checkpoints and the CLI are the
one adapter trainer's: tests/test_adapter_train.py."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.adapters.coloradapt import (
    NEUTRAL_JITTER,
    LearnedColorAdapt,
    adain_oracle,
    color_jitter,
    sample_jitter,
)
from pipeline.tokenizer import KMeansTokenizer
from tests import conftest
from tests.adapter_support import GRID, PATCH, RES, K

SMALL = {"width": 32, "blocks": 2, "cond_dim": 32}


# ---- colour jitter ---------------------------------------------------------------------------------------
def test_neutral_jitter_is_identity(adapter_images: np.ndarray) -> None:
    neutral = torch.tensor(NEUTRAL_JITTER).expand(len(adapter_images), 4)
    out = color_jitter(adapter_images, neutral)
    assert out.dtype == np.uint8 and out.shape == adapter_images.shape
    assert np.abs(out.astype(int) - adapter_images.astype(int)).max() <= 1
    # A (numerically) zero hue shift still runs the HSV round trip: also within 1 grey level.
    tiny_hue = neutral.clone()
    tiny_hue[:, 3] = 1e-7
    assert np.abs(color_jitter(adapter_images, tiny_hue).astype(int) - adapter_images.astype(int)).max() <= 1
    # A full hue turn is the identity too.
    full_turn = neutral.clone()
    full_turn[:, 3] = 1.0
    assert np.abs(color_jitter(adapter_images, full_turn).astype(int) - adapter_images.astype(int)).max() <= 1


def test_jitter_ops_do_what_they_say(adapter_images: np.ndarray) -> None:
    x = adapter_images[:4]
    base = torch.tensor(NEUTRAL_JITTER).expand(4, 4).clone()
    dark = base.clone()
    dark[:, 0] = 0.5
    assert np.abs(color_jitter(x, dark).astype(int) - np.round(x * 0.5).astype(int)).max() <= 1
    grey = base.clone()
    grey[:, 2] = 0.0  # saturation 0: R = G = B
    g = color_jitter(x, grey).astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 1 and np.abs(g[..., 1] - g[..., 2]).max() <= 1
    flat = base.clone()
    flat[:, 1] = 0.0  # contrast 0: every pixel is the image's mean grey
    f = color_jitter(x, flat).reshape(4, -1)
    assert (f.max(1).astype(int) - f.min(1).astype(int)).max() <= 1
    hue = base.clone()
    hue[:, 3] = 0.1
    assert np.abs(color_jitter(x, hue).astype(int) - x.astype(int)).max() > 10


def test_sample_jitter_ranges_and_determinism() -> None:
    a = sample_jitter(1000, torch.Generator().manual_seed(0))
    b = sample_jitter(1000, torch.Generator().manual_seed(0))
    assert a.shape == (1000, 4) and a.dtype == torch.float32 and torch.equal(a, b)
    assert float(a[:, :3].min()) >= 0.6 and float(a[:, :3].max()) <= 1.4
    assert float(a[:, 3].abs().max()) <= 0.1
    assert float(a[:, :3].std()) > 0.1 and float(a[:, 3].std()) > 0.02


# ---- the model --------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_copy_init(adapter_tok: KMeansTokenizer, adapter_ids: torch.Tensor) -> None:
    model = LearnedColorAdapt.for_tokenizer(adapter_tok, **SMALL)
    assert model.cfg.grid == GRID and model.cfg.vocab_size == K and model.cfg.embed_dim == PATCH * PATCH * 3
    assert model.cfg.tokenizer_fingerprint == adapter_tok.fingerprint
    assert "codebook" not in dict(model.named_parameters())
    params = sample_jitter(4, torch.Generator().manual_seed(0))
    logits = model(adapter_ids[:4], params)
    assert logits.shape == (4, K, *GRID) and logits.dtype == torch.float32
    out = model.adapt(adapter_ids[:4], params)
    assert out.shape == (4, *GRID) and out.dtype == torch.int64
    assert torch.equal(out, adapter_ids[:4])  # zero-initialised output conv: the untrained model copies its input
    tgt = torch.from_numpy(adapter_tok.encode(color_jitter(conftest.synthetic_images(4, RES, 0), params)))
    ada = adain_oracle(adapter_ids[:4], tgt, adapter_tok.codebook)
    assert ada.shape == (4, *GRID) and ada.dtype == torch.int64
