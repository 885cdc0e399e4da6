"""Decoded pixels cached once per split folder and side: a uint8 memmap the pixel stream reads instead of JPEGs.

    python -m pretrain.pixel_cache --src ../shared/data/imagenette_full/train --side 256 --cache out/pixel_cache

Decoding a JPEG costs more than the rest of a pixel training step's data path on these CPUs, and a
pixel arm decodes every image once per epoch. The cache holds each image of a split folder (the
``pretrain.pixels`` listing, in its order) as ``resize_center_crop(image, side)``: the shorter side
resized to ``side`` and the centre square kept, the view the tokenisation job encodes. A training
stream given the cache (``data.pixel_cache``) cuts its random resized crops from that square instead
of from the original file, so a pixel arm sees the same source region as the tokens.

Files, in ``cache``: ``<name>.u8`` (uint8 (N, side, side, 3), C order) and ``<name>.json`` (count,
side, the listing's keys, and the positions that could not be decoded with their reasons), where
``<name>`` = ``<folder name>_<side>_<hash>`` and the hash covers the listing's keys, sizes and
modification times: a changed folder gets a new cache. Both are written to temporary names and
renamed, the index last, so a reader never sees half a cache; two processes that build the same cache
at once both finish and one of the identical results wins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.images import resize_center_crop
from pipeline.readers import Listing, Reject, list_imagenet, load_item

__all__ = ["PixelCache", "build_pixel_cache", "open_pixel_cache", "cache_name", "list_split"]


def list_split(root: str | Path) -> Listing:
    """The labelled images of an ImageNet-layout split folder (class sub-folders), sorted by key."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"pixel data: {root} is not a directory (expected <split>/<class>/<image>)")
    listing = list_imagenet(root.parent, root.name)
    if not listing.items:
        raise ValueError(f"pixel data: no labelled images under {root} (expected <split>/<class>/<image>)")
    return listing


def cache_name(root: str | Path, listing: Listing, side: int) -> str:
    """``<folder>_<side>_<12 hex>``: the hash of the listing's keys, file sizes and mtimes (ns)."""
    h = hashlib.sha256()
    for item in listing.items:
        st = os.stat(item.path)
        h.update(f"{item.key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{Path(root).name}_{side}_{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class PixelCache:
    """An opened cache: ``images`` uint8 (N, side, side, 3) memmap in listing order, ``bad`` {position: reason}."""

    path: Path
    side: int
    images: np.ndarray
    bad: dict[int, str]

    def image(self, position: int) -> np.ndarray | str:
        """uint8 (side, side, 3) of listing ``position``, or the reason it could not be decoded."""
        return self.bad.get(position) or self.images[position]


def _paths(cache: str | Path, name: str) -> tuple[Path, Path]:
    return Path(cache) / f"{name}.u8", Path(cache) / f"{name}.json"


def open_pixel_cache(root: str | Path, listing: Listing, side: int, cache: str | Path) -> PixelCache:
    """The cache of ``listing`` (of split folder ``root``) at ``side`` px in directory ``cache``.

    FileNotFoundError (one line, with the command that builds it) when it was not built."""
    data, index = _paths(cache, cache_name(root, listing, side))
    if not index.is_file():
        raise FileNotFoundError(f"no pixel cache of {root} at {side} px in {cache} (expected {index.name}); build it "
                                f"with: python -m pretrain.pixel_cache --src {root} --side {side} --cache {cache}")
    meta = json.loads(index.read_text())
    n = len(listing.items)
    if meta.get("count") != n or meta.get("side") != side or meta.get("keys") != [i.key for i in listing.items]:
        raise ValueError(f"pixel cache {index} does not describe the {n} images of {root} at {side} px; delete it "
                         "and build it again")
    images = np.memmap(data, dtype=np.uint8, mode="r", shape=(n, side, side, 3))
    return PixelCache(data, side, images, {int(k): v for k, v in meta["bad"].items()})


def build_pixel_cache(root: str | Path, listing: Listing, side: int, cache: str | Path) -> PixelCache:
    """Decode every image of ``listing`` once into the cache (reused when it exists); returns it opened."""
    if side < 1:
        raise ValueError(f"pixel cache side must be >= 1, got {side}")
    name = cache_name(root, listing, side)
    data, index = _paths(cache, name)
    if not index.is_file():
        Path(cache).mkdir(parents=True, exist_ok=True)
        tmp_data = data.with_name(f"{data.name}.{os.getpid()}.tmp")
        n = len(listing.items)
        images = np.memmap(tmp_data, dtype=np.uint8, mode="w+", shape=(n, side, side, 3))
        bad: dict[int, str] = {}
        for pos, item in enumerate(listing.items):
            loaded = load_item(item)
            if isinstance(loaded, Reject):
                bad[pos] = loaded.reason
                continue
            images[pos] = resize_center_crop(loaded.image, side)[0]
        images.flush()
        del images
        tmp_data.replace(data)
        tmp_index = index.with_name(f"{index.name}.{os.getpid()}.tmp")
        tmp_index.write_text(json.dumps({"count": n, "side": side, "keys": [i.key for i in listing.items],
                                         "bad": {str(k): v for k, v in bad.items()}}) + "\n")
        tmp_index.replace(index)
    return open_pixel_cache(root, listing, side, cache)


def main(argv: list[str] | None = None) -> int:
    from storage.cli import run_cli

    p = argparse.ArgumentParser(prog="python -m pretrain.pixel_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="ImageNet-layout split folder (class sub-folders)")
    p.add_argument("--side", type=int, required=True, help="cached image side in px")
    p.add_argument("--cache", required=True, help="cache directory")

    def body(a: list[str]) -> int:
        args = p.parse_args(a)
        cache = build_pixel_cache(args.src, list_split(args.src), args.side, args.cache)
        print(f"{cache.path} ({len(cache.images)} images, {len(cache.bad)} not decodable)")
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    sys.exit(main())
