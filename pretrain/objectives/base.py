"""The ``Objective`` interface, what an objective needs from the data, and the typed registry.

An objective is an ``nn.Module`` that owns a ViT backbone (``self.encoder``) plus whatever it needs
on top (decoders, heads, teachers) and maps a batch to a loss::

    loss, metrics = objective(batch)      # loss: 0-dim float tensor; metrics: {name: 0-dim tensor}

``batch`` is a ``storage.stream.TokenStream`` batch after token augmentation (``tokens`` int64
(B, h, w), ``label`` int64 (B,), ...), on the training device. Randomness (masks, dropout) comes
from torch's global generator, which the trainer reseeds from (seed, rank, step) before every
step, so a resumed run repeats the straight run exactly.

Each objective class names itself (``name``), its frozen config dataclass (``config_class``, whose
``__post_init__`` checks ranges) and its ``DataNeeds``. ``registry()`` maps names to classes;
``make_config`` fills a config dataclass from a YAML mapping (unknown keys and wrong types are a
``ValueError`` naming ``section.key``); ``build_objective`` builds one. No objective module imports
another: shared pieces live in ``pretrain.objectives.parts``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pretrain.vit import VisionTransformer, ViTConfig

__all__ = ["DataSpec", "DataNeeds", "Objective", "registry", "OBJECTIVES", "make_config", "build_objective",
           "objective_config", "load_objective"]

OBJECTIVES = ("mtm", "m3i", "addp", "classify", "segment")


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

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step with the number of steps done (for EMA updates)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that get no weight decay besides norms and biases."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def _rename_legacy(module: Objective, state_dict: dict, prefix: str, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in module.legacy_names.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


def registry() -> dict[str, type[Objective]]:
    """Objective name -> class (imported on first use)."""
    from pretrain.objectives.addp import ADDP
    from pretrain.objectives.classify import Classify
    from pretrain.objectives.m3i import M3I
    from pretrain.objectives.mtm import MTM
    from pretrain.objectives.segment import Segment

    return {cls.name: cls for cls in (MTM, M3I, ADDP, Classify, Segment)}


def make_config(cls: type, options: dict, where: str):
    """Fill dataclass ``cls`` from a mapping. ``where`` is the section (``objective``): an unknown key or a
    value of the wrong type raises ValueError naming ``where.key``; the dataclass checks its ranges."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {options!r}")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}; valid keys: {sorted(fields)}")
    converted = {}
    for k, v in options.items():
        typ = fields[k]
        if v is None and "None" in typ:
            converted[k] = v
        elif typ == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k} must be true or false, got {v!r}")
            converted[k] = v
        elif typ.split(" |")[0] in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{where}.{k} must be a number, got {v!r}")
            if typ.startswith("int") and v != int(v):
                raise ValueError(f"{where}.{k} must be a whole number, got {v!r}")
            converted[k] = float(v) if typ.startswith("float") else int(v)
        else:
            converted[k] = tuple(v) if isinstance(v, list) else v
    return cls(**converted)


def objective_config(name: str, options: dict, where: str = "objective", total_steps: int | None = None):
    """The frozen config of objective ``name`` from a mapping (without ``name``). ``total_steps`` fills a
    ``total_steps`` field the mapping leaves out (M3I's EMA schedule spans the run)."""
    classes = registry()
    if name not in classes:
        raise ValueError(f"{where}.name must be one of {sorted(classes)}, got {name!r}")
    config_class = classes[name].config_class
    options = dict(options)
    if total_steps is not None and "total_steps" in {f.name for f in dataclasses.fields(config_class)}:
        options.setdefault("total_steps", total_steps)
    return make_config(config_class, options, where)


def build_objective(name: str, options: dict | object, vit: ViTConfig, data: DataSpec,
                    total_steps: int | None = None) -> Objective:
    """The objective ``name`` ("mtm", ...) on a backbone ``vit``; ``options`` is its config dataclass or a
    mapping for ``objective_config``."""
    cls = registry().get(name)
    if cls is None:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(registry())}")
    cfg = options if isinstance(options, cls.config_class) else objective_config(name, options,
                                                                                   total_steps=total_steps)
    return cls(cfg, vit, data)


def load_objective(ckpt: str, tag: str | None = None) -> tuple[Objective, dict]:
    """An objective rebuilt from a trainer checkpoint (CPU, float32, eval mode) and its client state.

    ``ckpt``: a run's ``checkpoints`` directory (tag from ``latest`` unless given) or one tag directory
    (``pretrain.checkpoint.read_trainer_state``: weights only). The client state has ``step``, ``objective``,
    ``vit_config``, ``config`` (the resolved YAML) and, when recorded, ``tokens`` (the data's token
    identity, ``pretrain.provenance``). The objective's frozen parts (ADDP's predictor and tokenizer) are
    rebuilt from the paths in its config, then overwritten by the checkpoint's copies.
    """
    from pretrain.checkpoint import read_trainer_state

    state = read_trainer_state(ckpt, tag)
    vit = ViTConfig(**state["vit_config"])
    # "init" (fine-tuning's starting backbone) is not needed: the weights come from the checkpoint.
    options = {k: v for k, v in state["config"]["objective"].items() if k not in ("name", "init")}
    tokens = state.get("tokens") or {}
    data = DataSpec(grid=(vit.grid, vit.grid), vocab_size=vit.vocab_size, num_classes=int(state.get("num_classes", 0)),
                    tokenizer_fingerprint=tokens.get("tokenizer_fingerprint"))
    objective = build_objective(state["objective"], options, vit, data)
    objective.load_state_dict({k: v.float() for k, v in state["module"].items()})
    client = {k: v for k, v in state.items()
              if k in ("step", "objective", "vit_config", "config", "num_classes", "tokens")}
    return objective.eval(), client

