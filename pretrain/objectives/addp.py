"""ADDP: alternating denoising diffusion process (ChangyaoTian/ADDP ``models_addp.py``), from stored tokens.

Two frozen parts and one trained model. The **VQ decoder** (a ``pipeline.tokenizer.vqgan`` tokenizer's,
the one whose tokens the dataset holds; for a k-means tokenizer its centroids painted as patches,
``parts.KMeansPatchDecoder``) turns code vectors, hard or soft, into pixels; the **token
predictor** (an MTM run on the same tokens, ``MTM.predict``; MAGE in the reference) gives token
distributions from partly masked ids. The trained model is a **pixel-stem ViT encoder** (``self.encoder``,
what is exported) plus a token decoder. One step, for ids int64 (B, h, w) (reference function names):

1. ``sample_ratio_pair`` / ``nested_masks`` (``random_masking``): mask ratios r_t < r_t1 from a cosine
   grid weighted by a truncated normal (``compute_mask_ratio_probs``), one pair per step; per sample,
   masks M_t subset of M_t1 over the predictor's *units* (its p x p token patches; MTM masks 2 x 2).
2. ``predictor_outputs`` (``forward_token_predictor``): predictor(ids visible outside M_t1) -> soft
   embeddings (softmax @ codebook, expected code vector); predictor(ids visible outside M_t) -> the target.
3. ``decode_pixels`` (``forward_vqgan``): x_t = VQ-Dec(true codes outside M_t, the M_t1-conditioned soft
   embeddings on M_t); no gradient.
4. ``forward_encoder`` (``generate_mask_mlp_tokens`` + ``forward_online_encoder``): x_t in [-1, 1] ->
   [0, 1], clamp, ImageNet mean/std; patches + positions + cls, LayerNorm + dropout (``tokenizer_norm``,
   ``tokenizer_dropout``; pre-training only, the reference fine-tunes a plain ViT), blocks, norm.
5. ``forward_decoder``: encoder outputs with the cls slot and M_t positions replaced by a mask vector (own
   position table there), followed by embeddings of the reliable ids (outside M_t) with a third position
   table; blocks, norm; an MLM head tied (gradient stopped) to that id embedding gives logits (B, h, w, K).
6. ``forward_loss``: soft-target cross-entropy with label smoothing against the step-2 target, mean over
   the tokens of M_t.

Where each setting comes from (R = reference code, P = ADDP paper / release scripts, ours = our choice):

=======================  =====  =========================================================================
grid_steps 100           R      ``num_iter=100``: ratios cos(pi/2 k/100), k = 0..100, kept in [min, max)
mask_ratio_min 0.5       R, P   grid floor; ``mask_ratio_max`` 1.0 (exclusive, as R)
mask_ratio_mu/std .55/.25 R, P  truncated-normal weights over the grid (pdf at each grid ratio)
max_step_offset 5        R      r_t1 is 1..5 grid steps above r_t (``random.randint(1, 5)``)
r_t1 past the grid top   ours   R clamps to the top grid value (r_t1 may equal r_t); we use mask_ratio_max
                                (1.0), so r_t < r_t1 always. Same counts at R's 256 tokens (both all masked)
one ratio pair per step  R      masks differ per sample; the decoder needs equal reliable counts per row
mask units               ours   the predictor's patches (MTM masks 2 x 2 tokens); R masks single tokens
decoder 768 / 8 / 16     R, P   ``addp_vit_base_patch16``: width = encoder width, ``--decoder_depth 8``
dropout 0.1              R      ``drop_out_rate``: attention and projection dropout, encoder and decoder
input_dropout 0.1        R      ``tokenizer_dropout`` after ``tokenizer_norm``
label_smoothing 0.1      R, P   ``CrossEntropyLoss(label_smoothing=0.1)`` with probability targets
vocabulary K             ours   R scores K + 1001 MAGE labels (targets zero-padded); we score the K codes
sub-token head           ours   an encoder patch covering s x s tokens (s = pixel_patch / VQ factor) predicts
                                all s^2 (as MTM's head); s = 1 is R's one-token MLM head
encoder input            R      ImageNet mean/std of [0, 1] pixels (``normalize_input``)
init                     R      positions, mask vector, id table normal(.02); Linear xavier; LN 1 / 0
no weight decay          ours   mask vector and position tables (as our MTM); R decays them
=======================  =====  =========================================================================

The trainer builds ``vit`` for the data (token stem, ``grid`` = token grid side, ``vocab_size`` = K);
ADDP derives its encoder as ``dataclasses.replace(vit, stem="pixel", grid=<tokenizer resolution>,
patch_size=cfg.pixel_patch)``, so the YAML sets only width/depth/heads/positions. The frozen parts are
submodules (moved and cast with the objective, kept in eval mode, saved in its checkpoints as R does) with
``requires_grad=False``, so the optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.base import Asset, DataSpec, Objective
from pretrain.objectives.parts import (
    TOKEN_HEAD_LEGACY_NAMES,
    SubTokenHead,
    decoder_blocks,
    frozen_decoder,
    normalize_input,
    set_dropout,
    xavier_linears,
)
from pretrain.objectives.registry import load_objective, register_objective
from pretrain.vit import VisionTransformer, ViTConfig

__all__ = ["ADDPConfig", "ADDP", "mask_ratio_grid", "mask_ratio_probs", "sample_ratio_pair", "nested_masks",
           "soft_cross_entropy", "upsample_mask"]


@dataclass(frozen=True)
class ADDPConfig:
    """ADDP settings; defaults are the reference's ViT-B run (see the module table).

    tokenizer: tokenizer checkpoint (``load_tokenizer``) whose tokens the dataset holds: VQGAN, or k-means
        (its centroids are pixel patches, ``parts.KMeansPatchDecoder``).
    predictor: trainer checkpoint directory of an MTM run on the same tokens (``load_objective``).
    pixel_patch: pixels per patch side of the encoder (16 at 256 px); a multiple of the VQ factor.
    """

    tokenizer: str = ""
    predictor: str = ""
    pixel_patch: int = 16
    grid_steps: int = 100
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    max_step_offset: int = 5
    decoder_dim: int = 768
    decoder_depth: int = 8
    decoder_heads: int = 16
    dropout: float = 0.1
    input_dropout: float = 0.1
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio_min < self.mask_ratio_max <= 1.0:
            raise ValueError(f"need 0 <= mask_ratio_min < mask_ratio_max <= 1, got {self.mask_ratio_min}, "
                             f"{self.mask_ratio_max}")
        if self.mask_ratio_std <= 0 or self.grid_steps < 1 or self.max_step_offset < 1 or self.pixel_patch < 1:
            raise ValueError("mask_ratio_std, grid_steps, max_step_offset and pixel_patch must be positive")
        if not mask_ratio_grid(self.grid_steps, self.mask_ratio_min, self.mask_ratio_max).numel():
            raise ValueError(f"no cosine grid ratio lies in [{self.mask_ratio_min}, {self.mask_ratio_max}) "
                             f"with grid_steps={self.grid_steps}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        for name in ("dropout", "input_dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")


# -- pure functions ---------------------------------------------------------------------------------


def mask_ratio_grid(steps: int, ratio_min: float = 0.5, ratio_max: float = 1.0) -> torch.Tensor:
    """float64 (T',) ascending: the ratios cos(pi/2 * k / steps), k = 0..steps, that lie in [min, max).

    R's ``compute_mask_ratio_probs`` grid (there ``num_iter = 100``, min 0.5, max 1.0: 66 ratios from
    cos(0.33 pi) = 0.509 to cos(0.005 pi) = 0.99988). Computed in float64 so ``ceil(n * r)`` is exact.
    """
    ratios = torch.cos(math.pi / 2 * torch.arange(steps + 1, dtype=torch.float64) / steps).clamp(0.0, 1.0)
    return ratios[(ratios >= ratio_min) & (ratios < ratio_max)].flip(0)


def mask_ratio_probs(grid: torch.Tensor, mu: float, std: float) -> torch.Tensor:
    """float64 (T',) probabilities of the grid ratios, proportional to the N(mu, std) pdf (R: truncnorm pdf;
    the truncation constant cancels when normalising)."""
    pdf = torch.exp(-0.5 * ((grid.double() - mu) / std) ** 2)
    return pdf / pdf.sum()


def sample_ratio_pair(grid: torch.Tensor, probs: torch.Tensor, max_offset: int,
                      ratio_max: float = 1.0) -> tuple[float, float]:
    """(r_t, r_t1), r_t < r_t1: r_t = grid[i] with i ~ probs; r_t1 = grid[i + o], o uniform in 1..max_offset,
    or ``ratio_max`` past the grid's top (R clamps to the top grid value). Global RNG (the trainer seeds it)."""
    i = int(torch.multinomial(probs.float(), 1).item())
    j = i + int(torch.randint(1, max_offset + 1, ()).item())
    return float(grid[i]), (float(grid[j]) if j < grid.numel() else float(ratio_max))


