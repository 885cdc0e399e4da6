"""The `ray job submit` path against a real local head node (what users run on a cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage.manifest import read_manifest
from vqpt.local_ray import LocalRayCluster, _pids_mentioning
from vqpt.quickstart import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


@pytest.fixture
def head_node():
    """A real head node of this test's own (stopped by its PIDs and temp dir: other Ray instances on the
    machine are left alone, never ``ray stop --force``)."""
    cluster = LocalRayCluster(num_cpus=2)
    with cluster:
        yield cluster.address, cluster.env
    assert not _pids_mentioning(str(cluster.temp_dir)), "a process of the test's Ray cluster is still running"
    assert not cluster.temp_dir.exists()


def test_ray_job_submit_tokenises_a_folder(head_node, tmp_path):
    address, env = head_node
    generate_imagenet_folder(tmp_path / "src", classes=3, per_class=10)
    out = tmp_path / "tokens"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           sys.executable, "-m", "pipeline.tokenise", "--dataset", "imagenet", "--src", str(tmp_path / "src"),
           "--out", str(out), "--resolution", "64", "--vocab", "32", "--shard-size", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    manifest = read_manifest(str(out / "train"))
    report = json.loads((out / "train" / "report.json").read_text())
    assert manifest.num_samples == report["written"] == 30 and len(manifest.shards) == 4


def test_two_local_clusters_at_once_each_run_a_job_and_leave_nothing():
    """Two quickstart-style clusters started together: both are ready only once they accept jobs, and
    each one's stop removes its own processes and temp dir."""
    from concurrent.futures import ThreadPoolExecutor

    from vqpt.local_ray import submit_job

    def one(i: int) -> tuple[str, Path]:
        with LocalRayCluster(num_cpus=1) as cluster:
            logs = submit_job(cluster, [sys.executable, "-c", f"print('job {i} ran')"], on_line=lambda _: None)
        return logs, cluster.temp_dir

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(2)))
    for i, (logs, temp_dir) in enumerate(results):
        assert f"job {i} ran" in logs
        assert not _pids_mentioning(str(temp_dir)) and not temp_dir.exists()


def test_a_cluster_gets_distinct_ports_each_bindable():
    """A cluster's ports come from one free_ports call: distinct (two components on one port made `ray start`
    exit 1 under load, the kernel having handed the same ephemeral port to two free_port calls)."""
    import socket

    from storage.net import free_ports

    ports = free_ports(40)
    assert len(set(ports)) == 40
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
