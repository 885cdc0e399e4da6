"""M3I: maximising multi-modal mutual information (Su et al., arXiv 2211.09807) on stored VQ tokens.

One stage, one student pass: ``loss = w_intra * loss_intra + w_inter * loss_inter + w_cls * loss_cls``
on ids (B, h, w) with a 2 x 2 token stem (g = h / 2 patches per side, N = g * g):

1. ``two_views``: view 1 = ``tokens`` / ``crop_box``, view 2 = ``view_tokens[:, 0]`` / ``view_box`` /
   ``view_flip`` (data tokenised with ``--views``; use ``augment: null``, as ``crop_box`` describes the
   stored ``tokens``), else two random resized crops (+ flips) of ``tokens`` made here on ids.
2. ``mix_images`` (the paper's Fig. 2): a square box of view-1 patches comes from the previous sample.
3. ``forward_encoder`` masks and drops view 1 as MTM; ``forward_decoder`` runs once over [cls, N
   view-1 slots, Q queries at view 2's patch centres expressed in view 1's frame (``relative_positions``,
   ``sincos_at``)]; slots -> intra-view token CE (MTM's head), queries -> inter-view regression of the
   EMA teacher's features of view 2; the pooled student feature -> category CE (labels < 0 skipped).
4. ``after_step``: teacher <- m * teacher + (1 - m) * student, m cosine from ``ema_momentum`` to 1.

Choices and their origin (P = paper, SIM = SiameseIM ``models_sim.py`` / ``util/pos_embed.py``,
S = SeiT++ via ``mtm.py``, ours = where the paper is silent for token grids):

=========================  ======  ================================================================
one pass, summed terms     P       single-stage sum of MI terms on one (mixed) masked input
w_* = 1, 1, 1              ours    each term is one MI bound and P sums them; nothing tuned
intra target: token ids    ours    the stored VQ ids stand in for P's target-encoder features
masking, drop, token head  S       as MTM (truncated-normal ratio, drop ceil(min N), tied head)
mask_ratio_max 0.75        ours    (MAGE: 1.0, for generation) >= 25% visible for the other terms
decoder 4 blocks, dropout  S       one decoder for both image terms (SIM: 8 blocks, no dropout)
decoder sin-cos positions  SIM     fixed, so view-1 slots and relative queries share one frame
query pos + scale terms    SIM     SIM concatenates pos and 10 log(scale) sin-cos then a Linear;
                                   ours adds the projected scale term to the raw sin-cos position
teacher, LN w/o affine     P, SIM  EMA encoder on the full unmasked view 2, final norm, then LN
ema 0.996 -> 1, cosine     SIM     SIM's cosine rise, BYOL's base; over ``total_steps`` (0: constant)
teacher in float32         ours    kept as buffers: DeepSpeed bf16 casts parameters only, and in
                                   bf16 an update of (1 - m) ~ 2^-8 of the gap rounds away
feature_loss "mse"         P, SIM  P models image targets as Gaussian (an L2 distance), as SIM's
                                   positive term; SIM's UniGrad negative term (a cross-rank
                                   correlation) is left out; "smooth_l1" (beta 1), "cosine" exist
mixing: square patch box   ours    CutMix with alpha 1 (area ~ U(0, 1)), on ids, patch-aligned
mixed inter-view queries   ours    P: the pasted image predicts another view; here both images do,
                                   weighted by area
category input             P       the pooled feature of the same masked (mixed) student pass
contrastive: cosine / 0.07 ours    learned class embeddings, CLIP's initial temperature
cls_smoothing 0.0          ours    plain CE (DeiT recipes: 0.1)
made views (no --views)    ours    scale (0.25, 1), ratio 3/4..4/3, flip 0.5: the ``--views`` law
=========================  ======  ================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.augment_geometry import crop_ids, random_resized_crop_params
from pretrain.objectives.base import DataSpec, Objective
from pretrain.objectives.parts import (
    TOKEN_HEAD_LEGACY_NAMES,
    MaskedTokenConfig,
    SubTokenHead,
    decoder_blocks,
    decoder_slots,
    frozen_copy,
    masked_encoder_pass,
    token_encoder,
    xavier_linears,
)
from pretrain.vit import ViTConfig, sincos_pos_embed_2d

__all__ = ["M3IConfig", "M3I", "Views", "two_views", "relative_positions", "sincos_at",
           "ema_momentum_at", "cutmix_region", "soft_labels"]

_FEATURE_LOSSES = ("mse", "smooth_l1", "cosine")
_CLS_MODES = ("ce", "contrastive")


@dataclass(frozen=True)
class M3IConfig(MaskedTokenConfig):
    """M3I settings (see the module table for where each default comes from); the masked-token fields
    (masking, decoder, intra-view token head) are MTM's (``parts.MaskedTokenConfig``)."""

    mask_ratio_max: float = 0.75
    w_intra: float = 1.0
    w_inter: float = 1.0
    w_cls: float = 1.0
    ema_momentum: float = 0.996
    total_steps: int = 0  # the trainer fills in run.steps (cosine schedule); 0 keeps ema_momentum constant
    feature_loss: str = "mse"  # "mse" | "smooth_l1" | "cosine"
    cls_mode: str = "ce"  # "ce" | "contrastive"
    temperature: float = 0.07  # contrastive only
    cls_smoothing: float = 0.0
    mix_images: bool = False
    crop_scale: tuple[float, float] = (0.25, 1.0)  # the two views made here when the batch has none
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"objective.{message}")

        need(min(self.w_intra, self.w_inter, self.w_cls) >= 0 and self.w_intra + self.w_inter + self.w_cls > 0,
             f"w_intra/w_inter/w_cls must be >= 0 and not all 0, got {self.w_intra}, {self.w_inter}, {self.w_cls}")
        need(self.decoder_dim % 4 == 0, f"decoder_dim {self.decoder_dim} must be divisible by 4 (sin-cos positions)")
        need(0.0 <= self.ema_momentum <= 1.0 and self.total_steps >= 0,
             f"ema_momentum must be in [0, 1] and total_steps >= 0, got {self.ema_momentum}, {self.total_steps}")
        need(self.feature_loss in _FEATURE_LOSSES, f"feature_loss must be one of {_FEATURE_LOSSES}")
        need(self.cls_mode in _CLS_MODES, f"cls_mode must be one of {_CLS_MODES}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0.0 <= self.cls_smoothing < 1 and 0.0 <= self.flip_p <= 1.0,
             "cls_smoothing must be in [0, 1), flip_p in [0, 1]")
        need(0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
             f"crop_scale / crop_ratio: bad values {self.crop_scale}, {self.crop_ratio}")


