"""Pre-training throughput: ViT-Tiny MTM under the real trainer against the same model on in-memory batches.

    python bench/pretrain.py --json out/pretrain.json [--data MANIFEST_OR_SPLIT_DIR] [--steps 20] [--batch 32]

In one process, on the same cores:
- **baseline**: the MTM objective and AdamW in a plain PyTorch loop over batches already decoded
  in memory (no streaming, no DeepSpeed): the ceiling for this model on this machine;
- **trainer**: ``pretrain.train.train`` (DeepSpeed engine, one rank) streaming the shards through
  ``storage.stream`` with the config's token augmentation, for ``2 * steps`` steps; the second half
  is measured (the first absorbs start-up).

Prints ``steps_per_s``, ``samples_per_s`` and ``data_wait_fraction`` (time the step waited for
data / wall time; target <= 0.02) of the trainer and ``trainer_vs_in_memory`` (samples/s ratio).
Without ``--data`` a split of 32 x 32 token grids (K = 512, spatially smooth like real VQ maps) is
generated in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import synthetic_split, write_json  # noqa: E402
from pretrain import runtime  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.objectives import DataSpec  # noqa: E402
from pretrain.optim import make_optimizer  # noqa: E402
from pretrain.train import build_model, resolve_manifest, train  # noqa: E402
from storage.manifest import read_manifest  # noqa: E402
from storage.stream import TokenStream  # noqa: E402

CONFIG = _ROOT / "configs" / "mtm_vit_tiny.yaml"


def in_memory_rate(cfg, manifest_url_: str, steps: int) -> float:
    """Samples/s of the objective + AdamW on pre-decoded batches (the same model the trainer builds)."""
    manifest = read_manifest(manifest_url_)
    meta = manifest.meta
    spec = DataSpec(grid=tuple(meta.grid), vocab_size=meta.vocab_size, num_classes=len(meta.class_names))
    torch.manual_seed(0)
    model, _ = build_model(cfg, spec)
    opt = make_optimizer(model, cfg.optim, 1e-4)
    stream = TokenStream(manifest, cfg.data.batch_size, rank=0, world_size=1)
    batches = []
    for b in stream:
        if len(b["tokens"]) == cfg.data.batch_size:
            batches.append({"tokens": b["tokens"]})
        if len(batches) == 8:
            break
    for i in range(2):  # warm-up
        loss, _ = model(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for i in range(steps):
        loss, _ = model(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.data.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="manifest URL or split directory (default: a generated split)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--steps", type=int, default=20, help="measured steps (the trainer runs twice as many)")
    p.add_argument("--batch", type=int, default=32, help="samples per step")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the stream")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    with tempfile.TemporaryDirectory(prefix="vqpt-bench-pretrain-") as tmp:
        data = resolve_manifest(args.data) if args.data else synthetic_split(Path(tmp) / "data")
        cfg = load_config(args.config, [f"data.train={json.dumps(data)}", f"run.out={json.dumps(tmp + '/run')}",
                                        f"run.steps={2 * args.steps}", f"run.log_every={args.steps}",
                                        "run.save_every=0", "run.progress=false", f"data.batch_size={args.batch}",
                                        f"data.num_workers={args.workers}", "optim.warmup_steps=0"])
        vit_name = f"ViT {cfg.model.embed_dim}/{cfg.model.depth}/{cfg.model.num_heads}"
        print(f"baseline: MTM {vit_name} on in-memory batches ...", flush=True)
        baseline = in_memory_rate(cfg, data, args.steps)
        print(f"  {baseline:.1f} samples/s", flush=True)
        print("trainer: DeepSpeed engine streaming shards ...", flush=True)
        train(cfg)
        runtime.shutdown()
        records = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    measured = records[-1]
    result = {
        "model": f"{vit_name} MTM", "device": "cpu" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(), "threads": torch.get_num_threads(), "batch": args.batch,
        "steps_measured": args.steps,
        "steps_per_s": measured["steps_per_s"], "samples_per_s": measured["samples_per_s"],
        "data_wait_fraction": measured["data_wait_fraction"],
        "in_memory_samples_per_s": baseline,
        "trainer_vs_in_memory": measured["samples_per_s"] / baseline,
        "data": args.data or "generated 32x32 tokens, K=512",
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
