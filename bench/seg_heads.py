"""Segmentation heads compared: UperNet (BEiT/MAE) vs SETR-PUP on the same tokens, steps and optimizer.

    python bench/seg_heads.py --data out/ade20k_tok/training [MORE_SPLIT_DIRS ...] --steps 150 \\
        --json out/seg_heads.json [--init out/mtm/backbone.pt] [--heads upernet,pup] [--channels 128]

One process, a plain PyTorch loop (no DeepSpeed, no streaming: the samples of the given splits are
decoded once into memory). For every head: the same seed, the same initial encoder (``--init`` or a
fresh ViT of ``--preset``/``--depth``), the same batch order, the objective's joint crop + flip
augmentation, and AdamW with warm-up + cosine and layer-wise lr decay as
configs/finetune_seg_tiny.yaml (``pretrain.optim``). Reported per head:

- ``head_params`` / ``encoder_params``;
- ``gflops_per_sample``: forward FLOPs of one sample (``torch.utils.flop_counter``), whole model
  and head alone;
- ``ms_per_step``: median wall time of a training step (forward, backward, AdamW) on this machine;
- ``final_loss``: mean training loss of the last 10 steps;
- ``fit_miou`` / ``fit_pixel_accuracy``: the trained model on the same samples it trained on
  (whole-grid inference, ``evaluate_segmentation``'s scoring).

With a handful of images (the ade20k_sample has 4) this measures how fast each head fits and what
it costs, not how well it generalises. ``bench/seg_backbones.py`` uses the same loop (``fit``,
``score``) to compare pre-trained backbones (MTM, M3I, ADDP) on held-out scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import write_json  # noqa: E402
from pretrain.config import OptimConfig  # noqa: E402
from pretrain.export import load_backbone  # noqa: E402
from pretrain.metrics import ConfusionMatrix, ade20k_targets  # noqa: E402
from pretrain.objectives import DataSpec, build_objective  # noqa: E402
from pretrain.optim import make_optimizer, make_scheduler  # noqa: E402
from pretrain.train import resolve_manifest  # noqa: E402
from pretrain.vit import vit_config  # noqa: E402
from storage.stream import TokenStream  # noqa: E402


def load_samples(dirs: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every real sample of the splits: tokens int64 (N, h, w), label maps uint8 (N, L, L), vocab size K."""
    tokens, maps, vocab = [], [], set()
    for d in dirs:
        stream = TokenStream(resolve_manifest(d), batch_size=256, shuffle=False, rank=0, world_size=1)
        vocab.add(stream.manifest.meta.vocab_size)
        for b in stream:
            keep = ~b["pad"]
            tokens.append(b["tokens"][keep])
            maps.append(b["labelmap"][keep])
    if len(vocab) != 1:
        raise SystemExit(f"the splits have different vocab sizes {sorted(vocab)}")
    return torch.cat(tokens), torch.cat(maps), vocab.pop()


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def fit(model, tokens: torch.Tensor, maps: torch.Tensor, steps: int, batch_size: int, lr: float,
        seed: int, name: str) -> dict:
    """Train the segment objective ``model`` in place: ``steps`` AdamW steps (warm-up + cosine, layer decay
    0.65 as configs/finetune_seg_tiny.yaml) on batches of ``batch_size`` samples drawn with rng(``seed``);
    returns the median step time (ms), the first and last losses (means of 10 steps) and every loss."""
    optim = OptimConfig(lr=lr, betas=(0.9, 0.999), warmup_steps=max(1, steps // 10), layer_decay=0.65,
                        grad_clip=0.0)
    opt = make_optimizer(model, optim, lr)
    sched = make_scheduler(opt, optim, lr, steps)
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(tokens), (batch_size,), generator=order) for _ in range(steps)]
    losses, times = [], []
    model.train()
    for step, idx in enumerate(batches):
        torch.manual_seed(seed * 100003 + step)
        t0 = time.perf_counter()
        loss, _ = model({"tokens": tokens[idx], "labelmap": maps[idx]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"{name} step {step + 1}/{steps} loss {losses[-1]:.3f} ({1000 * times[-1]:.0f} ms)",
                  file=sys.stderr, flush=True)
    model.eval()
    return {"ms_per_step": 1000 * statistics.median(times[1:] or times), "first_loss": statistics.mean(losses[:10]),
            "final_loss": statistics.mean(losses[-10:]), "losses": losses}


@torch.no_grad()
def score(model, tokens: torch.Tensor, maps: torch.Tensor, mode: str = "whole") -> ConfusionMatrix:
    """The confusion matrix of ``model``'s predictions (``mode`` inference) against the label maps."""
    model.eval()
    cm = ConfusionMatrix(model.cfg.num_classes)
    for i in range(0, len(tokens), 8):
        target = ade20k_targets(maps[i:i + 8])
        cm.update(model.predict(tokens[i:i + 8], target.shape[-2:], mode).argmax(1), target)
    return cm


def run_head(head: str, args: argparse.Namespace, tokens: torch.Tensor, maps: torch.Tensor, vocab: int) -> dict:
    grid = tokens.shape[-1]
    if args.init:
        vit = load_backbone(args.init).cfg
        vit = dataclasses.replace(vit, grid=grid, vocab_size=vocab, drop_path=0.1)
    else:
        vit = vit_config(args.preset, grid=grid, vocab_size=vocab, depth=args.depth, drop_path=0.1)
    torch.manual_seed(args.seed)
    options = {"head": head, "channels": args.channels, "pup_stages": args.pup_stages, "init": args.init or ""}
    model = build_objective("segment", options, vit, DataSpec((grid, grid), vocab))
    trained = fit(model, tokens, maps, args.steps, args.batch_size, args.lr, args.seed, head)
    cm = score(model, tokens, maps)
    one = tokens[:1]
    total = flops(lambda: model.logits(one))
    encoder = flops(lambda: model.features(one))
    return {
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "encoder_params": model.encoder.num_params(),
        "gflops_per_sample": total / 1e9, "head_gflops_per_sample": (total - encoder) / 1e9,
        **{k: v for k, v in trained.items() if k != "losses"},
        "fit_miou": cm.miou(), "fit_pixel_accuracy": cm.pixel_accuracy(),
        "logits_hw": list(model.logits(one).shape[-2:]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/seg_heads.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="tokenised ADE20K split directories (or manifests)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--heads", default="upernet,pup")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--pup-stages", type=int, default=2)
    p.add_argument("--init", help="pre-trained backbone.pt (its architecture is used); default: fresh ViT")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depth", type=int, default=4, help="encoder depth without --init")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tokens, maps, vocab = load_samples(args.data)
    result = {"data": args.data, "samples": len(tokens), "grid": list(tokens.shape[-2:]),
              "labelmap": list(maps.shape[-2:]), "vocab_size": vocab, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "init": args.init, "threads": torch.get_num_threads(),
              "heads": {h: run_head(h, args, tokens, maps, vocab) for h in args.heads.split(",")},
              "note": f"{len(tokens)} images: fitting speed and cost, not generalisation"}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
