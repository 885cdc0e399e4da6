"""Image classification from tokens (or pixels): the fine-tuning (and linear-probe) objective.

A ViT (``self.encoder``) with a linear head over ``data.num_classes`` classes, trained
with cross-entropy (label smoothing; soft ``target`` rows when Token-CutMix/Mixup produced them).
``init`` loads a pre-trained backbone: a ``backbone.pt`` file (``pretrain.checkpoint.save_backbone``) or
a trainer checkpoints directory of any objective (MTM, M3I; ADDP's pixel-stem encoder with ``decoder``); the head and
any size-mismatched tensors start fresh, and what was not loaded is printed. ``linear_probe``
freezes everything but the head.

Settings and origins (MAE / DeiT fine-tuning recipes; ours where noted):

================== ========  =================================================================
label_smoothing 0.1 DeiT, MAE
global_pool avg     MAE      mean of patch tokens then ``fc_norm`` (SeiT fine-tunes with avg too)
head_init_std 2e-5  MAE      ``trunc_normal_(head.weight, std=2e-5)``
layer decay         MAE      ``optim.layer_decay`` (0.75 for ViT-B in MAE; 1.0 = off)
linear probe        ours     frozen encoder, plain linear head (MAE adds a BatchNorm)
decoder             ADDP     a pixel-stem backbone fine-tuned on pixels decoded from the stored tokens
================== ========  =================================================================

Inputs: token ids (token stem, the default), ``pixels`` from an image folder (``data.input: pixels``,
``model.stem: pixel``), or with ``decoder`` the tokens decoded to pixels by the frozen tokenizer
decoder (``pixel_decoders.pixel_decoder_for`` / ``decoded_input``: the data's tokenizer, fingerprint checked;
the same path as ``segment``'s) for a pixel-stem encoder of ``pixel_patch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.base import Asset, DataNeeds, DataSpec, Objective, fine_tune_assets
from pretrain.objectives.parts import decoded_input, init_backbone, pixel_decoder_for
from pretrain.objectives.registry import register_objective
from pretrain.vit import VisionTransformer, ViTConfig

__all__ = ["ClassifyConfig", "Classify"]


@dataclass(frozen=True)
class ClassifyConfig:
    init: str = ""  # backbone.pt or a trainer checkpoints dir; "" = from scratch
    label_smoothing: float = 0.1
    global_pool: str = "avg"
    head_init_std: float = 2e-5
    linear_probe: bool = False
    decoder: str = ""  # tokenizer checkpoint: fine-tune a pixel-stem encoder on pixels decoded from the tokens
    pixel_patch: int = 16  # px per patch side of that pixel-stem encoder

    def __post_init__(self) -> None:
        if self.global_pool not in ("avg", "token"):
            raise ValueError(f"objective.global_pool must be 'avg' or 'token', got {self.global_pool!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"objective.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.head_init_std < 0 or self.pixel_patch < 1:
            raise ValueError(f"objective.head_init_std must be >= 0 and objective.pixel_patch >= 1, got "
                             f"{self.head_init_std}, {self.pixel_patch}")


@register_objective
class Classify(Objective):
    """``forward(batch) -> (loss, {"acc", "loss_ce"})``; ``batch["tokens"]`` int64 (B, h, w), ``label`` (B,)
    (labels < 0 are left out), optional ``target`` float (B, C) soft labels (CutMix / Mixup)."""

    name = "classify"
    config_class = ClassifyConfig
    needs = DataNeeds(labels=True)

    def __init__(self, cfg: ClassifyConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        if data.num_classes < 1:
            raise ValueError("classification needs class names in the manifest (data.num_classes is 0)")
        self.cfg = cfg
        self.vq = None
        if cfg.decoder:  # e.g. an ADDP backbone: tokens are stored, the encoder sees their decoded pixels
            self.vq, vit = pixel_decoder_for(cfg.decoder, vit, data, cfg.pixel_patch, "objective")
        self.encoder = VisionTransformer(dataclasses.replace(vit, num_classes=data.num_classes,
                                                             global_pool=cfg.global_pool))
        init_backbone(self.encoder, cfg.init)
        nn.init.trunc_normal_(self.encoder.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.encoder.head.bias)
        if cfg.linear_probe:
            for name, p in self.encoder.named_parameters():
                p.requires_grad_(name.startswith("head."))

    @classmethod
    def assets(cls, cfg: ClassifyConfig) -> tuple[Asset, ...]:
        """``init`` and ``decoder`` (``base.fine_tune_assets``)."""
        return fine_tune_assets(cfg.init, cfg.decoder)

    def train(self, mode: bool = True) -> Classify:
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()
        return self

    def inputs(self, batch: dict) -> torch.Tensor:
        """The encoder's input: decoded ``tokens`` (with ``decoder``), ``pixels`` (pixel stem), else ``tokens``."""
        if self.vq is not None:
            return decoded_input(self.vq, batch["tokens"], self.encoder.pos_embed.dtype)
        if self.encoder.cfg.stem == "pixel":
            if "pixels" not in batch:
                raise ValueError("a pixel-stem classifier needs batch['pixels'] (data.input: pixels) or "
                                 "objective.decoder to decode the tokens")
            return batch["pixels"].to(self.encoder.pos_embed.dtype)
        return batch["tokens"]

    def logits(self, batch: dict) -> torch.Tensor:
        """float (B, num_classes)."""
        return self.encoder(self.inputs(batch)).float()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["label"]
        logits = self.logits(batch)
        keep = labels >= 0
        if "target" in batch:
            target = batch["target"].float()[keep]
            loss = -(target * F.log_softmax(logits[keep], -1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits[keep], labels[keep], label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            acc = (logits[keep].argmax(-1) == labels[keep]).float().mean()
        return loss, {"acc": acc}
