"""From decoded shards to the stream's batches: columns gathered per chunk, cut into batches.

The stream (``storage.stream``) decodes the shards a chunk of its epoch order needs
(``ShardColumns``: one array per field for a whole shard), gathers the chunk's samples from them
as columns (``gather``: a few numpy calls per shard, keys / label maps / views as object
arrays), and ``batches`` cuts those into batches of ``size`` (a batch may span two chunks). A
chunk's token grids are not copied when it is gathered: ``LazyTokens`` remembers (shard, row)
per sample, and a batch's tokens are gathered straight from the shards into one int64 array,
the batch's own, when it is emitted: one copy per token instead of three (join, gather, widen).

Columns (a dict with ``n``): tokens (n, h, w); label, source, index int64 (n,); pad bool (n,);
image_size int64 (n, 2); crop_box int64 (n, 4); key object (n,); labelmap / views object (n,),
or None when no sample of the chunk has one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import is_not

import numpy as np
import torch
from torch.utils.data._utils.collate import default_convert

from storage.order import Chunk
from storage.shard import Block

Batch = dict


_SETTLED = False


def settle_allocator() -> None:
    """Once per process (on Linux): allocate and free one 30 MiB array, so that glibc raises its dynamic
    mmap threshold to that size (and its trim threshold to twice it), as it would after the first such
    free anyway. Without it, a process whose threshold is still low maps every multi-MB shard array and
    batch afresh and page-faults it in: 14 % of the stream's CPU on one core (stream_vs_decode_limit
    0.73-0.76 against 0.85-0.87 measured back to back, bench/storage.py's decode_limit). A process
    may then keep up to 60 MiB of freed heap. No effect where MALLOC_MMAP_THRESHOLD_ is set (glibc then
    keeps the user's threshold) or with another allocator."""
    global _SETTLED
    if not _SETTLED and sys.platform.startswith("linux"):
        _SETTLED = True
        scratch = np.empty(30 << 20, dtype=np.uint8)  # mapped, never touched: costs microseconds
        del scratch


@dataclass(frozen=True)
class ShardColumns:
    """A decoded shard as the stream gathers from it: tokens uint16 (n, h, w), labels int64 (n,),
    image_size int64 (n, 2), crop_box int64 (n, 4), keys object (n,) of str; labelmaps / views
    object (n,) (a uint8 map / a tuple of View, None where a sample has none), or None when no
    sample of the shard has any."""

    tokens: np.ndarray
    labels: np.ndarray
    image_size: np.ndarray
    crop_box: np.ndarray
    keys: np.ndarray
    labelmaps: np.ndarray | None
    views: np.ndarray | None

    @classmethod
    def of(cls, shard: Block) -> ShardColumns:
        """A whole shard's samples (``storage.shard.decode_shard_joined``) as columns."""
        n = len(shard)
        return cls(shard.tokens, shard.labels, shard.image_size, shard.crop_box,  # type: ignore[arg-type]
                   keys=np.array(shard.keys, dtype=object),
                   labelmaps=_objects(shard.labelmaps, n, None), views=_objects(shard.views, n, ()))


def _objects(values: list, n: int, empty: object) -> np.ndarray | None:
    """``values`` (label maps, or tuples of views; ``empty`` (None / ()) where a sample has none) as
    an object array of length ``n`` holding None there; None when no sample has one."""
    if (values.count(()) == n) if empty == () else not any(map(is_not, values, repeat(None))):  # C-level scans
        return None
    out = np.full(n, None, dtype=object)
    for i, v in enumerate(values):
        if v is not None and len(v):
            out[i] = v
    return out


@dataclass(frozen=True)
class LazyTokens:
    """The token grids of n samples, not yet copied: sample i is row ``rows[i]`` of
    ``sources[shards[i]]`` (uint16 (rows, h, w) arrays of decoded shards)."""

    sources: dict[int, np.ndarray]
    shards: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, where: slice) -> LazyTokens:
        return LazyTokens(self.sources, self.shards[where], self.rows[where])

    def gather(self, dtype: type = np.int64) -> np.ndarray:
        """The grids as one (n, h, w) array of ``dtype``."""
        first = next(iter(self.sources.values()))
        out = np.empty((len(self.rows), *first.shape[1:]), dtype=dtype)
        present = list(self.sources) if len(self.sources) == 1 else np.unique(self.shards).tolist()
        if len(present) == 1:
            out[...] = self.sources[present[0]][self.rows]
            return out
        for s in present:
            where = np.flatnonzero(self.shards == s)
            out[where] = self.sources[s][self.rows[where]]
        return out


