"""Vision Transformer backbone for pre-training on stored VQ token grids (SeiT stem) or on pixels.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``/``fc_norm``, ``head``), so every
weight except the token stem's ``token_embed.*`` loads into timm unchanged (see ``pretrain.export``).

Two stems:

- **token** (SeiT): ids int64 (B, grid, grid) in [0, vocab_size) -> ``token_embed`` (learned
  ``nn.Embedding(vocab_size, token_dim)`` + LayerNorm) -> float (B, token_dim, grid, grid) ->
  ``patch_embed`` (Conv2d token_dim -> embed_dim, kernel = stride = patch_size) -> (B, N, D) with
  N = (grid // patch_size) ** 2. SeiT: 32x32 tokens, token_dim 32, patch 2 -> 16x16 = 256 patches.
- **pixel**: float (B, in_chans, grid, grid) images -> ``patch_embed`` (Conv2d in_chans -> embed_dim,
  kernel = stride = patch_size) -> (B, N, D); e.g. grid 224, patch 16 is timm's ``vit_*_patch16_224``.

Initialisation follows MAE / timm: Linear xavier-uniform with zero bias, LayerNorm 1 / 0,
``patch_embed.proj`` xavier-uniform on its (D, C * p * p) view, ``cls_token`` and the token embedding
normal(std .02), a learned ``pos_embed`` trunc-normal(std .02); a "sincos" ``pos_embed`` is MAE's
fixed 2-D sin-cos table held in a frozen parameter (``requires_grad=False``) so it is in the state dict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ViTConfig", "PRESETS", "vit_config", "sincos_pos_embed_2d", "interpolate_pos_embed",
    "DropPath", "Attention", "Mlp", "Block", "TokenEmbed", "PatchEmbed", "VisionTransformer",
]

_STEMS = ("token", "pixel")
_POS_EMBEDS = ("sincos", "learned")
_POOLS = ("token", "avg")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"ViTConfig.{field} {message}")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ``VisionTransformer``; every field is checked in ``__post_init__`` (ValueError)."""

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0  # max stochastic-depth rate, linearly increasing over blocks (timm rule)
    stem: str = "token"  # "token" | "pixel"
    grid: int = 32  # token stem: side of the input token grid (h == w); pixel stem: image side in px
    patch_size: int = 2  # token stem: sub-tokens per patch side (SeiT: 2); pixel stem: px per patch side (16)
    vocab_size: int = 512  # token stem: codebook size K
    token_dim: int = 32  # token stem: width of the learned token embedding (SeiT: 32)
    in_chans: int = 3  # pixel stem
    pos_embed: str = "sincos"  # "sincos" (fixed 2-D sin-cos, MAE) | "learned"
    class_token: bool = True
    global_pool: str = "token"  # "token" (cls) | "avg" (mean of patch tokens, then fc_norm)
    num_classes: int = 0  # 0 = no head (identity)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "grid", "patch_size", "vocab_size", "token_dim", "in_chans"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                   f"must be a positive int, got {value!r}")
        _check(isinstance(self.num_classes, int) and self.num_classes >= 0, "num_classes",
               f"must be an int >= 0, got {self.num_classes!r}")
        _check(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio!r}")
        _check(0.0 <= self.drop_path < 1.0, "drop_path", f"must be in [0, 1), got {self.drop_path!r}")
        _check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps!r}")
        for name, allowed in (("stem", _STEMS), ("pos_embed", _POS_EMBEDS), ("global_pool", _POOLS)):
            _check(getattr(self, name) in allowed, name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        _check(self.class_token or self.global_pool != "token", "global_pool",
               "is 'token', which needs class_token=True (use global_pool='avg')")
        _check(self.grid % self.patch_size == 0, "grid", f"({self.grid}) must be divisible by patch_size "
               f"({self.patch_size})")
        _check(self.embed_dim % self.num_heads == 0, "embed_dim", f"({self.embed_dim}) must be divisible by "
               f"num_heads ({self.num_heads})")
        _check(self.pos_embed != "sincos" or self.embed_dim % 4 == 0, "embed_dim",
               f"({self.embed_dim}) must be divisible by 4 for pos_embed='sincos'")

    @property
    def grid_size(self) -> int:
        """Patches per side: ``grid // patch_size``."""
        return self.grid // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per sample: ``grid_size ** 2``."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: 1 with a class token, else 0."""
        return int(self.class_token)

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width, ``int(embed_dim * mlp_ratio)`` (timm's rule)."""
        return int(self.embed_dim * self.mlp_ratio)


PRESETS: dict[str, dict] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def vit_config(preset: str, **overrides) -> ViTConfig:
    """``ViTConfig`` of a named width/depth preset (see ``PRESETS``) with ``overrides`` applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; presets: {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[preset], **overrides})


# -- position embeddings --------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """float64 (M, dim): [sin(pos * omega), cos(pos * omega)], omega_i = 1 / 10000 ** (i / (dim / 2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, class_token: bool) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table: float32 (grid_size ** 2 + class_token, dim).

    Patch row ``r * grid_size + c`` (row r, column c) is ``[sincos_1d(dim/2, c), sincos_1d(dim/2, r)]``
    with ``sincos_1d(d, p) = [sin(p * w), cos(p * w)]``, ``w_i = 1 / 10000 ** (i / (d / 2))``,
    i < d / 2 = dim / 4. (MAE names the first half "h" but, through ``np.meshgrid(w, h)``, fills it
    from the column index; this keeps MAE's exact layout so MAE tables match.) The class-token row,
    when present, is all zeros and comes first. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if class_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.to(torch.float32)


def interpolate_pos_embed(pos: torch.Tensor, new_grid: int, num_prefix: int) -> torch.Tensor:
    """Resample a position table to another patch grid (loading at another resolution).

    ``pos`` (1, num_prefix + g * g, D) -> (1, num_prefix + new_grid ** 2, D), same dtype: the patch part
    is resized bicubically (align_corners=False, as MAE) as a (D, g, g) image; the prefix rows (class
    token) are kept unchanged. An unchanged grid returns a copy.
    """
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, L, D), got {tuple(pos.shape)}")
    n_patch = pos.shape[1] - num_prefix
    old_grid = math.isqrt(max(n_patch, 0))
    if n_patch <= 0 or old_grid * old_grid != n_patch:
        raise ValueError(f"pos_embed {tuple(pos.shape)} minus {num_prefix} prefix rows is not a square patch grid")
    if new_grid < 1:
        raise ValueError(f"new_grid must be >= 1, got {new_grid}")
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    if new_grid == old_grid:
        return pos.clone()
    dim = pos.shape[2]
    img = patches.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


# -- layers ---------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero a whole sample's residual branch with probability
    ``rate`` and scale survivors by 1 / (1 - rate); identity in eval or when ``rate == 0``. Any shape (B, ...)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Attention(nn.Module):
    """Multi-head self-attention: float (B, L, dim) -> (B, L, dim), via ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (dropout ``drop`` after each): float (B, L, dim) -> (B, L, out_dim or dim)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))).
    float (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TokenEmbed(nn.Module):
    """SeiT's token stem input: ids int64 (B, h, w) in [0, vocab_size) -> float (B, token_dim, h, w),
    a learned ``word_embeddings`` lookup followed by LayerNorm ``norm`` over token_dim."""

    def __init__(self, vocab_size: int, token_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, token_dim)
        self.norm = nn.LayerNorm(token_dim, eps=norm_eps)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.word_embeddings(ids)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: float (B, in_ch, H, W) -> (B, (H // p) * (W // p), embed_dim), row-major."""

    def __init__(self, in_ch: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_ch, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# -- the model ------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT encoder (+ optional linear head) described by a ``ViTConfig``; timm parameter names.

    Shapes: B samples, N = cfg.num_patches, P = cfg.num_prefix_tokens (1 with a class token), D = embed_dim.
    Input ``x``: token stem ids int64 (B, grid, grid), or float (B, token_dim, grid, grid) already embedded
    (i.e. an output of ``token_embed``, possibly augmented/mixed); pixel stem float (B, in_chans, grid, grid).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        if cfg.stem == "token":
            self.token_embed = TokenEmbed(cfg.vocab_size, cfg.token_dim, cfg.norm_eps)
            in_ch = cfg.token_dim
        else:
            in_ch = cfg.in_chans
        self.patch_embed = PatchEmbed(in_ch, dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        if cfg.pos_embed == "sincos":
            table = sincos_pos_embed_2d(dim, cfg.grid_size, cfg.class_token).unsqueeze(0)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, dim))
        self.pos_drop = nn.Identity()
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace(0, drop_path)
        self.blocks = nn.Sequential(*[
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=r, norm_eps=cfg.norm_eps) for r in rates
        ])
        self.norm, self.fc_norm = self._final_norms(cfg)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self._init_weights()

    @staticmethod
    def _final_norms(cfg: ViTConfig) -> tuple[nn.Module, nn.Module]:
        """(norm, fc_norm): LayerNorm on all tokens for cls pooling, LayerNorm after pooling for avg (timm)."""
        ln = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        return (nn.Identity(), ln) if cfg.global_pool == "avg" else (ln, nn.Identity())

    def _init_weights(self) -> None:
        if self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for module in self.modules():
            self._init_module(module)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Stem only, no position embedding: -> float (B, N, D).

        Token stem: ``x`` int64 (B, grid, grid) ids go through ``token_embed`` first; a floating ``x``
        (B, token_dim, grid, grid) is taken as already embedded (an output of ``token_embed``, so its
        LayerNorm is NOT applied again) and goes straight to ``patch_embed``. Pixel stem: ``x`` float
        (B, in_chans, grid, grid).
        """
        cfg = self.cfg
        if cfg.stem == "token" and not x.is_floating_point():
            if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.grid, cfg.grid):
                raise ValueError(f"token ids must be (B, {cfg.grid}, {cfg.grid}), got {tuple(x.shape)}")
            x = self.token_embed(x)
        channels = cfg.token_dim if cfg.stem == "token" else cfg.in_chans
        if not x.is_floating_point() or x.ndim != 4 or tuple(x.shape[1:]) != (channels, cfg.grid, cfg.grid):
            raise ValueError(f"{cfg.stem}-stem input must be float (B, {channels}, {cfg.grid}, {cfg.grid}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder: ``patchify`` + position embedding + class token + blocks + ``norm`` -> float (B, P + N, D)."""
        tokens = self.patchify(x)
        prefix = self.cfg.num_prefix_tokens
        tokens = tokens + self.pos_embed[:, prefix:]
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :prefix]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return self.norm(self.blocks(self.pos_drop(tokens)))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool float (B, P + N, D) features -> (B, D) (``pre_logits``) or head output (B, num_classes or D).

        "token": the class token ``feats[:, 0]``; "avg": mean over the N patch tokens, then ``fc_norm``.
        """
        if self.cfg.global_pool == "avg":
            pooled = feats[:, self.cfg.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = feats[:, 0]
        pooled = self.fc_norm(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem input (see class docstring) -> float (B, num_classes) logits, or (B, D) when num_classes == 0."""
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: ``pos_embed`` and ``cls_token`` (those present)."""
        return {name for name in ("pos_embed", "cls_token") if getattr(self, name) is not None}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head with ``num_classes`` outputs (0 = identity), optionally another pooling; updates ``cfg``.

        Switching the pooling swaps the final norm as MAE's fine-tuning does: "token" -> "avg" drops
        ``norm`` and adds a fresh ``fc_norm``, "avg" -> "token" the reverse. The new head is
        xavier-uniform with zero bias.
        """
        pool = self.cfg.global_pool if global_pool is None else global_pool
        cfg = dataclasses.replace(self.cfg, num_classes=num_classes, global_pool=pool)
        fresh: list[nn.Module] = []
        if pool != self.cfg.global_pool:
            self.norm, self.fc_norm = self._final_norms(cfg)
            fresh += [self.norm, self.fc_norm]
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes else nn.Identity()
        for module in [*fresh, self.head]:
            self._init_module(module)
            module.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.cfg = cfg

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameter elements (all, or only those with ``requires_grad``; a sincos table is frozen)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_sample(self) -> int:
        """Forward FLOPs of one sample at full length, counted as 2 * multiply-accumulates of the matmuls.

        With L = P + N tokens, D = embed_dim, H = mlp_hidden, c = stem input channels, p = patch_size::

            stem   = N * c * p * p * D                       (patch_embed conv; the embedding lookup is free)
            block  = L * (3 D^2 + D^2 + 2 D H)               (qkv, proj, fc1, fc2)
                   + 2 * L^2 * D                              (q @ k^T and attn @ v over all heads)
            head   = D * num_classes
            FLOPs  = 2 * (stem + depth * block + head)

        Norms, softmax, GELU, biases and residual adds are not counted. Training costs ~3x this.
        """
        cfg = self.cfg
        d, h, n = cfg.embed_dim, cfg.mlp_hidden, cfg.num_patches
        seq = n + cfg.num_prefix_tokens
        channels = cfg.token_dim if cfg.stem == "token" else cfg.in_chans
        stem = n * channels * cfg.patch_size**2 * d
        block = seq * (4 * d * d + 2 * d * h) + 2 * seq * seq * d
        head = d * cfg.num_classes
        return 2 * (stem + cfg.depth * block + head)
