"""The ViT-VQGAN loader (SeiT's tokenizer): enhancing-transformers' key layout, written here from its source
(not from our module), loads; the architecture is read off the shapes; SeiT's codebook subset gives SeiT's ids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.tokenizer import load_tokenizer
from pipeline.tokenizer.vitvqgan import ViTVQGANTokenizer, config_from_state_dict
from pipeline.tokenizer.vitvqgan_modules import ViTVQ, base_preset, sincos_2d


def reference_layout(dim: int, depth: int, heads: int, mlp: int, patch: int, side: int, n_embed: int,
                     embed_dim: int = 32) -> dict[str, tuple[int, ...]]:
    """Name -> shape of ``ViTVQ.state_dict()`` in enhancing-transformers (vitvqgan.py, layers.py, quantizers.py)."""
    inner = heads * 64
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.to_patch_embedding.0.weight": (dim, 3, patch, patch), "encoder.to_patch_embedding.0.bias": (dim,),
        "encoder.en_pos_embedding": (1, side * side, dim), "decoder.de_pos_embedding": (1, side * side, dim),
        "decoder.to_pixel.1.weight": (dim, 3, patch, patch), "decoder.to_pixel.1.bias": (3,),
        "quantizer.embedding.weight": (n_embed, embed_dim),
        "pre_quant.weight": (embed_dim, dim), "pre_quant.bias": (embed_dim,),
        "post_quant.weight": (dim, embed_dim), "post_quant.bias": (dim,),
    }
    for part in ("encoder", "decoder"):
        t = f"{part}.transformer"
        shapes |= {f"{t}.norm.weight": (dim,), f"{t}.norm.bias": (dim,)}
        for i in range(depth):
            a, f = f"{t}.layers.{i}.0", f"{t}.layers.{i}.1"
            shapes |= {f"{a}.norm.weight": (dim,), f"{a}.norm.bias": (dim,), f"{a}.fn.to_qkv.weight": (3 * inner, dim),
                       f"{a}.fn.to_out.weight": (dim, inner), f"{a}.fn.to_out.bias": (dim,),
                       f"{f}.norm.weight": (dim,), f"{f}.norm.bias": (dim,),
                       f"{f}.fn.net.0.weight": (mlp, dim), f"{f}.fn.net.0.bias": (mlp,),
                       f"{f}.fn.net.2.weight": (dim, mlp), f"{f}.fn.net.2.bias": (dim,)}
    return shapes


TINY = dict(dim=16, depth=1, heads=1, mlp=32, patch=8, side=32, n_embed=64)  # 32 x 32 ids at 256 px


def fresh_lightning_checkpoint(path, seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    """A freshly initialised ViTVQ in the reference layout, saved as Lightning saves it (weights under
    ``state_dict``, with the loss's LPIPS / discriminator entries beside them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = reference_layout(**(layout or TINY))
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    dim, side = shapes["pre_quant.weight"][1], int(shapes["encoder.en_pos_embedding"][1] ** 0.5)
    sd["encoder.en_pos_embedding"] = sd["decoder.de_pos_embedding"] = sincos_2d(dim, side)[None]
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.5.10",
            "state_dict": {**sd, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
                           "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3)}}
    torch.save(ckpt, path)
    return sd


def reference_encode(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """enhancing-transformers' ViTEncoder + pre_quant, restated with functional ops: patch conv + fixed
    positions; per block x += attn(LN(x)) (softmax(q k^T / 8) v, 64 channels a head), x += W2 tanh(W0 LN(x));
    final LN; pre_quant. x float (B, 3, R, R) in [0, 1] -> (B, L, embed_dim)."""
    w = sd["encoder.to_patch_embedding.0.weight"]
    h = F.conv2d(x, w, sd["encoder.to_patch_embedding.0.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = h + sd["encoder.en_pos_embedding"]
    dim, t = h.shape[-1], "encoder.transformer"

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(v, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"])

    i = 0
    while f"{t}.layers.{i}.0.norm.weight" in sd:
        a, f = f"{t}.layers.{i}.0", f"{t}.layers.{i}.1"
        qkv = ln(h, f"{a}.norm") @ sd[f"{a}.fn.to_qkv.weight"].T
        q, k, v = (u.unflatten(-1, (heads, 64)).transpose(1, 2) for u in qkv.chunk(3, -1))
        o = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        h = h + o.transpose(1, 2).flatten(2) @ sd[f"{a}.fn.to_out.weight"].T + sd[f"{a}.fn.to_out.bias"]
        y = torch.tanh(ln(h, f"{f}.norm") @ sd[f"{f}.fn.net.0.weight"].T + sd[f"{f}.fn.net.0.bias"])
        h = h + y @ sd[f"{f}.fn.net.2.weight"].T + sd[f"{f}.fn.net.2.bias"]
        i += 1
    return ln(h, f"{t}.norm") @ sd["pre_quant.weight"].T + sd["pre_quant.bias"]


def images(n: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth random RGB images (uint8 (n, 256, 256, 3))."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 8, 8, generator=g)
    return (F.interpolate(small, size=256, mode="bilinear") * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_reference_layout_loads_and_tokenises_32x32_at_256px(tmp_path):
    sd = fresh_lightning_checkpoint(tmp_path / "vitvq.ckpt")
    tok = ViTVQGANTokenizer.from_enhancing_checkpoint(tmp_path / "vitvq.ckpt")
    assert tok.resolution == 256 and tok.grid == (32, 32) and tok.vocab_size == 64
    own = tok.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)  # every weight landed by name
    x = images()
    ids = tok.encode(x)
    assert ids.shape == (2, 32, 32) and ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 64
    # By hand from the reference weights (its forward restated functionally), then the cosine nearest code.
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        z = reference_encode(sd, xt, heads=1)
        torch.testing.assert_close(tok.model.encode_latents(xt), z, rtol=1e-4, atol=1e-5)
        expect = (F.normalize(z, dim=-1) @ F.normalize(sd["quantizer.embedding.weight"], dim=1).T).argmax(-1)
    assert np.array_equal(ids.reshape(2, -1), expect.numpy())
    out = tok.decode(ids)
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8
    assert np.array_equal(tok.encode(x), ids)  # deterministic


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = fresh_lightning_checkpoint(tmp_path / "a.ckpt")
    del sd["decoder.transformer.layers.0.1.fn.net.2.bias"]
    sd["decoder.extra_head.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError) as err:
        ViTVQGANTokenizer.from_enhancing_checkpoint(tmp_path / "b.ckpt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1 ['decoder.transformer.layers.0.1.fn.net.2.bias']" in msg
    assert "unexpected 1 ['decoder.extra_head.weight']" in msg


def test_prefixed_bare_state_dicts_load_and_pickled_modules_are_refused(tmp_path):
    sd = fresh_lightning_checkpoint(tmp_path / "a.ckpt")
    torch.save({f"model.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt")
    tok = ViTVQGANTokenizer.from_enhancing_checkpoint(tmp_path / "bare.pt")
    assert torch.equal(tok.codebook, sd["quantizer.embedding.weight"])
    buf = io.BytesIO()
    torch.save(ViTVQ(config_from_state_dict(sd)), buf)  # what SeiT ships: a whole pickled module
    (tmp_path / "tokenizer.ckpt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="pickled module"):
        ViTVQGANTokenizer.from_enhancing_checkpoint(tmp_path / "tokenizer.ckpt")


def test_seit_codebook_subset_gives_seits_ids_and_round_trips(tmp_path):
    sd = fresh_lightning_checkpoint(tmp_path / "v.ckpt")
    keep = torch.tensor([5, 17, 2, 40, 33, 9, 61, 0, 12, 27])
    subset = sd["quantizer.embedding.weight"][keep]  # SeiT's codebook.ckpt: rows of the full codebook
    torch.save(subset, tmp_path / "codebook.ckpt")
    syn = torch.randint(0, 10, (10, 5))
    tok = ViTVQGANTokenizer.from_enhancing_checkpoint(tmp_path / "v.ckpt", tmp_path / "codebook.ckpt", synonyms=syn)
    assert tok.vocab_size == 10 and torch.equal(tok.parent_ids, keep) and torch.equal(tok.codebook, subset)
    x = images(3, seed=1)
    ids = tok.encode(x)
    with torch.no_grad():  # SeiT's convert_to_tokens: cosine nearest of the subset rows
        z = tok.model.encode_latents(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).reshape(-1, 32)
        d = (F.normalize(z, dim=-1)[:, None] - F.normalize(subset, dim=-1)[None]).pow(2).sum(-1)
    assert np.array_equal(ids.reshape(-1), d.argmin(1).numpy())
    tok.save(tmp_path / "tokenizer.pt")
    back = load_tokenizer(tmp_path / "tokenizer.pt")
    assert back.fingerprint == tok.fingerprint and torch.equal(back.synonyms, syn)
    assert np.array_equal(back.encode(x), ids) and np.array_equal(back.decode(ids), tok.decode(ids))


def test_released_configs_build_with_the_reference_keys():
    """ViT-VQGAN base (enhancing-transformers' imagenet_vitvq_base.yaml), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = ViTVQ(base_preset())
    shapes = reference_layout(dim=768, depth=12, heads=12, mlp=3072, patch=8, side=32, n_embed=8192)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert config_from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}) == base_preset()
