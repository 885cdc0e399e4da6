"""Equal-byte pixel baselines: re-encode an image dataset so that its mean bytes/image hits a budget.

The sceptic's question for a token dataset of B bytes/image is "why not store the images in B bytes?".
This module answers it with the best files Pillow can make in B bytes: for each format (JPEG, WebP,
AVIF where Pillow has them) and each side length on a ladder, it finds by bisection the quality whose
mean bytes/image on a probe sample is closest to the budget, and keeps the (side, quality) setting whose
decoded images, scaled back up to the benchmark resolution, are closest to the originals (PSNR). That
setting is then applied to every image, and the dataset's mean checked against the budget (±5 % by
default; the quality is re-bisected on the whole set if the probe was off).

    python bench/equal_bytes.py --src ../shared/data/imagenette/train --out out/eq/train --bytes 1000

Output folders keep the ImageNet layout (``<class>/<stem>.<ext>``), so ``pretrain.finetune`` with
``data.input=pixels`` trains on them as on any split (it decodes and resizes to ``data.resolution``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.images import list_images, load_rgb  # noqa: E402

EXTENSION = {"jpeg": ".jpg", "webp": ".webp", "avif": ".avif"}
SIDES = (8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 224, 256)
QUALITY = (1, 95)  # the range searched (Pillow's scale for all three formats)


def available_formats() -> list[str]:
    """The formats this Pillow can write: jpeg always, webp and avif when built with them."""
    return ["jpeg"] + [f for f in ("webp", "avif") if features.check(f)]


@dataclass(frozen=True)
class Setting:
    """One way to store every image: ``fmt`` at ``quality``, the short side resized to ``side`` px
    (aspect kept). ``bytes_per_image`` and ``psnr`` were measured on the probe sample (PSNR in dB of
    the decoded image scaled back to the benchmark resolution, against the original at that size)."""

    fmt: str
    side: int
    quality: int
    bytes_per_image: float
    psnr: float


def _resize_short(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = side / min(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode(img: Image.Image, fmt: str, side: int, quality: int) -> bytes:
    """RGB PIL image -> the file bytes of ``fmt`` at ``quality`` with the short side at ``side`` px."""
    buf = io.BytesIO()
    small = _resize_short(img, side)
    if fmt == "jpeg":
        small.save(buf, "JPEG", quality=quality, optimize=True, subsampling=2)
    elif fmt == "webp":
        small.save(buf, "WEBP", quality=quality, method=6)
    elif fmt == "avif":
        small.save(buf, "AVIF", quality=quality, speed=6)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(EXTENSION)}")
    return buf.getvalue()


def _square(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre square at ``resolution`` px as float32 (R, R, 3): what the PSNR compares."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box), np.float32)


def _load(paths: list[Path]) -> tuple[list[Path], list[Image.Image], list[dict]]:
    """Decode ``paths`` (``pipeline.images.load_rgb``: real-world quirks, bombs refused) -> (the paths
    that decoded, their RGB images, [{"path", "reason"}] of those that did not)."""
    kept, images, rejects = [], [], []
    for p in paths:
        try:
            images.append(load_rgb(p))
            kept.append(p)
        except (OSError, ValueError) as err:
            rejects.append({"path": str(p), "reason": str(err)})
    return kept, images, rejects


def measure(images: list[Image.Image], fmt: str, side: int, quality: int, resolution: int) -> Setting:
    """Mean bytes and PSNR of one setting over ``images``."""
    sizes, mse = [], []
    for img in images:
        data = encode(img, fmt, side, quality)
        sizes.append(len(data))
        with Image.open(io.BytesIO(data)) as im:
            back = _square(im.convert("RGB"), resolution)
        mse.append(float(np.mean((back - _square(img, resolution)) ** 2)))
    psnr = float(10 * np.log10(255.0**2 / max(np.mean(mse), 1e-6)))
    return Setting(fmt, side, quality, float(np.mean(sizes)), psnr)


def mean_bytes(images: list[Image.Image], fmt: str, side: int, quality: int) -> float:
    return float(np.mean([len(encode(img, fmt, side, quality)) for img in images]))


def bisect_quality(images: list[Image.Image], fmt: str, side: int, target: float) -> int | None:
    """The quality whose mean bytes is closest to ``target`` (bytes grow with quality), or None when
    even quality 1 is over the target by more than 5 % (the format's headers alone may be)."""
    lo, hi = QUALITY
    if mean_bytes(images, fmt, side, lo) > 1.05 * target:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mean_bytes(images, fmt, side, mid) <= target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda q: abs(mean_bytes(images, fmt, side, q) - target))


