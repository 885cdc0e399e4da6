"""The trainer's plumbing: process group, checkpoints with stream state, logging, clean exit.

Kept apart from ``pretrain.train`` so the training loop reads top to bottom.

Checkpoint layout (``<out>/checkpoints``)::

    latest                          DeepSpeed's pointer to the newest tag
    stepNNNNNNN/                    DeepSpeed's files (model, optimizer, scheduler; client state:
                                    step, vit_config, objective, config)
    stepNNNNNNN/stream_rank<R>.json that rank's ``StreamLoader.state_dict()``
    stepNNNNNNN/tokens.json         the token identity of the data (``pretrain.provenance``)

Exit: ``install_exit_cleanup`` makes a launched rank remove its launch's /dev/shm all-reduce
buffers on every exit path (normal, exception, SIGTERM from the launcher when a peer failed,
SIGINT), and ``exit_launched`` ends a launched rank without the gloo teardown abort (DESIGN.md).

Checkpoints are read back with ``torch.load(weights_only=True)`` (``use_safe_checkpoint_loading``):
DeepSpeed's default engine unpickles arbitrary objects, which a checkpoint from elsewhere must
never be allowed to do.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.augment import TokenAugConfig, TokenAugment
from pretrain.objectives import DataSpec, make_config
from pretrain.provenance import checkpoint_tag_dir, write_identity
from storage import io as sio
from storage.net import free_port

__all__ = ["init_distributed", "set_threads", "build_augment", "use_safe_checkpoint_loading", "save_checkpoint",
           "load_checkpoint", "RunLog", "Window", "mean_over_ranks", "shutdown", "remove_shm_buffers",
           "install_exit_cleanup", "exit_launched"]


# -- processes ------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    """Join (or, without a launcher, create a one-process) process group; returns (rank, world_size)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a group of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if not dist.is_initialized():
        deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()


def set_threads() -> None:
    """On CPU, split the cores between the ranks of this node (the launcher's OMP_NUM_THREADS if set)."""
    if torch.cuda.is_available():
        return
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


def _shm_buffer() -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank (and never deletes)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('LOCAL_RANK', '0')}")
    return Path("/dev/shm") / name


def remove_shm_buffers() -> None:
    """Delete every local rank's /dev/shm all-reduce buffer of this launch (its master address and port).

    Safe at any time after the run's last collective: a mapped buffer stays valid for a rank that
    still has it open. Called on every exit path, so a failed run leaves nothing behind either."""
    if "MASTER_PORT" not in os.environ:
        return
    prefix = _shm_buffer().name.rsplit("_", 1)[0] + "_"
    for path in Path("/dev/shm").glob(prefix + "*"):
        path.unlink(missing_ok=True)


def _on_signal(signum, frame) -> None:
    remove_shm_buffers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def install_exit_cleanup() -> None:
    """In a launched rank: remove the launch's /dev/shm buffers at exit, on SIGTERM and on SIGINT."""
    atexit.register(remove_shm_buffers)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def exit_launched(rc: int) -> None:
    """End a launched rank with ``rc``: buffers removed, output flushed, no interpreter teardown."""
    remove_shm_buffers()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    os._exit(rc)


