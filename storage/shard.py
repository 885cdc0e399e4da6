"""The shard format: blocks of samples inside a webdataset-compatible tar.

A shard is an ordinary POSIX tar. Each member is one *block* of up to ``block_size`` samples,
named ``{shard:06d}-{block:05d}.vqb``, so a plain ``webdataset.WebDataset(url)`` iterates a
shard and yields one dict per block (``{"__key__": "000003-00001", "vqb": bytes}``);
``unpack_block(bytes, codec)`` turns that into samples. Packing ~256 samples per member keeps
tar's 512-byte header and padding under 1% of the payload (one member per ~1 KB sample would
cost more than the sample).

Block layout (all integers little-endian)::

    b"VQB1" | u32 header_len | header | token payload | label-map payloads
    header = zstd(JSON) with per-sample columns: keys, labels, image_size, crop_box, grids,
             views, byte lengths of the payloads

The header is written compactly (``storage.blockheader.encode_header``; both forms are read):
labels, image_size and crop_box packed as int64 ahead of the JSON (``b"VQC1" | u32 length |
columns | JSON``), ``grids`` one ``[h, w]`` when every grid has that shape, ``views`` /
``labelmaps`` ``[]`` when no sample has one. Blocks written before (a JSON object with one entry
per sample in every column) read the same.

The token payload is the codec's encoding of every token grid of the block concatenated
(main grids in sample order, then all view grids), so an entropy coder runs once per block.

Shards are byte-identical for identical inputs: tar headers carry no time, owner or mode noise.
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import zstandard

from storage import io as sio
from storage.blockheader import (
    BLOCK_MAGIC,
    MAX_BLOCK_SAMPLES,
    BlockHeader,
    ShardExpect,
    encode_header,
    parse_header,
    read_header_packed,
)
from storage.codec import TokenCodec
from storage.errors import ShardError
from storage.labelmap import decode_labelmap, encode_labelmap
from storage.tarindex import BLOCK_EXT, block_bytes, iter_block_bytes  # noqa: F401  (re-exported)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class View:
    """An extra augmented crop of the sample's image, tokenised.

    ``crop_box`` is (top, left, height, width) in source-image pixels; ``flipped`` means the
    crop was mirrored horizontally before tokenisation.
    """

    tokens: np.ndarray
    crop_box: Box
    flipped: bool = False


@dataclass(frozen=True)
class Sample:
    """One stored image.

    tokens: (h, w) integer ids in [0, K). label: class index, -1 when unlabelled.
    labelmap: uint8 (H', W') segmentation labels (ADE20K: 0 = other, 1..150) or None.
    image_size: (H, W) of the source image in pixels (after EXIF orientation).
    crop_box: (top, left, height, width) in source pixels of the region resized to the
    tokenizer's resolution; token (i, j) covers that region's cell (i, j) of an h x w grid.
    """

    key: str
    tokens: np.ndarray
    label: int = -1
    labelmap: np.ndarray | None = None
    image_size: tuple[int, int] = (0, 0)
    crop_box: Box = (0, 0, 0, 0)
    views: tuple[View, ...] = field(default=())


@dataclass
class Block:
    """A decoded block in columns (the fast path of the streaming reader).

    tokens: uint16 (n, h, w) when all grids share a shape, else a list of (h, w) arrays.
    labels: int64 (n,). image_size: int64 (n, 2). crop_box: int64 (n, 4).
    labelmaps: list of uint8 arrays or None per sample. views: per sample, a tuple of View.
    """

    keys: list[str]
    tokens: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    image_size: np.ndarray
    crop_box: np.ndarray
    labelmaps: list[np.ndarray | None]
    views: list[tuple[View, ...]]

    def __len__(self) -> int:
        return len(self.keys)

    def samples(self) -> list[Sample]:
        """The block as a list of ``Sample``."""
        return [
            Sample(
                key=self.keys[i],
                tokens=self.tokens[i],
                label=int(self.labels[i]),
                labelmap=self.labelmaps[i],
                image_size=(int(self.image_size[i, 0]), int(self.image_size[i, 1])),
                crop_box=tuple(int(v) for v in self.crop_box[i]),  # type: ignore[arg-type]
                views=self.views[i],
            )
            for i in range(len(self))
        ]


# ---------------------------------------------------------------------------------------------
# blocks


def pack_block(samples: Sequence[Sample], codec: TokenCodec, labelmap_method: str = "zstd") -> bytes:
    """Encode samples into one block's bytes (deterministic)."""
    if not samples:
        raise ValueError("a block needs at least one sample")
    grids = [list(s.tokens.shape) for s in samples]
    view_grids = [[list(v.tokens.shape) for v in s.views] for s in samples]
    for s in samples:
        if s.tokens.ndim != 2:
            raise ValueError(f"sample {s.key!r}: tokens must be (h, w), got shape {s.tokens.shape}")
    flat = [s.tokens.reshape(-1) for s in samples] + [v.tokens.reshape(-1) for s in samples for v in s.views]
    try:
        token_bytes = codec.encode(np.concatenate(flat))
    except ValueError as err:
        raise ValueError(f"block starting at sample {samples[0].key!r}: {err}") from err
    maps = [encode_labelmap(s.labelmap, labelmap_method) if s.labelmap is not None else b"" for s in samples]
    any_views = any(s.views for s in samples)
    any_maps = any(s.labelmap is not None for s in samples)
    header = {
        "n": len(samples),
        "keys": [s.key for s in samples],
        "grids": grids[0] if all(g == grids[0] for g in grids) else grids,
        "views": [
            [{"grid": g, "box": list(map(int, v.crop_box)), "flip": bool(v.flipped)} for g, v in zip(vg, s.views)]
            for vg, s in zip(view_grids, samples)
        ] if any_views else [],
        "token_bytes": len(token_bytes),
        "labelmap_method": labelmap_method,
        "labelmaps": [
            None if s.labelmap is None else [list(s.labelmap.shape), len(m)] for s, m in zip(samples, maps)
        ] if any_maps else [],
    }
    text = encode_header(header, np.array([int(s.label) for s in samples], dtype=np.int64),
                         np.array([list(map(int, s.image_size)) for s in samples], dtype=np.int64),
                         np.array([list(map(int, s.crop_box)) for s in samples], dtype=np.int64))
    header_bytes = zstandard.ZstdCompressor(level=10).compress(text)
    return b"".join([BLOCK_MAGIC, struct.pack("<I", len(header_bytes)), header_bytes, token_bytes, *maps])


