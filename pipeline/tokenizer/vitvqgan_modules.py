"""The ViT-VQGAN of thuanz123/enhancing-transformers (``ViTVQ``), written anew with its exact state-dict keys.

SeiT tokenised ImageNet with this network, so its weights must load key for key. The layout
(``enhancing/modules/stage1/{vitvqgan,layers,quantizers}.py``), with L = (R / p)^2 patches::

    encoder.to_patch_embedding.0.{weight,bias}          Conv2d(3, dim, p, stride p)
    encoder.en_pos_embedding                            (1, L, dim) fixed 2-D sin-cos (saved, not trained)
    encoder.transformer.layers.{i}.0.norm.{weight,bias} pre-norm of attention
    encoder.transformer.layers.{i}.0.fn.to_qkv.weight   (3 * heads * 64, dim), no bias
    encoder.transformer.layers.{i}.0.fn.to_out.{weight,bias}
    encoder.transformer.layers.{i}.1.norm.{weight,bias} pre-norm of the MLP
    encoder.transformer.layers.{i}.1.fn.net.{0,2}.{weight,bias}   Linear -> tanh -> Linear
    encoder.transformer.norm.{weight,bias}
    decoder.transformer.* (as above), decoder.de_pos_embedding, decoder.to_pixel.1.{weight,bias}
                                                        ConvTranspose2d(dim, 3, p, stride p)
    quantizer.embedding.weight                          (n_embed, embed_dim) codes
    pre_quant.{weight,bias}, post_quant.{weight,bias}   Linear dim <-> embed_dim

Lightning checkpoints also hold ``loss.*`` (LPIPS, discriminator): training-only, not built here.
Quantisation is cosine: latents and codes are L2-normalised before the nearest-code search, and the
decoder receives the normalised code (``VectorQuantizer`` with ``use_norm=True``). Images enter in
[0, 1] (torchvision ``ToTensor``, no mean/std), as the decoder's outputs are read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTVQGANConfig", "ViTVQ", "base_preset", "small_preset", "sincos_2d"]


@dataclass(frozen=True)
class ViTVQGANConfig:
    """Architecture of a ViTVQ; the defaults are enhancing-transformers' ``imagenet_vitvq_base.yaml``."""

    image_size: int = 256
    patch_size: int = 8
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    enc_mlp_dim: int = 3072
    dec_dim: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    dec_mlp_dim: int = 3072
    dim_head: int = 64  # never set in enhancing-transformers' configs
    embed_dim: int = 32
    n_embed: int = 8192

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size


def base_preset() -> ViTVQGANConfig:
    """``configs/imagenet_vitvq_base.yaml``: 12 + 12 blocks of width 768, 8192 32-d codes, 32 x 32 at 256 px."""
    return ViTVQGANConfig()


def small_preset() -> ViTVQGANConfig:
    """``configs/imagenet_vitvq_small.yaml``: 8 + 8 blocks of width 512."""
    return dataclasses.replace(ViTVQGANConfig(), enc_dim=512, enc_depth=8, enc_heads=8, enc_mlp_dim=2048,
                               dec_dim=512, dec_depth=8, dec_heads=8, dec_mlp_dim=2048)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """float32 (side * side, dim) fixed position table: half the channels sin/cos of one axis, half the other."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                            indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1).float()  # the reference puts the column axis first


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention; x (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Identity() if heads == 1 and dim_head == dim else nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v, as the reference
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)), PreNorm(dim, FeedForward(dim, mlp_dim))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class _ToTokens(nn.Module):
    """(B, C, h, w) -> (B, h * w, C), row-major (the reference's ``Rearrange('b c h w -> b (h w) c')``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class _ToMap(nn.Module):
    """(B, h * w, C) -> (B, C, h, w) for a square grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1])
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.to_patch_embedding = nn.Sequential(nn.Conv2d(3, cfg.enc_dim, kernel_size=p, stride=p), _ToTokens())
        self.en_pos_embedding = nn.Parameter(sincos_2d(cfg.enc_dim, cfg.grid_side)[None], requires_grad=False)
        self.transformer = Transformer(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.dim_head, cfg.enc_mlp_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img float (B, 3, R, R) in [0, 1] -> (B, L, enc_dim)."""
        return self.transformer(self.to_patch_embedding(img) + self.en_pos_embedding)


class ViTDecoder(nn.Module):
    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.transformer = Transformer(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.dim_head, cfg.dec_mlp_dim)
        self.de_pos_embedding = nn.Parameter(sincos_2d(cfg.dec_dim, cfg.grid_side)[None], requires_grad=False)
        self.to_pixel = nn.Sequential(_ToMap(), nn.ConvTranspose2d(cfg.dec_dim, 3, kernel_size=p, stride=p))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, dec_dim) -> images float (B, 3, R, R), [0, 1] when trained."""
        return self.to_pixel(self.transformer(tokens + self.de_pos_embedding))


class Quantizer(nn.Module):
    """Holds the codes under the reference's name (``quantizer.embedding.weight``); the search is the tokenizer's."""

    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_embed, cfg.embed_dim)


def _init(m: nn.Module) -> None:
    """The reference's init (xavier-uniform linears and convs, zero biases, unit LayerNorms)."""
    if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTVQ(nn.Module):
    """Encoder -> pre_quant -> (codes) -> post_quant -> decoder, with the reference's parameter names."""

    def __init__(self, cfg: ViTVQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg)
        self.decoder = ViTDecoder(cfg)
        self.quantizer = Quantizer(cfg)
        self.pre_quant = nn.Linear(cfg.enc_dim, cfg.embed_dim)
        self.post_quant = nn.Linear(cfg.embed_dim, cfg.dec_dim)
        self.encoder.apply(_init)
        self.decoder.apply(_init)
        nn.init.normal_(self.quantizer.embedding.weight)

    def encode_latents(self, img: torch.Tensor) -> torch.Tensor:
        """img float (B, 3, R, R) in [0, 1] -> unnormalised latents (B, L, embed_dim)."""
        return self.pre_quant(self.encoder(img))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """code vectors (B, L, embed_dim) -> images float (B, 3, R, R); codes are L2-normalised first."""
        return self.decoder(self.post_quant(F.normalize(codes, dim=-1)))
