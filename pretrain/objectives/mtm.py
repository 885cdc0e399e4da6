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
5. The head (``parts.SubTokenHead``) maps each patch to 2 x 2 sub-token vectors (Linear -> GELU ->
   LayerNorm, width 32) and scores them against the token embedding table (tied, gradient stopped,
   as SeiT++ does) plus a bias: logits (B, h, w, K).
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.objectives.base import DataSpec
from pretrain.objectives.parts import (
    MaskedTokenConfig,
    MaskedTokenObjective,
    masked_token_ce,
    patch_mean,
    xavier_linears,
)
from pretrain.objectives.registry import register_objective
from pretrain.vit import ViTConfig

__all__ = ["MTMConfig", "MTM"]


@dataclass(frozen=True)
class MTMConfig(MaskedTokenConfig):
    """MTM settings; defaults are SeiT++'s (see the module table). The masking ratio's floor must be > 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_ratio_min <= 0:
            raise ValueError(f"objective.mask_ratio_min must be > 0, got {self.mask_ratio_min}")


@register_objective
class MTM(MaskedTokenObjective):
    """Masked token modelling (SeiT++) on a token-stem ViT: the masked-token stack (``parts.MaskedTokenObjective``)
    with learned decoder positions. ``forward(batch) -> (loss, metrics)``.

    Metrics: ``masked_ce`` (plain cross-entropy in nats on masked tokens, comparable with the
    unigram entropy whatever the smoothing), ``masked_acc`` (top-1 on masked tokens), ``mask_ratio``.
    """

    name = "mtm"
    config_class = MTMConfig

    def __init__(self, cfg: MTMConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.build_encoder(vit, data, "MTM")
        embed, blocks = self.build_decoder(vit, positions="learned")
        xavier_linears([embed, self.build_token_head(vit), blocks])

    # -- stages (the rest are the stack's: forward_encoder, decode, token_logits, masked_loss, predict) ---------

    def decoder_features(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """-> decoder output float (B, N, Dd) at every patch (the head's input)."""
        return self.decode(latent, masked, keep_index)[0]

    def forward_decoder(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """-> logits float (B, h, w, K) for every token position (inference; training uses ``masked_loss``)."""
        return self.token_logits(self.decoder_features(latent, masked, keep_index))

    def forward_loss(self, logits: torch.Tensor, ids: torch.Tensor,
                     masked: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """From full logits (B, h, w, K): cross-entropy per token, mean over each patch's sub-tokens, mean
        over masked patches; the reference for ``masked_loss`` (which training uses)."""
        p = self.encoder.cfg.patch_size
        loss, ce = masked_token_ce(logits, ids, masked, p, self.cfg.label_smoothing)
        with torch.no_grad():
            flat = logits.float().reshape(-1, logits.shape[-1])
            plain = F.cross_entropy(flat, ids.reshape(-1), reduction="none") if self.cfg.label_smoothing else ce
            correct = (flat.argmax(-1) == ids.reshape(-1)).float()
            weights = masked.float()
            denom = weights.sum().clamp_min(1.0)
            metrics = {
                "masked_ce": (patch_mean(plain.reshape(ids.shape), p) * weights).sum() / denom,
                "masked_acc": (patch_mean(correct.reshape(ids.shape), p) * weights).sum() / denom,
                "mask_ratio": weights.mean(),
            }
        return loss, metrics

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["tokens"]
        latent, masked, keep_index = self.forward_encoder(ids)
        return self.masked_loss(self.decoder_features(latent, masked, keep_index), ids, masked)
