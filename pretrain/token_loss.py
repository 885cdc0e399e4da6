"""Token cross-entropy through a head tied to the token embedding, at the loss positions only.

MTM and M3I score sub-token vectors against the whole codebook (K codes) and take cross-entropy on
masked patches only. Scoring every position first materialises (B, h, w, K) logits, and autograd keeps
two or three tensors of that size (logits, log-softmax, their gradient): 256 MiB each for ViT-B's head
(K = 8192, 32 x 32 grid, batch 8, float32). Here the rows the loss uses are gathered first and scored
``chunk_rows`` at a time; each chunk's gradient with respect to its logits, ``(softmax - target) / R``,
is folded into the gradients of the hidden vectors, table and bias at once, so no (R, K) tensor
outlives its chunk and the backward pass only scales what the forward pass summed.

``masked_sub_token_loss`` is MTM's and M3I's head and loss on top of it. Both CE functions return a
``TokenLoss``; ``full_logits_loss`` is the plain formula (every row's logits at
once), kept as the reference the tests and ``bench/mtm_head.py`` compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenLoss", "tied_head_cross_entropy", "default_chunk_rows", "full_logits_loss", "patch_targets",
           "masked_sub_token_loss"]

# Elements of one chunk's (rows, K) float32 logits when ``chunk_rows`` is not given. CPU: 8 MiB, the fastest
# of 256..16384 rows at K = 8192 and close to it at K = 512 (2 cores, bench/mtm_head.py's shapes: the
# chunk stays in cache). CUDA: 128 MiB, fewer and larger kernels (an unmeasured choice).
CHUNK_ELEMS_CPU = 1 << 21
CHUNK_ELEMS_CUDA = 1 << 25


def default_chunk_rows(k: int, device: torch.device) -> int:
    """Rows per chunk for a K-way head on ``device``: the element budget above divided by K (at least 1)."""
    return max(1, (CHUNK_ELEMS_CUDA if device.type == "cuda" else CHUNK_ELEMS_CPU) // k)


@dataclass(frozen=True)
class TokenLoss:
    """``loss``: 0-dim float32, the mean over rows of the (label-smoothed) cross-entropy, 0 when there are
    no rows (differentiable); ``ce``: float32 (R,) plain cross-entropy in nats, no gradient; ``correct``:
    bool (R,), argmax of the logits == target."""

    loss: torch.Tensor
    ce: torch.Tensor
    correct: torch.Tensor


class _ChunkedTiedCE(torch.autograd.Function):
    """Mean smoothed CE of ``hidden @ table.T + bias`` against ``target``, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                smoothing: float, chunk_rows: int, want_grads: bool):
        rows, k = hidden.shape[0], table.shape[0]
        need_h, need_w, need_b = (want_grads and n for n in ctx.needs_input_grad[:3])
        scale = 1.0 / max(rows, 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(rows, dtype=torch.bool, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if need_w else None
        grad_b = torch.zeros(k, dtype=torch.float32, device=bias.device) if need_b else None
        table_t = table.t()
        for start in range(0, rows, chunk_rows):
            h, t = hidden[start:start + chunk_rows], target[start:start + chunk_rows]
            logits = torch.addmm(bias, h, table_t).float()  # (c, K): the only chunk-sized tensor
            picked = logits.gather(1, t[:, None]).squeeze(1)
            mean_logit = logits.mean(1) if smoothing else None
            top, arg = logits.max(1)
            probs = logits.sub_(top[:, None]).exp_()  # in place: exp(logits - max)
            norm = probs.sum(1)
            lse = top + norm.log()
            nll = lse - picked
            ce[start:start + len(t)] = nll
            correct[start:start + len(t)] = arg == t
            total += nll.sum() if not smoothing else ((1 - smoothing) * nll + smoothing * (lse - mean_logit)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(mean loss)/d(logits) = (softmax - ((1 - eps) onehot + eps / K)) / R
            probs.mul_((scale / norm)[:, None])
            if smoothing:
                probs.sub_(smoothing * scale / k)
            probs.scatter_add_(1, t[:, None], probs.new_full((len(t), 1), -(1 - smoothing) * scale))
            g = probs.to(hidden.dtype)
            if need_h:
                grad_h[start:start + len(t)] = g @ table
            if need_w:
                grad_w.addmm_(probs.t(), h.float())
            if need_b:
                grad_b += probs.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(table.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(ce, correct)
        return total * scale, ce, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce, _grad_correct):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None, None)


def tied_head_cross_entropy(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                            label_smoothing: float = 0.0, chunk_rows: int | None = None) -> TokenLoss:
    """Cross-entropy of the logits ``hidden @ table.T + bias``, ``chunk_rows`` rows at a time.

    hidden: float (R, E) (R may be 0); table: float (K, E) (the token embedding, detached or not);
    bias: float (K,); target: int64 (R,) in [0, K). Logits are formed in ``hidden``'s dtype and the
    softmax in float32, as ``F.cross_entropy(logits.float(), ...)`` does on the full tensor; loss and
    gradients equal ``full_logits_loss``'s up to float rounding. Peak extra memory: one float32
    (chunk_rows, K) tensor plus (R, E) for the gradient of ``hidden``; ``chunk_rows`` defaults to
    ``default_chunk_rows(K, device)``. Gradients are computed during the forward pass (only for inputs
    that require them, and only with grad mode on); the result supports one backward pass (no double
    backward).
    """
    if hidden.ndim != 2 or table.ndim != 2 or hidden.shape[1] != table.shape[1]:
        raise ValueError(f"need hidden (R, E) and table (K, E), got {tuple(hidden.shape)}, {tuple(table.shape)}")
    if target.shape != hidden.shape[:1] or bias.shape != table.shape[:1]:
        raise ValueError(f"need target (R,) and bias (K,), got {tuple(target.shape)}, {tuple(bias.shape)}")
    chunk_rows = default_chunk_rows(table.shape[0], hidden.device) if chunk_rows is None else chunk_rows
    if chunk_rows < 1 or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"need chunk_rows >= 1 and 0 <= label_smoothing < 1, got {chunk_rows}, {label_smoothing}")
    table, bias = table.to(hidden.dtype), bias.to(hidden.dtype)
    loss, ce, correct = _ChunkedTiedCE.apply(hidden, table, bias, target, float(label_smoothing), int(chunk_rows),
                                             torch.is_grad_enabled())
    return TokenLoss(loss, ce, correct)


def full_logits_loss(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                     label_smoothing: float = 0.0) -> TokenLoss:
    """Reference for ``tied_head_cross_entropy`` (same contract): all (R, K) logits at once, autograd."""
    logits = (hidden @ table.t().to(hidden.dtype) + bias.to(hidden.dtype)).float()
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    with torch.no_grad():
        plain = F.cross_entropy(logits, target, reduction="none") if label_smoothing else ce.detach()
        correct = logits.argmax(-1) == target
    loss = ce.sum() / max(len(target), 1)
    return TokenLoss(loss, plain, correct)


def patch_targets(ids: torch.Tensor, patch: int) -> torch.Tensor:
    """ids (B, h, w) -> (B, N, patch * patch): each patch's ids in row-major (row in patch, column in
    patch) order, patches row-major; the order of the sub-token head's outputs."""
    b, h, w = ids.shape
    return ids.reshape(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(b, -1, patch * patch)


def masked_sub_token_loss(z: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, head_fc: nn.Module,
                          head_norm: nn.Module, table: torch.Tensor, bias: torch.Tensor, patch: int,
                          label_smoothing: float = 0.0, chunk_rows: int | None = None) -> TokenLoss:
    """MTM's loss from decoder features, computed at the masked patches only.

    z: float (B, N, Dd) decoder features of the N patches; ids: int64 (B, h, w); masked: bool (B, N).
    The sub-token head (``head_fc``: Dd -> patch * patch * E, GELU, ``head_norm`` over E) runs on the
    masked patches' features, and its sub-tokens are scored against ``table`` (K, E) + ``bias`` (K,) by
    ``tied_head_cross_entropy``. Every masked patch has ``patch ** 2`` rows, so the mean over rows is
    the objectives' "mean over each patch's sub-tokens, then over masked patches" (0 when none is
    masked); ``ce``/``correct`` are per row, in (masked patch, sub-token) order.
    """
    rows = z[masked]  # (M, Dd)
    sub = head_norm(F.gelu(head_fc(rows).reshape(rows.shape[0] * patch * patch, table.shape[1])))
    target = patch_targets(ids, patch)[masked].reshape(-1)
    return tied_head_cross_entropy(sub, table, bias, target, label_smoothing, chunk_rows)
