"""The pieces objectives are made of, so that an objective is a short composition of named stages.

Small parts (masking draws, the masked encoder pass, decoder blocks, the tied sub-token head), the stack MTM
and M3I share (``MaskedTokenObjective``: encoder, mask vector, decoder, tied head), frozen parts (``frozen_copy``,
``EMATeacher``; a tokenizer's pixel decoders: ``pixel_decoders``, re-exported) and loading a backbone. Views and
CutMix: ``pretrain.objectives.views``. Each part is a plain function or a small ``nn.Module`` of no objective.

Randomness: every draw comes from torch's global generator (or the ``generator`` passed), which the
trainer reseeds from (seed, rank, step) before each step. Construction order matters for identical
initial weights: each objective builds its parts in a fixed order and initialises its Linear layers
with ``xavier_linears`` in a fixed order.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import load_backbone, read_deepspeed
from pretrain.objectives.base import Objective
from pretrain.objectives.pixel_decoders import (  # noqa: F401  (re-exported: parts objectives compose)
    FrozenVQDecoder,
    KMeansPatchDecoder,
    decoded_input,
    frozen_decoder,
    load_frozen_decoder,
    normalize_input,
    pixel_decoder_for,
)
from pretrain.token_loss import TokenLoss, masked_sub_token_loss
from pretrain.vit import Block, VisionTransformer, ViTConfig, sincos_pos_embed_2d

__all__ = ["MaskedTokenConfig", "sample_mask_ratio", "random_masks", "patch_mean", "token_encoder",
           "masked_encoder_pass", "encode_with_masked", "decoder_slots", "decoder_blocks", "xavier_linears",
           "SubTokenHead", "TOKEN_HEAD_LEGACY_NAMES", "masked_token_ce", "MaskedTokenObjective", "frozen_copy",
           "set_dropout", "EMATeacher", "ema_momentum_at", "FrozenVQDecoder", "KMeansPatchDecoder",
           "frozen_decoder", "load_frozen_decoder", "normalize_input", "pixel_decoder_for", "decoded_input",
           "backbone_config", "load_pretrained", "init_backbone"]


# -- the masked-token settings --------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedTokenConfig:
    """What the masked-token stages read (masking, encoder pass, decoder, tied head): MTM's config and
    M3I's extend it. Defaults are SeiT++'s (``pretrain.objectives.mtm`` gives each one's origin)."""

    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.45
    mask_ratio_std: float = 0.25
    drop_ratio: float | None = None  # None: mask_ratio_min
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    decoder_dropout: float = 0.1
    token_dropout: float = 0.1
    label_smoothing: float = 0.0
    detach_head: bool = True
    table_init_std: float = 0.02  # std of the token-embedding table at init (S: 0.02); sets the head's logit scale

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"objective.{message}")

        need(0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0, f"mask_ratio_min/max: need 0 <= "
             f"mask_ratio_min <= mask_ratio_max <= 1, got {self.mask_ratio_min}, {self.mask_ratio_max}")
        need(self.mask_ratio_std > 0, f"mask_ratio_std must be > 0, got {self.mask_ratio_std}")
        need(self.drop_ratio is None or 0.0 <= self.drop_ratio <= self.mask_ratio_min,
             f"drop_ratio must lie in [0, mask_ratio_min={self.mask_ratio_min}] so dropped patches are always "
             f"masked, got {self.drop_ratio}")
        need(self.table_init_std > 0, f"table_init_std must be > 0, got {self.table_init_std}")
        need(min(self.decoder_dim, self.decoder_depth, self.decoder_heads) >= 1,
             "decoder_dim, decoder_depth and decoder_heads must be >= 1")
        need(self.decoder_dim % self.decoder_heads == 0,
             f"decoder_dim {self.decoder_dim} is not divisible by objective.decoder_heads {self.decoder_heads}")
        need(0.0 <= self.decoder_dropout < 1 and 0.0 <= self.token_dropout < 1 and 0.0 <= self.label_smoothing < 1,
             "decoder_dropout, token_dropout and label_smoothing must lie in [0, 1)")

    @property
    def drop(self) -> float:
        """The fraction of patches dropped (never seen by the encoder); always <= mask_ratio_min."""
        return self.mask_ratio_min if self.drop_ratio is None else self.drop_ratio


