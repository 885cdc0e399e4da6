"""Small generated datasets in the real folder layouts, for the quickstart and tests (no downloads).

ImageNet: ``<root>/{train,val}/<wnid>/<wnid>_<i>.JPEG``, one drawing style per class (background
colour, shape kind and count), so a classifier can learn them from a few hundred images.
ADE20K: ``<root>/ADEChallengeData2016/images/{training,validation}/ADE_*_%08d.jpg`` with label maps
``annotations/.../*.png`` (uint8: 0 = other, 1..150) and ``objectInfo150.txt``; each scene is a
"wall" (1) with a "floor" (4) band and a few objects whose class sets their colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["generate_imagenet_folder", "generate_imagenet", "generate_ade20k"]

ADE_OBJECTS = (5, 8, 13, 15, 20, 24)  # tree, bed, person, door, car, chair (objectInfo150 indices)


def generate_imagenet_folder(root: Path, classes: int = 10, per_class: int = 24, seed: int = 0,
                             split: str = "train") -> Path:
    """One split of ``classes`` x ``per_class`` drawn JPEGs of various sizes under ``root/split``; returns root."""
    root = Path(root)
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    bases = np.random.default_rng(seed).integers(0, 255, size=(classes, 3))  # the same class colours per split
    for c in range(classes):
        wnid = f"n{c:08d}"
        folder = root / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(180, 320)), int(rng.integers(180, 320))
            colour = tuple(int(v) for v in (bases[c] + rng.integers(-30, 30, 3)).clip(0, 255))
            img = Image.new("RGB", (w, h), colour)
            draw = ImageDraw.Draw(img)
            for _ in range(3 + c % 4):
                x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
                x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
                fill = tuple(int(v) for v in rng.integers(0, 255, 3))
                (draw.ellipse if c % 2 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
            img.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def generate_imagenet(root: Path, classes: int = 10, train_per_class: int = 60, val_per_class: int = 20,
                      seed: int = 0) -> Path:
    """``train/`` and ``val/`` splits (class folders) of ``generate_imagenet_folder``; returns root."""
    generate_imagenet_folder(root, classes, train_per_class, seed, "train")
    return generate_imagenet_folder(root, classes, val_per_class, seed, "val")


def _object_info() -> str:
    rows = ["Idx\tRatio\tTrain\tVal\tName"]
    names = {1: "wall", 4: "floor, flooring", 5: "tree", 8: "bed", 13: "person", 15: "door", 20: "car", 24: "chair"}
    rows += [f"{i}\t0.0\t0\t0\t{names.get(i, f'class{i}')}" for i in range(1, 151)]
    return "\n".join(rows) + "\n"


def _scene(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    w, h = int(rng.integers(200, 320)), int(rng.integers(160, 260))
    palette = {c: tuple(int(v) for v in np.random.default_rng(c).integers(0, 255, 3)) for c in (1, 4, *ADE_OBJECTS)}
    img = Image.new("RGB", (w, h), palette[1])
    lab = Image.new("L", (w, h), 1)
    floor = int(h * rng.uniform(0.55, 0.8))
    for target, value in ((img, palette[4]), (lab, 4)):
        ImageDraw.Draw(target).rectangle((0, floor, w, h), fill=value)
    for _ in range(int(rng.integers(2, 5))):
        c = int(rng.choice(ADE_OBJECTS))
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        box = (x0, y0, x0 + int(rng.integers(25, w // 2)), y0 + int(rng.integers(25, h // 2)))
        ImageDraw.Draw(img).ellipse(box, fill=palette[c])
        ImageDraw.Draw(lab).ellipse(box, fill=c)
    ImageDraw.Draw(lab).rectangle((0, 0, w - 1, h - 1), outline=0, width=2)  # unlabelled border ("other")
    noise = rng.integers(-12, 12, (h, w, 3))
    img = Image.fromarray((np.asarray(img, dtype=np.int64) + noise).clip(0, 255).astype(np.uint8))
    return img, lab


def generate_ade20k(root: Path, train: int = 24, val: int = 8, seed: int = 0) -> Path:
    """An ADEChallengeData2016 folder with ``train`` / ``val`` scenes; returns the ADEChallengeData2016 path."""
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    for split, prefix, n in (("training", "ADE_train", train), ("validation", "ADE_val", val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            img, lab = _scene(rng)
            img.save(base / "images" / split / f"{prefix}_{i:08d}.jpg", quality=90)
            lab.save(base / "annotations" / split / f"{prefix}_{i:08d}.png")
    (base / "objectInfo150.txt").write_text(_object_info())
    return base
