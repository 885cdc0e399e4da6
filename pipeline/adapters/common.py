"""What the token adapters (TokenAdapt, ColorAdapt) share: the frozen codebook input, the
codebook-tied output head, and their checkpoint format.

Functions over the model's own buffers and parameters (``codebook``, ``emb_mean``, ``emb_std``,
``log_scale``, ``code_bias``), so checkpoint keys stay flat and identical across adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenizer.base import Tokenizer


def register_codebook(module: nn.Module, codebook: torch.Tensor, vocab_size: int, embed_dim: int) -> None:
    """Frozen (K, D) codebook plus its per-dimension mean and std as buffers (std floored at 1e-3).

    Embeddings are standardised with them: codebook units vary (k-means codes are raw [0, 1] pixels).
    """
    codebook = torch.as_tensor(codebook).detach().to(torch.float32).clone()
    if tuple(codebook.shape) != (vocab_size, embed_dim):
        raise ValueError(f"codebook {tuple(codebook.shape)} != ({vocab_size}, {embed_dim})")
    module.register_buffer("codebook", codebook)
    module.register_buffer("emb_mean", codebook.mean(0))
    module.register_buffer("emb_std", codebook.std(0).clamp(min=1e-3) if vocab_size > 1 else torch.ones(embed_dim))


def embed_standardised(module: nn.Module, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """int64 (B, h, w) -> float32 (B, D, h, w) standardised frozen-codebook embeddings."""
    if tuple(ids.shape[1:]) != tuple(grid):
        raise ValueError(f"ids grid {tuple(ids.shape[1:])} != config grid {tuple(grid)}")
    emb = F.embedding(ids.long(), module.codebook)
    return ((emb - module.emb_mean) / module.emb_std).permute(0, 3, 1, 2)


def tied_logits(module: nn.Module, z: torch.Tensor, bias_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Codebook-tied head: z float (B, D, h, w) in standardised units -> logits (B, K, h, w).

    logit_k = -exp(log_scale) * ||z - c_k||^2 + w * code_bias_k: the tokenizer's own nearest-code rule,
    made soft; ``bias_weight`` w float (B,) scales the bias per sample (default 1).
    """
    z = z * module.emb_std[:, None, None] + module.emb_mean[:, None, None]  # codebook units
    cb = module.codebook
    dist = (z * z).sum(1, keepdim=True) - 2 * torch.einsum("bdhw,kd->bkhw", z, cb) + (cb * cb).sum(1)[:, None, None]
    bias = module.code_bias[None, :, None, None]
    if bias_weight is not None:
        bias = bias * bias_weight.to(bias)[:, None, None, None]
    return -module.log_scale.exp() * dist + bias


def save_adapter(model: nn.Module, path: str | Path, kind: str) -> None:
    """Write ``{"kind", "config", "state_dict"}`` atomically via torch.save (tensors + JSON-safe config)."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"kind": kind, "config": model.cfg.to_dict(), "state_dict": state}, tmp)
    tmp.replace(path)


def load_adapter(path: str | Path, kind: str, tokenizer: Tokenizer | str, config_cls: Any, model_cls: Any) -> Any:
    """Load an adapter checkpoint (``weights_only=True``) for ``tokenizer`` (a Tokenizer or its fingerprint).

    Raises ValueError for a checkpoint of another kind, or one trained for a different tokenizer (its
    ids and codebook would mean something else).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a {kind} checkpoint")
    cfg = config_cls.from_dict(ckpt["config"])
    want = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint
    if cfg.tokenizer_fingerprint != want:
        raise ValueError(
            f"{path}: trained for tokenizer {cfg.tokenizer_fingerprint[:12] or '<none>'}..., refusing tokenizer "
            f"{want[:12]}..."
        )
    model = model_cls(cfg, ckpt["state_dict"]["codebook"])
    model.load_state_dict(ckpt["state_dict"])
    return model
