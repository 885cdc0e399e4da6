"""Read items' bytes from their spans: one ranged read per archive member, one read per parquet
row group per chunk.

``fetch_chunk(items)`` is what a decode task calls for its chunk: it returns, per item, the image
bytes and label-map bytes (None where the item is a plain local file, read by ``load_item``), or a
``Reject`` with the reason (a zip member whose CRC does not match, a parquet row without image
bytes, a member larger than ``MAX_MEMBER_BYTES``). Memory is bounded by the chunk's members plus
one parquet row group's image column.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import pyarrow.parquet as pq

from pipeline.readers import Reject, SourceItem, Span
from pipeline.sources.archives import open_object
from storage import io as sio

MAX_MEMBER_BYTES = 256 << 20
ZIP_HEADER = struct.Struct("<4s2B4HL2L2H")  # local file header: 30 bytes
ZIP_SLACK = 1024  # bytes of name + extra field read with the data (a second read when more)


def _range(url: str, start: int, end: int) -> bytes:
    return sio.read_range(url, start, end)


def _zip_member(span: Span) -> bytes:
    """The uncompressed bytes of a zip member; ValueError on a bad header, size or CRC."""
    head = _range(span.url, span.offset, span.offset + ZIP_HEADER.size + ZIP_SLACK + span.size)
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


def read_span(span: Span) -> bytes:
    """The bytes at a raw or zip span (see ``pipeline.readers.Span``); ValueError when unusable."""
    if span.size > MAX_MEMBER_BYTES or span.usize > MAX_MEMBER_BYTES:
        raise ValueError(f"member of {max(span.size, span.usize)} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit")
    if span.kind == "zip":
        return _zip_member(span)
    if span.kind == "raw":
        data = _range(span.url, span.offset, span.offset + span.size)
        if len(data) != span.size:
            raise ValueError(f"member is cut short ({len(data)} of {span.size} bytes; truncated archive)")
        return data
    raise ValueError(f"span kind {span.kind!r} is read by fetch_chunk")


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
    out: list[tuple[bytes | None, bytes | None] | Reject] = []
    for i, item in enumerate(items):
        try:
            got = []
            for span in (item.span, item.labelmap_span):
                if span is None:
                    got.append(None)
                elif span.kind == "parquet":
                    cell = cells[(i, span.column)]
                    if isinstance(cell, str):
                        raise ValueError(cell)
                    got.append(cell)
                else:
                    got.append(read_span(span))
            out.append((got[0], got[1]))
        except FileNotFoundError:
            out.append(Reject(item.path, "archive vanished after indexing"))
        except (ValueError, OSError, zlib.error) as err:
            out.append(Reject(item.path, str(err)))
    return out
