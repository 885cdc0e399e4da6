"""Batched geometric augmentation of token grids in embedding space (see ``pretrain.augment``).

Why embeddings and not one-hot maps: SeiT resamples the one-hot map (B, K, h, w) and then projects
it through the codebook. Both steps are linear and the projection acts per position while
bilinear/bicubic resampling acts per channel, so they commute:

    project(resample(onehot(ids))) == resample(project(onehot(ids))) == resample(embed(ids))

Resampling the (B, D, h, w) embedding map therefore gives the same result at D/K of the cost
(D=192 or 32 vs K=512 channels here). Re-quantise (``pretrain.augment.requantize``) when the
consumer needs ids.

Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1] of the grid's width/height (pixel edges,
matching ``align_corners=False``). All functions take an explicit ``torch.Generator`` so a seed
fixes the output. Random draws are made on the CPU (the generator's device) and applied on the
tensor's device, so the same seed gives the same augmentation in DataLoader workers and, batched, on
the rank's GPU (``augment.in_step``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_resized_crop_params", "box_theta", "affine", "crop_resize", "interp_matrix", "hflip", "random_hflip"]

_ATTEMPTS = 10  # like torchvision's RandomResizedCrop: draw 10 (area, ratio) candidates, keep the first that fits


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def random_resized_crop_params(batch: int, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3), gen: torch.Generator | None = None,
                               grid_hw: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """RandomResizedCrop boxes for a batch, vectorised.

    Area fraction ~ U(scale), aspect (width/height in grid cells) ~ logU(ratio). Ten candidates per
    sample; the first that fits inside the grid is kept; samples with none fall back to the whole
    grid clamped to ``ratio`` (torchvision's central-crop fallback). Boxes are continuous (no
    rounding to whole cells): the resampler handles fractional boxes.

    Args:
        batch: B.
        grid_hw: (h, w) of the grid, only its aspect matters (default square).
    Returns:
        float32 (B, 4) normalised ``(x0, y0, x1, y1)``.
    """
    h, w = grid_hw
    aspect = w / h
    area = _uniform((batch, _ATTEMPTS), scale[0], scale[1], gen)
    log_r = _uniform((batch, _ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), gen)
    r = torch.exp(log_r)
    # In normalised units a crop of (cw, ch) cells is (cw / w, ch / h): area stays a fraction, the
    # pixel ratio cw/ch becomes bw/bh * aspect.
    bw = torch.sqrt(area * r / aspect)
    bh = torch.sqrt(area / r * aspect)
    fits = (bw <= 1) & (bh <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(batch, dtype=torch.long))
    bw = bw.gather(1, first[:, None])[:, 0]
    bh = bh.gather(1, first[:, None])[:, 0]
    fb_w, fb_h = _fallback_size(aspect, ratio)
    ok = fits.any(1)
    bw = torch.where(ok, bw, torch.full_like(bw, fb_w))
    bh = torch.where(ok, bh, torch.full_like(bh, fb_h))
    u = torch.rand((batch, 2), generator=gen)
    x0 = u[:, 0] * (1 - bw)
    y0 = u[:, 1] * (1 - bh)
    # Fallback samples are centred, as in torchvision.
    x0 = torch.where(ok, x0, (1 - bw) / 2)
    y0 = torch.where(ok, y0, (1 - bh) / 2)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], 1)


def _fallback_size(aspect: float, ratio: tuple[float, float]) -> tuple[float, float]:
    if aspect < min(ratio):
        return 1.0, aspect / min(ratio)
    if aspect > max(ratio):
        return max(ratio) / aspect, 1.0
    return 1.0, 1.0


def box_theta(boxes: torch.Tensor) -> torch.Tensor:
    """Affine matrices (B, 2, 3) float32 that make ``affine_grid`` sample ``boxes`` (B, 4) normalised.

    With ``align_corners=False`` the output's [-1, 1] spans its cell edges; map it onto the box's
    edges: x_in = (x0 + x1 - 1) + (x1 - x0) * x_out, in the [-1, 1] input frame.
    """
    boxes = boxes.float()
    x0, y0, x1, y1 = boxes.unbind(1)
    zero = torch.zeros_like(x0)
    row_x = torch.stack([x1 - x0, zero, x0 + x1 - 1], 1)
    row_y = torch.stack([zero, y1 - y0, y0 + y1 - 1], 1)
    return torch.stack([row_x, row_y], 1)


def affine(emb: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int] | None = None, mode: str = "bicubic",
           padding_mode: str = "border") -> torch.Tensor:
    """Resample embeddings through per-sample affine maps (``affine_grid`` + ``grid_sample``).

    Args:
        emb: float (B, D, h, w).
        theta: float (B, 2, 3), output -> input in normalised [-1, 1] coords (align_corners=False).
        out_hw: output grid (h', w'); default (h, w).
        mode: "bicubic" or "bilinear".
        padding_mode: what is read outside the grid; "border" (default) because zero is not a
            meaningful embedding and bicubic taps reach one cell outside even for inside boxes.
    Returns:
        float (B, D, h', w'), dtype of ``emb``.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    b, d = emb.shape[:2]
    oh, ow = out_hw if out_hw is not None else emb.shape[-2:]
    grid = F.affine_grid(theta.to(emb.dtype), [b, d, oh, ow], align_corners=False)
    return F.grid_sample(emb, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def crop_resize(emb: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int] | None = None,
                mode: str = "bicubic") -> torch.Tensor:
    """Crop normalised ``boxes`` (B, 4) from ``emb`` float (B, D, h, w) and resize each to ``out_hw``.

    Same result as ``affine(emb, box_theta(boxes), out_hw, mode)`` (grid_sample, border padding,
    align_corners=False) up to float rounding, but computed separably: a box crop has no rotation
    or shear, so the resample is ``Wy @ emb @ Wx^T`` with small per-sample (h', h) and (w', w)
    interpolation matrices -- two batched matmuls instead of grid_sample's per-output 16-tap
    gather, much faster on CPU. The result is a channels-last view. The whole-grid box with
    ``out_hw == (h, w)`` samples exactly at cell centres, so it is the identity.
    Returns float (B, D, h', w'), dtype of ``emb``.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    b, d, h, w = emb.shape
    oh, ow = out_hw if out_hw is not None else (h, w)
    boxes = boxes.to(emb)
    wx = interp_matrix(boxes[:, 0], boxes[:, 2], w, ow, mode)  # (B, w', w)
    wy = interp_matrix(boxes[:, 1], boxes[:, 3], h, oh, mode)  # (B, h', h)
    # Work channels-last: (B, h, w*D) is a free view of what ``embed`` returns, so neither
    # contraction needs a copy of the big tensor (only wx is broadcast over rows).
    x = emb.permute(0, 2, 3, 1).reshape(b, h, w * d)
    x = torch.bmm(wy, x).view(b, oh, w, d)
    x = torch.matmul(wx[:, None], x)  # (B, h', w', D)
    return x.permute(0, 3, 1, 2)  # (B, D, h', w') view, channels-last memory


def crop_ids(ids: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Nearest-neighbour random resized crop on ids: int64 (B, h, w) -> (B, h', w'), exact ids, no embedding.

    Output cell (i, j) takes the input cell under its centre inside the normalised box
    (x0, y0, x1, y1). The cheap form of the crop for the data path (an index gather, no
    re-quantisation); the bicubic form in embedding space (``crop_resize``) belongs on the
    training side, where the embeddings are made anyway.
    """
    b, h, w = ids.shape
    oh, ow = out_hw if out_hw is not None else (h, w)
    boxes = boxes.to(torch.float64)
    cy = (torch.arange(oh, dtype=torch.float64) + 0.5) / oh
    cx = (torch.arange(ow, dtype=torch.float64) + 0.5) / ow
    rows = ((boxes[:, 1:2] + cy * (boxes[:, 3:4] - boxes[:, 1:2])) * h).floor().long().clamp_(0, h - 1)  # (B, h')
    cols = ((boxes[:, 0:1] + cx * (boxes[:, 2:3] - boxes[:, 0:1])) * w).floor().long().clamp_(0, w - 1)  # (B, w')
    flat = (rows[:, :, None] * w + cols[:, None, :]).to(ids.device)  # (B, h', w')
    return ids.reshape(b, h * w).gather(1, flat.reshape(b, oh * ow)).reshape(b, oh, ow)


