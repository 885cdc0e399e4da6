"""The trainer's plumbing: process group, augmentation, logging, clean exit.

Kept apart from ``pretrain.train`` so the training loop reads top to bottom. Checkpoints (layout,
safe reading, save and restore with the stream state) are ``pretrain.checkpoint``'s.

Exit: ``install_exit_cleanup`` makes a launched rank remove its launch's /dev/shm all-reduce
buffers on every exit path (normal, exception, SIGTERM from the launcher when a peer failed,
SIGINT), and ``exit_launched`` ends a launched rank without the gloo teardown abort (DESIGN.md).
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.augment import BatchSeededAugment, TokenAugment
from pretrain.objectives import DataSpec
from storage import io as sio
from storage.net import free_port

__all__ = ["init_distributed", "set_threads", "build_augment", "check_adapters", "step_augment", "RunLog", "Window",
           "mean_over_ranks", "shutdown", "remove_shm_buffers", "install_exit_cleanup", "exit_launched"]


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
    """TokenAugment from the ``augment`` section (None: off). Mixing with ``num_classes`` 0 scores the
    manifest's classes. Loads the data's tokenizer (fingerprint checked) only if an op needs its codebook,
    and the TokenAdapt / ColorAdapt of ``augment.tokenadapt`` / ``augment.coloradapt`` (refused, one line,
    when trained for another tokenizer than the manifest's)."""
    aug = cfg.augment
    if aug is None:
        return None
    if aug.mixing and aug.num_classes == 0:
        aug = aug.replace(num_classes=spec.num_classes)  # soft targets over the manifest's classes
    adapters = _load_adapters(aug, manifest.meta.tokenizer_fingerprint)
    if aug.needs_embeddings or aug.replace_p > 0 or (aug.tokenadapt and aug.interpolation != "nearest"):
        from pipeline.tokenizer import load_tokenizer

        url = cfg.data.tokenizer or sio.join(sio.dirname(manifest.root), "tokenizer.pt")
        if not sio.exists(url):
            raise FileNotFoundError(f"augmentation needs the tokenizer's codebook, but {url} does not exist "
                                    f"(set data.tokenizer)")
        tokenizer = load_tokenizer(url, manifest.meta.tokenizer_fingerprint)
        codebook, synonyms = tokenizer.codebook, getattr(tokenizer, "synonyms", None)  # SeiT's own lists
    else:
        codebook, synonyms = torch.zeros(spec.vocab_size, 1), None
    return TokenAugment(aug, codebook, synonyms, **adapters)


def _load_adapters(aug, fingerprint: str) -> dict:
    """{"tokenadapt": model | None, "coloradapt": model | None} of the augment section, loaded through
    ``storage.io`` (weights only) for the tokenizer with ``fingerprint``."""
    from pipeline.adapters import load_coloradapt, load_tokenadapt

    return {"tokenadapt": load_tokenadapt(aug.tokenadapt, fingerprint) if aug.tokenadapt else None,
            "coloradapt": load_coloradapt(aug.coloradapt, fingerprint) if aug.coloradapt else None}


def check_adapters(cfg, fingerprint: str | None = None) -> None:
    """Refuse (ValueError, one line naming the file and both tokenizers) an ``augment.tokenadapt`` /
    ``augment.coloradapt`` checkpoint trained for another tokenizer than the training data's (``fingerprint``;
    default: read from the data's manifest). Cheap: it reads the checkpoints' configs, builds no model.
    Run before any rank starts (``pretrain.launch.preflight``) and before the process group (``train``)."""
    from pipeline.adapters.common import check_adapter_tokenizer, read_adapter
    from storage.manifest import manifest_url, read_manifest

    aug = cfg.augment
    if aug is None or cfg.data.input != "tokens" or not (aug.tokenadapt or aug.coloradapt):
        return
    if fingerprint is None:
        url = cfg.data.train or cfg.data.sources[0]["url"]
        fingerprint = read_manifest(url if url.endswith(".parquet") else manifest_url(url.rstrip("/"))) \
            .meta.tokenizer_fingerprint
    for kind, url in (("tokenadapt", aug.tokenadapt), ("coloradapt", aug.coloradapt)):
        if url:
            made_for = read_adapter(url, kind)["config"].get("tokenizer_fingerprint", "")
            check_adapter_tokenizer(url, kind, made_for, fingerprint)


def step_augment(cfg, manifest, spec: DataSpec, device) -> BatchSeededAugment | None:
    """The token augmentation the training step runs on ``device`` (``augment.in_step``, the default when an
    adapter is given), keyed by the batch like the workers' (``BatchSeededAugment``); None when the workers
    (or nothing) augment."""
    if cfg.augment is None or cfg.data.input != "tokens" or not cfg.augment.runs_in_step:
        return None
    return BatchSeededAugment(build_augment(cfg, manifest, spec).to(device), cfg.run.seed)


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