def read_block_header(data: bytes, expect: ShardExpect | None = None,
                      max_samples: int = MAX_BLOCK_SAMPLES) -> BlockHeader:
    """A block's header, checked (``storage.blockheader``); ValueError naming the field at fault."""
    raw, offset, packed = read_header_packed(data, max_samples)
    return parse_header(raw, offset, len(data), expect, max_samples, packed)


def decode_block(data: bytes, codec: TokenCodec, expect: ShardExpect | None = None,
                 max_samples: int = MAX_BLOCK_SAMPLES, header: BlockHeader | None = None,
                 tokens_out: np.ndarray | None = None) -> Block:
    """Decode one block's bytes into columns. Raises ValueError naming the malformed field.

    The header is checked before any payload is decoded (``storage.blockheader``): sizes against
    absolute caps and ``expect`` (the manifest's grid, classes, label-map size), the sample
    count against ``max_samples``; token ids against K by the codec; label-map values against
    ``expect.labelmap_classes``. Memory is bounded by what the checked header declares.
    ``header``: this block's ``read_block_header``, when already read. ``tokens_out``: a uint16
    (>= n, h, w) C-contiguous array; the main grids are decoded into its first n rows and the
    block's ``tokens`` is that view (ValueError if the grids are not all (h, w)).
    """
    header = header or read_block_header(data, expect, max_samples)
    n, grids, offset = header.n, header.grids, header.offset
    token_end = offset + header.token_bytes
    direct = tokens_out is not None and header.uniform and tuple(grids[0]) == tokens_out.shape[1:]
    try:
        if direct:
            ids = codec.decode(data[offset:token_end], header.total_tokens, out=tokens_out[:n].reshape(-1))  # type: ignore[index]
        else:
            ids = codec.decode(data[offset:token_end], header.total_tokens)
    except ValueError as err:
        raise ValueError(f"token payload: {err}") from err
    views: list[tuple[View, ...]]
    if header.uniform:  # one grid shape, no views: no per-sample work
        tokens: np.ndarray | list[np.ndarray] = tokens_out[:n] if direct else ids.reshape(n, *grids[0])  # type: ignore[index]
        if tokens_out is not None and not direct:
            tokens_out[:n] = tokens  # raises ValueError if the grid is not the shard's
            tokens = tokens_out[:n]
        views = [()] * n
    else:
        counts = header.counts
        bounds = np.cumsum([0, *counts])
        main_total = int(bounds[n])
        if len(set(grids)) == 1:
            tokens = ids[:main_total].reshape(n, *grids[0])
        else:
            tokens = [ids[bounds[i] : bounds[i + 1]].reshape(grids[i]) for i in range(n)]
        if tokens_out is not None:
            if isinstance(tokens, list) or tokens.shape[1:] != tokens_out.shape[1:]:
                raise ValueError(f"grids: {sorted(set(grids))} are not the shard's {list(tokens_out.shape[1:])}")
            tokens_out[:n] = tokens
            tokens = tokens_out[:n]
        views = []
        k = n
        for vs in header.views:
            row = []
            for v in vs:
                row.append(View(ids[bounds[k] : bounds[k + 1]].reshape(v.grid), v.box, v.flip))
                k += 1
            views.append(tuple(row))
    labelmaps: list[np.ndarray | None] = [None] * n
    pos = token_end
    top = None if expect is None else expect.labelmap_classes
    for i, meta in enumerate(header.labelmaps if header.has_labelmaps else ()):
        if meta is None:
            continue
        shape, length = meta
        try:
            labelmap = decode_labelmap(data[pos : pos + length], shape, header.labelmap_method)
        except ValueError as err:
            raise ValueError(f"labelmaps[{i}]: {err}") from err
        if top is not None and labelmap.size and int(labelmap.max()) > top:
            raise ValueError(f"labelmaps[{i}]: value {int(labelmap.max())} is over the manifest's {top} classes")
        labelmaps[i] = labelmap
        pos += length
    return Block(
        keys=header.keys,
        tokens=tokens,
        labels=header.labels,
        image_size=header.image_size,
        crop_box=header.crop_box,
        labelmaps=labelmaps,
        views=views,
    )


