"""The tokenisation job: image dataset -> VQ token shards + manifest, on one machine or a Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipeline.tokenise --dataset imagenet --src /data/imagenet --out s3://bucket/in1k-tok

The same command runs without a cluster (a local ``ray.init``) and as ``vqpt tokenise``.

Stages (Ray): list and sort the source (``pipeline.readers``) -> plan the shards (``pipeline.plan``) ->
decode/resize in CPU tasks (``pipeline.prepare``) -> tokenise in an actor pool (one actor per GPU
with ``num_gpus=1`` where GPUs exist, CPU actors otherwise) -> write shard i with
``storage.shard.ShardWriter`` -> after every shard, the manifest, ``rejects.jsonl`` and
``report.json``.

Output (``--out`` is the dataset root)::

    <out>/tokenizer.pt                 the tokenizer used (reused by later runs and splits)
    <out>/<split>/shard-000000.tar ... each written atomically
    <out>/<split>/_progress/*.json     one record per finished shard (what a re-run skips)
    <out>/<split>/_writer.lock         while a job runs: its lease (one writer per split)
    <out>/<split>/manifest.parquet     written last
    <out>/<split>/rejects.jsonl        every file not used, with the reason
    <out>/<split>/report.json          counts, bytes/image, wall time

Determinism and resume: shard i always holds the same images, and the same images give the same
bytes, so a killed job re-run with the same arguments skips the shards it finished (their
progress record and sha256 match) and ends with exactly the shard set of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from pipeline.plan import DEFAULT_RUN_LENGTH, MIN_RUNS_PER_SHARD, Plan, class_mixing
from pipeline.plan import plan as make_plan
from pipeline.prepare import PrepareConfig, prepare_chunk
from pipeline.readers import Listing, Reject, SourceItem, list_ade20k, list_folder, list_imagenet
from pipeline.shardwork import (  # noqa: F401  (re-exported: the job's per-shard work)
    MAX_PROGRESS_BYTES,
    chunk_samples,
    digest_keys,
    encode_chunk,
    finished_record,
    progress_url,
    shard_digest,
    write_shard,
)
from pipeline.sources import FORMATS, detect_format, list_source_url
from pipeline.splitlock import SplitBusy, SplitLock
from pipeline.tokenizer import KMeansTokenizer, Tokenizer, load_tokenizer
from storage import io as sio
from storage.cli import UserError, run_cli
from storage.codec import DEFAULT_CODEC, TokenCodec, codec_names, fit_codec
from storage.manifest import DatasetMeta, write_manifest
from storage.shard import ShardInfo

log = logging.getLogger("vqpt.tokenise")
DEFAULT_SPLITS = {"imagenet": "train", "ade20k": "training", "folder": "train"}


@dataclass(frozen=True)
class JobConfig:
    """Everything that decides the output bytes (plus how to run)."""

    dataset: str
    src: str
    out: str
    split: str
    tokenizer: str | None = None
    vocab: int = 512
    fit_images: int = 1000
    resolution: int = 256
    labelmap_resolution: int = 256
    shard_size: int = 4096
    run_length: int | None = None  # None: pipeline.plan.auto_run_length
    block_size: int = 256
    chunk_size: int = 128
    batch_size: int = 64
    codec: str = DEFAULT_CODEC
    views: int = 0
    seed: int = 0
    max_pixels: int = 64 * 1024 * 1024
    num_cpus: int | None = None
    actors: int | None = None
    address: str | None = None
    max_inflight: int = 4
    format: str | None = None
    columns: str = ""

    @property
    def split_dir(self) -> str:
        return sio.join(self.out, self.split)

    def column_map(self) -> dict[str, str]:
        """``--columns image=...,label=...`` as a dict."""
        pairs = [p.split("=", 1) for p in self.columns.split(",") if p.strip()]
        if any(len(p) != 2 or p[0] not in ("image", "label", "annotation") for p in pairs):
            raise UserError(f"--columns takes image=COL,label=COL,annotation=COL, got {self.columns!r}")
        return {k.strip(): v.strip() for k, v in pairs}

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(self.resolution, self.labelmap_resolution, self.views, self.seed, self.max_pixels)


def list_source(cfg: JobConfig) -> Listing:
    """The source's listing: a local folder through ``pipeline.readers``; a URL or an archive (any
    ``--format``) through ``pipeline.sources``, whose index is stored beside the output."""
    local = sio.protocol_of(cfg.src) == "file"
    fmt = cfg.format or detect_format(cfg.src)
    if fmt != "folder" or not local:
        listing, how = list_source_url(cfg.src, fmt, cfg.dataset, cfg.split, cfg.split_dir, cfg.column_map())
        print(f"source: {how['format']}, {how['members']} members indexed"
              f"{' (index reused)' if how['reused'] else ''}", file=sys.stderr)
        return listing
    if cfg.dataset == "imagenet":
        return list_imagenet(cfg.src, cfg.split)
    if cfg.dataset == "ade20k":
        return list_ade20k(cfg.src, cfg.split)
    if cfg.dataset == "folder":
        return list_folder(os.path.join(cfg.src, cfg.split) if os.path.isdir(os.path.join(cfg.src, cfg.split))
                           else cfg.src)
    raise ValueError(f"--dataset must be imagenet, ade20k or folder, got {cfg.dataset!r}")


def fit_sample(items: Sequence[SourceItem], n: int, seed: int) -> list[SourceItem]:
    """A deterministic sample of ``n`` items (all when fewer), in listing order."""
    if len(items) <= n:
        return list(items)
    picked = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in picked]


def get_tokenizer(cfg: JobConfig, items: Sequence[SourceItem]) -> tuple[Tokenizer, bytes, str]:
    """(tokenizer, its checkpoint bytes, how it was obtained): --tokenizer, else the dataset's own
    ``tokenizer.pt`` from an earlier run, else a k-means tokenizer fitted on a sample of ``items``.

    ``<out>/tokenizer.pt`` is created once, atomically: when two jobs (say two splits) fit one at
    the same time, the first to create it wins and the other uses the winner's."""
    saved = sio.join(cfg.out, "tokenizer.pt")
    if cfg.tokenizer:
        data = sio.read_bytes(cfg.tokenizer)
        how = f"loaded from {cfg.tokenizer}"
    elif sio.exists(saved):
        data = sio.read_bytes(saved)
        how = f"reused from {saved} (an earlier run of this dataset)"
    else:
        sample = fit_sample(items, cfg.fit_images, cfg.seed)
        pixels = prepare_chunk(sample, replace(cfg.prepare_config(), views=0)).pixels
        tokenizer = KMeansTokenizer.fit(pixels, vocab_size=cfg.vocab, patch=8, iters=20, seed=cfg.seed)
        data = tokenizer.to_bytes()
        how = f"k-means (K={cfg.vocab}, 8x8 patches) fitted on {len(pixels)} images of the source"
    tokenizer = load_tokenizer(data)
    if tokenizer.resolution != cfg.resolution:
        raise ValueError(f"the tokenizer takes {tokenizer.resolution} px images but --resolution is {cfg.resolution}")
    if not sio.create_exclusive(saved, data):  # there already (an earlier run, or a job running beside this one)
        kept_data = sio.read_bytes(saved)
        kept = load_tokenizer(kept_data)
        if kept.fingerprint != tokenizer.fingerprint:
            if cfg.tokenizer:
                raise ValueError(f"{saved} holds another tokenizer ({kept.fingerprint[:12]}...) than --tokenizer "
                                 f"({tokenizer.fingerprint[:12]}...): one dataset root, one tokenizer; use another "
                                 "--out")
            tokenizer, data, how = kept, kept_data, f"reused from {saved} (created meanwhile by another job)"
    return tokenizer, data, how


