"""The Ray half of the tokenisation job: tasks decode, an actor pool tokenises, tasks write shards.

Each shard is cut into chunks of ``chunk_size`` images. With GPUs, a chunk goes through
``prepare_task`` (a CPU task: decode, crop, resize) and then one tokenizer actor (round robin,
``num_gpus=1`` each). Without GPUs there is one CPU actor per CPU and each decodes and tokenises
its chunk in one call (``prepare_encode``): on one core, shipping the pixels through the object
store to a separate actor cost 6 % of throughput (bench/tokenise.py: 0.83 -> 0.89 of a bare loop). When
all of a shard's chunks are tokenised, ``write_task`` writes the shard and its progress record. At most
``max_inflight`` shards are in flight, which bounds the memory the job holds. Transient I/O
errors (OSError, connection errors) are retried by Ray; bad images never raise, they become rejects.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import ray
from tqdm import tqdm

from pipeline.prepare import PrepareConfig, PreparedChunk, prepare_chunk
from pipeline.readers import SourceItem
from pipeline.shardwork import encode_chunk, finished_record, shard_digest, write_shard
from storage import io as sio
from storage.codec import CodecSpec, TokenCodec, make_codec

TRANSIENT = [OSError, ConnectionError, TimeoutError]


def warm_connections(urls: tuple[str, ...]) -> None:
    """Open this process's filesystem for each remote URL with one small request (an object store's
    client and connection take a second to set up); best effort: a real failure surfaces at the read."""
    for url in urls:
        with contextlib.suppress(OSError, ValueError):
            sio.exists(url)


@ray.remote(num_cpus=1)
def warm_up(urls: tuple[str, ...] = ()) -> bool:
    """Import the decode and write stacks in a worker before the clock starts (first imports take seconds),
    and open its connections to the job's remote source and output (``warm_connections``)."""
    import pipeline.prepare  # noqa: F401
    import pipeline.shardwork  # noqa: F401  (the shard writer; imports torch)

    warm_connections(urls)
    return True


@ray.remote(num_cpus=1, max_retries=3, retry_exceptions=TRANSIENT)
def prepare_task(items: list[SourceItem], cfg: PrepareConfig) -> PreparedChunk:
    return prepare_chunk(items, cfg)


@ray.remote(max_restarts=0)  # a dead actor fails the job; a re-run resumes from the finished shards
class TokenizerActor:
    """Holds one tokenizer (on the GPU when it has one) and tokenises prepared chunks."""

    def __init__(self, checkpoint: bytes, batch_size: int):
        import torch

        from pipeline.tokenizer import load_tokenizer

        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # CPU actors share cores with the decode tasks
        self.tokenizer = load_tokenizer(checkpoint)
        if torch.cuda.is_available() and hasattr(self.tokenizer, "to"):
            self.tokenizer.to("cuda")
        self.batch_size = batch_size

    def ready(self, urls: tuple[str, ...] = ()) -> str:
        """The id of the Ray node this actor runs on (hex), once its connections to ``urls`` are open."""
        warm_connections(urls)
        return ray.get_runtime_context().get_node_id()

    def encode(self, chunk: PreparedChunk) -> tuple:
        """(the chunk without its pixels, tokens (n, h, w), view tokens (n, V, h, w))."""
        from dataclasses import replace

        import numpy as np

        tokens, views = encode_chunk(self.tokenizer, chunk, self.batch_size)
        return replace(chunk, pixels=np.empty(0, np.uint8), view_pixels=np.empty(0, np.uint8)), tokens, views

    def prepare_encode(self, items: list[SourceItem], cfg: PrepareConfig) -> tuple:
        """Decode and tokenise in one call: the CPU-only path, where shipping pixels between
        processes through the object store costs more than it buys."""
        return self.encode(prepare_chunk(items, cfg))


@ray.remote(num_cpus=1, max_retries=3, retry_exceptions=TRANSIENT)
def write_task(cfg, spec: CodecSpec, fingerprint: str, index: int, digest: str, *parts) -> dict:
    """parts: the actors' (chunk, tokens, view tokens) triples of shard ``index``, in order."""
    return write_shard(cfg, make_codec(spec), fingerprint, index, list(parts), digest)