def gather(chunk: Chunk, decoded: dict[int, ShardColumns | None], source_of_shard: np.ndarray) -> dict:
    """Columns of the chunk's samples, in chunk order (skipped shards' samples removed); tokens
    as ``LazyTokens``."""
    skipped = [s for s, c in decoded.items() if c is None]
    if skipped:
        keep = ~np.isin(chunk.shards, skipped)
        chunk = Chunk(chunk.positions[keep], chunk.shards[keep], chunk.rows[keep], chunk.pad[keep])
    n = len(chunk.positions)
    if n == 0:
        return {"n": 0}
    labels = np.empty(n, dtype=np.int64)
    image_size = np.empty((n, 2), dtype=np.int64)
    crop_box = np.empty((n, 4), dtype=np.int64)
    keys = np.empty(n, dtype=object)
    labelmaps = views = None
    for s, shard in decoded.items():
        if shard is None:
            continue
        where = np.flatnonzero(chunk.shards == s)
        if not len(where):
            continue
        rows = chunk.rows[where]
        labels[where] = shard.labels[rows]
        image_size[where] = shard.image_size[rows]
        crop_box[where] = shard.crop_box[rows]
        keys[where] = shard.keys[rows]
        if shard.labelmaps is not None:
            labelmaps = np.full(n, None, dtype=object) if labelmaps is None else labelmaps
            labelmaps[where] = shard.labelmaps[rows]
        if shard.views is not None:
            views = np.full(n, None, dtype=object) if views is None else views
            views[where] = shard.views[rows]
    tokens = LazyTokens({s: c.tokens for s, c in decoded.items() if c is not None}, chunk.shards, chunk.rows)
    return {"n": n, "tokens": tokens, "label": labels, "source": source_of_shard[chunk.shards],
            "index": chunk.positions, "pad": chunk.pad,
            "image_size": image_size, "crop_box": crop_box, "key": keys, "labelmap": labelmaps, "views": views}


def materialise(cols: dict, dtype: type = np.int64) -> dict:
    """``cols`` with its tokens copied out of the shards (as ``dtype``)."""
    tokens = cols["tokens"]
    return cols | {"tokens": tokens.gather(dtype)} if isinstance(tokens, LazyTokens) else cols


def cut(cols: dict, lo: int, hi: int) -> dict:
    """Samples ``lo:hi`` of ``cols`` (views of its arrays)."""
    return {k: (v if k == "n" or v is None else v[lo:hi]) for k, v in cols.items()} | {"n": hi - lo}


def join(parts: list[dict]) -> dict:
    """Columns one after another (tokens copied out of the shards first)."""
    if len(parts) == 1:
        return parts[0]
    parts = [materialise(p) for p in parts]
    out = {"n": sum(p["n"] for p in parts)}
    for k in parts[0]:
        if k == "n":
            continue
        vals = [p[k] for p in parts]
        if all(v is None for v in vals):
            out[k] = None
            continue
        vals = [np.full(p["n"], None, dtype=object) if v is None else v for v, p in zip(vals, parts)]
        out[k] = np.concatenate(vals) if isinstance(vals[0], np.ndarray) else [x for v in vals for x in v]
    return out


