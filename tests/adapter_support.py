"""Fixtures the adapter tests share (a pytest plugin of tests/conftest.py): 48 synthetic 64-px images, a
k-means tokenizer of them (K 32, 8x8 grid) and their ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tokenizer import KMeansTokenizer
from tests import conftest

RES, PATCH, K = 64, 8, 32
GRID = (RES // PATCH, RES // PATCH)


@pytest.fixture(scope="module")
def adapter_images() -> np.ndarray:
    """uint8 (48, 64, 64, 3)."""
    return conftest.synthetic_images(48, RES, 0)


@pytest.fixture(scope="module")
def adapter_tok(adapter_images: np.ndarray) -> KMeansTokenizer:
    return KMeansTokenizer.fit(adapter_images, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)


@pytest.fixture(scope="module")
def adapter_ids(adapter_tok: KMeansTokenizer, adapter_images: np.ndarray) -> torch.Tensor:
    """int64 (48, 8, 8) ids of ``adapter_images``."""
    return torch.from_numpy(adapter_tok.encode(adapter_images))
