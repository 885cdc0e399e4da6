"""The `ray job submit` path against a real local head node (what users run on a cluster)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage.manifest import read_manifest
from vqpt.local_s3 import free_port
from vqpt.quickstart import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


@pytest.fixture
def head_node(tmp_path):
    port, dashboard = free_port(), free_port()
    # Ray 2.60 enables token auth on clusters: give the head node and the client one fresh token
    token = secrets.token_hex(32)
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = Path("/tmp") / f"vqpt-ray-{os.getpid()}"  # Ray's socket paths must stay short
    cmd = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


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
