"""What the token adapters (TokenAdapt, ColorAdapt) share: the frozen codebook input, the
codebook-tied output head, their checkpoint format, and ``AdapterSpec``, what the one trainer
(``pipeline.adapters.train``) needs to know about an adapter.

Functions over the model's own buffers and parameters (``codebook``, ``emb_mean``, ``emb_std``,
``log_scale``, ``code_bias``), so checkpoint keys stay flat and identical across adapters.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenizer.base import Tokenizer
from storage import io as sio

MAX_ADAPTER_BYTES = 512 << 20  # a bound against a hostile file (ours are a few MB: K x D codebook + ~1 M weights)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as the trainer sees it: a model ``ids, params -> logits of T(op(x))`` and the op.

    kind: checkpoint kind and CLI name. model: class with ``for_tokenizer(tokenizer, **overrides)``,
    ``cfg`` (a frozen config with ``to_dict`` / ``from_dict``), ``forward(ids, params)`` -> logits float32
    (B, K, h, w) and ``adapt(ids, params)`` -> int64 (B, h, w). config: that config class. learned: the
    name its agreement is reported under. sample(n, cfg, gen) -> float32 params (n, ...) of random ops in
    the config's ranges. pixels(images uint8 (N, H, W, 3), params, cfg) -> the op applied in pixels.
    single_ops(cfg) -> {name: cfg with only that op on}, "identity" with none. baselines(model, src, target,
    params) -> {name: int64 (B, h, w) ids} of the non-learned operators it is measured against. lr: default."""

    kind: str
    model: type
    config: type
    learned: str
    sample: Callable[[int, Any, torch.Generator | None], torch.Tensor]
    pixels: Callable[[np.ndarray, torch.Tensor, Any], np.ndarray]
    single_ops: Callable[[Any], dict[str, Any]]
    baselines: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    lr: float


class AdapterModel(nn.Module):
    """Base of the adapter models: ``cfg`` (a config with vocab_size, embed_dim, grid, tokenizer_fingerprint;
    its class is ``config_class``), a frozen codebook (``register_codebook``), ``embed`` and
    ``for_tokenizer``."""

    config_class: Any = None
    cfg: Any

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, **overrides: Any) -> AdapterModel:
        """A fresh model sized for ``tokenizer`` (K, D, grid and fingerprint from it), config ``overrides``."""
        k, d = tokenizer.codebook.shape
        cfg = cls.config_class(vocab_size=int(k), embed_dim=int(d), grid=tuple(tokenizer.grid),
                               tokenizer_fingerprint=tokenizer.fingerprint, **overrides)
        return cls(cfg, tokenizer.codebook)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) -> float32 (B, D, h, w) standardised frozen-codebook embeddings."""
        return embed_standardised(self, ids, self.cfg.grid)


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


def read_adapter(path: str | Path, kind: str) -> dict:
    """An adapter checkpoint's ``{"kind", "config", "state_dict"}``, read through ``storage.io`` (any URL, at
    most ``MAX_ADAPTER_BYTES``) with ``torch.load(weights_only=True)``; ValueError naming ``path`` otherwise."""
    data = sio.read_bytes(str(path), max_bytes=MAX_ADAPTER_BYTES)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a {kind} checkpoint loadable with weights_only=True "
                         f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a {kind} checkpoint")
    return ckpt


def check_adapter_tokenizer(path: str | Path, kind: str, made_for: str, want: str) -> None:
    """ValueError (one line, what to do) when an adapter made for tokenizer ``made_for`` meets ``want``'s ids."""
    if made_for != want:
        raise ValueError(
            f"{path}: this {kind} was trained for tokenizer {made_for[:12] or '<none>'}..., refusing tokenizer "
            f"{want[:12]}... (the ids would mean other codes); train one for this tokenizer: python -m "
            f"pipeline.adapters.train --kind {kind} --tokenizer TOKENIZER --images DIR --out CKPT --steps N")


def load_adapter(path: str | Path, kind: str, tokenizer: Tokenizer | str, config_cls: Any, model_cls: Any) -> Any:
    """Load an adapter checkpoint (``read_adapter``) for ``tokenizer`` (a Tokenizer or its fingerprint).

    Raises ValueError for a checkpoint of another kind, or one trained for a different tokenizer (its
    ids and codebook would mean something else).
    """
    ckpt = read_adapter(path, kind)
    cfg = config_cls.from_dict(ckpt["config"])
    check_adapter_tokenizer(path, kind, cfg.tokenizer_fingerprint,
                            tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint)
    model = model_cls(cfg, ckpt["state_dict"]["codebook"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def checkpoint_io(kind: str, config_cls: Any, model_cls: Any) -> tuple[Callable, Callable]:
    """(save, load) of one adapter kind: ``save(model, path)`` writes ``{"kind", "config", "state_dict"}``
    atomically (``save_adapter``); ``load(path, tokenizer)`` reads one (``weights_only=True``, any
    ``storage.io`` URL) for ``tokenizer`` (a Tokenizer or its fingerprint), refusing a checkpoint of another
    kind or one trained for another tokenizer (ValueError, one line)."""

    def save(model: nn.Module, path: str | Path) -> None:
        save_adapter(model, path, kind)

    def load(path: str | Path, tokenizer: Tokenizer | str) -> nn.Module:
        return load_adapter(path, kind, tokenizer, config_cls, model_cls)

    save.__name__, load.__name__ = f"save_{kind}", f"load_{kind}"
    return save, load
