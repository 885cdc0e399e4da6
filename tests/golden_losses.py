"""Golden trainer losses: every objective for a few steps of the real training step, on a fixed seed.

    DS_ACCELERATOR=cpu python -m tests.golden_losses [--write]   # prints (or rewrites) tests/data/golden_losses.json

One process, one rank: the config goes through ``load_config`` (configs/*.yaml plus tiny overrides),
the objective through ``pretrain.train.build_model``, the optimizer and schedule through
``pretrain.optim`` and a real DeepSpeed engine (ZeRO 0, fp32); each micro-step reseeds torch's
generator with ``pretrain.train.step_seed`` exactly as the trainer does, then ``engine(batch)``,
``engine.backward``, ``engine.step`` and ``after_step``. Batches are synthetic (seeded ids on a
16 x 16 grid, K = 64, labels, label maps). ADDP's frozen parts are a seeded tiny VQGAN and the MTM
case's own checkpoint (written with ``engine.save_checkpoint``, the trainer's format); classify
and segment start from that checkpoint too (``objective.init``).

The JSON was produced by the code before the objectives were split into parts (commit in
``"commit"``); ``tests/test_golden_losses.py`` holds later code to it within a relative tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_losses.json"
STEPS = 3
GRID, VOCAB, CLASSES, BATCH = 16, 64, 5, 4
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2", "model.token_dim=16",
        f"data.batch_size={BATCH}", "augment=null", "optim.warmup_steps=1", "optim.lr=1e-3", f"run.steps={STEPS}"]
DECODER = ["objective.decoder_dim=32", "objective.decoder_heads=2", "objective.decoder_depth=1"]


def cases(work: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (config file, overrides); later cases use files the MTM case and ``_tokenizer`` write."""
    mtm_ckpt, tok = work / "mtm" / "checkpoints", work / "vqgan.pt"
    return {
        "mtm": ("mtm_vit_tiny.yaml", DECODER),
        "m3i": ("m3i_vit_tiny.yaml", DECODER),
        "m3i_mix": ("m3i_vit_tiny.yaml", [*DECODER, "objective.mix_images=true", "objective.cls_mode=contrastive"]),
        "addp": ("addp_vit_tiny.yaml", [*DECODER, f"objective.tokenizer={tok}", f"objective.predictor={mtm_ckpt}",
                                        "objective.pixel_patch=4"]),
        "classify": ("finetune_cls_tiny.yaml", [f"objective.init={mtm_ckpt}"]),
        "classify_decoder": ("finetune_cls_tiny.yaml", [f"objective.decoder={tok}", "objective.pixel_patch=4",
                                                        "optim.layer_decay=1.0"]),
        "segment": ("finetune_seg_tiny.yaml", [f"objective.init={mtm_ckpt}"]),
        "segment_upernet": ("finetune_seg_tiny.yaml", ["objective.head=upernet", "objective.channels=16",
                                                       "model.depth=4"]),
    }


def _tokenizer(path: Path) -> None:
    from pipeline.tokenizer.vqgan import VQGANTokenizer, tiny_preset

    VQGANTokenizer(tiny_preset(resolution=32, n_embed=VOCAB), seed=0).save(path)


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {"tokens": torch.randint(0, VOCAB, (BATCH, GRID, GRID), generator=g),
            "label": torch.randint(0, CLASSES, (BATCH,), generator=g),
            "labelmap": torch.randint(0, 151, (BATCH, 32, 32), generator=g).to(torch.uint8),
            "index": torch.arange(BATCH) + step * BATCH}


def run_case(config: str, overrides: list[str], out: Path) -> list[float]:
    """The trainer's losses for ``STEPS`` optimizer steps of one config; saves a checkpoint under ``out``."""
    import deepspeed

    from pretrain import runtime
    from pretrain.config import load_config
    from pretrain.objectives import DataSpec
    from pretrain.optim import base_lr, deepspeed_config, make_optimizer, make_scheduler
    from pretrain.train import build_model, step_seed

    cfg = load_config(ROOT / "configs" / config, ["data.train=unused", f"run.out={out}", *TINY, *overrides])
    runtime.init_distributed()
    spec = DataSpec(grid=(GRID, GRID), vocab_size=VOCAB, num_classes=CLASSES)
    torch.manual_seed(cfg.run.seed)
    objective, vit = build_model(cfg, spec)
    lr = base_lr(cfg.optim, cfg.data.batch_size)
    optimizer = make_optimizer(objective, cfg.optim, lr)
    scheduler = make_scheduler(optimizer, cfg.optim, lr, cfg.run.steps)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg.engine, cfg.optim, cfg.data.batch_size, 1))
    losses = []
    for step in range(cfg.run.steps):
        torch.manual_seed(step_seed(cfg.run.seed, 0, step, 0))
        loss, _ = engine(_batch(step))
        engine.backward(loss)
        engine.step()
        engine.module.after_step(step + 1)
        losses.append(float(loss.detach()))
    name = type(objective).__name__.lower()  # the registry's names: mtm, m3i, addp, classify, segment
    engine.save_checkpoint(str(out / "checkpoints"), tag=f"step{STEPS:07d}",
                           client_state={"step": STEPS, "vit_config": asdict(vit), "objective": name,
                                         "config": cfg.to_dict(), "num_classes": CLASSES, "tokens": None})
    return losses


def run_all(work: Path) -> dict[str, list[float]]:
    """Every case's losses, in ``cases`` order (the MTM checkpoint first)."""
    from pretrain import runtime

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    _tokenizer(work / "vqgan.pt")
    try:
        return {name: run_case(config, overrides, work / name) for name, (config, overrides) in cases(work).items()}
    finally:  # the one-process group's /dev/shm all-reduce buffer goes with it
        runtime.remove_shm_buffers()
        runtime.shutdown()


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        losses = run_all(Path(tmp))
    print(json.dumps(losses, indent=1))
    if "--out" in argv:
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(losses))
    if "--write" in argv:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"commit": commit, "steps": STEPS, "torch": torch.__version__,
                                      "losses": losses}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
