"""A block's header, read with bounded memory and checked field by field before anything is allocated.

``read_header`` inflates the zstd JSON header under a byte cap; ``parse_header`` turns the JSON
into a typed ``BlockHeader``, checking every field's type and range against absolute caps and,
when given, against ``ShardExpect`` (what the manifest says the shard holds). Columns come in
either form ``storage.shard`` describes (compact, or one entry per sample). Every error is a
ValueError whose message starts with the field at fault (``grids[3]: ...``); ``storage.shard``
adds the shard and block names.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import zstandard

from storage.labelmap import LABELMAP_METHODS

BLOCK_MAGIC = b"VQB1"

# Absolute caps, whatever a manifest says (a block that exceeds one is refused before allocation).
MAX_HEADER_BYTES = 16 << 20  # compressed header
MAX_HEADER_JSON = 32 << 20  # inflated header JSON
HEADER_JSON_PER_SAMPLE = 16 << 10  # inflated header bytes allowed per sample (keys <= 1 KiB, views, ...)
MAX_BLOCK_SAMPLES = 1 << 16
MAX_KEY_CHARS = 1024
MAX_GRID_SIDE = 1024
MAX_VIEWS = 64
MAX_BLOCK_TOKENS = 1 << 26  # tokens of all grids of a block (128 MiB as uint16)
MAX_LABELMAP_SIDE = 8192
MAX_LABELMAP_PIXELS = 1 << 26  # pixels of all label maps of a block, when the manifest gives no size
_INT64 = 1 << 63


@dataclass(frozen=True)
class ShardExpect:
    """What the manifest says a shard holds; a block that disagrees is an error.

    samples: samples in the shard. grid: (h, w) of every token grid (views included).
    num_classes: labels must be in [-1, num_classes). labelmap_side: label maps are at most
    this many pixels on each side; labelmap_classes: their values are at most this.
    first_key, last_key: the shard's first and last sample keys. None: not checked.
    """

    samples: int | None = None
    grid: tuple[int, int] | None = None
    num_classes: int | None = None
    labelmap_side: int | None = None
    labelmap_classes: int | None = None
    first_key: str | None = None
    last_key: str | None = None


@dataclass(frozen=True)
class ViewMeta:
    grid: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


@dataclass(frozen=True)
class BlockHeader:
    """A checked header. labels int64 (n,), image_size int64 (n, 2), crop_box int64 (n, 4).
    ``counts``: tokens per grid, main grids first, then every view's grid. ``uniform``: every
    main grid has one shape and no sample has views (the common case, decoded without per-sample
    work). ``has_labelmaps``: some sample has a label map."""

    n: int
    keys: list[str]
    labels: np.ndarray
    image_size: np.ndarray
    crop_box: np.ndarray
    grids: list[tuple[int, int]]
    views: list[list[ViewMeta]]
    token_bytes: int
    labelmap_method: str
    labelmaps: list[tuple[tuple[int, int], int] | None]
    offset: int  # where the token payload starts in the block
    uniform: bool = False
    has_labelmaps: bool = True

    @property
    def counts(self) -> list[int]:
        return [h * w for h, w in self.grids] + [v.grid[0] * v.grid[1] for vs in self.views for v in vs]

    @property
    def total_tokens(self) -> int:
        if self.uniform:
            return self.n * self.grids[0][0] * self.grids[0][1]
        return sum(self.counts)


_local = threading.local()  # a ZstdDecompressor per thread (they are not shared between threads)


def _dctx() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


PACKED_MAGIC = b"VQC1"  # a header holding packed columns starts with this (a JSON header starts with "{")
PACKED_COLUMNS = (("labels", 1), ("image_size", 2), ("crop_box", 4))  # int64 little-endian, in this order


def encode_header(fields: dict, labels: np.ndarray, image_size: np.ndarray, crop_box: np.ndarray) -> bytes:
    """The header text ``pack_block`` compresses: ``PACKED_MAGIC | u32 length | the columns of
    PACKED_COLUMNS as int64 LE | JSON of fields`` (``fields`` gets ``"packed"``: their names).
    Integers in JSON cost ~0.15 us each to parse, 1,792 per block of 256: packed they cost none."""
    packed = np.concatenate([np.asarray(labels).reshape(-1), np.asarray(image_size).reshape(-1),
                             np.asarray(crop_box).reshape(-1)]).astype("<i8").tobytes()
    text = json.dumps({**fields, "packed": [name for name, _ in PACKED_COLUMNS]}, separators=(",", ":")).encode()
    return PACKED_MAGIC + struct.pack("<I", len(packed)) + packed + text


def _inflate(data: bytes, max_samples: int) -> tuple[bytes, int]:
    """(the header text, payload offset), inflating at most the cap for ``max_samples`` samples.

    A frame that declares its size (what ``pack_block`` writes) is refused before inflating when
    that size is over the cap, else inflated in one call (which fails if the frame holds more
    than it declares); a frame that does not is read as a stream up to the cap."""
    if len(data) < 8 or data[:4] != BLOCK_MAGIC:
        raise ValueError("magic: not a vqpt block")
    (header_len,) = struct.unpack_from("<I", data, 4)
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header_len: {header_len} bytes is over the cap of {MAX_HEADER_BYTES}")
    if 8 + header_len > len(data):
        raise ValueError(f"header_len: {header_len} bytes overruns the {len(data)}-byte block")
    cap = min(MAX_HEADER_JSON, 4096 + HEADER_JSON_PER_SAMPLE * max_samples)
    frame = data[8 : 8 + header_len]
    too_big = f"header: inflates to more than {cap} bytes (the cap for {max_samples} samples)"
    try:
        declared = zstandard.frame_content_size(frame)
        if declared > cap:
            raise ValueError(too_big)
        if declared >= 0:
            text = _dctx().decompress(frame, max_output_size=declared, allow_extra_data=False)
        else:
            with _dctx().stream_reader(io.BytesIO(frame)) as reader:
                text = reader.read(cap + 1)
    except zstandard.ZstdError as err:
        raise ValueError(f"header: unreadable zstd JSON: {err}") from err
    if len(text) > cap:
        raise ValueError(too_big)
    return text, 8 + header_len


def read_header_packed(data: bytes, max_samples: int = MAX_BLOCK_SAMPLES) -> tuple[Any, int, bytes | None]:
    """(header JSON value, payload offset, its packed columns' bytes or None) for ``parse_header``."""
    text, offset = _inflate(data, max_samples)
    packed = None
    if text[:4] == PACKED_MAGIC:
        if len(text) < 8:
            raise ValueError("packed: header too short for its column length")
        (length,) = struct.unpack_from("<I", text, 4)
        if 8 + length > len(text):
            raise ValueError(f"packed: {length} bytes of columns overrun the {len(text)}-byte header")
        packed, text = text[8 : 8 + length], text[8 + length :]
    try:  # ValueError covers bad JSON, bad UTF-8 and integers over Python's digit limit
        header = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"header: unreadable zstd JSON: {err}") from err
    return header, offset, packed