# -- geometry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Views:
    """Two views of each image: ids int64 (B, h, w); boxes float64 (B, 4) (top, left, height, width) in
    one unit per batch; flips bool (B,) (True: the view was mirrored left-right after cropping)."""

    ids1: torch.Tensor
    ids2: torch.Tensor
    box1: torch.Tensor
    box2: torch.Tensor
    flip1: torch.Tensor
    flip2: torch.Tensor


def two_views(batch: dict, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float) -> Views:
    """The stored views (``tokens``/``crop_box`` and ``view_*[:, 0]``) or, without them, two random crops.

    The crops are ``random_resized_crop_params`` boxes cut by ``crop_ids`` (nearest, output grid = input
    grid; run on CPU, where ``crop_ids`` builds its index grids) and mirrored with probability
    ``flip_p``; their boxes are in units of the stored grid. Uses torch's global generator.
    """
    ids = batch["tokens"]
    b, h, w = ids.shape
    if "view_tokens" in batch and batch["view_tokens"].shape[1] >= 1:
        other = batch["view_tokens"][:, 0]
        if other.shape[-2:] != ids.shape[-2:]:
            raise ValueError(f"view_tokens grid {tuple(other.shape[-2:])} differs from tokens grid {(h, w)}")
        if (batch["crop_box"][:, 2:] <= 0).any() or (batch["view_box"][:, 0, 2:] <= 0).any():
            raise ValueError("stored views need crop_box and view_box with positive height and width")
        unflipped = torch.zeros(b, dtype=torch.bool, device=ids.device)
        return Views(ids, other, batch["crop_box"].double(), batch["view_box"][:, 0].double(), unflipped,
                     batch["view_flip"][:, 0].bool())
    boxes = random_resized_crop_params(2 * b, scale, ratio, None, (h, w))  # (2B, 4) normalised x0, y0, x1, y1
    flips = torch.rand(2 * b) < flip_p
    crops = crop_ids(ids.cpu().repeat(2, 1, 1), boxes)
    crops = torch.where(flips[:, None, None], crops.flip(-1), crops).to(ids.device)
    x0, y0, x1, y1 = boxes.double().unbind(1)
    tlhw = torch.stack([y0, x0, y1 - y0, x1 - x0], 1).to(ids.device)
    flips = flips.to(ids.device)
    return Views(crops[:b], crops[b:], tlhw[:b], tlhw[b:], flips[:b], flips[b:])


