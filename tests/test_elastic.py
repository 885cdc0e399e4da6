"""Elastic resume with the real trainer: a checkpoint written at 2 ranks resumes at 1 and one written at 1
resumes at 2 (ZeRO 0 and 2), with ``optim.grad_accum`` keeping the global batch; every later step has the
same micro-batches (sample positions, slot by slot) and the same loss as the straight run.

One straight 2-rank run per ZeRO stage is shared by every case of that stage. Data: generated token
shards (8 x 8 grid, K = 64), a 2-block ViT, 6 steps of 2 micro-batches of 8 samples. Every run fixes
``data.canonical_readers=2`` (the largest ranks x workers used), so a run that starts at 1 rank cuts the
order as the 2-rank run does (at 1 rank, its worker reads both readers in turn).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.launch import deepspeed_command, shm_buffers
from tests.conftest import make_samples, write_dataset
from vqpt.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS, HALF = 6, 3
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2", "model.token_dim=16",
        "objective.decoder_dim=32", "objective.decoder_heads=2", "objective.decoder_depth=1", "data.batch_size=8",
        "data.partitions=8", "data.canonical_readers=2", "data.shuffle_window=32", "run.log_every=1",
        "run.progress=false", "optim.lr=2e-3", "optim.warmup_steps=2", "run.trace_samples=true", f"run.steps={STEPS}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic_data")
    write_dataset(str(root), make_samples(120), shard_size=20, block_size=8)  # < 1 epoch in 6 steps of 16
    return root


def train(data: Path, out: Path, ranks: int, *overrides: str, resume: str | None = None) -> subprocess.CompletedProcess:
    """The trainer on ``ranks`` CPU ranks (2: the deepspeed launcher; 1: one process with the launcher's
    variables); checks that no /dev/shm buffer is left behind."""
    port = free_port()
    args = ["--config", str(ROOT / "configs/mtm_vit_tiny.yaml"), "--data", str(data), "--out", str(out), *TINY,
            *overrides, *(["--resume", resume] if resume is not None else [])]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
        env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}
    else:
        cmd = deepspeed_command("pretrain.train", args, ranks, port, cpu=True)
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=1200)
        leftovers = shm_buffers(port)
    finally:
        if child.poll() is None:  # timed out or interrupted: the launcher and its ranks, all of them
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        for f in shm_buffers(port):
            f.unlink(missing_ok=True)
    assert not leftovers, f"the trainer left /dev/shm buffers behind: {leftovers}"
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def run(*args, **kwargs) -> None:
    proc = train(*args, **kwargs)
    assert proc.returncode == 0, f"trainer failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def losses(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr) from log.jsonl (a resumed run appends to its own)."""
    return {r["step"]: (r["loss"], r["lr"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def micro_batches(out: Path, world: int) -> dict[int, dict[int, tuple]]:
    """step -> {slot in the global step (rank + world x micro): (epoch, sorted sample positions)}."""
    steps: dict[int, dict[int, tuple]] = {}
    for rank in range(world):
        for r in map(json.loads, (out / f"samples_rank{rank}.jsonl").read_text().splitlines()):
            steps.setdefault(r["step"], {})[rank + world * r["micro"]] = (r["epoch"], tuple(sorted(r["index"])))
    return steps


def backbone(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_steps(got: Path, got_world: int, ref: Path, steps: range) -> None:
    want_mb, got_mb = micro_batches(ref, 2), micro_batches(got, got_world)
    want_loss, got_loss = losses(ref), losses(got)
    for step in steps:
        assert got_mb[step] == want_mb[step], f"step {step}: other micro-batches than the straight run"
        (a, lr_a), (b, lr_b) = got_loss[step], want_loss[step]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: loss {a} vs straight {b}"
        assert lr_a == pytest.approx(lr_b, rel=1e-9)


def assert_same_weights(got: Path, ref: Path) -> None:
    a, b = backbone(got), backbone(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_at_another_world_size_continues_the_straight_run(data, tmp_path, stage):
    zero = f"engine.zero_stage={stage}"
    straight = tmp_path / "straight2"
    run(data, straight, 2, zero, f"run.save_every={HALF}")  # 2 ranks x accum 1: M = 2 micro-batches per step
    # 1 rank x accum 2 takes the same micro-batches in the same slots: the first half, then 1 -> 2 ranks
    grown = tmp_path / "one_then_two"
    run(data, grown, 1, zero, "optim.grad_accum=2", f"run.stop_at={HALF}")
    assert_same_steps(grown, 1, straight, range(1, HALF + 1))
    run(data, grown, 2, zero, resume="")
    assert_same_steps(grown, 2, straight, range(HALF + 1, STEPS + 1))
    assert_same_weights(grown, straight)
    # 2 -> 1 rank from the straight run's checkpoint at step HALF
    shrunk = tmp_path / "two_then_one"
    run(data, shrunk, 1, zero, "optim.grad_accum=2", resume=str(straight / "checkpoints" / f"step{HALF:07d}"))
    assert_same_steps(shrunk, 1, straight, range(HALF + 1, STEPS + 1))
    assert_same_weights(shrunk, straight)
    if stage == 0:  # a global batch that would change is refused in one line saying what works
        proc = train(data, tmp_path / "refused", 1, zero, resume=str(straight / "checkpoints"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "2 ranks x 8 samples x accum 1" in error[0], proc.stderr[-2000:]
        assert error[0].endswith("at 1 ranks set optim.grad_accum=2"), error[0]
    else:  # the same world size resumes the same ranks' batches (elastic ZeRO state at an unchanged size)
        same = tmp_path / "two_again"
        run(data, same, 2, zero, resume=str(straight / "checkpoints" / f"step{HALF:07d}"))
        for rank in (0, 1):
            ref = (straight / f"samples_rank{rank}.jsonl").read_text().splitlines()[HALF:]
            assert (same / f"samples_rank{rank}.jsonl").read_text().splitlines() == ref
        assert_same_steps(same, 2, straight, range(HALF + 1, STEPS + 1))
        assert_same_weights(same, straight)
