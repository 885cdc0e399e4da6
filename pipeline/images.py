"""Shared image helpers: robust RGB decoding, resize + centre crop, and deterministic file listing.

Only PIL and numpy. Every decoding failure is a ``ValueError`` whose message starts with the file
path, so a tokenisation job can log and skip bad files instead of dying on a PIL-specific error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "list_images",
    "load_resized",
    "load_rgb",
    "resize_center_crop",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".avif"})
# 64 Mpx: far above any dataset photo (ImageNet's largest is ~ 10 Mpx), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
_WHITE = (255, 255, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image. Alpha is composited over white; 16-bit grey is scaled to 8 bit."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit range
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    return img.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, ...


def load_rgb(path: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file into a fully loaded RGB ``PIL.Image`` with EXIF orientation applied.

    - The format is sniffed from the content, not the extension (a PNG named ``.JPEG`` loads).
    - Greyscale, palette, CMYK, 16-bit and alpha modes become RGB (alpha composited over white).
    - ``ImageOps.exif_transpose`` applies the EXIF Orientation tag, so (W, H) may swap.
    - Multi-frame files (animated WebP) yield their first frame.

    ``path`` may also be an open binary file object (named in errors by its ``str``).

    Raises ``FileNotFoundError`` when ``path`` does not exist, and ``ValueError`` naming the file for
    empty, truncated, non-image or undecodable files, and for images with more than ``max_pixels``
    pixels (checked from the header before any pixel is decoded, independent of
    ``PIL.Image.MAX_IMAGE_PIXELS``; PIL's own bomb error, above twice that global, is also mapped to
    ``ValueError``). Truncation detection relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being
    False (PIL's default); this module never changes it.
    """
    opened = path if hasattr(path, "read") else open(Path(path), "rb")  # noqa: SIM115  (closed by the with below)
    path = str(path) if hasattr(path, "read") else Path(path)
    with opened as f:  # FileNotFoundError / PermissionError propagate unchanged
        try:
            img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise ValueError(f"{path}: {w} x {h} = {w * h} pixels exceeds max_pixels={max_pixels}")
            if w == 0 or h == 0:
                raise ValueError(f"{path}: empty image ({w} x {h})")
            img.load()  # decode now, while the file is open; raises on truncated data
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: cannot decode image: {e}") from e
        except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


def resize_center_crop(img: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize the shorter side to ``size`` and centre-crop to ``size x size`` (bicubic, antialiased).

    Implemented as one ``Image.resize`` of the central square crop of side ``min(W, H)`` (PIL's
    ``box=`` argument), which is the same as resizing the shorter side to ``size`` and then cutting
    the centre, up to sub-pixel rounding of the crop position. Up- and down-sampling both use
    PIL's bicubic filter (which widens its support when shrinking, i.e. it antialiases); near the
    border of crop_box the filter reads the adjacent original pixels, as resize-then-crop would.

    img: RGB ``PIL.Image`` (e.g. from ``load_rgb``). Returns ``(pixels, crop_box)`` with pixels
    uint8 (size, size, 3) and crop_box ``(top, left, height, width)`` in ORIGINAL image pixel
    coordinates of the square region that was resized (height == width == min(W, H)).
    """
    if img.mode != "RGB":
        raise ValueError(f"resize_center_crop expects an RGB image, got mode {img.mode!r} (use load_rgb)")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    arr = np.asarray(out, dtype=np.uint8)
    return arr, (top, left, side, side)


def load_resized(paths: Iterable[str | Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``load_rgb`` + ``resize_center_crop`` for many files -> uint8 (N, size, size, 3).

    Raises the ``ValueError`` of the first bad file; callers that want to skip bad files should loop
    over ``load_rgb`` themselves.
    """
    arrays = [resize_center_crop(load_rgb(p, max_pixels), size)[0] for p in paths]
    if not arrays:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    return np.stack(arrays)


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root``, recursively, sorted by their POSIX path relative to ``root``.

    Extensions (case-insensitive): .jpg .jpeg .png .bmp .webp .avif. Hidden files and directories (names
    starting with ".", e.g. macOS ``._x.jpg`` resource forks) are skipped. Symlinked directories are
    not followed. The order depends only on the relative paths, never on the filesystem.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(rel.as_posix())
    return [root / r for r in sorted(found)]
