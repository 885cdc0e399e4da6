"""The stream's per-block fast paths read the same as before: headers written before the packed
form, tars that are not plain ustar, codecs decoding into a caller's buffer, the joined shard."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import numpy as np
import pytest
import zstandard

from storage.blockheader import BLOCK_MAGIC, read_header
from storage.codec import CODEC_NAMES, fit_codec, make_codec
from storage.shard import decode_block, decode_shard, decode_shard_joined, encode_shard, iter_block_bytes, pack_block
from storage.tarindex import members, payload_offsets
from tests.conftest import make_meta, make_samples


def _old_form(block: bytes) -> bytes:
    """The block with its header as written before: one JSON object, one entry per sample in every column."""
    header, offset = read_header(block)
    n = header["n"]
    old = header | {"grids": [header["grids"]] * n if not isinstance(header["grids"][0], list) else header["grids"],
                    "views": header["views"] or [[] for _ in range(n)],
                    "labelmaps": header["labelmaps"] or [None] * n}
    raw = zstandard.ZstdCompressor().compress(json.dumps(old).encode())
    return BLOCK_MAGIC + struct.pack("<I", len(raw)) + raw + block[offset:]


@pytest.mark.parametrize("views, labelmap", [(0, None), (2, (6, 6))])
def test_a_block_with_the_old_header_decodes_the_same(views, labelmap):
    samples = make_samples(12, views=views, labelmap=labelmap)
    codec = make_codec(make_meta(samples, "rans").codec)
    block = pack_block(samples, codec)
    assert read_header(block)[0]["labels"] == [s.label for s in samples]  # packed columns, unpacked for tools
    new, old = decode_block(block, codec), decode_block(_old_form(block), codec)
    assert old.keys == new.keys == [s.key for s in samples]
    for field in ("tokens", "labels", "image_size", "crop_box"):
        np.testing.assert_array_equal(getattr(old, field), getattr(new, field))
    for a, b in zip(old.labelmaps, new.labelmaps, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert [[v.crop_box for v in vs] for vs in old.views] == [[v.crop_box for v in vs] for vs in new.views]


def test_a_gnu_tar_of_the_same_blocks_reads_through_tarfile():
    samples = make_samples(40)
    codec = fit_codec("rans", np.concatenate([s.tokens.ravel() for s in samples]), 64)
    ustar = encode_shard(0, samples, codec, block_size=16)
    spans = members(ustar)
    assert [s.size for s in spans] == [len(b) for _, b in iter_block_bytes(ustar, "u")]
    assert [s.offset for s in spans] == payload_offsets([s.size for s in spans])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, block in iter_block_bytes(ustar, "u"):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(block), 12345
            tf.addfile(info, io.BytesIO(block))
    gnu = buf.getvalue()
    assert members(gnu) is None  # not plain ustar: tarfile reads it
    assert list(iter_block_bytes(gnu, "g")) == list(iter_block_bytes(ustar, "u"))
    assert members(ustar[:-1024]) is None and members(ustar[:1000]) is None  # truncated: tarfile names it


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_every_codec_decodes_into_a_callers_buffer(name):
    ids = np.kron(np.random.default_rng(0).integers(0, 300, (6, 4, 4)), np.ones((1, 2, 2), np.int64)).reshape(-1)
    codec = fit_codec(name, ids, 512, grid=(8, 8))
    data = codec.encode(ids)
    buf = np.full(ids.size + 10, 7, dtype=np.uint16)
    got = codec.decode(memoryview(data), ids.size, out=buf[5:-5])
    assert np.shares_memory(got, buf) and np.array_equal(buf[5:-5], ids) and (buf[:5] == 7).all()
    with pytest.raises(ValueError, match="out must be a writable C-contiguous uint16 array"):
        codec.decode(data, ids.size, out=np.empty(ids.size, np.int64))


def test_a_joined_shard_is_its_blocks_in_one_array():
    samples = make_samples(45, labelmap=(4, 4), views=1)
    codec = make_codec(make_meta(samples, "rans").codec)
    data = encode_shard(0, samples, codec, block_size=16)
    blocks, joined = decode_shard(data, codec), decode_shard_joined(data, codec)
    assert joined.tokens.shape == (45, 8, 8) and joined.tokens.dtype == np.uint16 and joined.tokens.flags.owndata
    np.testing.assert_array_equal(joined.tokens, np.concatenate([b.tokens for b in blocks]))
    assert joined.keys == [s.key for s in samples] and len(joined.views) == len(joined.labelmaps) == 45


def test_a_block_index_that_does_not_fit_its_shard_is_ignored_with_a_warning(tmp_path, caplog):
    from dataclasses import replace

    from storage.manifest import read_manifest, write_manifest, write_split

    samples = make_samples(40)
    m = write_split(str(tmp_path), samples, make_meta(samples), shard_size=20, block_size=8)
    assert [s.block_samples for s in m.shards] == [8, 8] and [len(s.block_bytes) for s in m.shards] == [3, 3]
    assert read_manifest(str(tmp_path)).shards == m.shards  # the index round-trips through parquet
    bad = [m.shards[0], replace(m.shards[1], block_bytes=m.shards[1].block_bytes[:2])]  # 2 blocks of 8 < 20 samples
    write_manifest(str(tmp_path), m.meta, bad)
    with caplog.at_level("WARNING", logger="vqpt.storage"):
        got = read_manifest(str(tmp_path))
    assert got.shards[0] == m.shards[0] and got.shards[1].block_bytes == () and got.shards[1].block_samples == 0
    assert "row 1 (shard-000001.tar): block index ignored: block_samples: 2 blocks of 8 cannot hold 20" in caplog.text