# -- masking --------------------------------------------------------------------------------------


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sample_mask_ratio(cfg, generator: torch.Generator | None = None) -> float:
    """One draw from N(mu, std) truncated to [min, max], by inverting the CDF (scipy's truncnorm law).

    ``cfg``: any config with ``mask_ratio_min``, ``mask_ratio_max``, ``mask_ratio_mu``, ``mask_ratio_std``."""
    lo = _normal_cdf((cfg.mask_ratio_min - cfg.mask_ratio_mu) / cfg.mask_ratio_std)
    hi = _normal_cdf((cfg.mask_ratio_max - cfg.mask_ratio_mu) / cfg.mask_ratio_std)
    u = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).item()
    return min(max(cfg.mask_ratio_mu + cfg.mask_ratio_std * z, cfg.mask_ratio_min), cfg.mask_ratio_max)


def random_masks(batch: int, n: int, n_masked: int, n_dropped: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masks over n positions.

    Returns ``masked`` bool (B, n) with exactly ``n_masked`` True per row, ``dropped`` bool (B, n)
    with exactly ``n_dropped`` True per row and dropped implies masked, and ``keep_index`` int64
    (B, n - n_dropped): the positions the encoder sees, in increasing order. Ranks of the noise
    are used instead of thresholds, so ties cannot change the counts.
    """
    if not 0 <= n_dropped <= n_masked <= n:
        raise ValueError(f"need 0 <= n_dropped ({n_dropped}) <= n_masked ({n_masked}) <= n ({n})")
    noise = torch.rand(batch, n, generator=generator, device=device)
    order = noise.argsort(dim=1)
    rank = order.argsort(dim=1)
    masked = rank < n_masked
    dropped = rank < n_dropped
    keep_index = order[:, n_dropped:].sort(dim=1).values
    return masked, dropped, keep_index


def patch_mean(per_token: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h, w) per-token values -> (B, h/p * w/p) means over each p x p patch (row-major patches)."""
    b, h, w = per_token.shape
    x = per_token.reshape(b, h // patch, patch, w // patch, patch)
    return x.mean(dim=(2, 4)).reshape(b, -1)


# -- the masked token encoder ---------------------------------------------------------------------


def token_encoder(vit: ViTConfig, data, who: str, table_init_std: float) -> VisionTransformer:
    """A token-stem ViT with a class token for ``data`` (``DataSpec``), its id table drawn normal(table_init_std).

    Refuses (ValueError naming ``who``) a pixel stem, a missing class token or a grid/K other than the data's."""
    if vit.stem != "token" or not vit.class_token:
        raise ValueError(f"{who} needs a token-stem ViT with a class token "
                         "(model.stem: token, model.class_token: true)")
    if (vit.grid, vit.grid) != tuple(data.grid) or vit.vocab_size != data.vocab_size:
        raise ValueError(f"model grid {vit.grid} / vocab {vit.vocab_size} do not match the data's "
                         f"grid {data.grid} / vocab {data.vocab_size}")
    encoder = VisionTransformer(vit)
    nn.init.normal_(encoder.token_embed.word_embeddings.weight, std=table_init_std)
    return encoder


def masked_encoder_pass(encoder: VisionTransformer, mask_token: torch.Tensor, token_dropout: nn.Module,
                        ids: torch.Tensor, masking) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAGE / SeiT++'s encoder step on ids int64 (B, h, w).

    ``masking``: a config with the ``mask_ratio_*`` fields and ``drop``. After the token embedding (and
    its dropout) one ratio r is drawn (``sample_mask_ratio``); ``ceil(r N)`` patches (random per sample)
    become ``mask_token`` (1, 1, D) and the ``ceil(drop N)`` of them with the smallest noise are dropped
    (never seen). Returns latent (B, 1 + N - n_drop, D) (cls first, final norm applied), masked bool
    (B, N) and keep_index int64 (B, N - n_drop). Draw order (dropout, ratio, noise) is part of the contract:
    it fixes which masks a seed gives."""
    x = encoder.patchify(token_dropout(encoder.token_embed(ids)))
    b, n, d = x.shape
    n_masked = math.ceil(n * sample_mask_ratio(masking))
    masked, _, keep_index = random_masks(b, n, n_masked, min(math.ceil(n * masking.drop), n_masked), x.device)
    x = torch.where(masked.unsqueeze(-1), mask_token.to(x.dtype), x) + encoder.pos_embed[:, 1:]
    x = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, d))
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(b, -1, -1)
    return encoder.norm(encoder.blocks(torch.cat([cls, x], dim=1))), masked, keep_index


def encode_with_masked(encoder: VisionTransformer, mask_token: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor,
                       token_dropout: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_encoder_pass`` with given masks: the ``masked`` bool (B, N) patches become the mask vector, none
    is dropped; ``token_dropout`` (None: none, the inference form) after the token embedding. Returns latent
    (B, 1 + N, D) and keep_index (B, N) (all)."""
    x = encoder.token_embed(ids)
    x = encoder.patchify(x if token_dropout is None else token_dropout(x))
    b, n, _ = x.shape
    x = torch.where(masked.unsqueeze(-1), mask_token.to(x.dtype), x) + encoder.pos_embed[:, 1:]
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(b, -1, -1)
    latent = encoder.norm(encoder.blocks(torch.cat([cls, x], dim=1)))
    return latent, torch.arange(n, device=ids.device).expand(b, n)


def decoder_slots(y: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """Decoder-width latent y (B, 1 + kept, Dd) -> (B, 1 + N, Dd): cls, then every patch slot, where kept
    unmasked slots carry their encoder output and masked or dropped ones the cls output (MAGE's padding)."""
    b, _, dd = y.shape
    n = masked.shape[1]
    pad = y[:, :1].expand(b, n, dd)
    full = pad.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, dd), y[:, 1:])
    full = torch.where(masked.unsqueeze(-1), pad, full)
    return torch.cat([y[:, :1], full], dim=1)


# -- decoders and heads ---------------------------------------------------------------------------


def decoder_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, eps: float) -> nn.Sequential:
    """``depth`` pre-norm transformer blocks (``pretrain.vit.Block``: attention through
    ``F.scaled_dot_product_attention``) of width ``dim``, dropout and attention dropout ``dropout``."""
    return nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                                 norm_eps=eps) for _ in range(depth)])


