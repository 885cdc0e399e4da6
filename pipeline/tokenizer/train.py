"""Train our own small VQ tokenizer ("VQGAN-lite": the ``VQGANTokenizer`` network, no GAN) on a folder of images.

    python -m pipeline.tokenizer.train --images DIR --out CKPT [--val DIR] [--resolution 128] [--minutes 25]
        [--steps N] [--batch 32] [--vocab 512] [--seed 0] [--json METRICS.json]

Model (``model_config``): taming's encoder/decoder with ch=32, ch_mult=(1, 2, 2) (f4: a 32x32 token grid at
128 px, SeiT's grid size), one ResnetBlock per level, no attention except taming's mid block, z_channels=64,
32-d codes, K = ``--vocab``, ``quantize="l2"``. Measured on 2 CPU cores, fwd+bwd of 16 images at 128 px costs
~4 s for this net (f8 (1,2,2,4): ~5 s; ch=64: ~16 s), so it is the largest net that still gets ~1000+ updates
in 25 minutes. To afford those updates we train on random ``crop``-px crops (default 64) of the 128-px
images: the net is fully convolutional (GroupNorm + mid attention work at any size), so a crop costs 1/4 of
a full image; evaluation always uses whole images.

Training: straight-through estimator; the codebook is *not* trained by gradients but by an EMA of the
assigned encoder outputs (decay 0.99, Laplace smoothing), initialised from random encoder outputs of the
first batch; codes unused for ``dead_after`` steps are re-seeded from random encoder outputs of the current
batch; loss = MSE(x_rec, x) + beta * MSE(z, sg(z_q)) with beta = 0.25. No perceptual/GAN loss: there is no
pretrained VGG (LPIPS) offline, and a GAN needs far more than 25 CPU minutes; MSE is what PSNR measures.
AdamW with linear warm-up + cosine decay. Data: all images decoded once to a uint8 tensor (kept on the
training device), random crops + horizontal flips. On a GPU (``--device cuda``, the default where one
is present) the encoder and decoder run under bf16 autocast (``--precision``; quantisation, EMA and
losses stay float32) and a larger ``--batch`` (256) is the natural setting. With ``--steps`` the run
is deterministic for a seed (same ops, same order, one seeded ``torch.Generator``); with only
``--minutes`` the cosine follows the fraction of the time budget spent (robust to the machine's speed
changing), and training stops cleanly when the budget is spent.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.images import list_images, load_resized
from pipeline.tokenizer.base import codebook_perplexity, psnr
from pipeline.tokenizer.vqgan import VQGANConfig, VQGANTokenizer, nearest_codes
from pipeline.tokenizer.vqgan_modules import VQModel

__all__ = ["EMACodebook", "TrainConfig", "evaluate", "load_folder", "lr_at", "model_config", "train"]

@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (sizes in px, lr in AdamW units, times in minutes)."""

    resolution: int = 128
    crop: int = 64  # training crop side (px); == resolution -> whole images
    batch: int = 32
    vocab: int = 512
    steps: int | None = None  # None -> as many as fit in ``minutes``
    minutes: float = 25.0  # wall-clock budget of the training loop (loading/eval not counted)
    seed: int = 0
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 64
    embed_dim: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50  # steps (capped at steps // 10 for short runs)
    weight_decay: float = 1e-4
    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # EMA decay of the codebook
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    dead_after: int = 20  # steps without use before a code is re-seeded
    device: str = "cpu"  # "cuda" on a GPU machine
    precision: str = "fp32"  # "bf16": autocast of the encoder and decoder

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


def model_config(cfg: TrainConfig) -> VQGANConfig:
    """The ``VQGANConfig`` (quantize="l2") of the network ``cfg`` trains."""
    return VQGANConfig(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, attn_resolutions=(),
                       resolution=cfg.resolution, z_channels=cfg.z_channels, embed_dim=cfg.embed_dim,
                       n_embed=cfg.vocab, quantize="l2")


def load_folder(root: str | Path, resolution: int) -> torch.Tensor:
    """All images under ``root`` (``list_images`` order), resized + centre-cropped -> uint8 (N, R, R, 3)."""
    paths = list_images(root)
    if not paths:
        raise ValueError(f"{root}: no images")
    return torch.from_numpy(load_resized(paths, resolution))


