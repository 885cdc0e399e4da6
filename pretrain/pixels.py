"""Pixel input: batches of decoded JPEGs from an ImageNet-layout folder, for pixel-stem baselines.

The token path reads shards (``storage.stream``); this is the reference it is measured against:
the same trainer, model and recipe fed pixels decoded from the original files (``data.input: pixels``).
A split folder holds one sub-folder per class (``<root>/<wnid>/*.JPEG``, ``pipeline.readers``).

Batches: ``pixels`` float32 (B, 3, R, R) normalised with ImageNet mean/std, ``label`` int64 (B,),
``index`` int64 (B,) (position in the sorted listing), ``pad`` bool (B,) (repeats that even out
ranks), ``epoch`` int, and ``target`` float32 (B, C) when CutMix is on. Training: RandomResizedCrop
of the original image (area ``rrc_scale``, bicubic) + horizontal flip, then CutMix with soft
targets, randomness seeded by (seed, epoch, batch position) so any worker count or a resumed run
makes the same batches. Evaluation: shorter side to R and centre crop (the tokenisation job's view).
Files that cannot be decoded are skipped with a warning naming the file and the reason; those the
listing rejected, or this process met, are in ``skipped`` (DataLoader workers warn from their own process).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.images import resize_center_crop
from pipeline.readers import Reject, load_item
from pretrain.augment import cutmix, one_hot_targets
from pretrain.augment_geometry import random_resized_crop_params
from pretrain.pixel_cache import list_split, open_pixel_cache  # list_split re-exported

__all__ = ["PixelAugment", "PixelFolderStream", "list_split", "MEAN", "STD"]

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics of [0, 1] pixels
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PixelAugment:
    """Training-time pixel augmentation; mirrors the token recipe's keys in the config's ``augment``."""

    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0

    @classmethod
    def from_options(cls, options: dict | None) -> PixelAugment | None:
        """From the config's ``augment`` section (token-only keys are ignored); None when off."""
        if options is None:
            return None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
                      if k in cls.__dataclass_fields__})


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> float32 (B, 3, R, R), ImageNet mean/std: x / (255 std) - mean / std, one
    conversion pass and one in-place multiply-subtract (4x faster than dividing step by step)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x)
    std = torch.tensor(STD)
    return out.mul_((1.0 / (255.0 * std)).view(1, 3, 1, 1)).sub_((torch.tensor(MEAN) / std).view(1, 3, 1, 1))


