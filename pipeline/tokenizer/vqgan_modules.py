"""VQGAN building blocks in the CompVis/taming-transformers layout (written from scratch).

Parameter names and shapes match taming's ``VQModel`` (``taming/models/vqgan.py``) built from
``taming/modules/diffusionmodules/model.py`` (``Encoder``/``Decoder``) and
``taming/modules/vqvae/quantize.py`` (``VectorQuantizer``), so a taming checkpoint's ``state_dict``
loads into ``VQModel`` unchanged (after dropping its ``loss.*`` entries)::

    encoder.conv_in                                3x3, in_channels -> ch
    encoder.down.{i}.block.{j}                     ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
    encoder.down.{i}.attn.{j}                      AttnBlock (norm, q, k, v, proj_out) where res in attn_resolutions
    encoder.down.{i}.downsample.conv               all levels but the last
    encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j} (num_res_blocks + 1 per level),
    decoder.up.{i}.attn.{j}, decoder.up.{i}.upsample.conv (all levels but 0), decoder.norm_out, decoder.conv_out
    quant_conv (1x1, z_channels -> embed_dim), post_quant_conv (1x1, embed_dim -> z_channels)
    quantize.embedding.weight                      (n_embed, embed_dim)

``decoder.up[i]`` works at the same resolution as ``encoder.down[i]``: index 0 is full resolution and
``up[len - 1]`` the lowest one (taming builds the list from the bottom and inserts at 0); the
forward pass walks it from the last index down to 0.

Only the inference path is implemented (no losses, no straight-through gradients, no temb).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VQGANConfig",
    "VQModel",
]

QUANTIZERS = ("l2", "cosine")


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture + quantisation of a VQGAN (taming's ``ddconfig`` + ``embed_dim``/``n_embed``).

    ch: base channels; ch_mult: per-level channel multipliers (levels = len(ch_mult), downsampling
    factor f = 2 ** (levels - 1)); num_res_blocks: ResnetBlocks per encoder level (decoder: +1);
    attn_resolutions: feature-map sides (px) that get an AttnBlock after every ResnetBlock;
    resolution: image side in px; z_channels: encoder output / decoder input channels; embed_dim: D,
    code dimension; n_embed: K, codebook size; quantize: "l2" (taming: nearest code by Euclidean
    distance) or "cosine" (SeiT / ViT-VQGAN: nearest by cosine similarity of L2-normalised vectors).
    All channel counts ``ch * m`` must be multiples of 32 (GroupNorm with 32 groups).
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    embed_dim: int
    n_embed: int
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    dropout: float = 0.0
    quantize: str = "l2"

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists: normalise so configs compare/hash equal.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.num_res_blocks < 1:
            raise ValueError(f"invalid VQGANConfig: {self}")
        bad = [self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % 32]
        if bad or self.z_channels % 32:
            raise ValueError(f"channel counts {bad or [self.z_channels]} are not multiples of 32 (GroupNorm(32))")
        if self.resolution < 1 or self.resolution % self.factor:
            raise ValueError(f"resolution {self.resolution} is not a positive multiple of f={self.factor}")
        if self.embed_dim < 1 or self.n_embed < 1:
            raise ValueError(f"invalid embed_dim/n_embed: {self.embed_dim}/{self.n_embed}")
        if self.quantize not in QUANTIZERS:
            raise ValueError(f"quantize must be one of {QUANTIZERS}, got {self.quantize!r}")
        if self.double_z:
            # taming's VQModel wires quant_conv to z_channels inputs, so double_z=True cannot run there either.
            raise ValueError("double_z=True is not supported by VQModel (quant_conv expects z_channels inputs)")

    @property
    def factor(self) -> int:
        """f: downsampling factor image side -> token grid side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_side(self) -> int:
        """Side of the token grid: resolution // f."""
        return self.resolution // self.factor


def normalize(channels: int) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm(32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-dropout-conv2 + shortcut (1x1 ``nin_shortcut`` when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, in, H, W) -> float (B, out, H, W)."""
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, C, H, W) -> float (B, C, H, W); softmax(q k^T / sqrt(C)) v as in taming."""
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, sequence of positions.
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C), like taming
        out = out.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1 (asymmetric, as taming) then 3x3 stride-2 conv: halves H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: doubles H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Container of one resolution level: ``block`` and ``attn`` lists (+ down/upsample set by the caller)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """float (B, in_channels, R, R) in [-1, 1] -> float (B, z_channels, R/f, R/f)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out))
            level = _Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(c, cfg.dropout)
        self.norm_out = normalize(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """float (B, z_channels, R/f, R/f) -> float (B, out_ch, R, R) (unclamped, ~[-1, 1])."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_side
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in, cfg.dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):  # lowest resolution first, like taming
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)  # so that up[i] sits at the resolution of encoder.down[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class _Quantize(nn.Module):
    """Holds the codebook as ``embedding.weight`` (K, D), taming's VectorQuantizer init U(-1/K, 1/K)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)


class VQModel(nn.Module):
    """encoder -> quant_conv -> (nearest code) -> post_quant_conv -> decoder; taming key layout."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = _Quantize(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, R, R) in [-1, 1] -> float (B, D, R/f, R/f) pre-quantisation latents."""
        return self.quant_conv(self.encoder(x))

    def decode_codes(self, zq: torch.Tensor) -> torch.Tensor:
        """float (B, D, h, w) code vectors -> float (B, 3, R, R) unclamped images."""
        return self.decoder(self.post_quant_conv(zq))
