"""The tokenisation job writing to a real S3 endpoint (moto's server), its Ray workers started by the job."""

from __future__ import annotations

import json

import pytest

import storage.io as sio
from pipeline.tokenise import main
from storage.manifest import read_manifest
from storage.stream import TokenStream
from vqpt.quickstart import generate_imagenet_folder

pytestmark = pytest.mark.slow


def test_tokenise_to_s3_then_stream(s3_bucket, tmp_path):
    generate_imagenet_folder(tmp_path / "src", classes=2, per_class=9)
    out = f"{s3_bucket}/tok"
    assert main(["--dataset", "imagenet", "--src", str(tmp_path / "src"), "--out", out, "--resolution", "64",
                 "--vocab", "16", "--shard-size", "5", "--num-cpus", "2"]) == 0
    manifest = read_manifest(f"{out}/train")
    report = json.loads(sio.read_bytes(f"{out}/train/report.json"))
    assert manifest.num_samples == report["written"] == 18 and len(manifest.shards) == 4
    assert sio.exists(f"{out}/tokenizer.pt") and sio.read_bytes(f"{out}/train/rejects.jsonl") == b""
    keys = [k for b in TokenStream(manifest.url, 4, partitions=2) for k, p in zip(b["key"], b["pad"].tolist())
            if not p]
    assert sorted(keys) == sorted(f"train/n{c:08d}/n{c:08d}_{i}" for c in range(2) for i in range(9))
