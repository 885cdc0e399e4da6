"""The per-shard work of the tokenisation job: tokens of a chunk, writing shard i, its progress record.

Used by both the driver (``pipeline.tokenise``: which shards are finished) and the Ray workers
(``pipeline.tokenise_ray``: writing a shard); neither of those imports the other's module for it.
``cfg`` is any object with ``split_dir`` (the split's URL) and ``block_size`` (images per block),
e.g. ``pipeline.tokenise.JobConfig``.

A progress record (``<split>/_progress/shard-NNNNNN.json``, JSON) holds: index, tokenizer
fingerprint, ``items`` (sha256 of the shard's keys, ``shard_digest``), the shard's ``ShardInfo`` (or
None when every image was rejected) and its rejects. A shard counts as finished only when its
record matches the tokenizer and items and the shard file is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.prepare import PreparedChunk
from pipeline.readers import SourceItem
from pipeline.tokenizer import Tokenizer
from storage import io as sio
from storage.codec import TokenCodec
from storage.shard import Sample, ShardInfo, ShardWriter, View, shard_is_complete, shard_name

log = logging.getLogger("vqpt.tokenise")
MAX_PROGRESS_BYTES = 64 << 20  # a progress record lists its shard's rejects: ~100 bytes each


def encode_chunk(tokenizer: Tokenizer, chunk: PreparedChunk, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a prepared chunk: main (n, h, w) and views (n, V, h, w), int64."""
    def run(pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.empty((0, *tokenizer.grid), np.int64)
        return np.concatenate([tokenizer.encode(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])

    main = run(chunk.pixels)
    n, v = chunk.view_pixels.shape[:2]
    views = run(chunk.view_pixels.reshape(n * v, *chunk.view_pixels.shape[2:])).reshape(n, v, *tokenizer.grid)
    return main, views


def chunk_samples(chunk: PreparedChunk, tokens: np.ndarray, view_tokens: np.ndarray) -> list[Sample]:
    return [
        Sample(key=item.key, tokens=tokens[i], label=item.label, labelmap=chunk.labelmaps[i],
               image_size=chunk.image_size[i], crop_box=chunk.crop_box[i],
               views=tuple(View(view_tokens[i, k], chunk.view_box[i][k], chunk.view_flip[i][k])
                           for k in range(view_tokens.shape[1])))
        for i, item in enumerate(chunk.items)
    ]


def progress_url(cfg: Any, index: int) -> str:
    return sio.join(cfg.split_dir, f"_progress/{shard_name(index)}.json")


def digest_keys(keys: Sequence[str]) -> str:
    """sha256 of keys joined by newlines (``shard_digest`` of items with these keys)."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def shard_digest(items: Sequence[SourceItem]) -> str:
    """sha256 of a shard's item keys, in order: what its progress record must match to be reused."""
    return digest_keys([it.key for it in items])


def write_shard(cfg: Any, codec: TokenCodec, fingerprint: str, index: int,
                parts: Sequence[tuple[PreparedChunk, np.ndarray, np.ndarray]], digest: str = "") -> dict:
    """Write shard ``index`` from its chunks, then its progress record (with the items' ``digest``)."""
    samples = [s for chunk, tok, views in parts for s in chunk_samples(chunk, tok, views)]
    rejects = [asdict(r) for chunk, _, _ in parts for r in chunk.rejects]
    record = {"index": index, "fingerprint": fingerprint, "items": digest, "info": None, "rejects": rejects}
    if samples:
        info = ShardWriter(cfg.split_dir, codec, cfg.block_size).write(index, samples)
        record["info"] = asdict(info)
    sio.write_bytes_atomic(progress_url(cfg, index), json.dumps(record, sort_keys=True).encode())
    return record


def finished_record(cfg: Any, index: int, fingerprint: str, digest: str = "") -> dict | None:
    """The progress record of shard ``index`` if that shard is complete, made by this tokenizer and
    from the same items (``digest``; a changed listing, seed or shard size re-writes it)."""
    url = progress_url(cfg, index)
    if not sio.exists(url):
        return None
    try:
        record = json.loads(sio.read_bytes(url, max_bytes=MAX_PROGRESS_BYTES))
        if record.get("fingerprint") != fingerprint or record.get("items", "") != digest:
            return None
        if record["info"] is None:
            return record
        return record if shard_is_complete(cfg.split_dir, ShardInfo(**record["info"])) else None
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # a damaged record: the shard is re-done
        log.warning("progress record %s is damaged (%s: %s); shard %d will be written again",
                    url, type(err).__name__, err, index)
        print(f"warning: progress record {url} is damaged ({type(err).__name__}); shard {index} will be written "
              "again", file=sys.stderr)
        return None