def build_codec(cfg: JobConfig, tokenizer: Tokenizer, items: Sequence[SourceItem]) -> TokenCodec:
    """The token codec; models (rans) are fitted on the tokens of the tokenizer's fit sample."""
    sample = None
    if cfg.codec == "rans":
        chunk = prepare_chunk(fit_sample(items, min(cfg.fit_images, 256), cfg.seed), replace(cfg.prepare_config(),
                                                                                           views=0))
        sample = encode_chunk(tokenizer, chunk, cfg.batch_size)[0].reshape(-1)
    return fit_codec(cfg.codec, sample, tokenizer.vocab_size, grid=tokenizer.grid)


def dataset_meta(cfg: JobConfig, listing: Listing, tokenizer: Tokenizer, codec: TokenCodec, how: str) -> DatasetMeta:
    labelmap = None
    if cfg.dataset == "ade20k":
        labelmap = {"method": "zstd", "resolution": cfg.labelmap_resolution, "classes": 150,
                    "ignore": 0, "names": listing.class_names}
    return DatasetMeta(
        split=cfg.split, codec=codec.spec, tokenizer_fingerprint=tokenizer.fingerprint,
        grid=tuple(tokenizer.grid), vocab_size=tokenizer.vocab_size, resolution=cfg.resolution,
        class_names=tuple(listing.class_names) if cfg.dataset != "ade20k" else (), labelmap=labelmap,
        extra={"dataset": cfg.dataset, "views": cfg.views, "seed": cfg.seed, "tokenizer": how},
    )