def shutdown() -> None:
    """Barrier, delete this rank's /dev/shm all-reduce buffer, destroy the group, let gloo settle."""
    if dist.is_initialized():
        dist.barrier()
        _shm_buffer().unlink(missing_ok=True)
        dist.destroy_process_group()
    gc.collect()
    time.sleep(0.2)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average 0-dim tensors over ranks (one all-reduce); returns floats."""
    keys = sorted(values)
    t = torch.stack([values[k].float().cpu() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


# -- data-side ------------------------------------------------------------------------------------

def build_augment(cfg, manifest, spec: DataSpec) -> TokenAugment | None:
    """TokenAugment from the ``augment`` section (None: off). Loads the tokenizer's codebook only if an op needs it."""
    if cfg.augment is None:
        return None
    options = dict(cfg.augment)
    if options.get("cutmix_alpha", 0) > 0 or options.get("mixup_alpha", 0) > 0:
        options.setdefault("num_classes", spec.num_classes)  # soft targets over the manifest's classes
    aug = make_config(TokenAugConfig, options, "section 'augment'")
    if aug.needs_embeddings or aug.replace_p > 0:
        from pipeline.tokenizer import load_tokenizer

        url = cfg.data.tokenizer or sio.join(sio.dirname(manifest.root), "tokenizer.pt")
        if not sio.exists(url):
            raise FileNotFoundError(f"augmentation needs the tokenizer's codebook, but {url} does not exist "
                                    f"(set data.tokenizer)")
        tokenizer = load_tokenizer(sio.read_bytes(url))
        if tokenizer.fingerprint != manifest.meta.tokenizer_fingerprint:
            raise ValueError(f"tokenizer {url} did not make the tokens of {manifest.url} (fingerprint differs)")
        codebook, synonyms = tokenizer.codebook, getattr(tokenizer, "synonyms", None)  # SeiT's own lists
    else:
        codebook, synonyms = torch.zeros(spec.vocab_size, 1), None
    return TokenAugment(aug, codebook, synonyms)


# -- checkpoints ----------------------------------------------------------------------------------

def use_safe_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read files with weights_only=True instead of unpickling."""
    from pretrain.export import safe_load

    engine.checkpoint_engine.load = safe_load


def _tag(step: int) -> str:
    return f"step{step:07d}"


def save_checkpoint(engine, loader, ckpt_dir: Path, step: int, rank: int, keep: int, client: dict) -> Path:
    """DeepSpeed checkpoint ``ckpt_dir/stepNNNNNNN`` plus every rank's stream state; keeps the newest ``keep``."""
    tag = _tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **client})
    (ckpt_dir / tag / f"stream_rank{rank}.json").write_text(json.dumps(loader.state_dict()))
    if rank == 0:
        write_identity(ckpt_dir / tag, client.get("tokens"))
    dist.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def load_checkpoint(engine, loader, where: str, rank: int) -> int:
    """Restore engine and stream from ``where`` (checkpoints dir with ``latest``, or a tag dir); returns the step."""
    path = Path(where)
    if (path / "latest").is_file():
        ckpt_dir, tag = path, checkpoint_tag_dir(path).name
    elif path.is_dir() and path.name.startswith("step"):
        ckpt_dir, tag = path.parent, path.name
    else:
        raise FileNotFoundError(f"no checkpoint to resume from at {path} (expected a 'latest' file or a "
                                f"stepNNNNNNN directory)")
    stream_file = ckpt_dir / tag / f"stream_rank{rank}.json"
    if not stream_file.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no stream state for rank {rank} "
                                f"({stream_file.name}); was it written with another world size?")
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    loader.load_state_dict(json.loads(stream_file.read_text()))
    return int(client["step"])


# -- logging --------------------------------------------------------------------------------------

class Window:
    """Throughput over the steps since the last log record."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = 0
        self.steps = 0
        self.wait_s = 0.0
        self._wait0 = 0.0

    def rates(self, world: int) -> dict[str, float]:
        """samples_per_s (all ranks), steps_per_s, data_wait_fraction (this rank's); then restarts the window."""
        now = time.perf_counter()
        span = max(now - self.start, 1e-9)
        out = {"samples_per_s": self.samples * world / span, "steps_per_s": self.steps / span,
               "data_wait_fraction": (self.wait_s - self._wait0) / span}
        self.start, self.samples, self.steps, self._wait0 = now, 0, 0, self.wait_s
        return out


class RunLog:
    """Rank 0's log: JSONL records, TensorBoard scalars and a tqdm bar. Other ranks log nothing."""

    def __init__(self, out: Path, rank: int, total: int, start: int, enabled: bool = True, header: str = ""):
        self.rank = rank
        self.t0 = time.perf_counter()
        self.bar = None
        self.tb = None
        self.jsonl = None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "log.jsonl", "a")  # noqa: SIM115 (closed in close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is a dependency, but a log must never stop a run
            print("tensorboard is not installed: logging to log.jsonl only", file=sys.stderr)
        if header:
            print(header, flush=True)
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 wait=f"{record['data_wait_fraction']:.1%}")
        else:
            print(json.dumps(record), flush=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
