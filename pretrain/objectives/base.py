"""The ``Objective`` interface, what an objective needs from the data and which files it loads.

An objective is an ``nn.Module`` that owns a ViT backbone (``self.encoder``) plus whatever it needs
on top (decoders, heads, teachers) and maps a batch to a loss::

    loss, metrics = objective(batch)      # loss: 0-dim float tensor; metrics: {name: 0-dim tensor}

``batch`` is a ``storage.stream.TokenStream`` batch after token augmentation (``tokens`` int64
(B, h, w), ``label`` int64 (B,), ...), on the training device. Randomness (masks, dropout) comes
from torch's global generator, which the trainer reseeds from (seed, rank, step) before every
step, so a resumed run repeats the straight run exactly.

Each objective class names itself (``name``), its frozen config dataclass (``config_class``, whose
``__post_init__`` checks ranges), its ``DataNeeds`` and, through ``assets(cfg)``, the checkpoints and
tokenizers it loads (``Asset``), which the trainer checks against the data before any process group
starts. ``pretrain.objectives.registry`` finds objectives by name (``register_objective``, the
``vqpt.objectives`` entry points). No objective module imports another: shared pieces live in
``pretrain.objectives.parts`` and ``pretrain.objectives.views``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pretrain.objectives.options import make_config
from pretrain.vit import VisionTransformer

__all__ = ["DataSpec", "DataNeeds", "Asset", "fine_tune_assets", "Objective", "make_config", "ASSET_KINDS",
           "IDENTITY_KEYS"]

# What a token identity is made of (``pretrain.provenance``), and which part each kind of asset must share.
IDENTITY_KEYS = ("tokenizer_fingerprint", "grid", "vocab_size")
ASSET_KINDS = {"checkpoint": IDENTITY_KEYS, "tokenizer": ("tokenizer_fingerprint",)}


@dataclass(frozen=True)
class DataSpec:
    """What an objective may know about the data: the token grid (h, w), codebook size K, classes, and
    the fingerprint of the tokenizer that made the tokens (None: unknown or deliberately unchecked); an
    objective that loads a tokenizer (ADDP, classify's ``decoder``) refuses one with another fingerprint."""

    grid: tuple[int, int]
    vocab_size: int
    num_classes: int = 0
    tokenizer_fingerprint: str | None = None


@dataclass(frozen=True)
class DataNeeds:
    """What an objective needs from the batches beyond ``tokens``.

    labels: ``label`` with classes in the manifest. labelmap: ``labelmap`` per sample.
    token_geometry: whether the trainer's geometric token augmentation (crops, flips, swaps, CutMix,
    Mixup, resizing) may run; False where a per-pixel target would not move with the tokens."""

    labels: bool = False
    labelmap: bool = False
    token_geometry: bool = True


@dataclass(frozen=True)
class Asset:
    """A file an objective loads because its config names it; the trainer checks each one against the data.

    field: the config field that holds it (``"init"``). url: its value (a path or ``storage.io`` URL).
    kind: ``"checkpoint"`` (a ``backbone.pt`` or a trainer checkpoints directory; its recorded token identity
    is read, ``pretrain.provenance``) or ``"tokenizer"`` (a tokenizer checkpoint; its fingerprint is computed).
    what: how an error names it (``"the --init backbone"``). shares: the token-identity keys it must share
    with the training data (default: a checkpoint all of ``IDENTITY_KEYS``, a tokenizer its fingerprint).
    rebuild: whether ``load_objective`` needs the file to rebuild the objective from one of its own
    checkpoints; False where that checkpoint's weights replace what the file gave (a fine-tuning run's
    starting backbone), and ``load_objective`` clears the field instead of reading the file."""

    field: str
    url: str
    kind: str
    what: str
    shares: tuple[str, ...] = ()
    rebuild: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ASSET_KINDS:
            raise ValueError(f"Asset {self.field}: kind must be one of {sorted(ASSET_KINDS)}, got {self.kind!r}")
        if not self.shares:
            object.__setattr__(self, "shares", ASSET_KINDS[self.kind])
        unknown = sorted(set(self.shares) - set(IDENTITY_KEYS))
        if unknown:
            raise ValueError(f"Asset {self.field}: shares {unknown} are not token-identity keys {IDENTITY_KEYS}")


def fine_tune_assets(init: str, decoder: str) -> tuple[Asset, ...]:
    """A fine-tuning objective's assets, those set: ``init`` (the starting backbone, a checkpoint of the data's
    tokens whose weights end up in the objective's own checkpoints) and ``decoder`` (the data's tokenizer, whose
    frozen decoder turns ids into a pixel-stem encoder's input)."""
    return tuple(a for a in (Asset("init", init, "checkpoint", "the --init backbone", rebuild=False),
                             Asset("decoder", decoder, "tokenizer", "the decoder tokenizer")) if a.url)


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (loss, metrics)``; ``encoder`` is the backbone that is exported.

    ``legacy_names``: state-dict key prefixes of older checkpoints (old -> new), renamed on load so
    checkpoints written before a part was renamed still load (``load_state_dict`` and DeepSpeed resume)."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs: ClassVar[DataNeeds] = DataNeeds()
    legacy_names: ClassVar[dict[str, str]] = {}
    encoder: VisionTransformer

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_names:
            self.register_load_state_dict_pre_hook(_rename_legacy)

    @classmethod
    def assets(cls, cfg) -> tuple[Asset, ...]:
        """The checkpoints and tokenizers an objective of config ``cfg`` loads (the fields left empty are left
        out). The trainer checks them against the training data's token identity before it starts; the
        objective still loads them itself (and checks a tokenizer's fingerprint, ``DataSpec``)."""
        return ()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step with the number of steps done (for EMA updates)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that get no weight decay besides norms and biases."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def _rename_legacy(module: Objective, state_dict: dict, prefix: str, *args) -> None:
    """Rename keys of older checkpoints (``legacy_names``); a key the module has today is never renamed, so
    an old prefix may be the start of a new name (``teacher.`` -> ``teacher.module.``)."""
    own = set(module.state_dict())
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest in own:
            continue
        for old, new in module.legacy_names.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break