def unpack_block(block: bytes | dict, codec: TokenCodec) -> list[Sample]:
    """Samples of one block: pass the bytes, or the dict a plain ``webdataset.WebDataset`` yields.

    Example::

        manifest = storage.manifest.read_manifest("s3://bucket/in1k/train/manifest.parquet")
        codec = manifest.codec()
        for item in webdataset.WebDataset(manifest.shard_urls(), shardshuffle=False):
            for sample in unpack_block(item, codec):
                ...
    """
    data = block[BLOCK_EXT] if isinstance(block, dict) else block
    return decode_block(data, codec).samples()


# ---------------------------------------------------------------------------------------------
# tar container


def _tar_member(name: str, payload: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + payload + b"\0" * (-len(payload) % tarfile.BLOCKSIZE)


def encode_shard(index: int, samples: Sequence[Sample], codec: TokenCodec, block_size: int = 256,
                 labelmap_method: str = "zstd") -> bytes:
    """Shard bytes for an ordered list of samples: blocks of ``block_size``, then tar's end marker."""
    return _tar(index, _encode_blocks(samples, codec, block_size, labelmap_method))


def _encode_blocks(samples: Sequence[Sample], codec: TokenCodec, block_size: int, labelmap_method: str) -> list[bytes]:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [pack_block(samples[start : start + block_size], codec, labelmap_method)
            for start in range(0, len(samples), block_size)]


def _tar(index: int, blocks: list[bytes]) -> bytes:
    parts = [_tar_member(f"{index:06d}-{b:05d}.{BLOCK_EXT}", block) for b, block in enumerate(blocks)]
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE))
    return b"".join(parts)


def decode_shard(data: bytes, codec: TokenCodec, url: str = "<bytes>",
                 expect: ShardExpect | None = None) -> list[Block]:
    """All blocks of a shard, decoded. Errors are ShardError naming the shard, member and field.

    With ``expect`` (``Manifest.expect(i)``), the shard must hold exactly ``expect.samples``
    samples in all, each block is checked against the manifest before it is decoded (grid,
    classes, label-map size), and the first and last keys must be the manifest's.
    """
    return _decode_blocks(data, codec, url, expect, joined=False)[0]


def decode_shard_joined(data: bytes, codec: TokenCodec, url: str = "<bytes>",
                        expect: ShardExpect | None = None) -> Block:
    """``decode_shard`` as one Block of all its samples in order, its tokens one uint16 (n, h, w)
    array the codec decodes into (no copy to join blocks). ShardError if the main grids of the
    shard differ in shape."""
    blocks, tokens = _decode_blocks(data, codec, url, expect, joined=True)
    return Block(
        keys=list(chain.from_iterable(b.keys for b in blocks)),
        tokens=tokens,  # type: ignore[arg-type]
        labels=np.concatenate([b.labels for b in blocks]),
        image_size=np.concatenate([b.image_size for b in blocks]),
        crop_box=np.concatenate([b.crop_box for b in blocks]),
        labelmaps=list(chain.from_iterable(b.labelmaps for b in blocks)),
        views=list(chain.from_iterable(b.views for b in blocks)),
    )


