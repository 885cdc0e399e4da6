"""Read items' bytes from their spans: ranged reads (nearby members merged, up to ``READ_THREADS``
in flight), one read per parquet row group per chunk.

``fetch_chunk(items)`` is what a decode task calls for its chunk: it returns, per item, the image
bytes and label-map bytes (None where the item is a plain local file, read by ``load_item``), or a
``Reject`` with the reason (a zip member whose CRC does not match, a parquet row without image
bytes, a member larger than ``MAX_MEMBER_BYTES``). Memory is bounded by the chunk's members plus
one parquet row group's image column (and ``READ_THREADS`` merged ranges of ``MERGE_MAX``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from pipeline.readers import Reject, SourceItem, Span
from pipeline.sources.archives import open_object
from storage import io as sio

MAX_MEMBER_BYTES = 256 << 20
MERGE_GAP = 32 << 10  # reading up to 32 KiB between two members beats a second request
MERGE_MAX = 16 << 20
READ_THREADS = 16
ZIP_HEADER = struct.Struct("<4s2B4HL2L2H")  # local file header: 30 bytes
ZIP_SLACK = 1024  # bytes of name + extra field read with the data (a second read when more)


def _range(url: str, start: int, end: int) -> bytes:
    return sio.read_range(url, start, end)


def _extent(span: Span) -> tuple[int, int]:
    """The bytes of ``span.url`` that reading ``span`` needs (a zip member: its local header too)."""
    if span.kind == "zip":
        return span.offset, span.offset + ZIP_HEADER.size + ZIP_SLACK + span.size
    return span.offset, span.offset + span.size


def _zip_member(span: Span, head: bytes) -> bytes:
    """The uncompressed bytes of a zip member from its ``_extent``; ValueError on a bad header, size or CRC."""
    if len(head) < ZIP_HEADER.size or head[:4] != b"PK\x03\x04":
        raise ValueError(f"no zip local header at byte {span.offset} (truncated archive?)")
    fields = ZIP_HEADER.unpack(head[: ZIP_HEADER.size])
    start = ZIP_HEADER.size + fields[-2] + fields[-1]  # name length + extra length
    data = head[start : start + span.size]
    if len(data) < span.size and start > ZIP_HEADER.size + ZIP_SLACK:  # a long extra field: read again
        data = _range(span.url, span.offset + start, span.offset + start + span.size)
    if len(data) != span.size:
        raise ValueError(f"zip member data is cut short ({len(data)} of {span.size} bytes; truncated archive)")
    if span.method == 8:
        inflater = zlib.decompressobj(-15)
        data = inflater.decompress(data, span.usize + 1)  # bounded: a bomb stops at usize + 1
    if len(data) != span.usize:
        raise ValueError(f"zip member inflates to {len(data)} bytes, the directory says {span.usize}")
    if zlib.crc32(data) != span.crc:
        raise ValueError(f"zip member has a bad CRC ({zlib.crc32(data):08x}, expected {span.crc:08x})")
    return data


def _check(span: Span) -> None:
    if span.size > MAX_MEMBER_BYTES or span.usize > MAX_MEMBER_BYTES:
        raise ValueError(f"member of {max(span.size, span.usize)} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit")
    if span.kind not in ("raw", "zip"):
        raise ValueError(f"span kind {span.kind!r} is read by fetch_chunk")


def _member(span: Span, blob: bytes) -> bytes:
    """A raw or zip member from the bytes of its ``_extent``."""
    if span.kind == "zip":
        return _zip_member(span, blob)
    if len(blob) != span.size:
        raise ValueError(f"member is cut short ({len(blob)} of {span.size} bytes; truncated archive)")
    return blob


def read_span(span: Span) -> bytes:
    """The bytes at a raw or zip span (see ``pipeline.readers.Span``); ValueError when unusable."""
    _check(span)
    return _member(span, _range(span.url, *_extent(span)))


def read_spans(spans: Sequence[Span]) -> list[bytes | Exception]:
    """``read_span`` of each, with fewer and concurrent requests: the extents of one object lying
    within ``MERGE_GAP`` of each other are read as one range (up to ``MERGE_MAX`` bytes), and the
    ranges are read ``READ_THREADS`` at a time (on S3 each is a GET whose latency would otherwise
    add up). A span that cannot be read comes back as its exception."""
    out: list[bytes | Exception] = [b""] * len(spans)
    wanted = []
    for i, span in enumerate(spans):
        try:
            _check(span)
            wanted.append((span.url, *_extent(span), i))
        except ValueError as err:
            out[i] = err
    reads: list[tuple[str, int, int, list[tuple[int, int, int]]]] = []  # url, start, end, (item, start, end)
    for url, start, end, i in sorted(wanted):
        last = reads[-1] if reads else None
        if last and last[0] == url and start - last[2] <= MERGE_GAP and max(end, last[2]) - last[1] <= MERGE_MAX:
            reads[-1] = (url, last[1], max(end, last[2]), [*last[3], (i, start, end)])
        else:
            reads.append((url, start, end, [(i, start, end)]))

    def one(read, blob=None):
        url, start, end, members = read
        try:
            blob = _range(url, start, end) if blob is None else blob
        except (OSError, ValueError) as err:
            return [(i, err) for i, _, _ in members]
        got = []
        for i, s, e in members:
            try:
                got.append((i, _member(spans[i], blob[s - start : e - start])))
            except (ValueError, OSError, zlib.error) as err:
                got.append((i, err))
        return got

    remote = [r for r in reads if sio.protocol_of(r[0]) != "file"]
    blobs = _remote_ranges(remote) if remote else {}
    if len(reads) == 1 or blobs:
        results = [one(r, blobs.get(id(r))) for r in reads]
    else:
        with ThreadPoolExecutor(min(READ_THREADS, len(reads) or 1)) as pool:
            results = list(pool.map(one, reads))
    for got in results:
        for i, value in got:
            out[i] = value
    return out


def _remote_ranges(reads: list) -> dict[int, bytes]:
    """id(read) -> bytes for remote reads, all fetched by one batched, concurrent ``cat_ranges`` call
    per filesystem (retried as a whole like ``storage.io.read_range``); {} where it fails, so
    the reads fall back to one request each (which names the failing object)."""
    fs = sio.filesystem(reads[0][0])
    if not hasattr(fs, "cat_ranges") or any(sio.protocol_of(r[0]) != sio.protocol_of(reads[0][0]) for r in reads):
        return {}
    paths = [sio._path(r[0]) for r in reads]
    try:
        got = sio.with_retries(lambda: fs.cat_ranges(paths, [r[1] for r in reads], [r[2] for r in reads],
                                                     on_error="return", batch_size=READ_THREADS),
                               f"reading {len(reads)} ranges of {reads[0][0]}")
    except (OSError, ValueError):
        return {}
    return {id(r): b for r, b in zip(reads, got, strict=True) if isinstance(b, bytes)}


def _parquet_cells(spans: list[tuple[int, Span]]) -> dict[tuple[int, str], bytes | str]:
    """(item index, column) -> cell bytes, or a reason string, reading each row group once."""
    from pipeline.sources.tables import _leaf

    cells: dict[tuple[int, str], bytes | str] = {}
    groups: dict[tuple[str, int], list[tuple[int, Span]]] = {}
    for i, span in spans:
        groups.setdefault((span.url, span.row_group), []).append((i, span))
    for (url, group), members in sorted(groups.items()):
        columns = sorted({s.column for _, s in members})
        with open_object(url) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=columns)
        for column in columns:
            values = _leaf(table, column)
            for i, span in members:
                if span.column == column:
                    value = values[span.row].as_py()
                    cells[(i, column)] = value if value else f"parquet row has no {column} bytes"
        del table
    return cells


def fetch_chunk(items: Sequence[SourceItem]) -> list[tuple[bytes | None, bytes | None] | Reject]:
    """Per item: (image bytes, label-map bytes), None for what ``load_item`` reads from a local file,
    or a ``Reject`` (with the reason) when the bytes cannot be had."""
    parquet = [(i, s) for i, it in enumerate(items) for s in (it.span, it.labelmap_span)
               if s is not None and s.kind == "parquet"]
    try:
        cells = _parquet_cells(parquet) if parquet else {}
    except (OSError, ValueError) as err:  # the whole row group is unreadable: every item in it is rejected
        return [Reject(it.path, f"unreadable parquet row group: {err}") for it in items]
    ranged = [s for it in items for s in (it.span, it.labelmap_span) if s is not None and s.kind != "parquet"]
    blobs = dict(zip([id(s) for s in ranged], read_spans(ranged), strict=True))
    out: list[tuple[bytes | None, bytes | None] | Reject] = []
    for i, item in enumerate(items):
        try:
            got = []
            for span in (item.span, item.labelmap_span):
                value = None if span is None else cells[(i, span.column)] if span.kind == "parquet" else blobs[id(span)]
                if isinstance(value, str):
                    raise ValueError(value)
                if isinstance(value, Exception):
                    raise value
                got.append(value)
            out.append((got[0], got[1]))
        except FileNotFoundError:
            out.append(Reject(item.path, "archive vanished after indexing"))
        except (ValueError, OSError, zlib.error) as err:
            out.append(Reject(item.path, str(err)))
    return out
