"""Run a trainer module under the real ``deepspeed`` launcher from Python (benchmarks, quickstart, tests).

    rc = run_deepspeed("pretrain.train", ["--config", "configs/mtm_vit_tiny.yaml", "--data", d, "--out", o],
                       ranks=2, log=Path("out/mtm/launcher.log"))

On a machine without CUDA the ranks are CPU processes (``DS_ACCELERATOR=cpu``, ``--num_accelerators``);
with CUDA, one rank per GPU (``--num_gpus``). One rank runs as one process with the variables the
launcher would give it (``single_rank_env``), without the launcher's two interpreters in front. A fresh
master port per launch, and the launcher's CPU all-reduce buffers in /dev/shm
(``deepspeed_allreduce_buffer_*_<port>_*``) are removed whatever the outcome. The command is an argument
list, never a shell string. For the trainers
(``pretrain.train``, ``pretrain.finetune``) the arguments and config are checked here first
(``preflight``), so a mistake is one line in seconds instead of after the ranks' start-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from storage.net import free_port

__all__ = ["deepspeed_executable", "deepspeed_command", "single_rank_env", "shm_buffers", "run_deepspeed", "preflight",
           "ROOT"]

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_executable() -> str:
    """The ``deepspeed`` launcher beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise FileNotFoundError("the deepspeed launcher is not installed (pip install deepspeed)")
    return found


def deepspeed_command(module: str, args: Sequence[str], ranks: int, port: int, cpu: bool) -> list[str]:
    """``deepspeed --num_accelerators|--num_gpus N --master_port P --module M ARGS...`` as a list."""
    count = "--num_accelerators" if cpu else "--num_gpus"
    return [deepspeed_executable(), count, str(ranks), "--master_port", str(port), "--module", module,
            *map(str, args)]


def single_rank_env(port: int, visible: str | None, cpu: bool) -> dict[str, str]:
    """The variables ``deepspeed.launcher.launch`` gives its one process at 1 rank on 1 node: rank, world,
    master address and port, and (with CUDA) the first visible GPU."""
    out = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if not cpu:
        out["CUDA_VISIBLE_DEVICES"] = (visible or "0").split(",")[0]
    return out


def shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of the launch on ``port``."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def preflight(module: str, args: Sequence[str]) -> None:
    """Parse a trainer's arguments, validate its config (ConfigError etc.) and refuse a TokenAdapt / ColorAdapt
    trained for another tokenizer than the data's (``pretrain.runtime.check_adapters``); other modules: nothing."""
    if module == "pretrain.train":
        from pretrain.train import config_from_args, parse_args
    elif module == "pretrain.finetune":
        from pretrain.finetune import parse_args
        from pretrain.train import config_from_args
    else:
        return
    from pretrain.runtime import check_adapters

    check_adapters(config_from_args(parse_args([str(a) for a in args])))  # an adapter of another tokenizer


def run_deepspeed(module: str, args: Sequence[str], ranks: int = 2, log: Path | None = None,
                  timeout: float | None = None, cpu: bool | None = None, env: dict | None = None,
                  capture: bool = False) -> subprocess.CompletedProcess:
    """Launch ``module`` on ``ranks`` processes (the deepspeed launcher; one rank: the module itself) and
    wait. Output goes to ``log`` (a file) when given, else is captured (``capture``) or inherited. Returns
    the CompletedProcess (check ``returncode``).
    A trainer's bad arguments or config raise here, before any process starts (``preflight``)."""
    preflight(module, args)
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    port = free_port()
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if ranks == 1:  # the launcher would only set these (at the cost of two interpreters' start-up, ~5 s)
        cmd = [sys.executable, "-u", "-m", module, "--local_rank=0", *map(str, args)]
        full_env |= single_rank_env(port, full_env.get("CUDA_VISIBLE_DEVICES"), cpu)
    else:
        cmd = deepspeed_command(module, args, ranks, port, cpu)
    if cpu:
        full_env["DS_ACCELERATOR"] = "cpu"
    try:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                return subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout, check=False)
        return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=capture, text=True, timeout=timeout,
                              check=False)
    finally:
        for f in shm_buffers(port):
            f.unlink(missing_ok=True)
