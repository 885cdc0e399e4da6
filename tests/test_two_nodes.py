"""Two nodes on this machine: a Ray cluster (``ray start --head`` plus ``ray start --address``) tokenises an S3
source to S3, and two DeepSpeed nodes (the multi-node launcher, one per node) pre-train from S3.

The nodes share nothing except the network (and, for DeepSpeed, the run directory a cluster keeps on a
shared filesystem): each Ray node has its own raylet, object store and temp dir, each DeepSpeed node its
own shard cache, and data is read from S3 by whichever node needs it, as on a cluster whose workers
have no shared filesystem.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.launch import deepspeed_executable, shm_buffers
from storage import io as sio
from storage.manifest import read_manifest
from storage.stream import TokenStream
from tests.conftest import make_samples, write_dataset
from vqpt.local_ray import LocalRayCluster, _pids_mentioning, submit_job
from vqpt.local_s3 import free_port
from vqpt.sample_data import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _upload(folder: Path, url: str) -> int:
    """Put every file of ``folder`` under ``url``; returns how many objects are there."""
    fs = sio.filesystem(url)
    fs.put(str(folder), url.split("://", 1)[1], recursive=True)
    return len([p for p in fs.find(url.split("://", 1)[1]) if p.endswith(".JPEG")])


def test_two_node_cluster_tokenises_s3_to_s3(s3_bucket, tmp_path):
    generate_imagenet_folder(tmp_path / "src", classes=3, per_class=8)
    assert _upload(tmp_path / "src", f"{s3_bucket}/imagenet") == 24
    s3_env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                         "VQPT_S3_ENDPOINT")}
    out = f"{s3_bucket}/tokens"
    cluster = LocalRayCluster(num_cpus=1, worker_cpus=[1])
    with cluster:
        logs = submit_job(cluster, [sys.executable, "-m", "pipeline.tokenise", "--dataset", "imagenet",
                                    "--src", f"{s3_bucket}/imagenet", "--out", out, "--resolution", "64",
                                    "--vocab", "32", "--shard-size", "6"], env=s3_env, on_line=lambda _: None)
    for temp_dir in (cluster.temp_dir, cluster.worker_temp_dir(0)):
        assert not _pids_mentioning(str(temp_dir)) and not temp_dir.exists(), f"{temp_dir} left behind"
    assert "2 nodes" in logs, logs[-3000:]
    report = json.loads(sio.read_bytes(f"{out}/train/report.json"))
    assert report["written"] == 24 and report["rejected"] == 0
    assert len(report["nodes"]) == 2, (report["nodes"], [x for x in logs.splitlines() if "ray:" in x])
    manifest = read_manifest(f"{out}/train")
    assert manifest.num_samples == 24 and len(manifest.shards) == 4
    keys = sorted(s["key"] for s in TokenStream(f"{out}/train", None, partitions=1, shuffle=False))
    assert keys == sorted(f"train/{p.parent.name}/{p.stem}" for p in (tmp_path / "src" / "train").rglob("*.JPEG"))


def test_cpu_actors_are_spread_over_the_nodes_one_per_cpu():
    from pipeline.tokenise_ray import actor_options

    a, b, dead = "aa" * 28, "bb" * 28, "dd" * 28  # Ray node ids: 56 hex digits
    nodes = [{"NodeID": a, "Alive": True, "Resources": {"CPU": 2.0}},
             {"NodeID": dead, "Alive": False, "Resources": {"CPU": 8.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 1.0}}]
    placed = [o["scheduling_strategy"].node_id for o in actor_options(4, 0, nodes)]
    assert placed == [a, b, a, a]
    assert all(o["num_cpus"] == 0 for o in actor_options(3, 0, nodes))
    assert actor_options(2, 1, nodes) == [{"num_gpus": 1}] * 2


def test_two_deepspeed_nodes_pretrain_from_s3_with_node_local_caches(s3_bucket, tmp_path):
    """DeepSpeed's own multi-node launcher, one launcher per node as a scheduler would start them
    (``deepspeed --hostfile H --no_ssh --node_rank i --master_addr 127.0.0.1``), one rank per node, MTM
    pre-training for one epoch from shards on S3, each node caching the shards it reads in its own
    directory. Both nodes train, every sample of the epoch is read exactly once across the nodes, and
    nothing is left behind: processes, /dev/shm buffers, files in the runs' TMPDIR, cache temp files."""
    samples = make_samples(120)
    data = f"{s3_bucket}/tok/train"
    manifest = write_dataset(data, samples, shard_size=20, block_size=8)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never contacts them
    out, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    # torch keeps its compile cache in $TMPDIR/torchinductor_<user> unless told otherwise: a cache meant to
    # outlive runs, so it goes elsewhere and TMPDIR must end empty
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    # 120 samples = 8 partitions x 15 = 2 readers x 8 micro-batches of 8: one epoch is 8 steps of 2 micro-batches
    common = ["--module", "pretrain.train", "--config", str(ROOT / "configs/mtm_vit_tiny.yaml"), "--data", data,
              "--out", str(out), "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.token_dim=16",
              "objective.decoder_dim=32", "objective.decoder_heads=2", "objective.decoder_depth=1",
              "data.batch_size=8", "data.partitions=8", "data.shuffle_window=32", "run.steps=8", "run.log_every=4",
              "run.progress=false", "run.trace_samples=true"]
    procs = []
    try:
        for node in (0, 1):
            cmd = [deepspeed_executable(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *common,
                   f"data.cache_dir={tmp_path / f'cache{node}'}"]
            log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
        codes = [p.wait(timeout=900) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
        leftovers = shm_buffers(port)
        for f in leftovers:
            f.unlink(missing_ok=True)
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    for node, log in enumerate(logs):  # each launcher started one local rank of a 2-node job
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in log and "dist_world_size=2" in log, log[-3000:]
    # both nodes trained the whole epoch, and read each sample of it exactly once between them
    traces = [[json.loads(line) for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)]
    assert [[r["step"] for r in t] for t in traces] == [list(range(1, 9))] * 2
    keys = collections.Counter(k for t in traces for r in t for k in r["key"])
    assert keys == collections.Counter(s.key for s in samples)
    assert sorted(i for t in traces for r in t for i in r["index"]) == list(range(120))
    assert (out / "checkpoints" / "step0000008").is_dir() and (out / "backbone.pt").is_file()
    # each node's cache holds the shards its rank read, all of them between the two
    cached = [{p.name for p in (tmp_path / f"cache{node}").iterdir()} for node in (0, 1)]
    shas = {f"{s.sha256}.tar" for s in manifest.shards}
    for names in cached:
        assert names - {".lock"} <= shas and names & shas, names
    assert cached[0] | cached[1] >= shas
    # nothing left behind
    assert not leftovers, f"/dev/shm buffers left behind: {leftovers}"
    assert not _pids_mentioning(str(out)), "trainer processes still running"
    assert not list(tmp.iterdir()), f"left in TMPDIR: {sorted(p.name for p in tmp.iterdir())}"
