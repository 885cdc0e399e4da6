"""Shard format and manifest: round trips, determinism, webdataset compatibility, bad input."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from storage.errors import FingerprintMismatch, ManifestError, ShardError
from storage.manifest import META_KEY, read_manifest, write_manifest
from storage.shard import ShardWriter, decode_shard, encode_shard, iter_block_bytes, unpack_block
from tests.conftest import make_meta, make_samples, write_dataset


def _same(a, b):
    assert a.key == b.key and a.label == b.label and a.image_size == b.image_size and a.crop_box == b.crop_box
    np.testing.assert_array_equal(a.tokens, b.tokens)
    if a.labelmap is None:
        assert b.labelmap is None
    else:
        np.testing.assert_array_equal(a.labelmap, b.labelmap)
    assert len(a.views) == len(b.views)
    for va, vb in zip(a.views, b.views):
        np.testing.assert_array_equal(va.tokens, vb.tokens)
        assert tuple(va.crop_box) == tuple(vb.crop_box) and va.flipped == vb.flipped


@pytest.mark.parametrize("codec_name", ["raw16", "bitpack", "seit", "zstd", "rans"])
def test_shard_round_trip_every_field(codec_name):
    samples = make_samples(40, labelmap=(17, 23), views=2)
    codec = make_meta(samples, codec_name).codec
    from storage.codec import make_codec

    c = make_codec(codec)
    data = encode_shard(3, samples, c, block_size=16)
    blocks = decode_shard(data, c)
    assert [len(b) for b in blocks] == [16, 16, 8]
    got = [s for b in blocks for s in b.samples()]
    for a, b in zip(samples, got, strict=True):
        _same(a, b)


def test_shards_are_byte_identical_on_rewrite(tmp_path):
    samples = make_samples(60)
    m1 = write_dataset(str(tmp_path / "a"), samples)
    m2 = write_dataset(str(tmp_path / "b"), samples)
    for s1, s2 in zip(m1.shards, m2.shards, strict=True):
        assert (tmp_path / "a" / s1.url).read_bytes() == (tmp_path / "b" / s2.url).read_bytes()
        assert s1.sha256 == s2.sha256


def test_container_overhead_is_under_one_percent_with_blocks():
    samples = make_samples(1024, grid=(32, 32), vocab=512, seed=1)
    from storage.codec import make_codec

    c = make_codec(make_meta(samples, "rans", vocab=512).codec)
    data = encode_shard(0, samples, c, block_size=256)
    payload = 0
    container = 0
    for _, block in iter_block_bytes(data, "mem"):
        header_len = int.from_bytes(block[4:8], "little")
        payload += len(block) - 8 - header_len  # token bytes (no label maps here)
    container = len(data) - payload
    header_and_meta = sum(8 + int.from_bytes(b[4:8], "little") for _, b in iter_block_bytes(data, "mem"))
    tar_overhead = container - header_and_meta
    assert tar_overhead / payload < 0.01, tar_overhead / payload
    # one member per sample would cost at least a 512-byte header each
    assert 512 * len(samples) / payload > 0.3


def test_plain_webdataset_iterates_a_shard_and_the_helper_unpacks_it(tmp_path):
    samples = make_samples(70, labelmap=(8, 8))
    manifest = write_dataset(str(tmp_path), samples, shard_size=40, block_size=16)
    codec = manifest.codec()
    got = []
    for item in wds.WebDataset(manifest.shard_urls(), shardshuffle=False, empty_check=False):
        assert set(item) >= {"__key__", "vqb"}
        got.extend(unpack_block(item, codec))
    assert [s.key for s in got] == [s.key for s in samples]
    for a, b in zip(samples, got):
        _same(a, b)


def test_manifest_round_trip_and_counts(tmp_path):
    samples = make_samples(130)
    manifest = write_dataset(str(tmp_path), samples, shard_size=50)
    again = read_manifest(str(tmp_path))  # the split directory works as well as the file
    assert again.num_samples == 130 and [s.samples for s in again.shards] == [50, 50, 30]
    assert again.meta == manifest.meta
    assert again.shards[0].first_key == samples[0].key and again.shards[-1].last_key == samples[-1].key
    for i, info in enumerate(again.shards):
        data = (tmp_path / info.url).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
        assert info.url == f"shard-{i:06d}.tar"


def test_fingerprint_mismatch_is_refused(tmp_path):
    write_dataset(str(tmp_path), make_samples(20))
    read_manifest(str(tmp_path), expected_fingerprint="f" * 64)
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        read_manifest(str(tmp_path), expected_fingerprint="0" * 64)


def test_missing_and_malformed_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad" / "manifest.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="not a readable parquet"):
        read_manifest(str(bad))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"url": ["x.tar"]}), plain)
    with pytest.raises(ManifestError, match="vqpt.meta"):
        read_manifest(str(plain))


@pytest.mark.parametrize("url", ["../other/shard.tar", "/etc/passwd", "s3://elsewhere/x.tar", "a/../../b.tar",
                                 "C:/x.tar", "a\\b.tar", ""])
def test_shard_urls_escaping_the_root_are_refused(tmp_path, url):
    samples = make_samples(10)
    manifest = write_dataset(str(tmp_path), samples, shard_size=10)
    table = pq.read_table(manifest.url)
    rows = table.to_pylist()
    rows[0]["url"] = url
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), manifest.url)
    with pytest.raises(ManifestError, match="escapes the dataset root"):
        read_manifest(manifest.url)
    with pytest.raises(ManifestError, match="escapes"):
        write_manifest(str(tmp_path / "w"), manifest.meta, [manifest.shards[0].__class__(url, 1, 1, "0" * 64, "", "")])


def test_manifest_with_bad_metadata_field_names_it(tmp_path):
    manifest = write_dataset(str(tmp_path), make_samples(10), shard_size=10)
    table = pq.read_table(manifest.url)
    meta = table.schema.metadata[META_KEY].decode().replace('"vocab_size"', '"vocab_sizeX"')
    pq.write_table(table.replace_schema_metadata({META_KEY: meta.encode()}), manifest.url)
    with pytest.raises(ManifestError, match="vocab_size"):
        read_manifest(manifest.url)


def _tar_with(name: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["/abs/000000-00000.vqb", "../000000-00000.vqb", "a/../../x.vqb"])
def test_unsafe_tar_member_paths_are_refused(name):
    with pytest.raises(ShardError, match="unsafe path"):
        list(iter_block_bytes(_tar_with(name, b"VQB1xxxx"), "s3://b/shard-000000.tar"))


def test_truncated_and_corrupt_shards_name_the_shard(tmp_path):
    samples = make_samples(64)
    manifest = write_dataset(str(tmp_path), samples, shard_size=64)
    codec = manifest.codec()
    data = (tmp_path / manifest.shards[0].url).read_bytes()
    with pytest.raises(ShardError, match="shard-000000.tar"):
        decode_shard(data[: len(data) // 2], codec, url="shard-000000.tar")
    flipped = bytearray(data)
    flipped[512 + 9] ^= 0xFF  # inside the first block's compressed header
    with pytest.raises(ShardError, match="shard-000000.tar: member 000000-00000.vqb"):
        decode_shard(bytes(flipped), codec, url="shard-000000.tar")


def test_writer_is_complete_detects_a_changed_shard(tmp_path):
    samples = make_samples(30)
    meta = make_meta(samples)
    from storage.codec import make_codec

    writer = ShardWriter(str(tmp_path), make_codec(meta.codec), block_size=8)
    info = writer.write(0, samples)
    assert writer.is_complete(info)
    path = tmp_path / info.url
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    assert not writer.is_complete(info)
    path.unlink()
    assert not writer.is_complete(info)
