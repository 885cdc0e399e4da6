"""The DeepSpeed trainer end to end: 2 CPU ranks under the real `deepspeed` launcher on real images
tokenised by pipeline/: the loss falls, checkpoints are written, ZeRO 0/1/2, clean exit (exact resume:
test_augment with two DataLoader workers, test_elastic at ZeRO 0 and 2 and other world sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.launch import deepspeed_command, shm_buffers, single_rank_env
from tests.job_support import run_process_group
from vqpt.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]

# A small model so a few dozen steps take seconds on 2 cores; everything else is the shipped config.
SMALL = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "objective.decoder_dim=64",
         "objective.decoder_heads=2", "objective.decoder_depth=1", "data.batch_size=16", "run.log_every=1",
         "run.progress=false", "optim.lr=2e-3", "optim.warmup_steps=3", "run.trace_samples=true"]


def launch(data: Path, out: Path, *overrides: str, resume: bool = False, ranks: int = 2,
           config: str = "mtm_vit_tiny.yaml", small: bool = True, module: str = "pretrain.train",
           args: tuple[str, ...] = (), pythonpath: tuple[str, ...] = ()) -> list[dict]:
    """Run the trainer under the deepspeed launcher; returns log.jsonl records. Cleans /dev/shm on any outcome.
    ``pythonpath``: directories the ranks import from besides the repository (a plug-in package)."""
    port = free_port()
    cmd = deepspeed_command(module, [*args, "--config", str(ROOT / "configs" / config), "--data", str(data),
                                     "--out", str(out), *(SMALL if small else ()), *overrides], ranks, port, cpu=True)
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), *pythonpath])}
    try:
        proc = run_process_group(cmd, timeout=600, cwd=ROOT, env=env)
        leftovers = shm_buffers(port)
    finally:
        for f in shm_buffers(port):
            f.unlink(missing_ok=True)
    assert proc.returncode == 0, f"trainer failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert not leftovers, f"the trainer left /dev/shm buffers behind: {leftovers}"
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _traces(out: Path, rank: int) -> list[tuple[int, list[int]]]:
    lines = (out / f"samples_rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["index"]) for r in map(json.loads, lines)]


def _backbone(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)["model"]


def test_two_rank_mtm_loss_falls_and_checkpoints(token_data, tmp_path):
    out = tmp_path / "run"
    records = launch(token_data, out, "run.steps=100", "run.save_every=50", "optim.lr=3e-3")
    assert [r["step"] for r in records] == list(range(1, 101))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.15, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["samples_per_s"] > 0 for r in records)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step0000100"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step0000050", "step0000100"]
    assert {p.name for p in (ckpts / "step0000100").glob("stream_rank*.json")} == {"stream_rank0.json",
                                                                                    "stream_rank1.json"}
    assert (out / "backbone.pt").is_file() and any((out / "tb").iterdir())
    # The two ranks read disjoint samples at every step.
    for (s0, i0), (s1, i1) in zip(_traces(out, 0), _traces(out, 1)):
        assert s0 == s1 and not set(i0) & set(i1)


def test_zero_stage_1_and_bf16_train(token_data, tmp_path):
    records = launch(token_data, tmp_path / "z1", "run.steps=6", "engine.zero_stage=1", "engine.precision=bf16")
    assert len(records) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (tmp_path / "z1" / "checkpoints" / "step0000006").is_dir()


def test_bad_override_is_a_clear_error(token_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs/mtm_vit_tiny.yaml"),
                           "--data", str(token_data), "--out", str(tmp_path / "x"), "optim.learning_rate=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "learning_rate" in proc.stderr and "valid keys" in proc.stderr and "Traceback" not in proc.stderr


def test_one_rank_runs_without_the_launcher_but_with_its_variables():
    """run_deepspeed at 1 rank runs the module itself (the learning bench's arms end-to-end in
    test_learning_bench.py); it gets what deepspeed.launcher.launch would set, the first visible GPU included."""
    gpu = single_rank_env(29511, "3,1", cpu=False)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "3" and gpu["MASTER_PORT"] == "29511"
    assert (gpu["RANK"], gpu["LOCAL_RANK"], gpu["WORLD_SIZE"], gpu["LOCAL_SIZE"]) == ("0", "0", "1", "1")
    assert single_rank_env(29511, None, cpu=False)["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in single_rank_env(29511, "3", cpu=True)
