"""Pre-training objectives behind one interface, so the trainer never changes when one is added.

An objective is an ``nn.Module`` that owns a ViT backbone (``self.encoder``) plus whatever it needs
on top (decoders, heads, teachers) and maps a batch to a loss::

    loss, metrics = objective(batch)      # loss: 0-dim float tensor; metrics: {name: 0-dim tensor}

``batch`` is a ``storage.stream.TokenStream`` batch after token augmentation (``tokens`` int64
(B, h, w), ``label`` int64 (B,), ...), on the training device. Randomness (masks, dropout) comes
from torch's global generator, which the trainer reseeds from (seed, rank, step) before every
step, so a resumed run repeats the straight run exactly.

``after_step(step)`` runs after each optimizer step (EMA teachers use it). ``build_objective``
chooses the class from ``OBJECTIVES`` by name; each entry is (config dataclass, module class) and
the YAML's ``objective:`` section fills the dataclass (unknown keys are an error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.vit import VisionTransformer, ViTConfig

__all__ = ["DataSpec", "Objective", "OBJECTIVES", "build_objective", "make_config", "load_objective"]


@dataclass(frozen=True)
class DataSpec:
    """What an objective may know about the data: the token grid (h, w), codebook size K, classes."""

    grid: tuple[int, int]
    vocab_size: int
    num_classes: int = 0


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (loss, metrics)``; ``encoder`` is the backbone that is exported."""

    encoder: VisionTransformer

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step with the number of steps done (for EMA updates)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that get no weight decay besides norms and biases."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}


def _registry() -> dict[str, tuple[type, type[Objective]]]:
    from pretrain.objectives.addp import ADDP, ADDPConfig
    from pretrain.objectives.classify import Classify, ClassifyConfig
    from pretrain.objectives.m3i import M3I, M3IConfig
    from pretrain.objectives.mtm import MTM, MTMConfig
    from pretrain.objectives.segment import Segment, SegmentConfig

    return {"mtm": (MTMConfig, MTM), "m3i": (M3IConfig, M3I), "addp": (ADDPConfig, ADDP),
            "classify": (ClassifyConfig, Classify), "segment": (SegmentConfig, Segment)}


OBJECTIVES = ("mtm", "m3i", "addp", "classify", "segment")


def make_config(cls: type, options: dict, where: str):
    """Fill dataclass ``cls`` from a dict; unknown keys raise ValueError naming ``where`` and the valid keys."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    converted = {}
    for k, v in options.items():
        typ = types[k]
        if v is None and "None" in typ:
            converted[k] = v
        elif typ == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: {k} must be true or false, got {v!r}")
            converted[k] = v
        elif typ.split(" |")[0] in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{where}: {k} must be a number, got {v!r}")
            if typ.startswith("int") and v != int(v):
                raise ValueError(f"{where}: {k} must be a whole number, got {v!r}")
            converted[k] = float(v) if typ.startswith("float") else int(v)
        else:
            converted[k] = tuple(v) if isinstance(v, list) else v
    return cls(**converted)


def build_objective(name: str, options: dict, vit: ViTConfig, data: DataSpec,
                    total_steps: int | None = None) -> Objective:
    """The objective ``name`` ("mtm", ...) with its config from ``options`` on a backbone ``vit``.

    ``total_steps`` (the run's length) fills the config's ``total_steps`` field, if it has one and
    ``options`` does not set it (M3I's EMA schedule spans the run)."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(registry)}")
    config_cls, module_cls = registry[name]
    options = dict(options)
    if total_steps is not None and "total_steps" in {f.name for f in dataclasses.fields(config_cls)}:
        options.setdefault("total_steps", total_steps)
    return module_cls(make_config(config_cls, options, f"objective {name}"), vit, data)


def load_objective(ckpt: str, tag: str | None = None) -> tuple[Objective, dict]:
    """An objective rebuilt from a trainer checkpoint (CPU, float32, eval mode) and its client state.

    ``ckpt``: a run's ``checkpoints`` directory (tag from ``latest`` unless given) or one
    ``stepNNNNNNN`` directory. Read with ``torch.load(weights_only=True)`` (``pretrain.export.safe_load``).
    The client state has ``step``, ``objective``, ``vit_config``, ``config`` (the resolved YAML) and,
    when recorded, ``tokens`` (the data's token identity, ``pretrain.provenance``).
    """
    from pretrain.export import safe_load
    from pretrain.provenance import checkpoint_tag_dir

    tag_dir = checkpoint_tag_dir(ckpt, tag)
    file = tag_dir / "mp_rank_00_model_states.pt"
    if not file.is_file():
        raise FileNotFoundError(f"no trainer checkpoint at {tag_dir} (expected {file.name}); pass a run's "
                                "checkpoints directory")
    state = safe_load(file)
    vit = ViTConfig(**state["vit_config"])
    # "init" (fine-tuning's starting backbone) is not needed: the weights come from the checkpoint.
    options = {k: v for k, v in state["config"]["objective"].items() if k not in ("name", "init")}
    data = DataSpec(grid=(vit.grid, vit.grid), vocab_size=vit.vocab_size,
                    num_classes=int(state.get("num_classes", 0)))
    objective = build_objective(state["objective"], options, vit, data)
    objective.load_state_dict({k: v.float() for k, v in state["module"].items()})
    client = {k: v for k, v in state.items()
              if k in ("step", "objective", "vit_config", "config", "num_classes", "tokens")}
    return objective.eval(), client
