"""MTM's token head: masked-only chunked loss against the full-logits path, peak memory and step time.

    python bench/mtm_head.py --json out/mtm_head.json [--batch 8 --grid 32 --vocab 8192 --reps 10]

One step = the head and loss from the decoder output, forward and backward: ``MTM.forward_loss(
MTM.token_logits(z))`` ("full": logits (B, h, w, K) at every position) against ``MTM.masked_loss(z)``
("masked": only the masked patches, ``pretrain.token_loss``, in chunks). ViT-B's head by default
(configs/mtm_vit_b.yaml: decoder width 512, token_dim 32, 2 x 2 sub-tokens, K = 8192, 32 x 32 grid),
batch 8, float32, CPU, the objective's mean mask ratio (SeiT++'s truncated normal, ~0.61).

- ``peak_mem_ratio``: each variant runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536`` so
  freed tensors leave the resident set); after one warm-up step the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs``), one step runs, and its peak is VmHWM minus VmRSS just before the step.
- ``step_time_ratio``: both variants in this process, alternating, median of ``--reps`` after warm-up.
Nothing is asserted; ratios are masked / full.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import write_json  # noqa: E402
from pretrain.objectives import DataSpec  # noqa: E402
from pretrain.objectives.mtm import MTM, MTMConfig  # noqa: E402
from pretrain.vit import ViTConfig  # noqa: E402


def mean_mask_ratio(cfg: MTMConfig) -> float:
    """Mean of N(mu, std) truncated to [min, max]: the objective's average share of masked patches."""
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    a = (cfg.mask_ratio_min - cfg.mask_ratio_mu) / cfg.mask_ratio_std
    b = (cfg.mask_ratio_max - cfg.mask_ratio_mu) / cfg.mask_ratio_std
    return cfg.mask_ratio_mu + cfg.mask_ratio_std * (phi(a) - phi(b)) / (cdf(b) - cdf(a))


def setup(args: argparse.Namespace) -> tuple[MTM, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head (a 1-block encoder and decoder: only the head runs) and one batch: z float32 (B, N, Dd)
    requiring grad, ids int64 (B, grid, grid), masked bool (B, N) with ceil(ratio N) per row."""
    torch.manual_seed(0)
    vit = ViTConfig(embed_dim=768, depth=1, num_heads=12, grid=args.grid, patch_size=2, vocab_size=args.vocab,
                    token_dim=args.token_dim)
    cfg = MTMConfig(decoder_dim=args.decoder_dim, decoder_depth=1)
    model = MTM(cfg, vit, DataSpec(grid=(args.grid, args.grid), vocab_size=args.vocab))
    n = vit.num_patches
    ratio = args.mask_ratio if args.mask_ratio is not None else mean_mask_ratio(cfg)
    masked = torch.rand(args.batch, n).argsort(1) < math.ceil(ratio * n)
    z = torch.randn(args.batch, n, args.decoder_dim, requires_grad=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.grid, args.grid))
    return model, z, ids, masked


def step(variant: str, model: MTM, z: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor) -> float:
    """Forward + backward of one variant; gradients are dropped afterwards. Returns the loss."""
    if variant == "full":
        loss, _ = model.forward_loss(model.token_logits(z), ids, masked)
    else:
        loss, _ = model.masked_loss(z, ids, masked)
    loss.backward()
    value = loss.item()
    z.grad = None
    model.zero_grad(set_to_none=True)
    return value


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure_peak(variant: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process: peak resident memory added by one step of ``variant``, in MiB."""
    model, z, ids, masked = setup(args)
    step(variant, model, z, ids, masked)  # warm-up: lazy allocations, thread pools
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    loss = step(variant, model, z, ids, masked)
    return {"variant": variant, "peak_mib": (_status_kib("VmHWM") - before) / 1024, "loss": loss}


def peak_in_subprocess(variant: str, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, *argv, "--peak-only", variant], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def step_times(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of each variant, alternating so both see the same machine load."""
    model, z, ids, masked = setup(args)
    times: dict[str, list[float]] = {"full": [], "masked": []}
    for rep in range(args.warmup + args.reps):
        for variant in times:
            t0 = time.perf_counter()
            step(variant, model, z, ids, masked)
            if rep >= args.warmup:
                times[variant].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


SHAPE_ARGS = ("batch", "grid", "vocab", "decoder_dim", "token_dim", "mask_ratio")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--decoder-dim", type=int, default=512)
    ap.add_argument("--token-dim", type=int, default=32)
    ap.add_argument("--mask-ratio", type=float, default=None, help="default: the objective's mean")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-only", choices=("full", "masked"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.peak_only:
        result = measure_peak(args.peak_only, args)
        print(json.dumps(result))
        return result
    child_argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k in SHAPE_ARGS and v is not None]
    peaks = {v: peak_in_subprocess(v, child_argv) for v in ("full", "masked")}
    times = step_times(args)
    model, _, _, masked = setup(args)
    result = {
        "config": {"batch": args.batch, "grid": args.grid, "vocab": args.vocab, "decoder_dim": args.decoder_dim,
                   "token_dim": args.token_dim, "masked_patches_per_sample": int(masked[0].sum()),
                   "patches": masked.shape[1], "dtype": "float32", "threads": torch.get_num_threads()},
        "full_logits_mib": args.batch * args.grid ** 2 * args.vocab * 4 / 2 ** 20,
        "peak_mib": {v: p["peak_mib"] for v, p in peaks.items()},
        "loss": {v: p["loss"] for v, p in peaks.items()},
        "step_s": times,
        "peak_mem_ratio": peaks["masked"]["peak_mib"] / peaks["full"]["peak_mib"],
        "step_time_ratio": times["masked"] / times["full"],
        "memory_method": "fresh subprocess per variant, VmHWM - VmRSS around one step after clear_refs",
    }
    result["targets_met"] = {"peak_mem_ratio <= 0.4": result["peak_mem_ratio"] <= 0.4,
                             "step_time_ratio <= 0.7": result["step_time_ratio"] <= 0.7}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
