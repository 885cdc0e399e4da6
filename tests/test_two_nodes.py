"""A two-node Ray cluster (``ray start --head`` plus ``ray start --address``) tokenises an S3 source to S3.

Both nodes run on this machine but share nothing except the network: each has its own raylet,
object store and temp dir, and the source is read from S3 by whichever node runs the work, as on
a cluster whose workers have no shared filesystem.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from storage import io as sio
from storage.manifest import read_manifest
from storage.stream import TokenStream
from vqpt.local_ray import LocalRayCluster, _pids_mentioning, submit_job
from vqpt.sample_data import generate_imagenet_folder

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