def xavier_linears(modules: Iterable[nn.Module]) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` in ``modules`` (and inside them),
    in the order given (MAE's decoder init; the order fixes the random draws)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


# State-dict names of the head before it was a part (``self.head_fc`` ...) -> its names as ``self.token_head``.
TOKEN_HEAD_LEGACY_NAMES = {"head_fc.": "token_head.fc.", "head_norm.": "token_head.norm.",
                           "head_bias": "token_head.bias"}


class SubTokenHead(nn.Module):
    """SeiT++'s tied head: a patch feature predicts its s x s tokens, scored against an id table.

    ``forward(z, table)``: z float (B, g * g, dim) row-major patches, table float (K, width) ->
    logits (B, g s, g s, K) = LayerNorm(GELU(Linear(z))) @ table.T + bias. The caller passes the table
    (detached when the head must not train it)."""

    def __init__(self, dim: int, sub: int, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.sub = sub
        self.fc = nn.Linear(dim, sub * sub * width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, g * g, dim) -> sub-token vectors (B, g s, g s, width)."""
        b, n, _ = z.shape
        g, s = math.isqrt(n), self.sub
        sub = self.fc(z).reshape(b, g, g, s, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, g * s, g * s, -1)
        return self.norm(F.gelu(sub))

    def forward(self, z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        sub = self.features(z)
        return sub @ table.t().to(sub.dtype) + self.bias.to(sub.dtype)

    def masked_loss(self, z: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, table: torch.Tensor,
                    smoothing: float = 0.0) -> TokenLoss:
        """The token CE of ``forward(z, table)`` against ids int64 (B, g s, g s), mean over each patch's s x s
        sub-tokens then over the patches of ``masked`` bool (B, g * g), with logits formed at masked patches
        only, in chunks (``pretrain.token_loss.masked_sub_token_loss``): no (B, h, w, K) tensor exists.
        ``ce`` / ``correct`` are per masked sub-token; the loss is 0 when nothing is masked."""
        return masked_sub_token_loss(z, ids, masked, self.fc, self.norm, table, self.bias, self.sub, smoothing)


def masked_token_ce(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, patch: int,
                    smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token cross-entropy float32: per token, mean over each p x p patch, mean over masked patches.

    logits (B, h, w, K), ids int64 (B, h, w), masked bool (B, h/p * w/p). Returns (loss 0-dim, per-token
    CE float32 (B, h, w)); the loss is 0 when nothing is masked."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none",
                         label_smoothing=smoothing).reshape(ids.shape)
    weights = masked.float()
    return (patch_mean(ce, patch) * weights).sum() / weights.sum().clamp_min(1.0), ce


# -- the masked-token stack ----------------------------------------------------------------------


class MaskedTokenObjective(Objective):
    """The masked-token stack MTM and M3I are built on, for any objective that predicts masked token ids.

    A token-stem encoder whose masked patches become a learned mask vector (``forward_encoder``: SeiT++ /
    MAGE masking and dropping; ``encode_with_masked`` for masks of one's own), a decoder of pre-norm blocks
    over the cls slot, every patch slot and optional extra queries (``decode``), and the sub-token head
    tied to the encoder's own id table (``head_table``, ``token_logits``; ``masked_loss`` forms logits at
    masked patches only). ``predict`` is the inference pass.

    Attributes (their names are the state-dict names): ``encoder``, ``mask_token`` (1, 1, D),
    ``token_dropout``, ``decoder_embed`` (D -> Dd), ``decoder_pos_embed`` (learned, (1, 1 + N, Dd)) or the
    buffer ``decoder_pos`` (fixed sin-cos), ``decoder_blocks``, ``decoder_norm``, ``token_head``. A subclass
    sets ``self.cfg`` (a ``MaskedTokenConfig``) and calls ``build_encoder``, ``build_decoder`` and
    ``build_token_head`` in its own order, which fixes the random draws of the initial weights, then
    ``xavier_linears`` on the modules those return, in an order of its choosing.
    """

    cfg: MaskedTokenConfig
    legacy_names: ClassVar[dict[str, str]] = TOKEN_HEAD_LEGACY_NAMES  # checkpoints from before parts.py

    def build_encoder(self, vit: ViTConfig, data, who: str) -> None:
        """``encoder`` (``token_encoder``: refuses a ViT that does not fit the data), ``mask_token`` normal(0.02),
        ``token_dropout``."""
        self.encoder = token_encoder(vit, data, who, self.cfg.table_init_std)
        self.mask_token = nn.Parameter(torch.empty(1, 1, vit.embed_dim).normal_(std=0.02))
        self.token_dropout = nn.Dropout(self.cfg.token_dropout)

    def build_decoder(self, vit: ViTConfig, positions: str = "learned") -> list[nn.Module]:
        """``decoder_embed``, positions (``"learned"``: ``decoder_pos_embed`` normal(0.02), MAGE; ``"sincos"``:
        the fixed buffer ``decoder_pos``, SiameseIM), ``decoder_blocks``, ``decoder_norm``. Returns the modules
        with Linear layers, [decoder_embed, decoder_blocks], for ``xavier_linears``."""
        if positions not in ("learned", "sincos"):
            raise ValueError(f"decoder positions must be 'learned' or 'sincos', got {positions!r}")
        cfg, dd = self.cfg, self.cfg.decoder_dim
        self.decoder_embed = nn.Linear(vit.embed_dim, dd)
        if positions == "learned":
            self.decoder_pos_embed = nn.Parameter(torch.empty(1, vit.num_patches + 1, dd).normal_(std=0.02))
        self.decoder_blocks = decoder_blocks(dd, cfg.decoder_depth, cfg.decoder_heads, vit.mlp_ratio,
                                             cfg.decoder_dropout, vit.norm_eps)
        self.decoder_norm = nn.LayerNorm(dd, eps=vit.norm_eps)
        if positions == "sincos":
            self.register_buffer("decoder_pos", sincos_pos_embed_2d(dd, vit.grid_size, True)[None], persistent=False)
        return [self.decoder_embed, self.decoder_blocks]

    def build_token_head(self, vit: ViTConfig) -> nn.Module:
        """``token_head``: decoder features -> patch_size x patch_size sub-tokens, scored against the id table."""
        self.token_head = SubTokenHead(self.cfg.decoder_dim, vit.patch_size, vit.token_dim, vit.vocab_size,
                                       vit.norm_eps)
        return self.token_head

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n in ("mask_token", "decoder_pos_embed")}
        return super().no_weight_decay() | names

    # -- stages ---------------------------------------------------------------------------------

    def forward_encoder(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids int64 (B, h, w) -> latent (B, 1 + N - n_drop, D), masked bool (B, N), keep_index (B, N - n_drop)
        (``masked_encoder_pass``: one truncated-normal ratio per batch, random masks, dropped subset)."""
        return masked_encoder_pass(self.encoder, self.mask_token, self.token_dropout, ids, self.cfg)

    def decode(self, latent: torch.Tensor, masked: torch.Tensor, keep_index: torch.Tensor,
               slot_embed: torch.Tensor | None = None,
               queries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder latent (B, 1 + kept, D) -> slot features (B, N, Dd) and query features (B, Q, Dd).

        Slots: ``decoder_slots`` (kept unmasked patches carry their encoder output, the others the cls output),
        plus ``slot_embed`` (B, N, Dd) if given (M3I marks a pasted image's slots), plus positions; the
        ``queries`` (B, Q, Dd) follow the slots through the blocks (Q = 0 without them)."""
        n = masked.shape[1]
        z = decoder_slots(self.decoder_embed(latent), masked, keep_index)
        if slot_embed is not None:
            z = torch.cat([z[:, :1], z[:, 1:] + slot_embed], dim=1)
        pos = self.decoder_pos_embed if hasattr(self, "decoder_pos_embed") else self.decoder_pos
        z = z + pos.to(z.dtype)
        if queries is not None:
            z = torch.cat([z, queries.to(z.dtype)], dim=1)
        z = self.decoder_norm(self.decoder_blocks(z))
        return z[:, 1:1 + n], z[:, 1 + n:]

    def head_table(self) -> torch.Tensor:
        """The token embedding table (K, E) the head scores against, detached unless ``detach_head`` is off."""
        table = self.encoder.token_embed.word_embeddings.weight
        return table.detach() if self.cfg.detach_head else table

    def token_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Patch features (B, N, Dd) -> logits (B, h, w, K) through the sub-token head tied to the embedding."""
        return self.token_head(z, self.head_table())

    def token_loss(self, z: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> TokenLoss:
        """Token CE of ``token_logits(z)`` against ids int64 (B, h, w), mean over each patch's sub-tokens then
        over the ``masked`` bool (B, N) patches, logits formed only there (``SubTokenHead.masked_loss``)."""
        return self.token_head.masked_loss(z, ids, masked, self.head_table(), self.cfg.label_smoothing)

    def masked_loss(self, z: torch.Tensor, ids: torch.Tensor,
                    masked: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``token_loss`` and its metrics: ``masked_ce`` (plain CE in nats on masked tokens, whatever the
        smoothing), ``masked_acc`` (top-1 there), ``mask_ratio`` (fraction of masked patches)."""
        out = self.token_loss(z, ids, masked)
        denom = max(out.ce.numel(), 1)
        metrics = {"masked_ce": out.ce.sum() / denom, "masked_acc": out.correct.float().sum() / denom,
                   "mask_ratio": masked.float().mean()}
        return out.loss, metrics

    @torch.no_grad()
    def predict(self, ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Token logits float (B, h, w, K) given ids int64 (B, h, w) and masked bool (B, N) over patches.

        Inference form (MAGE's generation path): masked patches enter the encoder as the mask vector,
        none is dropped; use under ``eval()``. The ids under masked patches are ignored.
        """
        latent, keep_index = encode_with_masked(self.encoder, self.mask_token, ids, masked)
        return self.token_logits(self.decode(latent, masked, keep_index)[0])


# -- frozen parts ---------------------------------------------------------------------------------


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are turned into buffers (same names): no gradient, no optimizer
    state, in the state dict, and left in float32 by DeepSpeed's bf16/fp16 cast (which casts parameters)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if p is None else p.detach().clone())
    return clone


def set_dropout(blocks: nn.Module, rate: float) -> None:
    """Attention and projection/MLP dropout ``rate`` in ``pretrain.vit.Block``s; no weights change."""
    for blk in blocks:
        blk.attn.attn_drop = rate
        for drop in (blk.attn.proj_drop, blk.mlp.drop1, blk.mlp.drop2):
            drop.p = rate


class EMATeacher(nn.Module):
    """A frozen exponential-moving-average copy of a student module (BYOL, SiameseIM, M3I's target encoder).

    ``module``: ``frozen_copy(student)``, its parameters held as buffers (no gradient, no optimizer state,
    left float32 by a bf16 engine, in the state dict as ``<name>.module.*``); always in eval mode (no
    drop-path). ``update(student, m)``: every buffer <- m * buffer + (1 - m) * the student's parameter of
    the same name. Call the copy's methods on ``module`` under ``torch.no_grad()``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = frozen_copy(student).eval()

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        buffers = dict(self.module.named_buffers())
        for name, p in student.named_parameters():
            t = buffers[name]
            t.mul_(momentum).add_(p.detach().to(t.dtype), alpha=1.0 - momentum)


def ema_momentum_at(step: int, base: float, total: int) -> float:
    """BYOL's cosine schedule: ``base`` at step 0 rising to 1.0 at ``total``; constant ``base`` if total <= 0."""
    if total <= 0:
        return base
    t = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


# -- pre-trained backbones ------------------------------------------------------------------------


def _pretrained(init: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Encoder weights and ViTConfig dict from a backbone file or a trainer checkpoints directory
    (weights_only loading; a trainer checkpoint's ``encoder_config``, so ADDP's encoder reads as pixel-stem)."""
    path = Path(init)
    if path.is_file():
        model = load_backbone(path)
        return model.state_dict(), dataclasses.asdict(model.cfg)
    if path.is_dir():
        return read_deepspeed(path)
    raise FileNotFoundError(f"objective.init: {init} is neither a backbone file nor a checkpoints directory")


def backbone_config(init: str) -> dict:
    """The ViTConfig (as a dict: ``stem``, ``patch_size``, ``grid``, ...) of the pre-trained backbone ``init``."""
    return {"stem": "token", **_pretrained(init)[1]}


def load_pretrained(encoder: VisionTransformer, init: str) -> dict[str, list[str]]:
    """Copy matching tensors of a pre-trained backbone into ``encoder``; returns loaded/skipped/fresh names.

    ``head.*`` and tensors whose shape differs are skipped; what ``encoder`` has and was not loaded is fresh.
    A backbone of another stem (ADDP's pixel stem into a token-stem model, or the reverse) is refused: only
    its blocks would load, silently."""
    state, cfg = _pretrained(init)
    stem = cfg.get("stem", "token")
    if stem != encoder.cfg.stem:
        fix = ("fine-tune it on pixels decoded from the tokens: objective.decoder=TOKENIZER (the data's tokenizer.pt) "
               f"objective.pixel_patch={cfg.get('patch_size')} (pretrain.finetune sets both for --init)"
               if stem == "pixel" else "leave objective.decoder out (a token-stem backbone reads the ids)")
        raise ValueError(f"objective.init: {init} is a {stem}-stem backbone but the model is {encoder.cfg.stem}-stem; "
                         f"{fix}")
    own = encoder.state_dict()
    loaded, skipped = [], []
    for k, v in state.items():
        if k in own and tuple(own[k].shape) == tuple(v.shape) and not k.startswith("head."):
            own[k] = v.to(own[k].dtype)
            loaded.append(k)
        else:
            skipped.append(k)
    encoder.load_state_dict(own)
    fresh = sorted(set(own) - set(loaded))
    return {"loaded": loaded, "skipped": skipped, "fresh": fresh}


def init_backbone(encoder: VisionTransformer, init: str) -> None:
    """``load_pretrained`` when ``init`` is set, printing one line of what was loaded, fresh and skipped."""
    if not init:
        return
    report = load_pretrained(encoder, init)
    print(f"init from {init}: {len(report['loaded'])} tensors loaded, fresh: "
          f"{report['fresh'] or 'none'}, skipped: {report['skipped'] or 'none'}", flush=True)