def _init_ray(cfg) -> str | None:
    """Connect to (or start) Ray; returns the temp dir of the local instance this call started, else None.

    A local instance lives under its own ``/tmp/vqpt-tok-<pid>-*`` (removed by ``_stop_ray``), never
    ``/tmp/ray``: a job leaves no ``session_*`` of its own behind."""
    if ray.is_initialized():
        return None
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return ""
    temp_dir = tempfile.mkdtemp(prefix=f"vqpt-tok-{os.getpid()}-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True, _temp_dir=temp_dir)
    return temp_dir


def _stop_ray(started: str | None) -> None:
    if started is not None:
        ray.shutdown()
    if started:
        shutil.rmtree(started, ignore_errors=True)


def actor_count(requested: int | None, gpus: int, cpus: int) -> int:
    """Tokenizer actors to start: ``requested`` (default one per GPU, else one per CPU).

    A GPU actor holds one GPU, so asking for more than the cluster has would leave the extra
    actors pending forever (the job would hang): they are clamped to the GPUs that exist, with a
    one-line warning. CPU actors take no CPU slot, so any count can start."""
    if not requested:
        return gpus if gpus else cpus
    if gpus and requested > gpus:
        print(f"warning: --actors {requested} but the cluster has {gpus} GPU(s); using {gpus} GPU actor(s)",
              file=sys.stderr)
        return gpus
    return requested


def actor_options(n_actors: int, gpus: int, nodes: list[dict]) -> list[dict]:
    """Ray options of each tokenizer actor. GPU actors take a GPU each (Ray places them). CPU actors
    hold no CPU slot (they share cores with the decode tasks), so Ray would put them all on the
    driver's node: they are pinned to the alive nodes in turn, one per CPU of each node. The pin is
    hard: a soft one falls back to the driver's node while a node that just joined is not yet in the
    scheduler's view (seen on a loaded machine); a node that dies fails its actor, and the job, which
    a re-run resumes."""
    if gpus:
        return [{"num_gpus": 1}] * n_actors
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    slots = [[n["NodeID"]] * int(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")]
    order = [ids[k] for k in range(max(map(len, slots), default=0)) for ids in slots if k < len(ids)]
    if not order:
        return [{"num_cpus": 0}] * n_actors
    return [{"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(order[i % len(order)], soft=False)}
            for i in range(n_actors)]


def run_shards(cfg, shards: Sequence[Sequence[SourceItem]], checkpoint: bytes, codec: TokenCodec,
               fingerprint: str) -> list[dict]:
    """Write every shard not already finished; returns the progress records of all shards."""
    records: dict[int, dict] = {}
    for i in range(len(shards)):
        digest = shards.digest(i) if hasattr(shards, "digest") else shard_digest(shards[i])  # a Plan: keys only
        record = finished_record(cfg, i, fingerprint, digest)
        if record is not None:
            records[i] = record
    todo = [i for i in range(len(shards)) if i not in records]
    if records:
        print(f"resuming: {len(records)} of {len(shards)} shards already written, skipping them", file=sys.stderr)
    if not todo:
        return [records[i] for i in range(len(shards))]
    started_ray = _init_ray(cfg)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        n_actors = actor_count(cfg.actors, gpus, cpus)
        ckpt_ref = ray.put(checkpoint)
        actors = [TokenizerActor.options(**options).remote(ckpt_ref, cfg.batch_size)
                  for options in actor_options(n_actors, gpus, ray.nodes())]
        remote = tuple(u for u in (cfg.src, cfg.out) if sio.protocol_of(u) != "file")
        actor_nodes = ray.get([a.ready.remote(remote) for a in actors])
        ray.get([warm_up.remote(remote) for _ in range(cpus)])
        where = f"{gpus} GPU actor(s)" if gpus else f"{n_actors} CPU actor(s)"
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        print(f"ray: {alive} nodes, {cpus} CPUs, {gpus} GPUs; tokenising with {where} on "
              f"{len(set(actor_nodes))} node(s)", file=sys.stderr)
        nodes: dict[int, dict[str, int]] = {}
        prep_cfg = cfg.prepare_config()
        inflight: dict = {}
        turn = 0
        bar = tqdm(total=sum(len(shards[i]) for i in todo), unit="img", desc=f"tokenising {cfg.split}")
        t0 = time.perf_counter()

        def collect(refs):
            for ref in refs:
                index, size = inflight.pop(ref)
                records[index] = ray.get(ref)
                bar.update(size)

        for i in todo:
            while len(inflight) >= cfg.max_inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                collect(done)
            items = list(shards[i])
            parts = []
            for j in range(0, len(items), cfg.chunk_size):
                actor, node = actors[turn % n_actors], actor_nodes[turn % n_actors]
                turn += 1
                per_node = nodes.setdefault(i, {})
                per_node[node] = per_node.get(node, 0) + len(items[j : j + cfg.chunk_size])
                if gpus:  # decode on CPU tasks, tokenise on the GPU actors
                    parts.append(actor.encode.remote(prepare_task.remote(items[j : j + cfg.chunk_size], prep_cfg)))
                else:
                    parts.append(actor.prepare_encode.remote(items[j : j + cfg.chunk_size], prep_cfg))
            ref = write_task.remote(cfg, codec.spec, fingerprint, i, shard_digest(items), *parts)
            inflight[ref] = (i, len(items))
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            collect(done)
        bar.close()
        for i in todo:  # steady-state time (after Ray and the actors are up), for benchmarks
            records[i]["tokenise_s"] = time.perf_counter() - t0
            records[i]["nodes"] = nodes[i]  # images tokenised per Ray node id
    finally:
        _stop_ray(started_ray)
    return [records[i] for i in range(len(shards))]
