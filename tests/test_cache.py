"""The local shard cache: its size bound, pinned (open) shards, sharing across ranks and workers, repair."""

from __future__ import annotations

import collections
import hashlib
import os
import threading

import pytest

import storage.io as sio
from storage import fetch
from storage.fetch import ShardCache, parse_size
from storage.manifest import write_split
from storage.stream import StreamLoader, TokenStream
from tests.conftest import make_meta, make_samples, write_dataset


def _entry(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([i]) * size
    return hashlib.sha256(data).hexdigest(), data


def _cached(directory) -> set[str]:
    return {name[:-4] for name in os.listdir(directory) if name.endswith(".tar")}


def test_cache_limit_accepts_sizes_with_units():
    assert parse_size("20gb") == 20 * 10**9 and parse_size("8GiB") == 8 << 30 and parse_size(" 1.5 mb") == 1_500_000
    assert parse_size(4096) == 4096 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="cache_limit '20 gigs' is not a size.*'20gb'"):
        parse_size("20 gigs")


def test_eviction_skips_shards_a_reader_has_open(tmp_path):
    # two caches on one directory hold separate open files, so their locks conflict exactly as
    # two processes' do (flock locks belong to the open file, not the process)
    reader, writer = ShardCache(str(tmp_path), 2500), ShardCache(str(tmp_path), "2.5kb")
    (x, dx), (y, dy), (z, dz), (w, dw) = (_entry(i) for i in range(4))
    reader.put(x, dx)  # open by the reader until it releases it
    writer.put(y, dy)
    writer.release(y)
    writer.put(z, dz)  # full: y (not x, which is older but open) makes room
    assert _cached(tmp_path) == {x, z}
    writer.put(w, dw)  # nothing can go: x and z are open, so w is not cached and the bound holds
    assert _cached(tmp_path) == {x, z}
    reader.release(x)
    writer.release(z)
    writer.put(w, dw)  # now the least recently used, x, goes
    assert _cached(tmp_path) == {z, w}
    assert reader.get(z) == dz and reader.get(x) is None


def test_a_corrupted_cached_shard_is_fetched_again(tmp_path, monkeypatch):
    manifest = write_dataset(str(tmp_path / "ds"), make_samples(40), shard_size=10)
    cache = tmp_path / "cache"
    reads = []
    real = sio.read_bytes
    monkeypatch.setattr(sio, "read_bytes", lambda url, *a, **k: reads.append(url) or real(url, *a, **k))

    def keys():
        return sorted(k for b in TokenStream(manifest, 8, partitions=1, cache_dir=str(cache)) for k in b["key"])

    first = keys()
    assert len(reads) == 4 and len(_cached(cache)) == 4
    damaged = cache / f"{manifest.shards[2].sha256}.tar"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    reads.clear()
    assert keys() == first
    assert reads == [manifest.shard_url(2)]  # only the damaged one came from the store again
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == manifest.shards[2].sha256


class _MeasuredIO:
    """``storage.io`` as ``storage.fetch`` sees it, except that each write into the cache directory
    appends (pid, bytes in the directory) to ``log`` right after it, while the writer still holds
    the directory's lock. Only a lock holder adds files, and a write's temp file is never larger
    than the shard it becomes, so these are the directory's largest states: an exact peak, not a
    sample. DataLoader workers are forked after the patch, so theirs are measured too."""

    def __init__(self, cache_dir, log):
        self.cache_dir, self.log = str(cache_dir), str(log)

    def __getattr__(self, name):
        return getattr(sio, name)

    def _note(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def read_bytes(self, url, *args, **kwargs):
        self._note(f"read {os.getpid()}")
        return sio.read_bytes(url, *args, **kwargs)

    def write_bytes_atomic(self, url, data, *args, **kwargs):
        sio.write_bytes_atomic(url, data, *args, **kwargs)
        if os.path.dirname(str(url)) == self.cache_dir:
            self._note(f"write {os.getpid()} {sum(entry.stat().st_size for entry in os.scandir(self.cache_dir))}")


def test_two_ranks_x_two_workers_share_a_bounded_cache_on_s3(s3_bucket, tmp_path, monkeypatch):
    samples = make_samples(200)
    manifest = write_split(f"{s3_bucket}/cached/train", samples, make_meta(samples), shard_size=10, block_size=5)
    assert len(manifest.shards) == 20
    limit = 3 * max(s.bytes for s in manifest.shards)
    cache, log = tmp_path / "cache", tmp_path / "cache_writes.log"
    monkeypatch.setattr(fetch, "sio", _MeasuredIO(cache, log))
    seen, counts, errors = collections.Counter(), [0, 0], []

    def rank(r: int) -> None:
        try:
            ds = TokenStream(manifest.url, 8, partitions=8, shuffle_window=10, rank=r, world_size=2,
                             cache_dir=str(cache), cache_limit=limit)
            for batch in StreamLoader(ds, num_workers=2):
                seen.update(k for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad)
                counts[r] += len(batch["key"])
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    ranks = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert not errors, errors
    assert counts[0] == counts[1] and set(seen) == {s.key for s in samples} and set(seen.values()) == {1}
    events = [line.split() for line in log.read_text().splitlines()]
    writes = [int(e[2]) for e in events if e[0] == "write"]
    # the bound was under pressure: all four readers (2 ranks x 2 worker processes) fetched shards into
    # the one directory, and more shards were cached than fit, so some were evicted to make room
    assert len({e[1] for e in events if e[0] == "read"}) == 4 and len(writes) > 3, events
    peak = max(writes)
    assert peak <= limit, f"cache reached {peak} bytes, limit {limit}"
    assert 0 < len(_cached(cache)) <= 3