def nested_masks(ratio_t: torch.Tensor | float, ratio_t1: torch.Tensor | float, n: int, batch: int | None = None,
                 device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample nested masks over n units: ``(mask_t, mask_t1)``, bool (B, n).

    Row b masks exactly ``ceil(n * ratio_t[b])`` units at t and ``ceil(n * ratio_t1[b])`` at t + 1, the
    units with the smallest noise, so mask_t is a subset of mask_t1 (R's ``random_masking`` cut-offs on one
    noise draw; ranks instead of thresholds, so ties cannot change counts). Ratios: floats or (B,) tensors
    (then ``batch`` may be omitted). ``ratio_t <= ratio_t1`` is required.
    """
    r_t = torch.as_tensor(ratio_t, dtype=torch.float64).reshape(-1)
    r_t1 = torch.as_tensor(ratio_t1, dtype=torch.float64).reshape(-1)
    b = batch if batch is not None else max(r_t.numel(), r_t1.numel())
    r_t, r_t1 = r_t.expand(b), r_t1.expand(b)
    if bool((r_t > r_t1).any()) or bool((r_t < 0).any()) or bool((r_t1 > 1).any()):
        raise ValueError(f"need 0 <= ratio_t <= ratio_t1 <= 1, got {r_t.tolist()} and {r_t1.tolist()}")
    count_t = torch.ceil(n * r_t).long().clamp(0, n).to(device)
    count_t1 = torch.ceil(n * r_t1).long().clamp(0, n).to(device)
    rank = torch.rand(b, n, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    return rank < count_t[:, None], rank < count_t1[:, None]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, smoothing: float = 0.0,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over positions of -sum_k q_k log softmax(logits)_k, q = (1 - eps) p + eps / K.

    logits, target_probs: float (..., K); weights: float/bool (...) or None (plain mean). This is
    ``F.cross_entropy`` with probability targets and ``label_smoothing=eps`` (R's criterion), computed in
    float32; returns a 0-dim tensor (0 when all weights are 0).
    """
    k = logits.shape[-1]
    target = target_probs.float() * (1.0 - smoothing) + smoothing / k
    ce = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    if weights is None:
        return ce.mean()
    w = weights.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1e-12)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """bool (B, g * g) row-major -> bool (B, (g f) * (g f)): each unit becomes an f x f block."""
    b, n = mask.shape
    g = math.isqrt(n)
    grid = mask.reshape(b, g, 1, g, 1).expand(b, g, factor, g, factor)
    return grid.reshape(b, g * factor * g * factor)


