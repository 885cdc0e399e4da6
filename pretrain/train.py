"""The pre-training entry point: stream token shards into a DeepSpeed engine that trains an objective.

    deepspeed --module pretrain.train --config configs/mtm_vit_tiny.yaml --data DATA [section.key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --module pretrain.train --config ...   # 2 CPU ranks
    deepspeed --hostfile hostfile --module pretrain.train --config configs/mtm_vit_b.yaml ...  # multi-node
    python -m pretrain.train --config ...            # one process, no launcher

One step: each rank takes its next batch from ``storage.stream`` (rank-aware by construction, so
no sampler; token augmentation, ``pretrain.augment``, already ran in its DataLoader workers), the
objective returns
``loss, metrics`` and DeepSpeed does backward, gradient all-reduce (or ZeRO), clipping and the
optimizer step (``pretrain.optim``).

Determinism and resume: before every micro-step torch's generator is reseeded from
(seed, the micro-batch's slot in the global step, step), and the augmentation's generator is keyed by the batch itself
(``BatchSeededAugment``: seed, epoch, sample positions), so masks, dropout and augmentation
depend on the step and the data, not on history or on which worker made the batch. A checkpoint
(``<out>/checkpoints/stepNNNNNNN``) holds DeepSpeed's model, optimizer and scheduler state plus
each rank's stream position (``stream_rank<R>.json``); ``--resume`` continues with the same
samples, the same randomness and hence the same losses as a run that never stopped, also at another
world size with ``optim.grad_accum`` keeping the global batch (``pretrain.elastic``).

Outputs in ``run.out``: ``log.jsonl`` (one record per ``log_every`` steps: loss, lr, samples/s,
data-wait fraction, the objective's metrics), ``tb/`` (TensorBoard), ``checkpoints/``,
``backbone.pt`` (the encoder alone, ``pretrain.export`` format), ``config.yaml`` (as resolved).
Checkpoints and ``backbone.pt`` record the data's token identity (``pretrain.provenance``); ``--resume``
and a fine-tuning ``--init`` on tokens of another tokenizer are refused unless
``--allow-tokenizer-mismatch``.

Errors: a bad config is refused by ``load_config`` before DeepSpeed starts; any user mistake is one
``error:`` line (``storage.cli``); a failed or interrupted rank removes its launch's /dev/shm buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.tokenizer import load_tokenizer
from pretrain import checkpoint, runtime
from pretrain.augment import BatchSeededAugment
from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.elastic import ElasticResumeError
from pretrain.objectives import Asset, DataSpec, Objective, build_objective, objective_class
from pretrain.optim import base_lr, deepspeed_config, make_optimizer, make_scheduler
from pretrain.provenance import TokenizerMismatch, check_identity, identity_of_checkpoint, identity_of_meta
from pretrain.vit import ViTConfig
from storage import io as sio
from storage.cli import run_cli
from storage.manifest import manifest_url, read_manifest
from storage.mix import source_from_dict
from storage.stream import StreamLoader, TokenStream

__all__ = ["train", "build_model", "main", "run", "parse_args", "step_seed", "config_from_args", "launched_main",
           "check_tokens", "asset_identity"]


def step_seed(seed: int, slot: int, step: int, micro: int = 0) -> int:
    """The 63-bit seed of torch's generator (masks, dropout) for one micro-batch: ``slot`` is its place in the
    global step (rank + world size x micro-step, the same micro-batch at any world size: ``pretrain.elastic``)."""
    (a,) = np.random.SeedSequence([seed, slot, step, micro]).generate_state(1, dtype=np.uint64)
    return int(a) >> 1


def resolve_manifest(url: str) -> str:
    """A manifest URL from either the manifest itself or its split directory."""
    return url if url.endswith(".parquet") else manifest_url(url.rstrip("/"))


def build_stream(cfg: TrainConfig, rank: int, world: int) -> tuple[StreamLoader, DataSpec]:
    """The rank's StreamLoader (token augmentation in its workers) and what the objective may know about the data.

    ``data.input: pixels`` reads an image folder instead (``pretrain.pixels``); its DataSpec has
    ``grid`` = (R, R) pixels and ``vocab_size`` 1 (no codebook), for a pixel-stem model."""
    if cfg.data.input == "pixels":
        from pretrain.pixels import PixelAugment, PixelFolderStream

        pixels = PixelFolderStream(cfg.data.train, cfg.data.resolution, cfg.data.batch_size, train=True,
                                   augment=PixelAugment.from_options(cfg.augment and asdict(cfg.augment)),
                                   seed=cfg.run.seed, rank=rank, world_size=world)
        spec = DataSpec(grid=(cfg.data.resolution,) * 2, vocab_size=1, num_classes=len(pixels.class_names))
        return StreamLoader(pixels, num_workers=cfg.data.num_workers), spec
    data = ([source_from_dict(s, f"data.sources[{i}]") for i, s in enumerate(cfg.data.sources)]
            or read_manifest(resolve_manifest(cfg.data.train)))
    stream = TokenStream(data, cfg.data.batch_size, seed=cfg.run.seed, partitions=cfg.data.partitions,
                         shuffle_window=cfg.data.shuffle_window, canonical_readers=cfg.data.canonical_readers,
                         rank=rank, world_size=world,
                         prefetch_shards=cfg.data.prefetch_shards, cache_dir=cfg.data.cache_dir,
                         cache_limit=cfg.data.cache_limit)
    meta = stream.manifest.meta  # with sources: the first one's (all share tokenizer, grid and K)
    fingerprint = None if cfg.data.allow_tokenizer_mismatch else meta.tokenizer_fingerprint
    spec = DataSpec(grid=tuple(meta.grid), vocab_size=meta.vocab_size, num_classes=len(meta.class_names),
                    tokenizer_fingerprint=fingerprint)
    augment = runtime.build_augment(cfg, stream.manifest, spec)
    stream.batch_transform = None if augment is None else BatchSeededAugment(augment, cfg.run.seed)
    return StreamLoader(stream, num_workers=cfg.data.num_workers), spec


def build_model(cfg: TrainConfig, spec: DataSpec) -> tuple[Objective, ViTConfig]:
    """The objective of ``cfg.objective`` on the ViT of ``cfg.model`` (grid and K from the data), and that ViTConfig."""
    if cfg.data.input == "pixels" and cfg.model.stem != "pixel":
        raise ValueError("data.input is 'pixels': set model.stem=pixel (and model.patch_size, e.g. 16)")
    vit = replace(cfg.model, grid=spec.grid[0], vocab_size=spec.vocab_size)
    return build_objective(cfg.objective_name, cfg.objective, vit, spec), vit


class Batches:
    """Endless batches from a StreamLoader across epochs, timing how long the trainer waits for them."""

    def __init__(self, loader: StreamLoader):
        self.loader = loader
        self._it = None
        self.wait_s = 0.0

    def next(self) -> dict:
        t0 = time.perf_counter()
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
        self.wait_s += time.perf_counter() - t0
        return batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def asset_identity(asset: Asset, identity: dict) -> dict | None:
    """The token identity ``asset`` carries, completed from the data's ``identity`` where the asset has no
    say (``Asset.shares``); None when there is nothing to compare (a missing file is reported by the
    objective that loads it, a checkpoint that recorded no identity predates provenance)."""
    if asset.kind == "tokenizer":
        if not sio.exists(asset.url):
            return None
        own = {"tokenizer_fingerprint": load_tokenizer(asset.url).fingerprint}
    else:
        own = identity_of_checkpoint(asset.url) if Path(asset.url).exists() else None
        if own is None:
            return None
    return {**identity, **{k: own.get(k) for k in asset.shares}}


def check_tokens(cfg: TrainConfig, resume: str | None) -> dict | None:
    """The training data's token identity, after checking that every file the objective loads
    (``Objective.assets``: backbones, predictors, tokenizers) and the checkpoint to resume belong to tokens
    of the same tokenizer (TokenizerMismatch otherwise). Runs before any process group: a refusal costs
    seconds; the objective checks a tokenizer's fingerprint again when it loads it (``DataSpec``)."""
    if cfg.data.input != "tokens":
        return None
    identity = identity_of_meta(read_manifest(resolve_manifest(cfg.data.train)).meta)
    allow = cfg.data.allow_tokenizer_mismatch
    where = f"the training data {cfg.data.train}"
    for asset in objective_class(cfg.objective_name).assets(cfg.objective):
        check_identity(asset_identity(asset, identity), identity, f"{asset.what} {asset.url}", where, allow)
    if resume is not None:
        ckpt = Path(resume or Path(cfg.run.out) / "checkpoints")
        if (ckpt / "latest").is_file() or ckpt.name.startswith("step"):
            check_identity(identity_of_checkpoint(ckpt), identity, f"the checkpoint to resume {ckpt}", where, allow)
    return identity


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or continue) pre-training under ``cfg``; returns the rank's summary (last metrics, timings)."""
    import deepspeed

    tokens = check_tokens(cfg, resume)  # before any process group: a refusal costs seconds
    rank, world = runtime.init_distributed()
    runtime.set_threads()
    out = Path(cfg.run.out)
    loader, spec = build_stream(cfg, rank, world)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    objective, vit = build_model(cfg, spec)
    name = cfg.objective_name
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world
    lr = base_lr(cfg.optim, global_batch)
    optimizer = make_optimizer(objective, cfg.optim, lr)
    scheduler = make_scheduler(optimizer, cfg.optim, lr, cfg.run.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg.engine, cfg.optim, cfg.data.batch_size, world))
    checkpoint.use_safe_checkpoint_loading(engine)
    step = 0
    if resume is not None:
        step = checkpoint.restore_training(engine, loader, resume or str(out / "checkpoints"), rank)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    enc = objective.encoder
    header = (f"{name} | ViT {enc.cfg.embed_dim}/{enc.cfg.depth}/{enc.cfg.num_heads} {enc.cfg.num_patches} patches | "
              f"{enc.num_params():,} encoder params | "
              f"{world} rank(s) x {cfg.data.batch_size} x accum {cfg.optim.grad_accum} | lr {lr:.2e} | "
              f"ZeRO {cfg.engine.zero_stage} {cfg.engine.precision}")
    log = runtime.RunLog(out, rank, cfg.run.steps, step, enabled=cfg.run.progress, header=header)
    batches = Batches(loader)
    last_stop = cfg.run.steps if cfg.run.stop_at is None else min(cfg.run.steps, cfg.run.stop_at)
    window = runtime.Window()
    summary: dict = {"rank": rank, "start_step": step}
    trace = open(out / f"samples_rank{rank}.jsonl", "a") if cfg.run.trace_samples else None  # noqa: SIM115
    while step < last_stop:
        metrics = None
        for micro in range(cfg.optim.grad_accum):
            batch = batches.next()
            if trace is not None:
                trace.write(json.dumps({"step": step + 1, "micro": micro, "epoch": batch["epoch"],
                                        "index": batch["index"].tolist(), "key": batch.get("key")}) + "\n")
            torch.manual_seed(step_seed(cfg.run.seed, rank + world * micro, step))
            loss, m = engine(_to_device(batch, engine.device))
            engine.backward(loss)
            engine.step()
            m = {"loss": loss.detach(), **{k: v.detach() for k, v in m.items()}}
            metrics = m if metrics is None else {k: metrics[k] + m[k] for k in m}
            window.samples += len(batch["index"])
        step += 1
        window.steps += 1
        engine.module.after_step(step)
        window.wait_s = batches.wait_s
        if step % cfg.run.log_every == 0 or step == last_stop:
            values = runtime.mean_over_ranks({k: v / cfg.optim.grad_accum for k, v in metrics.items()})
            record = {"step": step, "epoch": loader.epoch, "lr": scheduler_lr(engine), **values,
                      **window.rates(world), "elapsed_s": log.elapsed()}
            log.write(record)
            summary.update(record)
        log.advance(step)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == last_stop:
            checkpoint.save_training(engine, loader, out / "checkpoints", step, rank, cfg.run.keep_checkpoints,
                                    {"vit_config": asdict(vit), "encoder_config": asdict(objective.encoder.cfg),
                                     "objective": name, "config": cfg.to_dict(),
                                     "num_classes": spec.num_classes, "tokens": tokens})
    if rank == 0 and step > 0:
        checkpoint.save_backbone(out / "backbone.pt", engine.module.encoder,
                                 {"objective": name, "step": step, "tokens": tokens})
    log.close()
    if trace is not None:
        trace.close()
    summary["end_step"] = step
    return summary


