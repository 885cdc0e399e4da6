"""ADDP objective (pretrain/objectives/addp.py) and generation (pretrain/generate.py) on tiny CPU models."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain.objectives as objectives
from pipeline.tokenizer.kmeans import KMeansConfig, KMeansTokenizer
from pipeline.tokenizer.vqgan import VQGANTokenizer, tiny_preset
from pretrain import generate as gen
from pretrain.objectives import DataSpec, load_objective
from pretrain.objectives.addp import (
    ADDP,
    ADDPConfig,
    mask_ratio_grid,
    mask_ratio_probs,
    nested_masks,
    sample_ratio_pair,
    soft_cross_entropy,
)
from pretrain.objectives.mtm import MTM, MTMConfig
from pretrain.objectives.parts import KMeansPatchDecoder, frozen_decoder
from pretrain.vit import ViTConfig

# tiny_preset(32): f2, 32 px -> 16 x 16 tokens, K = 64. The predictor masks 2 x 2 tokens: 64 units.
VIT = ViTConfig(embed_dim=32, depth=1, num_heads=2, grid=16, patch_size=2, vocab_size=64, token_dim=8)
DATA = DataSpec(grid=(16, 16), vocab_size=64)
MTM_OPTIONS = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "pixel_patch": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run faster on one thread (and do not fight other jobs for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> VQGANTokenizer:
    return VQGANTokenizer(tiny_preset(resolution=32, n_embed=64), seed=0)


@pytest.fixture(scope="module")
def predictor() -> MTM:
    torch.manual_seed(0)
    return MTM(MTMConfig(**MTM_OPTIONS), VIT, DATA).eval()


def _addp(tok, predictor, **options) -> ADDP:
    torch.manual_seed(1)
    return ADDP(ADDPConfig(**{**SMALL, **options}), VIT, DATA, tokenizer=tok, predictor=predictor)


# -- ratio grid and masks ------------------------------------------------------------------------


def test_mask_ratio_grid_values():
    # By hand, T = 4: cos(pi/2 * k/4) = 1, .924, .707, .383, 0; [0.5, 1) keeps .707 and .924, ascending.
    torch.testing.assert_close(mask_ratio_grid(4, 0.5, 1.0),
                               torch.tensor([math.cos(math.pi / 4), math.cos(math.pi / 8)], dtype=torch.float64))
    grid = mask_ratio_grid(100, 0.5, 1.0)  # the reference's grid: k = 1 .. 66
    assert grid.numel() == 66
    assert grid[0].item() == pytest.approx(math.cos(math.pi / 2 * 0.66))
    assert grid[-1].item() == pytest.approx(math.cos(math.pi / 2 * 0.01))
    assert bool((grid[1:] > grid[:-1]).all()) and grid.min() >= 0.5 and grid.max() < 1.0
    probs = mask_ratio_probs(grid, 0.55, 0.25)
    assert probs.sum().item() == pytest.approx(1.0)
    ratio = probs[10] / probs[40]  # proportional to the N(0.55, 0.25) density
    expected = math.exp(-0.5 * (((grid[10] - 0.55) / 0.25) ** 2 - ((grid[40] - 0.55) / 0.25) ** 2))
    assert ratio.item() == pytest.approx(float(expected))


def test_ratio_pairs_strictly_increase_within_five_grid_steps():
    grid = mask_ratio_grid(100, 0.5, 1.0)
    probs = mask_ratio_probs(grid, 0.55, 0.25)
    values = grid.tolist() + [1.0]
    torch.manual_seed(0)
    for _ in range(300):
        r_t, r_t1 = sample_ratio_pair(grid, probs, 5, 1.0)
        assert r_t < r_t1
        i, j = values.index(r_t), values.index(r_t1)
        assert 1 <= j - i <= 5  # j == len(grid): past the grid's top, r_t1 = 1.0


def test_nested_masks_counts_and_nesting():
    torch.manual_seed(0)
    r_t = torch.tensor([0.5, 0.7071, 0.9])
    r_t1 = torch.tensor([0.6, 0.7071, 1.0])
    mask_t, mask_t1 = nested_masks(r_t, r_t1, 64)
    assert mask_t.shape == mask_t1.shape == (3, 64) and mask_t.dtype == torch.bool
    assert mask_t.sum(1).tolist() == [32, math.ceil(64 * 0.7071), math.ceil(64 * 0.9)]
    assert mask_t1.sum(1).tolist() == [math.ceil(64 * 0.6), math.ceil(64 * 0.7071), 64]
    assert not (mask_t & ~mask_t1).any(), "M_t must be a subset of M_t+1"
    assert torch.equal(mask_t[1], mask_t1[1])
    torch.manual_seed(0)
    again = nested_masks(r_t, r_t1, 64)
    assert torch.equal(again[0], mask_t) and torch.equal(again[1], mask_t1), "masks come from the global RNG"
    one_t, one_t1 = nested_masks(0.55, 0.8, 16, batch=4)
    assert one_t.sum(1).tolist() == [9] * 4 and one_t1.sum(1).tolist() == [13] * 4
    with pytest.raises(ValueError, match="ratio_t <= ratio_t1"):
        nested_masks(0.8, 0.6, 16, batch=1)


# -- the loss --------------------------------------------------------------------------------------


def test_soft_cross_entropy_by_hand():
    # 2 classes: softmax([0, ln 3]) = [1/4, 3/4]; target [1, 0] smoothed by 0.1 over 2 classes -> [.95, .05].
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss = soft_cross_entropy(logits, torch.tensor([[1.0, 0.0]]), 0.1)
    assert loss.item() == pytest.approx(-(0.95 * math.log(0.25) + 0.05 * math.log(0.75)), abs=1e-6)
    # 3 classes, two rows, weights (1, 0): only row 0 counts. softmax(ln [1, 2, 1]) = [.25, .5, .25];
    # target [.2, .8, 0] -> .9 * target + .1 / 3 = [.21333, .75333, .03333].
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [5.0, 1.0, 1.0]]))
    target = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    q = [0.9 * 0.2 + 0.1 / 3, 0.9 * 0.8 + 0.1 / 3, 0.1 / 3]
    by_hand = -(q[0] * math.log(0.25) + q[1] * math.log(0.5) + q[2] * math.log(0.25))
    loss = soft_cross_entropy(logits, target, 0.1, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    # Same as torch's probability-target cross-entropy with label smoothing (the reference's criterion).
    torch_ce = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    assert loss.item() == pytest.approx(torch_ce[0].item(), abs=1e-6)
    assert soft_cross_entropy(logits, target, 0.1).item() == pytest.approx(torch_ce.mean().item(), abs=1e-6)


# -- the objective ---------------------------------------------------------------------------------


def test_forward_loss_gradients_and_frozen_parts(tok, predictor):
    model = _addp(tok, predictor).train()
    assert not model.predictor.training and not model.vq.training, "frozen parts stay in eval mode"
    assert model.encoder.cfg.stem == "pixel" and model.encoder.cfg.grid == 32 and model.encoder.cfg.patch_size == 4
    ids = torch.randint(0, 64, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    loss, metrics = model({"tokens": ids})
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"soft_ce", "kl", "acc", "mask_ratio_t", "mask_ratio_t1"} <= set(metrics)
    assert 0.5 <= metrics["mask_ratio_t"] <= metrics["mask_ratio_t1"] <= 1.0
    loss.backward()
    enc_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert enc_grads and all(g is not None for g in enc_grads)
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0, "the loss reaches the pixel stem"
    for part in (model.predictor, model.vq):
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("predictor.", "vq.")) for n in trainable)


def test_bfloat16_model_keeps_float64_ratios(tok, predictor):
    """A bf16 engine casts parameters and buffers; the ratio grid is no buffer, so mask counts do not move."""
    model = _addp(tok, copy.deepcopy(predictor)).to(torch.bfloat16)
    assert model.ratio_grid.dtype == torch.float64 and model.vq.codebook.dtype == torch.bfloat16
    torch.manual_seed(0)
    loss, _ = model({"tokens": torch.randint(0, 64, (2, 16, 16))})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_training_step_follows_the_reference(tok, predictor, monkeypatch):
    """Soft embeddings on M_t come from the predictor given ids outside M_t+1; the target from ids outside M_t."""
    model = _addp(tok, predictor).eval()
    ids = torch.randint(0, 64, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    mask_t, mask_t1 = model.sample_masks(2, ids.device)
    probs_t1, target = model.predictor_outputs(ids, mask_t, mask_t1)
    torch.testing.assert_close(probs_t1, predictor.predict(ids, mask_t1).softmax(-1))
    torch.testing.assert_close(target, predictor.predict(ids, mask_t).softmax(-1))
    unreliable = model.unit_to_token(mask_t)
    z = torch.where(unreliable.unsqueeze(-1), probs_t1 @ tok.codebook, tok.codebook[ids])
    expected = tok.model.decode_codes(z.permute(0, 3, 1, 2))
    torch.testing.assert_close(model.decode_pixels(ids, probs_t1, unreliable), expected)
    # Masked positions' encoder outputs never reach the decoder: with every unit masked the logits do not
    # depend on the pixels (the reference's first generation step).
    everything = torch.ones(2, model.num_units, dtype=torch.bool)
    a = model.predict_tokens(torch.rand(2, 3, 32, 32) * 2 - 1, ids, everything)
    b = model.predict_tokens(torch.zeros(2, 3, 32, 32), ids, everything)
    torch.testing.assert_close(a, b)
    # Hard decoding matches the tokenizer's own decode.
    assert np.array_equal(model.decode_ids(ids).numpy(), tok.decode(ids.numpy()))


def test_one_token_encoder_patches(tok, predictor):
    model = _addp(tok, predictor, pixel_patch=2)  # 16 x 16 encoder patches, one VQ token each (the reference's case)
    assert model.sub == 1 and model.encoder.cfg.num_patches == 256
    torch.manual_seed(0)
    loss, _ = model({"tokens": torch.randint(0, 64, (2, 16, 16))})
    assert torch.isfinite(loss)


def test_validation_errors(tok, predictor):
    kmeans = KMeansTokenizer(KMeansConfig(vocab_size=64, patch=2, resolution=32), torch.rand(64, 12))
    assert isinstance(frozen_decoder(kmeans), KMeansPatchDecoder)  # centroids are pixel patches
    with pytest.raises(TypeError, match="soft code embeddings"):
        frozen_decoder(object())
    with pytest.raises(ValueError, match="pixel_patch"):
        _addp(tok, predictor, pixel_patch=8)  # 4 tokens a side would straddle 2 x 2 mask units
    with pytest.raises(ValueError, match="grid"):
        ADDP(ADDPConfig(**SMALL), VIT, DataSpec(grid=(8, 8), vocab_size=64), tokenizer=tok, predictor=predictor)
    with pytest.raises(ValueError, match="objective.tokenizer"):
        ADDP(ADDPConfig(**SMALL), VIT, DATA)
    with pytest.raises(ValueError, match="mask_ratio_min"):
        ADDPConfig(mask_ratio_min=0.9, mask_ratio_max=0.8)


def _save_trainer_checkpoint(path, module, vit, name, options):
    """What the trainer writes: <dir>/latest + <dir>/<tag>/mp_rank_00_model_states.pt."""
    (path / "step0000001").mkdir(parents=True)
    (path / "latest").write_text("step0000001")
    torch.save({"module": module.state_dict(), "vit_config": dataclasses.asdict(vit), "objective": name,
                "config": {"objective": {"name": name, **options}}, "num_classes": 0, "step": 1},
               path / "step0000001" / "mp_rank_00_model_states.pt")


def test_built_from_paths_and_reloaded(tok, predictor, tmp_path, monkeypatch):
    tok.save(tmp_path / "tok.pt")
    _save_trainer_checkpoint(tmp_path / "mtm", predictor, VIT, "mtm", MTM_OPTIONS)
    options = {**SMALL, "tokenizer": str(tmp_path / "tok.pt"), "predictor": str(tmp_path / "mtm")}
    torch.manual_seed(2)
    model = objectives.build_objective("addp", options, VIT, DATA)
    torch.testing.assert_close(model.vq.codebook, tok.codebook)
    _save_trainer_checkpoint(tmp_path / "addp", model, VIT, "addp", options)
    loaded, client = load_objective(str(tmp_path / "addp"))
    assert isinstance(loaded, ADDP) and client["objective"] == "addp"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    out = gen.generate_grid(gen.parse_args(["--ckpt", str(tmp_path / "addp"), "--steps", "3", "--n", "2",
                                            "--out", str(tmp_path / "g.png")]))
    assert Image.open(out).size == (2 * 32, 1 * 32)


# -- generation ------------------------------------------------------------------------------------


def test_maskgit_schedule_endpoints():
    schedule = gen.maskgit_schedule(20, 64)
    assert len(schedule) == 21 and schedule[0] == 64 and schedule[-1] == 0
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False))
    big = gen.maskgit_schedule(20, 1024)  # early cosine steps: ceil(n cos(pi/2 (k+1)/S)) without clipping
    assert big[1:4] == [math.ceil(1024 * math.cos(math.pi / 2 * k / 20)) for k in (1, 2, 3)] == [1021, 1012, 996]
    assert gen.maskgit_schedule(1, 4) == [4, 0]
    assert gen.maskgit_schedule(4, 4) == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError):
        gen.maskgit_schedule(5, 4)


def test_gumbel_confidence():
    log_probs = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    torch.testing.assert_close(gen.gumbel_confidence(log_probs, 0.0), log_probs)
    a = gen.gumbel_confidence(log_probs, 6.0, torch.Generator().manual_seed(0))
    b = gen.gumbel_confidence(log_probs, 6.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, log_probs)


def test_generate_writes_grid_and_is_seeded(tok, predictor, tmp_path, monkeypatch):
    model = _addp(tok, predictor).eval()
    monkeypatch.setattr(gen, "load_objective", lambda ckpt: model)

    def run(seed: int, name: str) -> np.ndarray:
        out = gen.generate_grid(gen.parse_args(["--ckpt", "unused", "--steps", "4", "--n", "5", "--out",
                                                str(tmp_path / name), "--seed", str(seed), "--batch-size", "3"]))
        img = Image.open(out)
        assert img.format == "PNG" and img.size == (3 * 32, 2 * 32)  # ceil(sqrt(5)) = 3 columns, 2 rows
        return np.asarray(img)

    first, again, other = run(0, "a.png"), run(0, "b.png"), run(1, "c.png")
    assert np.array_equal(first, again), "same seed -> same image"
    assert not np.array_equal(first, other)
    assert not first[32:, 64:].any(), "the empty sixth cell stays black"
    ids = gen.generate(model, 2, 4, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16, 16) and ids.dtype == torch.long and ids.min() >= 0 and ids.max() < 64


def test_every_tokenizer_path_takes_urls_and_checks_the_fingerprint(tok, predictor, tmp_path):
    """ADDP and classify's decoder load their tokenizer through pipeline.tokenizer.load_tokenizer: any
    storage.io URL, weights only, and refused when it did not make the data's tokens (DataSpec)."""
    from pipeline.tokenizer import TokenizerFingerprintMismatch, load_tokenizer
    from pretrain.objectives.classify import Classify, ClassifyConfig

    tok.save(tmp_path / "tok.pt")
    url = f"file://{tmp_path / 'tok.pt'}"
    assert load_tokenizer(url, tok.fingerprint).fingerprint == tok.fingerprint
    right = dataclasses.replace(DATA, tokenizer_fingerprint=tok.fingerprint)
    wrong = dataclasses.replace(DATA, tokenizer_fingerprint="f" * 64, num_classes=3)
    torch.manual_seed(0)
    model = ADDP(ADDPConfig(**SMALL, tokenizer=url), VIT, right, predictor=predictor)
    torch.testing.assert_close(model.vq.codebook, tok.codebook)
    with pytest.raises(TokenizerFingerprintMismatch, match="ffffffffffff"):
        ADDP(ADDPConfig(**SMALL, tokenizer=url), VIT, wrong, predictor=predictor)
    with pytest.raises(TokenizerFingerprintMismatch, match="did not make the tokens"):
        Classify(ClassifyConfig(decoder=url, pixel_patch=4), VIT, wrong)