def finish(cfg: JobConfig, listing: Listing, meta: DatasetMeta, records: list[dict], started: float,
           how: str, mixing: dict | None = None, run_length: int | None = None) -> dict:
    """Manifest (last), rejects.jsonl and report.json from the shards' records; ``run_length``: the plan's."""
    records = sorted(records, key=lambda r: r["index"])
    infos = [ShardInfo(**r["info"]) for r in records if r["info"] is not None]
    rejects = sorted([asdict(r) for r in listing.rejects] + [x for r in records for x in r["rejects"]],
                     key=lambda r: r["path"])
    sio.write_bytes_atomic(sio.join(cfg.split_dir, "rejects.jsonl"),
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())
    url = write_manifest(cfg.split_dir, meta, infos)
    written = sum(i.samples for i in infos)
    per_node: dict[str, int] = {}
    for r in records:
        for node, n in r.get("nodes", {}).items():
            per_node[node] = per_node.get(node, 0) + n
    report = {
        "images_in": len(listing.items) + len(listing.rejects),
        "written": written,
        "rejected": len(rejects),
        "shards": len(infos),
        "bytes": sum(i.bytes for i in infos),
        "bytes_per_image": sum(i.bytes for i in infos) / max(1, written),
        "wall_s": time.perf_counter() - started,
        "tokenise_s": max((r.get("tokenise_s", 0.0) for r in records), default=0.0),
        "manifest": url,
        "tokenizer": how,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "codec": meta.codec.name,
        "nodes": dict(sorted(per_node.items())),  # images this run tokenised per Ray node id (resumed shards: none)
        "run_length": cfg.run_length if run_length is None else run_length,
        "class_mixing": mixing or {},  # classes per shard (pipeline.plan.class_mixing)
    }
    sio.write_bytes_atomic(sio.join(cfg.split_dir, "report.json"), (json.dumps(report, indent=2) + "\n").encode())
    return report


def plan(cfg: JobConfig, items: Sequence[SourceItem]) -> Plan:
    """The job's shards (``pipeline.plan``): runs of ``cfg.run_length`` members adjacent in the source,
    dealt out to shards of ``cfg.shard_size`` in an order drawn from ``cfg.seed``."""
    return make_plan(items, cfg.shard_size, cfg.seed, cfg.run_length)


def run(cfg: JobConfig) -> dict:
    """Run the whole job (Ray); returns the report. See ``pipeline.tokenise_ray`` for the Ray part."""
    from pipeline.tokenise_ray import run_shards

    started = time.perf_counter()
    listing = list_source(cfg)
    if not listing.items:
        raise UserError(no_images_message(cfg, listing))
    if cfg.tokenizer and not sio.exists(cfg.tokenizer):
        raise UserError(f"--tokenizer {cfg.tokenizer} does not exist; pass a tokenizer checkpoint (an earlier "
                        f"job's <out>/tokenizer.pt), or leave --tokenizer out to fit a k-means one")
    with SplitLock(cfg.split_dir) as lock:  # one writer per split: a second job refuses, naming this one
        tokenizer, ckpt, how = get_tokenizer(cfg, listing.items)
        log.info("tokenizer: %s (fingerprint %s...)", how, tokenizer.fingerprint[:12])
        print(f"tokenizer: {how}; fingerprint {tokenizer.fingerprint[:16]}...", file=sys.stderr)
        codec = build_codec(cfg, tokenizer, listing.items)
        meta = dataset_meta(cfg, listing, tokenizer, codec, how)
        shards = plan(cfg, listing.items)
        records = run_shards(cfg, shards, ckpt, codec, tokenizer.fingerprint)
        lock.check()
        return finish(cfg, listing, meta, records, started, how, class_mixing(shards), shards.run_length)


