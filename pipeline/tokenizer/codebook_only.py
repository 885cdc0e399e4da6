"""An embedding-only tokenizer: a codebook (and its synonym table) without the network that made the ids.

SeiT releases ImageNet-1k already tokenised, with ``codebook.ckpt`` (the K x D embeddings of the ids,
K = 391, D = 32) but not as a network we can run: its ViT-VQGAN is a separate, pickled download. This
tokenizer is what ``vqpt import-seit`` writes as the dataset's ``tokenizer.pt``, so everything that
only *embeds* ids works on SeiT's tokens: MTM / M3I pre-training, fine-tuning, token augmentation
(embedding-space crops, ColorAdapt, noise, synonym replacement). ``encode`` / ``decode`` raise a
one-line ``UserError`` naming the loader that can (``pipeline.tokenizer.vitvqgan``).

State (``state_dict``): ``codebook`` float32 (K, D); ``synonyms`` int64 (K, S): row k lists the
synonyms of id k in the order the source gave them (SeiT's ``synonyms.json``), S = 0 when none were
given. Config: ``resolution`` and ``grid`` (what the ids describe), ``metric`` (how the source quantised:
"cosine" for SeiT), ``source`` (free text: where the codebook came from).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.tokenizer.base import Tokenizer, register_tokenizer
from storage import io as sio
from storage.cli import UserError

MAX_CODEBOOK_BYTES = 64 << 20  # SeiT's codebook.ckpt is ~50 KB; a bound against a hostile file


def read_codebook(url: str) -> torch.Tensor:
    """A codebook file (SeiT's ``codebook.ckpt``): one float (K, D) tensor, or a one-entry dict holding
    it; read through ``storage.io`` (at most ``MAX_CODEBOOK_BYTES``) with ``torch.load(weights_only=True)``.
    Returns float32 (K, D); ValueError naming ``url`` for anything else."""
    data = sio.read_bytes(str(url), max_bytes=MAX_CODEBOOK_BYTES)
    try:
        cb = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # pickled objects, or not a torch file
        raise ValueError(f"{url}: not a tensor file loadable with weights_only=True (SeiT's codebook.ckpt is one "
                         f"float (K, D) tensor; vqpt never unpickles objects): {type(err).__name__}") from None
    if isinstance(cb, dict) and len(cb) == 1:  # tolerate {"weight": tensor}
        cb = next(iter(cb.values()))
    if not isinstance(cb, torch.Tensor) or cb.ndim != 2 or not cb.is_floating_point():
        raise ValueError(f"{url}: expected one float (K, D) tensor (SeiT's codebook.ckpt), got {type(cb).__name__}")
    return cb.to(torch.float32)

__all__ = ["CodebookTokenizer"]


@register_tokenizer("codebook")
class CodebookTokenizer(Tokenizer):
    """Ids -> embeddings only. ``codebook`` (K, D) float32; ``synonyms`` int64 (K, S) or None."""

    def __init__(self, codebook: torch.Tensor, *, resolution: int, grid: tuple[int, int], metric: str = "cosine",
                 source: str = "", synonyms: torch.Tensor | None = None) -> None:
        cb = torch.as_tensor(codebook)
        if cb.ndim != 2 or not cb.is_floating_point() or cb.shape[0] < 1:
            raise ValueError(f"codebook must be a float (K, D) tensor, got {cb.dtype} {tuple(cb.shape)}")
        if not torch.isfinite(cb).all():
            raise ValueError("codebook holds NaN or inf")
        k = int(cb.shape[0])
        syn = torch.zeros(k, 0, dtype=torch.long) if synonyms is None else torch.as_tensor(synonyms, dtype=torch.long)
        if syn.ndim != 2 or syn.shape[0] != k:
            raise ValueError(f"synonyms must be int (K={k}, S), got {tuple(syn.shape)}")
        if syn.numel() and (int(syn.min()) < 0 or int(syn.max()) >= k):
            raise ValueError(f"synonyms name ids outside [0, {k})")
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        self._codebook = cb.detach().to("cpu", torch.float32).contiguous()
        self._synonyms = syn.contiguous()
        self._resolution = int(resolution)
        self._grid = (int(grid[0]), int(grid[1]))
        self.metric = metric
        self.source = source

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook

    @property
    def synonyms(self) -> torch.Tensor | None:
        """int64 (K, S) synonym ids per id, or None when the source gave none."""
        return self._synonyms if self._synonyms.shape[1] else None

    # ---- coding: not possible without the network ---------------------------------------------------
    def _refuse(self) -> UserError:
        return UserError(f"embedding-only tokenizer ({self.source or 'a bare codebook'}): it can embed ids, not "
                         "encode or decode pixels; load the ViT-VQGAN checkpoint that made the ids with "
                         "pipeline.tokenizer.vitvqgan.ViTVQGANTokenizer.from_enhancing_checkpoint")

    def encode(self, images: np.ndarray) -> np.ndarray:
        raise self._refuse()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        raise self._refuse()

    # ---- persistence --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"resolution": self._resolution, "grid": list(self._grid), "metric": self.metric,
                "source": self.source}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codebook": self._codebook, "synonyms": self._synonyms}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> CodebookTokenizer:
        unknown = set(config) - {"resolution", "grid", "metric", "source"}
        extra = set(state_dict) - {"codebook", "synonyms"}
        if unknown or extra or "codebook" not in state_dict:
            raise ValueError(f"not a codebook tokenizer: config keys {sorted(unknown)} / weights {sorted(extra)} "
                             "unexpected, or no 'codebook'")
        return cls(state_dict["codebook"], resolution=int(config["resolution"]), grid=tuple(config["grid"]),
                   metric=str(config.get("metric", "cosine")), source=str(config.get("source", "")),
                   synonyms=state_dict.get("synonyms"))