def _decode_blocks(data: bytes, codec: TokenCodec, url: str, expect: ShardExpect | None,
                   joined: bool) -> tuple[list[Block], np.ndarray | None]:
    """The blocks, and with ``joined`` the one array holding their tokens. Headers are read first
    (checked, counted against the manifest), then the payloads."""
    headers = []
    left = MAX_BLOCK_SAMPLES if expect is None or expect.samples is None else expect.samples
    counted = expect is not None and expect.samples is not None
    for name, payload in block_bytes(data, url, as_views=True):
        if left == 0:
            raise ShardError(url, f"member {name}: n: more samples than the manifest's {expect.samples}")  # type: ignore[union-attr]
        try:
            header = read_block_header(payload, expect, min(left, MAX_BLOCK_SAMPLES))
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:  # last resort: name the shard
            raise ShardError(url, f"member {name}: {err}") from err
        headers.append((name, payload, header))
        if counted:
            left -= header.n
    if not headers:
        raise ShardError(url, "holds no blocks")
    out = None
    if joined:
        shapes = set().union(*(h.grids for _, _, h in headers))
        if len(shapes) > 1:
            raise ShardError(url, "token grids differ in shape inside one split; the stream needs one grid")
        out = np.empty((sum(h.n for _, _, h in headers), *shapes.pop()), dtype=np.uint16)
    blocks: list[Block] = []
    start = 0
    for name, payload, header in headers:
        try:
            tokens_out = None if out is None else out[start : start + header.n]
            blocks.append(decode_block(payload, codec, expect, header=header, tokens_out=tokens_out))
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:  # last resort: name the shard
            raise ShardError(url, f"member {name}: {err}") from err
        start += header.n
    if expect is not None:
        _check_against_manifest(blocks, expect, url)
    return blocks, out


def _check_against_manifest(blocks: list[Block], expect: ShardExpect, url: str) -> None:
    got = sum(len(b) for b in blocks)
    if expect.samples is not None and got != expect.samples:
        raise ShardError(url, f"samples: holds {got} samples, the manifest says {expect.samples}")
    if not blocks:
        raise ShardError(url, "holds no blocks")
    first, last = blocks[0].keys[0], blocks[-1].keys[-1]
    if expect.first_key is not None and first != expect.first_key:
        raise ShardError(url, f"first_key: {first[:80]!r} is not the manifest's {expect.first_key[:80]!r}")
    if expect.last_key is not None and last != expect.last_key:
        raise ShardError(url, f"last_key: {last[:80]!r} is not the manifest's {expect.last_key[:80]!r}")


# ---------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class ShardInfo:
    """One manifest row. ``url`` is relative to the manifest's directory.

    The shard's block index, when known (shards written by ``ShardWriter``; () / 0 in manifests
    written before): ``block_bytes``, the payload length of each block in order, and
    ``block_samples``, the samples of every block but the last (which holds the rest). Payload b
    starts at ``storage.tarindex.payload_offsets(block_bytes)[b]``, so a reader can fetch any
    block with one range read and no tar header walk (``storage.dataset``)."""

    url: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str
    block_samples: int = 0
    block_bytes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_bytes", tuple(int(b) for b in self.block_bytes))  # from JSON: a list


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (e.g. ``shard-000042.tar``)."""
    return f"shard-{index:06d}.tar"


class ShardWriter:
    """Writes shard ``i`` of a dataset split from its ordered samples, atomically.

    ``out_dir`` is the split's directory URL (path, file:// or s3://); the manifest goes there
    too, written last by ``storage.manifest.write_manifest``. The same samples give the same
    bytes, so a re-run can skip shards whose hash already matches (``is_complete``).
    """

    def __init__(self, out_dir: str, codec: TokenCodec, block_size: int = 256, labelmap_method: str = "zstd",
                 storage_options: dict | None = None):
        self.out_dir = out_dir
        self.codec = codec
        self.block_size = block_size
        self.labelmap_method = labelmap_method
        self.storage_options = storage_options

    def url(self, index: int) -> str:
        """Full URL of shard ``index``."""
        return sio.join(self.out_dir, shard_name(index))

    def write(self, index: int, samples: Sequence[Sample]) -> ShardInfo:
        """Encode and atomically write shard ``index``; returns its manifest row."""
        if not samples:
            raise ValueError(f"shard {index}: no samples")
        blocks = _encode_blocks(samples, self.codec, self.block_size, self.labelmap_method)
        data = _tar(index, blocks)
        sio.write_bytes_atomic(self.url(index), data, self.storage_options)
        return ShardInfo(shard_name(index), len(samples), len(data), hashlib.sha256(data).hexdigest(),
                         samples[0].key, samples[-1].key, min(self.block_size, len(samples)),
                         tuple(len(b) for b in blocks))

    def is_complete(self, info: ShardInfo) -> bool:
        """Whether shard ``info.url`` exists with exactly ``info.sha256`` (for idempotent re-runs)."""
        return shard_is_complete(self.out_dir, info, self.storage_options)


def shard_is_complete(split_dir: str, info: ShardInfo, storage_options: dict | None = None) -> bool:
    """Whether the shard ``info`` describes exists under ``split_dir`` with exactly its sha256."""
    url = sio.join(split_dir, info.url)
    if not sio.exists(url, storage_options):
        return False
    data = sio.read_bytes(url, storage_options, max_bytes=info.bytes + 1)
    return len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