class PixelFolderStream(IterableDataset):
    """Batches of one split folder for one rank (the ``StreamLoader`` protocol of ``storage.stream``).

    Args:
        root: split folder with class sub-folders.
        resolution: R, output side in px.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        train: random crops/flips/CutMix and a seeded shuffle per epoch; else centre crops in order.
        augment: ``PixelAugment`` (train only; None = plain centre crops even when training).
        num_classes: C of the soft targets (default: classes in the listing).
        seed, rank, world_size: epoch order and this rank's share; every rank gets the same number
            of samples (the listing is padded by repeats flagged ``pad``).
        cache: a ``pretrain.pixel_cache`` directory holding this folder's decoded images (built there with
            ``build_pixel_cache``); crops are then cut from the cached centre squares instead of the files.
        cache_side: the cached images' side in px (default: ``resolution``).
    """

    def __init__(self, root: str | Path, resolution: int, batch_size: int, *, train: bool = True,
                 augment: PixelAugment | None = None, num_classes: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, cache: str | Path | None = None,
                 cache_side: int | None = None):
        super().__init__()
        if resolution < 1 or batch_size < 1:
            raise ValueError(f"resolution and batch_size must be >= 1, got {resolution}, {batch_size}")
        self.root = str(root)
        self.listing = list_split(root)
        self.items = self.listing.items
        self.class_names = tuple(self.listing.class_names)
        self.num_classes = num_classes or len(self.class_names)
        self.resolution = resolution
        self.batch_size = batch_size
        self.train = train
        self.augment = augment if train else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.resume_batches = 0
        self.skipped = {r.path: r.reason for r in self.listing.rejects}  # path -> why it was left out
        self.cache = None
        if cache is not None:
            self.cache = open_pixel_cache(root, self.listing, cache_side or resolution, cache)

    # -- order ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def samples_per_rank(self) -> int:
        return -(-len(self.items) // self.world_size)

    def batches_per_rank(self, num_workers: int = 0) -> int:
        return -(-self.samples_per_rank() // self.batch_size)

    def rank_order(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's listing positions for the epoch, int64 (S,), and their ``pad`` flags bool (S,)."""
        n = len(self.items)
        order = np.arange(n)
        if self.train:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        total = self.samples_per_rank() * self.world_size
        padded = np.concatenate([order, order[: total - n]])
        pad = np.arange(total) >= n
        return padded[self.rank::self.world_size], pad[self.rank::self.world_size]

    def loader_settings(self) -> dict:
        """What a saved stream position is only valid for (checked by ``StreamLoader.load_state_dict``)."""
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "num_samples": len(self.items), "root": self.root, "resolution": self.resolution}

    # -- batches -------------------------------------------------------------------------------

    def _generator(self, b: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank, b]).generate_state(1, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def _view(self, image: Image.Image, box: torch.Tensor | None, flip: bool) -> np.ndarray:
        """uint8 (R, R, 3): the crop ``box`` (normalised x0, y0, x1, y1) resized, or the centre crop."""
        r = self.resolution
        if box is None:
            return resize_center_crop(image, r)[0]
        w, h = image.size
        x0, y0, x1, y1 = (float(v) for v in box)
        out = image.resize((r, r), Image.Resampling.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)

    def _image(self, position: int) -> Image.Image | str:
        """The decoded image of listing ``position`` (from the cache when there is one), or why it has none."""
        if self.cache is not None:
            cached = self.cache.image(position)
            return cached if isinstance(cached, str) else Image.fromarray(cached)
        loaded = load_item(self.items[position])
        return loaded.reason if isinstance(loaded, Reject) else loaded.image

    def make_batch(self, b: int, positions: np.ndarray, pad: np.ndarray) -> dict:
        """Batch number ``b`` of the epoch from listing ``positions`` (see the module docstring)."""
        gen = self._generator(b)
        aug = self.augment
        flips = None if aug is None else (torch.rand(len(positions), generator=gen) < aug.hflip_p)
        pixels, labels, keep = [], [], []
        for i, pos in enumerate(positions):
            item = self.items[int(pos)]
            image = self._image(int(pos))
            if isinstance(image, str):
                self.skipped[item.path] = image
                warnings.warn(f"pixel data: skipped {item.path}: {image}", stacklevel=1)
                continue
            box = None
            if aug is not None:  # area/aspect in the image's own pixels
                box = random_resized_crop_params(1, aug.rrc_scale, aug.rrc_ratio, gen,
                                                 grid_hw=(image.height, image.width))[0]
            pixels.append(self._view(image, box, bool(flips[i]) if flips is not None else False))
            labels.append(item.label)
            keep.append(i)
        if not pixels:
            raise ValueError(f"pixel data {self.root}: no image of batch {b} could be decoded: {self.skipped}")
        batch = {"pixels": _normalise(np.stack(pixels)), "label": torch.tensor(labels, dtype=torch.int64),
                 "index": torch.from_numpy(positions[keep].astype(np.int64)), "pad": torch.from_numpy(pad[keep]),
                 "epoch": self.epoch}
        if aug is not None and aug.cutmix_alpha > 0:
            batch["pixels"], batch["target"] = cutmix(batch["pixels"], batch["label"], self.num_classes,
                                                      aug.cutmix_alpha, gen, aug.label_smoothing)
        elif aug is not None and aug.label_smoothing > 0:
            batch["target"] = one_hot_targets(batch["label"], self.num_classes, aug.label_smoothing)
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, pad = self.rank_order()
        n = self.batches_per_rank()
        # DataLoader takes batches from its workers round-robin: worker w makes batches start + w, + 2w, ...
        for b in range(self.resume_batches + worker, n, workers):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.make_batch(b, order[sl], pad[sl])
