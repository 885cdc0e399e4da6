"""Semantic segmentation (ADE20K, 150 classes) on token grids: the fine-tuning objective and its evaluation.

A ViT (``self.encoder``, loaded from any pre-trained backbone by ``init`` exactly as in ``classify``) plus
a decoder head. The encoder reads the token ids (token stem: MTM's and M3I's backbones), or, with
``decoder`` (a tokenizer checkpoint: the data's, fingerprint checked), the pixels that tokenizer's frozen
decoder makes of the ids (pixel stem of ``pixel_patch`` px: ADDP's backbone, as in ADDP's ADE20K
fine-tuning; the same decoding as ``classify``'s, ``pixel_decoders.decoded_input``). Crops, flips, windows and
grids stay in token units either way: the ids are cropped, then decoded. ``forward`` bilinearly
upsamples the head's logits to the label map (``batch["labelmap"]`` uint8 (B, L, L), 0 = other,
1..150) and takes cross-entropy over the labelled pixels (targets ``metrics.ade20k_targets``: 0..149,
255 = ignore). Two heads:

- ``pup`` (SETR-PUP, the default): ``pup_stages`` x (3x3 conv-norm-ReLU + 2x bilinear upsampling)
  on the last block. Logits at 2 ** pup_stages x the patch grid.
- ``upernet`` (BEiT / MAE ADE20K setup): the outputs of 4 blocks become a pyramid at 4x, 2x, 1x
  and 1/2x the patch grid (deconv-norm-GELU-deconv / deconv / identity / max-pool), fused by
  UperNet (PPM on the top level + FPN top-down path + 3x3 fusion). Logits at 4x the patch grid.

Why ``pup`` is the default (``bench/seg_heads.py``: MTM ViT-Tiny depth-4 backbone, 256 px tokens,
128 px label maps, channels 64, 100 steps of 4 images, 2 seeds): it fitted faster (train mIoU
0.075 / 0.100 vs 0.037 / 0.038, pixel accuracy 0.55 / 0.62 vs 0.47 / 0.47) at 1.13 vs 3.22
forward GFLOPs per sample (head 0.21 vs 2.30) and ~0.6x the step time on 2 CPU cores. Four
images measure fitting speed and cost, not generalisation; ``upernet`` is the head BEiT/MAE
report ADE20K numbers with, so use it to compare with them.

Geometric augmentation: the trainer's token augmentation (``augment`` section) moves tokens but
not label maps, so ``load_config`` refuses its geometric ops for this objective (``Segment.needs``:
``DataNeeds(token_geometry=False)``). Instead the objective crops and flips tokens and label maps
together in ``forward`` while training (``crop_side``, ``hflip_p``; nearest, the same normalised box
for both, torch's global generator, which the trainer reseeds every step, so resume stays exact).

Settings and origins (BEiT / MAE ADE20K fine-tuning in mmsegmentation; ours where noted):

===================== =========== ================================================================
head pup              SETR, ours  default by measurement (above); ``upernet``: BEiT, MAE
out_indices ()        ours        4 blocks evenly spaced, the last one last (BEiT/MAE ViT-B: 3,5,7,11)
pyramid 4x/2x/1x/.5x  BEiT, MAE   ``fpn1..fpn4``; the last block goes through the encoder's final norm
pool_scales 1,2,3,6   mmseg       UperNet's PPM
channels 64           ours        decoder width for CPU (BEiT/MAE UperNet: 768; SETR-PUP: 256)
pup_stages 2          ours        SETR-PUP: 4 (16x); 2 gives logits at 1/4 of the image, as UperNet
norm gn               ours        mmseg: SyncBN over 16 images; per-rank CPU batches are 2-8, so
                                  GroupNorm (batch-independent; ``bn`` is available)
dropout 0.1           mmseg       Dropout2d before the 1x1 classifier (init normal std 0.01)
loss                  mmseg       CE on logits upsampled to the label map, ignore 255; mean over
                                  labelled pixels (PyTorch's; mmseg averages over all by default)
label_smoothing 0     mmseg
decoder ""            ADDP        a tokenizer checkpoint: pixel-stem backbone on decoded ids (ADDP's
                                  UperNet fine-tuning reads pixels); ``pretrain.finetune --init`` of a
                                  pixel-stem backbone sets it to the data's tokenizer.pt
crop_side 0.5-1.0     mmseg/ours  mmseg: resize ratio 0.5-2.0 then crop; only the zoom-in half
                                  (there is no padding token for zoom-out)
hflip_p 0.5           mmseg       RandomFlip
slide stride 2/3      mmseg       crop 512 / stride 341: default stride = window * 2 // 3
layer decay 0.65      BEiT, MAE   ``optim.layer_decay`` in configs/finetune_seg_tiny.yaml
===================== =========== ================================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.augment_geometry import crop_ids
from pretrain.metrics import IGNORE_INDEX, ConfusionMatrix, ade20k_targets
from pretrain.objectives.base import Asset, DataNeeds, DataSpec, Objective, fine_tune_assets
from pretrain.objectives.parts import decoded_input, init_backbone, pixel_decoder_for
from pretrain.objectives.registry import register_objective
from pretrain.vit import VisionTransformer, ViTConfig, interpolate_pos_embed

__all__ = ["SegmentConfig", "Segment", "evaluate_segmentation", "class_names_of"]

HEADS = ("upernet", "pup")


@dataclass(frozen=True)
class SegmentConfig:
    init: str = ""  # backbone.pt or a trainer checkpoints dir; "" = from scratch
    head: str = "pup"  # "pup" | "upernet"
    channels: int = 64  # decoder width
    out_indices: tuple[int, ...] = ()  # upernet: 4 block indices; () = evenly spaced, ending at the last
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)  # upernet PPM
    pup_stages: int = 2  # pup: conv + 2x upsampling stages
    norm: str = "gn"  # "gn" | "bn"
    dropout: float = 0.1
    num_classes: int = 150
    label_smoothing: float = 0.0
    crop_side: tuple[float, float] = (0.5, 1.0)  # side of the random square crop, fraction of the grid
    hflip_p: float = 0.5
    decoder: str = ""  # tokenizer checkpoint: a pixel-stem encoder on the ids decoded to pixels (ADDP's backbone)
    pixel_patch: int = 16  # px per patch side of that pixel-stem encoder

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"objective segment: {field} {msg}, got {getattr(self, field)!r}")

        need(self.head in HEADS, "head", f"must be one of {HEADS}")
        need(self.norm in ("gn", "bn"), "norm", "must be 'gn' or 'bn'")
        for name in ("channels", "pup_stages", "num_classes", "pixel_patch"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        need(0.0 <= self.hflip_p <= 1.0, "hflip_p", "must be in [0, 1]")
        side, scales, idx = self.crop_side, self.pool_scales, self.out_indices
        need(isinstance(side, tuple) and len(side) == 2 and all(isinstance(v, int | float) for v in side)
             and 0.0 < side[0] <= side[1] <= 1.0, "crop_side", "must be [lo, hi] with 0 < lo <= hi <= 1")
        need(isinstance(scales, tuple) and len(scales) >= 1 and all(isinstance(v, int) and v >= 1 for v in scales),
             "pool_scales", "must be a list of ints >= 1")
        need(isinstance(idx, tuple) and len(idx) in (0, 4) and all(isinstance(i, int) for i in idx)
             and list(idx) == sorted(idx), "out_indices", "must be [] or 4 non-decreasing block indices")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(math.gcd(32, channels), channels)


def _conv(kind: str, cin: int, cout: int, k: int) -> nn.Sequential:
    """mmseg's ConvModule: conv (no bias) -> norm -> ReLU; 'same' padding."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _norm(kind, cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                       align_corners=False)