def _axis(n: int, start_q, size_q, start_r, size_r, flip_q, flip_r) -> torch.Tensor:
    """Patch centres of the query view along one axis in the reference view's patch units: (B, n) float64."""
    s = (torch.arange(n, dtype=torch.float64, device=start_q.device) + 0.5) / n
    frac_q = torch.where(flip_q[:, None], 1.0 - s, s)  # fraction of the unflipped query crop
    frac_r = (start_q[:, None] + frac_q * size_q[:, None] - start_r[:, None]) / size_r[:, None]
    return torch.where(flip_r[:, None], 1.0 - frac_r, frac_r) * n - 0.5


def relative_positions(box_q: torch.Tensor, box_ref: torch.Tensor, flip_q: torch.Tensor, flip_ref: torch.Tensor,
                       grid: int | tuple[int, int]) -> torch.Tensor:
    """(y, x) centres of the query view's patches in the reference view's patch coordinates.

    Boxes (B, 4) (top, left, height, width) in one unit (source pixels, or fractions of a grid);
    flips bool (B,); ``grid`` patches per side (or (gh, gw)) of both views. Returns float64 (B, N, 2),
    N = gh * gw row-major, where integer (r, c) is the centre of reference patch (r, c), so the
    reference's own patches map to the integer grid, and its edges lie at -0.5 and g - 0.5. A flip
    mirrors x inside its view (SiameseIM's ``get_2d_sincos_pos_embed_relative`` geometry).
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    bq, br = box_q.double(), box_ref.double()
    unflipped = torch.zeros_like(flip_q, dtype=torch.bool)
    ys = _axis(gh, bq[:, 0], bq[:, 2], br[:, 0], br[:, 2], unflipped, unflipped)
    xs = _axis(gw, bq[:, 1], bq[:, 3], br[:, 1], br[:, 3], flip_q.bool(), flip_ref.bool())
    b = ys.shape[0]
    return torch.stack([ys[:, :, None].expand(b, gh, gw), xs[:, None, :].expand(b, gh, gw)], -1).reshape(b, -1, 2)


def sincos_at(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding at continuous (y, x): coords (..., 2) -> float32 (..., dim).

    Layout of ``sincos_pos_embed_2d``: [sin(x w), cos(x w), sin(y w), cos(y w)], w_i = 1 / 10000 **
    (i / (dim / 4)), i < dim / 4, computed in float64 the same way, so integer (r, c) gives exactly
    row ``1 + r * g + c`` of ``sincos_pos_embed_2d(dim, g, class_token=True)``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64, device=coords.device) / (half / 2))
    ay = coords[..., 0:1].to(torch.float64) * omega
    ax = coords[..., 1:2].to(torch.float64) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], -1).to(torch.float32)


def ema_momentum_at(step: int, base: float, total: int) -> float:
    """BYOL's cosine schedule: ``base`` at step 0 rising to 1.0 at ``total``; constant ``base`` if total <= 0."""
    if total <= 0:
        return base
    t = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


# -- mixing ---------------------------------------------------------------------------------------


