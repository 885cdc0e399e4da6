"""MTM: masked token modelling on stored VQ tokens, as in SeiT++ (which follows MAGE).

One step, for ids int64 (B, h, w) with a 2 x 2 token stem (N = h/2 * w/2 patches):

1. ``token_embed`` looks ids up (K x 32, LayerNorm, dropout) and ``patch_embed`` (conv 2 x 2,
   stride 2) makes N patch vectors.
2. ``sample_mask_ratio``: one ratio r per batch from a normal truncated to [min, max]; the
   ``ceil(r N)`` patches with the smallest noise are *masked* (replaced by a learned mask vector),
   and the ``ceil(drop N)`` smallest of those are also *dropped* (the encoder never sees them):
   dropped is a subset of masked.
3. The ViT encoder runs on cls + kept patches (sin-cos positions).
4. The decoder (4 blocks) gets every position back: kept-and-unmasked patches carry their encoder
   output, dropped and masked ones the encoder's cls output (MAGE pads with it), plus learned
   positions.
5. The head maps each patch to 2 x 2 sub-token vectors (Linear -> GELU -> LayerNorm, width 32) and
   scores them against the token embedding table (tied, gradient stopped, as SeiT++ does) plus a
   bias: logits (B, h, w, K).
6. Loss: cross-entropy per token, averaged over the 2 x 2 sub-tokens of a patch and then over the
   masked patches. Training forms the logits of step 5 only at masked patches, in chunks
   (``masked_loss``, ``pretrain.token_loss``): same loss and gradients, no (B, h, w, K) tensor.

Hyperparameters and where they come from (S = naver-ai/seit ``main_mtm_pretrain.py`` /
``models_mtm.py``, M = MAGE, ours = our choice):

=====================  =========  ============================================================
mask_ratio_min 0.4     S          also the drop ratio (S and M drop ``ceil(min * N)``)
mask_ratio_mu 0.45     S          (M: 0.55, min 0.5)
mask_ratio_std 0.25    S, M
mask_ratio_max 1.0     S, M
decoder 4 blocks       S          "dec512d4b": width 512 and 16 heads for ViT-B; tiny configs
                                  use a narrower decoder (configs/*.yaml)
decoder_dropout 0.1    S, M       dropout and attention dropout in decoder blocks
token_dropout 0.1      S          dropout on the token embedding (S's BertEmbeddings)
label_smoothing 0.0    S          S's default ``--smoothing 0.0`` (M uses 0.1)
head tied, detached    S          ``word_embeddings.weight.data.detach()``; ``detach_head=False`` lets
                                  the head's gradient reach the table
table_init_std 0.02    S          the input path normalises the table away (LayerNorm), so its init
                                  scale only sets the head's logit scale; configs/mtm_vit_tiny.yaml
                                  uses 0.2 (ours, measured in the README: faster calibration)
mask vector init       ours       normal(0.02) (S leaves it at zero)
decoder positions      M          learned, normal(0.02) (S leaves them at zero)
=====================  =========  ============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives import DataSpec, Objective
from pretrain.token_loss import masked_sub_token_loss
from pretrain.vit import Block, VisionTransformer, ViTConfig

__all__ = ["MTMConfig", "MTM", "sample_mask_ratio", "random_masks", "patch_mean"]


@dataclass(frozen=True)
class MTMConfig:
    """MTM settings; defaults are SeiT++'s (see the module table)."""

    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.45
    mask_ratio_std: float = 0.25
    drop_ratio: float | None = None  # None: mask_ratio_min
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    decoder_dropout: float = 0.1
    token_dropout: float = 0.1
    label_smoothing: float = 0.0
    detach_head: bool = True
    table_init_std: float = 0.02  # std of the token-embedding table at init (S: 0.02); sets the head's logit scale

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1, got "
                             f"{self.mask_ratio_min}, {self.mask_ratio_max}")
        if self.mask_ratio_std <= 0:
            raise ValueError(f"mask_ratio_std must be > 0, got {self.mask_ratio_std}")
        if self.drop_ratio is not None and not 0.0 <= self.drop_ratio <= self.mask_ratio_min:
            raise ValueError(f"drop_ratio must lie in [0, mask_ratio_min={self.mask_ratio_min}] so dropped "
                             f"patches are always masked, got {self.drop_ratio}")
        if self.table_init_std <= 0:
            raise ValueError(f"table_init_std must be > 0, got {self.table_init_std}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")

    @property
    def drop(self) -> float:
        return self.mask_ratio_min if self.drop_ratio is None else self.drop_ratio


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sample_mask_ratio(cfg: MTMConfig, generator: torch.Generator | None = None) -> float:
    """One draw from N(mu, std) truncated to [min, max], by inverting the CDF (scipy's truncnorm law)."""
    lo = _normal_cdf((cfg.mask_ratio_min - cfg.mask_ratio_mu) / cfg.mask_ratio_std)
    hi = _normal_cdf((cfg.mask_ratio_max - cfg.mask_ratio_mu) / cfg.mask_ratio_std)
    u = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).item()
    return min(max(cfg.mask_ratio_mu + cfg.mask_ratio_std * z, cfg.mask_ratio_min), cfg.mask_ratio_max)