def scheduler_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="deepspeed --module pretrain.train",
        description=__doc__.split("\n\n")[0],
        epilog="Example: DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --module pretrain.train "
               "--config configs/mtm_vit_tiny.yaml --data out/imagenette_tok/train --out out/mtm run.steps=200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--data", help="training manifest URL or split directory (= data.train)")
    p.add_argument("--out", help="run directory (= run.out)")
    p.add_argument("--steps", type=int, help="optimizer steps (= run.steps)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from the latest checkpoint in <out>/checkpoints, or from CKPT "
                        "(a checkpoints directory or one stepNNNNNNN directory)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="train although --init or --resume was trained on tokens of another tokenizer")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, values in YAML syntax (e.g. optim.lr=3e-4 engine.zero_stage=2)")
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags


def main(argv: list[str] | None = None) -> int:
    return launched_main(lambda a: run(parse_args(a)), argv)


def launched_main(body, argv: list[str] | None) -> int:
    """Run ``body(argv)`` as a command: one-line errors (``storage.cli.run_cli``); in a launched rank,
    /dev/shm buffers removed on every exit path and the process ended without interpreter teardown.
    Mistakes every rank makes alike (config, tokenizer mismatch) are reported by rank 0 alone."""
    launched = "RANK" in os.environ
    if launched:
        runtime.install_exit_cleanup()
    quiet = (ConfigError, TokenizerMismatch, ElasticResumeError) if os.environ.get("RANK", "0") != "0" else ()
    try:
        rc = run_cli(body, argv, quiet=quiet)
    except SystemExit as stop:  # argparse: --help, usage errors
        if not launched:
            raise
        rc = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # a bug: its traceback, then the same clean exit
        if not launched:
            raise
        traceback.print_exc()
        rc = 1
    if launched:
        runtime.exit_launched(rc)
    return rc


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config of parsed arguments (flags become overrides). ``--resume`` directly followed by
    an override (``--resume run.steps=50``) is read as ``--resume`` plus that override."""
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides = [args.resume, *args.overrides]
        args.resume = ""
    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.train"), (args.out, "run.out"), (args.steps, "run.steps")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if args.allow_tokenizer_mismatch:
        overrides.append("data.allow_tokenizer_mismatch=true")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Train with parsed command-line arguments (``parse_args``); returns 0."""
    cfg = config_from_args(args)
    try:
        summary = train(cfg, args.resume)
        runtime.shutdown()
    finally:
        runtime.remove_shm_buffers()
    if summary.get("rank") == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