def read_header(data: bytes, max_samples: int = MAX_BLOCK_SAMPLES) -> tuple[Any, int]:
    """(header JSON value, payload offset), packed columns unpacked into the JSON's lists: the
    header as one JSON object (for tools that edit headers; ``parse_header`` reads it as is)."""
    header, offset, packed = read_header_packed(data, max_samples)
    if packed is not None and isinstance(header, dict) and isinstance(header.get("n"), int):
        columns = _unpack(header, packed, header["n"])
        header = {k: v for k, v in header.items() if k != "packed"} | {k: a.tolist() for k, a in columns.items()}
    return header, offset


def _unpack(raw: dict, packed: bytes, n: int) -> dict[str, np.ndarray]:
    """The packed columns as int64 arrays (n,) / (n, width); ValueError naming what does not fit."""
    names = [name for name, _ in PACKED_COLUMNS]
    if raw.get("packed") != names:
        raise ValueError(f"packed: {_show(raw.get('packed'))} is not {names}")
    width = sum(w for _, w in PACKED_COLUMNS)
    if len(packed) != 8 * width * n:
        raise ValueError(f"packed: {len(packed)} bytes of columns, expected {8 * width * n} for {n} samples")
    flat = np.frombuffer(packed, dtype="<i8").astype(np.int64)
    out, start = {}, 0
    for name, w in PACKED_COLUMNS:
        out[name] = flat[start : start + n * w] if w == 1 else flat[start : start + n * w].reshape(n, w)
        start += n * w
    return out


def _in_range(column: np.ndarray, field: str, lo: int, hi: int) -> np.ndarray:
    """``column`` if every value is in [lo, hi]; else ValueError naming the first that is not."""
    if column.size and (int(column.min()) < lo or int(column.max()) > hi):
        bad = np.argwhere((column < lo) | (column > hi))[0]
        where = "".join(f"[{int(i)}]" for i in bad)
        raise ValueError(f"{field}{where}: {int(column[tuple(bad)])} is outside [{lo}, {hi}]")
    return column


