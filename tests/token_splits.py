"""Token splits made in the test process by the tokenisation job's own steps, without Ray (seconds, not tens).

``tokenise_here`` runs what ``pipeline.tokenise.run`` runs around its Ray stage: the job's listing
(``list_source``), tokenizer (``get_tokenizer``: ``--tokenizer``, else ``<out>/tokenizer.pt``, else a k-means
fit), codec, dataset metadata and shard plan, then decodes, resizes (``prepare_chunk``) and encodes every
image and writes the split with ``write_split``. The Ray job itself is tested in test_tokenise.py.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.prepare import prepare_chunk
from pipeline.tokenise import JobConfig, build_codec, dataset_meta, get_tokenizer, list_source, plan
from storage.manifest import write_split
from storage.shard import Sample

__all__ = ["tokenise_here"]


def tokenise_here(src: Path, dataset: str, split: str, out: Path, *, tokenizer: str | None = None,
                  resolution: int = 64, vocab: int = 32, labelmap_resolution: int | None = None,
                  shard_size: int = 16) -> Path:
    """Tokenise ``split`` of ``dataset`` at ``src`` into ``out/split`` (and ``out/tokenizer.pt``); returns the
    split directory. Rejected files fail the call (test data has none)."""
    cfg = JobConfig(dataset=dataset, src=str(src), out=str(out), split=split, tokenizer=tokenizer, vocab=vocab,
                    fit_images=64, resolution=resolution, labelmap_resolution=labelmap_resolution or resolution,
                    shard_size=shard_size, block_size=8)
    listing = list_source(cfg)
    tok, _, how = get_tokenizer(cfg, listing.items)
    meta = dataset_meta(cfg, listing, tok, build_codec(cfg, tok, listing.items), how)
    items = [it for shard in plan(cfg, listing.items) for it in shard]
    chunk = prepare_chunk(items, cfg.prepare_config())
    assert not chunk.rejects and not listing.rejects, (chunk.rejects, listing.rejects)
    ids = tok.encode(chunk.pixels)
    samples = [Sample(key=it.key, tokens=t, label=it.label, labelmap=lm, image_size=size, crop_box=box)
               for it, t, lm, size, box in zip(chunk.items, ids, chunk.labelmaps, chunk.image_size, chunk.crop_box)]
    write_split(cfg.split_dir, samples, meta, shard_size=shard_size, block_size=8)
    return Path(cfg.split_dir)
