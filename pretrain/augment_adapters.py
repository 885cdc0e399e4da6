"""The learned token adapters in the augmentation: TokenAdapt for geometry, ColorAdapt for colour.

``TokenAugment`` calls these when ``augment.tokenadapt`` / ``augment.coloradapt`` name checkpoints
(``pipeline.adapters``). Both act on ids (int64 (B, h, w)) and return ids of the same grid; the
models run batched on the ids' device (the rank's GPU in the training step), under ``no_grad``.
Randomness is drawn on the CPU from the caller's generator, so a seed gives the same augmentation
on any device and a resumed run repeats a straight one (``BatchSeededAugment``).

Geometry (``AdapterOps.geometry``). Per sample: a flip (``hflip_p``), a random resized crop box
(``rrc_scale``, ``rrc_ratio``) and, with probability ``affine_p``, a rotation / shift / shear drawn in
the ranges the TokenAdapt was trained on (``pipeline.adapters.tokenadapt.sample_affine``). As one
affine map ``theta`` (output -> input, normalised, ``align_corners=False``):

    theta = Flip @ Box @ Affine        (Flip mirrors the input grid, Box maps the output onto the crop)

which is the naive path's "flip the ids, then crop the box" plus the affine part. A ``tokenadapt_p``
share of the samples goes through ``TokenAdapt.adapt(ids, theta)``; the others take the recipe's
naive path with the same flip and box: an exact nearest-cell crop of ids (``interpolation: nearest``)
or a bicubic / bilinear resample of the embedding map re-quantised to the nearest code. At the
identity (no flip, the whole grid, no affine) TokenAdapt returns its input exactly (its correction is
gated by the warp's distance from the identity), as does the naive path.

Colour (``AdapterOps.colour``). A ``color_adapt_p`` share of the samples gets colour-jitter parameters
(brightness, contrast, saturation, hue in the ranges the ColorAdapt was trained on) and
``LearnedColorAdapt.adapt(ids, params)``; the rest keep their ids. Colour jitter is a per-pixel map
(contrast uses the image mean) and commutes with the geometric ops in pixels, so it runs after them,
on ids, before any embedding-space op.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.adapters.coloradapt import sample_jitter
from pipeline.adapters.tokenadapt import identity_theta, sample_affine
from pipeline.tokenizer.codebook import embed, requantize
from pretrain.augment_geometry import box_theta, crop_ids, crop_resize, random_resized_crop_params

__all__ = ["AdapterOps", "geometry_theta"]


def _square(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine -> (B, 3, 3) homogeneous, float64."""
    out = torch.zeros(theta.shape[0], 3, 3, dtype=torch.float64)
    out[:, :2] = theta.double()
    out[:, 2, 2] = 1.0
    return out


def geometry_theta(boxes: torch.Tensor, flips: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Output -> input affine maps float32 (B, 2, 3) of "flip the grid (``flips`` bool (B,)), cut the box
    (``boxes`` (B, 4) normalised x0, y0, x1, y1), then ``extra`` (B, 2, 3) in the output frame"."""
    b = boxes.shape[0]
    flip = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    flip[:, 0, 0] = torch.where(flips.cpu(), -1.0, 1.0).double()
    m = flip @ _square(box_theta(boxes.cpu()))
    if extra is not None:
        m = m @ _square(extra.cpu())
    return m[:, :2].to(torch.float32)


class AdapterOps:
    """The loaded TokenAdapt / LearnedColorAdapt (either may be None), in eval mode, and their ops."""

    def __init__(self, tokenadapt: torch.nn.Module | None = None, coloradapt: torch.nn.Module | None = None):
        self.tokenadapt = None if tokenadapt is None else tokenadapt.eval()
        self.coloradapt = None if coloradapt is None else coloradapt.eval()
        self._affine_cfg = None
        if tokenadapt is not None:  # the model's own rotation / shift / shear ranges, no crop, no flip
            self._affine_cfg = dataclasses.replace(tokenadapt.cfg, flip_p=0.0, scale_range=(1.0, 1.0),
                                                   ratio_range=(1.0, 1.0))

    def to(self, device: torch.device | str) -> AdapterOps:
        for model in (self.tokenadapt, self.coloradapt):
            if model is not None:
                model.to(device)
        return self

    @torch.no_grad()
    def geometry(self, ids: torch.Tensor, cfg, codebook: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Flip + random resized crop (+ affine) of ids int64 (B, h, w) -> int64 (B, h, w); ``cfg`` a
        ``TokenAugConfig`` (hflip_p, rrc, rrc_scale, rrc_ratio, tokenadapt_p, affine_p, interpolation)."""
        b, hw = ids.shape[0], tuple(ids.shape[-2:])
        flips = torch.rand(b, generator=gen) < cfg.hflip_p
        boxes = (random_resized_crop_params(b, cfg.rrc_scale, cfg.rrc_ratio, gen, hw) if cfg.rrc
                 else torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1))
        learned = torch.rand(b, generator=gen) < cfg.tokenadapt_p
        extra = None
        if cfg.affine_p > 0:
            warps = sample_affine(b, self._affine_cfg, gen)
            on = torch.rand(b, generator=gen) < cfg.affine_p
            extra = torch.where(on[:, None, None], warps, identity_theta(b))
        out = ids.clone()
        naive = (~learned).nonzero().squeeze(1)
        if len(naive):
            sel = naive.to(ids.device)
            out[sel] = self._naive(ids[sel], boxes[naive], flips[naive], cfg, codebook)
        chosen = learned.nonzero().squeeze(1)
        if len(chosen):
            theta = geometry_theta(boxes[chosen], flips[chosen], None if extra is None else extra[chosen])
            sel = chosen.to(ids.device)
            out[sel] = self.tokenadapt.adapt(ids[sel], theta.to(ids.device))
        return out

    @staticmethod
    def _naive(ids: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, cfg,
               codebook: torch.Tensor) -> torch.Tensor:
        """The recipe's own path with the same flip and box: nearest on ids, else resample + nearest code."""
        ids = torch.where(flips.to(ids.device)[:, None, None], ids.flip(-1), ids)
        if cfg.interpolation == "nearest":
            return crop_ids(ids, boxes)
        emb = crop_resize(embed(ids, codebook), boxes, tuple(ids.shape[-2:]), cfg.interpolation)
        return requantize(emb, codebook, cfg.metric)

    @torch.no_grad()
    def colour(self, ids: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        """Learned colour jitter on a ``p`` share of the samples: int64 (B, h, w) -> int64 (B, h, w)."""
        b = ids.shape[0]
        on = torch.rand(b, generator=gen) < p
        params = sample_jitter(b, gen, *self.coloradapt.cfg.ranges())
        chosen = on.nonzero().squeeze(1)
        if not len(chosen):
            return ids
        out = ids.clone()
        sel = chosen.to(ids.device)
        out[sel] = self.coloradapt.adapt(ids[sel], params[chosen].to(ids.device))
        return out
