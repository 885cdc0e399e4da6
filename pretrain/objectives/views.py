"""Two views of an image and where one's patches lie in the other; mixing two images by a patch box.

For objectives that relate views or mix images (M3I's inter-view and category terms; a SiameseIM- or
iBOT-style objective would use the same pieces), on token grids:

- ``two_views``: the stored views of a batch (data tokenised with ``--views``) or two random resized
  crops made here on ids, with their boxes and flips (``Views``);
- ``relative_positions``: the centres of one view's patches in the other's patch coordinates, flips
  included (SiameseIM's relative geometry); ``sincos_at`` embeds such continuous points exactly as
  ``pretrain.vit.sincos_pos_embed_2d`` does the integer grid;
- ``cutmix_region`` / ``soft_labels``: a square box of patches pasted from the previous sample (CutMix
  with alpha 1, patch-aligned) and the area-weighted labels of the mixed samples.

Randomness comes from torch's global generator, which the trainer reseeds every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.augment_geometry import crop_ids, random_resized_crop_params

__all__ = ["Views", "two_views", "relative_positions", "sincos_at", "cutmix_region", "soft_labels"]


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
