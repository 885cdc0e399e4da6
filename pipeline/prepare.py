"""Decode and resize: source items -> fixed-size pixel arrays ready for a tokenizer.

This is the CPU stage of the tokenisation job (``pipeline/tokenise.py`` runs it in Ray tasks);
it is a plain function so it can be tested and run without Ray.

Per image: the shorter side is resized to ``resolution`` and the centre square kept
(``crop_box`` = the source region, (top, left, height, width) in source pixels). ADE20K label
maps are cut to the same ``crop_box`` and resized to ``labelmap_resolution`` with
nearest-neighbour (labels are never interpolated). ``views`` extra crops per image are random
resized crops (scale 0.25..1, aspect 3/4..4/3, then a horizontal flip with p = 0.5) drawn from a
generator seeded by (seed, key), so they do not depend on which worker runs the image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, resize_center_crop
from pipeline.readers import LoadedItem, Reject, SourceItem, load_item
from pipeline.sources.fetch import fetch_chunk

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PrepareConfig:
    """resolution: tokenizer input side (px). labelmap_resolution: side of stored label maps (px).
    views: extra random crops per image. seed: for the views. max_pixels: decompression-bomb cap."""

    resolution: int = 256
    labelmap_resolution: int = 256
    views: int = 0
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class PreparedChunk:
    """pixels: uint8 (n, R, R, 3). view_pixels: uint8 (n, V, R, R, 3). Per image: items, image sizes
    (H, W), crop boxes, view boxes and flips, label maps (uint8 (L, L) or None). rejects: files not used."""

    items: list[SourceItem]
    pixels: np.ndarray
    image_size: list[tuple[int, int]]
    crop_box: list[Box]
    labelmaps: list[np.ndarray | None]
    view_pixels: np.ndarray
    view_box: list[list[Box]]
    view_flip: list[list[bool]]
    rejects: list[Reject] = field(default_factory=list)


def _view_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.25, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> Box:
    """A RandomResizedCrop box (top, left, h, w) inside a height x width image."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(img: Image.Image, box: Box, size: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """The ``box`` region of ``img`` resized to size x size, as a uint8 array."""
    top, left, h, w = box
    return np.asarray(img.resize((size, size), resample, box=(left, top, left + w, top + h)), dtype=np.uint8)


def _prepare_one(loaded: LoadedItem, cfg: PrepareConfig):
    img = loaded.image
    pixels, box = resize_center_crop(img, cfg.resolution)
    labelmap = None
    if loaded.labelmap is not None:
        labelmap = crop_resize(Image.fromarray(loaded.labelmap), box, cfg.labelmap_resolution,
                               Image.Resampling.NEAREST)
    rng = _view_rng(cfg.seed, loaded.item.key)
    views, boxes, flips = [], [], []
    for _ in range(cfg.views):
        vbox = random_crop_box(img.height, img.width, rng)
        view = crop_resize(img, vbox, cfg.resolution)
        flip = bool(rng.random() < 0.5)
        views.append(view[:, ::-1] if flip else view)
        boxes.append(vbox)
        flips.append(flip)
    return pixels, (img.height, img.width), box, labelmap, views, boxes, flips


def prepare_chunk(items: Sequence[SourceItem], cfg: PrepareConfig) -> PreparedChunk:
    """Decode, crop and resize ``items``; bad files become rejects (never exceptions)."""
    out = PreparedChunk([], np.empty(0), [], [], [], np.empty(0), [], [])
    pixels, views = [], []
    fetched = fetch_chunk(items) if any(it.span is not None for it in items) else [(None, None)] * len(items)
    for item, got in zip(items, fetched, strict=True):
        loaded = got if isinstance(got, Reject) else load_item(item, cfg.max_pixels, *got)
        if isinstance(loaded, Reject):
            out.rejects.append(loaded)
            continue
        try:
            px, size, box, labelmap, vpx, vbox, vflip = _prepare_one(loaded, cfg)
        except (OSError, ValueError) as err:  # e.g. a truncated file PIL only notices while resizing
            out.rejects.append(Reject(item.path, f"cannot be resized: {err}"))
            continue
        out.items.append(item)
        pixels.append(px)
        out.image_size.append(size)
        out.crop_box.append(box)
        out.labelmaps.append(labelmap)
        views.append(vpx)
        out.view_box.append(vbox)
        out.view_flip.append(vflip)
    r = cfg.resolution
    out.pixels = np.stack(pixels) if pixels else np.empty((0, r, r, 3), np.uint8)
    out.view_pixels = (np.stack([np.stack(v) for v in views]) if cfg.views and views
                       else np.empty((len(pixels), 0, r, r, 3), np.uint8))
    return out
