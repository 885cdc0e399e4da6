"""``vqpt show SPLIT``: what the tokens of a split hold, as a PNG grid of decoded samples (+ a JSON sidecar).

    vqpt show runs/quickstart/store/imagenet/train --n 8 --source runs/quickstart/imagenet --out show.png

1. The split's manifest and tokenizer: ``--tokenizer``, else ``tokenizer.pt`` in the dataset root (where
   the tokenisation job writes it), refused unless its fingerprint is the manifest's.
2. The samples: ``--keys``, else ``--n`` drawn without replacement with ``numpy``'s generator seeded by
   ``--seed`` (random access, ``storage.dataset.TokenDataset``: one block read per sample).
3. Each sample's ids decoded through the tokenizer (an embedding-only tokenizer, SeiT's codebook
   without its ViT-VQGAN, cannot: one line says so and what to add). ADE20K splits: the stored label
   map painted over the image (``vqpt.draw.overlay``: the 150-class palette) and a legend of the classes
   present.
4. ``--source`` (what ``vqpt tokenise --src`` was given: a folder, an archive, a URL): each original is
   found by key through the tokenisation job's own readers (``pipeline.tokenise.list_source``, then
   ``pipeline.prepare.prepare_chunk``: the same decode, crop and resize the tokenizer saw) and drawn
   beside its reconstruction, PSNR (dB, peak 255, over the R x R x 3 pixels) in the caption.

Tiles are the tokenizer's R x R pixels scaled up by a whole factor (nearest) to at least ``MIN_SIDE`` px.
The sidecar (``<out>.json``) lists, per sample: key, storage index, label, class name, the boxes of its
images in the PNG (x0, y0, x1, y1), the classes of its label map, and with ``--source`` ``psnr_db``.
"""

from __future__ import annotations

import bisect
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.tokenizer import Tokenizer, load_tokenizer, psnr
from storage import io as sio
from storage.cli import UserError
from storage.dataset import TokenDataset
from storage.manifest import Manifest, read_manifest
from vqpt import draw

__all__ = ["ShowConfig", "show", "dataset_tokenizer_url", "read_originals", "MIN_SIDE"]

MIN_SIDE = 128


@dataclass(frozen=True)
class ShowConfig:
    """What ``vqpt show`` draws (see the module docstring)."""

    url: str
    out: str = ""  # "" = show_<split>.png in the working directory
    n: int = 8
    keys: tuple[str, ...] = ()
    seed: int = 0
    source: str | None = None
    tokenizer: str | None = None
    cols: int = 0  # 0 = min(samples, 4)
    alpha: float = 0.5  # label-map colour weight

    def __post_init__(self) -> None:
        if self.n < 1 or self.cols < 0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"vqpt show: --n must be >= 1, --cols >= 0 and alpha in [0, 1], got {self.n}, "
                             f"{self.cols}, {self.alpha}")


def dataset_tokenizer_url(manifest: Manifest) -> str:
    """``tokenizer.pt`` in the split's dataset root: where ``vqpt tokenise`` and ``vqpt import-seit`` write it."""
    return sio.join(sio.dirname(manifest.root), "tokenizer.pt")


def _tokenizer(manifest: Manifest, url: str | None) -> tuple[Tokenizer, str]:
    url = url or dataset_tokenizer_url(manifest)
    if not sio.exists(url):
        raise UserError(f"vqpt show: no tokenizer at {url} (the tokenisation job writes tokenizer.pt in the dataset "
                        f"root); pass --tokenizer CKPT, the checkpoint that made the tokens of {manifest.url}")
    return load_tokenizer(url, manifest.meta.tokenizer_fingerprint), url


def decode(tokenizer: Tokenizer, ids: np.ndarray, url: str) -> np.ndarray:
    """ids int64 (N, h, w) -> uint8 (N, R, R, 3); one-line UserError for a tokenizer that cannot decode."""
    from pipeline.tokenizer.codebook_only import CodebookTokenizer

    if isinstance(tokenizer, CodebookTokenizer):
        raise UserError(f"vqpt show: the tokenizer {url} is embedding-only ({tokenizer.source or 'a bare codebook'}: "
                        "SeiT's codebook without its ViT-VQGAN), so it cannot decode tokens to pixels; add the "
                        "decoder: re-run vqpt import-seit with --vitvqgan STATE.pt (SeiT's ViT-VQGAN weights), or "
                        "pass --tokenizer a checkpoint of the tokenizer that made these ids")
    return tokenizer.decode(ids)


def pick(ds: TokenDataset, cfg: ShowConfig) -> list[dict]:
    """The samples to draw: ``cfg.keys`` in order, else ``cfg.n`` storage indices drawn with rng(``cfg.seed``)."""
    if cfg.keys:
        out = []
        for key in cfg.keys:
            try:
                out.append(ds.get(key))
            except KeyError:
                raise UserError(f"vqpt show: no sample with key {key!r} in {ds.manifest.url} (keys look like "
                                f"{ds[0]['key']!r})") from None
        return out
    picked = np.random.default_rng(cfg.seed).choice(len(ds), size=min(cfg.n, len(ds)), replace=False)
    return [ds[int(i)] for i in picked]


def _find(items: Sequence, key: str):
    """The item of a key-sorted listing (a list or ``pipeline.sources`` item table) with ``key``, else None."""
    i = bisect.bisect_left(items, key, key=lambda item: item.key)
    return items[i] if i < len(items) and items[i].key == key else None


