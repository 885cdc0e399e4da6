"""Train TokenAdapt on real images and evaluate it against the naive token-warp baseline.

    python -m pipeline.adapters.train_tokenadapt --images DIR --tokenizer CKPT --out CKPT \
        [--val DIR] [--minutes M] [--steps N] [--batch 32] [--seed 0] [--json OUT]

Training pairs: every image x is tokenised once (T(x), kept in memory with the decoded pixels); each
step draws a fresh batch of random thetas, warps the PIXELS with them (``warp_images``: bilinear, the
config's padding_mode, back to uint8) and tokenises the result online, giving the target T(A(x)).
The model predicts it from T(x) and theta (cross-entropy; AdamW, linear warm-up then cosine decay).

The schedule runs on "progress" = max(step / --steps, elapsed / --minutes), so a time budget still
gets a full warm-up + cosine schedule; training stops when either limit is reached.

Evaluation (--val): token agreement (share of positions whose predicted id equals T(A(x))) for
TokenAdapt and the naive baseline (bilinear embedding warp + nearest code) over random thetas drawn
with a fixed seed, plus the same at theta = identity, written to --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.adapters.tokenadapt import (
    TokenAdapt,
    TokenAdaptConfig,
    load_tokenadapt,
    naive_adapt,
    sample_affine,
    save_tokenadapt,
    warp_images,
)
from pipeline.images import list_images, load_resized
from pipeline.tokenizer.base import Tokenizer, load_tokenizer

EVAL_SEED_OFFSET = 10_007  # eval thetas come from seed + this, never from the training stream


def load_split(root: str | Path | list[Path], tokenizer: Tokenizer, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under ``root`` (a folder, or a list of image paths) at the tokenizer
    resolution and tokenise it once. Returns (uint8 (N, R, R, 3) pixels, int64 (N, h, w) ids).
    """
    paths = (list(root) if isinstance(root, list) else list_images(root))[: limit or None]
    if not paths:
        raise ValueError(f"{root}: no images")
    images = load_resized(paths, tokenizer.resolution)
    return images, tokenizer.encode(images)


def lr_at(progress: float, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to 0."""
    if progress < warmup:
        return base_lr * progress / warmup
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def make_batch(
    images: np.ndarray, ids: np.ndarray, idx: np.ndarray, theta: torch.Tensor, tokenizer: Tokenizer, padding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T(x) int64 (B, h, w), T(A(x)) int64 (B, h, w)) for images[idx] and the augmentations theta."""
    target = tokenizer.encode(warp_images(images[idx], theta, padding))
    return torch.from_numpy(ids[idx]), torch.from_numpy(target)


def train(
    model: TokenAdapt, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray, *, steps: int, minutes: float,
    batch: int, lr: float, seed: int, warmup: float = 0.05, log_every: int = 10,
) -> dict[str, Any]:
    """Train in place until ``steps`` or ``minutes`` (0 = no limit; at least one must be set). Returns stats."""
    if steps <= 0 and minutes <= 0:
        raise ValueError("set --steps and/or --minutes")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device  # targets are tokenised on the tokenizer's own device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.99))
    model.train()
    start, step, losses, accs = time.monotonic(), 0, [], []
    bar = tqdm(total=steps if steps > 0 else None, unit="step", desc="tokenadapt", mininterval=2.0)
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / steps if steps > 0 else 0.0, elapsed / (60 * minutes) if minutes > 0 else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, lr, warmup)
        idx = rng.integers(0, len(images), size=batch)
        theta = sample_affine(batch, model.cfg, gen)
        src, tgt = make_batch(images, ids, idx, theta, tokenizer, model.cfg.padding_mode)
        src, tgt = src.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        logits = model(src, theta.to(device))
        loss = F.cross_entropy(logits, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        accs.append(float((logits.argmax(1) == tgt).float().mean()))
        bar.update(1)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}", acc=f"{np.mean(accs[-log_every:]):.3f}",
                            lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    k = max(1, min(50, len(losses)))
    return {
        "steps": step,
        "train_seconds": round(time.monotonic() - start, 1),
        "steps_per_s": step / max(time.monotonic() - start, 1e-9),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-k:])) if losses else None,
        "final_train_agreement": float(np.mean(accs[-k:])) if accs else None,
    }


