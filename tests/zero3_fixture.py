"""A real ZeRO-3 DeepSpeed checkpoint of a tiny ViT, for the export tests (tests/test_export_zero3.py).

    DS_ACCELERATOR=cpu python -m tests.zero3_fixture   # rewrites tests/data/zero3/

One process, one rank (gloo): a wrapper with the encoder under ``encoder.`` (as the trainer's
objectives have it) goes through ``deepspeed.initialize`` with ZeRO stage 3, takes one AdamW step on
seeded ids and is saved with ``engine.save_checkpoint(..., client_state={"vit_config": ...})``. The
trainer itself refuses ZeRO-3, so such checkpoints come from elsewhere; this is what one looks like
under DeepSpeed 0.19.8. ``reference.pt`` holds the encoder's weights gathered from the engine after
the step (float32, keys without ``encoder.``): what consolidation must give back. DeepSpeed also
copies its ``zero_to_fp32.py`` / ``zero_to_torch.py`` scripts into the folder; they are not kept
(the tests plant their own to prove nothing in a checkpoint folder is run).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "zero3"
TAG = "step0000001"


def make(out: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from storage.net import free_port

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    import deepspeed
    import torch

    from pretrain.runtime import remove_shm_buffers
    from pretrain.vit import VisionTransformer, ViTConfig

    cfg = ViTConfig(grid=4, vocab_size=16, token_dim=8, embed_dim=16, depth=1, num_heads=2, patch_size=2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = VisionTransformer(cfg)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(ids).float().pow(2).mean()

    try:
        torch.manual_seed(0)
        model = Wrapper()
        deepspeed.init_distributed(dist_backend="gloo")
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
            config={"train_batch_size": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
        loss = engine(torch.randint(0, cfg.vocab_size, (2, cfg.grid, cfg.grid)))
        engine.backward(loss)
        engine.step()
        shutil.rmtree(out, ignore_errors=True)
        engine.save_checkpoint(str(out), tag=TAG, client_state={"vit_config": dataclasses.asdict(cfg)})
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            reference = {k.removeprefix("encoder."): v.detach().float().clone()
                         for k, v in engine.module.state_dict().items()}
        torch.save(reference, out / "reference.pt")
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (out / script).unlink(missing_ok=True)
    finally:
        remove_shm_buffers()


if __name__ == "__main__":
    make(FIXTURE)
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown (DESIGN.md)
