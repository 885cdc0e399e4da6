"""TokenAdapt: geometry, naive baseline, training signal, checkpoints and the CLI (synthetic images)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.adapters import (
    TokenAdapt,
    TokenAdaptConfig,
    correction_gate,
    identity_theta,
    load_tokenadapt,
    naive_adapt,
    sample_affine,
    save_tokenadapt,
    warp,
    warp_images,
)
from pipeline.adapters.train_tokenadapt import make_batch
from pipeline.tokenizer import KMeansTokenizer
from tests import conftest

RES, PATCH, K = 64, 8, 32
GRID = (RES // PATCH, RES // PATCH)
SMALL = {"width": 32, "heads": 2}
ROOT = Path(__file__).resolve().parents[1]


def synthetic_images(n: int, size: int = RES, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): ``tests.conftest.synthetic_images`` at this file's resolution."""
    return conftest.synthetic_images(n, size, seed)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return synthetic_images(48)


@pytest.fixture(scope="module")
def tok(images: np.ndarray) -> KMeansTokenizer:
    return KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)


@pytest.fixture(scope="module")
def ids(tok: KMeansTokenizer, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tok.encode(images))


def hflip_theta(batch: int) -> torch.Tensor:
    theta = identity_theta(batch)
    theta[:, 0, 0] = -1.0
    return theta


# ---- geometry ----------------------------------------------------------------------------------------
def test_sample_affine_shapes_and_determinism(tok: KMeansTokenizer) -> None:
    cfg = TokenAdapt.for_tokenizer(tok, **SMALL).cfg
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


