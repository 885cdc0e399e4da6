"""Shared pieces of the benchmarks: tokens made from real images, and the JPEG baseline pipeline.

Every benchmark measures its baselines in the same run, on the same images and cores, and
prints ratios; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.images import list_images, load_resized
from pipeline.prepare import crop_resize, random_crop_box
from pipeline.tokenizer import KMeansTokenizer, Tokenizer, load_tokenizer


@dataclass
class TokenisedFolder:
    """Images under a folder and their tokens. tokens: int64 (N, h, w); labels: int64 (N,)
    (index of the parent folder name in sorted order); jpeg_bytes: size of each source file."""

    paths: list[Path]
    tokens: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    jpeg_bytes: np.ndarray
    tokenizer: Tokenizer
    fit_s: float
    encode_s: float


def tokenise_folder(root: str | Path, tokenizer_path: str | None = None, resolution: int = 256,
                    vocab_size: int = 512, limit: int | None = None, batch: int = 128) -> TokenisedFolder:
    """Tokenise every image under ``root`` (recursively); fit a k-means tokenizer when none is given."""
    paths = list_images(root)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise SystemExit(f"no images found under {root}")
    class_names = sorted({p.parent.name for p in paths})
    labels = np.array([class_names.index(p.parent.name) for p in paths], dtype=np.int64)
    images = load_resized(paths, resolution)
    t0 = time.perf_counter()
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = KMeansTokenizer.fit(images, vocab_size=vocab_size, patch=8, iters=20, seed=0)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = np.concatenate([tokenizer.encode(images[i : i + batch]) for i in range(0, len(images), batch)])
    encode_s = time.perf_counter() - t0
    jpeg_bytes = np.array([p.stat().st_size for p in paths], dtype=np.int64)
    return TokenisedFolder(paths, tokens, labels, class_names, jpeg_bytes, tokenizer, fit_s, encode_s)


def jpeg_samples(paths: list[Path], seed: int = 0) -> Iterable[torch.Tensor]:
    """The classic pixel pipeline: read file, PIL decode, RandomResizedCrop 224, flip, to float tensor."""
    rng = np.random.default_rng(seed)
    for path in paths:
        with Image.open(path) as im:
            img = im.convert("RGB")
        box = random_crop_box(img.height, img.width, rng, scale=(0.08, 1.0))
        pixels = crop_resize(img, box, 224, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        yield torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)


def rate(run_epoch: Callable[[], int], min_seconds: float = 3.0) -> float:
    """Items per second of ``run_epoch`` (returns items done), repeated for at least ``min_seconds``."""
    run_epoch()  # warm-up: imports, caches, first allocation
    done, t0 = 0, time.perf_counter()
    while True:
        done += run_epoch()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def jpeg_rate(paths: list[Path], batch: int = 64, min_seconds: float = 3.0) -> float:
    """Samples/s of the JPEG pipeline with collation into (B, 3, 224, 224) batches, one process."""

    def epoch() -> int:
        n, buf = 0, []
        for x in jpeg_samples(paths):
            buf.append(x)
            if len(buf) == batch:
                torch.stack(buf)
                n, buf = n + batch, []
        if buf:
            torch.stack(buf)
        return n + len(buf)

    return rate(epoch, min_seconds)


def write_json(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def synthetic_split(root: Path, n: int = 1024, grid: int = 32, vocab: int = 512, classes: int = 10,
                    shard_size: int = 256, seed: int = 0) -> str:
    """A token split (real shard format) whose maps repeat neighbours the way real VQ maps do (runs of
    equal ids); labels ``i % classes``. Returns its manifest URL."""
    from storage.codec import DEFAULT_CODEC, fit_codec
    from storage.manifest import DatasetMeta, manifest_url, write_split
    from storage.shard import Sample

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, vocab, size=(n, grid // 4, grid // 4))
    tokens = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    noise = rng.random(tokens.shape) < 0.3
    tokens = np.where(noise, rng.integers(0, vocab, size=tokens.shape), tokens).astype(np.uint16)
    samples = [Sample(key=f"{i:07d}", tokens=tokens[i], label=int(i % classes)) for i in range(n)]
    spec = fit_codec(DEFAULT_CODEC, None, vocab, grid=(grid, grid)).spec
    meta = DatasetMeta(split="train", codec=spec, tokenizer_fingerprint="synthetic", grid=(grid, grid),
                       vocab_size=vocab, resolution=grid * 8, class_names=tuple(str(c) for c in range(classes)))
    split = root / "train"
    write_split(str(split), samples, meta, shard_size=shard_size)
    return manifest_url(str(split))
