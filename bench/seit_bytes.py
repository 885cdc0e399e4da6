"""Bytes per image: SeiT's released format against our shards, on the same tokens.

    python bench/seit_bytes.py --images ../shared/data/imagenette/val --json docs/seit_bytes.json

Two token sets, each written in SeiT's exact layout (``pipeline.seit.write_seit_set``: escape bytes +
gzip, gzip'd offsets, label text) and then imported with ``import_seit`` under each codec:

- ``random``: 1,000 images of uniformly random ids over K = 391 (SeiT's codebook size), the acceptance
  set. Random ids have no structure, so neither format can do better than ~log2(391) = 8.6 bits a token.
- ``kmeans``: the real images of ``--images`` (center crop, 256 px) tokenised by our k-means tokenizer
  with K = 391 codes of 8x8 px: a 32x32 grid as SeiT's, and tokens with real spatial structure
  (SeiT's own ViT-VQGAN tokens are not available here).

SeiT's bytes are its token file + index + labels; ours are the shards (manifest and tokenizer entry
are per split, not per image, and listed apart).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import write_json  # noqa: E402
from pipeline.images import list_images, load_resized  # noqa: E402
from pipeline.seit import SeitImport, import_seit, write_seit_set  # noqa: E402
from pipeline.tokenizer import KMeansTokenizer  # noqa: E402

K, CODECS = 391, ("seit", "zstd2d", "rans", "zstd")


def kmeans_tokens(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 (N, 32, 32), labels int64 (N,)) of the images under ``root`` (class = first folder)."""
    paths = list_images(root)
    classes = sorted({p.relative_to(root).parts[0] for p in paths})
    labels = np.asarray([classes.index(p.relative_to(root).parts[0]) for p in paths])
    pixels = load_resized(paths, 256)
    tok = KMeansTokenizer.fit(pixels, vocab_size=K, patch=8, iters=20, seed=0)
    return np.concatenate([tok.encode(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]), labels


def measure(name: str, tokens: np.ndarray, labels: np.ndarray, work: Path) -> dict:
    rng = np.random.default_rng(0)
    codebook = torch.from_numpy(rng.standard_normal((K, 32)).astype(np.float32))
    p = write_seit_set(work / name, f"{name}-train", tokens, labels, codebook)
    row: dict = {"images": len(tokens)}
    for codec in CODECS:
        r = import_seit(SeitImport(tokens=p["tokens"], labels=p["labels"], codebook=p["codebook"],
                                   out=str(work / f"{name}-{codec}"), codec=codec, shard_size=4096))
        row["seit_files_bytes_per_image"] = r["seit_bytes_per_image"]
        row["seit_token_file_bytes_per_image"] = r["seit_token_bytes_per_image"]
        row[f"ours_{codec}_bytes_per_image"] = r["bytes_per_image"]
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="a folder of class subfolders of images")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        raise FileNotFoundError(f"--images {args.images} is not a directory; pass a folder of class subfolders")
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["random"] = measure("random", rng.integers(0, K, (1000, 32, 32)), rng.integers(0, 1000, 1000),
                                    Path(tmp))
        results["kmeans"] = measure("kmeans", *kmeans_tokens(args.images), Path(tmp))
    for name, row in results.items():
        cells = ", ".join(f"{k.removeprefix('ours_').removesuffix('_bytes_per_image')} {v:.0f}"
                          for k, v in row.items() if k.startswith("ours_"))
        print(f"{name} ({row['images']} images): SeiT files {row['seit_files_bytes_per_image']:.0f} B/image; "
              f"ours: {cells}")
    out = {"K": K, "grid": [32, 32], "images_dir": str(args.images), "results": results}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
