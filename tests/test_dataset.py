"""Map-style random access: ds[i] is the i-th sample of an unshuffled pass; one lookup reads one block."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

import storage.io as sio
from storage.errors import ShardError
from storage.manifest import write_split
from storage.stream import TokenDataset, TokenStream
from tests.conftest import make_meta, make_samples, write_dataset


def without_block_index(split_dir: str) -> None:
    """Rewrite a split's manifest as one written before the block index existed (no such columns)."""
    url = f"{split_dir}/manifest.parquet"
    table = pq.read_table(io.BytesIO(sio.read_bytes(url))).drop_columns(["block_samples", "block_bytes"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    sio.write_bytes_atomic(url, buf.getvalue())


@pytest.fixture(scope="module", params=["block index in the manifest", "older manifest"])
def split(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("ra")
    samples = make_samples(61, labelmap=(6, 6), views=2)
    write_dataset(str(root), samples, shard_size=23, block_size=5)  # partial last blocks and shards
    if request.param == "older manifest":
        without_block_index(str(root))
    return str(root)


def test_every_index_matches_the_unshuffled_pass(split):
    straight = list(TokenStream(split, None, shuffle=False, partitions=1))
    ds = TokenDataset(split, cache_blocks=2)
    assert len(ds) == len(straight) == 61
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(ds)).tolist():  # random order: block guesses, LRU misses and hits
        got, want = ds[i], straight[i]
        assert got["key"] == want["key"] and got["index"] == i and got["label"] == int(want["label"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["labelmap"], want["labelmap"])
        np.testing.assert_array_equal(got["view_tokens"][1], want["views"][1].tokens)
        np.testing.assert_array_equal(got["crop_box"], want["crop_box"])
    assert ds[-1]["key"] == straight[-1]["key"]
    with pytest.raises(IndexError, match="index 61 out of range for 61"):
        ds[61]


def test_get_by_key(split):
    ds = TokenDataset(split)
    assert ds.get("img/000042")["index"] == 42
    with pytest.raises(KeyError, match="no sample with key 'img/999999' in .*manifest.parquet"):
        ds.get("img/999999")


def test_on_s3_every_lookup_is_one_range_read(s3_bucket, monkeypatch):
    samples = make_samples(200)
    manifest = write_split(f"{s3_bucket}/ra/train", samples, make_meta(samples), shard_size=100, block_size=10)
    assert manifest.shards[1].block_samples == 10 and len(manifest.shards[1].block_bytes) == 10
    reads = []
    real = sio.read_range
    monkeypatch.setattr(sio, "read_range", lambda url, a, b, *r, **k: reads.append(b - a) or real(url, a, b, *r, **k))
    ds = TokenDataset(f"{s3_bucket}/ra/train")
    for i in (105, 173, 118, 199, 3):  # first touches of shards 1 and 0 included: the manifest has their block index
        reads.clear()
        got = ds[i]
        assert got["key"] == samples[i].key and np.array_equal(got["tokens"], samples[i].tokens)
        assert len(reads) == 1 and reads[0] < manifest.shards[1].bytes / 8, reads
    reads.clear()
    ds[173]  # in the LRU: nothing read
    assert reads == []


def test_on_s3_an_older_manifest_walks_the_tar_headers_once(s3_bucket, monkeypatch):
    samples = make_samples(200)
    manifest = write_split(f"{s3_bucket}/ra-old/train", samples, make_meta(samples), shard_size=100, block_size=10)
    without_block_index(f"{s3_bucket}/ra-old/train")
    reads = []
    real = sio.read_range
    monkeypatch.setattr(sio, "read_range", lambda url, a, b, *r, **k: reads.append(b - a) or real(url, a, b, *r, **k))
    ds = TokenDataset(f"{s3_bucket}/ra-old/train")
    assert ds.manifest.shards[1].block_bytes == ()
    assert ds[105]["key"] == samples[105].key  # first touch of shard 1: its 10 tar headers, then blocks
    assert 10 <= len(reads) <= 10 + 2 and sum(reads) < manifest.shards[1].bytes
    for i in (173, 118, 199):  # shard 1 is indexed and the block size known: one ranged GET per lookup
        reads.clear()
        got = ds[i]
        assert got["key"] == samples[i].key and np.array_equal(got["tokens"], samples[i].tokens)
        assert len(reads) == 1 and reads[0] < manifest.shards[1].bytes / 8, reads
    reads.clear()
    ds[173]  # in the LRU: nothing read
    assert reads == []


def test_a_damaged_block_names_the_shard_and_block(tmp_path):
    manifest = write_dataset(str(tmp_path), make_samples(40), shard_size=20, block_size=10)
    path = tmp_path / manifest.shards[1].url
    data = bytearray(path.read_bytes())
    data[512 + 6] ^= 0xFF  # inside block 0's header length
    path.write_bytes(bytes(data))
    ds = TokenDataset(str(tmp_path))
    assert ds[15]["key"] == "img/000015"  # shard 0 is intact
    with pytest.raises(ShardError, match=r"shard-000001.tar: block 0: "):
        ds[20]