def cutmix_region(batch: int, grid: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample square boxes of patches to paste: region bool (B, grid * grid) row-major, lam float32 (B,).

    Side ``round(grid * sqrt(u))``, u ~ U(0, 1) (CutMix with alpha 1: area ~ uniform), uniform place;
    lam = pasted patches / N exactly (0 and 1 possible). Uses torch's global generator.
    """
    u = torch.rand(batch, 3, device=device)
    side = (grid * u[:, 0].sqrt()).round().long()
    top = (u[:, 1] * (grid - side + 1)).floor().long()
    left = (u[:, 2] * (grid - side + 1)).floor().long()
    r = torch.arange(grid, device=device)
    rows = (r >= top[:, None]) & (r < (top + side)[:, None])
    cols = (r >= left[:, None]) & (r < (left + side)[:, None])
    region = (rows[:, :, None] & cols[:, None, :]).reshape(batch, -1)
    return region, region.float().mean(1)


def soft_labels(labels: torch.Tensor, lam: torch.Tensor, num_classes: int,
                smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-weighted targets of a batch mixed with its roll by one: float32 (B, C) rows summing to 1, valid (B,).

    Sample i is (1 - lam_i) image i + lam_i image i-1. Parts whose label is < 0 are left out and the
    rest renormalised; ``valid`` is False where no labelled part has area. Then label smoothing.
    """
    target = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    for y, weight in ((labels, 1.0 - lam), (labels.roll(1, 0), lam)):
        target += F.one_hot(y.clamp_min(0), num_classes).float() * (weight * (y >= 0))[:, None]
    mass = target.sum(1)
    target = target / mass.clamp_min(1e-12)[:, None]
    return target * (1.0 - smoothing) + smoothing / num_classes, mass > 0


# -- the objective --------------------------------------------------------------------------------


class M3I(Objective):
    """M3I on a token-stem ViT. ``forward(batch) -> (loss, metrics)``.

    Metrics (0-dim, 0 when a term is off): ``loss_intra``, ``loss_inter``, ``loss_cls``, ``cls_acc``
    (top-1 against the larger-area label) and ``ema_momentum`` (the momentum of the next teacher update).
    Modules exist only for the terms with weight > 0 (no unused parameters).
    """

    name = "m3i"
    config_class = M3IConfig
    legacy_names: ClassVar[dict[str, str]] = TOKEN_HEAD_LEGACY_NAMES  # checkpoints from before parts.py

    def __init__(self, cfg: M3IConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        if cfg.w_cls > 0 and data.num_classes < 1:
            raise ValueError("the category term needs labelled data (num_classes >= 1); set objective.w_cls: 0")
        self.cfg = cfg
        self.encoder = token_encoder(vit, data, "M3I", cfg.table_init_std)
        d, dd, g = vit.embed_dim, cfg.decoder_dim, vit.grid_size
        self.mask_token = nn.Parameter(torch.empty(1, 1, d).normal_(std=0.02))
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.register_buffer("ema_next", torch.tensor(ema_momentum_at(0, cfg.ema_momentum, cfg.total_steps)))
        linears: list[nn.Module] = []
        self.has_decoder = cfg.w_intra > 0 or cfg.w_inter > 0
        if self.has_decoder:
            self.decoder_embed = nn.Linear(d, dd)
            self.decoder_blocks = decoder_blocks(dd, cfg.decoder_depth, cfg.decoder_heads, vit.mlp_ratio,
                                                 cfg.decoder_dropout, vit.norm_eps)
            self.decoder_norm = nn.LayerNorm(dd, eps=vit.norm_eps)
            self.register_buffer("decoder_pos", sincos_pos_embed_2d(dd, g, True)[None], persistent=False)
            linears += [self.decoder_embed, self.decoder_blocks]
            if cfg.mix_images:
                self.part_embed = nn.Parameter(torch.empty(2, dd).normal_(std=0.02))
        if cfg.w_intra > 0:
            self.token_head = SubTokenHead(dd, vit.patch_size, vit.token_dim, vit.vocab_size, vit.norm_eps)
            linears.append(self.token_head)
        if cfg.w_inter > 0:
            self.teacher = frozen_copy(self.encoder).eval()
            self.query_token = nn.Parameter(torch.empty(1, 1, dd).normal_(std=0.02))
            self.scale_embed = nn.Linear(dd, dd)
            self.inter_head = nn.Linear(dd, d)
            linears += [self.scale_embed, self.inter_head]
        if cfg.w_cls > 0 and cfg.cls_mode == "ce":
            self.cls_head = nn.Linear(d, data.num_classes)
            linears.append(self.cls_head)
        elif cfg.w_cls > 0:
            self.class_embed = nn.Parameter(torch.empty(data.num_classes, d).normal_(std=0.02))
        xavier_linears(linears)

    def no_weight_decay(self) -> set[str]:
        names = {"mask_token", "part_embed", "query_token", "class_embed"}
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if n in names}

    def train(self, mode: bool = True) -> M3I:
        """As ``nn.Module.train``, but the teacher always stays in eval mode (no drop-path)."""
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update after optimizer step ``step`` (1-based): m = ``ema_momentum_at(step - 1)``."""
        self.ema_next.fill_(ema_momentum_at(step, self.cfg.ema_momentum, self.cfg.total_steps))
        if not hasattr(self, "teacher"):
            return
        m = ema_momentum_at(step - 1, self.cfg.ema_momentum, self.cfg.total_steps)
        student = dict(self.encoder.named_parameters())
        for name, t in self.teacher.named_buffers():
            t.mul_(m).add_(student[name].detach().to(t.dtype), alpha=1.0 - m)

    # -- stages ---------------------------------------------------------------------------------

    def forward_encoder(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As MTM: ids int64 (B, h, w) -> latent (B, 1 + N - n_drop, D), masked bool (B, N), keep_index."""
        return masked_encoder_pass(self.encoder, self.mask_token, self.token_dropout, ids, self.cfg)

    def inter_queries(self, views: Views, lam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder queries for view 2 (float (B, Q, Dd)) and their loss weights float32 (B, Q); Q = N or 2N."""
        g, dd, dtype = self.encoder.cfg.grid_size, self.cfg.decoder_dim, self.query_token.dtype

        def queries(box2, flip2, box1, flip1) -> torch.Tensor:
            pos = sincos_at(relative_positions(box2, box1, flip2, flip1, g), dd)
            scale = sincos_at(10.0 * (box2[:, None, 2:] / box1[:, None, 2:]).log(), dd)  # SiameseIM: 10 log(h, w ratio)
            return self.query_token + pos.to(dtype) + self.scale_embed(scale.to(dtype))

        q = queries(views.box2, views.flip2, views.box1, views.flip1)
        b, n = q.shape[:2]
        if lam is None:
            return q, q.new_ones(b, n, dtype=torch.float32)
        rolled = [t.roll(1, 0) for t in (views.box2, views.flip2, views.box1, views.flip1)]
        q = torch.cat([q + self.part_embed[0], queries(*rolled) + self.part_embed[1]], 1)
        return q, torch.cat([(1.0 - lam)[:, None].expand(b, n), lam[:, None].expand(b, n)], 1)

    def forward_decoder(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor,
                        queries: torch.Tensor | None = None,
                        region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> view-1 slot features (B, N, Dd) and query features (B, Q, Dd) (Q = 0 without queries).

        ``region`` bool (B, N): slots filled by the pasted image (mixing), marked with ``part_embed``.
        """
        n = masked.shape[1]
        z = decoder_slots(self.decoder_embed(latent), masked, keep_index)
        if region is not None:
            z = torch.cat([z[:, :1], z[:, 1:] + self.part_embed[region.long()]], dim=1)
        z = z + self.decoder_pos.to(z.dtype)
        if queries is not None:
            z = torch.cat([z, queries.to(z.dtype)], dim=1)
        z = self.decoder_norm(self.decoder_blocks(z))
        return z[:, 1:1 + n], z[:, 1 + n:]

    def token_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Slot features (B, N, Dd) -> logits (B, h, w, K): the sub-token head tied to the embedding (as MTM)."""
        return self.token_head(z, self.head_table())

    def head_table(self) -> torch.Tensor:
        """The token embedding table (K, E) the head scores against, detached unless ``detach_head`` is off."""
        table = self.encoder.token_embed.word_embeddings.weight
        return table.detach() if self.cfg.detach_head else table

    @torch.no_grad()
    def teacher_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """EMA teacher on the full view: ids int64 (B, h, w) -> float32 (B, N, D), LayerNorm without affine."""
        feats = self.teacher.forward_features(ids)[:, 1:].float()
        return F.layer_norm(feats, feats.shape[-1:], eps=1e-6)

    # -- losses ---------------------------------------------------------------------------------

    def intra_loss(self, slots: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy of ``token_logits(slots)``, mean over each patch's sub-tokens, then over masked
        patches (as MTM), with logits formed only at masked patches (``SubTokenHead.masked_loss``)."""
        return self.token_head.masked_loss(slots, ids, masked, self.head_table(), self.cfg.label_smoothing).loss

    def inter_loss(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``feature_loss`` per query on (B, Q, D), weighted mean with ``weights`` (B, Q)."""
        pred = pred.float()
        if self.cfg.feature_loss == "mse":
            per = (pred - target).pow(2).mean(-1)
        elif self.cfg.feature_loss == "smooth_l1":
            per = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
        else:
            per = 2.0 - 2.0 * F.cosine_similarity(pred, target, dim=-1)
        return (per * weights).sum() / weights.sum().clamp_min(1e-12)

    def class_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) -> float32 logits (B, C): linear ("ce") or cosine / temperature ("contrastive")."""
        if self.cfg.cls_mode == "ce":
            return self.cls_head(pooled).float()
        sim = F.normalize(pooled.float(), dim=-1) @ F.normalize(self.class_embed.float(), dim=-1).t()
        return sim / self.cfg.temperature

    def category_loss(self, pooled: torch.Tensor, labels: torch.Tensor,
                      lam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (hard, or area-weighted soft with mixing) over samples with a label >= 0; top-1 acc."""
        logits = self.class_logits(pooled)
        if lam is None:
            valid, target_class = labels >= 0, labels.clamp_min(0)
            ce = F.cross_entropy(logits, target_class, reduction="none", label_smoothing=self.cfg.cls_smoothing)
        else:
            target, valid = soft_labels(labels, lam, logits.shape[1], self.cfg.cls_smoothing)
            ce = -(target * F.log_softmax(logits, -1)).sum(-1)
            target_class = target.argmax(-1)
        weights = valid.float()
        denom = weights.sum().clamp_min(1.0)
        correct = (logits.detach().argmax(-1) == target_class).float()
        return (ce * weights).sum() / denom, (correct * weights).sum() / denom

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, enc = self.cfg, self.encoder
        views = two_views(batch, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p)
        ids, region, lam = views.ids1, None, None
        if cfg.mix_images:
            g, p = enc.cfg.grid_size, enc.cfg.patch_size
            region, lam = cutmix_region(ids.shape[0], g, ids.device)
            pasted = region.reshape(-1, g, 1, g, 1).expand(-1, g, p, g, p).reshape(ids.shape)
            ids = torch.where(pasted, ids.roll(1, 0), ids)
        latent, masked, keep_index = self.forward_encoder(ids)
        zero = latent.new_zeros((), dtype=torch.float32)
        loss_intra = loss_inter = loss_cls = cls_acc = zero
        if self.has_decoder:
            queries, weights = self.inter_queries(views, lam) if cfg.w_inter > 0 else (None, None)
            slots, out = self.forward_decoder(latent, masked, keep_index, queries, region)
            if cfg.w_intra > 0:
                loss_intra = self.intra_loss(slots, ids, masked)
            if cfg.w_inter > 0:
                target = self.teacher_targets(views.ids2)
                if lam is not None:
                    target = torch.cat([target, target.roll(1, 0)], 1)
                loss_inter = self.inter_loss(self.inter_head(out), target, weights)
        if cfg.w_cls > 0:
            loss_cls, cls_acc = self.category_loss(enc.forward_head(latent, pre_logits=True), batch["label"], lam)
        loss = cfg.w_intra * loss_intra + cfg.w_inter * loss_inter + cfg.w_cls * loss_cls
        metrics = {"loss_intra": loss_intra.detach(), "loss_inter": loss_inter.detach(),
                   "loss_cls": loss_cls.detach(), "cls_acc": cls_acc.detach(), "ema_momentum": self.ema_next.clone()}
        return loss, metrics
