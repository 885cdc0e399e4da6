"""Lossless codecs for segmentation label maps: uint8 (H, W), ADE20K: 0 = other, 1..150.

``zstd`` (default; smaller and faster than PNG on ADE20K, see bench/storage.py) or ``png``.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import zstandard
from PIL import Image

from storage.codec import CodecError

LABELMAP_METHODS: tuple[str, ...] = ("zstd", "png")

_labelmap_local = threading.local()


def _check_method(method: str) -> None:
    if method not in LABELMAP_METHODS:
        raise ValueError(f"unknown label-map method {method!r}; expected one of {LABELMAP_METHODS}")


def encode_labelmap(label: np.ndarray, method: str = "zstd", *, level: int = 19) -> bytes:
    """Losslessly encode a (H, W) uint8 label map (ADE20K: 0 = other, 1..150).

    method ``zstd``: C-order bytes in a zstd frame (``level``, with checksum); ``png``: 8-bit greyscale PNG.
    Integer arrays with values in 0..255 are accepted and stored as uint8.
    """
    _check_method(method)
    arr = np.asarray(label)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"label map must be a 2-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise ValueError(f"label map values must fit uint8, got range [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    if method == "zstd":
        return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(arr.tobytes())
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def decode_labelmap(data: bytes, shape: tuple[int, int], method: str = "zstd") -> np.ndarray:
    """Inverse of :func:`encode_labelmap`: writable uint8 array of ``shape`` (H, W); CodecError if corrupt."""
    _check_method(method)
    h, w = (int(s) for s in shape)
    if method == "zstd":
        dctx = getattr(_labelmap_local, "dctx", None)
        if dctx is None:
            dctx = _labelmap_local.dctx = zstandard.ZstdDecompressor()
        try:
            if zstandard.frame_content_size(data) != h * w:
                raise CodecError(f"label map: zstd frame does not declare {h}x{w} = {h * w} bytes")
            raw = dctx.decompress(data, max_output_size=h * w, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"label map: corrupt zstd frame: {exc}") from exc
        if len(raw) != h * w:
            raise CodecError(f"label map: {len(raw)} bytes, expected {h}x{w}={h * w}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(h, w).copy()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode != "L" or img.size != (w, h):  # checked before the pixels are inflated
                raise CodecError(f"label map: PNG is {img.mode} {img.size[::-1]}, expected L ({h}, {w})")
            img.load()
            return np.array(img, dtype=np.uint8)
    except CodecError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, zlib.error, ... on bad PNGs
        raise CodecError(f"label map: unreadable PNG: {exc}") from exc
