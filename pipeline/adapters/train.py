"""Train a token adapter (TokenAdapt or ColorAdapt) on real images and evaluate it against its baselines.

    python -m pipeline.adapters.train --kind tokenadapt|coloradapt --images DIR --tokenizer CKPT --out CKPT \\
        [--val DIR] [--minutes M] [--steps N] [--batch 32] [--device cuda] [--seed 0] [--model KEY=VALUE ...] \\
        [--json OUT]

One loop for both adapters (``AdapterSpec`` in ``pipeline.adapters.common`` says what differs). Training
pairs: every image x is decoded at the tokenizer's resolution and tokenised once (T(x), kept in memory
with the pixels); each step draws a batch of random op parameters in the model's ranges (affine warps
for TokenAdapt, colour jitter for ColorAdapt), applies the op to the PIXELS and tokenises the result
online, giving the target T(op(x)). The model predicts it from T(x) and the parameters (cross-entropy;
AdamW, linear warm-up then cosine decay).

The schedule runs on "progress" = max(step / --steps, elapsed / --minutes), so a time budget still gets a
full warm-up + cosine schedule; training stops when either limit is reached.

Evaluation (--val): token agreement (share of positions whose predicted id equals T(op(x))) over
parameters drawn with a fixed seed, for the learned model, its baselines (TokenAdapt: naive interpolation
+ nearest code; ColorAdapt: AdaIN with the target's statistics) and "copy" (T(x) itself: how much the op
changes the tokens at all); the same at the identity op, and per single op. Keys: ``<name>_agreement``,
``identity_agreement`` {name: share}, ``per_augmentation`` {op: {name: share}}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapters import coloradapt, tokenadapt
from pipeline.adapters.common import AdapterSpec, load_adapter, save_adapter
from pipeline.images import list_images, load_resized
from pipeline.tokenizer.base import Tokenizer, load_tokenizer

__all__ = ["SPECS", "load_split", "lr_at", "make_batch", "train", "agreement", "evaluate", "main"]

SPECS: dict[str, AdapterSpec] = {s.kind: s for s in (tokenadapt.SPEC, coloradapt.SPEC)}
EVAL_SEED_OFFSET = 10_007  # eval parameters come from seed + this, never from the training stream


def load_split(root: str | Path | list[Path], tokenizer: Tokenizer, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under ``root`` (a folder, or a list of image paths; with ``limit`` > 0, that many
    evenly spaced over the sorted list, so every class folder contributes) at the tokenizer resolution and
    tokenise it once. Returns (uint8 (N, R, R, 3), int64 (N, h, w) ids)."""
    paths = list(root) if isinstance(root, list) else list_images(root)
    if 0 < limit < len(paths):
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
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


