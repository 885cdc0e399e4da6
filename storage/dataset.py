"""Map-style random access to one split: ``TokenDataset(url)[i]`` reads one block, not one shard.

Sample ``i`` is the i-th of the split in storage order (shards in manifest order, samples in
shard order), which is what ``TokenStream(url, shuffle=False, partitions=1)`` yields.

How a lookup reads: the manifest's sample counts give the shard and the row in it; the shard's
*block index* (payload offset and length of each tar member) gives the block; that block alone
is read with one byte-range read (a ranged GET on S3) and decoded. The block index is in the
manifest (``ShardInfo.block_bytes`` / ``block_samples``), so every lookup, a shard's first
included, is one range read of one block (about 256 samples' bytes). Manifests written before
the index existed lack it: then a shard's index comes from its tar headers (one 512-byte range
read per block) the first time the shard is touched, and the block size is learnt from the first
full block decoded (the dataset's first lookup may read one extra block). Either way the index
is kept (two ints per block) and decoded blocks are kept in an LRU of ``cache_blocks``.

Range reads cannot be checked against the manifest's sha256 (it covers whole shards): a damaged
block fails to decode with a ShardError naming the shard and block.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict

import numpy as np
from torch.utils.data import Dataset

from storage import io as sio
from storage.errors import ShardError
from storage.manifest import Manifest, read_manifest
from storage.shard import BLOCK_EXT, Block, decode_block
from storage.tarindex import payload_offsets

_TAR_BLOCK = tarfile.BLOCKSIZE


def read_block_index(url: str, shard_bytes: int, storage_options: dict | None = None,
                     retries: int = 8) -> np.ndarray:
    """int64 (k, 2): (payload offset, payload length) of each block of the shard at ``url``,
    from its tar headers (one range read each). Raises ShardError naming the shard."""
    rows = []
    pos = 0
    end = shard_bytes - 2 * _TAR_BLOCK  # tar's end marker
    while pos < end:
        header = sio.read_range(url, pos, pos + _TAR_BLOCK, storage_options, retries)
        if header == bytes(_TAR_BLOCK):
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError as err:
            raise ShardError(url, f"tar header at byte {pos} unreadable: {err}") from err
        if not info.isreg() or not info.name.endswith("." + BLOCK_EXT):
            raise ShardError(url, f"unexpected tar member {info.name!r} at byte {pos} (expected *.{BLOCK_EXT})")
        rows.append((pos + _TAR_BLOCK, info.size))
        pos += _TAR_BLOCK + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
    if not rows or pos > end:
        raise ShardError(url, f"tar headers do not fit its {shard_bytes} bytes (truncated or replaced)")
    return np.asarray(rows, dtype=np.int64)


def sample_dict(block: Block, row: int, index: int) -> dict:
    """One sample as numpy values: tokens int64 (h, w), label, key, index, image_size int64 (2,),
    crop_box int64 (4,); labelmap uint8 (H, W) and view_tokens int64 (V, h', w') / view_box int64
    (V, 4) / view_flip bool (V,) when the sample has them (absent keys collate cleanly)."""
    out = {"tokens": np.asarray(block.tokens[row], dtype=np.int64), "label": int(block.labels[row]),
           "key": block.keys[row], "index": index, "image_size": block.image_size[row],
           "crop_box": block.crop_box[row]}
    if block.labelmaps[row] is not None:
        out["labelmap"] = block.labelmaps[row]
    views = block.views[row]
    if views:
        out["view_tokens"] = np.stack([v.tokens for v in views]).astype(np.int64)
        out["view_box"] = np.asarray([v.crop_box for v in views], dtype=np.int64)
        out["view_flip"] = np.asarray([v.flipped for v in views], dtype=bool)
    return out


class TokenDataset(Dataset):
    """``len(ds)``, ``ds[i]`` (negative ``i`` counts from the end) and ``ds.get(key)`` over one split.

    Args:
        manifest: a manifest URL or split directory (path, file://, s3://, http(s)://) or a Manifest.
        cache_blocks: decoded blocks kept (LRU).
        expected_fingerprint, storage_options, retries: as for ``TokenStream``.

    ``get(key)`` needs a key -> index map: the first call builds it by reading and decoding every
    shard once (keys are not sorted inside shards), then answers from memory.
    """

    def __init__(self, manifest: str | Manifest, *, cache_blocks: int = 8, expected_fingerprint: str | None = None,
                 storage_options: dict | None = None, retries: int = 8):
        if not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest, expected_fingerprint, storage_options)
        self.manifest = manifest
        self.cache_blocks = max(1, cache_blocks)
        self.storage_options = storage_options
        self.retries = retries
        self._starts = np.concatenate([[0], np.cumsum([s.samples for s in manifest.shards])])
        self._codec = manifest.codec()
        self._block_index: dict[int, np.ndarray] = {}
        self._block_size: int | None = None
        self._blocks: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self._keys: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        row = i - int(self._starts[shard])
        block, first = self._find(shard, row)
        return sample_dict(block, row - first, i)

    def get(self, key: str) -> dict:
        """The sample stored under ``key`` (KeyError naming the split if there is none)."""
        if self._keys is None:
            self._keys = {}
            for shard in range(len(self.manifest.shards)):
                for b in range(len(self._index(shard))):
                    block, first = self._block(shard, b, self.manifest.shards[shard].block_samples)
                    start = int(self._starts[shard]) + first
                    self._keys.update((k, start + j) for j, k in enumerate(block.keys))
        if key not in self._keys:
            raise KeyError(f"no sample with key {key!r} in {self.manifest.url}")
        return self[self._keys[key]]

    # -- blocks ------------------------------------------------------------------------------

    def _index(self, shard: int) -> np.ndarray:
        if shard not in self._block_index:
            info = self.manifest.shards[shard]
            if info.block_bytes:  # in the manifest: nothing to read
                self._block_index[shard] = np.stack([payload_offsets(info.block_bytes), info.block_bytes],
                                                    axis=1).astype(np.int64)
            else:
                self._block_index[shard] = read_block_index(self.manifest.shard_url(shard), info.bytes,
                                                            self.storage_options, self.retries)
        return self._block_index[shard]

    def _find(self, shard: int, row: int) -> tuple[Block, int]:
        """The block holding ``row`` of ``shard``, and the row of its first sample."""
        per = self.manifest.shards[shard].block_samples
        if per:  # the manifest's block index
            b = row // per
            block, first = self._block(shard, b, per)
            if not first <= row < first + len(block):
                raise ShardError(self.manifest.shard_url(shard), f"block {b} holds {len(block)} samples, the "
                                 f"manifest's block index says {per} per block")
            return block, first
        blocks = len(self._index(shard))
        if self._block_size is None and blocks > 1:  # guess by position; any block but the last is full
            guess = min(blocks - 1, row * blocks // self.manifest.shards[shard].samples)
            block, first = self._block(shard, guess)
            if first <= row < first + len(block):
                return block, first
            if self._block_size is None:
                self._block(shard, 0)  # learns the block size
        b = min(blocks - 1, row // self._block_size) if blocks > 1 else 0
        block, first = self._block(shard, b)
        if not first <= row < first + len(block):
            raise ShardError(self.manifest.shard_url(shard), f"block {b} does not hold row {row} "
                             f"(blocks of {self._block_size} samples expected)")
        return block, first

    def _block(self, shard: int, b: int, per: int = 0) -> tuple[Block, int]:
        """Decoded block ``b`` of ``shard`` (LRU-cached), and the shard row of its first sample
        (``per``: samples per block, from the manifest; 0: learnt from the blocks)."""
        index = self._index(shard)
        block = self._blocks.get((shard, b))
        if block is None:
            url = self.manifest.shard_url(shard)
            offset, length = (int(v) for v in index[b])
            data = sio.read_range(url, offset, offset + length, self.storage_options, self.retries)
            try:
                block = decode_block(data, self._codec)
            except ValueError as err:
                raise ShardError(url, f"block {b}: {err}") from err
            self._blocks[(shard, b)] = block
            while len(self._blocks) > self.cache_blocks:
                self._blocks.popitem(last=False)
            if b < len(index) - 1:
                self._block_size = len(block)
        self._blocks.move_to_end((shard, b))
        if per:
            return block, b * per
        if b == len(index) - 1:
            return block, self.manifest.shards[shard].samples - len(block)
        return block, b * len(block)