def read_originals(manifest: Manifest, source: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """key -> uint8 (R, R, 3): each original of ``keys`` as the tokenizer saw it (the job's reader for the
    manifest's dataset and split, then its decode, centre crop and resize at the manifest's resolution).
    A source index stored beside the split (``source_index.parquet``) is reused when it still matches."""
    from pipeline.prepare import prepare_chunk
    from pipeline.tokenise import JobConfig, list_source

    meta = manifest.meta
    dataset = meta.extra.get("dataset")
    if dataset not in ("imagenet", "ade20k", "folder"):
        raise UserError(f"vqpt show --source: {manifest.url} does not record which reader made it (extra.dataset "
                        f"is {dataset!r}); --source works for splits written by vqpt tokenise")
    with tempfile.TemporaryDirectory(prefix="vqpt-show-") as tmp:
        cfg = JobConfig(dataset=dataset, src=source, out=tmp, split=meta.split, resolution=meta.resolution,
                        labelmap_resolution=int((meta.labelmap or {}).get("resolution") or meta.resolution))
        stored = sio.join(manifest.root, "source_index.parquet")
        if sio.exists(stored):  # the job's index of the same source: no re-indexing of a big archive
            Path(cfg.split_dir).mkdir(parents=True)
            Path(cfg.split_dir, "source_index.parquet").write_bytes(sio.read_bytes(stored))
        listing = list_source(cfg)
        items = [_find(listing.items, k) for k in keys]
        missing = [k for k, item in zip(keys, items) if item is None]
        if missing:
            raise UserError(f"vqpt show --source {source}: {len(missing)} of {len(keys)} keys are not in its "
                            f"{dataset} {meta.split} listing, e.g. {missing[0]!r}; pass what vqpt tokenise --src "
                            "was given for this split")
        chunk = prepare_chunk(items, cfg.prepare_config())
    if chunk.rejects:
        raise UserError(f"vqpt show --source: {chunk.rejects[0].path} cannot be read: {chunk.rejects[0].reason}")
    return {item.key: px for item, px in zip(chunk.items, chunk.pixels)}


def _scaled(image: np.ndarray, factor: int) -> np.ndarray:
    return image if factor == 1 else image.repeat(factor, 0).repeat(factor, 1)


def _class_name(manifest: Manifest, label: int) -> str:
    names = manifest.meta.class_names
    return names[label] if 0 <= label < len(names) else ("unlabelled" if label < 0 else f"class {label}")


def show(cfg: ShowConfig) -> dict:
    """Draw the PNG and its sidecar (see the module docstring); returns the sidecar."""
    manifest = read_manifest(cfg.url)
    tokenizer, tok_url = _tokenizer(manifest, cfg.tokenizer)
    ds = TokenDataset(manifest)
    samples = pick(ds, cfg)
    recon = decode(tokenizer, np.stack([s["tokens"] for s in samples]), tok_url)
    originals = read_originals(manifest, cfg.source, [s["key"] for s in samples]) if cfg.source else None
    names = tuple((manifest.meta.labelmap or {}).get("names") or ())[1:]  # objectInfo150 without "other"
    factor = max(1, math.ceil(MIN_SIDE / recon.shape[1]))
    tiles, records, maps = [], [], []
    for s, image in zip(samples, recon):
        record = {"key": s["key"], "index": int(s["index"]), "label": int(s["label"])}
        caption = [s["key"]]
        lm = s.get("labelmap")
        if lm is not None:
            maps.append(lm)
            present = [name for name, _ in draw.legend_entries([lm], names)]
            record["classes"] = present
            caption.append(f"{len(present)} classes: {', '.join(present)}")
            image = draw.overlay(image, lm, cfg.alpha)
        else:
            record["class"] = _class_name(manifest, record["label"])
            caption.append(f"class {record['class']} ({record['label']})")
        images = [image]
        if originals is not None:
            original = originals[s["key"]]
            value = psnr(original, recon[len(records)])
            record["psnr_db"] = None if math.isinf(value) else value
            caption.append(f"PSNR {value:.2f} dB (original | tokens)")
            images.insert(0, draw.overlay(original, lm, cfg.alpha) if lm is not None else original)
        tiles.append(draw.Tile(tuple(_scaled(im, factor) for im in images), tuple(caption)))
        records.append(record)
    legend = draw.legend_entries(maps, names) if maps else []
    canvas, boxes, legend_rows = draw.grid(tiles, cfg.cols or min(len(tiles), 4), legend)
    out = Path(cfg.out or f"show_{manifest.meta.split}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    for record, tile_boxes in zip(records, boxes):
        record["boxes"] = tile_boxes
    sidecar = {
        "split": manifest.url, "tokenizer": tok_url, "tokenizer_fingerprint": manifest.meta.tokenizer_fingerprint,
        "png": str(out), "size": list(canvas.size), "side": tiles[0].images[0].shape[0], "scale": factor,
        "images_per_tile": ["original", "reconstruction"] if originals is not None else ["reconstruction"],
        "source": cfg.source, "seed": cfg.seed, "samples": records, "legend": [name for name, _ in legend],
        "legend_rows": legend_rows,
    }
    if originals is not None:
        finite = [r["psnr_db"] for r in records if r["psnr_db"] is not None]
        sidecar["psnr_db_mean"] = sum(finite) / len(finite) if finite else None
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar

