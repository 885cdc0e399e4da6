"""Learned ColorAdapt: colour jitter, model shapes, training signal, checkpoints and the CLI (synthetic images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.adapters.coloradapt import (
    NEUTRAL_JITTER,
    LearnedColorAdapt,
    adain_oracle,
    color_jitter,
    load_coloradapt,
    make_batch,
    sample_jitter,
    save_coloradapt,
)
from pipeline.tokenizer import KMeansTokenizer
from tests import conftest

RES, PATCH, K = 64, 8, 32
GRID = (RES // PATCH, RES // PATCH)
SMALL = {"width": 32, "blocks": 2, "cond_dim": 32}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return conftest.synthetic_images(48, RES, 0)


@pytest.fixture(scope="module")
def tok(images: np.ndarray) -> KMeansTokenizer:
    return KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=0, max_patches=2000)


@pytest.fixture(scope="module")
def ids(tok: KMeansTokenizer, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tok.encode(images))


# ---- colour jitter ---------------------------------------------------------------------------------------
def test_neutral_jitter_is_identity(images: np.ndarray) -> None:
    neutral = torch.tensor(NEUTRAL_JITTER).expand(len(images), 4)
    out = color_jitter(images, neutral)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images.astype(int)).max() <= 1
    # A (numerically) zero hue shift still runs the HSV round trip: also within 1 grey level.
    tiny_hue = neutral.clone()
    tiny_hue[:, 3] = 1e-7
    assert np.abs(color_jitter(images, tiny_hue).astype(int) - images.astype(int)).max() <= 1
    # A full hue turn is the identity too.
    full_turn = neutral.clone()
    full_turn[:, 3] = 1.0
    assert np.abs(color_jitter(images, full_turn).astype(int) - images.astype(int)).max() <= 1


def test_jitter_ops_do_what_they_say(images: np.ndarray) -> None:
    x = images[:4]
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
def test_shapes_dtypes_and_copy_init(tok: KMeansTokenizer, ids: torch.Tensor) -> None:
    model = LearnedColorAdapt.for_tokenizer(tok, **SMALL)
    assert model.cfg.grid == GRID and model.cfg.vocab_size == K and model.cfg.embed_dim == PATCH * PATCH * 3
    assert model.cfg.tokenizer_fingerprint == tok.fingerprint
    assert "codebook" not in dict(model.named_parameters())
    params = sample_jitter(4, torch.Generator().manual_seed(0))
    logits = model(ids[:4], params)
    assert logits.shape == (4, K, *GRID) and logits.dtype == torch.float32
    out = model.adapt(ids[:4], params)
    assert out.shape == (4, *GRID) and out.dtype == torch.int64
    assert torch.equal(out, ids[:4])  # zero-initialised output conv: the untrained model copies its input
    tgt = torch.from_numpy(tok.encode(color_jitter(conftest.synthetic_images(4, RES, 0), params)))
    ada = adain_oracle(ids[:4], tgt, tok.codebook)
    assert ada.shape == (4, *GRID) and ada.dtype == torch.int64


def test_training_reduces_loss(tok: KMeansTokenizer, images: np.ndarray, ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = LearnedColorAdapt.for_tokenizer(tok, **SMALL)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params0 = sample_jitter(16, torch.Generator().manual_seed(99))
    src0, tgt0 = make_batch(images, ids.numpy(), np.arange(16), params0, tok)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(src0, params0), tgt0))

    before = held_out_loss()
    for _ in range(60):
        idx = rng.integers(0, len(images), 16)
        params = sample_jitter(16, gen)
        src, tgt = make_batch(images, ids.numpy(), idx, params, tok)
        loss = F.cross_entropy(model(src, params), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.75 * before, (before, after)


# ---- checkpoints ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tok: KMeansTokenizer, ids: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = LearnedColorAdapt.for_tokenizer(tok, **SMALL, hue=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-trivial weights
    model.eval()
    path = tmp_path / "ca.pt"
    save_coloradapt(model, path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "coloradapt" and set(ckpt) == {"kind", "config", "state_dict"}
    json.dumps(ckpt["config"])
    loaded = load_coloradapt(path, tok).eval()
    assert loaded.cfg == model.cfg
    params = sample_jitter(4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids[:4], params), loaded(ids[:4], params))
    assert load_coloradapt(path, tok.fingerprint).cfg == model.cfg


def test_other_tokenizer_is_refused(tok: KMeansTokenizer, images: np.ndarray, tmp_path: Path) -> None:
    other = KMeansTokenizer.fit(images, vocab_size=K, patch=PATCH, iters=15, seed=1, max_patches=2000)
    assert other.fingerprint != tok.fingerprint
    path = tmp_path / "ca.pt"
    save_coloradapt(LearnedColorAdapt.for_tokenizer(tok, **SMALL), path)
    with pytest.raises(ValueError, match="refusing"):
        load_coloradapt(path, other)
    torch.save({"kind": "tokenadapt", "config": {}, "state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a coloradapt"):
        load_coloradapt(tmp_path / "x.pt", tok)


# ---- CLI --------------------------------------------------------------------------------------------------
def test_cli_runs_and_writes_json(tok: KMeansTokenizer, tmp_path: Path) -> None:
    for split, seed, n in (("train", 1, 16), ("val", 2, 8)):
        d = tmp_path / split / "cls"
        d.mkdir(parents=True)
        for i, img in enumerate(conftest.synthetic_images(n, RES, seed)):
            Image.fromarray(img).save(d / f"{i:03d}.png")
    tok.save(tmp_path / "tok.pt")
    cmd = [sys.executable, "-m", "pipeline.adapters.coloradapt", "--images", str(tmp_path / "train"),
           "--tokenizer", str(tmp_path / "tok.pt"), "--out", str(tmp_path / "ca.pt"), "--val", str(tmp_path / "val"),
           "--steps", "3", "--batch", "8", "--width", "32", "--blocks", "1", "--json", str(tmp_path / "ca.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ca.json").read_text())
    for key in ("learned_agreement", "adain_oracle_agreement", "copy_agreement", "steps"):
        assert key in result
    assert result["steps"] == 3
    for key in ("learned_agreement", "adain_oracle_agreement", "copy_agreement"):
        assert 0.0 <= result[key] <= 1.0
    assert load_coloradapt(tmp_path / "ca.pt", tok).cfg.width == 32
