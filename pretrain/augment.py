"""Token-space data augmentation for training on stored VQ token grids (after SeiT / SeiT++).

Batches come from ``storage.stream.TokenStream``: ``tokens`` int64 (B, h, w) ids in [0, K),
``label`` int64 (B,), plus other keys. A tokenizer gives ``codebook`` float32 (K, D).

What acts where:

- **ids** (int64 (B, h, w)): Token-EDA (``replace_synonyms``, ``swap_patches``), ``hflip``
  (exact), ``cutmix`` (pasting ids is exact too).
- **embeddings** (float32 (B, D, h, w), ``embed`` = codebook lookup): resampling
  (``crop_resize``, ``affine``, in ``pretrain.augment_geometry``), ``color_adapt`` / ``adain``,
  ``embedding_noise``, ``mixup``, ``cutmix``. ``requantize`` maps back to ids (nearest code).

Why embeddings for geometry: SeiT interpolates the one-hot map (K channels) and then projects it
through the codebook. Projection is linear per position and bilinear/bicubic interpolation is
linear per channel, so the two commute: interpolating the embedding map (D channels) gives the
identical result at D/K of the cost (K=512 vs D=192 or 32 here).

``TokenAugment`` composes them in this order: EDA on ids -> hflip on ids -> embed -> random
resized crop -> ColorAdapt -> noise -> mix (CutMix or Mixup) -> (ids mode) requantize. The flip is
done on ids because it is exact and cheap there, and flip-then-crop has the same distribution as
crop-then-flip (the box distribution is mirror-symmetric). In ids mode CutMix runs on the
re-quantised ids, which equals CutMix on embeddings followed by re-quantisation (pasting and
nearest-code lookup are both per position).

Every random function takes an explicit ``torch.Generator``: the same seed gives the same output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tokenizer.codebook import adain, channel_stats, embed, requantize
from pretrain.augment_adapters import AdapterOps
from pretrain.augment_geometry import (
    affine,
    box_theta,
    crop_ids,
    crop_resize,
    hflip,
    random_hflip,
    random_resized_crop_params,
)

__all__ = [
    "embed", "requantize", "synonym_table", "replace_synonyms", "swap_patches",
    "random_resized_crop_params", "box_theta", "crop_ids", "crop_resize", "affine", "hflip", "random_hflip",
    "cutmix", "mixup", "one_hot_targets", "embedding_noise", "adain", "color_adapt",
    "TokenAugConfig", "TokenAugment", "BatchSeededAugment",
]

# -- Token-EDA (ids) ------------------------------------------------------------------------------

def synonym_table(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most cosine-similar *other* codes of each code: codebook (K, D) -> int64 (K, k)."""
    cb = F.normalize(codebook.float(), dim=1)
    sim = cb @ cb.T
    sim.fill_diagonal_(float("-inf"))  # a code is not its own synonym
    return sim.topk(k, dim=1).indices