def batches(chunks: Iterator[dict], size: int) -> Iterator[dict]:
    """Columns of exactly ``size`` samples (the last may be short) from chunks' columns, tokens
    materialised; a batch spanning two chunks is joined from the first's tail and the second's head
    (the tail is copied out of its shards before the next chunk is read, so its shards can go)."""
    carry: dict | None = None
    for cols in chunks:
        n, lo = cols["n"], 0
        if carry is not None:
            lo = min(size - carry["n"], n)
            carry = join([carry, cut(cols, 0, lo)])
            if carry["n"] < size:
                continue
            yield carry
            carry = None
        while n - lo >= size:
            yield materialise(cut(cols, lo, lo + size))
            lo += size
        if lo < n:
            carry = materialise(cut(cols, lo, n))
    if carry is not None:
        yield carry


def to_batch(cols: dict, epoch: int) -> Batch:
    """The batch dict of the stream (see ``storage.stream``) from materialised columns."""
    keys, tokens = cols["key"], cols["tokens"]
    batch: Batch = {
        "tokens": torch.from_numpy(tokens if tokens.dtype == np.int64 else tokens.astype(np.int64)),
        "label": torch.from_numpy(cols["label"]),
        "source": torch.from_numpy(cols["source"]),
        "index": torch.from_numpy(cols["index"]),
        "pad": torch.from_numpy(cols["pad"]),
        "image_size": torch.from_numpy(cols["image_size"]),
        "crop_box": torch.from_numpy(cols["crop_box"]),
        "key": keys.tolist() if isinstance(keys, np.ndarray) else list(keys),
        "epoch": epoch,
    }
    maps = cols["labelmap"]
    if maps is not None and any(m is not None for m in maps):
        batch["labelmap"] = _stack_or_list([m if m is not None else np.zeros((0, 0), np.uint8) for m in maps])
    views = [v or () for v in cols["views"]] if cols["views"] is not None else []
    if views and len({len(v) for v in views}) == 1 and len(views[0]) > 0:
        batch["view_tokens"] = _stack_or_list([np.stack([v.tokens for v in vs]).astype(np.int64) for vs in views])
        batch["view_box"] = torch.tensor([[list(v.crop_box) for v in vs] for vs in views], dtype=torch.int64)
        batch["view_flip"] = torch.tensor([[v.flipped for v in vs] for vs in views], dtype=torch.bool)
    return batch


def _stack_or_list(items: list[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    if len({a.shape for a in items}) == 1:
        return torch.from_numpy(np.stack(items))
    return [torch.from_numpy(a) for a in items]


def sample_dicts(cols: dict) -> Iterator[dict]:
    """One dict of numpy values per sample (tokens in the shards' dtype, uint16)."""
    cols = materialise(cols, np.uint16)
    names = [k for k in cols if k != "n"]
    for i in range(cols["n"]):
        sample = {k: None if cols[k] is None else cols[k][i] for k in names}
        sample["views"] = sample["views"] or ()
        yield sample


def collate_samples(samples: list[dict]) -> dict:
    """Columns of sample dicts (what ``sample_dicts`` yields, after a sample transform)."""
    cols = {"n": len(samples)}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        numeric = isinstance(vals[0], np.ndarray | np.generic) and k not in ("labelmap",)
        cols[k] = np.stack(vals) if numeric else vals
    return cols


def convert(data):
    """The DataLoader's per-item conversion: what ``default_convert`` gives, without walking the
    tensors and key lists of a batch the stream made (that walk cost ~0.3 ms per batch of 256)."""
    if type(data) is dict:
        return {k: v if isinstance(v, _CONVERTED) or (type(v) is list and all(type(x) is str for x in v))
                else default_convert(v) for k, v in data.items()}
    return default_convert(data)


_CONVERTED = (torch.Tensor, str, int, float, bool, type(None))
SampleTransform = Callable[[dict], dict]
