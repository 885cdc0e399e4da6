"""TokenAdapt (SeiT++): geometric augmentation of VQ token grids through a learned feature space.

Naive token-space augmentation (warp the codebook embeddings of a token grid, then take the nearest
code) gives tokens unlike the tokens of the really augmented image. TokenAdapt learns

    ids int64 (B, h, w) --embed (frozen codebook)--> (B, D, h, w) --f--> (B, C, 2h, 2w)
    --A (affine warp, theta)--> (B, C, 2h, 2w) --g--> logits float32 (B, K, h, w)

trained with cross-entropy against T(A(x)), the tokens of the image warped in pixels. f is one pre-norm
transformer layer (linear D->C, learned position embeddings, linear C->4C, pixel-shuffle x2); g is a 2x2
stride-2 conv + a depthwise-separable 3x3 conv + either a codebook-tied distance head (default, see
``TokenAdaptConfig.tied_head``) or a 1x1 conv to K logits.

A learned correction of the naive operator (``residual``, the default). g does not predict the
warped embedding from scratch: it predicts a correction added to the naive one (the embedding map
warped bilinearly), and the tied head scores codes by their distance to the sum:

    z = warp(embed(ids), theta) + g(A(f(embed(ids))))      logits_k = -s * ||z - c_k||^2 + b_k

g's last layer and b start at zero, so an untrained model IS naive interpolation + nearest code,
and training can only start from naive's level. The correction and b are of the warp: both are
multiplied by ``correction_gate(theta)``, 0 at the identity and 1 beyond about a token's shift, so
the identity warp returns the input ids exactly however the model was trained. A model
trained from scratch (``residual=False``, the first design) needed far more than the default
5-minute CPU budget to reach naive's agreement (0.16 vs 0.45, and 0.16 at the identity warp).

Geometry. Every augmentation is a batch of affine matrices ``theta`` (B, 2, 3) in the normalised
coordinates of ``F.affine_grid`` with ``align_corners=False``: ``theta`` maps an OUTPUT location to the
INPUT location it samples, and [-1, 1] spans the outer edges of the first/last pixel. Those coordinates
do not depend on the resolution, so the same theta is the same geometric transform on pixels
(R x R), token embeddings (h x w) and features (2h x 2w); that is what ``warp`` relies on. Rotation and
shear are exact rotations/shears only for square inputs (all our grids and images are square).

Out-of-image regions use ``padding_mode="reflection"`` (config ``padding_mode``) in every space. We
prefer it to "border": with align_corners=False reflection mirrors about the image EDGE (+-1), which is
the same place at every resolution, while "border" replicates the outermost sample CENTRE, which sits
1/R, 1/h or 1/(2h) inside the edge and so differs between pixels, tokens and features.
"""

from __future__ import annotations

import dataclasses
import math
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

__all__ = ["TokenAdapt", "TokenAdaptConfig", "SPEC", "correction_gate", "identity_theta", "load_tokenadapt",
           "naive_adapt", "nearest_code", "sample_affine", "save_tokenadapt", "single_aug_configs", "warp",
           "warp_images"]

KIND = "tokenadapt"