# -- the objective ----------------------------------------------------------------------------------


@register_objective
class ADDP(Objective):
    """ADDP pre-training of a pixel-stem ViT. ``forward(batch) -> (loss, metrics)``.

    Metrics: ``soft_ce`` (cross-entropy to the target without smoothing, nats), ``kl`` (soft_ce minus
    the target's entropy), ``acc`` (argmax agreement with the predictor's argmax on M_t), ``mask_ratio_t``,
    ``mask_ratio_t1`` (fractions of masked units). ``tokenizer`` / ``predictor`` may be passed built (tests);
    otherwise they are loaded from ``cfg.tokenizer`` / ``cfg.predictor``.
    """

    name = "addp"
    config_class = ADDPConfig
    legacy_names: ClassVar[dict[str, str]] = TOKEN_HEAD_LEGACY_NAMES  # checkpoints from before parts.py

    def __init__(self, cfg: ADDPConfig, vit: ViTConfig, data: DataSpec, *, tokenizer=None,
                 predictor: nn.Module | None = None):
        super().__init__()
        if tokenizer is None:
            if not cfg.tokenizer:
                raise ValueError("ADDP needs objective.tokenizer: the tokenizer checkpoint of the data")
            from pipeline.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer, data.tokenizer_fingerprint)
        if predictor is None:
            if not cfg.predictor:
                raise ValueError("ADDP needs objective.predictor: a trainer checkpoint directory of an MTM run")
            predictor = load_objective(cfg.predictor)[0]
        self.cfg = cfg
        self.vq = frozen_decoder(tokenizer)
        h, w = self.vq.grid
        k, res = self.vq.codebook.shape[0], self.vq.resolution
        if h != w or (h, w) != tuple(data.grid) or k != data.vocab_size:
            raise ValueError(f"tokenizer grid {self.vq.grid} / vocab {k} do not match the data's grid {data.grid} "
                             f"/ vocab {data.vocab_size} (objective.tokenizer must be the data's tokenizer)")
        pcfg = getattr(getattr(predictor, "encoder", None), "cfg", None)
        if not hasattr(predictor, "predict") or pcfg is None or pcfg.stem != "token":
            raise TypeError(f"ADDP's predictor must be an MTM objective (token stem, predict()), got "
                            f"{type(predictor).__name__}")
        if pcfg.grid != h or pcfg.vocab_size != k:
            raise ValueError(f"predictor grid {pcfg.grid} / vocab {pcfg.vocab_size} do not match the tokenizer's "
                             f"{h} / {k}")
        self.predictor = predictor.requires_grad_(False).eval()
        factor = res // h
        if cfg.pixel_patch % factor or pcfg.patch_size % (cfg.pixel_patch // factor):
            raise ValueError(f"pixel_patch {cfg.pixel_patch} must be s * {factor} (the VQ factor) with s dividing the "
                             f"predictor's patch {pcfg.patch_size}, so encoder patches nest in mask units")
        enc_cfg = dataclasses.replace(vit, stem="pixel", grid=res, patch_size=cfg.pixel_patch, in_chans=3)
        if not enc_cfg.class_token:
            raise ValueError("ADDP needs a ViT with a class token (model.class_token: true)")
        self.unit = pcfg.patch_size  # tokens per mask-unit side
        self.sub = cfg.pixel_patch // factor  # tokens per encoder-patch side
        self.encoder = VisionTransformer(enc_cfg)
        set_dropout(self.encoder.blocks, cfg.dropout)
        # Plain float64 CPU tensors, not buffers: a bf16/fp16 engine casts buffers, which would move the ratios.
        self.ratio_grid = mask_ratio_grid(cfg.grid_steps, cfg.mask_ratio_min, cfg.mask_ratio_max)
        self.ratio_probs = mask_ratio_probs(self.ratio_grid, cfg.mask_ratio_mu, cfg.mask_ratio_std)
        d, dd, n_enc = enc_cfg.embed_dim, cfg.decoder_dim, enc_cfg.num_patches
        self.input_norm = nn.LayerNorm(d, eps=enc_cfg.norm_eps)
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.empty(1, 1, dd).normal_(std=0.02))
        self.decoder_pos_embed = nn.Parameter(torch.empty(1, n_enc + 1, dd).normal_(std=0.02))
        self.decoder_pos_mask_embed = nn.Parameter(torch.empty(1, n_enc + 1, dd).normal_(std=0.02))
        self.decoder_pos_token_embed = nn.Parameter(torch.empty(1, h * w, dd).normal_(std=0.02))
        self.token_embed = nn.Embedding(k, dd)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.decoder_blocks = decoder_blocks(dd, cfg.decoder_depth, cfg.decoder_heads, enc_cfg.mlp_ratio,
                                             cfg.dropout, enc_cfg.norm_eps)
        self.decoder_norm = nn.LayerNorm(dd, eps=enc_cfg.norm_eps)
        self.token_head = SubTokenHead(dd, self.sub, dd, k, enc_cfg.norm_eps)
        xavier_linears([self.decoder_embed, self.token_head, self.decoder_blocks])

    @classmethod
    def assets(cls, cfg: ADDPConfig) -> tuple[Asset, ...]:
        """The MTM predictor (a checkpoint of the data's tokens) and the data's tokenizer; both rebuild it."""
        return tuple(a for a in (Asset("predictor", cfg.predictor, "checkpoint", "the ADDP predictor"),
                                 Asset("tokenizer", cfg.tokenizer, "tokenizer", "the ADDP tokenizer")) if a.url)

    def train(self, mode: bool = True) -> ADDP:
        """Train/eval the trained parts; the frozen predictor and VQ decoder always stay in eval mode."""
        super().train(mode)
        self.predictor.eval()
        self.vq.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed", "decoder_pos_mask_embed",
                                            "decoder_pos_token_embed"}

    @property
    def num_units(self) -> int:
        """Mask units per sample: (h / p) ** 2 for the predictor's patch p."""
        return (self.vq.grid[0] // self.unit) ** 2

    def unit_to_token(self, mask: torch.Tensor) -> torch.Tensor:
        """bool (B, units) -> bool (B, h, w)."""
        return upsample_mask(mask, self.unit).reshape(mask.shape[0], *self.vq.grid)

    # -- stages ---------------------------------------------------------------------------------

    def sample_masks(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One (r_t, r_t1) pair for the step, per-sample nested unit masks bool (B, units) each."""
        r_t, r_t1 = sample_ratio_pair(self.ratio_grid, self.ratio_probs, self.cfg.max_step_offset,
                                      self.cfg.mask_ratio_max)
        return nested_masks(r_t, r_t1, self.num_units, batch=batch, device=device)

    @torch.no_grad()
    def predictor_outputs(self, ids: torch.Tensor, mask_t: torch.Tensor,
                          mask_t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs given ids outside M_t1, probs given ids outside M_t), float32 (B, h, w, K) each; one batched call."""
        logits = self.predictor.predict(torch.cat([ids, ids]), torch.cat([mask_t1, mask_t]))
        probs = logits.float().softmax(-1)
        return probs[: ids.shape[0]], probs[ids.shape[0]:]

    @torch.no_grad()
    def decode_pixels(self, ids: torch.Tensor, probs: torch.Tensor, unreliable: torch.Tensor) -> torch.Tensor:
        """x = VQ-Dec(codebook[ids] where reliable, probs @ codebook where ``unreliable`` bool (B, h, w)).
        -> float (B, 3, R, R) about [-1, 1]."""
        z = torch.where(unreliable.unsqueeze(-1), self.vq.soft(probs), self.vq.embed(ids))
        return self.vq(z)

    def forward_encoder(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, 3, R, R) in [-1, 1] -> latent (B, 1 + N_enc, D)."""
        enc = self.encoder
        x = normalize_input(images).to(enc.pos_embed.dtype)
        x = enc.patchify(x) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.input_dropout(self.input_norm(torch.cat([cls, x], dim=1)))
        return enc.norm(enc.blocks(x))

    def forward_decoder(self, latent: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + N_enc, D), ids int64 (B, h, w), mask bool (B, units) (unreliable) -> logits (B, h, w, K).

        Every row must mask the same number of units (the reliable ids are appended to the sequence)."""
        b, h = ids.shape[0], self.vq.grid[0]
        enc_mask = upsample_mask(mask, self.unit // self.sub)
        full = torch.cat([enc_mask.new_ones(b, 1), enc_mask], dim=1)  # the cls slot carries the mask vector too
        y = self.decoder_embed(latent)
        y = torch.where(full.unsqueeze(-1), self.mask_token.to(y.dtype), y)
        pos = torch.where(torch.cat([enc_mask.new_zeros(b, 1), enc_mask], dim=1).unsqueeze(-1),
                          self.decoder_pos_mask_embed, self.decoder_pos_embed)
        y = y + pos.to(y.dtype)
        reliable = ~upsample_mask(mask, self.unit)
        counts = reliable.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"every sample must have the same number of reliable tokens, got {counts.tolist()}")
        index = reliable.nonzero()[:, 1].reshape(b, -1)  # row-major positions of the reliable tokens
        tokens = self.token_embed(ids.reshape(b, -1)) + self.decoder_pos_token_embed
        tokens = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        z = self.decoder_norm(self.decoder_blocks(torch.cat([y, tokens.to(y.dtype)], dim=1)))
        g = h // self.sub
        return self.token_head(z[:, 1:1 + g * g], self.token_embed.weight.detach())

    def forward_loss(self, logits: torch.Tensor, target: torch.Tensor,
                     mask_t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Smoothed soft-target CE on the tokens of M_t (``mask_t`` bool (B, units)), and metrics."""
        weights = self.unit_to_token(mask_t)
        loss = soft_cross_entropy(logits, target, self.cfg.label_smoothing, weights)
        with torch.no_grad():
            w = weights.float()
            denom = w.sum().clamp_min(1.0)
            plain = soft_cross_entropy(logits, target, 0.0, weights)
            entropy = (-(target * target.clamp_min(1e-30).log()).sum(-1) * w).sum() / denom
            agree = (logits.argmax(-1) == target.argmax(-1)).float()
            metrics = {"soft_ce": plain, "kl": plain - entropy, "acc": (agree * w).sum() / denom}
        return loss, metrics

    @torch.no_grad()
    def predict_tokens(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inference (R's ``predict_token_from_pixel``): logits (B, h, w, K) from pixels and the reliable ids
        (outside ``mask`` bool (B, units)); use under ``eval()``."""
        return self.forward_decoder(self.forward_encoder(images), ids, mask)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w) -> uint8 (B, R, R, 3) images through the frozen VQ decoder (as ``decode``)."""
        x = self.vq(self.vq.embed(ids)).float().clamp(-1.0, 1.0)
        return x.add(1.0).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["tokens"]
        mask_t, mask_t1 = self.sample_masks(ids.shape[0], ids.device)
        probs_t1, target = self.predictor_outputs(ids, mask_t, mask_t1)
        images = self.decode_pixels(ids, probs_t1, self.unit_to_token(mask_t))
        logits = self.forward_decoder(self.forward_encoder(images), ids, mask_t)
        loss, metrics = self.forward_loss(logits, target, mask_t)
        metrics["mask_ratio_t"] = mask_t.float().mean()
        metrics["mask_ratio_t1"] = mask_t1.float().mean()
        return loss, metrics