def _cubic_weights(t: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 (PyTorch's bicubic, A=-0.75)."""
    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def interp_matrix(lo: torch.Tensor, hi: torch.Tensor, n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """Per-sample 1-D resampling matrices (B, n_out, n_in) for the span [lo, hi] (B,) normalised.

    Reproduces grid_sample's sampling (align_corners=False, border padding): output cell i reads
    source coordinate (lo + (hi - lo) * (i + 0.5) / n_out) * n_in - 0.5; bicubic clamps each of its
    4 taps to the grid, bilinear clamps the coordinate. Rows sum to 1.
    """
    i = (torch.arange(n_out, dtype=lo.dtype, device=lo.device) + 0.5) / n_out
    src = (lo[:, None] + (hi - lo)[:, None] * i) * n_in - 0.5  # (B, n_out)
    if mode == "bilinear":
        src = src.clamp(0, n_in - 1)
    base = src.floor()
    t = src - base
    if mode == "bicubic":
        taps = base.long()[..., None] + torch.arange(-1, 3, device=lo.device)
        weights = _cubic_weights(t)
    else:
        taps = base.long()[..., None] + torch.arange(0, 2, device=lo.device)
        weights = torch.stack([1 - t, t], -1)
    out = torch.zeros((*src.shape, n_in), dtype=lo.dtype, device=lo.device)
    return out.scatter_add_(-1, taps.clamp(0, n_in - 1), weights)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: ids int64 (B, h, w) or embeddings (B, D, h, w); exact (a permutation).

    Note: each token still encodes an unmirrored image patch; like SeiT we accept that.
    """
    return x.flip(-1)


def random_hflip(x: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample of ``x`` (ids (B, h, w) or embeddings (B, D, h, w)) with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)
    flip = flip.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flip, x.flip(-1), x)