def replace_synonyms(ids: torch.Tensor, table: torch.Tensor, p: float,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """Replace each token with probability ``p`` by a uniformly chosen entry of its row of ``table``.

    ids int64 (B, h, w); table int64 (K, k) from ``synonym_table``. Returns int64 (B, h, w).
    Synonyms are looked up only at the replaced positions (a few percent): the data path's cost.
    """
    where = (torch.rand(ids.shape, generator=gen) < p).view(-1).nonzero().squeeze(1)
    pick = torch.randint(0, table.shape[1], where.shape, generator=gen).to(ids.device)
    where = where.to(ids.device)
    out = ids.clone()
    flat = out.view(-1)
    flat[where] = table[flat[where], pick]
    return out


def _sample_positions(weights: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``weights`` (B, N) >= 0, proportional to the weights.

    Inverse-CDF sampling (cumsum + searchsorted): several times faster than torch.multinomial
    on CPU for (256, 1024) rows, which made the data path's patch swap its slowest op.
    """
    cdf = weights.cumsum(1)
    u = torch.rand(weights.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)


def swap_patches(x: torch.Tensor, scale: tuple[float, float] = (0.0, 0.25), gen: torch.Generator | None = None,
                 p: float = 1.0) -> torch.Tensor:
    """SeiT's SwapCode, batched: swap two non-overlapping square patches within each sample.

    Side s = floor(U(scale) * min(h, w)) per sample (capped so two patches always fit side by
    side); both corners are uniform over the placements that keep the patches disjoint (SeiT's
    distance test can let them overlap, which would duplicate and lose tokens). Applied to each
    sample with probability ``p``. A permutation of positions, so each sample keeps its multiset
    of ids. Works on ids (B, h, w) or embeddings (B, D, h, w); returns the same shape and dtype.
    """
    chosen = (torch.rand(x.shape[0], generator=gen) < p).nonzero().squeeze(1).to(x.device)
    if len(chosen) < x.shape[0]:  # swap only the chosen samples (cheaper than computing no-op swaps)
        out = x.clone()
        if len(chosen):
            out[chosen] = swap_patches(x[chosen], scale, gen, p=1.0)
        return out
    bsz, (h, w) = x.shape[0], x.shape[-2:]
    side = (_uniform((bsz,), scale, gen) * min(h, w)).floor().long()
    side = side.clamp(0, min(min(h, w), max(h, w) // 2))
    yy = torch.arange(h).view(1, h, 1)
    xx = torch.arange(w).view(1, 1, w)
    s = side.view(-1, 1, 1)
    fits = (yy <= h - s) & (xx <= w - s)  # (B, h, w): top-left corners keeping the patch inside
    # A corner for patch A must leave room for B somewhere: s cells free above, below, left or right.
    room_a = fits & ((yy >= s) | (yy + 2 * s <= h) | (xx >= s) | (xx + 2 * s <= w))
    a = _sample_positions(room_a.flatten(1).float(), gen)
    ay, ax = (a // w).view(-1, 1, 1), (a % w).view(-1, 1, 1)
    room_b = fits & (((yy - ay).abs() >= s) | ((xx - ax).abs() >= s))
    # s == 0 has every corner valid: the "swap" is then empty and a no-op.
    bpos = _sample_positions(room_b.flatten(1).float(), gen)
    by, bx = (bpos // w).view(-1, 1, 1), (bpos % w).view(-1, 1, 1)
    in_a = (yy >= ay) & (yy < ay + s) & (xx >= ax) & (xx < ax + s)
    in_b = (yy >= by) & (yy < by + s) & (xx >= bx) & (xx < bx + s)
    dy, dx = by - ay, bx - ax
    src_y = torch.where(in_a, yy + dy, torch.where(in_b, yy - dy, yy))
    src_x = torch.where(in_a, xx + dx, torch.where(in_b, xx - dx, xx))
    src = (src_y * w + src_x).flatten(1).to(x.device)  # (B, h*w)
    flat = x.flatten(-2)
    if x.dim() == 4:
        src = src[:, None, :].expand(-1, x.shape[1], -1)
    return flat.gather(-1, src).view_as(x)


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (bounds[1] - bounds[0]) + bounds[0]


# -- label mixing ---------------------------------------------------------------------------------

def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """int64 (B,) labels -> float32 (B, C) (label-smoothed) targets; float (B, C) passes through."""
    if labels.dim() == 2:
        return labels.float()
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def _beta(alpha: float, n: int, gen: torch.Generator | None) -> torch.Tensor:
    # torch's Beta sampler takes no generator; seed a numpy one from ours so a seed still fixes it.
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float()


def cutmix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float = 1.0,
           gen: torch.Generator | None = None, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-CutMix: paste a box from a permuted batch into each sample, mix the labels by area.

    Per sample lambda ~ Beta(alpha, alpha); the box has sides sqrt(1 - lambda) * (h, w) rounded to
    cells and a uniform centre, clipped to the grid; lambda is then recomputed from the cells
    actually pasted, so the pasted sample's weight is exactly pasted area / total area.

    Args:
        x: ids int64 (B, h, w) or embeddings float (B, D, h, w).
        labels: int64 (B,) or soft float (B, C).
    Returns:
        (mixed, same shape/dtype as ``x``; targets float32 (B, C), rows sum to 1).
    """
    bsz, (h, w) = x.shape[0], x.shape[-2:]
    lam = _beta(alpha, bsz, gen)
    perm = torch.randperm(bsz, generator=gen)
    cut = torch.sqrt(1.0 - lam)
    ch, cw = (cut * h).long(), (cut * w).long()
    cy = torch.randint(0, h, (bsz,), generator=gen)
    cx = torch.randint(0, w, (bsz,), generator=gen)
    y0, y1 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
    x0, x1 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
    yy = torch.arange(h).view(1, h, 1)
    xx = torch.arange(w).view(1, 1, w)
    box = ((yy >= y0.view(-1, 1, 1)) & (yy < y1.view(-1, 1, 1))
           & (xx >= x0.view(-1, 1, 1)) & (xx < x1.view(-1, 1, 1)))  # (B, h, w)
    pasted = box.flatten(1).float().mean(1).to(x.device)  # exact area fraction
    mask = (box if x.dim() == 3 else box[:, None]).to(x.device)
    perm = perm.to(x.device)
    mixed = torch.where(mask, x[perm], x)
    targets = one_hot_targets(labels, num_classes, smoothing).to(x.device)
    targets = (1.0 - pasted)[:, None] * targets + pasted[:, None] * targets[perm]
    return mixed, targets


def mixup(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float = 0.8,
          gen: torch.Generator | None = None, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup on embeddings: lambda ~ Beta(alpha, alpha) per sample, partner from a permutation.

    emb float (B, D, h, w); labels int64 (B,) or float (B, C). Returns (float (B, D, h, w),
    targets float32 (B, C) with rows summing to 1).
    """
    bsz = emb.shape[0]
    lam = _beta(alpha, bsz, gen).to(emb.device)
    perm = torch.randperm(bsz, generator=gen).to(emb.device)
    lam_e = lam.to(emb.dtype).view(-1, 1, 1, 1)
    mixed = lam_e * emb + (1.0 - lam_e) * emb[perm]
    targets = one_hot_targets(labels, num_classes, smoothing).to(emb.device)
    targets = lam[:, None] * targets + (1.0 - lam)[:, None] * targets[perm]
    return mixed, targets


# -- embedding-space photometric ops --------------------------------------------------------------

def embedding_noise(emb: torch.Tensor, p: float, scale: float = 1.0, std: float = 1.0,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """SeiT's Noise: with probability ``p`` per sample add N(0, scale) per channel + N(0, std) per position.

    emb float (B, D, h, w) -> float (B, D, h, w) (a new tensor; the input is not modified).
    """
    b, d = emb.shape[:2]
    on = (torch.rand(b, generator=gen) < p).to(emb).view(-1, 1, 1, 1)
    noise = torch.randn((b, d, 1, 1), generator=gen) * scale + torch.randn(emb.shape, generator=gen) * std
    return emb + on * noise.to(emb)


def color_adapt(emb: torch.Tensor, p: float, gen: torch.Generator | None = None, eps: float = 1e-5) -> torch.Tensor:
    """ColorAdapt (SeiT++): with probability ``p`` per sample, AdaIN with another batch sample's statistics.

    The style partner comes from a random permutation of the batch. emb float (B, D, h, w) -> same.
    Statistics are computed once and permuted (AdaIN only needs the partner's mean/std), and
    unselected samples get scale 1 / shift 0, so the map is a single fused multiply-add.
    """
    bsz = emb.shape[0]
    on = (torch.rand(bsz, generator=gen) < p).view(-1, 1, 1, 1).to(emb.device)
    perm = torch.randperm(bsz, generator=gen).to(emb.device)
    mu, sd = channel_stats(emb, eps)
    scale = torch.where(on, sd[perm] / sd, torch.ones_like(sd))
    shift = torch.where(on, mu[perm] - mu * scale, torch.zeros_like(mu))
    return torch.addcmul(shift, emb, scale)


# -- the composed transform -----------------------------------------------------------------------

@dataclass(frozen=True)
class TokenAugConfig:
    """Settings of ``TokenAugment``; every op is off at its zero value.

    output: "ids" (``tokens`` re-quantised ids) or "embeddings" (adds ``embeddings`` float32).
    out_hw: output grid (h', w'); None keeps the input grid.
    replace_p, synonym_k: per-token synonym replacement probability, synonyms per code.
    swap_p, swap_scale: per-sample SwapCode probability and patch side range (fraction of min(h, w)).
    rrc, rrc_scale, rrc_ratio, interpolation: random resized crop; "bicubic"/"bilinear" resample the
        embedding map (training side), "nearest" gathers ids (cheap: the data path's choice).
    hflip_p: per-sample horizontal flip probability.
    color_adapt_p: per-sample ColorAdapt probability.
    noise_p, noise_scale, noise_std: SeiT Noise.
    cutmix_alpha, mixup_alpha: Beta parameters (0 = off); with both on, one of them per batch
        (Mixup with probability ``mix_switch_p``). mix_p: probability a batch is mixed at all.
    num_classes, label_smoothing: for the soft ``target`` (needed when mixing is on; the trainer fills
        num_classes 0 with the data's classes).
    metric: requantisation metric, "l2" or "cosine".
    seed: base seed of the transform's own generator (see ``TokenAugment``).
    tokenadapt: URL of a TokenAdapt checkpoint (``pipeline.adapters``, trained for the data's tokenizer):
        the random resized crop and flip of a ``tokenadapt_p`` share of the samples go through it
        (``pretrain.augment_adapters``), with probability ``affine_p`` also a rotation / shift / shear in
        the ranges it was trained on; the other samples take the ``interpolation`` path.
    coloradapt: URL of a learned ColorAdapt checkpoint: the ``color_adapt_p`` samples get colour jitter
        through it (ids -> ids) instead of AdaIN with another sample's statistics.
    in_step: run the whole transform in the training step, batched on the rank's device, instead of in
        the DataLoader workers; None: in the step exactly when an adapter is given (models belong on the
        accelerator). Randomness is keyed by the batch either way (``BatchSeededAugment``).
    """

    output: str = "ids"
    out_hw: tuple[int, int] | None = None
    replace_p: float = 0.0
    synonym_k: int = 8
    swap_p: float = 0.0
    swap_scale: tuple[float, float] = (0.0, 0.25)
    rrc: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip_p: float = 0.5
    color_adapt_p: float = 0.0
    noise_p: float = 0.0
    noise_scale: float = 1.0
    noise_std: float = 1.0
    cutmix_alpha: float = 0.0
    mixup_alpha: float = 0.0
    mix_p: float = 1.0
    mix_switch_p: float = 0.5
    num_classes: int = 0
    label_smoothing: float = 0.0
    metric: str = "l2"
    seed: int = 0
    tokenadapt: str | None = None
    tokenadapt_p: float = 1.0
    affine_p: float = 0.0
    coloradapt: str | None = None
    in_step: bool | None = None

    def __post_init__(self) -> None:
        if self.output not in ("ids", "embeddings"):
            raise ValueError(f"output must be 'ids' or 'embeddings', got {self.output!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bicubic', 'bilinear' or 'nearest', got {self.interpolation!r}")
        if self.interpolation == "nearest" and self.output == "embeddings":
            raise ValueError("interpolation='nearest' is the ids-only crop; use bicubic or bilinear for embeddings")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        if self.num_classes < 0:
            raise ValueError(f"augment.num_classes must be >= 0 (0: the data's classes), got {self.num_classes}")
        if self.mixup_alpha > 0 and self.output == "ids":
            raise ValueError("mixup blends embeddings and has no id form; use output='embeddings'")
        for name in ("tokenadapt_p", "affine_p", "color_adapt_p", "hflip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tokenadapt and self.out_hw is not None:
            raise ValueError("augment.tokenadapt keeps the grid; set augment.out_hw: null")
        if self.affine_p > 0 and not self.tokenadapt:
            raise ValueError("augment.affine_p warps through TokenAdapt; set augment.tokenadapt to a checkpoint")
        if self.coloradapt and self.color_adapt_p == 0:
            raise ValueError("augment.coloradapt is used on augment.color_adapt_p of the samples; set it above 0")
        if self.in_step is False and (self.tokenadapt or self.coloradapt):
            raise ValueError("augment.tokenadapt / augment.coloradapt run in the training step, batched on the rank's "
                             "device; leave augment.in_step unset (or true)")

    @property
    def runs_in_step(self) -> bool:
        """Whether the trainer runs this transform in the training step (on the rank's device)."""
        return self.in_step if self.in_step is not None else bool(self.tokenadapt or self.coloradapt)

    @property
    def mixing(self) -> bool:
        return self.cutmix_alpha > 0 or self.mixup_alpha > 0

    @property
    def needs_embeddings(self) -> bool:
        """Whether any op needs the embedding map (otherwise ids mode never leaves ids)."""
        resample = (self.rrc or self.out_hw is not None) and self.interpolation != "nearest" and not self.tokenadapt
        return (self.output == "embeddings" or resample or (self.color_adapt_p > 0 and not self.coloradapt)
                or self.noise_p > 0 or self.mixup_alpha > 0)

    def replace(self, **changes) -> TokenAugConfig:
        return dataclasses.replace(self, **changes)


class TokenAugment:
    """Batch dict -> batch dict token augmentation, for ``TokenStream(batch_transform=...)`` or the trainer.

    Reads ``tokens`` int64 (B, h, w) and ``label`` int64 (B,). Writes:

    - ``tokens``: int64 (B, h', w') augmented ids in ids mode; in embeddings mode left as given.
    - ``embeddings``: float32 (B, D, h', w') in embeddings mode.
    - ``target``: float32 (B, C) soft labels when mixing is on (``label`` is kept as is).

    Other keys (``labelmap``, ``view_tokens``, ``crop_box``, ...) pass through unchanged and
    describe the un-augmented sample. Order: see the module docstring.

    Randomness: pass ``generator=`` to ``__call__`` for full control. Otherwise the transform
    uses its own generator, created lazily in the process that first uses it and seeded from
    ``config.seed`` and, inside a DataLoader worker, the worker's seed (which torch derives per
    epoch from the main process's RNG), so workers and epochs differ yet a seeded run repeats.
    """

    def __init__(self, config: TokenAugConfig, codebook: torch.Tensor, synonyms: torch.Tensor | None = None,
                 tokenadapt: torch.nn.Module | None = None, coloradapt: torch.nn.Module | None = None):
        """codebook float (K, D); synonyms: int64 (K, S) given synonym lists (SeiT's ``synonyms.json``, first
        ``synonym_k`` of each row used), else the ``synonym_k`` most cosine-similar codes. Mixing needs
        ``config.num_classes`` >= 1 (ValueError). tokenadapt, coloradapt: the loaded models of
        ``config.tokenadapt`` / ``config.coloradapt`` (``pipeline.adapters``; required when those are set)."""
        if config.mixing and config.num_classes < 1:
            raise ValueError("num_classes must be set when cutmix_alpha or mixup_alpha > 0")
        if bool(config.tokenadapt) != (tokenadapt is not None) or bool(config.coloradapt) != (coloradapt is not None):
            raise ValueError("pass the TokenAdapt / ColorAdapt models exactly when augment.tokenadapt / "
                             "augment.coloradapt are set")
        self.adapters = AdapterOps(tokenadapt, coloradapt)
        self.config = config
        self.codebook = codebook.float().contiguous()
        needs_table = config.replace_p > 0
        if needs_table and synonyms is not None and synonyms.shape[1] > 0:
            self.table = torch.as_tensor(synonyms, dtype=torch.long)[:, :config.synonym_k].contiguous()
        else:
            self.table = synonym_table(self.codebook, config.synonym_k) if needs_table else None
        self._gen: torch.Generator | None = None
        self._gen_key: tuple[int, int] | None = None

    def to(self, device: torch.device | str) -> TokenAugment:
        """Move the codebook, synonym table and adapters to ``device`` (in place); returns self."""
        self.codebook = self.codebook.to(device)
        self.table = None if self.table is None else self.table.to(device)
        self.adapters.to(device)
        return self

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = (self.config.seed, info.seed if info is not None else -1)
        if self._gen is None or self._gen_key != key:
            seed = (self.config.seed * 0x9E3779B1 + (key[1] + 1)) % (2**63 - 1)
            self._gen = torch.Generator().manual_seed(seed)
            self._gen_key = key
        return self._gen

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        gen = generator if generator is not None else self._generator()
        ids = batch["tokens"]
        labels = batch["label"]
        out = dict(batch)
        mix = self._choose_mix(gen)
        # 1. Token-EDA and flip on ids (exact, and cheapest there).
        if cfg.replace_p > 0:
            ids = replace_synonyms(ids, self.table, cfg.replace_p, gen)
        if cfg.swap_p > 0:
            ids = swap_patches(ids, cfg.swap_scale, gen, p=cfg.swap_p)
        if self.adapters.tokenadapt is not None:  # crop + flip (+ affine) through TokenAdapt, on ids
            ids = self.adapters.geometry(ids, cfg, self.codebook, gen)
        elif cfg.hflip_p > 0:
            ids = random_hflip(ids, cfg.hflip_p, gen)
        if self.adapters.tokenadapt is None and cfg.interpolation == "nearest" and (cfg.rrc or cfg.out_hw is not None):
            hw = tuple(ids.shape[-2:])
            boxes = (random_resized_crop_params(ids.shape[0], cfg.rrc_scale, cfg.rrc_ratio, gen, hw) if cfg.rrc
                     else torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(ids.shape[0], 4))
            ids = crop_ids(ids, boxes, cfg.out_hw)
        if self.adapters.coloradapt is not None:  # colour commutes with geometry in pixels: here, on ids
            ids = self.adapters.colour(ids, cfg.color_adapt_p, gen)
        target = None
        # 2. Embedding-space ops; mixup happens there, cutmix on whatever form is output.
        if cfg.needs_embeddings:
            emb = self._embedding_ops(ids, gen)
            if mix == "mixup":
                emb, target = mixup(emb, labels, cfg.num_classes, cfg.mixup_alpha, gen, cfg.label_smoothing)
            if cfg.output == "embeddings":
                if mix == "cutmix":
                    emb, target = cutmix(emb, labels, cfg.num_classes, cfg.cutmix_alpha, gen, cfg.label_smoothing)
                out["embeddings"] = emb
            else:
                ids = requantize(emb, self.codebook, cfg.metric)
        if cfg.output == "ids":
            if mix == "cutmix":
                ids, target = cutmix(ids, labels, cfg.num_classes, cfg.cutmix_alpha, gen, cfg.label_smoothing)
            out["tokens"] = ids
        if cfg.mixing:
            out["target"] = target if target is not None else one_hot_targets(
                labels, cfg.num_classes, cfg.label_smoothing)
        return out

    def _choose_mix(self, gen: torch.Generator) -> str | None:
        """None, "cutmix" or "mixup" for this batch (drawn first so the other ops' draws do not depend on it)."""
        cfg = self.config
        if not cfg.mixing:
            return None
        u = torch.rand(2, generator=gen)
        if u[0] >= cfg.mix_p:
            return None
        if cfg.cutmix_alpha > 0 and cfg.mixup_alpha > 0:
            return "mixup" if u[1] < cfg.mix_switch_p else "cutmix"
        return "mixup" if cfg.mixup_alpha > 0 else "cutmix"

    def _embedding_ops(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """embed -> random resized crop (or plain resize) -> ColorAdapt -> noise; float32 (B, D, h', w')."""
        cfg = self.config
        hw = tuple(ids.shape[-2:])
        out_hw = cfg.out_hw if cfg.out_hw is not None else hw
        emb = embed(ids, self.codebook)
        # Unless it already ran on ids (TokenAdapt, or the nearest-cell crop).
        geometry = self.adapters.tokenadapt is None and cfg.interpolation != "nearest"
        if geometry and cfg.rrc:
            boxes = random_resized_crop_params(ids.shape[0], cfg.rrc_scale, cfg.rrc_ratio, gen, hw)
            emb = crop_resize(emb, boxes, out_hw, cfg.interpolation)
        elif geometry and out_hw != hw:
            emb = F.interpolate(emb, size=out_hw, mode=cfg.interpolation, align_corners=False)
        if cfg.color_adapt_p > 0 and self.adapters.coloradapt is None:
            emb = color_adapt(emb, cfg.color_adapt_p, gen)
        if cfg.noise_p > 0:
            emb = embedding_noise(emb, cfg.noise_p, cfg.noise_scale, cfg.noise_std, gen)
        return emb


class BatchSeededAugment:
    """A TokenAugment whose randomness is a function of the batch's identity, for DataLoader workers.

    The generator is seeded from (seed, ``epoch``, first and last ``index``, batch size) of a
    ``TokenStream`` batch, so a batch is augmented the same way whichever worker, world size or
    resumed run produces it: a resumed training run sees exactly the inputs of one that never stopped.
    """

    def __init__(self, augment: TokenAugment, seed: int):
        self.augment = augment
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        index = batch["index"]
        key = [self.seed, int(batch["epoch"]), int(index[0]), int(index[-1]), len(index)]
        state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)
        return self.augment(batch, generator=torch.Generator().manual_seed(int(state[0]) >> 1))