def best_setting(paths: list[Path], target: float, fmt: str, resolution: int, probe: int = 48,
                 tolerance: float = 0.05, seed: int = 0) -> Setting | None:
    """The highest-PSNR setting of ``fmt`` within ``tolerance`` of ``target`` bytes/image on a seeded
    probe sample of ``paths``; None when the format cannot get that small."""
    rng = np.random.default_rng(seed)
    _, sample, _ = _load([paths[i] for i in sorted(rng.choice(len(paths), min(probe, len(paths)), replace=False))])
    if not sample:
        return None
    best = None
    for side in SIDES:
        if side > resolution:
            break
        q = bisect_quality(sample, fmt, side, target)
        if q is None:
            continue
        s = measure(sample, fmt, side, q, resolution)
        if abs(s.bytes_per_image - target) <= tolerance * target and (best is None or s.psnr > best.psnr):
            best = s
    return best


def write_folder(src: Path, out: Path, setting: Setting, target: float | None = None,
                 tolerance: float = 0.05) -> dict:
    """Re-encode every image under ``src`` (ImageNet layout kept) with ``setting``. With ``target``,
    the quality is re-bisected on the whole set when the probe's quality lands outside ``tolerance``.
    Returns {"images", "bytes", "bytes_per_image", "setting", "rejected": [{"path", "reason"}]} (files that
    do not decode are left out and listed); reused when ``out/equal_bytes.json`` exists."""
    done = out / "equal_bytes.json"
    if done.exists():
        return json.loads(done.read_text())
    paths, images, rejects = _load(list_images(src))
    if not images:
        raise ValueError(f"{src}: no image decodes ({len(rejects)} rejected)")
    quality = setting.quality
    if target is not None and abs(mean_bytes(images, setting.fmt, setting.side, quality) - target) > tolerance * target:
        quality = bisect_quality(images, setting.fmt, setting.side, target) or quality
    total = 0
    for path, img in zip(paths, images):
        dst = out / path.relative_to(src).with_suffix(EXTENSION[setting.fmt])
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = encode(img, setting.fmt, setting.side, quality)
        dst.write_bytes(data)
        total += len(data)
    info = {"images": len(paths), "bytes": total, "bytes_per_image": total / len(paths),
            "setting": {**asdict(setting), "quality": quality}, "rejected": rejects}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="image folder (ImageNet layout or any tree)")
    p.add_argument("--out", type=Path, required=True, help="where the re-encoded tree goes")
    p.add_argument("--bytes", type=float, required=True, help="target mean bytes per image")
    p.add_argument("--format", default="best", help=f"one of {', '.join(EXTENSION)}, or best (highest PSNR)")
    p.add_argument("--resolution", type=int, default=128, help="the benchmark resolution PSNR is judged at")
    args = p.parse_args(argv)
    paths = list_images(args.src)
    if not paths:
        p.error(f"{args.src}: no images")
    formats = available_formats() if args.format == "best" else [args.format]
    found = [s for f in formats if (s := best_setting(paths, args.bytes, f, args.resolution)) is not None]
    if not found:
        print(f"error: no format of {formats} reaches {args.bytes:.0f} bytes/image (±5 %) on {args.src}; "
              "raise --bytes", file=sys.stderr)
        return 1
    best = max(found, key=lambda s: s.psnr)
    print(json.dumps(write_folder(args.src, args.out, best, args.bytes), indent=2))
    return 0


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
