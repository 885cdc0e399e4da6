"""``vqpt quickstart``: the journey so far on a small dataset, on this machine.

Stages: images (``--images DIR``, or a generated ImageNet-layout folder) -> the tokenisation job
(``pipeline.tokenise`` on a local Ray instance: a k-means VQ tokenizer fitted on the images, token
shards + manifest in a local directory, or on a local S3 endpoint with ``--s3``) -> streamed back
through the training reader -> a storage and speed report.
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

from pipeline import tokenise
from pipeline.images import list_images
from storage.manifest import read_manifest
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
        print(f"[1/3] no --images given: generating a small ImageNet-layout folder in {images_root}")
        generate_imagenet_folder(images_root)
        images = str(images_root)
    if limit:
        subset = out_dir / "subset"
        shutil.rmtree(subset, ignore_errors=True)
        for p in list_images(images)[:limit]:
            dst = subset / p.relative_to(images)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(p.resolve())
        images = str(subset)
    paths = list_images(images)
    if not paths:
        raise SystemExit(f"no images found under {images}")
    imagenet_layout = (Path(images) / "train").is_dir()
    print(f"[1/3] {len(paths)} images under {images}")
    with local_s3_bucket() if use_s3 else contextlib.nullcontext(str(out_dir / "tokens")) as base:
        print(f"[2/3] tokenisation job (local Ray, k-means tokenizer K={vocab}) -> {base}")
        shutil.rmtree(out_dir / "tokens", ignore_errors=True)
        report = tokenise.run(tokenise.JobConfig(
            dataset="imagenet" if imagenet_layout else "folder", src=images, out=base, split="train",
            vocab=vocab, resolution=resolution, shard_size=64, block_size=32, chunk_size=32))
        manifest = read_manifest(report["manifest"])
        print(f"[3/3] streaming {manifest.root} back through the training reader (2 DataLoader workers)")
        loader = StreamLoader(TokenStream(manifest.url, 64, partitions=4,
                                          expected_fingerprint=report["tokenizer_fingerprint"]), num_workers=2)
        t0 = time.perf_counter()
        seen = [k for batch in loader for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad]
        stream_s = time.perf_counter() - t0
    if len(seen) != len(set(seen)) or len(seen) != manifest.num_samples:
        raise SystemExit("quickstart: the stream did not return every sample exactly once")
    jpeg_bytes = sum(p.stat().st_size for p in paths)
    token_bytes = sum(s.bytes for s in manifest.shards)
    n_tokens = manifest.num_samples * manifest.meta.grid[0] * manifest.meta.grid[1]
    report = {
        "images": len(paths),
        "written": manifest.num_samples,
        "rejected": report["rejected"],
        "tokenizer": {"how": report["tokenizer"], "vocab_size": vocab, "grid": list(manifest.meta.grid),
                      "fingerprint": report["tokenizer_fingerprint"]},
        "codec": manifest.meta.codec.name,
        "jpeg_bytes": jpeg_bytes,
        "shard_bytes": token_bytes,
        "storage_fraction": token_bytes / jpeg_bytes,
        "bits_per_token": 8 * token_bytes / n_tokens,
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