def test_same_theta_same_transform_across_resolutions(images: np.ndarray) -> None:
    """A 2x box-downsampled warp equals the warp of the 2x box-downsampled image (up to resampling)."""
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float()
    theta = hflip_theta(4)
    theta[:, 0, 2] = 0.25  # flip + a shift by an exact number of low-res pixels
    hi = F.avg_pool2d(warp(x, theta, (RES, RES), "nearest"), 2)
    lo = warp(F.avg_pool2d(x, 2), theta, (RES // 2, RES // 2), "nearest")
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # away from the padded border
    assert torch.allclose(hi[inner], lo[inner], atol=1e-4)


def test_identity_warp_images_and_naive_adapt_are_exact(tok: KMeansTokenizer, images: np.ndarray,
                                                        ids: torch.Tensor) -> None:
    eye = identity_theta(len(images))
    assert np.array_equal(warp_images(images, eye), images)
    out = naive_adapt(ids, eye, tok.codebook)
    assert out.dtype == torch.int64 and out.shape == ids.shape
    assert torch.equal(out, ids)
    # Flipping tokens naively is exact too (grid-aligned), and matches flipping the ids.
    assert torch.equal(naive_adapt(ids, hflip_theta(len(ids)), tok.codebook), torch.flip(ids, [-1]))


# ---- the model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied_head", [True, False])
def test_shapes_dtypes(tok: KMeansTokenizer, ids: torch.Tensor, tied_head: bool) -> None:
    model = TokenAdapt.for_tokenizer(tok, **SMALL, tied_head=tied_head, residual=tied_head)
    assert model.cfg.grid == GRID and model.cfg.vocab_size == K and model.cfg.embed_dim == PATCH * PATCH * 3
    assert model.cfg.tokenizer_fingerprint == tok.fingerprint
    assert not model.codebook.requires_grad and "codebook" not in dict(model.named_parameters())
    theta = sample_affine(4, model.cfg, torch.Generator().manual_seed(0))
    feat = model.f(model.embed(ids[:4]))
    assert feat.shape == (4, SMALL["width"], 2 * GRID[0], 2 * GRID[1]) and feat.dtype == torch.float32
    logits = model(ids[:4], theta)
    assert logits.shape == (4, K, *GRID) and logits.dtype == torch.float32
    out = model.adapt(ids[:4], theta)
    assert out.shape == (4, *GRID) and out.dtype == torch.int64 and int(out.min()) >= 0 and int(out.max()) < K


def test_untrained_model_is_the_naive_operator(tok: KMeansTokenizer, ids: torch.Tensor) -> None:
    """The learned correction starts at zero: argmax = naive interpolation + nearest code, for random
    warps, and the input ids exactly at the identity warp."""
    torch.manual_seed(0)
    model = TokenAdapt.for_tokenizer(tok, **SMALL)
    assert model.cfg.residual
    theta = sample_affine(len(ids), model.cfg, torch.Generator().manual_seed(5))
    naive = naive_adapt(ids, theta, tok.codebook, model.cfg.padding_mode)
    agree = float((model.adapt(ids, theta) == naive).float().mean())
    assert agree > 0.999, agree  # float rounding may split an exact tie, nothing more
    assert torch.equal(model.adapt(ids, identity_theta(len(ids))), ids)
    # The from-scratch ablation does not have that property.
    scratch = TokenAdapt.for_tokenizer(tok, **SMALL, residual=False)
    assert float((scratch.adapt(ids, theta) == naive).float().mean()) < 0.9
    # A checkpoint config written before ``residual`` existed reads back as the from-scratch model.
    old = {k: v for k, v in model.cfg.to_dict().items() if k != "residual"}
    assert TokenAdaptConfig.from_dict(old).residual is False
    with pytest.raises(ValueError, match="tied_head"):
        TokenAdapt.for_tokenizer(tok, **SMALL, tied_head=False)
    # The gate: 0 at the identity, ~1 from a one-token shift on (2 / grid normalised units).
    shifted = identity_theta(2)
    shifted[1, 0, 2] = 2.0 / GRID[1]
    gate = correction_gate(shifted, GRID)
    assert gate[0] == 0.0 and gate[1] > 0.98


def test_training_reduces_loss(tok: KMeansTokenizer, images: np.ndarray, ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = TokenAdapt.for_tokenizer(tok, **SMALL)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A fixed held-out batch measures the loss before and after.
    idx0 = np.arange(16)
    theta0 = sample_affine(16, model.cfg, torch.Generator().manual_seed(99))
    src0, tgt0 = make_batch(images, ids.numpy(), idx0, theta0, tok, model.cfg.padding_mode)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(src0, theta0), tgt0))

    before = held_out_loss()
    for _ in range(40):
        idx = rng.integers(0, len(images), 16)
        theta = sample_affine(16, model.cfg, gen)
        src, tgt = make_batch(images, ids.numpy(), idx, theta, tok, model.cfg.padding_mode)
        loss = F.cross_entropy(model(src, theta), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    # The learned correction starts at naive's level (a low loss already), so the test is: it improves on it.
    assert after < before, (before, after)
    with torch.no_grad():
        learned = float((model.adapt(src0, theta0) == tgt0).float().mean())
    naive = float((naive_adapt(src0, theta0, tok.codebook, model.cfg.padding_mode) == tgt0).float().mean())
    assert learned >= naive, (learned, naive)


# ---- checkpoints ------------------------------------------------------------------------------------
def test_save_load_round_trip(tok: KMeansTokenizer, ids: torch.Tensor, tmp_path: Path) -> None:
    model = TokenAdapt.for_tokenizer(tok, **SMALL, max_rotate_deg=20.0).eval()
    path = tmp_path / "ta.pt"
    save_tokenadapt(model, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "tokenadapt" and set(ckpt) == {"kind", "config", "state_dict"}
    json.dumps(ckpt["config"])  # JSON-safe
    loaded = load_tokenadapt(path, tok).eval()
    assert loaded.cfg == model.cfg
    theta = sample_affine(4, model.cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids[:4], theta), loaded(ids[:4], theta))
    assert load_tokenadapt(path, tok.fingerprint).cfg == model.cfg


def test_other_tokenizer_is_refused(tok: KMeansTokenizer, images: np.ndarray, tmp_path: Path) -> None:
    other = KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=1, max_patches=2000)
    assert other.fingerprint != tok.fingerprint
    path = tmp_path / "ta.pt"
    save_tokenadapt(TokenAdapt.for_tokenizer(tok, **SMALL), path)
    with pytest.raises(ValueError, match="refusing"):
        load_tokenadapt(path, other)
    torch.save({"kind": "kmeans", "config": {}, "state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a tokenadapt"):
        load_tokenadapt(tmp_path / "x.pt", tok)


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_runs_and_writes_json(tok: KMeansTokenizer, tmp_path: Path) -> None:
    for split, seed, n in (("train", 1, 24), ("val", 2, 8)):
        d = tmp_path / split / "cls"
        d.mkdir(parents=True)
        for i, img in enumerate(synthetic_images(n, seed=seed)):
            Image.fromarray(img).save(d / f"{i:03d}.png")
    tok.save(tmp_path / "tok.pt")
    cmd = [sys.executable, "-m", "pipeline.adapters.train_tokenadapt", "--images", str(tmp_path / "train"),
           "--tokenizer", str(tmp_path / "tok.pt"), "--out", str(tmp_path / "ta.pt"), "--val", str(tmp_path / "val"),
           "--steps", "5", "--batch", "8", "--width", "32", "--heads", "2", "--json", str(tmp_path / "ta.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ta.json").read_text())
    for key in ("tokenadapt_agreement", "naive_agreement", "identity_agreement", "steps", "train_seconds"):
        assert key in result
    assert result["steps"] == 5
    assert 0.0 <= result["tokenadapt_agreement"] <= 1.0 and 0.0 <= result["naive_agreement"] <= 1.0
    assert result["identity_agreement"]["naive"] == 1.0
    assert result["identity_agreement"]["tokenadapt"] == 1.0  # trained, still exact at the identity (the gate)
    assert load_tokenadapt(tmp_path / "ta.pt", tok).cfg.width == 32
