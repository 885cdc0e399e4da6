"""SeiT's storage-budget table: bytes/image and reconstruction PSNR when the codebook is cut to K' codes.

    python -m pipeline.tokenizer.budgets --tokenizer CKPT --images VALDIR --keep 512 256 128 64 [--json OUT]

For each K' the tokenizer keeps its K' most used codes, counted on the ids of the given images
(``VQGANTokenizer.restrict(K', ids=...)``), and the images are re-encoded with the restricted tokenizer
(nearest kept code). Reported per K':

* ``bytes_default``: ``len(codec.encode(ids)) / N`` with the project's default codec
  (``fit_codec(DEFAULT_CODEC, None, K', grid=tokenizer.grid)``), all N images' ids encoded as one stream;
* ``bytes_default_each``: the same codec, each image encoded on its own (random-access records);
* ``bytes_bitpack``: ``ceil(log2 K')`` bits per token (``bitpack``), one stream / N;
* ``entropy_bits``: empirical order-0 entropy of the ids, bits per token;
* ``psnr``: dB of decode(encode(x)) vs x pooled over all images; ``codes_used``; ``perplexity``.

Tokenizers without ``restrict`` (e.g. k-means) get a simple stand-in: each full id is mapped to the
nearest kept codebook row (l2) and decoded with the full tokenizer. For a k-means tokenizer that is
"nearest kept centroid to the nearest centroid", a close approximation of re-assigning the patches.
K' >= K rows use the tokenizer unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.images import list_images, load_resized
from pipeline.tokenizer.base import Tokenizer, codebook_perplexity, load_tokenizer, psnr
from storage.codec import DEFAULT_CODEC, fit_codec, order0_entropy_bits

__all__ = ["budget_row", "budget_table", "format_table", "restricted_codes"]


def restricted_codes(tok: Tokenizer, images: np.ndarray, full_ids: np.ndarray,
                     keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode + decode ``images`` uint8 (N, R, R, 3) with the codebook cut to the ``keep`` most used codes.

    full_ids: int64 (N, h, w) ids of ``tok`` on the same images (usage counts). Returns
    (ids int64 (N, h, w) in [0, keep), reconstructions uint8 (N, R, R, 3)).
    """
    k = tok.vocab_size
    if keep >= k:
        return full_ids, tok.decode(full_ids)
    if hasattr(tok, "restrict"):
        small = tok.restrict(keep, ids=full_ids)
        ids = small.encode(images)
        return ids, small.decode(ids)
    counts = torch.bincount(torch.as_tensor(full_ids).reshape(-1), minlength=k).to(torch.float64)
    kept = torch.sort(-counts, stable=True).indices[:keep]  # most used first, ties: lower id
    cb = tok.codebook
    lut = torch.cdist(cb, cb[kept]).argmin(1)  # full id -> restricted id (nearest kept row)
    lut[kept] = torch.arange(keep)
    ids = lut[torch.as_tensor(full_ids)].numpy()
    return ids, tok.decode(kept[torch.as_tensor(ids)].numpy())


def budget_row(tok: Tokenizer, images: np.ndarray, full_ids: np.ndarray, keep: int) -> dict[str, Any]:
    """One table row for K' = ``keep`` (see the module docstring for the fields)."""
    ids, rec = restricted_codes(tok, images, full_ids, keep)
    k_eff = min(keep, tok.vocab_size)
    n = images.shape[0]
    default = fit_codec(DEFAULT_CODEC, None, k_eff, grid=tok.grid)
    bitpack = fit_codec("bitpack", None, k_eff)
    return {
        "keep": k_eff,
        "bytes_default": len(default.encode(ids)) / n,
        "bytes_default_each": sum(len(default.encode(ids[i])) for i in range(n)) / n,
        "bytes_bitpack": len(bitpack.encode(ids)) / n,
        "entropy_bits": order0_entropy_bits(ids, k_eff),
        "psnr": psnr(rec, images),
        "codes_used": int(np.unique(ids).size),
        "perplexity": codebook_perplexity(ids, k_eff),
    }


def budget_table(tok: Tokenizer, images: np.ndarray, keeps: list[int]) -> dict[str, Any]:
    """The full table: ``{"codec", "grid", "vocab_size", "images", "rows": [budget_row per K' (descending)]}``."""
    full_ids = tok.encode(images)
    rows = [budget_row(tok, images, full_ids, k) for k in sorted(set(keeps), reverse=True)]
    return {"codec": DEFAULT_CODEC, "grid": list(tok.grid), "vocab_size": tok.vocab_size,
            "tokens_per_image": int(np.prod(tok.grid)), "images": int(images.shape[0]), "rows": rows}


def format_table(table: dict[str, Any]) -> str:
    """Plain-text rendering of ``budget_table``'s result."""
    head = (f"{'K':>6} {table['codec'] + ' B/img':>14} {'(per image)':>12} {'bitpack B/img':>14} "
            f"{'H0 bits':>8} {'PSNR dB':>8} {'used':>6} {'ppl':>7}")
    lines = [head]
    for r in table["rows"]:
        lines.append(f"{r['keep']:>6} {r['bytes_default']:>14.1f} {r['bytes_default_each']:>12.1f} "
                     f"{r['bytes_bitpack']:>14.1f} {r['entropy_bits']:>8.3f} {r['psnr']:>8.2f} "
                     f"{r['codes_used']:>6} {r['perplexity']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tokenizer.budgets", description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="checkpoint (load_tokenizer)")
    ap.add_argument("--images", required=True, help="image folder the usage counts, bytes and PSNR come from")
    ap.add_argument("--keep", type=int, nargs="+", required=True, help="codebook sizes K' to keep")
    ap.add_argument("--json", help="write the table as JSON here")
    a = ap.parse_args(argv)
    if min(a.keep) < 1:
        ap.error("--keep values must be >= 1")
    tok = load_tokenizer(a.tokenizer)
    paths = list_images(a.images)
    if not paths:
        ap.error(f"{a.images}: no images")
    images = load_resized(paths, tok.resolution)
    table = budget_table(tok, images, a.keep)
    table["tokenizer"] = str(a.tokenizer)
    print(format_table(table), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