def random_masks(batch: int, n: int, n_masked: int, n_dropped: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masks over n positions.

    Returns ``masked`` bool (B, n) with exactly ``n_masked`` True per row, ``dropped`` bool (B, n)
    with exactly ``n_dropped`` True per row and dropped implies masked, and ``keep_index`` int64
    (B, n - n_dropped): the positions the encoder sees, in increasing order. Ranks of the noise
    are used instead of thresholds, so ties cannot change the counts.
    """
    if not 0 <= n_dropped <= n_masked <= n:
        raise ValueError(f"need 0 <= n_dropped ({n_dropped}) <= n_masked ({n_masked}) <= n ({n})")
    noise = torch.rand(batch, n, generator=generator, device=device)
    order = noise.argsort(dim=1)
    rank = order.argsort(dim=1)
    masked = rank < n_masked
    dropped = rank < n_dropped
    keep_index = order[:, n_dropped:].sort(dim=1).values
    return masked, dropped, keep_index


def patch_mean(per_token: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h, w) per-token values -> (B, h/p * w/p) means over each p x p patch (row-major patches)."""
    b, h, w = per_token.shape
    x = per_token.reshape(b, h // patch, patch, w // patch, patch)
    return x.mean(dim=(2, 4)).reshape(b, -1)


class MTM(Objective):
    """Masked token modelling (SeiT++) on a token-stem ViT. ``forward(batch) -> (loss, metrics)``.

    Metrics: ``masked_ce`` (plain cross-entropy in nats on masked tokens, comparable with the
    unigram entropy whatever the smoothing), ``masked_acc`` (top-1 on masked tokens), ``mask_ratio``.
    """

    def __init__(self, cfg: MTMConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        if vit.stem != "token" or not vit.class_token:
            raise ValueError("MTM needs a token-stem ViT with a class token "
                             "(model.stem: token, model.class_token: true)")
        if (vit.grid, vit.grid) != tuple(data.grid) or vit.vocab_size != data.vocab_size:
            raise ValueError(f"model grid {vit.grid} / vocab {vit.vocab_size} do not match the data's "
                             f"grid {data.grid} / vocab {data.vocab_size}")
        self.cfg = cfg
        self.encoder = VisionTransformer(vit)
        nn.init.normal_(self.encoder.token_embed.word_embeddings.weight, std=cfg.table_init_std)
        n = vit.num_patches
        d, dd, p, e = vit.embed_dim, cfg.decoder_dim, vit.patch_size, vit.token_dim
        self.mask_token = nn.Parameter(torch.empty(1, 1, d).normal_(std=0.02))
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.decoder_embed = nn.Linear(d, dd)
        self.decoder_pos_embed = nn.Parameter(torch.empty(1, n + 1, dd).normal_(std=0.02))
        self.decoder_blocks = nn.Sequential(*[
            Block(dd, cfg.decoder_heads, vit.mlp_ratio, qkv_bias=True, proj_drop=cfg.decoder_dropout,
                  attn_drop=cfg.decoder_dropout, norm_eps=vit.norm_eps)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=vit.norm_eps)
        self.head_fc = nn.Linear(dd, p * p * e)
        self.head_norm = nn.LayerNorm(e, eps=vit.norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(vit.vocab_size))
        for m in [self.decoder_embed, self.head_fc, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    # -- stages ---------------------------------------------------------------------------------

    def forward_encoder(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids int64 (B, h, w) -> latent (B, 1 + N - n_drop, D), masked bool (B, N), keep_index (B, N - n_drop)."""
        enc = self.encoder
        x = enc.patchify(self.token_dropout(enc.token_embed(ids)))
        b, n, d = x.shape
        ratio = sample_mask_ratio(self.cfg)
        n_masked = math.ceil(n * ratio)
        n_dropped = min(math.ceil(n * self.cfg.drop), n_masked)
        masked, _, keep_index = random_masks(b, n, n_masked, n_dropped, x.device)
        x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x) + enc.pos_embed[:, 1:]
        x = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, d))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))
        return x, masked, keep_index

    def forward_decoder(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """-> logits float (B, h, w, K) for every token position."""
        return self.token_logits(self.decoder_features(latent, masked, keep_index))

    def decoder_features(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """-> decoder output float (B, N, Dd) at every patch (the head's input)."""
        y = self.decoder_embed(latent)
        b, _, dd = y.shape
        n = masked.shape[1]
        pad = y[:, :1].expand(b, n, dd)
        full = pad.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, dd), y[:, 1:])
        full = torch.where(masked.unsqueeze(-1), pad, full)
        z = torch.cat([y[:, :1], full], dim=1) + self.decoder_pos_embed
        return self.decoder_norm(self.decoder_blocks(z))[:, 1:]

    def token_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Patch features (B, N, Dd) -> logits (B, h, w, K) through the 2 x 2 sub-token head tied to the embedding."""
        enc = self.encoder
        g, p = enc.cfg.grid_size, enc.cfg.patch_size
        b = z.shape[0]
        sub = self.head_fc(z).reshape(b, g, g, p, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, -1)
        sub = self.head_norm(F.gelu(sub))
        table = enc.token_embed.word_embeddings.weight
        if self.cfg.detach_head:
            table = table.detach()
        return sub @ table.t().to(sub.dtype) + self.head_bias.to(sub.dtype)

    def forward_loss(self, logits: torch.Tensor, ids: torch.Tensor,
                     masked: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy per token, mean over each patch's sub-tokens, mean over masked patches."""
        p = self.encoder.cfg.patch_size
        flat = logits.float().reshape(-1, logits.shape[-1])
        target = ids.reshape(-1)
        ce = F.cross_entropy(flat, target, reduction="none", label_smoothing=self.cfg.label_smoothing)
        weights = masked.float()
        denom = weights.sum().clamp_min(1.0)
        loss = (patch_mean(ce.reshape(ids.shape), p) * weights).sum() / denom
        with torch.no_grad():
            plain = F.cross_entropy(flat, target, reduction="none") if self.cfg.label_smoothing else ce
            correct = (flat.argmax(-1) == target).float()
            metrics = {
                "masked_ce": (patch_mean(plain.reshape(ids.shape), p) * weights).sum() / denom,
                "masked_acc": (patch_mean(correct.reshape(ids.shape), p) * weights).sum() / denom,
                "mask_ratio": weights.mean(),
            }
        return loss, metrics

    def masked_loss(self, z: torch.Tensor, ids: torch.Tensor,
                    masked: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward_loss(token_logits(z), ids, masked)`` (loss, metrics, gradients), with logits formed only
        at masked patches and in chunks (``pretrain.token_loss``): no (B, h, w, K) tensor exists."""
        table = self.encoder.token_embed.word_embeddings.weight
        out = masked_sub_token_loss(z, ids, masked, self.head_fc, self.head_norm,
                                    table.detach() if self.cfg.detach_head else table, self.head_bias,
                                    self.encoder.cfg.patch_size, self.cfg.label_smoothing)
        denom = max(out.ce.numel(), 1)
        metrics = {"masked_ce": out.ce.sum() / denom, "masked_acc": out.correct.float().sum() / denom,
                   "mask_ratio": masked.float().mean()}
        return out.loss, metrics

    @torch.no_grad()
    def predict(self, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Token logits float (B, h, w, K) given ids int64 (B, h, w) and masked bool (B, N) over patches.

        Inference form (MAGE's generation path): masked patches enter the encoder as the mask vector,
        none is dropped; use under ``eval()``. The ids under masked patches are ignored.
        """
        enc = self.encoder
        x = enc.patchify(enc.token_embed(ids))
        b, n, _ = x.shape
        x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        latent = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))
        keep_index = torch.arange(n, device=ids.device).expand(b, n)
        return self.forward_decoder(latent, masked, keep_index)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["tokens"]
        latent, masked, keep_index = self.forward_encoder(ids)
        return self.masked_loss(self.decoder_features(latent, masked, keep_index), ids, masked)
