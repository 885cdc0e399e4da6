"""Object stores for real: moto's S3 server on 127.0.0.1, and a local HTTP server."""

from __future__ import annotations

import collections
import functools
import http.server
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

import storage.io as sio
from storage.manifest import read_manifest, write_split
from storage.shard import unpack_block
from storage.stream import StreamLoader, TokenStream
from tests.conftest import make_meta, make_samples

FAIL_FAST = {"retries": 1, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}


def _write(url: str, n: int = 200, shard_size: int = 20):
    samples = make_samples(n, labelmap=(6, 6))
    manifest = write_split(url, samples, make_meta(samples), shard_size=shard_size, block_size=8)
    return manifest, samples


def test_write_to_s3_and_stream_back_with_2_ranks_x_2_workers(s3_bucket):
    manifest, samples = _write(f"{s3_bucket}/in1k/train")
    again = read_manifest(f"{s3_bucket}/in1k/train/manifest.parquet")
    assert again.num_samples == len(samples) and again.shards == manifest.shards
    seen = collections.Counter()
    counts = []
    for rank in range(2):
        ds = TokenStream(f"{s3_bucket}/in1k/train", 16, partitions=8, shuffle_window=32, rank=rank, world_size=2)
        n = 0
        for batch in StreamLoader(ds, num_workers=2):
            seen.update(k for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad)
            n += len(batch["key"])
        counts.append(n)
    assert counts[0] == counts[1]
    assert set(seen) == {s.key for s in samples} and set(seen.values()) == {1}


def test_s3_server_down_mid_epoch_then_back(s3_server, s3_bucket, caplog):
    manifest, samples = _write(f"{s3_bucket}/flaky/train", n=120, shard_size=10)
    # s3fs's own retries off, so the outage reaches (and is survived by) storage.io's retry loop
    ds = TokenStream(manifest.url, 10, partitions=1, shuffle_window=10, prefetch_shards=0, retries=12,
                     storage_options=FAIL_FAST)
    keys = []
    restarter = None
    for i, batch in enumerate(StreamLoader(ds)):
        keys.extend(batch["key"])
        if i == 2:  # stop the endpoint; bring it back a little later while the reader retries
            s3_server.stop()
            restarter = threading.Timer(2.0, s3_server.start)
            restarter.start()
    restarter.join()
    assert any("retrying read of s3://" in r.getMessage() for r in caplog.records), "the outage was never seen"
    assert sorted(keys) == sorted(s.key for s in samples) and len(keys) == len(set(keys))


def test_s3_down_for_good_names_the_shard(s3_server, s3_bucket):
    manifest, _ = _write(f"{s3_bucket}/gone/train", n=40, shard_size=10)
    ds = TokenStream(manifest.url, 10, partitions=1, prefetch_shards=0, retries=1, storage_options=FAIL_FAST)
    s3_server.stop()
    try:
        with pytest.raises(Exception, match=r"shard s3://.*/gone/train/shard-0000\d\d\.tar: cannot be read"):
            list(ds)
    finally:
        s3_server.start()


def test_plain_webdataset_reads_s3_shards_through_the_registered_handler(s3_bucket):
    manifest, samples = _write(f"{s3_bucket}/wds/train", n=50, shard_size=25)
    sio.register_webdataset_s3()
    codec = manifest.codec()
    got = [s.key for item in wds.WebDataset(manifest.shard_urls(), shardshuffle=False, empty_check=False)
           for s in unpack_block(item, codec)]
    assert got == [s.key for s in samples]


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_stream_over_http(http_root):
    root, url = http_root
    _, samples = _write(str(root / "train"), n=60, shard_size=20)
    ds = TokenStream(f"{url}/train/manifest.parquet", 16, partitions=2)
    keys = [k for b in StreamLoader(ds) for k in b["key"]]
    assert sorted(keys) == sorted(s.key for s in samples)
    with pytest.raises(ValueError, match="read-only"):
        sio.write_bytes_atomic(f"{url}/x", b"no")


def test_retries_then_clear_error():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert sio.with_retries(flaky, "thing", retries=4, backoff_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(OSError, match="thing: failed after 2 attempts: ConnectionError"):
        sio.with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), "thing", retries=1, backoff_s=0.01)
    with pytest.raises(FileNotFoundError):  # permanent: not retried
        sio.with_retries(lambda: Path("/nonexistent/x").read_bytes(), "thing", retries=5, backoff_s=10)
    with pytest.raises(TypeError):  # a bug, not the network: not retried
        sio.with_retries(lambda: len(5), "thing", retries=5, backoff_s=10)
