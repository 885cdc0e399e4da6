"""``vqpt quickstart``: the journey so far on a small dataset, on this machine.

Stages: images (``--images DIR``, or a generated ImageNet-layout folder) -> a k-means VQ
tokenizer fitted on them -> token shards + manifest (a local directory, or a local S3 endpoint
with ``--s3``) -> streamed back through the training reader -> a storage and speed report.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.images import list_images, load_rgb, resize_center_crop
from pipeline.tokenizer import KMeansTokenizer
from storage.codec import DEFAULT_CODEC, fit_codec
from storage.manifest import DatasetMeta, write_split
from storage.shard import Sample
from storage.stream import StreamLoader, TokenStream
from vqpt.local_s3 import LocalS3


def generate_imagenet_folder(root: Path, classes: int = 10, per_class: int = 24, seed: int = 0) -> Path:
    """A small ImageNet-layout folder (``train/<wnid>/<wnid>_<i>.JPEG``) of drawn scenes, one style per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        wnid = f"n{c:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=3)
        for i in range(per_class):
            w, h = int(rng.integers(180, 320)), int(rng.integers(180, 320))
            img = Image.new("RGB", (w, h), tuple(int(v) for v in (base + rng.integers(-30, 30, 3)).clip(0, 255)))
            draw = ImageDraw.Draw(img)
            for _ in range(3 + c % 4):
                x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
                x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
                colour = tuple(int(v) for v in rng.integers(0, 255, 3))
                (draw.ellipse if c % 2 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
            img.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@contextlib.contextmanager
def local_s3_bucket() -> Iterator[str]:
    """A local S3 endpoint with a bucket for the quickstart; yields ``s3://vqpt-quickstart``."""
    with LocalS3() as s3:
        yield s3.bucket("vqpt-quickstart")


def run(images: str | None, out: str, use_s3: bool, vocab: int, resolution: int, limit: int | None) -> dict:
    """Run every stage; returns (and prints) the report."""
    started = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        images_root = out_dir / "images"
        shutil.rmtree(images_root, ignore_errors=True)
        print(f"[1/4] no --images given: generating a small ImageNet-layout folder in {images_root}")
        generate_imagenet_folder(images_root)
        images = str(images_root)
    paths = list_images(images)[:limit] if limit else list_images(images)
    if not paths:
        raise SystemExit(f"no images found under {images}")
    class_names = sorted({p.parent.name for p in paths})
    print(f"[1/4] {len(paths)} images in {len(class_names)} classes under {images}")
    arrays, boxes, sizes = [], [], []
    for p in tqdm(paths, desc="decode + resize", unit="img"):
        img = load_rgb(p)
        arr, box = resize_center_crop(img, resolution)
        arrays.append(arr)
        boxes.append(box)
        sizes.append((img.height, img.width))
    pixels = np.stack(arrays)
    print(f"[2/4] fitting a k-means tokenizer (K={vocab}, 8x8 patches) on {len(pixels)} images")
    tokenizer = KMeansTokenizer.fit(pixels, vocab_size=vocab, patch=8, iters=20, seed=0)
    tokens = np.concatenate([tokenizer.encode(pixels[i : i + 128]) for i in range(0, len(pixels), 128)])
    tokenizer.save(out_dir / "tokenizer.pt")
    grid = tuple(tokens.shape[1:])
    samples = [Sample(key=f"{p.parent.name}/{p.stem}", tokens=t, label=class_names.index(p.parent.name),
                      image_size=s, crop_box=b) for p, t, s, b in zip(paths, tokens, sizes, boxes)]
    codec = fit_codec(DEFAULT_CODEC, tokens[: max(1, len(tokens) // 10)].reshape(-1), vocab, grid=grid)
    meta = DatasetMeta(split="train", codec=codec.spec, tokenizer_fingerprint=tokenizer.fingerprint,
                       grid=(grid[0], grid[1]), vocab_size=vocab, resolution=resolution,
                       class_names=tuple(class_names))

    with local_s3_bucket() if use_s3 else contextlib.nullcontext(str(out_dir / "tokens")) as base:
        split_url = f"{base}/train"
        print(f"[3/4] writing shards + manifest to {split_url}")
        manifest = write_split(split_url, samples, meta, shard_size=64, block_size=32, progress=True)
        print(f"[4/4] streaming {split_url} back through the training reader (2 DataLoader workers)")
        loader = StreamLoader(TokenStream(manifest.url, 64, partitions=4, expected_fingerprint=tokenizer.fingerprint),
                              num_workers=2)
        t0 = time.perf_counter()
        seen = [k for batch in loader for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad]
        stream_s = time.perf_counter() - t0
    if sorted(seen) != sorted(s.key for s in samples):
        raise SystemExit("quickstart: the stream did not return every sample exactly once")
    jpeg_bytes = sum(p.stat().st_size for p in paths)
    token_bytes = sum(s.bytes for s in manifest.shards)
    report = {
        "images": len(paths),
        "tokenizer": {"kind": "kmeans", "vocab_size": vocab, "grid": list(grid), "fingerprint": tokenizer.fingerprint},
        "codec": DEFAULT_CODEC,
        "jpeg_bytes": jpeg_bytes,
        "shard_bytes": token_bytes,
        "storage_fraction": token_bytes / jpeg_bytes,
        "bits_per_token": 8 * token_bytes / tokens.size,
        "shards": len(manifest.shards),
        "streamed_samples": len(seen),
        "stream_samples_per_s": len(seen) / stream_s,
        "store": "s3 (local moto server)" if use_s3 else str(out_dir / "tokens"),
        "wall_s": time.perf_counter() - started,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"  images              {report['images']}")
    print(f"  JPEG bytes          {jpeg_bytes:,}")
    print(f"  token shard bytes   {token_bytes:,}  ({100 * report['storage_fraction']:.2f}% of the JPEGs, "
          f"{report['bits_per_token']:.2f} bits/token incl. container)")
    print(f"  streamed back       {len(seen)} samples, every one exactly once "
          f"({report['stream_samples_per_s']:,.0f} samples/s incl. worker start-up)")
    print(f"  report              {out_dir / 'report.json'}   ({report['wall_s']:.0f} s)")
    return report
