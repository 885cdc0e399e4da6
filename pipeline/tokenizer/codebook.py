"""Operations on a tokenizer's codebook that the pipeline (adapters) and pre-training (augmentation) share.

``codebook``: float (K, D), one row per code. ``embed`` maps ids to embedding maps, ``requantize``
maps embedding maps back to the nearest code, ``adain`` moves an embedding map's per-channel
statistics to another's (ColorAdapt). They live here, below both ``pipeline.adapters`` and
``pretrain.augment`` (the import layers in pyproject.toml), and ``pretrain.augment`` re-exports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embed", "requantize", "adain", "channel_stats"]

# Elements of the (chunk, K) score matrix requantize builds at once: 4M floats = 16 MiB.
_REQUANT_ELEMS = 1 << 22


def embed(ids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codebook lookup: ids int64 (B, h, w) in [0, K), codebook float (K, D) -> float (B, D, h, w).

    The result is a channels-last view (memory (B, h, w, D)): the lookup writes that layout, and
    ``crop_resize`` and ``requantize`` read it without a copy.
    """
    return F.embedding(ids, codebook).permute(0, 3, 1, 2)


def requantize(emb: torch.Tensor, codebook: torch.Tensor, metric: str = "l2",
               chunk_elems: int = _REQUANT_ELEMS) -> torch.Tensor:
    """Nearest code per position: emb float (B, D, h, w), codebook (K, D) -> ids int64 (B, h, w).

    ``metric`` "l2" (Euclidean) or "cosine". Positions are processed in chunks so the (N, K) score
    matrix never exceeds ``chunk_elems`` floats.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    b, d, h, w = emb.shape
    x = emb.permute(0, 2, 3, 1).reshape(-1, d)
    cb = codebook.to(emb.dtype)
    if metric == "cosine":
        cb = F.normalize(cb, dim=1)
        bias = None
    else:
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2): |x|^2 is constant per row.
        bias = -0.5 * (cb * cb).sum(1)
    step = max(1, chunk_elems // cb.shape[0])
    out = torch.empty(x.shape[0], dtype=torch.int64, device=emb.device)
    for start in range(0, x.shape[0], step):
        xs = x[start:start + step]
        # cosine needs no row normalisation either: it does not change the argmax over codes.
        scores = xs @ cb.T if bias is None else torch.addmm(bias, xs, cb.T)
        out[start:start + step] = scores.argmax(1)
    return out.view(b, h, w)


def adain(emb: torch.Tensor, style_emb: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN per channel over spatial dims: give ``emb`` (B, D, h, w) the mean/std of ``style_emb`` (B, D, h2, w2).

    out = (emb - mean(emb)) / std(emb) * std(style) + mean(style), stds biased (population),
    ``eps`` added to the variances. Returns float (B, D, h, w).
    """
    mu, sd = channel_stats(emb, eps)
    s_mu, s_sd = channel_stats(style_emb, eps)
    scale = s_sd / sd
    return torch.addcmul(s_mu - mu * scale, emb, scale)  # one pass over the big tensor


def channel_stats(emb: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and sqrt(population variance + eps) of float (B, D, h, w): (B, D, 1, 1) each."""
    var, mu = torch.var_mean(emb, (2, 3), keepdim=True, correction=0)
    return mu, (var + eps).sqrt()
