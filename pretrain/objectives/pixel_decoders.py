"""Frozen pixel decoders of a tokenizer: code vectors (hard or soft) -> images, for objectives that see pixels.

ADDP decodes partly predicted tokens to pixels for its pixel-stem encoder, and classification with
``decoder`` fine-tunes such an encoder on stored tokens decoded on the fly. ``frozen_decoder`` picks the
decoder of a tokenizer (``FrozenVQDecoder``: a VQGAN's ``post_quant_conv`` + decoder; ``KMeansPatchDecoder``:
k-means centroids painted as patches); ``normalize_input`` turns decoded images into the encoder's input.
``pixel_decoder_for`` loads the data's decoder with the ViTConfig of a pixel-stem encoder reading its output,
and ``decoded_input`` is that encoder's input from ids: the one decoding path of ``classify`` and ``segment``.
Every decoder is a copy, frozen (``requires_grad=False``, eval mode), with the same interface: ``embed(ids)``,
``soft(probs)``, ``forward(z)``, ``codebook``, ``resolution``, ``grid``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.vit import ViTConfig

__all__ = ["FrozenVQDecoder", "KMeansPatchDecoder", "frozen_decoder", "load_frozen_decoder", "normalize_input",
           "pixel_decoder_for", "decoded_input"]

_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (the encoders' pixel input)
_STD = (0.229, 0.224, 0.225)


class FrozenVQDecoder(nn.Module):
    """The decoding half of a VQGAN tokenizer, frozen: ``post_quant_conv`` -> ``decoder`` (exactly
    ``VQModel.decode_codes``, on copies) and the codebook as a buffer ``codebook`` float (K, D). No VQ encoder."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        model = getattr(tokenizer, "model", None)
        if not all(hasattr(model, a) for a in ("decode_codes", "post_quant_conv", "decoder")):
            raise TypeError(f"a frozen pixel decoder needs a VQGAN tokenizer whose decoder accepts soft code "
                            f"embeddings (pipeline.tokenizer.vqgan); got {type(tokenizer).__name__} "
                            f"(kind {getattr(tokenizer, 'kind', '?')!r})")
        self.post_quant_conv = copy.deepcopy(model.post_quant_conv)  # copies: casting/moving the objective
        self.decoder = copy.deepcopy(model.decoder)  # leaves the tokenizer as it was
        self.register_buffer("codebook", tokenizer.codebook.clone())
        self.resolution = int(tokenizer.resolution)
        self.grid = tuple(int(s) for s in tokenizer.grid)
        self.requires_grad_(False)
        self.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w) -> code vectors float (B, h, w, D)."""
        return F.embedding(ids, self.codebook)

    def soft(self, probs: torch.Tensor) -> torch.Tensor:
        """probs float (B, h, w, K) -> expected code vectors float (B, h, w, D) (``softmax @ codebook``)."""
        return probs.to(self.codebook.dtype) @ self.codebook

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z float (B, h, w, D) -> images float (B, 3, R, R), about [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z.permute(0, 3, 1, 2).to(self.codebook.dtype)))


class KMeansPatchDecoder(nn.Module):
    """The k-means tokenizer's decoder (``pipeline.tokenizer.kmeans``), frozen: a code is its centroid,
    a p x p RGB patch in [0, 1], so a soft code paints the expected patch. ``FrozenVQDecoder``'s interface."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.register_buffer("codebook", tokenizer.codebook.clone())  # float (K, p * p * 3), (row, col, channel)
        self.patch = int(tokenizer.config.patch)
        self.resolution = int(tokenizer.resolution)
        self.grid = tuple(int(s) for s in tokenizer.grid)
        self.requires_grad_(False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w) -> code vectors float (B, h, w, D)."""
        return F.embedding(ids, self.codebook)

    def soft(self, probs: torch.Tensor) -> torch.Tensor:
        """probs float (B, h, w, K) -> expected code vectors float (B, h, w, D)."""
        return probs.to(self.codebook.dtype) @ self.codebook

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z float (B, h, w, p * p * 3) -> images float (B, 3, h p, w p) in [-1, 1]."""
        b, h, w, _ = z.shape
        p = self.patch
        x = z.reshape(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * p, w * p)
        return x * 2.0 - 1.0


def frozen_decoder(tokenizer) -> nn.Module:
    """The frozen pixel decoder of a tokenizer: ``FrozenVQDecoder`` (VQGAN) or ``KMeansPatchDecoder``."""
    if getattr(tokenizer, "kind", None) == "kmeans" or type(tokenizer).__name__ == "KMeansTokenizer":
        return KMeansPatchDecoder(tokenizer)
    return FrozenVQDecoder(tokenizer)


def load_frozen_decoder(url: str, fingerprint: str | None = None) -> nn.Module:
    """``frozen_decoder`` of the tokenizer checkpoint at ``url`` (``pipeline.tokenizer.load_tokenizer``: any
    ``storage.io`` URL, weights only, refused when its fingerprint is not ``fingerprint``; None: unchecked)."""
    from pipeline.tokenizer import load_tokenizer

    return frozen_decoder(load_tokenizer(url, fingerprint))


def normalize_input(images: torch.Tensor) -> torch.Tensor:
    """Decoded images float (B, 3, R, R) about [-1, 1] -> the encoder's input: [0, 1], clamped, ImageNet mean/std."""
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x - x.new_tensor(_MEAN).view(1, 3, 1, 1)) / x.new_tensor(_STD).view(1, 3, 1, 1)


def pixel_decoder_for(url: str, vit: ViTConfig, data, pixel_patch: int, who: str) -> tuple[nn.Module, ViTConfig]:
    """A pixel-stem backbone on tokens: the frozen decoder of the tokenizer at ``url`` (``load_frozen_decoder``,
    refused unless its fingerprint is ``data.tokenizer_fingerprint``) and the ViTConfig that reads its output:
    ``vit`` with stem pixel, grid = the tokenizer's resolution, patch ``pixel_patch`` px. ``who`` names the
    config section in errors (a decoder whose grid is not the data's ``data.grid``)."""
    vq = load_frozen_decoder(url, data.tokenizer_fingerprint)
    if vq.grid != tuple(data.grid):
        raise ValueError(f"{who}.decoder {url}: grid {vq.grid} is not the data's {tuple(data.grid)}")
    if vq.resolution % pixel_patch:
        raise ValueError(f"{who}.pixel_patch {pixel_patch} does not divide the decoded images' {vq.resolution} px")
    return vq, dataclasses.replace(vit, stem="pixel", grid=vq.resolution, patch_size=pixel_patch, in_chans=3)


@torch.no_grad()
def decoded_input(vq: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ids int64 (B, h, w) -> a pixel-stem encoder's input float (B, 3, h f, w f) in ``dtype``: the codes decoded
    by the frozen ``vq`` (f px per token), then ``normalize_input``. No gradient reaches ``vq``. ADDP's
    backbone is fine-tuned on exactly this, for classification and segmentation alike."""
    return normalize_input(vq(vq.embed(ids))).to(dtype)
