"""Optimizer, learning-rate schedule and the DeepSpeed config, from ``pretrain.config`` sections.

- AdamW with two parameter groups: weight decay on weight matrices and embeddings; none on
  norms, biases, positional embeddings, class/mask tokens (timm's rule: 1-D parameters, names
  ending in ``bias``, and whatever the model's ``no_weight_decay()`` lists).
- Schedule (per optimizer step): linear warm-up from 0 to ``lr`` over ``warmup_steps``, then a
  half cosine to ``min_lr`` at ``steps``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import EngineConfig, OptimConfig

__all__ = ["param_groups", "layer_id", "layer_decay_groups", "lr_at", "make_optimizer", "make_scheduler",
           "deepspeed_config", "base_lr"]


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] = frozenset()) -> list[dict]:
    """Two AdamW groups: ``decay`` and ``no_decay`` (1-D tensors, ``*bias``, names in ``skip``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def layer_id(name: str, depth: int, prefix: str = "") -> int:
    """BEiT/MAE layer index of a ViT parameter: stem, positions and cls token 0; ``blocks.i`` i + 1;
    everything after the blocks (final norms, head, task decoders) depth + 1."""
    name = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "token_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float, depth: int,
                       skip: set[str] = frozenset(), prefix: str = "") -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT, MAE fine-tuning): a parameter of layer l gets
    ``lr * layer_decay ** (depth + 1 - l)``; weight decay as ``param_groups``. ``prefix`` is stripped
    from names first (e.g. "encoder." when the ViT sits inside a task model)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith("bias") or name in skip
        lid = layer_id(name, depth, prefix) if (not prefix or name.startswith(prefix)) else depth + 1
        key = (lid, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - lid)
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * scale,
                           "lr_scale": scale, "name": f"layer{lid}_{'no_decay' if no_decay else 'decay'}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``cfg.lr`` if set, else ``blr * global_batch / 256``."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``: warm-up, then cosine."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``, or ``layer_decay_groups`` (prefix "encoder.") when layer_decay < 1."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay < 1.0:
        depth = model.encoder.cfg.depth
        groups = layer_decay_groups(model, lr, cfg.weight_decay, cfg.layer_decay, depth, skip, prefix="encoder.")
    else:
        groups = param_groups(model, cfg.weight_decay, skip)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float,
                   total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor gives ``lr_at`` (stepped once per optimizer step by DeepSpeed)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total, lr, cfg.warmup_steps, cfg.min_lr) / lr if lr > 0 else 0.0)


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict:
    """The DeepSpeed JSON config. The optimizer and scheduler are ours (passed to ``initialize``)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        # elastic: ZeRO 1/2 optimizer state re-partitioned on load at another world size (pretrain.elastic)
        "zero_optimization": {"stage": engine.zero_stage, "elastic_checkpoint": engine.zero_stage > 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