@dataclass(frozen=True)
class TokenAdaptConfig:
    """Architecture + augmentation ranges (all JSON-safe; stored in checkpoints).

    vocab_size K and embed_dim D: the tokenizer codebook shape. grid (h, w): token grid. width C:
    feature channels; heads: attention heads of the single transformer layer. padding_mode: grid_sample
    padding used in pixels, embeddings and features alike. Augmentation (see ``sample_affine``):
    flip_p: P(horizontal flip); max_rotate_deg, max_shear_deg: uniform in +-max; max_translate: shift
    as a fraction of the image side, uniform in +-max; scale_range / ratio_range: random-resized-crop
    area fraction and aspect ratio (log-uniform). tied_head: g predicts a codebook-space vector z and
    scores code k by -scale * ||z - c_k||^2 + b_k (the VQ assignment rule, so g only has to regress
    embeddings instead of learning K prototypes from scratch); False: a plain 1x1 conv to K logits.
    residual: g predicts a correction of the naively warped embedding map (module docstring; needs
    tied_head); checkpoints written before this option read back as False. margin: the tied head's
    scale s is set so that a point on a code beats its nearest other code by ``margin`` nats (fixed
    when residual, learned from there otherwise). tokenizer_fingerprint: the tokenizer it was built for.
    """

    vocab_size: int
    embed_dim: int
    grid: tuple[int, int]
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    padding_mode: str = "reflection"
    flip_p: float = 0.5
    max_rotate_deg: float = 15.0
    max_translate: float = 0.1
    max_shear_deg: float = 10.0
    scale_range: tuple[float, float] = (0.25, 1.0)
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    tied_head: bool = True
    residual: bool = True
    margin: float = 4.0
    tokenizer_fingerprint: str = ""

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; normalise so that a config read back compares equal.
        for name in ("grid", "scale_range", "ratio_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.vocab_size < 1 or self.embed_dim < 1 or len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"invalid TokenAdaptConfig shapes: {self}")
        if self.width < 1 or self.width % self.heads:
            raise ValueError(f"width {self.width} must be a positive multiple of heads {self.heads}")
        if self.residual and not self.tied_head:
            raise ValueError("residual=True corrects an embedding, so it needs tied_head=True")
        if self.padding_mode not in ("border", "reflection", "zeros"):
            raise ValueError(f"unknown padding_mode {self.padding_mode!r}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"invalid scale_range {self.scale_range} / ratio_range {self.ratio_range}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenAdaptConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TokenAdaptConfig keys {sorted(unknown)}")
        return cls(**{"residual": False, **d})  # written before ``residual`` existed: the from-scratch model


# ---- geometry -------------------------------------------------------------------------------------
def identity_theta(batch: int) -> torch.Tensor:
    """float32 (B, 2, 3) identity affine matrices."""
    return torch.eye(2, 3).expand(batch, 2, 3).clone()


def sample_affine(batch: int, cfg: TokenAdaptConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random augmentations as float32 (B, 2, 3) output->input affine matrices (normalised coordinates).

    input = Crop(Translate(Rotate(Shear(Flip(output))))): a random-resized crop picks the input box
    (area fraction in scale_range, aspect in ratio_range, box kept inside the image), and inside it the
    content is flipped (p = flip_p), sheared along x, rotated and translated.
    """
    u = lambda: torch.rand(batch, generator=gen, dtype=torch.float64)  # noqa: E731  uniform [0, 1)
    sym = lambda m: (2 * u() - 1) * m  # noqa: E731  uniform [-m, m)
    flip = torch.where(u() < cfg.flip_p, -1.0, 1.0)
    rot = sym(math.radians(cfg.max_rotate_deg))
    shear = torch.tan(sym(math.radians(cfg.max_shear_deg)))
    tx, ty = sym(2 * cfg.max_translate), sym(2 * cfg.max_translate)  # side = 2 normalised units
    lo, hi = cfg.scale_range
    area = lo + (hi - lo) * u()
    log_r = math.log(cfg.ratio_range[0]) + (math.log(cfg.ratio_range[1]) - math.log(cfg.ratio_range[0])) * u()
    sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop box half-extent in normalised units
    sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx, cy = (2 * u() - 1) * (1 - sx), (2 * u() - 1) * (1 - sy)

    def mat(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor):
        m = torch.zeros(batch, 3, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = a, b, c, d, e, f
        m[:, 2, 2] = 1
        return m

    zero, one = torch.zeros(batch, dtype=torch.float64), torch.ones(batch, dtype=torch.float64)
    m_flip = mat(flip, zero, zero, zero, one, zero)
    m_shear = mat(one, shear, zero, zero, one, zero)
    m_rot = mat(torch.cos(rot), -torch.sin(rot), zero, torch.sin(rot), torch.cos(rot), zero)
    m_trans = mat(one, zero, tx, zero, one, ty)
    m_crop = mat(sx, zero, cx, zero, sy, cy)
    return (m_crop @ m_trans @ m_rot @ m_shear @ m_flip)[:, :2].to(torch.float32)


def warp(
    x: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int], mode: str = "bilinear",
    padding_mode: str = "reflection",
) -> torch.Tensor:
    """Apply theta to float (B, C, H, W) maps -> (B, C, *out_hw); align_corners=False everywhere.

    Works for pixels, embeddings and features alike: theta is resolution-independent (module docstring).
    """
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def warp_images(images: np.ndarray, theta: torch.Tensor, padding_mode: str = "reflection") -> np.ndarray:
    """The pixel-space augmentation A(x): uint8 (N, H, W, 3) -> uint8 (N, H, W, 3), bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    y = warp(x, theta, tuple(images.shape[1:3]), "bilinear", padding_mode)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def nearest_code(emb: torch.Tensor, codebook: torch.Tensor, chunk: int = 16_384) -> torch.Tensor:
    """float (B, D, h, w) embeddings -> int64 (B, h, w) ids of the L2-nearest codebook row (ties: lowest id)."""
    b, d, h, w = emb.shape
    x = emb.permute(0, 2, 3, 1).reshape(-1, d)
    cb = codebook.to(x)
    c_sq = (cb * cb).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        # ||x||^2 is constant per row, so argmin of ||c||^2 - 2 x.c is the nearest code.
        out[s : s + chunk] = (c_sq - 2 * x[s : s + chunk] @ cb.T).argmin(1)
    return out.reshape(b, h, w)


def naive_adapt(
    ids: torch.Tensor, theta: torch.Tensor, codebook: torch.Tensor, padding_mode: str = "reflection"
) -> torch.Tensor:
    """Baseline: warp the (B, D, h, w) embedding map bilinearly, then nearest code -> int64 (B, h, w)."""
    emb = F.embedding(ids.long(), codebook.to(torch.float32)).permute(0, 3, 1, 2)
    return nearest_code(warp(emb, theta, tuple(ids.shape[1:]), "bilinear", padding_mode), codebook)


# ---- the model ------------------------------------------------------------------------------------
def correction_gate(theta: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """float (B,) in [0, 1): 1 - exp(-(d / t)^2), d = Frobenius distance of theta (B, 2, 3) from the
    identity, t = half a token step in normalised units (1 / max(grid)). 0 exactly at the identity,
    above 0.98 from a shift of one token on."""
    d = (theta.to(torch.float32) - torch.eye(2, 3, device=theta.device)).flatten(1).norm(dim=1)
    return 1.0 - torch.exp(-(d * max(grid)) ** 2)


def _initial_log_scale(codebook: torch.Tensor, margin: float = 4.0) -> float:
    """log s such that a point ON a code beats that code's nearest other code by ``margin`` nats (median
    over codes): a softmax neither flat nor saturated at the start, whatever the codebook's units."""
    cb = codebook.to(torch.float64)
    if cb.shape[0] < 2:
        return 0.0
    d = torch.cdist(cb, cb).pow(2)
    d.fill_diagonal_(float("inf"))
    nn_sq = d.min(1).values.median().clamp(min=1e-12)
    return float(math.log(margin / nn_sq))


class TokenAdapt(AdapterModel):
    """f (tokens -> 2x feature map), A (warp with theta), g (features -> K-way token logits)."""

    config_class = TokenAdaptConfig

    def __init__(self, cfg: TokenAdaptConfig, codebook: torch.Tensor) -> None:
        """cfg: TokenAdaptConfig; codebook: float (K, D) tokenizer codebook, frozen (stored as a buffer)."""
        super().__init__()
        self.cfg = cfg
        c, (h, w) = cfg.width, cfg.grid
        register_codebook(self, codebook, cfg.vocab_size, cfg.embed_dim)
        self.proj_in = nn.Linear(cfg.embed_dim, c)
        self.pos = nn.Parameter(torch.randn(1, h * w, c) * 0.02)
        self.block = nn.TransformerEncoderLayer(
            c, cfg.heads, int(c * cfg.mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(c)
        self.proj_up = nn.Linear(c, 4 * c)  # 4C channels per token -> pixel-shuffle to (C, 2, 2)
        # g: (B, C, 2h, 2w) -> (B, K, h, w). The 2x2 stride-2 conv reads exactly one token's footprint;
        # a depthwise-separable 3x3 adds neighbour context at ~1/9 the cost of a full 3x3 conv.
        self.head = nn.Sequential(
            nn.Conv2d(c, c, 2, stride=2),
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1, groups=c),
            nn.Conv2d(c, c, 1),
            nn.GELU(),
            nn.Conv2d(c, cfg.embed_dim if cfg.tied_head else cfg.vocab_size, 1),
        )
        if cfg.tied_head:
            log_scale = torch.tensor(_initial_log_scale(self.codebook, cfg.margin))
            if cfg.residual:  # a fixed, sharp softmax: CE then trains the argmax (a learned one went soft
                self.register_buffer("log_scale", log_scale)  # and lost agreement: 0.36 vs 0.48 held out)
            else:
                self.log_scale = nn.Parameter(log_scale)
            self.code_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.residual:  # zero correction at start: the model begins as the naive operator
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def f(self, emb: torch.Tensor) -> torch.Tensor:
        """float32 (B, D, h, w) -> (B, C, 2h, 2w) features."""
        b, _, h, w = emb.shape
        x = self.proj_in(emb.flatten(2).transpose(1, 2)) + self.pos  # (B, h*w, C)
        x = self.proj_up(self.norm(self.block(x)))  # (B, h*w, 4C)
        return F.pixel_shuffle(x.transpose(1, 2).reshape(b, -1, h, w), 2)

    def forward(self, ids: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w), theta float (B, 2, 3) -> logits float32 (B, K, h, w) of T(A(x))."""
        emb = self.embed(ids)
        feat = self.f(emb)
        out = self.head(warp(feat, theta, tuple(feat.shape[2:]), "bilinear", self.cfg.padding_mode))
        if not self.cfg.residual:
            return tied_logits(self, out) if self.cfg.tied_head else out
        # A correction of the naive warp (standardising commutes with the convex bilinear warp).
        gate = correction_gate(theta, self.cfg.grid).to(out)
        naive = warp(emb, theta, tuple(ids.shape[1:]), "bilinear", self.cfg.padding_mode)
        return tied_logits(self, naive + gate[:, None, None, None] * out, bias_weight=gate)

    @torch.no_grad()
    def adapt(self, ids: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Augmented ids: int64 (B, h, w) -> int64 (B, h, w) (argmax of ``forward``)."""
        return self(ids, theta).argmax(1)


# ---- checkpoints (``pipeline.adapters.common.checkpoint_io``) ------------------------------------------
save_tokenadapt, load_tokenadapt = checkpoint_io(KIND, TokenAdaptConfig, TokenAdapt)


# ---- what the one adapter trainer needs (``pipeline.adapters.train``) --------------------------------
def single_aug_configs(cfg: TokenAdaptConfig) -> dict[str, TokenAdaptConfig]:
    """Identity, and one config per augmentation type with every other range switched off."""
    still = dataclasses.replace(cfg, flip_p=0.0, max_rotate_deg=0.0, max_translate=0.0, max_shear_deg=0.0,
                                scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    return {
        "identity": still,
        "hflip": dataclasses.replace(still, flip_p=1.0),
        "rotate": dataclasses.replace(still, max_rotate_deg=cfg.max_rotate_deg),
        "translate": dataclasses.replace(still, max_translate=cfg.max_translate),
        "shear": dataclasses.replace(still, max_shear_deg=cfg.max_shear_deg),
        "resized_crop": dataclasses.replace(still, scale_range=cfg.scale_range, ratio_range=cfg.ratio_range),
    }


def _baselines(model: TokenAdapt, src: torch.Tensor, target: torch.Tensor,
               theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Naive interpolation + nearest code, the operator TokenAdapt corrects."""
    return {"naive": naive_adapt(src, theta, model.codebook, model.cfg.padding_mode)}


SPEC = AdapterSpec(
    kind=KIND, model=TokenAdapt, config=TokenAdaptConfig, learned="tokenadapt", sample=sample_affine,
    pixels=lambda images, theta, cfg: warp_images(images, theta, cfg.padding_mode),
    single_ops=single_aug_configs, baselines=_baselines, lr=1e-3)
