"""``vqpt inspect SPLIT --png OUT``: the token-frequency and per-image-bytes histograms of a split.

Read: the split's first ``max_samples`` samples in storage order (all of a smaller split). The
tokenisation job fills shard i with a seeded permutation of the listing, so for its splits these are a
uniform sample of the whole; for splits written in another order they are the first ones.

- **token frequency**: how often each of the K ids occurs, codes sorted from most to least used
  (log scale), with the codes used, the perplexity of the id histogram (2 ** entropy) and the order-0
  entropy in bits per token;
- **bytes per image**: each image's token grid encoded alone with the split's codec, plus its label
  map encoded as stored (ADE20K). Coding one image at a time misses what a block shares (one entropy
  coder run per block in the shards), so the split's real bytes per image (shard bytes / samples,
  container included) is drawn as a line beside the histogram.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from storage.labelmap import encode_labelmap
from storage.manifest import Manifest
from storage.stream import TokenStream

__all__ = ["split_statistics", "plot_statistics"]


def split_statistics(manifest: Manifest, max_samples: int = 10_000) -> dict:
    """Counts per id int64 (K,), bytes per image int64 (n,) and their summaries over up to ``max_samples``."""
    if max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    codec = manifest.codec()
    k = manifest.meta.vocab_size
    method = (manifest.meta.labelmap or {}).get("method", "zstd")
    counts = np.zeros(k, dtype=np.int64)
    sizes: list[int] = []
    stream = TokenStream(manifest, batch_size=256, shuffle=False, partitions=1, rank=0, world_size=1)
    for batch in stream:
        keep = (~batch["pad"]).numpy()
        tokens = batch["tokens"].numpy()[keep]
        maps = batch.get("labelmap")
        maps = None if maps is None else [m for m, kept in zip(maps, keep) if kept]
        for i, grid in enumerate(tokens[: max_samples - len(sizes)]):
            counts += np.bincount(grid.ravel(), minlength=k)
            size = len(codec.encode(grid.ravel()))
            if maps is not None and np.asarray(maps[i]).size:
                size += len(encode_labelmap(np.asarray(maps[i]), method))
            sizes.append(size)
        if len(sizes) >= max_samples:
            break
    p = counts[counts > 0] / max(1, counts.sum())
    entropy = float(-(p * np.log2(p)).sum())
    real = sum(s.bytes for s in manifest.shards) / manifest.num_samples
    return {
        "counts": counts, "bytes": np.asarray(sizes, dtype=np.int64), "samples_read": len(sizes),
        "codes_used": int((counts > 0).sum()), "vocab_size": k,
        "perplexity": 2.0 ** entropy, "entropy_bits_per_token": entropy,
        "bytes_per_image_alone_mean": float(np.mean(sizes)), "bytes_per_image_split": real,
    }


def plot_statistics(stats: dict, title: str, out: str | Path) -> Path:
    """The two histograms side by side as a PNG at ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    counts = np.sort(stats["counts"])[::-1]
    left.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0, color="#3b6ea5")
    left.set_yscale("log")
    left.set_xlabel("code, most to least used")
    left.set_ylabel("occurrences")
    left.set_title(f"token frequency: {stats['codes_used']}/{stats['vocab_size']} codes used, perplexity "
                   f"{stats['perplexity']:.0f}, {stats['entropy_bits_per_token']:.2f} bits/token", fontsize=9)
    sizes = stats["bytes"]
    bins = max(5, min(60, int(math.sqrt(len(sizes))) * 2))
    right.hist(sizes, bins=bins, color="#a5653b")
    right.axvline(stats["bytes_per_image_split"], color="k", linestyle="--",
                  label=f"split: {stats['bytes_per_image_split']:.0f} B/image (shards)")
    right.set_xlabel("bytes per image, coded alone")
    right.set_ylabel("images")
    right.set_title(f"bytes per image: mean {stats['bytes_per_image_alone_mean']:.0f} B over "
                    f"{stats['samples_read']} images", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
