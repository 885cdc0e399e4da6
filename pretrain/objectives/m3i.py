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

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.base import DataSpec
from pretrain.objectives.parts import (
    EMATeacher,
    MaskedTokenConfig,
    MaskedTokenObjective,
    ema_momentum_at,
    xavier_linears,
)
from pretrain.objectives.registry import register_objective
from pretrain.objectives.views import (
    Views,
    cutmix_region,
    relative_positions,
    sincos_at,
    soft_labels,
    two_views,
)
from pretrain.vit import ViTConfig

# The geometry, mixing and EMA pieces live in views.py and parts.py (other objectives use them); they
# stay importable from here.
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


# -- the objective --------------------------------------------------------------------------------


@register_objective
class M3I(MaskedTokenObjective):
    """M3I on a token-stem ViT: the masked-token stack (``parts.MaskedTokenObjective``, fixed sin-cos decoder
    positions) plus inter-view queries, an EMA teacher and a category head. ``forward(batch) -> (loss, metrics)``.

    Metrics (0-dim, 0 when a term is off): ``loss_intra``, ``loss_inter``, ``loss_cls``, ``cls_acc``
    (top-1 against the larger-area label) and ``ema_momentum`` (the momentum of the next teacher update).
    Modules exist only for the terms with weight > 0 (no unused parameters).
    """

    name = "m3i"
    config_class = M3IConfig
    legacy_names: ClassVar[dict[str, str]] = {**MaskedTokenObjective.legacy_names,
                                              "teacher.": "teacher.module."}  # from before EMATeacher

    def __init__(self, cfg: M3IConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        if cfg.w_cls > 0 and data.num_classes < 1:
            raise ValueError("the category term needs labelled data (num_classes >= 1); set objective.w_cls: 0")
        self.cfg = cfg
        self.build_encoder(vit, data, "M3I")
        d, dd = vit.embed_dim, cfg.decoder_dim
        self.register_buffer("ema_next", torch.tensor(ema_momentum_at(0, cfg.ema_momentum, cfg.total_steps)))
        linears: list[nn.Module] = []
        self.has_decoder = cfg.w_intra > 0 or cfg.w_inter > 0
        if self.has_decoder:
            linears += self.build_decoder(vit, positions="sincos")
            if cfg.mix_images:
                self.part_embed = nn.Parameter(torch.empty(2, dd).normal_(std=0.02))
        if cfg.w_intra > 0:
            linears.append(self.build_token_head(vit))
        if cfg.w_inter > 0:
            self.teacher = EMATeacher(self.encoder)
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
        names = {"part_embed", "query_token", "class_embed"}
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if n in names}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update after optimizer step ``step`` (1-based): m = ``ema_momentum_at(step - 1)``."""
        self.ema_next.fill_(ema_momentum_at(step, self.cfg.ema_momentum, self.cfg.total_steps))
        if hasattr(self, "teacher"):
            self.teacher.update(self.encoder, ema_momentum_at(step - 1, self.cfg.ema_momentum, self.cfg.total_steps))

    # -- stages (forward_encoder, decode, head_table, token_logits, token_loss: the stack's) -------------

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
        slot_embed = None if region is None else self.part_embed[region.long()]
        return self.decode(latent, masked, keep_index, slot_embed, queries)

    @torch.no_grad()
    def teacher_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """EMA teacher on the full view: ids int64 (B, h, w) -> float32 (B, N, D), LayerNorm without affine."""
        feats = self.teacher.module.forward_features(ids)[:, 1:].float()
        return F.layer_norm(feats, feats.shape[-1:], eps=1e-6)

    # -- losses ---------------------------------------------------------------------------------

    def intra_loss(self, slots: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy of ``token_logits(slots)``, mean over each patch's sub-tokens, then over masked
        patches (as MTM), with logits formed only at masked patches (``SubTokenHead.masked_loss``)."""
        return self.token_loss(slots, ids, masked).loss

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