def single_aug_configs(cfg: TokenAdaptConfig) -> dict[str, TokenAdaptConfig]:
    """Identity, and one config per augmentation type with every other range switched off."""
    still = dataclasses.replace(cfg, flip_p=0.0, max_rotate_deg=0.0, max_translate=0.0, max_shear_deg=0.0,
                                scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    return {
        "identity": still,
        "hflip": dataclasses.replace(still, flip_p=1.0),
        "rotate": dataclasses.replace(still, max_rotate_deg=cfg.max_rotate_deg),
        "translate": dataclasses.replace(still, max_translate=cfg.max_translate),
        "shear": dataclasses.replace(still, max_shear_deg=cfg.max_shear_deg),
        "resized_crop": dataclasses.replace(still, scale_range=cfg.scale_range, ratio_range=cfg.ratio_range),
    }


@torch.no_grad()
def agreement(
    model: TokenAdapt, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray, aug: TokenAdaptConfig, seed: int,
    batch: int = 50,
) -> dict[str, float]:
    """Token agreement with T(A(x)) for thetas from ``aug``'s ranges (seeded): TokenAdapt, naive, copy."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    hits, total = {"tokenadapt": 0, "naive": 0, "copy": 0}, 0
    for s in range(0, len(images), batch):
        idx = np.arange(s, min(s + batch, len(images)))
        theta = sample_affine(len(idx), aug, gen)
        src, tgt = make_batch(images, ids, idx, theta, tokenizer, model.cfg.padding_mode)
        hits["tokenadapt"] += int((model.adapt(src, theta) == tgt).sum())
        hits["naive"] += int((naive_adapt(src, theta, model.codebook, model.cfg.padding_mode) == tgt).sum())
        hits["copy"] += int((src == tgt).sum())
        total += tgt.numel()
    return {k: v / total for k, v in hits.items()}


def evaluate(
    model: TokenAdapt, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray, seed: int, batch: int = 50,
    breakdown: bool = True,
) -> dict[str, Any]:
    """Agreement with T(A(x)) over fixed-seed thetas from the model's ranges, at identity, and per type.

    "copy" (T(x) itself) says how much the augmentation changes the tokens at all. At identity the
    target is T(x) exactly (a bilinear identity warp of uint8 pixels round-trips), so naive gets 1.0.
    """
    seed = seed + EVAL_SEED_OFFSET
    aug = single_aug_configs(model.cfg)
    main = agreement(model, tokenizer, images, ids, model.cfg, seed, batch)
    ident = agreement(model, tokenizer, images, ids, aug.pop("identity"), seed, batch)
    per_aug = {}
    if breakdown:
        for i, (name, cfg) in enumerate(aug.items()):
            per_aug[name] = agreement(model, tokenizer, images, ids, cfg, seed + 1 + i, batch)
    return {
        "tokenadapt_agreement": main["tokenadapt"],
        "naive_agreement": main["naive"],
        "copy_agreement": main["copy"],
        "identity_agreement": {"tokenadapt": ident["tokenadapt"], "naive": ident["naive"]},
        "per_augmentation": per_aug,
        "n_eval_images": len(images),
        "eval_seed": seed,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of training images (recursive)")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (load_tokenizer)")
    p.add_argument("--out", required=True, help="TokenAdapt checkpoint to write")
    p.add_argument("--val", help="folder of validation images for the agreement evaluation")
    p.add_argument("--minutes", type=float, default=0.0, help="training time budget (0: --steps only)")
    p.add_argument("--steps", type=int, default=0, help="max training steps (0: --minutes only)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="where TokenAdapt trains (and a network tokenizer encodes): "
                   "cpu, cuda, cuda:N")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128, help="feature channels C")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin", type=float, default=4.0, help="tied head sharpness: nats between a code and its "
                   "nearest other code for a point on it")
    p.add_argument("--scratch", action="store_true",
                   help="the from-scratch model instead of a learned correction of naive interpolation (ablation)")
    p.add_argument("--init", help="continue from this TokenAdapt checkpoint (its config wins over --width/--heads)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images of each split (0: all)")
    p.add_argument("--json", help="write training stats + evaluation here")
    args = p.parse_args(argv)
    if args.steps <= 0 and args.minutes <= 0:
        p.error("set --steps and/or --minutes")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    if hasattr(tokenizer, "to"):  # a network tokenizer encodes the targets on the training device too
        tokenizer.to(args.device)
    t0 = time.monotonic()
    images, ids = load_split(args.images, tokenizer, args.limit)
    print(f"loaded + tokenised {len(images)} training images at {tokenizer.resolution} px "
          f"-> grid {tokenizer.grid} in {time.monotonic() - t0:.1f}s", flush=True)
    if args.init:  # a fresh warm-up + cosine schedule on top of trained weights
        model = load_tokenadapt(args.init, tokenizer)
    else:
        model = TokenAdapt.for_tokenizer(tokenizer, width=args.width, heads=args.heads, residual=not args.scratch,
                                           margin=args.margin)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TokenAdapt {model.cfg} ({n_params / 1e6:.2f} M trainable params)", flush=True)
    model.to(args.device)
    stats = train(model, tokenizer, images, ids, steps=args.steps, minutes=args.minutes, batch=args.batch,
                  lr=args.lr, seed=args.seed)
    model.cpu()
    if hasattr(tokenizer, "to"):
        tokenizer.to("cpu")
    save_tokenadapt(model, args.out)
    result: dict[str, Any] = {"config": model.cfg.to_dict(), "n_train_images": len(images), "batch": args.batch,
                              "lr": args.lr, "seed": args.seed, "init": args.init, "params": n_params, **stats}
    del images
    if args.val:
        t0 = time.monotonic()
        val_images, val_ids = load_split(args.val, tokenizer, args.limit)
        result.update(evaluate(model, tokenizer, val_images, val_ids, args.seed))
        result["eval_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