def sample_batch(data: torch.Tensor, batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> float32 (batch, 3, crop, crop) in [-1, 1] on data's device: random images,
    crops and h-flips (drawn from the CPU generator ``gen``, so the same on every device)."""
    n, r = data.shape[0], data.shape[1]
    idx = torch.randint(n, (batch,), generator=gen)
    offs = torch.randint(r - crop + 1, (batch, 2), generator=gen)
    flips = torch.rand(batch, generator=gen) < 0.5
    step = torch.arange(crop)
    rows = offs[:, :1] + step  # (batch, crop)
    cols = torch.where(flips[:, None], offs[:, 1:] + crop - 1 - step, offs[:, 1:] + step)
    dev = data.device
    out = data[idx.to(dev)[:, None, None], rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # (batch, c, c, 3)
    return out.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def lr_at(step: int, total: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine from lr to lr * min_lr_ratio.

    The cosine runs over steps warm-up..``total``, or, when ``progress`` (fraction of a time budget spent,
    0..1) is given, over that fraction: a time-budgeted run then ends its cosine on time even if the
    machine's speed changes.
    """
    warm = max(1, min(cfg.warmup, total // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm) if progress is None else progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class EMACodebook:
    """EMA vector quantiser (VQ-VAE-2 / Sonnet ``VectorQuantizerEMA``) acting on the model's codebook in place.

    embed: float32 (K, D), the VQModel's ``quantize.embedding.weight`` *data* (so the model always holds the
    current EMA codebook); cluster_size (K,) and embed_avg (K, D) are the EMA statistics; last_used (K,) int64
    is the last step each code was assigned.
    """

    def __init__(self, embed: torch.Tensor, decay: float = 0.99, eps: float = 1e-5) -> None:
        self.embed = embed
        self.decay, self.eps = decay, eps
        k = embed.shape[0]
        self.cluster_size = torch.ones(k, device=embed.device)
        self.embed_avg = embed.clone()
        self.last_used = torch.zeros(k, dtype=torch.long, device=embed.device)

    @property
    def k(self) -> int:
        return int(self.embed.shape[0])

    @torch.no_grad()
    def init_from(self, flat: torch.Tensor, gen: torch.Generator) -> None:
        """Seed every code with a random row of float (n, D) encoder outputs (with replacement if n < K)."""
        n = flat.shape[0]
        pick = torch.randperm(n, generator=gen)[: self.k] if n >= self.k else torch.randint(n, (self.k,), generator=gen)
        self.embed.copy_(flat[pick.to(flat.device)])
        self.embed_avg.copy_(self.embed)
        self.cluster_size.fill_(1.0)

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """float (n, D) -> int64 (n,) nearest code ids (l2, ties: lowest id, same as ``VQGANTokenizer.encode``)."""
        return nearest_codes(flat.detach(), self.embed, "l2")

    @torch.no_grad()
    def update(self, flat: torch.Tensor, ids: torch.Tensor, step: int) -> None:
        """One EMA step with the assignments ``ids`` (n,) of ``flat`` (n, D)."""
        counts = torch.bincount(ids, minlength=self.k).to(flat.dtype)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, ids, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.k * self.eps) * total  # Laplace smoothing
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        self.last_used[counts > 0] = step

    @torch.no_grad()
    def restart_dead(self, flat: torch.Tensor, step: int, dead_after: int, gen: torch.Generator) -> int:
        """Re-seed codes unused for >= ``dead_after`` steps from random rows of ``flat`` (n, D); returns how many."""
        dead = torch.nonzero(step - self.last_used >= dead_after).flatten()
        if dead.numel() == 0:
            return 0
        rows = flat[torch.randint(flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)]
        self.embed[dead] = rows
        self.embed_avg[dead] = rows
        self.cluster_size[dead] = 1.0
        self.last_used[dead] = step
        return int(dead.numel())


def _latents(model: VQModel, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """float (B, 3, H, W) -> (flat float (B*h*w, D) latents, their (B, h, w, D) shape)."""
    z = model.encode_latents(x).permute(0, 2, 3, 1)
    return z.reshape(-1, z.shape[-1]), tuple(z.shape)


def train_step(model: VQModel, cb: EMACodebook, opt: torch.optim.Optimizer, x: torch.Tensor, step: int,
               cfg: TrainConfig, gen: torch.Generator) -> dict[str, float]:
    """One update on float (B, 3, c, c) images in [-1, 1]; returns loss, rec (MSE), psnr (dB), ppl, restarts."""
    model.train()
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with autocast:
        flat, shape = _latents(model, x)
    flat = flat.float()
    if step == 0:
        cb.init_from(flat.detach(), gen)
    ids = cb.assign(flat)
    zq = cb.embed[ids]  # no grad: the codebook only moves by EMA
    commit = F.mse_loss(flat, zq)
    zst = (flat + (zq - flat).detach()).view(shape).permute(0, 3, 1, 2)  # straight-through
    with autocast:
        rec_x = model.decode_codes(zst)
    rec = F.mse_loss(rec_x.float(), x)
    loss = rec + cfg.beta * commit
    loss_f, rec_f = float(loss.detach()), float(rec.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    cb.update(flat.detach(), ids, step)
    restarts = cb.restart_dead(flat.detach(), step, cfg.dead_after, gen)
    return {"loss": loss_f, "rec": rec_f, "psnr": 10 * math.log10(4.0 / max(rec_f, 1e-12)),
            "ppl": codebook_perplexity(ids, cb.k), "restarts": restarts}


def evaluate(tok: VQGANTokenizer, images: np.ndarray) -> dict[str, float]:
    """uint8 (N, R, R, 3) -> {"psnr": dB of decode(encode(x)) vs x pooled over all images, "perplexity",
    "codes_used": distinct ids, "vocab_size", "images"}."""
    ids = tok.encode(images)
    rec = tok.decode(ids)
    return {"psnr": psnr(rec, images), "perplexity": codebook_perplexity(ids, tok.vocab_size),
            "codes_used": int(np.unique(ids).size), "vocab_size": tok.vocab_size, "images": int(images.shape[0])}


def train(data: torch.Tensor, cfg: TrainConfig, progress: bool = True) -> tuple[VQGANTokenizer, dict[str, Any]]:
    """Train on uint8 (N, R, R, 3) images -> (tokenizer holding the EMA codebook, training stats).

    Stats: steps, seconds (training loop wall time), history (per-step dicts of ``train_step``).
    """
    if data.dtype != torch.uint8 or data.ndim != 4 or data.shape[1:] != (cfg.resolution, cfg.resolution, 3):
        r = cfg.resolution
        raise ValueError(f"expected uint8 (N, {r}, {r}, 3), got {data.dtype} {tuple(data.shape)}")
    if cfg.steps is None and cfg.minutes <= 0:
        raise ValueError("give steps or a positive minutes budget")
    mcfg = model_config(cfg)
    tok = VQGANTokenizer(mcfg, seed=cfg.seed)
    device = torch.device(cfg.device)
    model = tok.model.to(device).requires_grad_(True)
    data = data.to(device)
    model.quantize.requires_grad_(False)
    cb = EMACodebook(model.quantize.embedding.weight.data, cfg.decay, cfg.eps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.steps if cfg.steps is not None else 10**9
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    timed = cfg.steps is None  # cosine over the time budget instead of a step count
    history: list[dict[str, float]] = []
    t0 = time.monotonic()
    bar = tqdm(total=cfg.steps, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    step, t_warm = 0, 0.0
    while step < total and time.monotonic() - t0 < budget:
        if timed and step == cfg.warmup:
            t_warm = time.monotonic() - t0
        frac = max(0.0, time.monotonic() - t0 - t_warm) / max(1e-9, budget - t_warm) if timed else None
        lr = lr_at(step, total, cfg, frac)
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(data, cfg.batch, cfg.crop, gen)
        stats = train_step(model, cb, opt, x, step, cfg, gen)
        history.append(stats)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}", ppl=f"{stats['ppl']:.0f}",
                        lr=f"{lr:.1e}", refresh=False)
    bar.close()
    model.eval().requires_grad_(False).to("cpu")  # the tokenizer encodes and saves on the CPU
    return tok, {"steps": step, "seconds": time.monotonic() - t0, "history": history}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tokenizer.train", description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="training image folder (recursive)")
    ap.add_argument("--out", required=True, help="checkpoint path (load with load_tokenizer)")
    ap.add_argument("--val", help="validation image folder: PSNR / perplexity / codes used")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--crop", type=int, default=64, help="training crop side in px (resolution: whole images)")
    ap.add_argument("--minutes", type=float, default=25.0, help="training-loop budget; 0: no time limit")
    ap.add_argument("--steps", type=int, help="number of updates (default: as many as fit in --minutes)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write metrics JSON here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="training device (default: cuda when present)")
    ap.add_argument("--precision", choices=("fp32", "bf16"),
                    help="autocast of encoder/decoder (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    precision = a.precision or ("bf16" if a.device.startswith("cuda") else "fp32")
    cfg = TrainConfig(resolution=a.resolution, crop=min(a.crop, a.resolution), batch=a.batch, vocab=a.vocab,
                      steps=a.steps, minutes=a.minutes, seed=a.seed, device=a.device, precision=precision)
    t_load = time.monotonic()
    data = load_folder(a.images, cfg.resolution)
    print(f"loaded {data.shape[0]} training images ({data.numel() / 2**20:.0f} MiB) in "
          f"{time.monotonic() - t_load:.1f}s; model {model_config(cfg)}", flush=True)
    tok, stats = train(data, cfg, progress=not a.no_progress)
    tok.save(a.out)
    hist = stats["history"]
    metrics: dict[str, Any] = {"checkpoint": str(a.out), "train_images": int(data.shape[0]), "steps": stats["steps"],
                               "train_seconds": round(stats["seconds"], 1), "config": asdict(cfg),
                               "model_config": asdict(model_config(cfg)), "grid": list(tok.grid),
                               "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"],
                               "last_train_psnr": hist[-1]["psnr"], "restarts": sum(h["restarts"] for h in hist)}
    if a.val:
        val = load_folder(a.val, cfg.resolution).numpy()
        t_eval = time.monotonic()
        metrics.update(evaluate(tok, val))
        metrics["eval_seconds"] = round(time.monotonic() - t_eval, 1)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("config", "model_config")}, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