def _int(value: Any, field: str, lo: int = -_INT64, hi: int = _INT64 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: {_show(value)} is not an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{field}: {value} is outside [{lo}, {hi}]")
    return value


def _list(value: Any, field: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{field}: {_show(value)} is not a list")
    if length is not None and len(value) != length:
        raise ValueError(f"{field}: {len(value)} entries, expected {length}")
    return value


def _ints(value: Any, field: str, length: int, lo: int = -_INT64, hi: int = _INT64 - 1) -> tuple[int, ...]:
    return tuple(_int(v, f"{field}[{i}]", lo, hi) for i, v in enumerate(_list(value, field, length)))


def _column(value: Any, field: str, n: int, width: int | None = None, lo: int = -_INT64,
            hi: int = _INT64 - 1) -> np.ndarray:
    """``n`` entries, each an int in [lo, hi] (``width`` None) or ``width`` such ints, as int64 (n,)
    or (n, width). With a width, the column is nested (``[[a, b], ...]``) or flat (``[a, b, ...]``,
    what ``pack_block`` writes).

    Checks the whole column at once and only walks it entry by entry, to name the first bad one,
    when something is wrong (the common case costs a few C-level passes, not a call per value).
    """
    rows = _list(value, field)
    flat_form = width is not None and len(rows) == n * width and (not rows or type(rows[0]) is not list)
    if not flat_form:
        _list(value, field, n)
    if width is None or flat_form:
        shaped, flat = True, rows
    else:
        shaped = set(map(type, rows)) <= {list} and set(map(len, rows)) <= {width}
        flat = list(chain.from_iterable(rows)) if shaped else []
    if shaped and set(map(type, flat)) <= {int}:
        try:
            arr = np.array(flat, dtype=np.int64)
        except OverflowError:
            arr = None
        if arr is not None and (not arr.size or lo <= int(arr.min()) and int(arr.max()) <= hi):
            return arr if width is None else arr.reshape(n, width)
    if flat_form:
        for i, v in enumerate(rows):
            _int(v, f"{field}[{i // width}][{i % width}]", lo, hi)  # type: ignore[operator]
    for i, r in enumerate(rows):
        if width is None:
            _int(r, f"{field}[{i}]", lo, hi)
        else:
            _ints(r, f"{field}[{i}]", width, lo, hi)
    raise AssertionError("unreachable: the column check failed but no entry is bad")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, int | float | str | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _grid(value: Any, field: str, expect: ShardExpect) -> tuple[int, int]:
    grid = _ints(value, field, 2)
    if expect.grid is not None and grid != tuple(expect.grid):
        raise ValueError(f"{field}: grid {list(grid)} disagrees with the manifest's {list(expect.grid)}")
    return _ints(value, field, 2, 1, MAX_GRID_SIDE)  # type: ignore[return-value]


def _view(value: Any, field: str, expect: ShardExpect) -> ViewMeta:
    if not isinstance(value, dict):
        raise ValueError(f"{field}: {_show(value)} is not an object")
    for name in ("grid", "box", "flip"):
        if name not in value:
            raise ValueError(f"{field}.{name}: missing")
    if not isinstance(value["flip"], bool):
        raise ValueError(f"{field}.flip: {_show(value['flip'])} is not true/false")
    return ViewMeta(_grid(value["grid"], f"{field}.grid", expect), _ints(value["box"], f"{field}.box", 4),  # type: ignore[arg-type]
                    value["flip"])


def _labelmap(value: Any, field: str, expect: ShardExpect) -> tuple[tuple[int, int], int] | None:
    if value is None:
        return None
    entry = _list(value, field, 2)
    side = MAX_LABELMAP_SIDE if expect.labelmap_side is None else expect.labelmap_side
    shape = _ints(entry[0], f"{field}.shape", 2, 1, side)
    return (shape[0], shape[1]), _int(entry[1], f"{field}.bytes", 0)


def parse_header(raw: Any, offset: int, block_len: int, expect: ShardExpect | None = None,
                 max_samples: int = MAX_BLOCK_SAMPLES, packed: bytes | None = None) -> BlockHeader:
    """Check every field of a header's JSON; ValueError naming the first field at fault.

    ``max_samples``: most samples this block may hold (what is left of the shard's count).
    Sizes are checked against ``block_len`` (declared payloads must fit inside the block), the
    absolute caps of this module and ``expect``, so decoding allocates only what is bounded.
    """
    expect = expect or ShardExpect()
    if not isinstance(raw, dict):
        raise ValueError(f"header: {_show(raw)} is not an object")
    fields = ("n", "keys", "grids", "views", "token_bytes", "labelmap_method", "labelmaps")
    if packed is None:
        fields += ("labels", "image_size", "crop_box")
    elif "packed" not in raw:
        raise ValueError("packed: columns precede the JSON but it does not name them")
    for name in fields:
        if name not in raw:
            raise ValueError(f"{name}: missing from the header")
    n = _int(raw["n"], "n", 1, min(max_samples, MAX_BLOCK_SAMPLES))
    keys = _list(raw["keys"], "keys", n)
    if not (set(map(type, keys)) <= {str} and min(map(len, keys)) > 0 and max(map(len, keys)) <= MAX_KEY_CHARS):
        i, k = next((i, k) for i, k in enumerate(keys) if not (type(k) is str and 0 < len(k) <= MAX_KEY_CHARS))
        raise ValueError(f"keys[{i}]: {_show(k)} is not a string of 1..{MAX_KEY_CHARS} characters")
    hi = _INT64 - 1 if expect.num_classes is None else expect.num_classes - 1
    if packed is not None:
        columns = _unpack(raw, packed, n)
        labels = _in_range(columns["labels"], "labels", -1, hi)
        image_size = _in_range(columns["image_size"], "image_size", 0, _INT64 - 1)
        crop_box = columns["crop_box"]
    else:
        labels = _column(raw["labels"], "labels", n, None, -1, hi)
        image_size = _column(raw["image_size"], "image_size", n, 2, 0)
        crop_box = _column(raw["crop_box"], "crop_box", n, 4)
    raw_grids = _list(raw["grids"], "grids")
    if raw_grids and type(raw_grids[0]) is not list:  # one [h, w] for every sample
        grids = [_grid(raw_grids, "grids", expect)] * n
    else:
        _list(raw_grids, "grids", n)
        want = None if expect.grid is None else list(expect.grid)
        if want is not None and raw_grids.count(want) == n and set(map(type, chain.from_iterable(raw_grids))) == {int}:
            grids = [tuple(expect.grid)] * n  # every grid is the manifest's
        else:
            grids = [_grid(v, f"grids[{i}]", expect) for i, v in enumerate(raw_grids)]
    raw_views = _list(raw["views"], "views")
    if raw_views:
        _list(raw_views, "views", n)
    no_views = not raw_views or raw_views.count([]) == n
    views: list[list[ViewMeta]] = [[]] * n if no_views else []
    for i, vs in enumerate([] if no_views else raw_views):
        if not vs and type(vs) is list:
            views.append([])
            continue
        if len(_list(vs, f"views[{i}]")) > MAX_VIEWS:
            raise ValueError(f"views[{i}]: {len(vs)} views, the cap is {MAX_VIEWS}")
        views.append([_view(v, f"views[{i}][{j}]", expect) for j, v in enumerate(vs)])
    payload = block_len - offset
    token_bytes = _int(raw["token_bytes"], "token_bytes", 0, payload)
    method = raw["labelmap_method"]
    if method not in LABELMAP_METHODS:
        raise ValueError(f"labelmap_method: {_show(method)} is not one of {LABELMAP_METHODS}")
    raw_maps = _list(raw["labelmaps"], "labelmaps")
    if raw_maps:
        _list(raw_maps, "labelmaps", n)
    no_maps = not raw_maps or raw_maps.count(None) == n
    labelmaps = ([None] * n if no_maps else
                 [None if v is None else _labelmap(v, f"labelmaps[{i}]", expect) for i, v in enumerate(raw_maps)])
    uniform = no_views and len(set(grids)) == 1
    header = BlockHeader(n, keys, labels, image_size, crop_box, grids, views, token_bytes, method, labelmaps, offset,
                         uniform, not no_maps)
    tokens = header.total_tokens
    if tokens > MAX_BLOCK_TOKENS:
        raise ValueError(f"grids: {tokens} tokens in one block, the cap is {MAX_BLOCK_TOKENS}")
    map_bytes = 0 if no_maps else sum(m[1] for m in labelmaps if m is not None)
    if token_bytes + map_bytes != payload:
        raise ValueError(f"token_bytes/labelmaps: payloads of {token_bytes} + {map_bytes} bytes, "
                         f"the block holds {payload} after its header")
    pixels = 0 if no_maps else sum(m[0][0] * m[0][1] for m in labelmaps if m is not None)
    if expect.labelmap_side is None and pixels > MAX_LABELMAP_PIXELS:
        raise ValueError(f"labelmaps: {pixels} pixels in one block, the cap is {MAX_LABELMAP_PIXELS}")
    return header
