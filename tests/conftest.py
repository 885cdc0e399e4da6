"""Shared fixtures: real-data location, a real S3 endpoint (moto's server), small token datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from storage.codec import fit_codec
from storage.manifest import DatasetMeta, Manifest, write_split
from storage.shard import Sample, View
from vqpt.local_s3 import LocalS3

pytest_plugins = ["tests.adapter_support"]  # the adapter tests' shared images, tokenizer and ids
pytest.register_assert_rewrite("tests.deploy_support")  # plain asserts there report like test asserts

SHARED_DATA = Path(os.environ.get("VQPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data_dir(name: str) -> Path:
    """``$VQPT_DATA/<name>`` (default ../shared/data/<name>), or skip the test saying where it looked."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set VQPT_DATA to the folder holding {name}/)")
    return path


def make_samples(n: int, grid: tuple[int, int] = (8, 8), vocab: int = 64, seed: int = 0,
                 labelmap: tuple[int, int] | None = None, views: int = 0, prefix: str = "img") -> list[Sample]:
    """``n`` samples with spatially smooth ids (runs, not uniform noise) and unique keys."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.integers(0, vocab, size=(grid[0] // 2 + 1, grid[1] // 2 + 1))
        tokens = np.kron(base, np.ones((2, 2), dtype=np.int64))[: grid[0], : grid[1]]
        lm = None if labelmap is None else rng.integers(0, 151, size=labelmap).astype(np.uint8)
        vs = tuple(View(rng.integers(0, vocab, size=grid), (i % 7, 1, 20, 30), bool(i % 2)) for _ in range(views))
        out.append(Sample(key=f"{prefix}/{i:06d}", tokens=tokens, label=i % 10, labelmap=lm,
                          image_size=(100 + i % 5, 120), crop_box=(0, 10, 100, 100), views=vs))
    return out


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a random smooth colour gradient plus a few soft coloured blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c0, cx, cy = rng.uniform(0, 1, (3, 3))
        img = c0 * 0.5 + 0.5 * (cx * xx[..., None] + cy * yy[..., None]) / 2
        for _ in range(rng.integers(1, 4)):
            mx, my = rng.uniform(0.1, 0.9, 2)
            r = rng.uniform(0.05, 0.25)
            w = np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - w) + rng.uniform(0, 1, 3) * w
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def make_meta(samples: list[Sample], codec_name: str = "rans", vocab: int = 64, split: str = "train",
              **kwargs) -> DatasetMeta:
    sample_ids = np.concatenate([s.tokens.ravel() for s in samples[:200]])
    codec = fit_codec(codec_name, sample_ids, vocab)
    grid = samples[0].tokens.shape
    return DatasetMeta(split=split, codec=codec.spec, tokenizer_fingerprint="f" * 64, grid=(grid[0], grid[1]),
                       vocab_size=vocab, resolution=64, class_names=tuple(f"c{i}" for i in range(10)), **kwargs)


def write_dataset(split_dir: str, samples: list[Sample], shard_size: int = 50, block_size: int = 16,
                  codec_name: str = "rans", vocab: int = 64) -> Manifest:
    return write_split(split_dir, samples, make_meta(samples, codec_name, vocab), shard_size=shard_size,
                       block_size=block_size)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto's server) for the session; env vars set while it runs."""
    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the test S3 server; returns its ``s3://`` URL."""
    name = "vqpt-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = s3_server.client()
    yield s3_server.bucket(name)
    for obj in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)
