"""VQGANTokenizer: taming key layout, checkpoint loading, quantisation metrics, restriction (tiny CPU models)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.tokenizer import load_tokenizer
from pipeline.tokenizer.vqgan import (
    VQGANConfig,
    VQGANTokenizer,
    addp_preset,
    nearest_codes,
    restriction_lut,
    seit_preset,
    tiny_preset,
)
from pipeline.tokenizer.vqgan_modules import AttnBlock, VQModel

RES = 32


def images(n: int, seed: int = 0, res: int = RES) -> np.ndarray:
    """uint8 (n, res, res, 3): smooth random gradients plus noise (enough variety to use many codes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * xx[None, ..., None] + rng.uniform(0, 255, (n, 1, 1, 3)) * yy[
        None, ..., None
    ]
    noise = rng.normal(0, 40, (n, res, res, 3))
    return np.clip(base / 2 + noise + 64, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tok() -> VQGANTokenizer:
    return VQGANTokenizer(tiny_preset(), seed=0)


def taming_keys(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict keys/shapes taming's VQModel(ddconfig, n_embed, embed_dim) has, re-derived from its
    constructor loops (taming/modules/diffusionmodules/model.py), independently of our modules."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resblock(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:  # use_conv_shortcut=False -> 1x1 nin_shortcut
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    n, ch, in_mult = len(cfg.ch_mult), cfg.ch, (1, *cfg.ch_mult)
    # Encoder: levels i = 0..n-1 from full resolution down; attn after each block where curr_res matches.
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    res = cfg.resolution
    for i in range(n):
        bin_, bout = ch * in_mult[i], ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", bin_, bout)
            bin_ = bout
            if res in cfg.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", bout)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", bout, bout, 3)
            res //= 2
    c = ch * cfg.ch_mult[-1]
    resblock("encoder.mid.block_1", c, c), attn("encoder.mid.attn_1", c), resblock("encoder.mid.block_2", c, c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, cfg.z_channels, 3)
    # Decoder: built for i_level = n-1..0 and inserted at 0, so up[i] has the resolution of down[i].
    res = cfg.resolution // 2 ** (n - 1)
    conv("decoder.conv_in", cfg.z_channels, c, 3)
    resblock("decoder.mid.block_1", c, c), attn("decoder.mid.attn_1", c), resblock("decoder.mid.block_2", c, c)
    bin_ = c
    for i in reversed(range(n)):
        bout = ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", bin_, bout)
            bin_ = bout
            if res in cfg.attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", bout)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bout, bout, 3)
            res *= 2
    norm("decoder.norm_out", bin_), conv("decoder.conv_out", bin_, cfg.out_ch, 3)
    conv("quant_conv", cfg.z_channels, cfg.embed_dim, 1), conv("post_quant_conv", cfg.embed_dim, cfg.z_channels, 1)
    keys["quantize.embedding.weight"] = (cfg.n_embed, cfg.embed_dim)
    return keys


# ---- layout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [tiny_preset(), addp_preset(), seit_preset()], ids=["tiny", "addp", "seit"])
def test_state_dict_matches_taming_layout(cfg: VQGANConfig) -> None:
    sd = VQModel(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == taming_keys(cfg)


def test_addp_known_keys() -> None:
    # f16-1024: ch 128, ch_mult (1,1,2,2,4) -> channels 128,128,256,256,512; resolutions 256,128,64,32,16.
    # Level 4 is at 16 px, in attn_resolutions: encoder.down.4 has 2 attns (one per block), decoder.up.4
    # (also 16 px, since up[i] mirrors down[i]) has 3 (num_res_blocks + 1). down.4.block.0 goes 256 -> 512.
    tok = VQGANTokenizer(addp_preset())
    sd = tok.state_dict()
    assert tok.grid == (16, 16) and tok.vocab_size == 1024
    assert sd["quantize.embedding.weight"].shape == (1024, 256)
    assert sd["encoder.down.4.block.0.conv1.weight"].shape == (512, 256, 3, 3)
    assert sd["encoder.down.4.block.0.nin_shortcut.weight"].shape == (512, 256, 1, 1)
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.up.4.attn.2.q.weight"].shape == (512, 512, 1, 1)
    assert "encoder.down.4.attn.1.q.weight" in sd and "encoder.down.3.attn.0.q.weight" not in sd
    assert "decoder.up.4.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert "encoder.down.4.downsample.conv.weight" not in sd
    assert sd["quant_conv.weight"].shape == (256, 256, 1, 1)


def test_seit_grid() -> None:
    cfg = seit_preset()
    assert (cfg.factor, cfg.grid_side) == (8, 32)
    assert VQGANTokenizer(cfg).grid == (32, 32)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(tiny_preset(), resolution=33)
    with pytest.raises(ValueError, match="quantize"):
        tiny_preset(quantize="dot")
    with pytest.raises(ValueError, match="32"):
        dataclasses.replace(tiny_preset(), ch=48)


def test_attention_matches_taming_formula() -> None:
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 3)
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = blk.q(h), blk.k(h), blk.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
        w = torch.softmax(w, dim=2)
        ref = x + blk.proj_out(torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww))
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


# ---- coding -----------------------------------------------------------------------------------------
def test_shapes_dtypes_range(tok: VQGANTokenizer) -> None:
    x = images(5)
    ids = tok.encode(x)
    assert ids.shape == (5, 16, 16) and ids.dtype == np.int64 and tok.grid == (16, 16)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size == 64
    y = tok.decode(ids)
    assert y.shape == (5, RES, RES, 3) and y.dtype == np.uint8
    e = tok.embed(torch.from_numpy(ids))
    assert e.shape == (5, 16, 16, 16) and e.dtype == torch.float32
    torch.testing.assert_close(e, tok.codebook[torch.from_numpy(ids)])
    assert tok.encode(np.zeros((0, RES, RES, 3), np.uint8)).shape == (0, 16, 16)
    with pytest.raises(ValueError):
        tok.encode(x[:, :16])
    with pytest.raises(ValueError, match="range"):
        tok.decode(np.full((1, 16, 16), 64))


def test_batching_does_not_change_ids(tok: VQGANTokenizer) -> None:
    x = images(5, seed=1)
    small = VQGANTokenizer(tok.config, tok.model, batch_size=2)
    np.testing.assert_array_equal(small.encode(x), tok.encode(x))
    # Decoded pixels: the same up to the rounding to uint8 of floats that the batch size may sum in another
    # order (CPU conv kernels block by batch; one pixel in 15,360 once came out 86 against 85).
    a, b = small.decode(tok.encode(x)).astype(np.int16), tok.decode(tok.encode(x)).astype(np.int16)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_encode_matches_manual_l2(tok: VQGANTokenizer) -> None:
    x = images(2, seed=2)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = tok.model.quant_conv(tok.model.encoder(t)).permute(0, 2, 3, 1)  # (B, h, w, D)
        d = ((z[..., None, :] - tok.codebook) ** 2).sum(-1)  # (B, h, w, K)
    np.testing.assert_array_equal(tok.encode(x), d.argmin(-1).numpy())


def test_cosine_vs_l2_constructed() -> None:
    cb = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    z = torch.tensor([[1.0, 1.0]])
    # L2: |z-e0|^2 = 1 < |z-e1|^2 = 32; cosine: cos(z,e0) = 0.71 < cos(z,e1) = 1.
    assert nearest_codes(z, cb, "l2").tolist() == [0]
    assert nearest_codes(z, cb, "cosine").tolist() == [1]


def test_cosine_tokenizer(tok: VQGANTokenizer) -> None:
    cos = VQGANTokenizer.from_state({**tok.config_dict(), "quantize": "cosine"}, tok.state_dict())
    x = images(3, seed=3)
    ids = cos.encode(x)
    assert (ids != tok.encode(x)).any()
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = torch.nn.functional.normalize(tok.model.quant_conv(tok.model.encoder(t)).permute(0, 2, 3, 1), dim=-1)
        sim = z @ torch.nn.functional.normalize(tok.codebook, dim=1).T
    np.testing.assert_array_equal(ids, sim.argmax(-1).numpy())
    assert cos.fingerprint != tok.fingerprint


def test_determinism_for_seed() -> None:
    state = torch.get_rng_state()
    a, b, c = (VQGANTokenizer(tiny_preset(), seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert a.fingerprint == b.fingerprint != c.fingerprint
    x = images(2)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    np.testing.assert_array_equal(a.encode(x), a.encode(x))


# ---- checkpoints ------------------------------------------------------------------------------------
def test_save_load_round_trip(tok: VQGANTokenizer, tmp_path) -> None:
    tok.save(tmp_path / "t.pt")
    back = load_tokenizer(tmp_path / "t.pt")
    assert isinstance(back, VQGANTokenizer) and back.config == tok.config
    assert back.fingerprint == tok.fingerprint
    x = images(3)
    np.testing.assert_array_equal(back.encode(x), tok.encode(x))


def _taming_ckpt(tok: VQGANTokenizer, path, edit=None) -> None:
    sd = {k: v.clone() for k, v in tok.model.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    if edit:
        edit(sd)
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": sd}, path)


def test_from_taming_checkpoint(tok: VQGANTokenizer, tmp_path) -> None:
    _taming_ckpt(tok, tmp_path / "last.ckpt")
    back = VQGANTokenizer.from_taming_checkpoint(tmp_path / "last.ckpt", tiny_preset())
    assert back.fingerprint == tok.fingerprint
    x = images(3, seed=4)
    np.testing.assert_array_equal(back.encode(x), tok.encode(x))
    np.testing.assert_array_equal(back.decode(back.encode(x)), tok.decode(tok.encode(x)))
    # a bare state dict (no "state_dict" wrapper) and a dict config also load
    torch.save(tok.model.state_dict(), tmp_path / "bare.pt")
    bare = VQGANTokenizer.from_taming_checkpoint(tmp_path / "bare.pt", dataclasses.asdict(tiny_preset()))
    assert bare.fingerprint == tok.fingerprint


def test_taming_checkpoint_key_errors(tok: VQGANTokenizer, tmp_path) -> None:
    _taming_ckpt(tok, tmp_path / "missing.ckpt", lambda sd: sd.pop("decoder.up.1.upsample.conv.bias"))
    with pytest.raises(ValueError, match=r"missing keys 1: \['decoder\.up\.1\.upsample\.conv\.bias'\]"):
        VQGANTokenizer.from_taming_checkpoint(tmp_path / "missing.ckpt", tiny_preset())
    _taming_ckpt(tok, tmp_path / "extra.ckpt", lambda sd: sd.__setitem__("quantize.used", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected keys 1: \['quantize\.used'\]") as e:
        VQGANTokenizer.from_taming_checkpoint(tmp_path / "extra.ckpt", tiny_preset())
    assert "loss." not in str(e.value)
    # wrong architecture: shapes differ
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        VQGANTokenizer.from_taming_checkpoint(tmp_path / "extra.ckpt", tiny_preset(n_embed=32))


# ---- restriction ------------------------------------------------------------------------------------
def test_restrict(tok: VQGANTokenizer, tmp_path) -> None:
    x = images(6, seed=5)
    ids = tok.encode(x)
    counts = np.bincount(ids.ravel(), minlength=tok.vocab_size)
    keep = 8
    r = tok.restrict(keep, ids=ids)
    expected = np.argsort(-counts, kind="stable")[:keep]
    np.testing.assert_array_equal(r.parent_ids.numpy(), expected)
    assert r.vocab_size == keep and r.config.n_embed == keep
    torch.testing.assert_close(r.codebook, tok.codebook[torch.from_numpy(expected)])
    assert tok.restrict(keep, counts=counts).fingerprint == r.fingerprint
    rid = r.encode(x)
    assert rid.shape == ids.shape and rid.min() >= 0 and rid.max() < keep
    # where the full tokenizer already chose a kept code, the restricted one picks that same code
    kept = np.isin(ids, expected)
    assert kept.any() and (~kept).any()
    np.testing.assert_array_equal(expected[rid[kept]], ids[kept])
    # remap of full ids: kept ids -> their new index; others -> nearest kept codebook row
    remapped = tok.remap_ids(ids, r)
    np.testing.assert_array_equal(remapped[kept], rid[kept])
    d = ((tok.codebook[:, None] - r.codebook[None]) ** 2).sum(-1)  # (K, K')
    lut = d.argmin(1)
    lut[torch.from_numpy(expected)] = torch.arange(keep)
    np.testing.assert_array_equal(remapped, lut.numpy()[ids])
    assert r.decode(rid).shape == x.shape
    # round trip keeps the restriction
    r.save(tmp_path / "r.pt")
    back = load_tokenizer(tmp_path / "r.pt")
    assert back.fingerprint == r.fingerprint and torch.equal(back.parent_ids, r.parent_ids)
    np.testing.assert_array_equal(back.encode(x), rid)
    with pytest.raises(ValueError, match="exactly one"):
        tok.restrict(keep)
    with pytest.raises(ValueError):
        tok.restrict(0, counts=counts)


def test_restriction_lut_metrics() -> None:
    cb = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.5]])
    # (1, 1.5) is closer in angle to (0, 5) but closer in L2 to (1, 0) (2.25 vs 13.25).
    assert restriction_lut(cb, torch.tensor([1, 0]), "cosine").tolist() == [1, 0, 0]
    assert restriction_lut(cb, torch.tensor([1, 0]), "l2").tolist() == [1, 0, 1]


class _Hparams:
    """Stands in for the OmegaConf objects some Lightning checkpoints pickle."""


def test_taming_checkpoint_with_pickled_objects_is_refused(tmp_path) -> None:
    torch.save({"state_dict": {}, "hparams": _Hparams()}, tmp_path / "h.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        VQGANTokenizer.from_taming_checkpoint(tmp_path / "h.ckpt", tiny_preset())