def no_images_message(cfg: JobConfig, listing: Listing) -> str:
    """Why nothing can be tokenised (the first reject's reason), after writing every reason to ``rejects.jsonl``."""
    url = sio.join(cfg.split_dir, "rejects.jsonl")
    rejects = sorted((asdict(r) for r in listing.rejects), key=lambda r: r["path"])
    sio.write_bytes_atomic(url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode())
    first = f", e.g. {rejects[0]['path']}: {rejects[0]['reason']}" if rejects else ""
    return (f"no usable images under {cfg.src} ({cfg.dataset}, split {cfg.split}): {len(rejects)} files "
            f"rejected{first}; every reason is in {url}")


def parse_args(argv: Sequence[str] | None = None) -> JobConfig:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tokenise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=("imagenet", "ade20k", "folder"))
    ap.add_argument("--src", required=True, help="dataset root (ImageNet root, ADEChallengeData2016, or a folder), "
                    "an archive or shard pattern; a path or any fsspec URL (file://, s3://, gs://, http(s)://)")
    ap.add_argument("--format", choices=FORMATS, help="how --src holds the images (default: detected); see "
                    "docs/sources.md")
    ap.add_argument("--columns", default="", help="parquet columns: image=image.bytes,label=label "
                    "(ADE20K: annotation=annotation.bytes)")
    ap.add_argument("--out", required=True, help="output dataset root: a path, file:// or s3:// URL")
    ap.add_argument("--split", help="imagenet: train|val; ade20k: training|validation; folder: subfolder (optional)")
    ap.add_argument("--tokenizer", help="tokenizer checkpoint (default: <out>/tokenizer.pt, else fit k-means)")
    ap.add_argument("--vocab", type=int, default=512, help="K of the k-means tokenizer fitted when none is given")
    ap.add_argument("--fit-images", type=int, default=1000, help="images the k-means tokenizer is fitted on")
    ap.add_argument("--resolution", type=int, default=256, help="tokenizer input side in px")
    ap.add_argument("--labelmap-resolution", type=int, default=256, help="side of stored ADE20K label maps (px)")
    ap.add_argument("--shard-size", type=int, default=4096, help="images per shard")
    ap.add_argument("--run-length", type=int,
                    help="images adjacent in the source that stay together in a shard (one ranged read per run; "
                    "1: permute the whole listing, the plan before runs). Default: 1 for a folder, "
                    f"{DEFAULT_RUN_LENGTH} for archives, tar shards and parquet, capped so a shard holds at least "
                    f"{MIN_RUNS_PER_SHARD} runs; see pipeline/plan.py")
    ap.add_argument("--block-size", type=int, default=256, help="images per block inside a shard")
    ap.add_argument("--chunk-size", type=int, default=128, help="images per decode task")
    ap.add_argument("--batch-size", type=int, default=64, help="images per tokenizer forward pass")
    ap.add_argument("--codec", default=DEFAULT_CODEC, choices=codec_names(), help="token codec")
    ap.add_argument("--views", type=int, default=0, help="extra random crops per image to tokenise and store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024, help="reject larger images (bombs)")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    ap.add_argument("--actors", type=int, help="tokenizer actors (default: one per GPU, else one per CPU)")
    ap.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else start a local instance)")
    ap.add_argument("--max-inflight", type=int, default=4, help="shards in flight at once (bounds memory)")
    a = ap.parse_args(argv)
    if a.run_length is not None and a.run_length < 1:
        ap.error(f"--run-length must be >= 1, got {a.run_length}")
    return JobConfig(
        dataset=a.dataset, src=a.src, out=a.out.rstrip("/"), split=a.split or DEFAULT_SPLITS[a.dataset],
        tokenizer=a.tokenizer, vocab=a.vocab, fit_images=a.fit_images, resolution=a.resolution,
        labelmap_resolution=a.labelmap_resolution, shard_size=a.shard_size, run_length=a.run_length,
        block_size=a.block_size,
        chunk_size=a.chunk_size, batch_size=a.batch_size, codec=a.codec, views=a.views, seed=a.seed,
        max_pixels=a.max_pixels, num_cpus=a.num_cpus, actors=a.actors, address=a.address,
        max_inflight=a.max_inflight, format=a.format, columns=a.columns,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The job as a command; a mistake is one ``error:`` line and exit code 1 (``storage.cli.run_cli``)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        report = run(parse_args(argv))
    except SplitBusy as err:
        raise UserError(str(err)) from None
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["JobConfig", "Reject", "main", "run"]