class UperNetHead(nn.Module):
    """BEiT/MAE neck + UperNet: 4 maps float (B, D, n, n) -> logits (B, classes, 4n, 4n)."""

    def __init__(self, dim: int, cfg: SegmentConfig):
        super().__init__()
        c, nk = cfg.channels, cfg.norm
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), _norm(nk, dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn4 = nn.MaxPool2d(2)
        self.lateral = nn.ModuleList(_conv(nk, dim, c, 1) for _ in range(3))
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(nk, dim, c, 1)) for s in cfg.pool_scales)
        self.ppm_bottleneck = _conv(nk, dim + len(cfg.pool_scales) * c, c, 3)
        self.fpn = nn.ModuleList(_conv(nk, c, c, 3) for _ in range(3))
        self.fuse = _conv(nk, 4 * c, c, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(c, cfg.num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = [self.fpn1(feats[0]), self.fpn2(feats[1]), feats[2], self.fpn4(feats[3])]
        top = x[3]
        pooled = [_resize(m(top), top.shape[-2:]) for m in self.ppm]
        lat = [conv(f) for conv, f in zip(self.lateral, x[:3])] + [self.ppm_bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(3, 0, -1):  # top-down path
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(f) for conv, f in zip(self.fpn, lat[:3])] + [lat[3]]
        size = outs[0].shape[-2:]
        return self.cls(self.dropout(self.fuse(torch.cat([_resize(o, size) for o in outs], 1))))


class PUPHead(nn.Module):
    """SETR-PUP: last map float (B, D, n, n) -> logits (B, classes, n * 2**stages, n * 2**stages)."""

    def __init__(self, dim: int, cfg: SegmentConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(cfg.pup_stages):
            layers += [_conv(cfg.norm, dim if i == 0 else cfg.channels, cfg.channels, 3),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
        self.up = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(cfg.channels, cfg.num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.cls(self.dropout(self.up(feats[-1])))


@register_objective
class Segment(Objective):
    """``forward(batch) -> (loss, {"acc", "miou_batch"})``.

    ``batch["tokens"]`` int64 (B, h, w) ids with (h, w) the training grid; ``batch["labelmap"]`` uint8
    (B, L, L) stored ADE20K labels. ``acc``: pixel accuracy over labelled pixels; ``miou_batch``: mean
    IoU over the classes present in the batch's targets or predictions (a training signal only; the
    split's mIoU is ``evaluate_segmentation``'s). Both are 0-dim float tensors, 0 when no pixel is labelled.
    ``vq``: the frozen pixel decoder with ``decoder`` (kept in eval mode, saved with the objective), else None.
    """

    name = "segment"
    config_class = SegmentConfig
    needs = DataNeeds(labelmap=True, token_geometry=False)

    def __init__(self, cfg: SegmentConfig, vit: ViTConfig, data: DataSpec):
        super().__init__()
        if vit.stem != "token":
            raise ValueError(f"objective segment needs model.stem 'token' (a pixel-stem backbone reads decoded ids: "
                             f"set objective.decoder), got {vit.stem!r}")
        self.cfg = cfg
        self.token_grid = int(data.grid[0])  # slide windows and crops are in token units
        self.vq = None
        if cfg.decoder:
            self.vq, vit = pixel_decoder_for(cfg.decoder, vit, data, cfg.pixel_patch, "objective")
        self.encoder = VisionTransformer(dataclasses.replace(vit, num_classes=0))
        depth = vit.depth
        idx = cfg.out_indices or tuple(max(0, (i + 1) * depth // 4 - 1) for i in range(4))
        if cfg.head == "pup":
            idx = (depth - 1,)
        if idx[-1] != depth - 1 or idx[0] < 0:
            raise ValueError(f"objective segment: out_indices {idx} must lie in [0, {depth}) and end with the "
                             f"last block ({depth - 1}), so that every encoder weight is trained")
        if cfg.head == "upernet" and vit.grid_size < 2:
            raise ValueError(f"objective segment: head upernet needs a patch grid >= 2, got {vit.grid_size}")
        self.out_indices = idx
        init_backbone(self.encoder, cfg.init)
        self.head = (UperNetHead if cfg.head == "upernet" else PUPHead)(vit.embed_dim, cfg)
        nn.init.normal_(self.head.cls.weight, std=0.01)
        nn.init.zeros_(self.head.cls.bias)

    @classmethod
    def assets(cls, cfg: SegmentConfig) -> tuple[Asset, ...]:
        """``init`` and ``decoder`` (``base.fine_tune_assets``)."""
        return fine_tune_assets(cfg.init, cfg.decoder)

    def train(self, mode: bool = True) -> Segment:
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()
        return self

    # -- the network ------------------------------------------------------------------------------

    @property
    def token_multiple(self) -> int:
        """Token grids must have sides that are multiples of this: the patch in tokens (token stem), or the
        fewest tokens whose decoded pixels tile whole patches (pixel stem)."""
        p = self.encoder.cfg.patch_size
        if self.vq is None:
            return p
        f = self.vq.resolution // self.vq.grid[0]  # px per token
        return p // math.gcd(p, f)

    def stem_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w) -> what the encoder's patch embedding reads: the token embedding float
        (B, token_dim, h, w), or with ``decoder`` the decoded, normalised pixels float (B, 3, h f, w f)."""
        if self.vq is not None:
            return decoded_input(self.vq, tokens, self.encoder.pos_embed.dtype)
        return self.encoder.token_embed(tokens)

    def features(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """ids int64 (B, h, w) (h, w multiples of ``token_multiple``) -> float (B, D, gh, gw) per ``out_indices``
        (gh = h / patch for the token stem, h f / pixel_patch for the pixel stem).

        A grid other than the training grid gets bicubically resized position embeddings
        (``vit.interpolate_pos_embed``; square grids only). The last block's output goes through the
        encoder's final LayerNorm (``norm``, or ``fc_norm`` with avg pooling); earlier ones are raw.
        """
        enc = self.encoder
        m, prefix = self.token_multiple, enc.cfg.num_prefix_tokens
        if tokens.is_floating_point() or tokens.ndim != 3 or tokens.shape[1] % m or tokens.shape[2] % m:
            raise ValueError(f"tokens must be int ids (B, h, w) with h, w multiples of {m}, got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        stem = self.stem_input(tokens)
        gh, gw = stem.shape[-2] // enc.cfg.patch_size, stem.shape[-1] // enc.cfg.patch_size
        pos = enc.pos_embed
        if (gh, gw) != (enc.cfg.grid_size,) * 2:
            if gh != gw:
                raise ValueError(f"a {tokens.shape[1]}x{tokens.shape[2]} token grid needs resized position "
                                 f"embeddings, which exist for square grids only; use mode='slide'")
            pos = interpolate_pos_embed(pos, gh, prefix)
        x = enc.patch_embed(stem) + pos[:, prefix:]
        if enc.cls_token is not None:
            x = torch.cat([(enc.cls_token + pos[:, :prefix]).expand(x.shape[0], -1, -1), x], 1)
        x = enc.pos_drop(x)
        last_norm = enc.fc_norm if enc.cfg.global_pool == "avg" else enc.norm
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = enc.blocks[i](x)
            for _ in range(self.out_indices.count(i)):
                y = last_norm(x) if i == self.out_indices[-1] else x
                outs.append(y[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
        return outs

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """ids int64 (B, h, w) -> float (B, num_classes, s*h/p, s*w/p) at the head's resolution
        (s = 4 for upernet, 2 ** pup_stages for pup)."""
        return self.head(self.features(tokens))

    # -- training ---------------------------------------------------------------------------------

    def augment(self, tokens: torch.Tensor, labelmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random square crop (side ~ U(crop_side) of the grid, uniform position) resized back by nearest
        gather, then a horizontal flip with probability ``hflip_p``; the same normalised box and flip
        for ids int64 (B, h, w) and labels uint8 (B, L, L). Draws from torch's global generator."""
        b = tokens.shape[0]
        lo, hi = self.cfg.crop_side
        side = torch.rand(b, dtype=torch.float64) * (hi - lo) + lo
        corner = torch.rand(b, 2, dtype=torch.float64) * (1 - side)[:, None]
        flip = torch.rand(b) < self.cfg.hflip_p
        if lo < 1.0:
            boxes = torch.stack([corner[:, 0], corner[:, 1], corner[:, 0] + side, corner[:, 1] + side], 1)
            tokens = crop_ids(tokens.cpu(), boxes).to(tokens.device)
            labelmap = crop_ids(labelmap.cpu(), boxes).to(labelmap.device)
        if flip.any():
            tokens = torch.where(flip.to(tokens.device)[:, None, None], tokens.flip(-1), tokens)
            labelmap = torch.where(flip.to(labelmap.device)[:, None, None], labelmap.flip(-1), labelmap)
        return tokens, labelmap

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, labelmap = batch["tokens"], batch.get("labelmap")
        if not torch.is_tensor(labelmap) or labelmap.ndim != 3 or labelmap.shape[0] != tokens.shape[0]:
            raise ValueError("objective segment needs batch['labelmap'] uint8 (B, L, L): tokenise ADE20K with "
                             "`python -m pipeline.tokenise --dataset ade20k` (every sample labelled, one size)")
        if "target" in batch or "embeddings" in batch:
            raise ValueError("objective segment: CutMix/Mixup or embedding output in the augment section do not "
                             "transform label maps; set augment: null (configs/finetune_seg_tiny.yaml)")
        if self.training:
            tokens, labelmap = self.augment(tokens, labelmap)
        target = ade20k_targets(labelmap)
        logits = _resize(self.logits(tokens).float(), target.shape[-2:])
        keep = target != IGNORE_INDEX
        labelled = keep.sum().clamp_min(1)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum",
                               label_smoothing=self.cfg.label_smoothing) / labelled
        with torch.no_grad():
            pred = logits.argmax(1)
            acc = ((pred == target) & keep).sum() / labelled
            c = self.cfg.num_classes
            cm = torch.bincount(target[keep] * c + pred[keep], minlength=c * c).reshape(c, c).double()
            union = cm.sum(0) + cm.sum(1) - cm.diag()
            iou = cm.diag()[union > 0] / union[union > 0]
            miou = iou.mean() if len(iou) else iou.new_zeros(())
        return loss, {"acc": acc.float(), "miou_batch": miou.float()}

    # -- inference --------------------------------------------------------------------------------

    def predict(self, tokens: torch.Tensor, out_size: tuple[int, int], mode: str = "whole",
                window: int | None = None, stride: int | None = None) -> torch.Tensor:
        """Logits float32 (B, num_classes, H_out, W_out) for ids int64 (B, H, W) of any grid size.

        ``whole``: one pass over the grid (position embeddings resized when it is not the training
        grid), logits bilinearly resized to ``out_size`` (px of the label map). ``slide``
        (mmsegmentation's slide inference): ``window`` x ``window`` token crops (default: the
        training grid) every ``stride`` cells (default ``window * 2 // 3``; the last crop of a row or
        column is moved back to end at the border), each crop's logits resized to its area of an
        accumulation map at f = max(1, ceil(H_out / H), ceil(W_out / W)) px per token, overlaps
        averaged (count map), then resized to ``out_size``. With window == grid, slide equals whole
        exactly when ``out_size`` is a multiple of the grid (label maps from the pipeline are).
        Call under ``torch.no_grad()`` and ``eval()`` for inference.
        """
        h_out, w_out = int(out_size[0]), int(out_size[1])
        if mode == "whole":
            return _resize(self.logits(tokens).float(), (h_out, w_out))
        if mode != "slide":
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        b, h, w = tokens.shape
        win = window or self.token_grid
        step = stride or max(1, win * 2 // 3)
        if win > h or win > w or step < 1:
            raise ValueError(f"slide: window {win} (stride {step}) must fit the {h}x{w} token grid; use mode='whole'")
        f = max(1, math.ceil(h_out / h), math.ceil(w_out / w))
        ys = sorted({min(i * step, h - win) for i in range((max(h - win, 0) + step - 1) // step + 1)})
        xs = sorted({min(i * step, w - win) for i in range((max(w - win, 0) + step - 1) // step + 1)})
        crops = torch.cat([tokens[:, y:y + win, x:x + win] for y in ys for x in xs])
        crop_logits = _resize(self.logits(crops).float(), (win * f, win * f))
        total = crop_logits.new_zeros(b, crop_logits.shape[1], h * f, w * f)
        count = crop_logits.new_zeros(1, 1, h * f, w * f)
        for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
            total[:, :, y * f:(y + win) * f, x * f:(x + win) * f] += crop_logits[k * b:(k + 1) * b]
            count[:, :, y * f:(y + win) * f, x * f:(x + win) * f] += 1
        return _resize(total / count, (h_out, w_out))


# -- helpers for the trainer and the evaluator ----------------------------------------------------

def class_names_of(manifest, num_classes: int = 150) -> tuple[str, ...]:
    """The ``num_classes`` names of the manifest's label map (objectInfo150, "other" dropped), else ()."""
    names = list((manifest.meta.labelmap or {}).get("names") or ())
    if len(names) == num_classes + 1:
        names = names[1:]
    return tuple(names) if len(names) == num_classes and len(set(names)) == num_classes else ()


@torch.no_grad()
def evaluate_segmentation(objective: Segment, stream, device: str | torch.device = "cpu", mode: str = "whole",
                          window: int | None = None, stride: int | None = None, chunk: int = 8) -> dict:
    """mIoU / pixel accuracy / per-class IoU of ``objective`` over every real sample of ``stream``.

    ``stream``: a ``storage.stream.TokenStream`` over a split with label maps, read once (padding
    left out). Logits come from ``objective.predict(tokens, label map size, mode, window, stride)``
    on ``chunk`` samples at a time; the argmax is scored against ``ade20k_targets`` (ignore 255) in
    one ``ConfusionMatrix``. Returns {"miou", "pixel_accuracy", "per_class_iou": {name or index:
    IoU or None when the class is neither present nor predicted}, "samples", "mode", "window", "stride"}.
    """
    objective = objective.to(device).eval()
    cm = ConfusionMatrix(objective.cfg.num_classes)
    n = 0
    for b in stream:
        keep = ~b["pad"]
        if not keep.any():
            continue
        if not torch.is_tensor(b.get("labelmap")) or b["labelmap"].ndim != 3:
            raise ValueError("evaluating segmentation needs label maps of one size in every sample of the split")
        tokens, maps = b["tokens"][keep], b["labelmap"][keep]
        for i in range(0, len(tokens), chunk):
            target = ade20k_targets(maps[i:i + chunk])
            logits = objective.predict(tokens[i:i + chunk].to(device), target.shape[-2:], mode, window, stride)
            cm.update(logits.argmax(1).cpu(), target)
        n += len(tokens)
    names = class_names_of(stream.manifest, objective.cfg.num_classes) if hasattr(stream, "manifest") else ()
    return {**cm.report(names), "samples": n, "mode": mode, "window": window, "stride": stride}