def make_batch(spec: AdapterSpec, images: np.ndarray, ids: np.ndarray, idx: np.ndarray, params: torch.Tensor,
               tokenizer: Tokenizer, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(T(x) int64 (B, h, w), T(op(x)) int64 (B, h, w)) for images[idx] and the op parameters (B, ...)."""
    target = tokenizer.encode(spec.pixels(images[idx], params, cfg))
    return torch.from_numpy(ids[idx]), torch.from_numpy(target)


def train(spec: AdapterSpec, model: nn.Module, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray, *,
          steps: int, minutes: float, batch: int, lr: float, seed: int, warmup: float = 0.05,
          log_every: int = 10) -> dict[str, Any]:
    """Train ``model`` in place until ``steps`` or ``minutes`` (0 = no limit; at least one set). Returns stats."""
    if steps <= 0 and minutes <= 0:
        raise ValueError("set --steps and/or --minutes")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device  # the model's device; targets are tokenised on the tokenizer's
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.99))
    model.train()
    start, step, losses, accs = time.monotonic(), 0, [], []
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / steps if steps > 0 else 0.0, elapsed / (60 * minutes) if minutes > 0 else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, lr, warmup)
        idx = rng.integers(0, len(images), size=batch)
        params = spec.sample(batch, model.cfg, gen)
        src, tgt = make_batch(spec, images, ids, idx, params, tokenizer, model.cfg)
        src, tgt = src.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        logits = model(src, params.to(device))
        loss = F.cross_entropy(logits, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        accs.append(float((logits.argmax(1) == tgt).float().mean()))
        if step % log_every == 0:
            print(f"{spec.kind} step {step} t={time.monotonic() - start:.0f}s loss={np.mean(losses[-log_every:]):.3f} "
                  f"acc={np.mean(accs[-log_every:]):.3f} lr={opt.param_groups[0]['lr']:.1e}", flush=True)
    k = max(1, min(50, len(losses)))
    seconds = time.monotonic() - start
    return {"steps": step, "train_seconds": round(seconds, 1), "steps_per_s": step / max(seconds, 1e-9),
            "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-k:])) if losses else None,
            "final_train_agreement": float(np.mean(accs[-k:])) if accs else None}


@torch.no_grad()
def agreement(spec: AdapterSpec, model: nn.Module, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray,
              cfg: Any, seed: int, batch: int = 50) -> dict[str, float]:
    """Share of positions equal to T(op(x)) for ops drawn (seeded) from ``cfg``'s ranges: the learned model,
    its baselines and "copy"."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    hits: dict[str, int] = {}
    total = 0
    for s in range(0, len(images), batch):
        idx = np.arange(s, min(s + batch, len(images)))
        params = spec.sample(len(idx), cfg, gen)
        src, tgt = make_batch(spec, images, ids, idx, params, tokenizer, model.cfg)
        preds = {spec.learned: model.adapt(src, params), **spec.baselines(model, src, tgt, params), "copy": src}
        for name, pred in preds.items():
            hits[name] = hits.get(name, 0) + int((pred == tgt).sum())
        total += tgt.numel()
    return {k: v / total for k, v in hits.items()}


def evaluate(spec: AdapterSpec, model: nn.Module, tokenizer: Tokenizer, images: np.ndarray, ids: np.ndarray,
             seed: int, batch: int = 50, breakdown: bool = True) -> dict[str, Any]:
    """Agreement over fixed-seed ops from the model's ranges (``<name>_agreement``), at the identity op
    (``identity_agreement``) and per single op (``per_augmentation``, with ``breakdown``)."""
    seed = seed + EVAL_SEED_OFFSET
    single = spec.single_ops(model.cfg)
    main = agreement(spec, model, tokenizer, images, ids, model.cfg, seed, batch)
    ident = agreement(spec, model, tokenizer, images, ids, single.pop("identity"), seed, batch)
    per_op = {}
    if breakdown:
        per_op = {name: agreement(spec, model, tokenizer, images, ids, cfg, seed + 1 + i, batch)
                  for i, (name, cfg) in enumerate(single.items())}
    return {**{f"{k}_agreement": v for k, v in main.items()},
            "identity_agreement": {k: v for k, v in ident.items() if k != "copy"},
            "per_augmentation": per_op, "n_eval_images": len(images), "eval_seed": seed}


def _model_overrides(items: list[str], config: type) -> dict[str, Any]:
    """``["width=32", "heads=2"]`` -> {"width": 32, "heads": 2} (values as JSON, else strings); fields checked."""
    names = {f for f in config.__dataclass_fields__}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--model {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.adapters.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=sorted(SPECS), help="which adapter")
    p.add_argument("--images", required=True, help="folder of training images (recursive)")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (load_tokenizer)")
    p.add_argument("--out", required=True, help="adapter checkpoint to write")
    p.add_argument("--val", help="folder of validation images for the agreement evaluation")
    p.add_argument("--minutes", type=float, default=0.0, help="training time budget (0: --steps only)")
    p.add_argument("--steps", type=int, default=0, help="max training steps (0: --minutes only)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="where the adapter trains (and a network tokenizer encodes the "
                   "targets): cpu, cuda, cuda:N")
    p.add_argument("--lr", type=float, help="peak learning rate (default: tokenadapt 1e-3, coloradapt 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a core shared with other work)")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config fields of the adapter (e.g. width=64 heads=2, residual=false, blocks=2)")
    p.add_argument("--init", help="continue from this checkpoint of the same kind (its config wins over --model)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only N images of each split, evenly spaced over the sorted files (0: all)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-op evaluation")
    p.add_argument("--json", help="write training stats + evaluation here")
    args = p.parse_args(argv)
    if args.steps <= 0 and args.minutes <= 0:
        p.error("set --steps and/or --minutes")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = SPECS[args.kind]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    if hasattr(tokenizer, "to"):  # a network tokenizer encodes the targets on the training device too
        tokenizer.to(args.device)
    t0 = time.monotonic()
    images, ids = load_split(args.images, tokenizer, args.limit)
    print(f"loaded + tokenised {len(images)} training images at {tokenizer.resolution} px -> grid {tokenizer.grid} "
          f"in {time.monotonic() - t0:.1f}s", flush=True)
    if args.init:  # a fresh warm-up + cosine schedule on top of trained weights
        model = load_adapter(args.init, spec.kind, tokenizer, spec.config, spec.model)
    else:
        model = spec.model.for_tokenizer(tokenizer, **_model_overrides(args.model, spec.config))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{spec.kind} {model.cfg} ({n_params / 1e6:.2f} M trainable params)", flush=True)
    lr = args.lr or spec.lr
    model.to(args.device)
    stats = train(spec, model, tokenizer, images, ids, steps=args.steps, minutes=args.minutes, batch=args.batch,
                  lr=lr, seed=args.seed)
    model.cpu()  # saved and evaluated on the CPU
    if hasattr(tokenizer, "to"):
        tokenizer.to("cpu")
    save_adapter(model, args.out, spec.kind)
    result: dict[str, Any] = {"kind": spec.kind, "config": model.cfg.to_dict(), "n_train_images": len(images),
                              "batch": args.batch, "lr": lr, "seed": args.seed, "init": args.init, "params": n_params,
                              **stats}
    del images
    if args.val:
        t0 = time.monotonic()
        val_images, val_ids = load_split(args.val, tokenizer, args.limit)
        result.update(evaluate(spec, model, tokenizer, val_images, val_ids, args.seed, breakdown=not args.no_breakdown))
        result["eval_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    from storage.cli import run_cli

    def body(argv_: list[str]) -> int:
        run(parse_args(argv_))
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
