"""ColorAdapt (SeiT++), learned variant: colour augmentation of VQ token grids, measured against AdaIN.

SeiT++'s ColorAdapt is parameter-free: AdaIN of a token grid's codebook embeddings with another
grid's per-channel statistics, then nearest code. This module learns the map instead:

    ids int64 (B, h, w) --embed (frozen codebook, standardised)--> (B, D, h, w)
    params float (B, 4) --MLP (+ pooled features)--> FiLM scales/shifts
    --1x1 conv to C, N FiLM-conditioned residual blocks, 1x1 to D (+ the input embedding)-->
    codebook-tied head: logits (B, K, h, w) = -scale * ||z - c_k||^2 + b_k

trained with cross-entropy against T(jitter(x)), the tokens of the colour-jittered image.

Colour jitter (``color_jitter``) acts on float RGB in [0, 1], always in the order brightness,
contrast, saturation, hue (torchvision draws a random order; a fixed order keeps the map a function
of the 4 parameters), clamping to [0, 1] after every step:

- brightness b: x * b
- contrast c: c * x + (1 - c) * mean over the image of the grey level (ITU-R 601 luma 0.299/0.587/0.114)
- saturation s: s * x + (1 - s) * the pixel's grey level
- hue shift h: RGB -> HSV, H = (H + h) mod 1, HSV -> RGB (the torchvision ``adjust_hue`` formula,
  implemented with torch ops; HSV rather than a YIQ rotation so the op matches torchvision's).

``params`` is float (N, 4) = (b, c, s, h); (1, 1, 1, 0) is the identity (up to float rounding).
``sample_jitter`` draws b, c, s uniform in [1 - 0.4, 1 + 0.4] and h uniform in [-0.1, 0.1].

Trained and evaluated (against AdaIN with oracle statistics and the copy baseline) by the one adapter
trainer::

    python -m pipeline.adapters.train --kind coloradapt --images DIR --tokenizer CKPT --out CKPT \
        [--val DIR] [--minutes M] [--steps N] [--batch 32] [--limit N] [--json OUT]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters.common import (
    AdapterModel,
    AdapterSpec,
    checkpoint_io,
    register_codebook,
    tied_logits,
)
from pipeline.tokenizer.codebook import adain, embed, requantize

__all__ = ["ColorAdaptConfig", "LearnedColorAdapt", "NEUTRAL_JITTER", "SPEC", "adain_oracle", "color_jitter",
           "load_coloradapt", "sample_jitter", "save_coloradapt", "single_jitter_configs"]

KIND = "coloradapt"
NEUTRAL_JITTER = (1.0, 1.0, 1.0, 0.0)
_LUMA = (0.299, 0.587, 0.114)


# ---- colour jitter in pixels ---------------------------------------------------------------------------
def _grey(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) -> (N, 1, H, W) luma."""
    return (_LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (torchvision's formula)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    cr_div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)  # (N, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    return torch.stack([(mask * a).sum(1) for a in (a1, a2, a3)], 1)


def color_jitter_float(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) RGB in [0, 1], params (N, 4) = (brightness, contrast, saturation, hue) -> same."""
    p = params.to(x.dtype).view(-1, 4, 1, 1)
    b, c, s, h = p[:, 0:1], p[:, 1:2], p[:, 2:3], p[:, 3:4]
    x = (x * b).clamp(0.0, 1.0)
    mean = _grey(x).mean((2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp(0.0, 1.0)
    x = (s * x + (1 - s) * _grey(x)).clamp(0.0, 1.0)
    if bool((params[:, 3] != 0).any()):  # hue: skip the HSV round trip when no sample shifts hue
        hsv = _rgb_to_hsv(x)
        hue = torch.remainder(hsv[:, 0:1] + h, 1.0)
        x = _hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), 1))
    return x


def color_jitter(images: np.ndarray, params: torch.Tensor | np.ndarray) -> np.ndarray:
    """The pixel-space colour jitter: uint8 (N, H, W, 3), params float (N, 4) -> uint8 (N, H, W, 3).

    See the module docstring for the ops and their order.
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    if params.shape != (len(images), 4):
        raise ValueError(f"params {tuple(params.shape)} != ({len(images)}, 4)")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    y = color_jitter_float(x, params) * 255.0
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def sample_jitter(n: int, gen: torch.Generator | None = None, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """float32 (n, 4): b, c, s uniform in [1 - r, 1 + r] for their range r; hue shift uniform in [-hue, hue]."""
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    ranges = torch.tensor([brightness, contrast, saturation, hue])
    return torch.tensor(NEUTRAL_JITTER) + u * ranges


# ---- the model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColorAdaptConfig:
    """Architecture + jitter ranges (JSON-safe; stored in checkpoints).

    vocab_size K, embed_dim D, grid (h, w): the tokenizer's. width C: feature channels; blocks: residual
    FiLM blocks (depthwise 3x3 + pointwise MLP); cond_dim: width of the parameter MLP. brightness,
    contrast, saturation, hue: jitter ranges (``sample_jitter``), also used to normalise params to
    [-1, 1] before the MLP. tokenizer_fingerprint: the tokenizer it was built for.
    """

    vocab_size: int
    embed_dim: int
    grid: tuple[int, int]
    width: int = 128
    blocks: int = 3
    cond_dim: int = 128
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    tokenizer_fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        if self.vocab_size < 1 or self.embed_dim < 1 or len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"invalid ColorAdaptConfig shapes: {self}")
        if self.width < 1 or self.blocks < 0 or self.cond_dim < 1:
            raise ValueError(f"invalid ColorAdaptConfig widths: {self}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError(f"invalid jitter ranges: {self}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColorAdaptConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ColorAdaptConfig keys {sorted(unknown)}")
        return cls(**d)

    def ranges(self) -> tuple[float, float, float, float]:
        return (self.brightness, self.contrast, self.saturation, self.hue)


def _median_nn_sq_dist(codebook: torch.Tensor) -> torch.Tensor:
    """Median over codes of the squared L2 distance to the nearest other code (1.0 for K = 1)."""
    if codebook.shape[0] < 2:
        return torch.ones(())
    d = torch.cdist(codebook, codebook).pow(2)
    d.fill_diagonal_(float("inf"))
    return d.min(1).values.median().clamp(min=1e-6)


class _FiLMBlock(nn.Module):
    """x + W2 gelu(W1 (FiLM(norm(dwconv3x3(x))))): gamma/beta per sample from the condition vector."""

    def __init__(self, c: int, cond: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.GroupNorm(1, c, affine=False)
        self.film = nn.Linear(cond, 2 * c)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.pw2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, 1)
        y = self.norm(self.dw(x)) * (1 + gamma) + beta
        return x + self.pw2(F.gelu(self.pw1(y)))


class LearnedColorAdapt(AdapterModel):
    """Predicts T(jitter(x)) from T(x) and the jitter params (module docstring)."""

    config_class = ColorAdaptConfig

    def __init__(self, cfg: ColorAdaptConfig, codebook: torch.Tensor) -> None:
        """cfg: ColorAdaptConfig; codebook: float (K, D), frozen (stored as a buffer)."""
        super().__init__()
        self.cfg = cfg
        c, d = cfg.width, cfg.embed_dim
        register_codebook(self, codebook, cfg.vocab_size, cfg.embed_dim)
        codebook = self.codebook
        self.register_buffer("p_center", torch.tensor(NEUTRAL_JITTER))
        self.register_buffer("p_scale", torch.tensor(cfg.ranges()).clamp(min=1e-6))
        self.stem = nn.Conv2d(d, c, 1)
        # Condition: the normalised params and the image-mean stem features (contrast needs the global mean).
        self.cond = nn.Sequential(nn.Linear(4 + c, cfg.cond_dim), nn.GELU(), nn.Linear(cfg.cond_dim, cfg.cond_dim),
                                  nn.GELU())
        self.blocks = nn.ModuleList(_FiLMBlock(c, cfg.cond_dim) for _ in range(cfg.blocks))
        self.out_norm = nn.GroupNorm(1, c)
        self.out = nn.Conv2d(c, d, 1)
        nn.init.zeros_(self.out.weight)  # starts as "copy": z = the input embedding
        nn.init.zeros_(self.out.bias)
        # Initial sharpness: a logit gap of 1 between a code and its median nearest neighbour, so the
        # copy start is neither flat nor over-confident (codebook units vary: k-means codes are pixels).
        self.log_scale = nn.Parameter(-torch.log(_median_nn_sq_dist(codebook)))
        self.code_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, ids: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w), params float (B, 4) -> logits float32 (B, K, h, w) of T(jitter(x))."""
        emb = self.embed(ids)
        x = self.stem(emb)
        p = (params.to(x) - self.p_center) / self.p_scale
        cond = self.cond(torch.cat((p, x.mean((2, 3))), 1))
        for block in self.blocks:
            x = block(x, cond)
        return tied_logits(self, emb + self.out(self.out_norm(x)))  # the residual starts as "copy"

    @torch.no_grad()
    def adapt(self, ids: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Jittered ids: int64 (B, h, w), params (B, 4) -> int64 (B, h, w) (argmax of ``forward``)."""
        return self(ids, params).argmax(1)


def adain_oracle(ids: torch.Tensor, target_ids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The parameter-free op at its best: AdaIN of embed(T(x)) with the statistics of embed(T(jitter(x)))."""
    cb = codebook.to(torch.float32)
    return requantize(adain(embed(ids.long(), cb), embed(target_ids.long(), cb)), cb)


# ---- checkpoints (``pipeline.adapters.common.checkpoint_io``) ------------------------------------------
save_coloradapt, load_coloradapt = checkpoint_io(KIND, ColorAdaptConfig, LearnedColorAdapt)


# ---- what the one adapter trainer needs (``pipeline.adapters.train``) ------------------------------------
def single_jitter_configs(cfg: ColorAdaptConfig) -> dict[str, ColorAdaptConfig]:
    """Identity (every range 0), and one config per jitter op with the others switched off."""
    still = dataclasses.replace(cfg, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    return {"identity": still, **{op: dataclasses.replace(still, **{op: getattr(cfg, op)})
                                  for op in ("brightness", "contrast", "saturation", "hue")}}


def _baselines(model: LearnedColorAdapt, src: torch.Tensor, target: torch.Tensor,
               params: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdaIN with the statistics of the target tokens (the parameter-free op at its best)."""
    return {"adain_oracle": adain_oracle(src, target, model.codebook)}


SPEC = AdapterSpec(
    kind=KIND, model=LearnedColorAdapt, config=ColorAdaptConfig, learned="learned",
    sample=lambda n, cfg, gen: sample_jitter(n, gen, *cfg.ranges()),
    pixels=lambda images, params, cfg: color_jitter(images, params),
    single_ops=single_jitter_configs, baselines=_baselines, lr=2e-3)
