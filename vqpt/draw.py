"""Pictures of what a split holds: tiles of images with captions, ADE20K label maps over images, a legend.

Pure drawing (PIL and numpy); ``vqpt.show`` decides what goes in. Layout of ``grid`` (all in px)::

    +--PAD--+-----------cell-----------+--PAD--+-- ...
    |       | image | GAP | image      |       |          a cell: the tile's images side by side
    |       | caption line 1           |       |          (each SIDE x SIDE), then CAPTION_LINE px
    |       | caption line 2 ...       |       |          per caption line
    +-------+--------------------------+-------+-- ...
    | legend rows (LEGEND_ROW px each), when there is a legend                 |

width = PAD + cols * (cell_w + PAD), height = PAD + rows * (cell_h + PAD) + legend height, with
cell_w = k * SIDE + (k - 1) * GAP for k images per tile and cell_h = SIDE + lines * CAPTION_LINE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ADE20K_PALETTE", "Tile", "overlay", "grid", "legend_entries", "PAD", "GAP", "CAPTION_LINE",
           "LEGEND_ROW", "grid_size"]

PAD, GAP, CAPTION_LINE, LEGEND_ROW = 8, 4, 13, 16
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)

# The ADE20K SceneParsing colours of classes 1..150 (objectInfo150 order; CSAIL's color150, as
# mmsegmentation's ADE20KDataset lists them), 6 hex digits each. Class 0 ("other") is not drawn.
_PALETTE_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff0652"
    "8fff8cccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0"
    "ffb8060aff47ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff"
    "8c8c8cfa0a0f14ff001fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff"
    "00ff7000ff85ff0000ffa300ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ff"
    "ff00f5ff0066ffad00ff0014ffb8b8001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff"
    "00ffa3ff990000ff0aff70008fff005200ffa3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff0070"
    "5cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff500"
    "0abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cff"
    "b8ff000085ffffd60019c2c266ff005c00ff"
)
ADE20K_PALETTE = np.frombuffer(bytes.fromhex(_PALETTE_HEX), dtype=np.uint8).reshape(150, 3)


@dataclass(frozen=True)
class Tile:
    """One cell of the grid: images uint8 (SIDE, SIDE, 3) side by side, then caption lines (cut to fit;
    the first one, the key, keeps its end)."""

    images: tuple[np.ndarray, ...]
    caption: tuple[str, ...]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def overlay(image: np.ndarray, labelmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (S, S, 3) image with the label map uint8 (L, L) (0 = other, 1..150) painted over it: the
    map nearest-resized to S, each labelled pixel mixed ``alpha`` of its class colour; "other" left as is."""
    side = image.shape[0]
    lm = np.asarray(Image.fromarray(labelmap).resize((image.shape[1], side), Image.Resampling.NEAREST))
    colours = np.concatenate([np.zeros((1, 3), np.uint8), ADE20K_PALETTE])[np.minimum(lm, 150)]
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.where((lm > 0)[..., None], np.round(mixed), image).astype(np.uint8)


def legend_entries(labelmaps: Sequence[np.ndarray], names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class 1..150 present in ``labelmaps``, by class index; ``names`` are the
    150 class names (index 0 = class 1); unnamed classes read ``class N``."""
    present = sorted({int(c) for lm in labelmaps for c in np.unique(lm) if 1 <= int(c) <= 150})
    return [(names[c - 1] if c - 1 < len(names) else f"class {c}", tuple(int(v) for v in ADE20K_PALETTE[c - 1]))
            for c in present]


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font, head: bool = False) -> str:
    """``text`` cut to at most ``width`` px: its end replaced by "..." (``head``: its start, for keys,
    whose end names the image)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text if head else text + "...", font=font) > width:
        text = text[1:] if head else text[:-1]
    return "..." + text if head else text + "..."


def grid_size(tiles: int, per_tile: int, lines: int, side: int, cols: int,
              legend_rows: int = 0) -> tuple[int, int]:
    """(width, height) px of ``grid`` for ``tiles`` cells of ``per_tile`` images and ``lines`` caption lines."""
    rows = math.ceil(tiles / cols)
    cell_w, cell_h = per_tile * side + (per_tile - 1) * GAP, side + lines * CAPTION_LINE
    legend_h = legend_rows * LEGEND_ROW + (PAD if legend_rows else 0)
    return PAD + cols * (cell_w + PAD), PAD + rows * (cell_h + PAD) + legend_h


def grid(tiles: Sequence[Tile], cols: int, legend: Sequence[tuple[str, tuple[int, int, int]]] = ()
         ) -> tuple[Image.Image, list[list[list[int]]], int]:
    """The tiles, ``cols`` per row, and the legend below them (swatch + name, as many per row as fit).

    Every tile must have as many images, of one side, and as many caption lines as the first; the first
    caption line (the key) is cut from its start, the others from their end. Returns the RGB image (size
    ``grid_size``), per tile each image's box [x0, y0, x1, y1] (x1, y1 exclusive), and the legend's rows."""
    side, per_tile, lines = tiles[0].images[0].shape[0], len(tiles[0].images), len(tiles[0].caption)
    cell_w = per_tile * side + (per_tile - 1) * GAP
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch = LEGEND_ROW - 4
    entry_w = max([swatch + 4 + int(probe.textlength(name, font=font)) + 12 for name, _ in legend] or [1])
    width, _ = grid_size(len(tiles), per_tile, lines, side, cols)
    per_row = max(1, (width - 2 * PAD) // entry_w)
    legend_rows = math.ceil(len(legend) / per_row)
    width, height = grid_size(len(tiles), per_tile, lines, side, cols, legend_rows)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for i, tile in enumerate(tiles):
        if len(tile.images) != per_tile or len(tile.caption) != lines:
            raise ValueError(f"tile {i}: {len(tile.images)} images / {len(tile.caption)} caption lines, expected "
                             f"{per_tile} / {lines}")
        x = PAD + (i % cols) * (cell_w + PAD)
        y = PAD + (i // cols) * (side + lines * CAPTION_LINE + PAD)
        tile_boxes = []
        for j, image in enumerate(tile.images):
            if image.shape != (side, side, 3) or image.dtype != np.uint8:
                raise ValueError(f"tile {i} image {j}: expected uint8 ({side}, {side}, 3), got {image.dtype} "
                                 f"{image.shape}")
            x0 = x + j * (side + GAP)
            canvas.paste(Image.fromarray(image), (x0, y))
            tile_boxes.append([x0, y, x0 + side, y + side])
        for k, line in enumerate(tile.caption):
            text = _fit(draw, line, cell_w, font, head=k == 0)
            draw.text((x, y + side + k * CAPTION_LINE), text, fill=_TEXT, font=font)
        boxes.append(tile_boxes)
    top = height - legend_rows * LEGEND_ROW - (PAD if legend_rows else 0) + (PAD if legend_rows else 0) // 2
    for k, (name, colour) in enumerate(legend):
        x = PAD + (k % per_row) * entry_w
        y = top + (k // per_row) * LEGEND_ROW
        draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=colour, outline=_TEXT)
        draw.text((x + swatch + 4, y + 2), name, fill=_TEXT, font=font)
    return canvas, boxes, legend_rows
